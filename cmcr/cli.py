"""The ``cmcr`` command line (typer). Thin: parse, call the rooms, report.

Each command group lives in its own module (``cli_store``, ``cli_encode``, ``cli_connect``,
``cli_demo``) exposing ``register(app)``; this file only assembles them and turns
:class:`cmcr.errors.CmcrError` into a clear message and an exit code.

Exit codes (docs/cli.md): 0 success; 1 runtime error (a :class:`~cmcr.errors.CmcrError`: bad input
data, a store or connector that does not fit, a locked output, a training failure); 2 usage error
(unknown option, invalid option value, a bad configuration: click's usage errors and
:class:`~cmcr.errors.ConfigError`); 130 interrupted (Ctrl-C). Anything else is a bug and keeps its
traceback.

Streams: results (tables, JSON, search hits) go to stdout, progress bars, warnings and logs to
stderr; output piped to a file is not wrapped at 80 columns; error texts and help texts are plain
text (never read as rich markup).
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from cmcr import __version__
from cmcr.errors import CmcrError, ConfigError

#: Exit codes (see the module docstring and docs/cli.md).
EXIT_OK, EXIT_RUNTIME_ERROR, EXIT_USAGE_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Global flags accepted anywhere on the command line (before or after the subcommand).
GLOBAL_FLAGS = {"-v": "--verbose", "--verbose": "--verbose", "-q": "--quiet", "--quiet": "--quiet"}

app = typer.Typer(
    name="cmcr",
    help=(
        "Connect two pretrained multi-modal contrastive models (e.g. CLIP and CLAP) through the "
        "modality they share (C-MCR). Stages: shard -> encode -> connect -> project/search/eval.\n\n"
        "Example: cmcr demo --out demo-out"
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: `cmcr[ray]` must not be read as markup
)
err_console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cmcr {__version__}")
        raise typer.Exit()


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Logs go to stderr. Default: cmcr's warnings. ``-v``: cmcr's debug messages (other libraries stay at
    WARNING, so torch/PIL/urllib3 do not flood the screen). ``-q``: errors only."""
    level = logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # also when logging was configured before (repeated main() calls)
    # -v: cmcr only (NOTSET otherwise: cmcr follows the root level, and a library user's own setup)
    logging.getLogger("cmcr").setLevel(logging.DEBUG if verbose and not quiet else logging.NOTSET)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log cmcr's debug messages (also after the command)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no warnings, no progress bars."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from cmcr.stores.files import set_quiet

    setup_logging(verbose, quiet)
    set_quiet(quiet)  # no progress bars (cmcr.stores.files.progress_options)


def _register_all() -> None:
    from cmcr import cli_connect, cli_connector, cli_demo, cli_encode, cli_localize, cli_serve, cli_store

    for module in (cli_store, cli_encode, cli_connect, cli_demo, cli_connector, cli_serve, cli_localize):
        module.register(app)


_register_all()


def hoist_global_flags(argv: list[str]) -> list[str]:
    """Move ``-v/--verbose/-q/--quiet`` given after the subcommand to the front (before ``--`` only),
    so ``cmcr encode ... -v`` works like ``cmcr -v encode ...``."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [GLOBAL_FLAGS[a] for a in argv[:end] if a in GLOBAL_FLAGS]
    rest = [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]
    return [*dict.fromkeys(flags), *rest]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (see the module docstring).

    Usage errors are reported by typer/click (exit 2), as is a :class:`ConfigError`; any other
    :class:`CmcrError` becomes a one-paragraph message without a traceback (exit 1); anything
    else is a bug and keeps its traceback.
    """
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, standalone_mode=True, prog_name="cmcr")
    except CmcrError as e:
        # the message is plain text: a path like `a[/x]` must print as is (and never crash the printer)
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE_ERROR if isinstance(e, ConfigError) else EXIT_RUNTIME_ERROR
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
