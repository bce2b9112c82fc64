"""The CLI front door: exit codes, error messages without tracebacks, --help everywhere, docs in sync."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cmcr.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _reference_module():
    spec = importlib.util.spec_from_file_location("make_cli_reference", DOCS / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_version_and_usage_errors(capsys):
    assert main(["--version"]) == 0
    assert "cmcr 0." in capsys.readouterr().out
    assert main(["store", "info", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


def test_cmcr_error_is_one_message_and_exit_1(tmp_path, capsys):
    assert main(["store", "info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "no store at" in err and "Traceback" not in err


def test_every_command_has_help_with_an_example():
    from typer.testing import CliRunner

    from cmcr.cli import app

    paths = _reference_module().command_paths()
    assert {"shard", "encode", "connect", "project", "search", "demo", "eval", "store"} <= {p[0] for p in paths}
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, path
        assert "Example" in result.output, f"`cmcr {' '.join(path)} --help` has no example"


def test_cli_reference_lists_every_command():
    text = (DOCS / "cli.md").read_text()
    for path in _reference_module().command_paths():
        assert f"# `cmcr {' '.join(path)}`\n" in text, f"docs/cli.md lacks `cmcr {' '.join(path)}`: regenerate it"
