"""File primitives every cmcr writer uses: atomic writes, fsync, digests, canonical JSON, the
output-folder lock and the one device resolver.

This is the bottom of the import layers (``cmcr.stores`` imports neither ``cmcr.pipeline`` nor
``cmcr.trainer``; those and the CLI import from here), so one meaning of each primitive serves
stores, shards, connectors, indexes, imports, projections, the demo and the synthetic check.

The derived-output protocol starts here: a command that writes an output folder first holds
:func:`output_lock` on it for the whole run. A second cmcr process asking for the same folder is
refused at once with :class:`cmcr.errors.OutputLockedError`, which names the holder's pid and
command. The lock is an advisory ``fcntl.flock`` on ``<folder>/.cmcr-output.lock`` (removed when
the run ends): the kernel drops the lock when the holder exits, even after ``kill -9``, so a
crashed run never blocks the next one (its left-over file is simply locked again). Folders on
network file systems without ``flock`` support get no protection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from cmcr.errors import ConfigError, OutputLockedError

log = logging.getLogger(__name__)

#: Name of the lock file an output folder's writer holds (see :func:`output_lock`).
OUTPUT_LOCK = ".cmcr-output.lock"


def now_iso() -> str:
    """UTC time now, ISO 8601 to the second (``2026-12-02T12:00:00+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- JSON / digests
def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for identities and fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def identity_fingerprint(identity: Mapping[str, Any]) -> str:
    """Short sha256 (16 hex chars) of an encoder identity or any JSON-able mapping (canonical JSON)."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def sha256_bytes(data: bytes) -> str:
    """sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- atomic writes
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort: ignored where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    """The temp-file name :func:`atomic_write_bytes` uses for ``path`` (same folder, ``.tmp-`` prefix, pid)."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.

    Readers see either the old file or the new one, never a partial one.
    """
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (+ newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())


def atomic_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Publish a finished temp file ``tmp`` as ``path``: fsync it, rename, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


# ----------------------------------------------------------------------------------- output lock
_held: dict[str, int] = {}  # lock file (resolved) -> nesting depth, for this process
_held_guard = threading.Lock()


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:  # held shared: writers appending side by side (e.g. `cmcr encode` into one store)
        return "shared writers, e.g. `cmcr encode` runs appending to it"
    pid = info.get("pid", "?")
    what = info.get("command") or "a cmcr command"
    since = info.get("started")
    return f"pid {pid}, `{what}`" + (f", since {since}" if since else "")


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cmcr", "__main__.py")):
        argv[0] = "cmcr"
    return " ".join(argv)


def lock_file_of(folder: str | os.PathLike, *, beside: bool = False) -> Path:
    """The lock file of output ``folder``: inside it, or (``beside``) next to it as ``.<name>.cmcr-output.lock``
    for writers that publish by renaming a finished temp folder onto ``folder``."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{OUTPUT_LOCK}" if beside else folder / OUTPUT_LOCK


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str | None = None, *, beside: bool = False,
                shared: bool = False) -> Iterator[Path]:
    """Hold the exclusive writer lock of output ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the output folder (a store, connector run, demo/synthetic run, shard folder...).
        what: the command recorded for a refused second writer (default: this process's argv).
        beside: keep the lock file next to the folder (see :func:`lock_file_of`) instead of in it.
        shared: take the lock shared: writers that may safely run side by side (``cmcr encode``
            appending atomic parts to one store) hold it together, while an exclusive holder (a run
            starting the folder over) is refused as long as any of them runs, and vice versa.

    Yields:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        OutputLockedError: another process holds the lock; the message names its pid and command
            and says to wait for it or pick another output folder. Re-entering from the same process
            (e.g. the demo running ``connect`` into its own subfolder, or nested calls) is allowed.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} is a file, not a folder; pass a folder path (a new one, or an "
                          f"earlier output of the same command)")
    lock_file = lock_file_of(folder, beside=beside)
    created = not lock_file.parent.exists()
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"output folder {folder}: cannot create {lock_file.parent} ({e.strerror}: a file is in "
                          f"the way); pass a folder path") from e
    key = str(lock_file.resolve())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield folder
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    f = _acquire(lock_file, folder, shared)
    try:
        if not shared:  # shared holders leave the file as is (several of them hold it at once)
            f.write(json.dumps({"pid": os.getpid(), "command": what or _command_line(), "started": now_iso()}))
            f.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield folder
        finally:
            with _held_guard:
                _held.pop(key, None)
            last = True
            if shared:  # the last shared holder (the only one that can take it exclusively) removes the file
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    last = False
            if last:
                # unlink while still locked: a waiter that opened this inode sees it gone and retries
                with contextlib.suppress(OSError):
                    lock_file.unlink()
                if created:  # a run that wrote nothing leaves no empty folder behind
                    with contextlib.suppress(OSError):
                        lock_file.parent.rmdir()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()


