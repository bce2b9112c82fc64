"""Regenerate docs/cli.md from the CLI's own --help texts: `python docs/make_cli_reference.py`."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["COLUMNS"] = "110"
os.environ["TERM"] = "dumb"
os.environ["NO_COLOR"] = "1"

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

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


def render() -> str:
    runner = CliRunner()
    out = ["# CLI reference\n", "Generated from `cmcr <command> --help` by `docs/make_cli_reference.py`.\n"]
    out.append("\n" + "".join(f"- [`cmcr {' '.join(p)}`](#cmcr-{'-'.join(p)})\n" for p in command_paths()))
    for path in command_paths():
        text = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "110", "NO_COLOR": "1"}).output
        out.append(f"\n## cmcr {' '.join(path)}\n\n```\n{text.rstrip()}\n```\n")
    return "".join(out)


if __name__ == "__main__":
    target = Path(__file__).with_name("cli.md")
    target.write_text(render())
    print(f"wrote {target}")
