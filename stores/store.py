"""The embedding store: Parquet parts + a JSON manifest + a failures table.

Layout of a store folder (format version 2, documented in ``docs/store-format.md``)::

    <store>/manifest.json                 written last, atomically (temp file + rename)
    <store>/parts/part-NNNNNN.parquet     key: string plus the store's metadata columns (same in every part)
    <store>/parts/part-NNNNNN.npy         the part's embeddings: a plain (rows, D) float16|float32 .npy
    <store>/failures.parquet              key, source, stage, error, time: inputs that were rejected
    <store>/index/...                     FAISS index and its parameters (see :mod:`cmcr.stores.index`)
    <store>/.lock                         advisory lock held by writers (fcntl)
    <store>/.verified.json                cache of part files whose sha256 was checked (see below)

Format version 1 stores (embeddings inside the Parquet part as ``fixed_size_list``) are still
read, validated and appended to (in version 1 layout); new stores are version 2, whose reads run
at ``numpy.load`` speed (the embedding bytes are copied straight from the file into the result).

Integrity on read: opening checks every listed file's presence, size, row count and schema; a
part's sha256 is verified lazily, the first time its bytes are read, and remembered in
``.verified.json`` by file identity (device, inode, size, mtime), so a swapped or rewritten part
is hashed again and refused. Rows of a cosine store are sampled for unit norm on every read.

A part is visible only once the manifest lists it. A process killed in the middle of an append
leaves at most a temp file or an unlisted part file behind; both are ignored by readers and
removed by the next writer, and every part listed earlier stays intact.

Typical use::

    store = Store.create("out/img", modality="image", encoder={"family": "open_clip", ...}, dim=512)
    store.append_part(keys, emb, metadata={"label": labels}, source="shard-000000.tar")
    x = Store.open("out/img", modality="image").embeddings()      # (N, 512) float16, C-contiguous
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cmcr import __version__
from cmcr.errors import StoreError, StoreFormatError, StoreMismatchError, StoreValidationError
from cmcr.stores.files import (  # noqa: F401 - re-exported for callers
    atomic_replace,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    fsync_dir,
    identity_fingerprint,
    sha256_file,
)

FORMAT_NAME = "cmcr-store"
FORMAT_VERSION = 2
#: Versions this code reads (and appends to, keeping their layout).
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
FAILURES = "failures.parquet"
LOCK = ".lock"
VERIFIED = ".verified.json"
KEY_COLUMN = "key"
EMBEDDING_COLUMN = "embedding"
RESERVED_COLUMNS = (KEY_COLUMN, EMBEDDING_COLUMN)
DTYPES = {"float16": np.float16, "float32": np.float32}
METRICS = ("cosine", "inner_product", "l2")
MODALITY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
FAILURE_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("stage", pa.string()),
     ("error", pa.string()), ("time", pa.string())]
)
#: The ``stage`` of a failure record: where an input was rejected (docs/store-format.md lists these;
#: tests/test_docs.py checks that the code records no other and that the docs name exactly these).
FAILURE_STAGES: dict[str, str] = {
    "read": "`cmcr encode`: the shard (or URL) could not be read to its end, or the tar reader refused a sample "
            "(duplicate or link member, size limit)",
    "decode": "`cmcr encode`: the payload could not be decoded or preprocessed (bad image/audio/3d file, "
              "blank caption, missing member)",
    "embed": "`cmcr encode`: the model failed on the sample alone, or returned a non-finite or all-zero row",
    "write": "`cmcr encode`: a key repeated inside one shard (the first sample keeps it)",
    "import": "`cmcr store import --skip-bad-rows`: a row with NaN/Inf, all zeros (with --normalize), not of "
              "unit norm for a cosine store, or overflowing float16",
}
#: Largest allowed | ||row|| - 1 | for rows of a normalised store, by storage dtype.
NORM_TOLERANCE = {"float16": 2e-3, "float32": 1e-4}
#: Tolerance applied to rows handed to :meth:`Store.append_part` (before the cast to the store dtype).
INPUT_NORM_TOLERANCE = 1e-3
ROW_GROUP_SIZE = 65536
_PART_RE = re.compile(r"^part-(\d{6,})\.(parquet|npy)$")
#: Rows read per block when streaming, converting or checking embeddings.
_BLOCK_ROWS = 65536
_EMPTY_TABLE = pa.schema([]).empty_table()
#: Rows per block whose norms are sampled on read (cosine stores): one row in ``_NORM_STRIDE``.
_NORM_STRIDE = 97


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#: Encoder-identity fields that never change the vectors; :func:`same_encoder` ignores them. Descriptive
#: fields (where embeddings were made, notes), ``weights_file`` (the checkpoint's file name: the digest in
#: ``weights`` decides) and ``tokenizer`` (older CLAP stores recorded it in the
#: identity; text tokenization belongs to a text store's ``preprocessing``, and audio rows never depend
#: on it). A ``seed`` is ignored too unless ``weights`` is ``random``/``random:N``: pretrained weights
#: do not depend on a seed.
IDENTITY_IGNORED_FIELDS = ("tokenizer", "weights_file", "source", "tool", "tool_version", "library",
                           "library_version", "note", "notes", "description", "provenance", "created_by",
                           "created_at", "url", "command")


def comparable_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an encoder identity that determines the vectors (see :data:`IDENTITY_IGNORED_FIELDS`);
    nested identities (a projected store's ``base``) are reduced the same way."""
    weights = identity.get("weights")
    random_init = weights is None or str(weights).startswith("random")
    out: dict[str, Any] = {}
    for k, v in identity.items():
        if k in IDENTITY_IGNORED_FIELDS or (k == "seed" and not random_init):
            continue
        out[k] = comparable_identity(v) if isinstance(v, Mapping) else v
    return out


def same_encoder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two encoder identities name the same embedding space: equal once the fields that do not
    change the vectors are dropped (:func:`comparable_identity`). E.g. an imported store whose identity
    carries ``seed: 0`` or a ``source`` note matches a cmcr-encoded store of the same pretrained model."""
    return canonical_json(comparable_identity(a)) == canonical_json(comparable_identity(b))


def atomic_write_parquet(path: str | os.PathLike, table: pa.Table, **kwargs: Any) -> None:
    """Write a Parquet file atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    pq.write_table(table, tmp, **kwargs)
    atomic_replace(tmp, path)


@dataclass(frozen=True)
class PartInfo:
    """One part as listed in the manifest.

    Attributes:
        file: Parquet file, relative to the store folder (``parts/part-000000.parquet``): keys and
            metadata (format 2), or keys, embeddings and metadata (format 1).
        rows: number of rows (0 is allowed: a source whose every sample failed).
        sha256: hex digest of ``file``.
        source: what the part was made from (input shard path, ``.npy`` file...), or ``None``.
        bytes: size of ``file`` (format 2; ``None`` in format 1).
        embeddings_file: the part's ``(rows, D)`` ``.npy`` file (format 2; ``None`` in format 1).
        embeddings_sha256, embeddings_bytes: digest and size of ``embeddings_file`` (format 2).
    """

    file: str
    rows: int
    sha256: str
    source: str | None = None
    created_at: str = ""
    bytes: int | None = None
    embeddings_file: str | None = None
    embeddings_sha256: str | None = None
    embeddings_bytes: int | None = None

    def files(self) -> list[tuple[str, str, int | None]]:
        """``(relative path, sha256, size or None)`` of every file of the part."""
        out = [(self.file, self.sha256, self.bytes)]
        if self.embeddings_file:
            out.append((self.embeddings_file, str(self.embeddings_sha256), self.embeddings_bytes))
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "rows": self.rows, "sha256": self.sha256}
        if self.embeddings_file is not None:
            d.update(bytes=self.bytes, embeddings_file=self.embeddings_file,
                     embeddings_sha256=self.embeddings_sha256, embeddings_bytes=self.embeddings_bytes)
        d.update(source=self.source, created_at=self.created_at)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PartInfo:
        return cls(file=d["file"], rows=int(d["rows"]), sha256=d["sha256"],
                   source=d.get("source"), created_at=d.get("created_at", ""),
                   bytes=None if d.get("bytes") is None else int(d["bytes"]),
                   embeddings_file=d.get("embeddings_file"), embeddings_sha256=d.get("embeddings_sha256"),
                   embeddings_bytes=None if d.get("embeddings_bytes") is None else int(d["embeddings_bytes"]))


@dataclass
class Batch:
    """A slice of a store: ``keys`` (list of N str), ``embeddings`` ((N, D) store dtype or the
    requested dtype), ``metadata`` (pyarrow Table of the requested metadata columns, N rows)."""

    keys: list[str]
    embeddings: np.ndarray
    metadata: pa.Table


