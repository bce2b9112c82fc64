"""Load torch files a user hands in without ever running code from them.

``torch.save`` files are pickles; a full unpickling (``torch.load(weights_only=False)``) runs
whatever callable the file names (``os.system``, ...). cmcr reads every such file — CLAP and
ULIP checkpoints, training checkpoints on ``cmcr connect --resume``, imported connectors — with
:func:`load_torch_file`:

* always ``torch.load(weights_only=True)``: torch's restricted unpickler accepts tensors,
  containers and primitive values only;
* extra types a real checkpoint needs are allowlisted per call with torch's safe-globals
  mechanism (``torch.serialization.safe_globals``), never globally and never more than needed:
  :data:`NUMPY_SCALAR_GLOBALS` for laion_clap checkpoints (numpy scalars such as an ``epoch``
  stored as ``numpy.int64``), :data:`ARGPARSE_GLOBALS` for ULIP checkpoints (their ``args``);
* there is no fallback to full unpickling. A file that names anything else raises
  :class:`~cmcr.errors.UnsafeFileError` naming the file, the refused globals and how to convert
  the file once in a session that trusts it; an unreadable file raises
  :class:`~cmcr.errors.CorruptFileError` (callers decide whether an older file can stand in,
  e.g. the previous training checkpoint).

Pickle protocols 3-5 (``torch.save(..., pickle_protocol=4)``) are not readable by torch's
restricted unpickler; such files get an :class:`UnsafeFileError` with the same conversion recipe
(``torch.save``'s default protocol 2 is fine).
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmcr.errors import CorruptFileError, UnsafeFileError

# numpy scalar type codes allowlisted with NUMPY_SCALAR_GLOBALS: bool, integers, floats, complex
_NUMPY_SCALAR_CODES = "?bBhHiIlLqQefdgFDG"


def _numpy_scalar_globals() -> tuple[Any, ...]:
    """What a pickled numpy scalar names: ``numpy.core.multiarray.scalar`` (numpy 1 files; numpy 2
    writes ``numpy._core.multiarray.scalar``), ``numpy.dtype`` and the dtype classes torch's
    unpickler must ``BUILD`` (``numpy.dtypes.Float64DType``...). Object/void/string dtypes are
    left out on purpose."""
    import numpy as np

    try:  # numpy 2
        from numpy._core.multiarray import scalar  # type: ignore[attr-defined]
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                      np.dtype]
    out += sorted({type(np.dtype(c)) for c in _NUMPY_SCALAR_CODES}, key=lambda t: t.__name__)
    return tuple(out)


#: Allowlist for numpy scalars (laion_clap checkpoints store e.g. their epoch as ``numpy.int64``).
NUMPY_SCALAR_GLOBALS: tuple[Any, ...] = _numpy_scalar_globals()
#: Allowlist for checkpoints that carry their training ``args`` (ULIP-2).
ARGPARSE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


def _global_name(g: Any) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


def _refused_globals(path: Path, allowed: Iterable[Any]) -> list[str] | None:
    """Globals in the file that torch would refuse (``None`` when the pickle cannot be scanned)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    ok = {_global_name(g) for g in allowed}
    return [n for n in names if n not in ok]


def _convert_hint(path: Path) -> str:
    out = path.with_name(path.stem + ".weights" + (path.suffix or ".pt"))
    return (
        "If you trust where it came from, convert it once to plain tensors in a separate Python session: "
        f"python -c \"import torch; ck = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = ck.get('state_dict', ck) if isinstance(ck, dict) else ck; "
        f"torch.save({{'state_dict': {{k: v for k, v in sd.items() if torch.is_tensor(v)}}}}, '{out}')\" "
        f"and pass {out} instead"
    )


