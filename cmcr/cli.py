"""The ``cmcr`` command line (typer). Thin: parse, call the rooms, report.

Each command group lives in its own module (``cli_store``, ``cli_encode``, ``cli_connect``,
``cli_demo``) exposing ``register(app)``; this file only assembles them and turns
:class:`cmcr.errors.CmcrError` into a clear message and exit code 2.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from cmcr import __version__
from cmcr.errors import CmcrError

app = typer.Typer(
    name="cmcr",
    help=(
        "Connect two pretrained multi-modal contrastive models (e.g. CLIP and CLAP) through the "
        "modality they share (C-MCR). Stages: shard -> encode -> connect -> project/search/eval.\n\n"
        "Example: cmcr demo --out demo-out"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cmcr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _register_all() -> None:
    from cmcr import cli_connect, cli_demo, cli_encode, cli_serve, cli_store

    for module in (cli_store, cli_encode, cli_connect, cli_demo, cli_serve):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code.

    Usage errors are reported by typer/click (exit 2); a :class:`CmcrError` becomes a one-paragraph
    message without a traceback (exit 2); anything else is a bug and keeps its traceback.
    """
    try:
        app(args=argv, standalone_mode=True)
    except CmcrError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)  # paths stay copyable
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
