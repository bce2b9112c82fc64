"""Import embeddings made by any other model (ULIP, ImageBind, in-house...) as a store.

Two input layouts:

* ``.npy`` files holding ``(N, D)`` float rows (read with ``np.load(mmap_mode="r")``, so a file
  larger than RAM streams), plus keys (``--keys`` file: ``.txt`` one per line, ``.csv`` or
  ``.parquet`` with a key column) and optional metadata (``.csv``/``.parquet``, row-aligned with
  the ``.npy`` rows; a key column there must agree with the keys).
* ``.parquet`` files with a key column and an embedding column (``list<float>`` or
  ``fixed_size_list<float>[D]``, any float width); every other column becomes metadata (or
  the ones named). Read with ``ParquetFile.iter_batches``, so RAM stays bounded.

Rows are checked (width, NaN/Inf, unique non-empty keys, unit norm for a cosine store),
L2-normalised on request (``normalize=True``, recorded in the manifest as
``extra.import.normalized_on_import``) and written as store parts of ``part_rows`` rows.

Atomicity and resume: the store is built in ``<out>/../.<out name>.importing`` and renamed to
``<out>`` when complete, after it has been opened and checked. A killed import leaves that folder
behind; rerunning the same import resumes it, skipping parts already written (each part's
``source`` is ``<file>:<first row>-<end row>``). "The same import" is decided on content, not
paths: the resume signature holds the sha256 of every key and of the metadata table, and for each
input file its size, modification time and a digest of sampled blocks (``_sample_digest``), so a
keys file edited in place (even to the same size and time) starts the import over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from cmcr.errors import InputDataError, StoreError, StoreMismatchError, StoreValidationError
from cmcr.stores.files import claim_output, locks_output
from cmcr.stores.index import rows_progress
from cmcr.stores.store import (
    DTYPES,
    INPUT_NORM_TOLERANCE,
    MANIFEST,
    NpyDigest,
    Store,
    _screen_rows,
    canonical_json,
    comparable_identity,
)

log = logging.getLogger(__name__)

#: Target size of one part in the store dtype; parts never exceed ``MAX_PART_ROWS`` rows.
PART_BYTES = 512 * 1024**2
MAX_PART_ROWS = 1_000_000
_CHECK_BLOCK = 65536


@dataclass
class _Chunk:
    """Rows of one future part: ``emb`` (n, D) any float dtype, keys, metadata table, row offset."""

    file: Path
    start: int  # first row inside ``file``
    keys: list[str]
    emb: np.ndarray
    metadata: pa.Table | None


# ---------------------------------------------------------------------- small readers
def _read_table(path: Path, key_column: str | None = None) -> pa.Table:
    """Read a CSV or Parquet file as a table (a CSV key column is read as strings)."""
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            types = {key_column: pa.string()} if key_column else {}
            parse = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return pcsv.read_csv(path, parse_options=parse, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputDataError(f"{path}: cannot read ({e})") from e
    raise InputDataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")


def read_keys(path: str | os.PathLike, key_column: str = "key") -> list[str]:
    """Keys from ``.txt`` (one per line), ``.csv``/``.tsv`` or ``.parquet`` (column ``key_column``,
    or the only column).

    Raises:
        InputDataError: missing file or column (the message lists the columns found).
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.exists():
            raise InputDataError(f"{path}: file not found")
        return path.read_text().splitlines()
    table = _read_table(path, key_column)
    if key_column in table.column_names:
        col = table.column(key_column)
    elif table.num_columns == 1:
        col = table.column(0)
    else:
        raise InputDataError(
            f"{path}: no key column {key_column!r}; columns are {table.column_names} (pass --key-column NAME)"
        )
    return _keys_to_list(col, path)


def _keys_to_list(col: pa.ChunkedArray | pa.Array, where: Any) -> list[str]:
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputDataError(f"{where}: key of row {i} is empty (null); every row needs a unique key")
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    return col.to_pylist()


def _keys_array(col: pa.ChunkedArray, where: Any) -> pa.ChunkedArray:
    """Keys as a string ChunkedArray (no Python objects); null keys are an error naming the row."""
    if col.null_count:
        _keys_to_list(col, where)  # raises, naming the row
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return col


