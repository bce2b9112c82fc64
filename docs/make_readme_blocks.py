"""Regenerate the "real output" blocks of README.md (and other docs) by running their commands.

A generated block sits between markers in the Markdown file::

    <!-- BEGIN cmcr-output:demo -->
    ```
    ... the command's output, cleaned ...
    ```
    <!-- END cmcr-output:demo -->

Usage::

    python docs/make_readme_blocks.py                # run every block's command, rewrite the blocks
    python docs/make_readme_blocks.py demo           # only the block named demo
    python docs/make_readme_blocks.py demo --from-output demo=run.txt   # rewrite from a saved output
    python docs/make_readme_blocks.py --list         # the blocks, their files and commands

Each command runs in a fresh temporary folder (so the paths it prints are relative, e.g.
``demo-out/report.md``) with a fixed terminal width and no colour. The output (stdout and stderr,
as a user sees it) is cleaned by :func:`clean_output`: progress bars, warnings and section rules
dropped, tables printed without their box lines, wrapped lines joined, search hits cut to the
first ones. The rewrite (:func:`rewrite`) only replaces the text between the markers, so running
it twice with the same output changes nothing (``tests/test_docs.py`` checks the markers and that
the rewrite is idempotent; the real run takes minutes and is not part of the test suite).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 100
MARKER = re.compile(r"<!-- BEGIN cmcr-output:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- END cmcr-output:(?P=name) -->",
                    re.S)


@dataclass(frozen=True)
class Block:
    """A generated block: the file it lives in, the command (argv, run in a fresh temp folder) and how
    many search hits a search line keeps."""

    doc: str
    command: tuple[str, ...]
    hits: int = 1


BLOCKS: dict[str, Block] = {
    # README "A 5-minute tour (the demo's real output)": the default demo, pretrained weights where the
    # hub or cache has them, loudly random otherwise
    "demo": Block("README.md", ("cmcr", "demo", "--out", "demo-out")),
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RULE = re.compile(r"^─+ .* ─+$")  # rich section rules ("──── 2/7 shard ────")
_BORDER = re.compile(r"^[\s┏┓┗┛┡┩└┘┳┻╇┴┬├┤━─┼╋]+$")  # table border lines
_PROGRESS = re.compile(r"(━━━|\d+/\d+ shards|queries/s|pairs/s)")
_LINE_STARTS = ("audio ", "caption ", "image ", "text ", "3d ", "report:", "browse it:", "RANDOM WEIGHTS",
                "shards:", "WARNING", "warning", "Note", "note", "where is ")


def clean_output(raw: str, hits: int = 1) -> str:
    """The output of a demo-like command as the docs show it (deterministic; see the module docstring).

    * ANSI sequences, carriage-return progress frames, progress-bar lines, ``WARNING`` log lines and
      section rules are dropped; blank lines collapse;
    * table rows lose their ``│``/``┃`` separators (columns stay aligned), border lines go;
    * a line rich wrapped (a search line over the width) is joined back, and a search line
      ``query → target → hit1, hit2, ...`` keeps its first ``hits`` hits, then ``...``;
    * panels (``╭ RANDOM WEIGHTS ╮``) stay as printed.
    """
    lines: list[str] = []
    for line in _ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        line = line.rsplit("\r", 1)[-1].rstrip()
        if _RULE.match(line) or (_BORDER.match(line) and line.strip()) or _PROGRESS.search(line):
            continue
        if line.startswith(("WARNING ", "INFO ", "DEBUG ")):
            continue
        if line[:1] == "┃" or (line[:1] == "│" and line.count("│") > 2):  # a table row (a panel row has 2)
            line = " " + line[1:-1].replace("│", " ").replace("┃", " ")
            line = line.rstrip()
        if lines and _is_continuation(lines[-1], line):
            lines[-1] = lines[-1].rstrip() + " " + line.strip()
            continue
        if not line.strip() and (not lines or not lines[-1].strip()):
            continue
        lines.append(line)
    out = [_cut_hits(line, hits) for line in lines]
    while out and not out[-1].strip():
        out.pop()
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(out) + "\n"


def _is_continuation(previous: str, line: str) -> bool:
    """A search line rich wrapped: the previous line is a search line (``→``) and this one starts
    nothing of its own."""
    return ("→" in previous and line.strip() != "" and not line.startswith(_LINE_STARTS)
            and not line.startswith((" ", "╭", "│", "╰")))


def _cut_hits(line: str, hits: int) -> str:
    if line.count("→") < 2:
        return line
    head, _, tail = line.rpartition(" → ")
    parts = re.split(r"(?<=\)), ", tail.strip())
    if len(parts) <= hits:
        return line
    return f"{head} → {', '.join(parts[:hits])}, ..."


def rewrite(text: str, name: str, output: str) -> str:
    """``text`` with the block ``name`` replaced by ``output`` in a plain fenced code block.

    Raises:
        KeyError: ``text`` has no complete ``BEGIN``/``END`` marker pair for ``name``.
    """
    body = f"```\n{output.rstrip()}\n```\n"
    found = False

    def replace(m: re.Match[str]) -> str:
        nonlocal found
        if m.group("name") != name:
            return m.group(0)
        found = True
        return f"<!-- BEGIN cmcr-output:{name} -->\n{body}<!-- END cmcr-output:{name} -->"

    new = MARKER.sub(replace, text)
    if not found:
        raise KeyError(f"no block <!-- BEGIN cmcr-output:{name} --> ... <!-- END cmcr-output:{name} -->")
    return new


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks of a Markdown text: name -> the output inside its code fence."""
    out = {}
    for m in MARKER.finditer(text):
        body = m.group("body")
        inner = re.match(r"^```[^\n]*\n(.*)```\n$", body, flags=re.S)
        out[m.group("name")] = inner.group(1) if inner else body
    return out


def run(block: Block) -> str:
    """Run ``block.command`` in a fresh temp folder; its stdout and stderr, interleaved as a terminal shows them."""
    env = {**os.environ, "COLUMNS": str(COLUMNS), "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable).parent / block.command[0]
    argv = [str(exe) if exe.exists() else block.command[0], *block.command[1:]]
    with tempfile.TemporaryDirectory(prefix="cmcr-readme-") as tmp:
        proc = subprocess.run(argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"blocks to regenerate (default: all of {sorted(BLOCKS)})")
    parser.add_argument("--from-output", action="append", default=[], metavar="NAME=FILE",
                        help="use a saved raw output instead of running the command")
    parser.add_argument("--list", action="store_true", help="list the blocks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, block in BLOCKS.items():
            print(f"{name}: {block.doc}: {' '.join(block.command)}")
        return 0
    saved = dict(item.split("=", 1) for item in args.from_output)
    for name in args.names or list(BLOCKS):
        block = BLOCKS[name]
        raw = Path(saved[name]).read_text() if name in saved else run(block)
        doc = ROOT / block.doc
        doc.write_text(rewrite(doc.read_text(), name, clean_output(raw, block.hits)))
        print(f"{block.doc}: block {name} rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