@dataclass
class KeyJoin:
    """Result of :func:`join_by_key`.

    Attributes:
        keys: keys present in both stores, in the row order of the left store.
        rows_left / rows_right: ``(M,) int64`` row numbers of those keys in each store.
        only_left / only_right: keys present on one side only (reported, never silently dropped).
    """

    keys: list[str]
    rows_left: np.ndarray
    rows_right: np.ndarray
    only_left: list[str] = field(default_factory=list)
    only_right: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.keys)} keys in both stores, {len(self.only_left)} only in the left store, "
                f"{len(self.only_right)} only in the right store")


def _validate_identity(encoder: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(encoder, Mapping) or not encoder.get("family"):
        raise StoreFormatError(
            f"encoder identity must be a mapping with at least a 'family' entry "
            f"(e.g. {{'family': 'open_clip', 'architecture': 'ViT-B-32', 'weights': 'openai'}}); got {encoder!r}"
        )
    return json.loads(canonical_json(dict(encoder)))


def _embedding_type(dtype: str, dim: int) -> pa.DataType:
    return pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)


def _lock(path: Path):
    """Exclusive advisory lock on ``<store>/.lock`` for the duration of a write."""

    @contextlib.contextmanager
    def cm():
        with open(path / LOCK, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    return cm()


class Store:
    """An embedding store on disk (see the module docstring for the layout).

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`; do not call the constructor.
    Reading is lock-free (the manifest is replaced atomically); writing takes an advisory lock,
    so several processes may append to one store.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._key_set: set[str] | None = None
        self._key_set_rows = -1  # num_rows the cached key set was built for
        self._schema: pa.Schema | None = None  # metadata columns' schema, once known
        self._verified: dict[str, list[Any]] | None = None  # cache of sha256-checked files

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        modality: str,
        encoder: Mapping[str, Any],
        dim: int,
        dtype: str = "float16",
        normalized: bool = True,
        metric: str = "cosine",
        preprocessing: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        command: str | None = None,
        format_version: int = FORMAT_VERSION,
    ) -> Store:
        """Create an empty store folder.

        Args:
            path: store folder; must not already hold a store.
            modality: ``image``, ``text``, ``audio``, ``3d``... (lower case).
            encoder: model identity (family, architecture, weights tag or checkpoint sha256...).
            dim: embedding width D.
            dtype: storage dtype, ``float16`` (default) or ``float32``.
            normalized: rows are L2-normalised (required for ``metric='cosine'``).
            metric: ``cosine`` (inner product of unit rows), ``inner_product`` or ``l2``.
            preprocessing: modality-specific preprocessing parameters (sample rate, crop policy...).
            extra: free-form provenance recorded in the manifest (e.g. ``normalized_on_import``).
            command: the command line that created the store (provenance).
            format_version: ``2`` (default); ``1`` writes the old layout (embeddings inside the
                Parquet parts), for tools that cannot read ``.npy`` files.

        Raises:
            StoreError: a store already exists at ``path``.
            StoreFormatError: an invalid modality, dtype, metric, dim or identity.
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            raise StoreError(f"{path} already holds a store; open it with Store.open, or remove it first")
        modality = str(modality).lower()
        if not MODALITY_PATTERN.match(modality) and modality != "3d":
            raise StoreFormatError(f"invalid modality {modality!r}: use lower-case names like image, text, audio, 3d")
        if dtype not in DTYPES:
            raise StoreFormatError(f"invalid dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        if metric not in METRICS:
            raise StoreFormatError(f"invalid metric {metric!r}: expected one of {METRICS}")
        if metric == "cosine" and not normalized:
            raise StoreFormatError("a cosine store must hold L2-normalised rows (normalized=True)")
        if int(dim) <= 0:
            raise StoreFormatError(f"dim must be positive, got {dim}")
        if format_version not in SUPPORTED_VERSIONS:
            raise StoreFormatError(f"format_version must be one of {SUPPORTED_VERSIONS}, got {format_version!r}")
        now = _now()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": int(format_version),
            "modality": modality,
            "encoder": _validate_identity(encoder),
            "preprocessing": json.loads(canonical_json(dict(preprocessing or {}))),
            "dim": int(dim),
            "dtype": dtype,
            "normalized": bool(normalized),
            "metric": metric,
            "num_rows": 0,
            "columns": None,
            "parts": [],
            "created_by": {"tool": "cmcr", "version": __version__, "command": command},
            "created_at": now,
            "updated_at": now,
            "extra": json.loads(canonical_json(dict(extra or {}))),
        }
        (path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        with _lock(path):
            if (path / MANIFEST).exists():
                raise StoreError(f"{path} already holds a store (created concurrently)")
            atomic_write_json(path / MANIFEST, manifest)
        return cls(path, manifest)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        modality: str | None = None,
        encoder: Mapping[str, Any] | None = None,
        dim: int | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        validate: str = "fast",
    ) -> Store:
        """Open an existing store and check what the caller expects of it.

        Args:
            modality, encoder, dim, preprocessing: when given, the store must match them
                (encoder identities compare as canonical JSON, so a same-dim store from another
                model is refused).
            validate: ``"fast"`` (manifest; part files present, their sizes, schemas, row counts),
                ``"full"`` (also sha256, NaN/Inf, norms, duplicate keys; reads every row) or
                ``"none"``. Whatever is chosen, reads verify each part's sha256 lazily (see the
                module docstring).

        Raises:
            StoreError: no store at ``path``.
            StoreFormatError: malformed manifest or parts (message names the file).
            StoreValidationError: bad rows found by ``validate="full"``.
            StoreMismatchError: modality / encoder / dim / preprocessing differ from the expected ones.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise StoreError(
                f"no store at {path} ({MANIFEST} missing); create one with `cmcr encode` or `cmcr store import`"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreFormatError(f"{mpath}: cannot read the manifest ({e}); restore it or re-create the store") from e
        store = cls(path, manifest)
        store._check_manifest()
        if validate == "fast":
            store._check_parts(full=False)
        elif validate == "full":
            store._check_parts(full=True)
        elif validate != "none":
            raise ValueError(f"validate must be 'none', 'fast' or 'full', got {validate!r}")
        store.check_compatible(modality=modality, encoder=encoder, dim=dim, preprocessing=preprocessing)
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        *,
        modality: str,
        encoder: Mapping[str, Any],
        dim: int,
        overwrite: bool = False,
        **create_kwargs: Any,
    ) -> Store:
        """Open the store at ``path`` if it was made by the same encoder for the same modality
        (and preprocessing, dtype...), create it if there is none. Writers claim the folder first
        (:func:`cmcr.stores.files.claim_output`); this is the low-level step.

        Args:
            overwrite: start over: remove a store at ``path`` (whatever it holds) and create a new one
                (the one meaning of ``--overwrite``).

        Raises:
            StoreMismatchError: a store made differently exists and ``overwrite`` is False.
        """
        path = Path(path)
        if overwrite and (path / MANIFEST).exists():
            shutil.rmtree(path)
        if (path / MANIFEST).exists():
            try:
                store = cls.open(path, modality=modality, encoder=encoder, dim=dim,
                                 preprocessing=create_kwargs.get("preprocessing") or {})
                for name in ("dtype", "metric", "normalized"):
                    if name in create_kwargs and store.manifest[name] != create_kwargs[name]:
                        raise StoreMismatchError(
                            f"{path}: store has {name}={store.manifest[name]!r}, requested "
                            f"{create_kwargs[name]!r}; use another store folder or --overwrite"
                        )
                return store
            except StoreMismatchError as e:
                raise StoreMismatchError(f"{e} (pass --overwrite / overwrite=True to replace the store)") from e
        return cls.create(path, modality=modality, encoder=encoder, dim=dim, **create_kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def version(self) -> int:
        """The store's format version (1: embeddings in the Parquet parts; 2: a ``.npy`` per part)."""
        return int(self.manifest.get("format_version", FORMAT_VERSION))

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.manifest.get("preprocessing") or {}

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def normalized(self) -> bool:
        return bool(self.manifest["normalized"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def parts(self) -> list[PartInfo]:
        return [PartInfo.from_json(p) for p in self.manifest["parts"]]

    @property
    def metadata_columns(self) -> list[str]:
        """Names of the metadata columns (every column but ``key`` and ``embedding``)."""
        return [c["name"] for c in (self.manifest.get("columns") or [])]

    def done_sources(self) -> set[str]:
        """Sources (e.g. input shard paths) that already have a part: a rerun skips them."""
        return {p.source for p in self.parts if p.source is not None}

    def fingerprint(self) -> str:
        """Short hash of what the store holds (modality, identity, dim, parts' sha256): it changes
        whenever rows are added, so connectors and indexes can record which contents they saw."""
        body = {k: self.manifest[k] for k in ("modality", "encoder", "preprocessing", "dim", "metric")}
        if self.version == 1:
            body["parts"] = [p["sha256"] for p in self.manifest["parts"]]
        else:
            body["parts"] = [f"{p['sha256']}:{p['embeddings_sha256']}" for p in self.manifest["parts"]]
        return identity_fingerprint(body)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used by ``cmcr store info``)."""
        failures = self.failures()
        return {
            "path": str(self.path),
            "modality": self.modality,
            "encoder": self.encoder,
            "preprocessing": self.preprocessing,
            "dim": self.dim,
            "dtype": self.dtype,
            "metric": self.metric,
            "normalized": self.normalized,
            "rows": self.num_rows,
            "parts": len(self.manifest["parts"]),
            "metadata_columns": self.metadata_columns,
            "failures": failures.num_rows,
            "fingerprint": self.fingerprint(),
            "format_version": self.manifest["format_version"],
            "created_by": self.manifest.get("created_by"),
            "created_at": self.manifest.get("created_at"),
            "updated_at": self.manifest.get("updated_at"),
            "extra": self.manifest.get("extra", {}),
            "bytes_on_disk": sum((self.path / f).stat().st_size for p in self.parts for f, _, _ in p.files()
                                 if (self.path / f).exists()),
        }

    # ------------------------------------------------------------------ checks
    def check_compatible(
        self,
        *,
        modality: str | None = None,
        encoder: Mapping[str, Any] | None = None,
        dim: int | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        what: str = "this store",
    ) -> None:
        """Raise :class:`StoreMismatchError` when the store is not what the caller expects."""
        if modality is not None and self.modality != str(modality).lower():
            raise StoreMismatchError(
                f"{self.path}: {what} must hold {modality!r} embeddings, but this store holds "
                f"{self.modality!r}; pass a store of the right modality"
            )
        if dim is not None and self.dim != int(dim):
            raise StoreMismatchError(f"{self.path}: expected dim {dim}, store has dim {self.dim}")
        if encoder is not None and not same_encoder(encoder, self.encoder):
            raise StoreMismatchError(
                f"{self.path}: {what} was made by encoder {canonical_json(self.encoder)}, "
                f"expected {canonical_json(dict(encoder))}; embeddings of different encoders live in "
                f"different spaces even when their dims match — use a store made by the expected encoder"
            )
        if preprocessing is not None and canonical_json(dict(preprocessing)) != canonical_json(self.preprocessing):
            raise StoreMismatchError(
                f"{self.path}: store was made with preprocessing {canonical_json(self.preprocessing)}, "
                f"expected {canonical_json(dict(preprocessing))}"
            )

    def _check_manifest(self) -> None:
        m, where = self.manifest, self.path / MANIFEST
        if m.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where}: 'format' is {m.get('format')!r}, expected {FORMAT_NAME!r}")
        if m.get("format_version") not in SUPPORTED_VERSIONS:
            raise StoreFormatError(
                f"{where}: format_version {m.get('format_version')!r} is not supported by cmcr {__version__} "
                f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade cmcr or re-create the store"
            )
        for name in ("modality", "encoder", "dim", "dtype", "normalized", "metric", "num_rows", "parts"):
            if name not in m:
                raise StoreFormatError(f"{where}: missing field {name!r}")
        if m["dtype"] not in DTYPES:
            raise StoreFormatError(f"{where}: dtype {m['dtype']!r} is not one of {sorted(DTYPES)}")
        total = sum(int(p["rows"]) for p in m["parts"])
        if total != int(m["num_rows"]):
            raise StoreFormatError(f"{where}: num_rows is {m['num_rows']} but the parts hold {total} rows")
        if self.version >= 2:
            for p in m["parts"]:
                if not p.get("embeddings_file") or not p.get("embeddings_sha256"):
                    raise StoreFormatError(
                        f"{where}: part {p.get('file')!r} lacks 'embeddings_file' / 'embeddings_sha256' "
                        f"(required by format 2); restore the manifest or re-create the store")

    def _meta_schema(self) -> pa.Schema | None:
        """Schema of the metadata columns (``None`` until the first part fixes them).

        Format 2 keeps the exact Arrow schema in ``manifest.metadata_schema`` (base64 Arrow IPC).
        Format 1 printed the types as strings; a type the string parser does not know (struct,
        dictionary...) is taken from the first part's Parquet schema instead.
        """
        cols = self.manifest.get("columns")
        if cols is None:
            return None
        if self._schema is not None:
            return self._schema
        where = self.path / MANIFEST
        if self.manifest.get("metadata_schema"):
            try:
                schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.manifest["metadata_schema"])))
            except (ValueError, pa.ArrowInvalid) as e:
                raise StoreFormatError(f"{where}: 'metadata_schema' is not a readable Arrow schema ({e}); "
                                       f"restore the manifest or re-create the store") from e
            if schema.names != [c["name"] for c in cols]:
                raise StoreFormatError(f"{where}: 'metadata_schema' names {schema.names} differ from 'columns'")
        else:
            try:
                schema = pa.schema([pa.field(c["name"], _type_from_string(c["type"])) for c in cols])
            except StoreFormatError:
                if not self.manifest["parts"]:
                    raise
                first = self.path / self.manifest["parts"][0]["file"]
                try:
                    found = pq.read_schema(first)
                except Exception as e:  # pyarrow raises several types for corrupt files
                    raise StoreFormatError(f"{first}: not a readable Parquet file ({e})") from e
                names = [c["name"] for c in cols]
                missing = [n for n in names if n not in found.names]
                if missing:
                    raise StoreFormatError(
                        f"{first}: metadata column(s) {missing} listed in the manifest are missing") from None
                schema = pa.schema([found.field(n).remove_metadata() for n in names])
        self._schema = pa.schema([f.remove_metadata() for f in schema])
        return self._schema

    def _expected_schema(self) -> pa.Schema | None:
        """Full Arrow schema of a Parquet part (key, [embedding in format 1], metadata columns)."""
        meta = self._meta_schema()
        if meta is None:
            return None
        fields = [pa.field(KEY_COLUMN, pa.string())]
        if self.version == 1:
            fields.append(pa.field(EMBEDDING_COLUMN, _embedding_type(self.dtype, self.dim)))
        return pa.schema(fields + list(meta))

    def _check_part_schema(self, part: PartInfo, schema: pa.Schema) -> None:
        where = self.path / part.file
        if KEY_COLUMN not in schema.names:
            raise StoreFormatError(f"{where}: a part needs a 'key' column, found {schema.names}")
        if self.version == 1:
            emb = schema.field(EMBEDDING_COLUMN).type if EMBEDDING_COLUMN in schema.names else None
            if emb is None:
                raise StoreFormatError(
                    f"{where}: a part needs columns 'key' and 'embedding', found {schema.names}")
            if not pa.types.is_fixed_size_list(emb):
                raise StoreFormatError(
                    f"{where}: 'embedding' must be fixed_size_list<{self.dtype}>[{self.dim}], found {emb}")
            if emb.list_size != self.dim:
                raise StoreFormatError(
                    f"{where}: rows have length {emb.list_size}, the store's dim is {self.dim} "
                    f"(every part of a store must have the same dim; re-encode this part)"
                )
            found_dtype = {pa.float16(): "float16", pa.float32(): "float32"}.get(emb.value_type)
            if found_dtype != self.dtype:
                raise StoreFormatError(
                    f"{where}: embedding dtype is {emb.value_type}, the store's dtype is {self.dtype}")
        meta = self._meta_schema()
        if meta is not None:
            found = [(f.name, f.type) for f in schema if f.name not in RESERVED_COLUMNS]
            want = [(f.name, f.type) for f in meta]
            if found != want:
                raise StoreFormatError(
                    f"{where}: metadata columns {[f'{n}:{t}' for n, t in found]} differ from the store's columns "
                    f"{[f'{n}:{t}' for n, t in want]}; every part of a store must have the same columns "
                    f"(was the part replaced? restore it or re-create the store)"
                )

    def _check_npy(self, part: PartInfo) -> int:
        """Header of a format-2 part's ``.npy``: shape ``(rows, dim)``, store dtype, C order, size.
        Returns the header length in bytes."""
        where = self.path / str(part.embeddings_file)
        try:
            with open(where, "rb") as f:
                shape, fortran, dtype, header = _read_npy_header(f, where)
        except FileNotFoundError:
            raise StoreFormatError(
                f"{where}: part listed in the manifest is missing; restore it or re-create the store") from None
        if tuple(shape) != (part.rows, self.dim) or dtype != np.dtype(DTYPES[self.dtype]) or fortran:
            raise StoreFormatError(
                f"{where}: holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape {tuple(shape)}, "
                f"the manifest says ({part.rows}, {self.dim}) {self.dtype} (was the part replaced? restore it or "
                f"re-create the store)")
        size = where.stat().st_size
        expected = header + part.rows * self.dim * dtype.itemsize
        if size != expected or (part.embeddings_bytes is not None and size != part.embeddings_bytes):
            raise StoreFormatError(
                f"{where}: {size} bytes, expected {expected} for {part.rows} rows (truncated or changed after it "
                f"was written; restore it or re-create the store)")
        return header

    def _check_parts(self, full: bool) -> None:
        seen: set[str] = set()
        for part in self.parts:
            where = self.path / part.file
            if not where.exists():
                raise StoreFormatError(
                    f"{where}: part listed in the manifest is missing; restore it or re-create the store")
            if part.bytes is not None and where.stat().st_size != part.bytes:
                raise StoreFormatError(
                    f"{where}: {where.stat().st_size} bytes, the manifest says {part.bytes} (the file was changed "
                    f"after it was written; restore it or re-create the store)")
            try:
                meta = pq.read_metadata(where)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise StoreFormatError(f"{where}: not a readable Parquet file ({e})") from e
            self._check_part_schema(part, meta.schema.to_arrow_schema())
            if meta.num_rows != part.rows:
                raise StoreFormatError(f"{where}: holds {meta.num_rows} rows, the manifest says {part.rows}")
            if part.embeddings_file:
                self._check_npy(part)
            if not full:
                continue
            for rel, sha, _ in part.files():
                digest = sha256_file(self.path / rel)
                if digest != sha:
                    raise StoreValidationError(_digest_message(self.path / rel, digest, sha))
            keys = pq.read_table(where, columns=[KEY_COLUMN], memory_map=True).column(KEY_COLUMN).to_pylist()
            start = 0
            for block in self._part_blocks(part, _BLOCK_ROWS, verify=False):
                _check_rows(block, keys[start:start + len(block)], self.normalized, NORM_TOLERANCE[self.dtype],
                            where if self.version == 1 else self.path / str(part.embeddings_file), first_row=start)
                start += len(block)
            for k in keys:
                if k in seen:
                    raise StoreValidationError(f"{where}: duplicate key {k!r} (keys must be unique in a store)")
                seen.add(k)
        self._mark_verified([(rel, sha) for part in self.parts for rel, sha, _ in part.files()] if full else [])

    def validate(self) -> dict[str, Any]:
        """Full validation (every row): manifest, schemas, sha256, NaN/Inf, norms, unique keys.

        Returns a report ``{"ok": True, "rows": N, "parts": P}``.

        Raises:
            StoreFormatError, StoreValidationError: the first problem found, naming the part file.
        """
        self._check_manifest()
        self._check_parts(full=True)
        return {"ok": True, "rows": self.num_rows, "parts": len(self.manifest["parts"])}

    # ------------------------------------------------------------------ writing
    def append_part(
        self,
        keys: Sequence[str],
        embeddings: np.ndarray,
        metadata: Mapping[str, Sequence[Any]] | pa.Table | None = None,
        *,
        source: str | None = None,
        failures: Sequence[Mapping[str, Any]] = (),
        check_rows: bool = True,
        check_keys: bool = True,
        digest: NpyDigest | None = None,
    ) -> PartInfo:
        """Validate rows and append them as one new part, atomically.

        The part file is written to a temp name and renamed, failures are merged into
        ``failures.parquet``, and the manifest is rewritten last: a crash at any point leaves the
        store as it was before the call (plus ignorable leftovers).

        Args:
            keys: N unique, non-empty strings not yet in the store.
            embeddings: ``(N, D)`` float array (any float dtype; cast to the store dtype after the checks).
            metadata: N values per metadata column. The first part fixes the store's columns; later
                parts must bring the same column names (values are cast to the established types).
            source: what the part was made from (input shard...). A store holds at most one part per
                source; see :meth:`done_sources`.
            failures: records ``{"key", "source", "stage", "error"}`` of inputs of this source that
                were rejected.
            check_rows: check NaN/Inf and norms (default). ``False`` is for callers that have just
                checked the very same rows (``store import``).
            check_keys: check the keys non-empty, unique and not yet in the store (default). ``False``
                is for ``store import`` only: it has checked every key of the import (non-empty,
                unique) before writing, into a store only it writes (its temp store, resumed only
                when the keys' digest is the same), so no key can repeat.
            digest: the sha256 of these rows' ``.npy`` bytes, already being computed
                (:class:`NpyDigest`, started by a caller before its own row check); used only if it
                :meth:`~NpyDigest.covers` the rows written (else cancelled, and the digest is computed
                here). Format 2 hashes the rows in a thread during the checks and the write either way.

        What is written is read back before the manifest lists it: row count, schema (metadata
        columns keep their real Arrow types: structs, lists, dictionaries...) and values of the
        Parquet file, header and size of the ``.npy``.

        Returns:
            The new :class:`PartInfo`.

        Raises:
            StoreValidationError: wrong shape, NaN/Inf, un-normalised rows in a normalised store,
                empty or duplicate keys, a source that already has a part (message names the row/key).
            StoreFormatError: metadata columns differ from the store's, or do not read back as written.
        """
        keys = list(map(str, keys))
        emb = np.asarray(embeddings)
        n = len(keys)
        if emb.ndim != 2 or emb.shape[0] != n or (n and emb.shape[1] != self.dim):
            raise StoreValidationError(
                f"{self.path}: embeddings of shape {emb.shape} do not fit {n} keys x dim {self.dim} "
                f"(expected ({n}, {self.dim}))"
            )
        if not np.issubdtype(emb.dtype, np.floating):
            raise StoreValidationError(f"{self.path}: embeddings must be floats, got dtype {emb.dtype}")
        emb = emb.reshape(n, self.dim)
        tol = NORM_TOLERANCE["float16"] if emb.dtype == np.float16 else INPUT_NORM_TOLERANCE
        origin = f" from {source}" if source else ""
        cast = np.ascontiguousarray(emb, dtype=DTYPES[self.dtype])
        if digest is not None and (self.version < 2 or not digest.covers(cast)):
            digest.cancel()
            digest = None
        # format 2: the .npy digest is computed from memory in a thread while the keys and rows are
        # checked and written (waited for after the .npy's fsync)
        if self.version >= 2 and digest is None:
            digest = NpyDigest(cast)
        try:
            key_set = set(keys) if check_keys else None  # one C-level pass: empty, duplicate and clash checks
            if key_set is not None and "" in key_set:
                raise StoreValidationError(f"{self.path}: row {keys.index('')} has an empty key; every row needs a "
                                           "unique key")
            if key_set is not None and len(key_set) != n:
                dup = _first_duplicate(keys)
                raise StoreValidationError(f"{self.path}: key {dup!r} appears twice in the rows being appended")
            if check_rows:
                _check_rows(emb, keys, self.normalized, tol, f"{self.path} (rows being appended{origin})")
            return self._append_checked(keys, key_set, cast, metadata, source, failures, digest)
        except BaseException:
            if digest is not None:
                digest.cancel()  # the rows are not written: stop hashing them
            raise

    def _append_checked(
        self, keys: list[str], key_set: set[str] | None, emb: np.ndarray,
        metadata: Mapping[str, Sequence[Any]] | pa.Table | None, source: str | None,
        failures: Sequence[Mapping[str, Any]], digest: NpyDigest | None,
    ) -> PartInfo:
        """:meth:`append_part` once the rows are checked: ``emb`` in the store dtype, C order;
        ``key_set``: the set of ``keys`` (``None``: their checks are the caller's)."""
        n = len(keys)
        table = self._build_table(keys, emb if self.version == 1 else None, metadata)

        with _lock(self.path):
            self._reload()
            self._clean_leftovers()
            if source is not None and source in self.done_sources():
                raise StoreValidationError(
                    f"{self.path}: source {source!r} already has a part; skip it (a rerun resumes) or use --overwrite"
                )
            existing = self._keys_set() if key_set is not None else None
            clash = None if existing is None or existing.isdisjoint(key_set) else next(k for k in keys if k in existing)
            if clash is not None:
                raise StoreValidationError(
                    f"{self.path}: key {clash!r} (row {keys.index(clash)} of the rows being appended"
                    f"{f' from {source}' if source else ''}) is already in the store; keys must be unique"
                )
            index = max((int(_PART_RE.match(Path(p["file"]).name).group(1)) for p in self.manifest["parts"]),
                        default=-1) + 1
            rel = f"{PARTS_DIR}/part-{index:06d}.parquet"
            if self.version == 1:
                # float16 has at most 65536 values, so Parquet's dictionary encoding never falls back
                # to PLAIN for a float16 embedding column: encode it PLAIN, without statistics
                others = [f.name for f in table.schema if f.name != EMBEDDING_COLUMN]
                atomic_write_parquet(self.path / rel, table, compression=_compression(table.schema),
                                     row_group_size=ROW_GROUP_SIZE, use_dictionary=others, write_statistics=others)
                part = PartInfo(file=rel, rows=n, sha256=sha256_file(self.path / rel), source=source,
                                created_at=_now())
            else:
                rel_npy = f"{PARTS_DIR}/part-{index:06d}.npy"
                try:
                    # keys are unique: no dictionary page for them (it is built, then abandoned)
                    atomic_write_parquet(self.path / rel, table, compression="zstd", row_group_size=ROW_GROUP_SIZE,
                                         use_dictionary=[c for c in table.column_names if c != KEY_COLUMN])
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise StoreFormatError(
                        f"{self.path / rel}: the metadata columns {[f'{f.name}: {f.type}' for f in table.schema][1:]} "
                        f"cannot be written to Parquet ({e}); convert that column (e.g. to string) first") from e
                emb_sha, emb_bytes = _write_npy(self.path / rel_npy, emb, digest)
                part = PartInfo(file=rel, rows=n, sha256=sha256_file(self.path / rel), source=source,
                                created_at=_now(), bytes=(self.path / rel).stat().st_size, embeddings_file=rel_npy,
                                embeddings_sha256=emb_sha, embeddings_bytes=emb_bytes)
            schema = self._read_back(part, table)
            manifest = dict(self.manifest)
            if manifest.get("columns") is None:
                meta = pa.schema([f.remove_metadata() for f in schema if f.name not in RESERVED_COLUMNS])
                manifest["columns"] = [{"name": f.name, "type": str(f.type)} for f in meta]
                if self.version >= 2:
                    manifest["metadata_schema"] = base64.b64encode(meta.serialize().to_pybytes()).decode("ascii")
            if failures:
                self._merge_failures(failures, default_source=source)
            manifest["parts"] = [*self.manifest["parts"], part.to_json()]
            manifest["num_rows"] = int(self.manifest["num_rows"]) + n
            manifest["updated_at"] = _now()
            atomic_write_json(self.path / MANIFEST, manifest)
            self.manifest = manifest
            if existing is not None:
                existing.update(key_set)
                self._key_set_rows = self.num_rows  # else the cached key set is rebuilt when next needed
            self._mark_verified([(f, sha) for f, sha, _ in part.files()])
        return part

    def _read_back(self, part: PartInfo, table: pa.Table) -> pa.Schema:
        """Read a just-written part back (before the manifest lists it): rows, schema, values.

        Returns the Parquet file's Arrow schema. On any difference the part's files are removed and
        :class:`StoreFormatError` names the column and the fix.
        """
        where = self.path / part.file
        try:
            try:
                got = pq.read_table(where, memory_map=True, columns=[c for c in table.column_names
                                                                     if c != EMBEDDING_COLUMN])
            except Exception as e:  # pyarrow raises several types
                raise StoreFormatError(
                    f"{where}: the part just written cannot be read back ({e}); a metadata column has a type "
                    f"Parquet cannot hold — convert it (e.g. to string) before writing") from e
            if got.num_rows != part.rows:
                raise StoreFormatError(f"{where}: wrote {part.rows} rows, read back {got.num_rows}")
            expected = self._expected_schema()
            if expected is not None:
                want = pa.schema([f for f in expected if f.name != EMBEDDING_COLUMN])
                found = pa.schema([f.remove_metadata() for f in got.schema])
                for w, f in zip(want, found, strict=False):
                    if w.name != f.name or w.type != f.type:
                        raise StoreFormatError(
                            f"{where}: metadata column {w.name!r} reads back as {f.type}, the store's type is "
                            f"{w.type}; write values of the store's type")
            for name in got.column_names:
                wrote, read = table.column(name), got.column(name)
                try:
                    same = wrote.cast(read.type).equals(read) if wrote.type != read.type else wrote.equals(read)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    same = False
                if not same:
                    raise StoreFormatError(
                        f"{where}: metadata column {name!r} ({wrote.type}) does not read back as written (read "
                        f"{read.type}); convert it to a plain type (string, integer, float, list, struct) first")
            if part.embeddings_file:
                self._check_npy(part)
            return got.schema
        except StoreFormatError:
            for rel, _, _ in part.files():
                (self.path / rel).unlink(missing_ok=True)
            raise

    def add_failures(self, failures: Sequence[Mapping[str, Any]]) -> None:
        """Record rejected inputs ``{"key", "source", "stage", "error"}`` in ``failures.parquet``
        (atomic rewrite; an identical (key, source, stage) record is kept once)."""
        if not failures:
            return
        with _lock(self.path):
            self._merge_failures(failures, default_source=None)

    def _merge_failures(self, failures: Sequence[Mapping[str, Any]], default_source: str | None) -> None:
        now = _now()
        rows = {name: [] for name in FAILURE_SCHEMA.names}
        for f in failures:
            rows["key"].append(str(f.get("key", "")))
            rows["source"].append(str(f.get("source") or default_source or ""))
            rows["stage"].append(str(f.get("stage", "")))
            rows["error"].append(str(f.get("error", "")))
            rows["time"].append(str(f.get("time") or now))
        new = pa.Table.from_pydict(rows, schema=FAILURE_SCHEMA)
        old = self.failures()
        merged = pa.concat_tables([old, new]) if old.num_rows else new
        seen: set[tuple[str, str, str]] = set()
        keep = []
        for i, ident in enumerate(zip(merged.column("key").to_pylist(), merged.column("source").to_pylist(),
                                      merged.column("stage").to_pylist(), strict=True)):
            if ident not in seen:
                seen.add(ident)
                keep.append(i)
        atomic_write_parquet(self.path / FAILURES, merged.take(pa.array(keep, pa.int64())))

    def _build_table(self, keys: list[str], emb: np.ndarray | None, metadata: Any) -> pa.Table:
        arrays: list[Any] = [pa.array(keys, pa.string())]
        names = [KEY_COLUMN]
        if emb is not None:  # format 1: embeddings inside the Parquet part
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim))
            names.append(EMBEDDING_COLUMN)
        if metadata is None:
            meta = _EMPTY_TABLE
        elif isinstance(metadata, pa.Table):
            meta = metadata
        else:
            meta = pa.table({k: pa.array(list(v)) if not isinstance(v, (pa.Array, pa.ChunkedArray)) else v
                             for k, v in metadata.items()})
        for name in meta.column_names:
            if name in RESERVED_COLUMNS:
                raise StoreFormatError(f"{self.path}: metadata column {name!r} is reserved; rename it")
            if meta.num_rows != len(keys):
                raise StoreValidationError(
                    f"{self.path}: metadata column {name!r} has {meta.num_rows} values for {len(keys)} keys"
                )
        expected = self._meta_schema()
        if expected is not None:
            want = list(expected)
            if sorted(meta.column_names) != sorted(f.name for f in want):
                raise StoreFormatError(
                    f"{self.path}: metadata columns {sorted(meta.column_names)} differ from the store's columns "
                    f"{sorted(f.name for f in want)}; every part of a store must have the same columns"
                )
            for f in want:
                col = meta.column(f.name)
                try:
                    arrays.append(col.cast(f.type) if col.type != f.type else col)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise StoreFormatError(
                        f"{self.path}: metadata column {f.name!r} of type {col.type} cannot become the store's "
                        f"type {f.type} ({e})"
                    ) from e
                names.append(f.name)
        else:
            for name in meta.column_names:
                col = meta.column(name)
                if pa.types.is_null(col.type):  # an all-null first part must not fix the type to null
                    col = col.cast(pa.string())
                arrays.append(col)
                names.append(name)
        return pa.Table.from_arrays(arrays, names=names)

    def _reload(self) -> None:
        self.manifest = json.loads((self.path / MANIFEST).read_text())

    def _clean_leftovers(self) -> None:
        """Remove temp files and part files that no manifest lists (left by a killed writer)."""
        listed = {Path(f).name for p in self.parts for f, _, _ in p.files()}
        for f in (self.path / PARTS_DIR).iterdir():
            if f.name.startswith(".tmp-") or (_PART_RE.match(f.name) and f.name not in listed):
                f.unlink(missing_ok=True)
        for f in self.path.glob(".tmp-*"):
            f.unlink(missing_ok=True)

    def _keys_set(self) -> set[str]:
        """The store's keys as a set, cached; rebuilt when the manifest lists rows the cache has not
        seen (another writer appended parts since)."""
        if self._key_set is None or self._key_set_rows != self.num_rows:
            self._key_set = set(self.keys()) if self.num_rows else set()
            self._key_set_rows = self.num_rows
        return self._key_set

    def keys_present(self, keys: Sequence[str]) -> list[str]:
        """Those of ``keys`` that the store already holds, in the given order (uses the cached key set)."""
        self._reload()
        existing = self._keys_set()
        return [k for k in keys if k in existing]

    # ------------------------------------------------------------------ integrity (lazy sha256)
    def _verified_cache(self) -> dict[str, list[Any]]:
        if self._verified is None:
            try:
                self._verified = json.loads((self.path / VERIFIED).read_text())
                if not isinstance(self._verified, dict):
                    self._verified = {}
            except (OSError, ValueError):
                self._verified = {}
        return self._verified

    def _is_verified(self, rel: str, sha: str) -> bool:
        entry = self._verified_cache().get(rel)
        return bool(entry) and entry == [sha, *_file_id(self.path / rel)]

    def _mark_verified(self, files: Sequence[tuple[str, str]]) -> None:
        """Remember that ``files`` (relative path, sha256) were hashed and matched, keyed by file
        identity; a read-only store simply re-hashes next time."""
        if not files:
            return
        cache = self._verified_cache()
        listed = {f for p in self.parts for f, _, _ in p.files()}
        for rel, sha in files:
            with contextlib.suppress(OSError):
                cache[rel] = [sha, *_file_id(self.path / rel)]
        for rel in [r for r in cache if r not in listed]:
            del cache[rel]
        with contextlib.suppress(OSError):
            atomic_write_bytes(self.path / VERIFIED, json.dumps(cache, sort_keys=True).encode())

    def _verify_file(self, rel: str, sha: str) -> None:
        """Hash ``rel`` unless the cache says it was verified as it is now."""
        if self._is_verified(rel, sha):
            return
        digest = sha256_file(self.path / rel)
        if digest != sha:
            raise StoreValidationError(_digest_message(self.path / rel, digest, sha))
        self._mark_verified([(rel, sha)])

    def _part_blocks(self, part: PartInfo, block_rows: int, *, verify: bool = True) -> Iterator[np.ndarray]:
        """The part's embeddings in order, ``(<= block_rows, D)`` store-dtype arrays (fresh arrays).

        Format 2: read from the ``.npy`` with one read per block; when ``verify`` and the file was not
        verified yet, its sha256 is computed on the way and checked at the end of the part (rows of
        a part that fails are yielded before the error). Cosine stores: sampled rows must be unit.
        """
        if part.rows == 0:
            return
        if part.embeddings_file is None:  # format 1
            if verify:
                self._verify_file(part.file, part.sha256)
            pf = pq.ParquetFile(self.path / part.file, memory_map=True)
            start = 0
            for rb in pf.iter_batches(batch_size=block_rows, columns=[EMBEDDING_COLUMN]):
                block = np.array(_chunk_matrix(rb.column(0), self.dim, self.path / part.file))
                self._sample_norms(block, part.file, start)
                start += len(block)
                yield block
            return
        rel = part.embeddings_file
        hasher = hashlib.sha256() if verify and not self._is_verified(rel, str(part.embeddings_sha256)) else None
        header = self._check_npy(part)
        dtype = np.dtype(DTYPES[self.dtype])
        with open(self.path / rel, "rb") as f:
            head = f.read(header)
            if hasher is not None:
                hasher.update(head)
            for start in range(0, part.rows, block_rows):
                block = np.empty((min(block_rows, part.rows - start), self.dim), dtype=dtype)
                _readinto(f, block, self.path / rel)
                if hasher is not None:
                    hasher.update(_bytes_view(block))
                self._sample_norms(block, rel, start)
                yield block
        if hasher is not None:
            self._check_digest(rel, hasher.hexdigest(), str(part.embeddings_sha256))

    def _check_digest(self, rel: str, digest: str, sha: str) -> None:
        if digest != sha:
            raise StoreValidationError(_digest_message(self.path / rel, digest, sha))
        self._mark_verified([(rel, sha)])

    def _sample_norms(self, block: np.ndarray, rel: str, first_row: int) -> None:
        """Cosine stores: every ``_NORM_STRIDE``-th row of ``block`` must have unit norm."""
        if not self.normalized or not len(block):
            return
        sample = np.asarray(block[::_NORM_STRIDE], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", sample, sample))
        bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE[self.dtype])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreValidationError(
                f"{self.path / rel}: row {first_row + i * _NORM_STRIDE} has L2 norm {norms[i]:.4g}, but this cosine "
                f"store holds unit rows — the file was changed after it was written; restore it or re-create "
                f"the store (`cmcr store validate` checks every row)")

    def _verified_parquet(self, part: PartInfo) -> Path:
        """Path of the part's Parquet file, its sha256 verified (lazily, see the module docstring).
        Format 1 parts also hold the embeddings: their hash is checked when the rows are read."""
        if part.embeddings_file is not None:
            self._verify_file(part.file, part.sha256)
        return self.path / part.file

    # ------------------------------------------------------------------ reading
    def _part_paths(self) -> list[Path]:
        return [self._verified_parquet(p) for p in self.parts]

    def embeddings(self, dtype: str | np.dtype | None = None) -> np.ndarray:
        """All embeddings as one C-contiguous ``(N, D)`` array, in row order (parts in manifest order).

        Args:
            dtype: ``None`` for the store dtype (float16 by default), or e.g. ``np.float32``.
                Conversion happens block by block into the output (no extra full-size copy).

        Format 2 reads each part's ``.npy`` bytes straight into the result (one copy, as
        ``numpy.load`` does). Part digests are verified the first time a part is read.

        Raises:
            StoreFormatError, StoreValidationError: a part was changed, swapped or truncated after it
                was written (the message names the file).
        """
        want = np.dtype(dtype or DTYPES[self.dtype])
        out = np.empty((self.num_rows, self.dim), dtype=want)
        pos = 0
        for part in self.parts:
            if part.embeddings_file is not None and want == np.dtype(DTYPES[self.dtype]) and part.rows:
                self._read_part_into(part, out[pos:pos + part.rows])
            else:
                for block in self._part_blocks(part, _BLOCK_ROWS):
                    out[pos:pos + len(block)] = block
                    pos += len(block)
                continue
            pos += part.rows
        if pos != self.num_rows:
            raise StoreFormatError(f"{self.path}: read {pos} rows, manifest says {self.num_rows}")
        return out

    def _read_part_into(self, part: PartInfo, dest: np.ndarray) -> None:
        """Copy a format-2 part's rows into ``dest`` (C-contiguous, store dtype), checking it."""
        rel = str(part.embeddings_file)
        header = self._check_npy(part)
        verify = not self._is_verified(rel, str(part.embeddings_sha256))
        with open(self.path / rel, "rb") as f:
            head = f.read(header)
            _readinto(f, dest, self.path / rel)
        for start in range(0, part.rows, _BLOCK_ROWS):
            self._sample_norms(dest[start:start + _BLOCK_ROWS], rel, start)
        if verify:
            h = hashlib.sha256(head)
            h.update(_bytes_view(dest))
            self._check_digest(rel, h.hexdigest(), str(part.embeddings_sha256))

    def embeddings_of(self, rows: Sequence[int] | np.ndarray, dtype: str | np.dtype | None = None) -> np.ndarray:
        """The embeddings of some rows, ``(len(rows), D)`` in ``dtype`` (store dtype by default), in the
        order given. Only the parts holding those rows are read (block by block, verified as any read),
        so one query row of a large store costs one part, not the store.

        Raises:
            StoreValidationError: a row number outside ``0 .. num_rows - 1``.
            StoreFormatError, StoreValidationError: a part read was changed after it was written.
        """
        want = np.dtype(dtype or DTYPES[self.dtype])
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), dtype=want)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise StoreValidationError(f"{self.path}: row numbers must lie in 0..{self.num_rows - 1}, got "
                                       f"{int(rows.min())}..{int(rows.max())}")
        starts = np.cumsum([0] + [p.rows for p in self.parts])
        part_of = np.searchsorted(starts, rows, side="right") - 1
        for i in np.unique(part_of):
            wanted = np.flatnonzero(part_of == i)
            local = rows[wanted] - starts[i]
            pos = 0
            for block in self.iter_part_embeddings(int(i), dtype=want):
                hit = (local >= pos) & (local < pos + len(block))
                out[wanted[hit]] = block[local[hit] - pos]
                pos += len(block)
        return out

    def iter_part_embeddings(
        self, index: int, block_rows: int = _BLOCK_ROWS, dtype: str | np.dtype | None = None
    ) -> Iterator[np.ndarray]:
        """Embeddings of part ``index`` (0-based, manifest order) as ``(<= block_rows, D)`` arrays in
        ``dtype`` (store dtype by default): RAM bounded by the block, any format version."""
        want = np.dtype(dtype or DTYPES[self.dtype])
        for block in self._part_blocks(self.parts[index], block_rows):
            yield block if block.dtype == want else block.astype(want)

    def keys(self) -> list[str]:
        """All keys as a list of N str, in row order."""
        return self.keys_array().to_pylist()

    def keys_array(self) -> pa.ChunkedArray:
        """All keys as a pyarrow string array (cheaper than :meth:`keys` for large stores)."""
        chunks = []
        for path in self._part_paths():
            chunks.extend(pq.read_table(path, columns=[KEY_COLUMN], memory_map=True).column(KEY_COLUMN).chunks)
        return pa.chunked_array(chunks, type=pa.string())

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Keys and metadata columns (all of them by default) as a pyarrow Table of N rows.

        Raises:
            StoreFormatError: an unknown column was asked for (the message lists the known ones).
        """
        cols = list(self.metadata_columns if columns is None else columns)
        unknown = [c for c in cols if c not in self.metadata_columns]
        if unknown:
            raise StoreFormatError(f"{self.path}: no metadata column(s) {unknown}; known: {self.metadata_columns}")
        tables = [pq.read_table(p, columns=[KEY_COLUMN, *cols], memory_map=True) for p in self._part_paths()]
        if not tables:
            return pa.schema([pa.field(KEY_COLUMN, pa.string())]).empty_table()
        return pa.concat_tables(tables)

    def iter_batches(
        self, batch_size: int = 65536, columns: Sequence[str] = (), dtype: str | np.dtype | None = None
    ) -> Iterator[Batch]:
        """Stream the store in batches of at most ``batch_size`` rows (RAM bounded by the batch).

        Yields :class:`Batch` with ``embeddings`` ``(n, D)`` in ``dtype`` (store dtype by default),
        ``keys`` and the requested metadata ``columns``. Part digests are verified on the way (an
        error is raised at the end of a part that was changed after it was written).
        """
        want = np.dtype(dtype or DTYPES[self.dtype])
        columns = list(columns)
        unknown = [c for c in columns if c not in self.metadata_columns]
        if unknown:
            raise StoreFormatError(f"{self.path}: no metadata column(s) {unknown}; known: {self.metadata_columns}")
        for part in self.parts:
            if part.rows == 0:
                continue
            pf = pq.ParquetFile(self._verified_parquet(part), memory_map=True)
            if part.embeddings_file is None:  # format 1: embeddings in the same file
                self._verify_file(part.file, part.sha256)
                start = 0
                for rb in pf.iter_batches(batch_size=batch_size, columns=[KEY_COLUMN, EMBEDDING_COLUMN, *columns]):
                    emb = np.ascontiguousarray(_chunk_matrix(rb.column(EMBEDDING_COLUMN), self.dim, part.file),
                                               dtype=want)
                    self._sample_norms(emb, part.file, start)
                    start += rb.num_rows
                    meta = pa.Table.from_batches([rb.select(columns)]) if columns else _EMPTY_TABLE
                    yield Batch(keys=rb.column(KEY_COLUMN).to_pylist(), embeddings=emb, metadata=meta)
                continue
            blocks = self._part_blocks(part, batch_size)
            pending = np.empty((0, self.dim), dtype=DTYPES[self.dtype])
            for rb in pf.iter_batches(batch_size=batch_size, columns=[KEY_COLUMN, *columns]):
                while len(pending) < rb.num_rows:
                    pending = np.concatenate([pending, next(blocks)]) if len(pending) else next(blocks)
                emb, pending = pending[:rb.num_rows], pending[rb.num_rows:]
                meta = pa.Table.from_batches([rb.select(columns)]) if columns else _EMPTY_TABLE
                yield Batch(keys=rb.column(KEY_COLUMN).to_pylist(),
                            embeddings=np.ascontiguousarray(emb, dtype=want), metadata=meta)
            for _ in blocks:  # the end of the part: digest check
                raise StoreFormatError(f"{self.path / str(part.embeddings_file)}: more rows than its Parquet part")

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """``(len(keys),) int64`` row numbers of ``keys``.

        Raises:
            StoreValidationError: a key is not in the store (named in the message).
        """
        idx = pc.index_in(pa.array(list(keys), pa.string()), value_set=self.keys_array().combine_chunks())
        if idx.null_count:
            missing = [k for k, i in zip(keys, idx.to_pylist(), strict=True) if i is None]
            raise StoreValidationError(f"{self.path}: {len(missing)} key(s) not in the store, e.g. {missing[:3]}")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)

    def failures(self) -> pa.Table:
        """The failures table (key, source, stage, error, time); empty when nothing failed."""
        path = self.path / FAILURES
        if not path.exists():
            return FAILURE_SCHEMA.empty_table()
        return pq.read_table(path)

    def clear_failures_of_source(self, source: str) -> None:
        """Drop failure records of ``source`` (used before re-encoding a source)."""
        with _lock(self.path):
            old = self.failures()
            if old.num_rows:
                mask = pc.not_equal(old.column("source"), pa.scalar(source))
                atomic_write_parquet(self.path / FAILURES, old.filter(mask))


def join_by_key(left: Store, right: Store) -> KeyJoin:
    """Join two stores by key (never by row order).

    Typical use: the shared modality encoded by both MCRs (CLIP text and CLAP text of the same
    captions). Keys present on one side only are returned in ``only_left`` / ``only_right``.
    """
    lk = left.keys_array().combine_chunks()
    rk = right.keys_array().combine_chunks()
    in_right = pc.index_in(lk, value_set=rk)
    mask = pc.is_valid(in_right)
    rows_left = np.flatnonzero(mask.to_numpy(zero_copy_only=False)).astype(np.int64)
    rows_right = in_right.filter(mask).to_numpy(zero_copy_only=False).astype(np.int64)
    keys = lk.filter(mask).to_pylist()
    only_left = lk.filter(pc.invert(mask)).to_pylist()
    only_right = rk.filter(pc.invert(pc.is_in(rk, value_set=lk))).to_pylist()
    return KeyJoin(keys=keys, rows_left=rows_left, rows_right=rows_right, only_left=only_left, only_right=only_right)


# ---------------------------------------------------------------------- helpers
def _compression(schema: pa.Schema) -> dict[str, str]:
    # Embeddings are float noise to a compressor; keys and metadata compress well.
    return {f.name: ("none" if f.name == EMBEDDING_COLUMN else "zstd") for f in schema}


def _chunk_matrix(chunk: pa.Array, dim: int, where: Any = None) -> np.ndarray:
    """Zero-copy ``(n, dim)`` view of one FixedSizeList chunk (honours slice offsets)."""
    if chunk.null_count:
        raise StoreFormatError(f"{where or 'embedding column'}: null embedding rows; every row needs an embedding")
    values = chunk.values.slice(chunk.offset * dim, len(chunk) * dim)
    return values.to_numpy(zero_copy_only=True).reshape(-1, dim)


def _embedding_matrix(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    if col.num_chunks == 1:
        return _chunk_matrix(col.chunk(0), dim)
    return np.concatenate([_chunk_matrix(c, dim) for c in col.chunks]) if col.num_chunks else np.empty((0, dim))


def _first_duplicate(keys: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    return None


def _file_id(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _digest_message(where: Path, digest: str, sha: str) -> str:
    return (f"{where}: sha256 {digest[:12]}… differs from the manifest's {sha[:12]}…; the file was changed or "
            f"swapped after it was written — restore it from a backup or re-create the store "
            f"(`cmcr store validate` checks every part)")


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` (format 1.0) header of a C-order array (magic, header dict, padding)."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        bio, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return bio.getvalue()


def _read_npy_header(f: Any, where: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of an open ``.npy`` file; never unpickles."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, SyntaxError) as e:
        raise StoreFormatError(f"{where}: not a readable .npy file ({e}); restore it or re-create the store") from e
    if dtype.hasobject:
        raise StoreFormatError(f"{where}: holds Python objects, not floats; restore it or re-create the store")
    return tuple(shape), bool(fortran), dtype, f.tell()


def _bytes_view(a: np.ndarray) -> memoryview:
    """Byte view of a C-contiguous array (no copy; works for empty arrays)."""
    if not a.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    return memoryview(a.reshape(-1).view(np.uint8))


def _readinto(f: Any, dest: np.ndarray, where: Any) -> None:
    """Fill C-contiguous ``dest`` with the next bytes of ``f`` (one read per 1 GiB)."""
    view = _bytes_view(dest)
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:pos + (1 << 30)])
        if not n:
            raise StoreFormatError(f"{where}: file ends early (truncated); restore it or re-create the store")
        pos += n


class NpyDigest:
    """The sha256 of the ``.npy`` bytes (header + data) of a C-contiguous ``(N, D)`` array, computed in
    a thread (hashlib releases the GIL), so that it overlaps the row checks and the file write.

    Start it as soon as the rows that will be written exist (:meth:`Store.append_part` does; ``store
    import`` starts it before its own row screen and hands it over). :meth:`covers` tells whether it
    is the digest of a given array (same memory, shape and dtype); :meth:`cancel` stops it early
    (within one 64 MiB block) when its rows will not be written.
    """

    _BLOCK = 64 << 20

    def __init__(self, emb: np.ndarray):
        import threading

        if not emb.flags.c_contiguous:
            raise ValueError("NpyDigest needs a C-contiguous array")
        self._emb = emb
        self._result: list[str] = []
        self._error: list[BaseException] = []
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cmcr-npy-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            h = hashlib.sha256(_npy_header(self._emb.shape, self._emb.dtype))
            data = _bytes_view(self._emb)
            for s in range(0, len(data), self._BLOCK):
                if self._cancelled.is_set():
                    return
                h.update(data[s:s + self._BLOCK])
            self._result.append(h.hexdigest())
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._error.append(e)

    def covers(self, emb: np.ndarray) -> bool:
        """Whether this is the digest of ``emb``'s bytes (the same memory, shape and dtype, C order)."""
        return (not self._cancelled.is_set() and emb.flags.c_contiguous and emb.shape == self._emb.shape
                and emb.dtype == self._emb.dtype
                and emb.__array_interface__["data"][0] == self._emb.__array_interface__["data"][0])

    def cancel(self) -> None:
        """Stop hashing (the rows will not be written); the digest is no longer usable."""
        self._cancelled.set()

    def wait(self) -> str:
        """Wait for the thread; the sha256 hex digest.

        Raises:
            RuntimeError: the digest was cancelled.
        """
        self._thread.join()
        if self._error:
            raise self._error[0]
        if self._cancelled.is_set():
            raise RuntimeError("NpyDigest was cancelled: its rows were not written")
        return self._result[0]


