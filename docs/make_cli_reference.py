"""Regenerate docs/cli.md from the CLI's own --help texts: `python docs/make_cli_reference.py`."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["COLUMNS"] = "110"
os.environ["TERM"] = "dumb"
os.environ["NO_COLOR"] = "1"

import typer  # noqa: E402

from cmcr.cli import app  # noqa: E402


def command_paths() -> list[list[str]]:
    """Every leaf command as its argv path, e.g. ``["store", "import"]``."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd, prefix: list[str]) -> None:  # noqa: ANN001
        subs = getattr(cmd, "commands", None)
        if subs:
            for name in sorted(subs):
                walk(subs[name], [*prefix, name])
        else:
            paths.append(prefix)

    walk(root, [])
    return paths


CONVENTIONS = """
## Conventions (every command)

- **Streams:** results (tables, search hits, `--json`) go to **stdout**; progress bars, warnings and
  logs go to **stderr**, so `cmcr encode ... --json > report.json` holds only the JSON. Output piped
  to a file is not wrapped at 80 columns. Error and help texts are plain text (a path like
  `a[/x]` prints as is).
- **Exit codes:** `0` success; `1` runtime error (bad input data, a store or connector that does not
  fit, an output folder another cmcr process is writing, a training failure: one `error:` line, no
  traceback); `2` usage error (unknown option, invalid option value, bad configuration:
  `ConfigError`); `130` interrupted (Ctrl-C). A traceback means a bug.
- **Global flags:** `-v/--verbose` (cmcr's debug messages; other libraries stay at WARNING) and
  `-q/--quiet` (errors only, no progress bars) are accepted before or after the subcommand
  (`cmcr encode ... -v`). `--version`; `python -m cmcr` works like `cmcr`; shell completion:
  `cmcr --install-completion` (bash, zsh, fish, PowerShell).
- **`--json`** on every command that produces a result: shard, encode, connect, project, search,
  eval retrieval/zeroshot/counterfactual/localization, localize, store import/info/validate/index, demo,
  bench synthetic.
- **Output folders are locked:** a command writing an output folder (shard `--out`, encode `--store`,
  connect `--out`, project, store import/index, connector import, bench synthetic, demo) holds an
  advisory lock on it (`<folder>/.cmcr-output.lock`, removed at the end; for `store import`,
  `.<name>.cmcr-output.lock` beside it). A second cmcr process writing the same folder exits 1 with
  the first one's pid and command. The kernel drops the lock when its holder dies (even `kill -9`).
  Several `cmcr encode` runs may append to one store (they share the lock; each shard is one atomic
  part; a shard another run finished meanwhile is kept, not redone), but `encode --overwrite` is
  refused while any of them runs, and they are refused while it runs.
- **Reruns and `--overwrite` (one meaning everywhere):** every derived output records what it was
  made from (its *provenance*: settings, encoder identity, input fingerprints — a store's manifest,
  a connector run's `run.json`, the demo's `demo-settings.json`, an index's `index.json`). A rerun
  into the same output compares it with its own: **the same provenance is reused** (finished parts,
  shards, stores are kept and the run resumes where it stopped; a finished import or connector import
  is a no-op), **another provenance is refused** before anything is touched, with a message naming
  each differing field (`dtype: recorded 'float16', now 'float32'`) and the fix. **`--overwrite`
  means start over:** discard what an earlier run wrote in that output, whatever its settings, and
  write it anew (`store import` builds the new store beside the old one and replaces it only when
  complete). A folder that holds files cmcr did not write (no record) is refused even with
  `--overwrite`: cmcr never deletes them. Two refinements: `connect` continues a matching run only
  with `--resume` (continuing training is a choice: `--epochs` may grow), and a store's FAISS index
  is a cache of its rows, so `store index` rebuilds one of other settings or older rows without being
  asked (and reuses a current one unless `--overwrite`). Library: the same rule is
  `cmcr.stores.files.claim_output`, and every `overwrite=` argument means start over.
"""


def render() -> str:
    """docs/cli.md: the conventions, then every command as Markdown (typer's own docs generator, the same
    texts as ``--help``: usage, arguments, options with defaults)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "cli.md"
        subprocess.run([sys.executable, "-m", "typer", "cmcr.cli", "utils", "docs", "--name", "cmcr",
                        "--output", str(md)], check=True, capture_output=True)
        body = md.read_text()
    head, _, commands = body.partition("\n## ")
    head = head.replace("# `cmcr`", "# CLI reference", 1)
    toc = "".join(f"- [`cmcr {' '.join(p)}`](#cmcr-{'-'.join(p)})\n" for p in command_paths())
    return (f"{head.rstrip()}\n\nGenerated from the CLI itself by `python docs/make_cli_reference.py`.\n\n"
            f"{toc}{CONVENTIONS}\n## {commands}")


if __name__ == "__main__":
    target = Path(__file__).with_name("cli.md")
    target.write_text(render())
    print(f"wrote {target}")