def _check_keys(keys: Sequence[str], where: Any) -> None:
    """Keys must be non-empty and unique; the row-by-row scan only runs to name the offending row."""
    distinct = set(keys)
    if len(distinct) == len(keys) and "" not in distinct:
        return
    del distinct
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if not k:
            raise InputDataError(f"{where}: key of row {i} is empty; every row needs a unique key")
        j = seen.setdefault(k, i)
        if j != i:
            raise InputDataError(f"{where}: duplicate key {k!r} at rows {j} and {i}; keys must be unique")


def _embedding_width(field: pa.Field, path: Path, sample: pa.ChunkedArray | None) -> int:
    t = field.type
    if pa.types.is_fixed_size_list(t):
        if not pa.types.is_floating(t.value_type):
            raise InputDataError(f"{path}: column {field.name!r} holds {t.value_type}, expected floats")
        return int(t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not pa.types.is_floating(t.value_type):
            raise InputDataError(f"{path}: column {field.name!r} holds {t.value_type}, expected floats")
        lengths = pc.list_value_length(sample).drop_null() if sample is not None else pa.array([])
        if len(lengths) == 0:
            raise InputDataError(f"{path}: column {field.name!r} has no non-null rows to read the dim from")
        return int(lengths[0].as_py())
    raise InputDataError(
        f"{path}: column {field.name!r} has type {t}; expected list<float> or fixed_size_list<float>[D]"
    )


def _list_matrix(col: pa.Array | pa.ChunkedArray, dim: int, path: Path, first_row: int, keys: list[str]) -> np.ndarray:
    """``(n, dim)`` float matrix of a list / fixed-size-list column; errors name the file row."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputDataError(f"{path}: row {first_row + i} (key {keys[i]!r}) has no embedding (null)")
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != dim:
            raise InputDataError(f"{path}: embeddings have {col.type.list_size} values, expected {dim}")
        values = col.values.slice(col.offset * dim, len(col) * dim)
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            i = int(bad[0])
            raise InputDataError(
                f"{path}: row {first_row + i} (key {keys[i]!r}) has {lengths[i]} values, expected {dim} "
                f"(every embedding of a store has the same dim)"
            )
        values = col.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


# ---------------------------------------------------------------------- row checks
def _clean_rows(
    chunk: _Chunk, *, dtype: np.dtype, normalize: bool, need_unit: bool, skip_bad_rows: bool
) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Check / normalise / cast one chunk in blocks. Returns (rows in ``dtype``, kept indices, failures).

    Fast path (no ``normalize``): one cast into the output and a screen of the rows
    (:func:`cmcr.stores.store._screen_rows`); only a chunk the screen flags goes through the
    row-by-row diagnosis below.
    """
    n, dim = chunk.emb.shape
    if not normalize and chunk.emb.dtype == dtype and chunk.emb.flags.c_contiguous:
        rows = np.asarray(chunk.emb)  # no copy: a view of the (memory-mapped) input rows
        ok = _screen_rows(rows, True, INPUT_NORM_TOLERANCE) if need_unit else _screen_rows(rows, False, 0.0)
        if ok:
            return rows, list(range(n)), []
    out = np.empty((n, dim), dtype=dtype)
    if not normalize:
        with np.errstate(over="ignore", invalid="ignore"):
            out[...] = chunk.emb  # one cast (a plain copy when the dtypes match)
        # unit rows cannot overflow float16; otherwise screen the cast rows (NaN, Inf, overflow)
        if _screen_rows(chunk.emb, True, INPUT_NORM_TOLERANCE) if need_unit else _screen_rows(out, False, 0.0):
            return out, list(range(n)), []
    bad: dict[int, str] = {}
    for s in range(0, n, _CHECK_BLOCK):
        block = np.array(chunk.emb[s:s + _CHECK_BLOCK], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        norms = np.sqrt(np.einsum("ij,ij->i", np.where(finite[:, None], block, 0), np.where(finite[:, None], block, 0)))
        problems: dict[int, str] = {}
        for i in np.flatnonzero(~finite):
            problems[int(i)] = "holds NaN or Inf"
        if normalize:
            for i in np.flatnonzero(finite & (norms == 0)):
                problems[int(i)] = "is all zeros and cannot be L2-normalised"
            block /= np.where(norms > 0, norms, 1)[:, None]
        elif need_unit:
            for i in np.flatnonzero(finite & (np.abs(norms - 1) > INPUT_NORM_TOLERANCE)):
                problems[int(i)] = (f"has L2 norm {norms[i]:.6f}, but a cosine store needs unit rows; "
                                    f"pass --normalize (normalize=True) to L2-normalise on import")
        cast = block.astype(dtype)
        if dtype == np.float16:
            for i in np.flatnonzero(finite & ~np.isfinite(cast).all(axis=1)):
                problems[int(i)] = "overflows float16 (|value| > 65504); import with --dtype float32"
        out[s:s + len(block)] = cast
        for i, why in problems.items():
            bad[s + i] = why
    failures: list[dict[str, str]] = []
    if bad:
        first = min(bad)
        if not skip_bad_rows:
            raise StoreValidationError(
                f"{chunk.file}: row {chunk.start + first} (key {chunk.keys[first]!r}) {bad[first]} "
                f"({len(bad)} bad row(s) in rows {chunk.start}-{chunk.start + n - 1}); fix the input or pass "
                f"--skip-bad-rows to record them in the failures table"
            )
        for i in sorted(bad):
            failures.append({"key": chunk.keys[i], "source": str(chunk.file), "stage": "import",
                             "error": f"row {chunk.start + i} {bad[i]}"})
    keep = [i for i in range(n) if i not in bad]
    return out, keep, failures


# ---------------------------------------------------------------------- chunk producers
def _npy_shape(path: Path) -> tuple[np.ndarray, int, int]:
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputDataError(f"{path}: not a readable .npy file ({e})") from e
    if arr.ndim != 2:
        raise InputDataError(f"{path}: expected a 2-D (N, D) array, found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputDataError(f"{path}: expected float rows, found dtype {arr.dtype}")
    return arr, int(arr.shape[0]), int(arr.shape[1])


def _npy_chunks(
    files: list[Path], keys: list[str], metadata: pa.Table | None, part_rows: int
) -> Iterator[_Chunk]:
    offset = 0
    for path in files:
        arr, n, _ = _npy_shape(path)
        for s in range(0, n, part_rows):
            e = min(n, s + part_rows)
            meta = metadata.slice(offset + s, e - s) if metadata is not None else None
            yield _Chunk(file=path, start=s, keys=keys[offset + s:offset + e], emb=arr[s:e], metadata=meta)
        offset += n


def _parquet_chunks(
    files: list[Path], *, key_column: str | None, embedding_column: str, meta_columns: list[str], dim: int,
    part_rows: int, batch_rows: int = 65536,
) -> Iterator[_Chunk]:
    for path in files:
        pf = pq.ParquetFile(path)
        cols = [c for c in [key_column, embedding_column, *meta_columns] if c]
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        start = 0

        def flush(batches: list[pa.RecordBatch], first: int, path: Path = path) -> _Chunk:
            table = pa.Table.from_batches(batches)
            n = table.num_rows
            keys = (_keys_to_list(table.column(key_column), f"{path} (rows {first}-{first + n - 1})")
                    if key_column else [f"{path.stem}/{first + i}" for i in range(n)])
            emb = _list_matrix(table.column(embedding_column), dim, path, first, keys)
            meta = table.select(meta_columns) if meta_columns else None
            return _Chunk(file=path, start=first, keys=keys, emb=emb, metadata=meta)

        for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
            pending.append(rb)
            pending_rows += rb.num_rows
            while pending_rows >= part_rows:
                table_rows = pa.Table.from_batches(pending)
                head = table_rows.slice(0, part_rows).to_batches()
                tail = table_rows.slice(part_rows).to_batches()
                yield flush(head, start)
                start += part_rows
                pending, pending_rows = tail, pending_rows - part_rows
        if pending_rows:
            yield flush(pending, start)


# ---------------------------------------------------------------------- the import
#: ``_sample_digest`` reads the head, the tail and this many evenly spaced blocks of a file.
_SAMPLE_BLOCKS = 64
_SAMPLE_BYTES = 1 << 16


def _sample_digest(path: Path) -> str:
    """sha256 of a file's size, first and last MiB and ``_SAMPLE_BLOCKS`` evenly spaced 64 KiB
    blocks (whole files up to 8 MiB): cheap on GB inputs, and any swap or rewrite of the content
    that shows in those bytes changes it."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 8 << 20:
            h.update(f.read())
        else:
            offsets = [0, *(int(size * i / (_SAMPLE_BLOCKS + 1)) for i in range(1, _SAMPLE_BLOCKS + 1))]
            for off in offsets:
                f.seek(off)
                h.update(f.read(1 << 20 if off == 0 else _SAMPLE_BYTES))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()


def _signature(files: list[Path], options: Mapping[str, Any]) -> str:
    """Resume key of an import: its options (with content digests of keys and metadata) and, per
    input file, size, mtime (ns) and sampled digest."""
    body = {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, _sample_digest(f)) for f in files],
            "options": options}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:16]


def _keys_digest(keys: Sequence[str] | None) -> str | None:
    """Content digest of a key list (order matters)."""
    if keys is None:
        return None
    h = hashlib.sha256()
    for s in range(0, len(keys), 1 << 20):  # "\n".join(keys) + "\n", in blocks (bounded memory)
        h.update(("\n".join(keys[s:s + (1 << 20)]) + "\n").encode())
    return "sha256:" + h.hexdigest()


def _table_digest(table: pa.Table | None) -> str | None:
    """Content digest of a metadata table (its Arrow IPC stream)."""
    if table is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return "sha256:" + hashlib.sha256(sink.getvalue()).hexdigest()


def _expand_sources(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted([*p.glob("*.parquet"), *p.glob("*.npy")])
            if not found:
                raise InputDataError(f"{p}: folder holds no .npy or .parquet files")
            files.extend(found)
        elif not p.exists():
            raise InputDataError(f"{p}: file not found")
        else:
            files.append(p)
    if not files:
        raise InputDataError("no input files given; pass .npy or .parquet files (or a folder of them)")
    kinds = {f.suffix.lower() for f in files}
    if not kinds <= {".npy", ".parquet"}:
        raise InputDataError(f"unsupported input type(s) {sorted(kinds - {'.npy', '.parquet'})}: use .npy or .parquet")
    if len(kinds) > 1:
        raise InputDataError("mix of .npy and .parquet inputs; import them into separate calls (or convert one)")
    return files


def _import_provenance(modality: str, encoder: Mapping[str, Any], dtype: str, metric: str,
                       record: Mapping[str, Any]) -> dict[str, Any]:
    """What an imported store is derived from (compared by :func:`import_embeddings` before it reuses one)."""
    return {"modality": modality, "encoder": comparable_identity(encoder), "dtype": dtype, "metric": metric,
            **{k: record.get(k) for k in ("sources", "keys_sha256", "metadata_sha256", "normalized_on_import",
                                          "signature")}}


def _recorded_import(out: Path) -> dict[str, Any] | None:
    """The provenance of the store at ``out`` as :func:`_import_provenance` (``None``: no store there)."""
    if not (out / MANIFEST).exists():
        return None
    try:
        m = Store.open(out, validate="none").manifest
    except StoreError as e:
        return {"unreadable store": str(e)}
    record = (m.get("extra") or {}).get("import") or {}
    return _import_provenance(m.get("modality"), m.get("encoder") or {}, m.get("dtype"), m.get("metric"), record)


@dataclass
class ImportPlan:
    """What :func:`plan_import` found out about an import before writing anything (shapes, keys,
    metadata, options) and its provenance (compared by the output claim)."""

    files: list[Path]
    is_npy: bool
    dim: int
    total: int
    key_list: list[str]
    meta_table: pa.Table | None
    meta_cols: list[str]
    identity: dict[str, Any]
    part_rows: int
    signature: str
    import_record: dict[str, Any]
    provenance: dict[str, Any]


def plan_import(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    out: Path,
    *,
    modality: str,
    encoder: Mapping[str, Any],
    normalize: bool = False,
    keys: str | os.PathLike | Sequence[str] | None = None,
    key_column: str = "key",
    metadata: str | os.PathLike | pa.Table | None = None,
    metadata_columns: Sequence[str] | None = None,
    embedding_column: str = "embedding",
    row_keys: bool = False,
    dtype: str = "float16",
    metric: str = "cosine",
    preprocessing: Mapping[str, Any] | None = None,
    part_rows: int | None = None,
    skip_bad_rows: bool = False,
) -> ImportPlan:
    """Plan step of :func:`import_embeddings` (same arguments): read the inputs' shapes, keys and
    metadata (cheap), check them, and work out the options, the resume signature and the provenance.
    Nothing is written.

    Raises:
        InputDataError, StoreError: as :func:`import_embeddings`.
    """
    files = _expand_sources(sources)
    is_npy = files[0].suffix.lower() == ".npy"
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists and is not a store; choose an empty or new folder")
    if dtype not in DTYPES:
        raise InputDataError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    meta_cols_wanted = list(metadata_columns) if metadata_columns is not None else None

    # -- discover dim, keys, metadata (cheap: shapes, key columns)
    meta_table: pa.Table | None = None
    key_list: list[str] = []
    meta_cols: list[str] = []
    if is_npy:
        shapes = [(f, *_npy_shape(f)[1:]) for f in files]
        dims = {d for _, _, d in shapes}
        if len(dims) > 1:
            raise InputDataError("input .npy files differ in width: " +
                                 ", ".join(f"{f.name}: {d}" for f, _, d in shapes) + "; they must share one dim")
        dim = dims.pop()
        total = sum(n for _, n, _ in shapes)
        where_rows = " + ".join(f"{f.name} ({n})" for f, n, _ in shapes)
        if metadata is not None:
            meta_table = metadata if isinstance(metadata, pa.Table) else _read_table(Path(metadata), key_column)
            if meta_table.num_rows != total:
                raise InputDataError(
                    f"{metadata if not isinstance(metadata, pa.Table) else 'metadata'}: {meta_table.num_rows} rows, "
                    f"but the embeddings have {total} rows ({where_rows}); metadata needs one row per embedding"
                )
        if keys is not None:
            key_list = read_keys(keys, key_column) if isinstance(keys, (str, os.PathLike)) else [str(k) for k in keys]
            key_src = str(keys) if isinstance(keys, (str, os.PathLike)) else "keys"
        elif meta_table is not None and key_column in meta_table.column_names:
            key_list = _keys_to_list(meta_table.column(key_column), metadata)
            key_src = str(metadata)
        elif row_keys:
            key_list = [f"{f.stem}/{i}" for f, n, _ in shapes for i in range(n)]
            key_src = "row numbers"
        else:
            raise InputDataError(
                "no keys for the .npy rows: pass --keys FILE (.txt/.csv/.parquet), a --metadata file with a "
                f"{key_column!r} column, or --row-keys to use '<file stem>/<row>'"
            )
        if len(key_list) != total:
            raise InputDataError(
                f"{key_src}: {len(key_list)} keys, but the embeddings have {total} rows ({where_rows}); "
                f"there must be exactly one key per row"
            )
        _check_keys(key_list, key_src)
        if meta_table is not None:
            if key_column in meta_table.column_names and keys is not None:
                mk = _keys_to_list(meta_table.column(key_column), metadata)
                diff = next((i for i, (a, b) in enumerate(zip(mk, key_list, strict=True)) if a != b), None)
                if diff is not None:
                    raise InputDataError(
                        f"{metadata}: row {diff} has key {mk[diff]!r} but {key_src} has {key_list[diff]!r}; "
                        f"metadata rows must be in the same order as the embeddings"
                    )
            available = [c for c in meta_table.column_names if c != key_column]
            meta_cols = available if meta_cols_wanted is None else meta_cols_wanted
            missing = [c for c in meta_cols if c not in available]
            if missing:
                raise InputDataError(f"{metadata}: no column(s) {missing}; columns are {meta_table.column_names}")
            meta_table = meta_table.select(meta_cols) if meta_cols else None
        elif meta_cols_wanted:
            raise InputDataError("--metadata-column given without a --metadata file")
    else:
        if keys is not None or metadata is not None:
            raise InputDataError("--keys / --metadata apply to .npy inputs; Parquet inputs carry their own columns")
        dim = None
        schema_cols: list[str] | None = None
        key_chunks: list[pa.Array] = []
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise InputDataError(f"{f}: not a readable Parquet file ({e})") from e
            schema = pf.schema_arrow
            if embedding_column not in schema.names:
                raise InputDataError(
                    f"{f}: no embedding column {embedding_column!r}; columns are {schema.names} "
                    f"(pass --embedding-column NAME)"
                )
            if not row_keys and key_column not in schema.names:
                raise InputDataError(
                    f"{f}: no key column {key_column!r}; columns are {schema.names} "
                    f"(pass --key-column NAME, or --row-keys)"
                )
            sample = None
            if not pa.types.is_fixed_size_list(schema.field(embedding_column).type) and pf.metadata.num_rows:
                sample = next(pf.iter_batches(batch_size=64, columns=[embedding_column])).column(0)
            d = _embedding_width(schema.field(embedding_column), f, sample)
            if dim is not None and d != dim:
                raise InputDataError(f"{f}: embeddings have {d} values, {files[0]} has {dim}; they must share one dim")
            dim = d
            others = [c for c in schema.names if c not in (embedding_column, key_column)]
            cols = others if meta_cols_wanted is None else meta_cols_wanted
            missing = [c for c in cols if c not in schema.names]
            if missing:
                raise InputDataError(f"{f}: no column(s) {missing}; columns are {schema.names}")
            if schema_cols is not None and cols != schema_cols:
                raise InputDataError(f"{f}: metadata columns {cols} differ from {files[0]}'s {schema_cols}")
            schema_cols = cols
            if not row_keys:
                key_chunks.extend(_keys_array(pq.read_table(f, columns=[key_column]).column(key_column), f).chunks)
        if not row_keys:
            all_keys = pa.chunked_array(key_chunks, type=pa.string())
            # vectorised check first; the Python scan only runs to name the offending rows
            if pc.count_distinct(all_keys).as_py() != len(all_keys) or pc.any(pc.equal(all_keys, "")).as_py():
                _check_keys(all_keys.to_pylist(), " + ".join(str(f) for f in files))
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        meta_cols = schema_cols or []
        del key_chunks
    assert dim is not None

    identity = dict(encoder)
    if "dim" in identity and int(identity["dim"]) != dim:
        raise InputDataError(f"encoder identity says dim {identity['dim']}, the embeddings have {dim} values per row")
    identity.setdefault("dim", dim)
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    part_rows = int(part_rows or max(1, min(MAX_PART_ROWS, PART_BYTES // (dim * itemsize))))
    options = {"modality": modality, "encoder": identity, "normalize": normalize, "dtype": dtype, "metric": metric,
               "keys": str(keys) if isinstance(keys, (str, os.PathLike)) else None,
               "keys_sha256": _keys_digest(key_list) if is_npy else None,
               "key_column": key_column, "metadata": str(metadata) if isinstance(metadata, (str, os.PathLike))
               else None, "metadata_sha256": _table_digest(meta_table),
               "metadata_columns": meta_cols, "embedding_column": embedding_column,
               "row_keys": row_keys, "part_rows": part_rows, "skip_bad_rows": skip_bad_rows,
               "preprocessing": dict(preprocessing or {})}
    signature = _signature(files, options)
    import_record = {"sources": [str(f) for f in files], "normalized_on_import": bool(normalize),
                     "keys": options["keys"] or options["keys_sha256"], "keys_sha256": options["keys_sha256"],
                     "metadata": options["metadata"], "metadata_sha256": options["metadata_sha256"],
                     "signature": signature}
    provenance = _import_provenance(modality, identity, dtype, metric, import_record)
    return ImportPlan(files=files, is_npy=is_npy, dim=dim, total=total, key_list=key_list, meta_table=meta_table,
                      meta_cols=meta_cols, identity=identity, part_rows=part_rows, signature=signature,
                      import_record=import_record, provenance=provenance)


def execute_import(
    plan: ImportPlan,
    out: Path,
    *,
    modality: str,
    normalize: bool,
    key_column: str,
    embedding_column: str,
    row_keys: bool,
    dtype: str,
    metric: str,
    preprocessing: Mapping[str, Any] | None,
    skip_bad_rows: bool,
    progress: bool,
    command: str | None,
) -> Path:
    """Execute step of :func:`import_embeddings`: write the rows into the temp store beside ``out``
    (``.<name>.importing``; a rerun of the same import resumes it), one part per chunk; returns it.

    Raises:
        StoreValidationError: bad rows (without ``skip_bad_rows``), or every row rejected.
    """
    files, is_npy, dim, total = plan.files, plan.is_npy, plan.dim, plan.total
    key_list, meta_table, meta_cols, identity = plan.key_list, plan.meta_table, plan.meta_cols, plan.identity
    part_rows, signature, import_record = plan.part_rows, plan.signature, plan.import_record
    # -- build in a temp store folder next to ``out`` (resumable), rename when complete
    tmp = out.parent / f".{out.name}.importing"
    store: Store | None = None
    if (tmp / MANIFEST).exists():
        try:
            store = Store.open(tmp, validate="fast")
            if (store.manifest.get("extra") or {}).get("import", {}).get("signature") != signature:
                raise StoreError("different import")
            log.info("resuming the import in %s (%d rows already written)", tmp, store.num_rows)
        except StoreError:
            shutil.rmtree(tmp)
            store = None
    elif tmp.exists():
        shutil.rmtree(tmp)
    if store is None:
        store = Store.create(tmp, modality=modality, encoder=identity, dim=dim, dtype=dtype,
                             normalized=metric == "cosine" or normalize, metric=metric,
                             preprocessing=preprocessing, extra={"import": import_record}, command=command)
    done = store.done_sources()
    need_unit = store.normalized
    chunks = (_npy_chunks(files, key_list, meta_table, part_rows) if is_npy else
              _parquet_chunks(files, key_column=None if row_keys else key_column,
                              embedding_column=embedding_column, meta_columns=meta_cols, dim=dim,
                              part_rows=part_rows))
    with rows_progress(progress) as bar:
        task = bar.add_task(f"importing into {out.name}", total=total)
        for chunk in chunks:
            n = len(chunk.keys)
            source = f"{chunk.file}:{chunk.start}-{chunk.start + n}"
            if source in done:
                bar.advance(task, n)
                continue
            # rows already in the store dtype (a memory-mapped .npy) are written as they are: their
            # .npy digest starts now, overlapping the row screen and the write (append_part uses it
            # only if these very rows are written)
            digest = (NpyDigest(chunk.emb) if store.version >= 2 and not normalize and chunk.emb.flags.c_contiguous
                      and chunk.emb.dtype == np.dtype(DTYPES[dtype]) else None)
            try:
                rows, keep, failures = _clean_rows(chunk, dtype=np.dtype(DTYPES[dtype]), normalize=normalize,
                                                   need_unit=need_unit, skip_bad_rows=skip_bad_rows)
                meta = chunk.metadata
                kept_keys = chunk.keys
                if len(keep) != n:
                    take = np.asarray(keep, dtype=np.int64)
                    rows = rows[take]
                    meta = meta.take(pa.array(take)) if meta is not None else None
                    kept_keys = [chunk.keys[i] for i in keep]
                # _clean_rows checked these rows; plan_import checked every key of the import (non-empty,
                # unique) and this temp store holds only keys of this import (a resume needs the same
                # keys digest), so the part's keys cannot repeat
                store.append_part(kept_keys, rows, metadata=meta, source=source, failures=failures,
                                  check_rows=False, check_keys=False, digest=digest)
            except BaseException:
                if digest is not None:
                    digest.cancel()  # the rows were not written: stop hashing them
                raise
            bar.advance(task, n)
    if store.num_rows == 0 and total:
        raise StoreValidationError(f"every row of {[str(f) for f in files]} was rejected; see {tmp}/failures.parquet")

    return tmp


def publish_import(tmp: Path, out: Path) -> Store:
    """Publish step of :func:`import_embeddings`: the finished temp store ``tmp`` becomes ``out``
    (replacing a store there only now, when the new one is complete)."""
    # the finished temp store must open (manifest, schemas, sizes) before it becomes ``out``
    Store.open(tmp, validate="fast")
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return Store.open(out)


@locks_output("out", beside=True)
def import_embeddings(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    modality: str,
    encoder: Mapping[str, Any],
    normalize: bool = False,
    keys: str | os.PathLike | Sequence[str] | None = None,
    key_column: str = "key",
    metadata: str | os.PathLike | pa.Table | None = None,
    metadata_columns: Sequence[str] | None = None,
    embedding_column: str = "embedding",
    row_keys: bool = False,
    dtype: str = "float16",
    metric: str = "cosine",
    preprocessing: Mapping[str, Any] | None = None,
    part_rows: int | None = None,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Store:
    """Build a store at ``out`` from embeddings of another model.

    Steps: :func:`plan_import` (read shapes, keys, metadata; nothing written) -> claim ``out``
    (:func:`~cmcr.stores.files.claim_output`: the same import is reused) -> :func:`execute_import`
    (rows into a resumable temp store beside ``out``) -> :func:`publish_import` (rename onto ``out``).

    Args:
        sources: ``.npy`` files ``(N_i, D)`` (rows concatenated in the given order), or ``.parquet``
            files with ``key_column`` and ``embedding_column``, or folders of them.
        out: the store folder to create.
        modality: ``3d``, ``image``, ``text``, ``audio``, ``video``...
        encoder: model identity, at least ``family`` (e.g. ``{"family": "ulip2", "architecture":
            "PointBERT", "weights": "ULIP-2-PointBERT-...pt"}``). ``dim`` is added from the data if
            absent and must match it if present. Use the same identity for every modality of one model.
        normalize: L2-normalise rows (recorded as ``extra.import.normalized_on_import``). Without
            it a cosine store refuses rows whose norm is not 1 (within 1e-3).
        keys: for ``.npy`` inputs: a ``.txt``/``.csv``/``.parquet`` keys file or a list of N keys.
            When absent, the keys come from ``metadata``'s ``key_column``.
        key_column: key column of the keys / metadata / Parquet input files.
        metadata: for ``.npy`` inputs: ``.csv``/``.parquet`` (or a table) with one row per
            embedding, in the same order.
        metadata_columns: metadata columns to keep (default: every column but key / embedding).
        embedding_column: embedding column of Parquet inputs.
        row_keys: no keys available: use ``<file stem>/<row>`` as keys (stable only while the
            files do not change).
        dtype: storage dtype ``float16`` (default) or ``float32``.
        metric: ``cosine`` (unit rows) or ``inner_product`` / ``l2`` (rows stored as given).
        preprocessing: preprocessing the source model used (recorded; e.g. ``{"points": 10000}``).
        part_rows: rows per part (default: ~512 MiB per part, at most 1,000,000 rows).
        skip_bad_rows: record NaN/Inf, zero or un-normalised rows in the failures table instead of
            stopping.
        overwrite: start over: import anew and replace the store at ``out``, whatever it holds (only once
            the new one is complete). Without it, a store made by the same import (same files, options,
            key and metadata digests) is returned as is, and any other store is refused.
        progress: show a rich progress bar.
        command: the command line (provenance).

    Returns:
        The new :class:`Store` (opened at ``out``).

    Raises:
        InputDataError: unreadable inputs, missing columns, wrong dims, key count mismatch,
            duplicate or empty keys (messages name the file and row).
        StoreValidationError: NaN/Inf or un-normalised rows (file, row and key named).
        StoreMismatchError: ``out`` holds a store made by another import (or not by an import) and
            ``overwrite`` is False; the message names the fields that differ.
        StoreError: ``out`` is a non-empty folder that is not a store.
    """
    out = Path(out)
    plan = plan_import(sources, out, modality=modality, encoder=encoder, normalize=normalize, keys=keys,
                       key_column=key_column, metadata=metadata, metadata_columns=metadata_columns,
                       embedding_column=embedding_column, row_keys=row_keys, dtype=dtype, metric=metric,
                       preprocessing=preprocessing, part_rows=part_rows, skip_bad_rows=skip_bad_rows)
    with claim_output(out, kind="store", provenance=plan.provenance, overwrite=overwrite, recorded=_recorded_import,
                      error=StoreMismatchError, clear=False, beside=True) as claim:
        if claim.reuse:  # the same import, finished earlier: nothing to do
            return Store.open(out)
    tmp = execute_import(plan, out, modality=modality, normalize=normalize, key_column=key_column,
                         embedding_column=embedding_column, row_keys=row_keys, dtype=dtype, metric=metric,
                         preprocessing=preprocessing, skip_bad_rows=skip_bad_rows, progress=progress,
                         command=command)
    return publish_import(tmp, out)
