"""The CLI's two consoles: results on stdout, messages on stderr.

Piped to a file or another program, output is not wrapped at 80 columns (rich's default width
when it sees no terminal): lines stay whole, so they can be grepped and parsed. Nothing printed
through these consoles is read as rich markup unless the caller writes markup itself; values
(paths, keys, messages) must go through :func:`plain`.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

#: Width used when the stream is not a terminal (tables are as wide as their content, up to this).
PIPE_WIDTH = 1000


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty else PIPE_WIDTH)


def out_console() -> Console:
    """Console for results (stdout)."""
    return _console(stderr=False)


def err_console() -> Console:
    """Console for warnings and notes (stderr)."""
    return _console(stderr=True)


def plain(value: object) -> str:
    """``value`` as text that rich prints literally (``[`` escaped)."""
    return escape(str(value))