def load_torch_file(path: str | os.PathLike, *, what: str, allowed_globals: Iterable[Any] = (),
                    map_location: Any = "cpu") -> Any:
    """``torch.load`` a user-supplied file safely (``weights_only=True``; never full unpickling).

    Args:
        path: the ``.pt``/``.pth``/``.ckpt`` file.
        what: what the file is, for messages (e.g. ``"CLAP checkpoint"``).
        allowed_globals: extra types/functions the file may name, as accepted by
            ``torch.serialization.safe_globals`` (objects, or ``(object, "module.name")`` pairs
            for renamed modules), e.g. :data:`NUMPY_SCALAR_GLOBALS`. Active for this call only.
        map_location: as in ``torch.load`` (default ``"cpu"``).

    Returns:
        The loaded object (tensors, dicts, lists, primitives, allowlisted types).

    Raises:
        CorruptFileError: the file is missing, empty, truncated or not a torch file.
        UnsafeFileError: the file names objects outside the allowlist (it would run code, or
            build arbitrary objects, under a full unpickling), or uses a pickle protocol torch's
            restricted unpickler cannot read. The message names the file, the refused globals and
            how to convert the file.
    """
    import torch

    p = Path(path)
    allowed = list(allowed_globals)
    if not p.is_file():
        raise CorruptFileError(f"{what} {p} does not exist (or is not a file)")
    if p.stat().st_size == 0:
        raise CorruptFileError(f"{what} {p} is empty (0 bytes); it was not written completely")
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        refused = _refused_globals(p, allowed)
        if refused:
            raise _unsafe(p, what, refused) from None
        proto = _pickle_protocol(p)
        if proto is not None and proto > 2:
            raise _unsafe(p, what, protocol=proto) from None
        if "Unsupported global" in msg or "Can only build" in msg or "blocked" in msg:
            raise UnsafeFileError(
                f"{what} {p} holds objects cmcr refuses to unpickle ({_last_line(msg)}). {_convert_hint(p)}"
            ) from None
        raise CorruptFileError(f"{what} {p} is not a readable torch file ({_last_line(msg)}); "
                               f"it may be truncated or of another format") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CorruptFileError(f"{what} {p} is not a readable torch file ({type(e).__name__}: "
                               f"{_first_sentence(str(e))}); it may be truncated or of another format") from None


def _unsafe(p: Path, what: str, refused: list[str] | None = None, protocol: int | None = None) -> UnsafeFileError:
    if refused:
        return UnsafeFileError(
            f"{what} {p} holds pickled objects cmcr refuses to unpickle ({', '.join(refused[:8])}"
            f"{', ...' if len(refused) > 8 else ''}): loading it fully could run code from the file, so it "
            f"is only read with torch.load(weights_only=True). {_convert_hint(p)}")
    return UnsafeFileError(
        f"{what} {p} was pickled with protocol {protocol}, which torch's safe loader cannot check, and cmcr "
        f"never unpickles files fully. {_convert_hint(p)} (torch.save's default protocol 2 is readable)")


def check_torch_file(path: str | os.PathLike, *, what: str, allowed_globals: Iterable[Any] = ()) -> None:
    """Refuse a torch file that another library will load, without loading its tensors.

    Scans only the pickle (``torch.serialization.get_unsafe_globals_in_checkpoint``): use it before
    handing a user's file to a library that loads it itself (open_clip loads with
    ``weights_only=True`` too; this gives cmcr's clear message first). ``.safetensors``/``.npz``/
    ``.npy`` files and files that are not torch zip archives are left to the loader.

    Raises:
        UnsafeFileError: as :func:`load_torch_file`.
    """
    p = Path(path)
    if p.suffix.lower() in (".safetensors", ".npz", ".npy") or not p.is_file() or not zipfile.is_zipfile(p):
        return
    refused = _refused_globals(p, list(allowed_globals))
    if refused:
        raise _unsafe(p, what, refused)
    proto = _pickle_protocol(p)
    if proto is not None and proto > 2:
        raise _unsafe(p, what, protocol=proto)


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a torch file (zip format: its ``data.pkl``; legacy: the file), or ``None``."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with z.open(name) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except Exception:
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _last_line(msg: str) -> str:
    """The informative line of torch's long weights-only message."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Trying to", "Unsupported", "Can only", "WeightsUnpickler error:")) and len(ln) > 25:
            return ln
    for ln in lines:
        if "WeightsUnpickler" not in ln and "Weights only load failed" not in ln and "Check the doc" not in ln:
            return _first_sentence(ln)
    return _first_sentence(lines[0] if lines else msg)


def _first_sentence(s: str, limit: int = 200) -> str:
    s = s.split(". ")[0]
    return s if len(s) <= limit else s[:limit] + "..."
