"""Corpus readers: turn folders, caption/path lists, CSV/JSONL tables and existing webdataset tars
into :class:`CorpusEntry` records (one sample each, with a stable key) for the shard writer.

Rules (documented in docs/encode.md):

* **folder** (recursive, sorted): modality from the file extension (image / audio / text / 3d, the
  one list in :mod:`cmcr.pipeline.media`); other files are skipped and reported, and so are text
  files named like documentation (``README``, ``LICENSE``, ``spot_README.txt``, ``CREDITS``...):
  they describe the media beside them and are not captions. Key = the path relative to the
  folder, without extension, made safe by :func:`safe_key`; when two files differ only by
  extension (``a.jpg``, ``a.png``) both keys get the extension appended (``a_jpg``, ``a_png``).
  ``label`` = the name of the file's parent folder when it is inside a sub-folder.
* **text file** (``.txt``/``.lst``, one entry per line): a line that names an existing file (absolute
  or relative to the list's folder) with a known extension is a path (key from the path relative to
  the list's folder, or the absolute path); any other non-blank line is a caption
  (key ``<list stem>/<line number, 7 digits>``). Blank lines are skipped silently; lines that look
  like paths (media extension, no spaces) but do not exist are skipped and reported.
* **CSV / JSONL**: one row per sample. The text column (``--text-column``; auto: text, caption,
  sentence) makes a caption sample; else the path column (``--path-column``; auto: path, file,
  filename, file_name, image, audio, filepath) names a media file relative to the table's folder.
  Key = ``--key-column`` value if given, else the path-derived key (path rows) or
  ``<table stem>/<row number, 7 digits>`` (text rows). ``label`` column -> label; every other column
  goes to the per-sample metadata. Rows with more fields than the header (an unquoted delimiter)
  and text rows with an empty/whitespace-only caption are skipped and reported (keys keep the row
  numbers of the table).
* **tar** (existing webdataset shards): samples are re-read (members grouped by key, webdataset's
  rule: key = member name up to the first dot of its last path component) and resharded; their
  keys are made safe, their ``json`` metadata kept.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcr.errors import InputDataError, RemoteReadError
from cmcr.pipeline.media import (
    MEDIA_EXTENSIONS,
    MODALITY_OF_EXTENSION,
    is_documentation,
    media_member,
)
from cmcr.pipeline.openers import close_url, describe_read_error, is_url, open_url
from cmcr.pipeline.text import TEXT_EXTENSIONS

TEXT_COLUMNS = ("text", "caption", "sentence")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "image", "audio", "pointcloud", "mesh")
LIST_SUFFIXES = (".txt", ".lst", ".list")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def safe_key(name: str) -> str:
    """A stable, webdataset- and filesystem-safe key from a relative path (without extension) or id.

    Keeps ``[A-Za-z0-9_-/]``; drops empty, ``.`` and ``..`` path components; replaces anything else
    with ``_`` and then appends ``-<first 8 hex of sha1(name)>`` so that two names that differ only
    in replaced characters never collide. The same name always gives the same key.
    """
    s = str(name).replace("\\", "/")
    parts = [p for p in s.split("/") if p not in ("", ".", "..")]
    joined = "/".join(parts)
    clean = _UNSAFE.sub("_", joined)
    if clean != joined or not clean:
        clean = f"{clean}-{hashlib.sha1(s.encode()).hexdigest()[:8]}".lstrip("-") or "empty"
    return clean


@dataclass
class CorpusEntry:
    """One sample of a corpus.

    Attributes:
        key: stable safe key (unique within its modality after the shard writer's checks).
        modality: ``image`` / ``audio`` / ``text``.
        ext: extension of the payload inside the shard (``jpg``, ``flac``, ``txt``...).
        path: file to read the payload from (media), or ``None`` when ``data`` holds it.
        data: payload bytes (captions, resharded samples).
        meta: per-sample metadata: ``source`` (where it came from), ``label``, other columns.
    """

    key: str
    modality: str
    ext: str
    path: Path | None = None
    data: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> bytes:
        """The payload bytes (reads ``path`` if needed)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Skipped:
    """An input entry that did not become a sample, and why.

    Attributes:
        failed: the whole input (a tar or a URL) could not be read to its end: a failure, reported
            apart from the entries skipped on purpose (``ShardReport.failed``).
    """

    source: str
    reason: str
    failed: bool = False


def _ext(p: Path | str) -> str:
    return Path(p).suffix.lower().lstrip(".")


def _media_entries(files: list[tuple[Path, str]], label_of: Any) -> Iterator[CorpusEntry]:
    """Entries for (file, relative name) pairs; keys from the relative name without extension."""
    stems: dict[str, int] = {}
    for _, rel in files:
        k = safe_key(str(Path(rel).with_suffix("")))
        stems[k] = stems.get(k, 0) + 1
    for path, rel in files:
        ext = _ext(path)
        k = safe_key(str(Path(rel).with_suffix("")))
        if stems[k] > 1:
            k = f"{k}_{ext}"
        yield CorpusEntry(key=k, modality=MODALITY_OF_EXTENSION[ext], ext=ext, path=path,
                          meta={"source": rel, "label": label_of(rel)})


def read_folder(root: Path, skipped: list[Skipped]) -> Iterator[CorpusEntry]:
    """Every media file under ``root`` (recursive, sorted); unknown extensions go to ``skipped``.

    Webdataset tars in the folder (``.tar``, ``.tar.gz``, ``.tgz``; e.g. img2dataset's output folder)
    are read as tar inputs (:func:`read_tar`: their samples keep their own keys) after the media
    files; img2dataset's sidecar files beside them (``NNNNN.parquet``, ``NNNNN_stats.json``) are
    skipped silently.
    """
    files = []
    tars = []
    for p in sorted(root.rglob("*")):
        if p.is_dir() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        rel = p.relative_to(root).as_posix()
        if p.name.endswith((".tar", ".tar.gz", ".tgz")):
            tars.append(p)
            continue
        if _is_tar_sidecar(p):
            continue
        if _ext(p) not in MODALITY_OF_EXTENSION:
            skipped.append(Skipped(rel, f"unknown extension {p.suffix or '(none)'}"))
            continue
        if MODALITY_OF_EXTENSION[_ext(p)] == "text" and is_documentation(p):
            skipped.append(Skipped(rel, "documentation file (README/LICENSE/CREDITS-like name), not a caption"))
            continue
        files.append((p, rel))

    def label(rel: str) -> str | None:
        parts = rel.split("/")
        return parts[-2] if len(parts) > 1 else None

    yield from _media_entries(files, label)
    for tar in tars:
        yield from read_tar(tar, skipped)


def _is_tar_sidecar(p: Path) -> bool:
    """img2dataset's per-tar ``NNNNN.parquet`` / ``NNNNN_stats.json`` beside ``NNNNN.tar``."""
    if p.name.endswith("_stats.json"):
        stem = p.name[: -len("_stats.json")]
    elif p.suffix == ".parquet":
        stem = p.stem
    else:
        return False
    return (p.parent / f"{stem}.tar").is_file()


def _looks_like_path(line: str) -> bool:
    return _ext(line) in MODALITY_OF_EXTENSION and " " not in line and _ext(line) not in TEXT_EXTENSIONS


def read_list(path: Path, skipped: list[Skipped]) -> Iterator[CorpusEntry]:
    """A text file with one media path or one caption per line (see the module docstring)."""
    base = path.parent
    media: list[tuple[Path, str]] = []
    captions: list[CorpusEntry] = []
    with open(path, encoding="utf-8-sig") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            cand = Path(line) if Path(line).is_absolute() else base / line
            if _looks_like_path(line):
                if cand.is_file():
                    rel = line if not Path(line).is_absolute() else cand.as_posix()
                    media.append((cand, rel))
                else:
                    skipped.append(Skipped(f"{path.name}:{n}", f"file not found: {cand}"))
                continue
            captions.append(CorpusEntry(key=f"{safe_key(path.stem)}/{n:07d}", modality="text", ext="txt",
                                        data=line.encode(), meta={"source": f"{path.name}:{n}", "label": None}))
    yield from _media_entries(media, lambda rel: None)
    yield from captions


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputDataError(f"{path}:{n}: not valid JSON ({e}); fix or remove the line") from e
                    if not isinstance(row, dict):
                        raise InputDataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                    yield row
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def read_table(
    path: Path,
    skipped: list[Skipped],
    *,
    text_column: str | None = None,
    path_column: str | None = None,
    key_column: str | None = None,
    label_column: str = "label",
) -> Iterator[CorpusEntry]:
    """CSV / TSV / JSONL rows -> entries (see the module docstring).

    Raises:
        InputDataError: no usable text/path column, or a named column is missing (names the columns found).
    """
    rows = list(_table_rows(path))
    if not rows:
        return
    columns = [c for c in rows[0].keys() if c is not None]
    for name, col in (("--text-column", text_column), ("--path-column", path_column), ("--key-column", key_column)):
        if col is not None and col not in columns:
            raise InputDataError(f"{path}: {name} {col!r} is not a column; columns are {columns}")
    if text_column is None and path_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if text_column is None and path_column is None:
        raise InputDataError(
            f"{path}: no text column ({', '.join(TEXT_COLUMNS)}) or path column ({', '.join(PATH_COLUMNS)}) "
            f"among {columns}; name one with --text-column or --path-column"
        )
    used = {text_column, path_column, key_column, label_column}
    stem = safe_key(path.stem)
    seen: set[str] = set()
    for n, row in enumerate(rows, start=1):
        where = f"{path.name}:{n}"
        if None in row:  # csv.DictReader's restkey: more fields than the header
            skipped.append(Skipped(where, f"row {n} has {len(columns) + len(row[None])} fields but the header has "
                                          f"{len(columns)} (extra: {row[None]!r}); quote fields that contain the "
                                          f"delimiter"))
            continue
        extra = {k: v for k, v in row.items() if k not in used}
        label = row.get(label_column)
        label = None if label in (None, "") else str(label)
        if text_column is not None:
            value = row.get(text_column)
            if value is None or not str(value).strip():
                skipped.append(Skipped(where, "empty or whitespace-only caption" if value is not None
                                       else f"no {text_column!r} value"))
                continue
            key = safe_key(str(row[key_column])) if key_column else f"{stem}/{n:07d}"
            entry = CorpusEntry(key=key, modality="text", ext="txt", data=str(value).encode(),
                                meta={"source": where, "label": label, **extra})
        else:
            value = str(row.get(path_column) or "")
            p = Path(value) if Path(value).is_absolute() else path.parent / value
            if not value or not p.is_file():
                skipped.append(Skipped(where, f"file not found: {p}"))
                continue
            ext = _ext(p)
            if ext not in MODALITY_OF_EXTENSION:
                skipped.append(Skipped(where, f"unknown extension .{ext} of {p}"))
                continue
            key = safe_key(str(row[key_column])) if key_column else safe_key(str(Path(value).with_suffix("")))
            entry = CorpusEntry(key=key, modality=MODALITY_OF_EXTENSION[ext], ext=ext, path=p,
                                meta={"source": value, "label": label, "row": where, **extra})
        if (entry.modality, entry.key) in seen:
            skipped.append(Skipped(where, f"duplicate key {entry.key!r} (an earlier row has it); "
                                          f"use --key-column with unique values"))
            continue
        seen.add((entry.modality, entry.key))
        yield entry


MAX_MEMBER_BYTES_ENV = "CMCR_MAX_MEMBER_BYTES"
MAX_SAMPLE_BYTES_ENV = "CMCR_MAX_SAMPLE_BYTES"


@dataclass(frozen=True)
class TarLimits:
    """Size limits of what one tar sample may hand to memory (checked on the tar header, before reading).

    Attributes:
        max_member_bytes: largest member (one file of a sample); default 256 MiB (env ``CMCR_MAX_MEMBER_BYTES``).
        max_sample_bytes: largest sample (all its members); default 512 MiB (env ``CMCR_MAX_SAMPLE_BYTES``).
    """

    max_member_bytes: int = 256 << 20
    max_sample_bytes: int = 512 << 20

    @classmethod
    def from_env(cls) -> TarLimits:
        """Defaults, overridden by the environment (``cmcr encode``/``shard --max-member-bytes`` set it,
        so DataLoader workers and Ray tasks see it).

        Raises:
            InputDataError: a variable that is not a positive whole number of bytes.
        """
        values = {}
        for name, env in (("max_member_bytes", MAX_MEMBER_BYTES_ENV), ("max_sample_bytes", MAX_SAMPLE_BYTES_ENV)):
            raw = os.environ.get(env)
            if raw:
                try:
                    values[name] = int(raw.replace("_", ""))
                except ValueError:
                    values[name] = 0
                if values[name] <= 0:
                    raise InputDataError(f"{env}={raw!r} is not a positive whole number of bytes")
        return cls(**values)


def iter_tar_samples(path: str | os.PathLike, limits: TarLimits | None = None) -> Iterator[dict[str, Any]]:
    """Stream a webdataset tar: one dict per sample, ``{"__key__": key, ext: bytes, ...}``.

    ``path`` is a local file or a URL (``pipe:``, ``http(s)://``, ``s3://`` ...; opened by
    :func:`cmcr.pipeline.openers.open_url` and read as a stream, never downloaded whole first).

    Members are grouped by key as webdataset does (consecutive members sharing the key; extensions
    lower-cased). A sample that cannot be trusted comes back as ``{"__key__": key, "__error__": why}``
    (the caller records one failure for it, naming the tar and member) instead of being merged or
    read: a duplicate member (two ``key.jpg``, or ``.jpg`` and ``.JPG``), a symlink / hard link /
    special-file member, a member above ``limits.max_member_bytes`` or a sample above
    ``limits.max_sample_bytes`` (sizes come from the tar header; nothing oversized is read into
    memory). Directories and names without an extension are skipped, as webdataset does.

    Read with the standard library's streaming ``tarfile`` rather than webdataset's
    ``tar_file_iterator``/``group_by_keys``: those drop non-regular members silently, read every member
    whole with no size limit and end the whole stream on a duplicate member.

    Args:
        limits: size limits (default: :meth:`TarLimits.from_env`).

    Raises:
        tarfile.TarError, OSError, EOFError: a corrupt or truncated tar (the samples before it were yielded).
        RemoteReadError: (an ``OSError``) a URL that cannot be opened or read to its end, or whose opener
            (curl, the pipe's command) failed; the message names the URL, the cause and the fix.
    """
    limits = limits or TarLimits.from_env()
    if is_url(path):
        yield from _iter_url_samples(str(path), limits)
        return
    with tarfile.open(path, mode="r|*") as tf:
        yield from _iter_tarfile(tf, Path(path).name, limits)


def _iter_url_samples(url: str, limits: TarLimits) -> Iterator[dict[str, Any]]:
    """:func:`iter_tar_samples` of a URL: stream it, then check that its opener ended well."""
    stream = open_url(url)
    finished = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            yield from _iter_tarfile(tf, url, limits)
        finished = True
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RemoteReadError(describe_read_error(url, stream, e)) from e
    finally:
        if not finished:  # an error (described above) or the consumer stopped early: nothing more to check
            close_url(url, stream, drain=False)
    error = close_url(url, stream, drain=True)
    if error is not None:
        raise RemoteReadError(error)


def _iter_tarfile(tf: tarfile.TarFile, name: str, limits: TarLimits) -> Iterator[dict[str, Any]]:
    """The samples of an open streaming tar (see :func:`iter_tar_samples`); ``name`` names it in errors."""
    current: dict[str, Any] | None = None
    size = 0
    for member in tf:
        tf.members = []  # streaming: do not keep every header of a large tar
        if member.isdir():
            continue
        m = WDS_NAME.match(member.name)
        if not m:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
            size = 0
        if "__error__" in current:
            continue
        error = None
        if not member.isfile():
            kind = ("a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file")
            target = f" (to {member.linkname})" if member.linkname else ""
            error = (f"{name}: member {member.name} is {kind}{target}; shards hold regular files only "
                     f"(re-shard the data with `cmcr shard`)")
        elif ext in current:
            error = (f"{name}: duplicate member {member.name} in sample {key!r} (a sample holds one member "
                     f"per extension; merging them would mix two samples); re-shard the data with `cmcr shard`")
        elif member.size > limits.max_member_bytes:
            error = (f"{name}: member {member.name} is {member.size} bytes, above the limit of "
                     f"{limits.max_member_bytes} bytes per member (raise it with --max-member-bytes or "
                     f"{MAX_MEMBER_BYTES_ENV})")
        elif size + member.size > limits.max_sample_bytes:
            error = (f"{name}: sample {key!r} is over {size + member.size} bytes at member {member.name}, "
                     f"above the limit of {limits.max_sample_bytes} bytes per sample (raise it with "
                     f"--max-sample-bytes or {MAX_SAMPLE_BYTES_ENV})")
        if error is not None:
            current = {"__key__": key, "__error__": error}
            continue
        f = tf.extractfile(member)
        data = f.read(member.size) if f is not None else b""
        size += len(data)
        current[ext] = data
    if current is not None:
        yield current


def read_tar(path: str | os.PathLike, skipped: list[Skipped]) -> Iterator[CorpusEntry]:
    """Samples of an existing webdataset tar (a local file or a URL), for resharding.

    Every modality present in a sample becomes one entry of that modality under the sample's key
    (made safe), so the shard folders it lands in pair by key. This is how image+caption tars in
    img2dataset's layout (``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.json``]) keep their captions: the image
    goes to the image shards, the caption to the text shards (same key), and ``cmcr encode`` of the
    two folders gives two stores paired by key. The caption is also kept as ``caption`` in the
    image's metadata when its ``json`` has none. A sample with two members of one modality (``jpg``
    and ``png``) uses the first in :data:`~cmcr.pipeline.media.MEDIA_EXTENSIONS` order. Blank
    captions and captions that are not UTF-8 are skipped and reported (the image is kept).

    ``json`` metadata is kept (every entry of the sample gets it; ``key`` and ``modality`` are
    set by the shard writer). An unreadable tar or URL (corrupt, truncated, 404, a failing
    ``pipe:`` command) is recorded as a failed input (``Skipped(..., failed=True)``): the samples
    read before the error are kept.
    """
    url = is_url(path)
    name = str(path) if url else Path(path).name
    try:
        empty = True
        for sample in iter_tar_samples(path):
            empty = False
            key = sample["__key__"]
            if "__error__" in sample:
                skipped.append(Skipped(f"{name}:{key}", sample["__error__"]))
                continue
            meta: dict[str, Any] = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = {}
                if not isinstance(meta, dict):
                    meta = {}
            members = {m: media_member(sample, m) for m in MEDIA_EXTENSIONS}
            members = {m: e for m, e in members.items() if e is not None}
            if not members:
                skipped.append(Skipped(f"{name}:{key}", f"no media member (found {sorted(sample)[1:]})"))
                continue
            meta.setdefault("source", meta.get("source") or f"{name}:{key}")
            meta.setdefault("label", None)
            caption = None
            if "text" in members:
                try:
                    caption = sample[members["text"]].decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    skipped.append(Skipped(f"{name}:{key}", f"caption {key}.{members['text']} is not UTF-8 ({e})"))
                    del members["text"]
                else:
                    if not caption.strip():
                        skipped.append(Skipped(f"{name}:{key}", f"empty or whitespace-only caption "
                                                                f"{key}.{members['text']}"))
                        del members["text"]
                        caption = None
            for modality, ext in members.items():
                entry_meta = dict(meta)
                if modality != "text" and caption is not None and "text" in members:
                    entry_meta.setdefault("caption", caption)
                yield CorpusEntry(key=safe_key(key), modality=modality, ext=ext,
                                  data=sample[ext], meta=entry_meta)
        if empty:
            skipped.append(Skipped(str(path), "empty tar: no samples"))
    except (tarfile.TarError, OSError, EOFError) as e:
        why = str(e) if isinstance(e, RemoteReadError) else (
            f"{path}: unreadable tar ({type(e).__name__}: {e})")
        skipped.append(Skipped(str(path), f"{why}; samples after the error lost", failed=True))


def read_corpus(source: str | os.PathLike, skipped: list[Skipped], **table_kwargs: Any) -> Iterator[CorpusEntry]:
    """Dispatch on what ``source`` is: folder, list file, table, tar, or a tar's URL (``pipe:``,
    ``http(s)://``, ``s3://`` ...: :mod:`cmcr.pipeline.openers`; brace ranges are expanded by the caller).

    Raises:
        InputDataError: ``source`` does not exist or is of an unknown kind.
    """
    if is_url(source):
        return read_tar(str(source), skipped)
    source = Path(source)
    if source.is_dir():
        return read_folder(source, skipped)
    if not source.is_file():
        raise InputDataError(f"input {source} does not exist; pass a folder, a .txt list, a .csv/.jsonl table or .tar")
    suffix = source.suffix.lower()
    if suffix in LIST_SUFFIXES:
        return read_list(source, skipped)
    if suffix in TABLE_SUFFIXES:
        return read_table(source, skipped, **table_kwargs)
    if suffix == ".tar" or source.name.endswith((".tar.gz", ".tgz")):
        return read_tar(source, skipped)
    raise InputDataError(
        f"input {source}: unknown kind {suffix!r}; expected a folder, {LIST_SUFFIXES}, {TABLE_SUFFIXES}, .tar or "
        f"a shard URL (pipe:, http(s)://, s3://)"
    )