def _acquire(lock_file: Path, folder: Path, shared: bool = False):  # noqa: ANN202 - an open text file
    """Open + flock ``lock_file`` (non-blocking), retrying when the file was unlinked by a releasing holder."""
    for _ in range(100):
        f = open(lock_file, "a+")  # noqa: SIM115 - held by the caller
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutputLockedError(
                f"{folder} is being written by another cmcr process ({_holder(lock_file)}); two writers "
                f"into one output folder would overwrite each other's files. Wait for that run to finish "
                f"(or stop it), or choose another output folder") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            f.seek(0)
            f.truncate()  # a shared holder clears what a killed exclusive holder left in it
            return f
        f.close()  # the holder released and unlinked it between our open and flock: try the new file
    raise OutputLockedError(f"could not take the writer lock {lock_file} (it keeps changing); retry")


def locks_output(param: str, *, folder: Callable[[Any], Any] | None = None, beside: bool = False,
                 shared: Callable[[Mapping[str, Any]], bool] | None = None) -> Callable:
    """Decorator: run the function under :func:`output_lock` of its output folder.

    Args:
        param: name of the function's parameter holding the output (a path, or anything ``folder`` maps
            to a path).
        folder: maps the parameter's value to the output folder (default: the value itself).
        beside: see :func:`output_lock`.
        shared: given the call's arguments (by name), whether to take the lock shared (see
            :func:`output_lock`); default exclusive.
    """

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            value = bound.arguments[param]
            target = folder(value) if folder is not None else value
            with output_lock(target, beside=beside, shared=bool(shared and shared(bound.arguments))):
                return fn(*args, **kwargs)

        return wrapper

    return deco


# ----------------------------------------------------------------------------------- derived-output protocol
#: What ``--overwrite`` means on every command that writes a derived output (docs/cli.md, Conventions).
OVERWRITE_MEANING = ("start over: discard what an earlier run wrote in the output (whatever its settings) and "
                     "write it anew")


def flat_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (lists and scalars are leaves); ``{}`` for an empty mapping."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flat_fields(v, name))
        else:
            out[name] = v
    return out


def _short(value: Any, width: int = 60) -> str:
    text = canonical_json(value) if isinstance(value, (Mapping, list, tuple)) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def provenance_differences(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any],
                           limit: int = 6) -> list[str]:
    """The fields in which two provenance records differ, as ``"field: recorded X, now Y"`` texts
    (dotted paths for nested fields; at most ``limit``, then ``"... and N more"``)."""
    old, new = flat_fields(json.loads(canonical_json(recorded or {}))), flat_fields(json.loads(canonical_json(wanted)))
    missing = object()
    diffs = [f"{k}: recorded {'(none)' if old.get(k, missing) is missing else _short(old[k])}, now "
             f"{'(none)' if new.get(k, missing) is missing else _short(new[k])}"
             for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


@dataclasses.dataclass
class Claim:
    """A claimed output folder (see :func:`claim_output`).

    Attributes:
        path: the output folder.
        kind: what it holds, in words (``"store"``, ``"projection"``, ``"connector run"``...).
        provenance: the settings and inputs this run derives the output from (canonical JSON types).
        recorded: the provenance an earlier run recorded there (``None``: nothing of this kind there,
            or ``started_over``).
        reuse: an earlier output with this very provenance is there: continue it (skip or resume
            its finished units) instead of writing it again.
        started_over: ``overwrite`` discarded an earlier output.
        record: name of the record file :meth:`publish` writes (``None``: the writer records its
            provenance itself, e.g. in a store manifest).
    """

    path: Path
    kind: str
    provenance: dict[str, Any]
    recorded: dict[str, Any] | None = None
    reuse: bool = False
    started_over: bool = False
    record: str | None = None

    def publish(self) -> None:
        """Write the provenance record file (atomically; no-op when the writer keeps no record file).
        Writers whose units resume call it before the first unit, others once the output is complete."""
        if self.record is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / self.record, self.provenance, sort_keys=True)


def clear_output(path: Path, keep: Collection[str] = ()) -> None:
    """Remove everything in output folder ``path`` but its lock file and the names in ``keep``."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.name in keep or child.name == OUTPUT_LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink(missing_ok=True)


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record file as a dict (``None`` when missing; an unreadable one counts as another output)."""
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"unreadable record": str(path)}
    return found if isinstance(found, dict) else {"unreadable record": str(path)}