def _write_npy(path: Path, emb: np.ndarray, digest: NpyDigest | None = None) -> tuple[str, int]:
    """Write C-contiguous ``emb`` as a ``.npy`` atomically (temp file, fsync, rename). ``digest``:
    the sha256 of those bytes being computed in a thread (:class:`NpyDigest`; waited for after the
    write, which it overlaps), else computed here. Returns (sha256 hex, file size)."""
    header = _npy_header(emb.shape, emb.dtype)
    data = _bytes_view(np.ascontiguousarray(emb))
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if digest is None:
        h = hashlib.sha256(header)
        h.update(data)
        sha = h.hexdigest()
    else:
        sha = digest.wait()
    return sha, len(header) + len(data)


def _screen_rows(emb: np.ndarray, normalized: bool, tol: float) -> bool:
    """Fast pass over all rows in cache-sized blocks through one reused float32 buffer: True when
    every row is finite (a NaN/Inf anywhere makes its squared norm non-finite) and, for a
    normalised store, within half the norm tolerance. False sends the rows to the exact check."""
    n = len(emb)
    if n == 0:
        return True
    rows = 1024
    if emb.dtype == np.float16:
        return _screen_rows_f16(emb, normalized, tol, rows)
    buf = np.empty((min(rows, n), emb.shape[1]), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, n, rows):
            blk = emb[start:start + rows]
            b = buf[:len(blk)]
            b[...] = blk
            sq = np.einsum("ij,ij->i", b, b)
            if not np.isfinite(sq).all():
                return False
            if normalized and not (np.abs(np.sqrt(sq) - 1.0) <= tol * 0.5).all():
                return False
    return True


