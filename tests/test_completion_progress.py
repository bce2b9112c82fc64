"""Completion progress is visible at the default log level, also when stderr is not a terminal."""

from __future__ import annotations

from cmcr.trainer.loop import _Reporter


def test_completion_prints_plain_progress_lines_without_a_terminal(capsys):
    rep = _Reporter(True)  # what `cmcr connect` passes: rich bars on stderr
    rep.completion("A", 0, 8192)
    rep.completion("A", 4096, 8192)  # < 10 s later: no line
    rep.completion("A", 8192, 8192)  # the end of a side: always a line
    rep.completion("B", 8192, 8192)
    err = " ".join(capsys.readouterr().err.split())
    assert "completion A: 0/8,192 queries (0 %)" in err
    assert "completion A: 8,192/8,192 queries (100 %)" in err and "queries/s" in err
    assert "completion B: 8,192/8,192 queries (100 %)" in err
    assert "4,096/8,192" not in err


def test_completion_progress_goes_to_a_callback(capsys):
    seen = []
    rep = _Reporter(seen.append)
    rep.completion("A", 10, 20)
    assert seen == [{"stage": "completion", "side": "A", "done": 10, "total": 20}]
    assert capsys.readouterr().err == ""


def test_without_a_terminal_the_plain_lines_replace_the_completion_bar() -> None:
    """stderr to a file or pipe: rich would draw each completion bar once more when it stops ("? queries/s")."""
    import subprocess
    import sys

    code = ("from cmcr.trainer.loop import _Reporter\n"
            "rep = _Reporter(True)\n"
            "for side in 'AB':\n"
            "    rep.completion(side, 0, 120)\n"
            "    rep.completion(side, 120, 120)\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "completion A: 120/120 queries (100 %)" in err and "completion B: 120/120 queries (100 %)" in err
    assert "━" not in err and "? queries/s" not in err