@contextlib.contextmanager
def claim_output(
    path: str | os.PathLike,
    *,
    kind: str,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
    recorded: Callable[[Path], Mapping[str, Any] | None] | None = None,
    record: str | None = None,
    error: type[Exception] = ConfigError,
    hint: str | Callable[[Mapping[str, Any]], str] = "",
    foreign: Collection[str] | None = None,
    clear: bool | Callable[[Path], None] = True,
    beside: bool = False,
    shared: bool = False,
    rebuild_on_mismatch: bool = False,
) -> Iterator[Claim]:
    """The derived-output protocol every cmcr writer follows: lock the output folder, compare the
    provenance recorded there with this run's, then reuse it, refuse, or start it over.

    1. Lock: :func:`output_lock` for the whole ``with`` block (``shared`` for writers that append
       side by side; a claim with ``overwrite`` always locks exclusively).
    2. Read what an earlier run recorded: ``recorded(path)`` (e.g. from a store manifest), or the
       JSON file ``record`` in the folder.
    3. Decide. ``overwrite`` (the one meaning of ``--overwrite``): the earlier output is discarded
       (``clear``) and the run writes anew. Otherwise a matching record (canonical JSON equal) is
       reused (:attr:`Claim.reuse`: finished units are kept, a rerun resumes); a different one is
       refused with ``error`` naming each differing field and the fix. With ``foreign`` given, a
       folder that holds files but no record (only the names in ``foreign`` are tolerated) is
       refused too, even with ``overwrite``: cmcr never deletes files it did not write.
    4. The writer writes, then publishes (:meth:`Claim.publish`, or its own atomic rename / manifest).

    Args:
        path: the output folder.
        kind: what the folder holds, for messages (``"store"``, ``"projection"``...).
        provenance: everything the output is derived from that must match for a reuse (settings,
            input fingerprints); JSON-able.
        overwrite: start over (see 3).
        recorded: reads the earlier provenance from the folder (``None``: nothing there).
        record: record file name inside ``path`` (read when ``recorded`` is not given; written by publish).
        error: the exception class raised on a mismatch (each writer keeps its own: StoreMismatchError...).
        hint: appended to the mismatch message (e.g. what ``--resume`` needs); a callable gets the
            recorded provenance and returns the text.
        foreign: names that may sit in a folder without a record (see 3); ``None``: no such check.
        clear: ``True`` removes the folder's contents but the lock; a callable clears it the writer's
            way; ``False`` leaves the old output until the writer publishes the new one over it.
        beside, shared: see :func:`output_lock`.
        rebuild_on_mismatch: for a cache derived from the folder it lives in (a store's index): an
            earlier one of other provenance is started over instead of refused (nothing a user made by
            hand is lost: it is rebuilt from the same store).

    Yields:
        A :class:`Claim`.

    Raises:
        OutputLockedError: another process writes the folder.
        error: the folder holds an output of other provenance (or foreign files), without ``overwrite``.
    """
    path = Path(path)
    with output_lock(path, beside=beside, shared=shared and not overwrite):
        wanted = json.loads(canonical_json(dict(provenance)))
        if recorded is not None:
            old = recorded(path)
        else:
            old = read_record(path / record) if record is not None else None
        old = None if old is None else json.loads(canonical_json(dict(old)))
        if old is None and foreign is not None and path.is_dir():
            strays = sorted(p.name for p in path.iterdir() if p.name not in {OUTPUT_LOCK, *foreign})
            if strays:
                raise error(f"{path} is not empty and holds no {kind} ({', '.join(strays[:5])}"
                            f"{' ...' if len(strays) > 5 else ''}); pass an empty or new folder")
        claim = Claim(path=path, kind=kind, provenance=wanted, record=record)
        if (overwrite or (rebuild_on_mismatch and old != wanted)) and old is not None:
            if overwrite:
                log.warning("--overwrite: starting %s over (discarding the %s there)", path, kind)
            else:
                log.info("%s: rebuilding the %s (made from other settings or inputs)", path, kind)
            if callable(clear):
                clear(path)
            elif clear:
                clear_output(path)
            claim.started_over = True
        elif old is not None and old != wanted:
            diffs = provenance_differences(old, wanted)
            hint = hint(old) if callable(hint) else hint
            raise error(f"{path} holds a {kind} made from other settings or inputs ({'; '.join(diffs)}); an output "
                        f"is reused only when they match. Pass --overwrite to start it over (it discards that "
                        f"{kind}), or choose another output folder" + (f"; {hint}" if hint else ""))
        elif old is not None:
            claim.recorded, claim.reuse = old, True
        yield claim


# ----------------------------------------------------------------------------------- progress
_quiet = False


def set_quiet(quiet: bool) -> None:
    """``cmcr -q``: no progress bars anywhere (set by the CLI for the command it runs)."""
    global _quiet
    _quiet = bool(quiet)


def progress_options(enabled: bool = True) -> dict[str, Any]:
    """Keyword arguments for every ``rich.progress.Progress``: drawn on stderr (results own stdout) and
    disabled when ``enabled`` is False or the CLI runs quiet."""
    from rich.console import Console

    return {"console": Console(stderr=True), "disable": (not enabled) or _quiet}


# ----------------------------------------------------------------------------------- device
def resolve_device(device: Any = "auto") -> Any:
    """The one device resolver (encode, connect, memories, projection).

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``
            or a :class:`torch.device`.

    Returns:
        A :class:`torch.device`.

    Raises:
        ConfigError: an unknown device name, CUDA asked for on a machine without it, or a CUDA index
            beyond the GPUs present (the message says what is available and to use ``--device cpu``).
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        name = "auto" if device in (None, "") else str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for CUDA, but CUDA is not available on this machine "
                              f"(torch {torch.__version__}, no usable GPU); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device} asked for Apple MPS, which is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: unsupported device type {dev.type!r}; use auto, cpu or cuda[:N]")
    return dev
