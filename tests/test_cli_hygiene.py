"""The CLI as a user meets it (issue 13): streams, wrapping, markup, exit codes, global flags,
`python -m cmcr`, completion, --json everywhere, and silent bad defaults made loud."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmcr.cli import hoist_global_flags, main
from tests.fixtures_connect import unit_rows, write_store

ROOT = Path(__file__).resolve().parent.parent


def test_error_text_is_never_read_as_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weird = tmp_path / "a[/x]b[bold]"
    assert main(["store", "info", str(weird)]) == 1
    err = capsys.readouterr().err
    assert "a[/x]b[bold]" in err and "Traceback" not in err


def test_help_keeps_square_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encode", "--help"]) == 0
    assert "cmcr[ray]" in "".join(capsys.readouterr().out.split())


def test_usage_and_runtime_errors_have_different_exit_codes(tmp_path: Path, capsys) -> None:
    assert main(["store", "info", "--no-such-flag"]) == 2  # usage
    assert main(["shard", str(tmp_path), "--out", str(tmp_path / "o"), "-n", "0"]) == 2  # invalid value
    assert main(["store", "info", str(tmp_path / "missing")]) == 1  # runtime: no store there
    # usage mistakes in option values are usage errors too, named before anything is read
    assert main(["encode", str(tmp_path), "-e", "open_clip:cmcr-tiny-clip@random", "-m", "video",
                 "-s", str(tmp_path / "s")]) == 2
    assert "--modality 'video'" in capsys.readouterr().err
    assert main(["encode", str(tmp_path), "-e", "foo:bar", "-m", "image", "-s", str(tmp_path / "s")]) == 2
    assert "unknown encoder family 'foo'" in capsys.readouterr().err
    assert main(["store", "index", str(tmp_path / "missing"), "--kind", "bogus"]) == 2
    assert "--kind 'bogus'" in capsys.readouterr().err
    capsys.readouterr()


def test_global_flags_after_the_subcommand(tmp_path: Path, capsys) -> None:
    assert hoist_global_flags(["store", "info", "x", "-v"]) == ["--verbose", "store", "info", "x"]
    assert hoist_global_flags(["store", "info", "--", "-v"]) == ["store", "info", "--", "-v"]
    assert main(["store", "info", str(tmp_path / "missing"), "-q"]) == 1
    assert main(["store", "info", str(tmp_path / "missing"), "-v"]) == 1
    assert logging.getLogger("cmcr").level == logging.DEBUG
    assert logging.getLogger().level == logging.WARNING  # other libraries are not flooded with DEBUG
    main(["store", "info", str(tmp_path / "missing")])
    assert logging.getLogger("cmcr").getEffectiveLevel() == logging.WARNING
    capsys.readouterr()


def test_python_dash_m_and_completion() -> None:
    r = subprocess.run([sys.executable, "-m", "cmcr", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("cmcr ")
    r = subprocess.run([sys.executable, "-m", "cmcr", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "--install-completion" in r.stdout


def test_piped_output_is_not_wrapped_and_results_go_to_stdout(tmp_path: Path) -> None:
    long_dir = tmp_path / ("a_rather_long_folder_name_" * 4)
    long_dir.mkdir()
    (long_dir / "caps.txt").write_text("a dog\na cat\n")
    r = subprocess.run([sys.executable, "-m", "cmcr", "shard", str(long_dir / "caps.txt"), "--out",
                        str(long_dir / "shards")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert str(long_dir / "shards" / "text") in r.stdout  # one unbroken line, on stdout


def _pair_stores(tmp_path: Path, *, shared_keys: bool) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    enc = {"family": "test", "architecture": "x"}  # raw rows of one encoder: one space
    labels = {"label": ["x", "y"] * 3}
    q = write_store(tmp_path / "q", unit_rows(rng, 6, 8), modality="text", encoder=enc,
                    keys=[f"q{i}" for i in range(6)], metadata=labels)
    g = write_store(tmp_path / "g", unit_rows(rng, 6, 8), modality="text", encoder=enc,
                    keys=[f"{'q' if shared_keys else 'g'}{i}" for i in range(6)], metadata=labels)
    return Path(q.path), Path(g.path)


def test_eval_retrieval_on_unpaired_stores_is_an_error_naming_by_label(tmp_path: Path, capsys) -> None:
    q, g = _pair_stores(tmp_path, shared_keys=False)
    code = main(["eval", "retrieval", str(q), str(g)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "--by label" in err and "NaN" not in err
    assert main(["eval", "retrieval", str(q), str(g), "--by", "label", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 6


def test_too_few_steps_per_epoch_warns() -> None:
    from cmcr.trainer.loop import few_steps_warning

    (w,) = few_steps_warning(3500, 4096, 20)
    assert "1 optimiser step(s) per epoch (20 in all)" in w and "--batch-size 256" in w
    assert few_steps_warning(3500, 256, 20) == []


def test_connect_summary_shows_chance_and_warns(tiny_synthetic: dict[str, Path], tmp_path: Path, capsys,
                                                caplog: pytest.LogCaptureFixture) -> None:
    p = tiny_synthetic
    args = ["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
            str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(tmp_path / "c"), "--epochs", "1",
            "--batch-size", "512", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="cmcr"):
        assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "held-out shared R@1" in out and "(chance 1/" in out
    assert any("optimiser step(s) per epoch" in r.message for r in caplog.records)


def test_json_on_shard_and_project(tmp_path: Path, tiny_trained: Path, tiny_synthetic: dict[str, Path],
                                   capsys) -> None:
    (tmp_path / "caps.txt").write_text("a dog\na cat\n")
    assert main(["shard", str(tmp_path / "caps.txt"), "--out", str(tmp_path / "sh"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"]["text"] == 2
    assert main(["project", str(tiny_trained), str(tiny_synthetic["text_a"]), str(tmp_path / "proj"), "--no-index",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"] > 0 and rep["side"] == "A"


def test_json_on_encode(tmp_path: Path, capsys) -> None:
    (tmp_path / "caps.txt").write_text("a dog\na cat\n")
    main(["shard", str(tmp_path / "caps.txt"), "--out", str(tmp_path / "sh")])
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "sh" / "text"), "-e", "open_clip:cmcr-tiny-clip@random", "-m", "text",
                 "-s", str(tmp_path / "st"), "-j", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"] == 2 and rep["empty_shards"] == []


def test_store_info_prints_values_literally_without_trailing_spaces(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "st[bold]x"
    write_store(path, unit_rows(rng, 4, 8), modality="text", encoder={"family": "test", "architecture": "[red]a"},
                keys=[f"k{i}" for i in range(4)])
    r = subprocess.run([sys.executable, "-m", "cmcr", "store", "info", str(path)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split(None, 1) == ["store", str(path)]  # the brackets are text, not markup
    assert '"architecture": "[red]a"' in r.stdout
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    col = lines[0].index(str(path))
    assert all(line[col - 1] == " " and line[col] != " " for line in lines)  # the values line up
