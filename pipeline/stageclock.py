"""Per-process clock of the decode stage of the encode loop.

The encoders' preprocessors decode (bytes -> image / waveform / caption) and then preprocess
(resize, normalise, resample, tokenise) in one call; the decoders are wrapped with
:func:`timed_decode`, so :func:`cmcr.pipeline.encode.prepare_sample` can split the time of that
call into decode and preprocess (``decode_seconds()`` before and after). Each process (main or
DataLoader worker) has its own clock; the times travel back with each batch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_decode_s = 0.0


def timed_decode(fn: F) -> F:
    """Decorator: add the wall seconds of every call of ``fn`` (a decoder) to this process's clock."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _decode_s
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _decode_s += time.perf_counter() - t

    return wrapper  # type: ignore[return-value]


def decode_seconds() -> float:
    """Seconds spent in decoders of this process so far."""
    return _decode_s
