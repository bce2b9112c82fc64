"""The embedding store: Parquet parts + a JSON manifest + a failures table.

Layout of a store folder (format version 1, documented in ``docs/store-format.md``)::

    <store>/manifest.json                 written last, atomically (temp file + rename)
    <store>/parts/part-NNNNNN.parquet     key: string, embedding: fixed_size_list<float16|float32>[D],
                                          plus the store's metadata columns (same in every part)
    <store>/failures.parquet              key, source, stage, error, time: inputs that were rejected
    <store>/index/...                     FAISS index and its parameters (see :mod:`cmcr.stores.index`)
    <store>/.lock                         advisory lock held by writers (fcntl)

A part is visible only once the manifest lists it. A process killed in the middle of an append
leaves at most a temp file or an unlisted part file behind; both are ignored by readers and
removed by the next writer, and every part listed earlier stays intact.

Typical use::

    store = Store.create("out/img", modality="image", encoder={"family": "open_clip", ...}, dim=512)
    store.append_part(keys, emb, metadata={"label": labels}, source="shard-000000.tar")
    x = Store.open("out/img", modality="image").embeddings()      # (N, 512) float16, C-contiguous
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
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

FORMAT_NAME = "cmcr-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
FAILURES = "failures.parquet"
LOCK = ".lock"
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
#: Largest allowed | ||row|| - 1 | for rows of a normalised store, by storage dtype.
NORM_TOLERANCE = {"float16": 2e-3, "float32": 1e-4}
#: Tolerance applied to rows handed to :meth:`Store.append_part` (before the cast to the store dtype).
INPUT_NORM_TOLERANCE = 1e-3
ROW_GROUP_SIZE = 65536
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for identities and fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


#: Encoder-identity fields that never change the vectors; :func:`same_encoder` ignores them. Descriptive
#: fields (where embeddings were made, notes) and ``tokenizer`` (older CLAP stores recorded it in the
#: identity; text tokenization belongs to a text store's ``preprocessing``, and audio rows never depend
#: on it). A ``seed`` is ignored too unless ``weights`` is ``random``/``random:N``: pretrained weights
#: do not depend on a seed.
IDENTITY_IGNORED_FIELDS = ("tokenizer", "source", "tool", "tool_version", "library", "library_version", "note",
                           "notes", "description", "provenance", "created_by", "created_at", "url", "command")


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


def identity_fingerprint(identity: Mapping[str, Any]) -> str:
    """Short sha256 (16 hex chars) of an encoder identity or any JSON-able mapping."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_write_parquet(path: str | os.PathLike, table: pa.Table, **kwargs: Any) -> None:
    """Write a Parquet file atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    pq.write_table(table, tmp, **kwargs)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class PartInfo:
    """One Parquet part as listed in the manifest.

    Attributes:
        file: path relative to the store folder (``parts/part-000000.parquet``).
        rows: number of rows (0 is allowed: a source whose every sample failed).
        sha256: hex digest of the file.
        source: what the part was made from (input shard path, ``.npy`` file...), or ``None``.
    """

    file: str
    rows: int
    sha256: str
    source: str | None = None
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "sha256": self.sha256,
                "source": self.source, "created_at": self.created_at}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PartInfo:
        return cls(file=d["file"], rows=int(d["rows"]), sha256=d["sha256"],
                   source=d.get("source"), created_at=d.get("created_at", ""))


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
        now = _now()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
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
            validate: ``"fast"`` (manifest, part files present, schemas, row counts), ``"full"``
                (also sha256, NaN/Inf, norms, duplicate keys; reads every row) or ``"none"``.

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
        (and preprocessing, dtype...), create it if there is none.

        Raises:
            StoreMismatchError: a store made differently exists and ``overwrite`` is False.
        """
        path = Path(path)
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
                if not overwrite:
                    raise StoreMismatchError(f"{e} (pass --overwrite / overwrite=True to replace the store)") from e
                shutil.rmtree(path)
        return cls.create(path, modality=modality, encoder=encoder, dim=dim, **create_kwargs)

    # ------------------------------------------------------------------ properties
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
        body["parts"] = [p["sha256"] for p in self.manifest["parts"]]
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
            "bytes_on_disk": sum((self.path / p.file).stat().st_size for p in self.parts
                                 if (self.path / p.file).exists()),
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
        if m.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{where}: format_version {m.get('format_version')!r} is not supported by cmcr {__version__} "
                f"(supports {FORMAT_VERSION}); upgrade cmcr or re-create the store"
            )
        for name in ("modality", "encoder", "dim", "dtype", "normalized", "metric", "num_rows", "parts"):
            if name not in m:
                raise StoreFormatError(f"{where}: missing field {name!r}")
        if m["dtype"] not in DTYPES:
            raise StoreFormatError(f"{where}: dtype {m['dtype']!r} is not one of {sorted(DTYPES)}")
        total = sum(int(p["rows"]) for p in m["parts"])
        if total != int(m["num_rows"]):
            raise StoreFormatError(f"{where}: num_rows is {m['num_rows']} but the parts hold {total} rows")

    def _expected_schema(self) -> pa.Schema | None:
        cols = self.manifest.get("columns")
        if cols is None:
            return None
        fields = [pa.field(KEY_COLUMN, pa.string()),
                  pa.field(EMBEDDING_COLUMN, _embedding_type(self.dtype, self.dim))]
        fields += [pa.field(c["name"], _type_from_string(c["type"])) for c in cols]
        return pa.schema(fields)

    def _check_part_schema(self, part: PartInfo, schema: pa.Schema) -> None:
        where = self.path / part.file
        emb = schema.field(EMBEDDING_COLUMN).type if EMBEDDING_COLUMN in schema.names else None
        if KEY_COLUMN not in schema.names or emb is None:
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
            raise StoreFormatError(f"{where}: embedding dtype is {emb.value_type}, the store's dtype is {self.dtype}")
        expected = self._expected_schema()
        if expected is not None:
            found = [f"{f.name}:{f.type}" for f in schema if f.name not in RESERVED_COLUMNS]
            want = [f"{f.name}:{f.type}" for f in expected if f.name not in RESERVED_COLUMNS]
            if found != want:
                raise StoreFormatError(
                    f"{where}: metadata columns {found} differ from the store's columns {want}; "
                    f"every part of a store must have the same columns"
                )

    def _check_parts(self, full: bool) -> None:
        seen: set[str] = set()
        for part in self.parts:
            where = self.path / part.file
            if not where.exists():
                raise StoreFormatError(
                    f"{where}: part listed in the manifest is missing; restore it or re-create the store")
            try:
                meta = pq.read_metadata(where)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise StoreFormatError(f"{where}: not a readable Parquet file ({e})") from e
            self._check_part_schema(part, meta.schema.to_arrow_schema())
            if meta.num_rows != part.rows:
                raise StoreFormatError(f"{where}: holds {meta.num_rows} rows, the manifest says {part.rows}")
            if not full:
                continue
            digest = sha256_file(where)
            if digest != part.sha256:
                raise StoreValidationError(
                    f"{where}: sha256 {digest[:12]}… differs from the manifest's {part.sha256[:12]}…; "
                    f"the file was changed after it was written — restore it or re-create the store"
                )
            table = pq.read_table(where, columns=[KEY_COLUMN, EMBEDDING_COLUMN], memory_map=True)
            keys = table.column(KEY_COLUMN).to_pylist()
            _check_rows(_embedding_matrix(table.column(EMBEDDING_COLUMN), self.dim), keys, self.normalized,
                        NORM_TOLERANCE[self.dtype], where)
            for k in keys:
                if k in seen:
                    raise StoreValidationError(f"{where}: duplicate key {k!r} (keys must be unique in a store)")
                seen.add(k)

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

        Returns:
            The new :class:`PartInfo`.

        Raises:
            StoreValidationError: wrong shape, NaN/Inf, un-normalised rows in a normalised store,
                empty or duplicate keys, a source that already has a part (message names the row/key).
            StoreFormatError: metadata columns differ from the store's.
        """
        keys = [str(k) for k in keys]
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
        _check_rows(emb, keys, self.normalized, tol, f"{self.path} (rows being appended{origin})")
        for i, k in enumerate(keys):
            if not k:
                raise StoreValidationError(f"{self.path}: row {i} has an empty key; every row needs a unique key")
        if len(set(keys)) != n:
            dup = _first_duplicate(keys)
            raise StoreValidationError(f"{self.path}: key {dup!r} appears twice in the rows being appended")
        table = self._build_table(keys, np.ascontiguousarray(emb, dtype=DTYPES[self.dtype]), metadata)

        with _lock(self.path):
            self._reload()
            self._clean_leftovers()
            if source is not None and source in self.done_sources():
                raise StoreValidationError(
                    f"{self.path}: source {source!r} already has a part; skip it (a rerun resumes) or use --overwrite"
                )
            existing = self._keys_set()
            clash = next((k for k in keys if k in existing), None)
            if clash is not None:
                raise StoreValidationError(
                    f"{self.path}: key {clash!r} (row {keys.index(clash)} of the rows being appended"
                    f"{f' from {source}' if source else ''}) is already in the store; keys must be unique"
                )
            if self.manifest.get("columns") is None:
                self.manifest["columns"] = [
                    {"name": f.name, "type": str(f.type)} for f in table.schema if f.name not in RESERVED_COLUMNS
                ]
            index = max((int(_PART_RE.match(Path(p["file"]).name).group(1)) for p in self.manifest["parts"]),
                        default=-1) + 1
            rel = f"{PARTS_DIR}/part-{index:06d}.parquet"
            # float16 has at most 65536 values, so Parquet's dictionary encoding never falls back
            # to PLAIN for a float16 embedding column: encode it PLAIN (4x faster writes, 2-4x
            # faster reads), and skip its min/max statistics, which no reader uses
            others = [f.name for f in table.schema if f.name != EMBEDDING_COLUMN]
            atomic_write_parquet(self.path / rel, table, compression=_compression(table.schema),
                                 row_group_size=ROW_GROUP_SIZE, use_dictionary=others, write_statistics=others)
            part = PartInfo(file=rel, rows=n, sha256=sha256_file(self.path / rel), source=source, created_at=_now())
            if failures:
                self._merge_failures(failures, default_source=source)
            manifest = dict(self.manifest)
            manifest["parts"] = [*self.manifest["parts"], part.to_json()]
            manifest["num_rows"] = int(self.manifest["num_rows"]) + n
            manifest["updated_at"] = _now()
            atomic_write_json(self.path / MANIFEST, manifest)
            self.manifest = manifest
            existing.update(keys)
            self._key_set_rows = self.num_rows
        return part

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
        new = pa.table(rows, schema=FAILURE_SCHEMA)
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

    def _build_table(self, keys: list[str], emb: np.ndarray, metadata: Any) -> pa.Table:
        arrays = [pa.array(keys, pa.string()),
                  pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)]
        names = [KEY_COLUMN, EMBEDDING_COLUMN]
        if metadata is None:
            meta = pa.table({})
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
        expected = self._expected_schema()
        if expected is not None:
            want = [f for f in expected if f.name not in RESERVED_COLUMNS]
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
        listed = {Path(p["file"]).name for p in self.manifest["parts"]}
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

    # ------------------------------------------------------------------ reading
    def _part_paths(self) -> list[Path]:
        return [self.path / p.file for p in self.parts]

    def embeddings(self, dtype: str | np.dtype | None = None) -> np.ndarray:
        """All embeddings as one C-contiguous ``(N, D)`` array, in row order (parts in manifest order).

        Args:
            dtype: ``None`` for the store dtype (float16 by default), or e.g. ``np.float32``.
                Conversion happens chunk by chunk into the output (no extra full-size copy).

        Reads each Parquet chunk zero-copy and copies it once into a preallocated array.
        """
        out = np.empty((self.num_rows, self.dim), dtype=np.dtype(dtype or DTYPES[self.dtype]))
        pos = 0
        for path in self._part_paths():
            col = pq.read_table(path, columns=[EMBEDDING_COLUMN], memory_map=True).column(EMBEDDING_COLUMN)
            for chunk in col.chunks:
                m = _chunk_matrix(chunk, self.dim)
                out[pos:pos + len(m)] = m
                pos += len(m)
        if pos != self.num_rows:
            raise StoreFormatError(f"{self.path}: read {pos} rows, manifest says {self.num_rows}")
        return out

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
            return pa.table({KEY_COLUMN: pa.array([], pa.string())})
        return pa.concat_tables(tables)

    def iter_batches(
        self, batch_size: int = 65536, columns: Sequence[str] = (), dtype: str | np.dtype | None = None
    ) -> Iterator[Batch]:
        """Stream the store in batches of at most ``batch_size`` rows (RAM bounded by the batch).

        Yields :class:`Batch` with ``embeddings`` ``(n, D)`` in ``dtype`` (store dtype by default).
        """
        want = np.dtype(dtype or DTYPES[self.dtype])
        for path in self._part_paths():
            pf = pq.ParquetFile(path, memory_map=True)
            for rb in pf.iter_batches(batch_size=batch_size, columns=[KEY_COLUMN, EMBEDDING_COLUMN, *columns]):
                emb = np.ascontiguousarray(_chunk_matrix(rb.column(EMBEDDING_COLUMN), self.dim), dtype=want)
                meta = pa.Table.from_batches([rb.select(list(columns))]) if columns else pa.table({})
                yield Batch(keys=rb.column(KEY_COLUMN).to_pylist(), embeddings=emb, metadata=meta)

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


def _chunk_matrix(chunk: pa.Array, dim: int) -> np.ndarray:
    """Zero-copy ``(n, dim)`` view of one FixedSizeList chunk (honours slice offsets)."""
    if chunk.null_count:
        raise StoreFormatError("embedding column holds null rows; every row needs an embedding")
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


def _check_rows(emb: np.ndarray, keys: Sequence[str], normalized: bool, tol: float, where: Any) -> None:
    """NaN/Inf and norm checks, vectorised, in blocks of 65536 rows (float32 arithmetic)."""
    for start in range(0, len(emb), 65536):
        block = np.asarray(emb[start:start + 65536], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            i = start + int(np.flatnonzero(~finite)[0])
            raise StoreValidationError(
                f"{where}: row {i} (key {keys[i]!r}) holds NaN or Inf; drop or re-encode that input"
            )
        if normalized:
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            bad = np.abs(norms - 1.0) > tol
            if bad.any():
                i = start + int(np.flatnonzero(bad)[0])
                raise StoreValidationError(
                    f"{where}: row {i} (key {keys[i]!r}) has L2 norm {norms[i - start]:.6f}, but a cosine store "
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