def _screen_rows_f16(emb: np.ndarray, normalized: bool, tol: float, rows: int) -> bool:
    """:func:`_screen_rows` for float16 rows without numpy's slow float16 -> float32 cast (3x
    faster): |x| is rebuilt as float32 from the bits with integer ops — exact for normal numbers;
    zeros and subnormals read as values below 6.1e-5, which moves a squared norm by less than
    2e-6 at D = 512 — and NaN/Inf (exponent bits all ones) become values >= 65536, which no finite
    float16 reaches. Anything the screen flags is decided by the exact check."""
    u = emb.view(np.uint16)
    buf = np.empty((min(rows, len(u)), u.shape[1]), dtype=np.uint32)
    for start in range(0, len(u), rows):
        blk = u[start:start + rows]
        b = buf[:len(blk)]
        np.bitwise_and(blk, 0x7FFF, out=b, casting="unsafe")
        np.left_shift(b, 13, out=b)
        b += np.uint32(0x38000000)  # rebias the exponent: 15 (float16) -> 127 (float32)
        # NaN/Inf (exponent bits all ones) read as >= 65536.0f, which no finite float16 reaches; in a
        # normalised store such a value makes the row's squared norm >= 2**32 and fails the norm test,
        # so the separate max pass is only needed without it
        if not normalized and int(b.max()) >= 0x47800000:
            return False
        if normalized:
            f = b.view(np.float32)
            sq = np.einsum("ij,ij->i", f, f)
            if not (np.abs(np.sqrt(sq) - 1.0) <= tol * 0.5).all():
                return False
    return True


def _check_rows(
    emb: np.ndarray, keys: Sequence[str], normalized: bool, tol: float, where: Any, first_row: int = 0
) -> None:
    """NaN/Inf and norm checks, vectorised (float32 arithmetic); a fast screen
    (:func:`_screen_rows`) passes clean rows, anything it flags is checked exactly, block by block.
    ``first_row`` is added to the row numbers in messages (``keys`` are those of ``emb``'s rows)."""
    if _screen_rows(emb, normalized, tol):
        return
    for start in range(0, len(emb), 65536):
        block = np.asarray(emb[start:start + 65536], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            i = start + int(np.flatnonzero(~finite)[0])
            raise StoreValidationError(
                f"{where}: row {first_row + i} (key {keys[i]!r}) holds NaN or Inf; drop or re-encode that input"
            )
        if normalized:
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            bad = np.abs(norms - 1.0) > tol
            if bad.any():
                i = start + int(np.flatnonzero(bad)[0])
                raise StoreValidationError(
                    f"{where}: row {first_row + i} (key {keys[i]!r}) has L2 norm {norms[i - start]:.6f}, "
                    f"but a cosine store "
                    f"needs unit rows (|norm - 1| <= {tol}); L2-normalise the embeddings first "
                    f"(`cmcr store import --normalize`)"
                )


_TYPE_ALIASES = {
    "string": pa.string(), "large_string": pa.large_string(), "int64": pa.int64(), "int32": pa.int32(),
    "double": pa.float64(), "float": pa.float32(), "bool": pa.bool_(), "halffloat": pa.float16(),
    "uint8": pa.uint8(), "int8": pa.int8(), "int16": pa.int16(), "uint16": pa.uint16(),
    "uint32": pa.uint32(), "uint64": pa.uint64(), "binary": pa.binary(), "date32[day]": pa.date32(),
}


def _type_from_string(s: str) -> pa.DataType:
    if s in _TYPE_ALIASES:
        return _TYPE_ALIASES[s]
    if s.startswith("list<item: ") and s.endswith(">"):
        return pa.list_(_type_from_string(s[len("list<item: "):-1]))
    if s.startswith("timestamp["):
        unit, _, tz = s[len("timestamp["):-1].partition(", tz=")
        return pa.timestamp(unit, tz or None)
    raise StoreFormatError(f"unsupported metadata column type {s!r} in the manifest")
