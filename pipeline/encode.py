"""The encode loop behind ``cmcr encode``: webdataset shards -> one store part per shard.

Per-shard work is split into reusable functions (a Ray Data engine can call them per block):

* :func:`iter_shard_samples` — read a shard's samples (``{"__key__", ext: bytes, ...}``);
* :func:`prepare_sample` / :func:`prepare_batch` — pick the payload, decode + preprocess on the CPU
  (one bad sample becomes a failure record, never an exception);
* :func:`embed_items` — one forward pass on the device; if the batch fails, each sample is retried
  alone so that only the bad one fails; non-finite rows become failures;
* :func:`metadata_table` — the fixed per-modality metadata columns (:data:`METADATA_SCHEMAS`);
* :func:`write_part` — append the shard's rows and failures to the store atomically;
* :func:`finish_shard` — write a complete shard's part (or record its read failure), count it;
* :func:`encode_shard` — all of the above for one shard in one process.

:func:`encode_shards` runs them with a torch DataLoader: workers read every shard and each
decodes/preprocesses and collates a stride of its batches (batch ``b`` goes to worker
``b % num_workers``), so even a single shard keeps all workers busy; the main process embeds
batches as they arrive and writes a shard's part once all its batches are in (rows in shard order,
independent of the number of workers). Finished parts are skipped on a rerun
(``Store.done_sources``, matched by :func:`shard_identity`, i.e. file name + content digest, so a
moved shard folder still resumes); the part of a shard killed midway is simply never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset

from cmcr.errors import ConfigError, EncoderError, InputDataError, StoreMismatchError, StoreValidationError
from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.corpora import WDS_NAME, iter_tar_samples
from cmcr.pipeline.encoders import Encoder, collate_items
from cmcr.pipeline.media import MEDIA_EXTENSIONS, media_member
from cmcr.pipeline.openers import expand_url, is_url, url_name
from cmcr.pipeline.pointcloud import PointCloudDecoding, decode_points
from cmcr.pipeline.stageclock import decode_seconds
from cmcr.stores.files import claim_output, locks_output, progress_options, sha256_file
from cmcr.stores.store import MANIFEST, Store, comparable_identity

log = logging.getLogger(__name__)

_COMMON = [("source", pa.string()), ("label", pa.string())]
#: Metadata columns of a store, per modality (same in every part; nulls where unknown).
METADATA_SCHEMAS: dict[str, pa.Schema] = {
    "image": pa.schema([*_COMMON, ("width", pa.int32()), ("height", pa.int32()), ("meta_json", pa.string())]),
    "audio": pa.schema([*_COMMON, ("duration_s", pa.float64()), ("sample_rate_in", pa.int32()),
                        ("channels", pa.int32()), ("silent", pa.bool_()), ("cropped", pa.bool_()),
                        ("padded", pa.bool_()), ("meta_json", pa.string())]),
    "text": pa.schema([*_COMMON, ("text", pa.string()), ("truncated", pa.bool_()), ("meta_json", pa.string())]),
    # 3d: the decode facts of pipeline.pointcloud.decode_points (vertices: points of a cloud or
    # vertices of a mesh; faces: null for a point cloud; radius: in the file's units)
    "3d": pa.schema([*_COMMON, ("format", pa.string()), ("vertices", pa.int64()), ("faces", pa.int64()),
                     ("has_color", pa.bool_()), ("radius", pa.float64()), ("meta_json", pa.string())]),
}
_META_SKIP = {"key", "modality", "source", "label"}
#: Per-row preprocessing notes without a column of their own; recorded in ``meta_json`` when set.
PREPROCESSING_NOTES = ("rescaled_int16",)
#: Manifest ``extra`` field recording the forward-pass precision (fp32 / bf16 / fp16) of a store's rows.
COMPUTE_PRECISION = "compute_precision"


# ----------------------------------------------------------------------------------- reading
def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path | str]:
    """Expand shard arguments: folders (their ``*.tar``, sorted), tar files, globs, brace ranges, and shard
    URLs (``pipe:CMD``, ``http(s)://``, ``s3://`` ...: :mod:`cmcr.pipeline.openers`), which stay strings
    (brace ranges expanded; not checked here: a URL that cannot be read is one recorded ``read`` failure).

    Raises:
        InputDataError: nothing found (names what was looked at), or a folder whose ``shards.json``
            lists shards that are missing.
    """
    import glob

    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path | str] = []
    for item in items:
        if is_url(item):
            out.extend(expand_url(str(item)))  # URLs stay strings
            continue
        for s in braceexpand(str(item)):
            p = Path(s)
            if p.is_dir():
                _check_index_complete(p)
                out.extend(sorted(p.glob("*.tar")))
            elif p.is_file():
                out.append(p)
            else:
                hits = sorted(glob.glob(s))
                if not hits:
                    raise InputDataError(f"no shards at {s}: pass a folder of .tar shards, tar files or a glob "
                                         f"(make them with `cmcr shard`)")
                out.extend(Path(h) for h in hits)
    if not out:
        raise InputDataError(f"no .tar shards found in {items}; make them with `cmcr shard`")
    seen: set[Path | str] = set()
    return [p for p in out if not (_resolved(p) in seen or seen.add(_resolved(p)))]


def _resolved(p: Path | str) -> Path | str:
    return p if is_url(p) else Path(p).resolve()


def shard_name(path: str | os.PathLike) -> str:
    """A shard's file name (a URL's last path part) for progress bars and messages."""
    return url_name(str(path)) if is_url(path) else Path(path).name


def _check_index_complete(folder: Path) -> None:
    """A shard folder's ``shards.json`` (from ``cmcr shard``) lists every shard; one that is missing
    would be skipped silently (its samples absent from the store), so it is an error.

    Raises:
        InputDataError: names the missing shards and the fixes.
    """
    index = folder / "shards.json"
    if not index.is_file():
        return
    try:
        listed = [str(e["file"]) for e in json.loads(index.read_text()).get("shards", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # not cmcr's index: nothing to compare against
    missing = [f for f in listed if not (folder / f).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputDataError(
            f"{folder}: {len(missing)} shard(s) listed in shards.json are missing ({', '.join(missing[:5])}{more}); "
            f"their samples would be left out of the store silently. Restore them, re-run `cmcr shard` into this "
            f"folder, or pass the shards that exist as files/a glob (e.g. '{folder}/shard-*.tar')")


def check_shards_modality(paths: Sequence[Path], modality: str) -> None:
    """Refuse shards whose folder's ``shards.json`` (written by ``cmcr shard``) records another modality.

    Shards without an index are not checked here (their samples fail one by one with
    "has no <modality> member", and a run where every sample failed is reported as such).

    Raises:
        InputDataError: names the folder, the recorded and the requested modality, and the fix.
    """
    for folder in sorted({Path(p).parent for p in paths if not is_url(p)}):
        try:
            recorded = json.loads((folder / "shards.json").read_text()).get("modality")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded != modality:
            sibling = folder.parent / modality
            if (sibling / "shards.json").is_file():
                where = f"the shard folder of the {modality} samples, {sibling}"
            else:
                others = sorted(d.name for d in folder.parent.iterdir() if (d / "shards.json").is_file())
                where = (f"a shard folder of {modality} samples (`cmcr shard` found none among its inputs for "
                         f"{folder.parent}: it holds {', '.join(others) or 'no shard folders'}; shard {modality} "
                         f"files first)")
            raise InputDataError(
                f"the shards in {folder} hold {recorded} samples (its shards.json says modality {recorded!r}) "
                f"but --modality is {modality!r}: pass -m {recorded} (with an encoder that embeds {recorded}), "
                f"or {where}"
            )


def shard_source(path: str | os.PathLike) -> str:
    """A shard's absolute path (a URL as it is): the ``source`` of its failure records (for humans; see
    :func:`shard_identity` for the part's ``source``)."""
    return str(path) if is_url(path) else str(Path(path).resolve())


_IDENTITY_CACHE: dict[tuple[str, int, int, int], str] = {}


def shard_identity(path: str | os.PathLike) -> str:
    """The store part ``source`` of a shard: ``<file name>#<first 16 hex digits of its sha256>``.

    A rerun skips shards whose identity already has a part, wherever the shard folder now lives
    (moved, another mount on a Ray node); two different shards with the same file name (another
    folder) never match. The digest comes from the ``shards.json`` index of ``cmcr shard`` when the
    index lists this file with the same size and was written after the shard (a shard changed
    later is hashed instead); otherwise the file is hashed (~1 s per GB), once per process.

    A shard URL's identity is the URL itself: its content is not read twice to hash it, so a rerun
    skips URLs already encoded (content changed behind a URL is not noticed: encode into a new store).

    Raises:
        OSError: the shard cannot be read.
    """
    if is_url(path):
        return str(path)
    p = Path(path)
    st = p.stat()
    ck = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    ident = _IDENTITY_CACHE.get(ck)
    if ident is None:
        digest = _indexed_digest(p, st) or _sha256(p)
        ident = _IDENTITY_CACHE[ck] = f"{p.name}#{digest[:16]}"
    return ident


def _indexed_digest(p: Path, st: os.stat_result) -> str | None:
    """The shard's sha256 from a trustworthy ``shards.json`` beside it (see :func:`shard_identity`)."""
    index = p.parent / "shards.json"
    try:
        ist = index.stat()
        if ist.st_mtime_ns <= st.st_mtime_ns:  # the shard changed after the index was written
            return None
        entries = json.loads(index.read_text()).get("shards", [])
    except (OSError, ValueError, AttributeError):
        return None
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and e.get("file") == p.name:
            digest = e.get("sha256")
            if e.get("bytes") == st.st_size and isinstance(digest, str) and len(digest) == 64:
                return digest
            return None
    return None


def _sha256(p: Path) -> str:
    return sha256_file(p)


def shards_to_do(paths: Sequence[Path], store: Store) -> tuple[list[Path], list[str]]:
    """The shards of ``paths`` without a part in ``store`` and their identities.

    A part matches by :func:`shard_identity`, or by the absolute path (stores written before
    identities). Unreadable shards are kept (the encode records their ``read`` failure).

    Raises:
        ChangedShardError: a shard to do has the file name of a done part but another digest and
            carries keys the store already holds: the shard was rewritten (e.g. resharded after its
            input changed) since it was encoded, and its keys now name other samples than the
            store's rows (see :func:`check_changed_shards`). Nothing is encoded then.
    """
    done = store.done_sources()
    todo, idents = [], []
    for p in paths:
        try:
            ident = shard_identity(p)
        except OSError:
            ident = shard_source(p)
        if ident not in done and shard_source(p) not in done:
            todo.append(p)
            idents.append(ident)
    check_changed_shards(todo, idents, store, done)
    return todo, idents


class ChangedShardError(StoreValidationError):
    """A shard changed since it was encoded into the store (same file name, other digest, same keys)."""


class KeyClashError(StoreValidationError):
    """Keys of a shard are already in the store from another shard: they would name two samples."""


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The sample keys of a webdataset tar, from its member names only (no payload is read).

    Raises:
        tarfile.TarError, OSError: unreadable tar.
    """
    keys: list[str] = []
    with tarfile.open(path, mode="r:*") as tf:
        for member in tf:
            m = WDS_NAME.match(member.name) if member.isfile() else None
            if m and (not keys or keys[-1] != m.group(1)):
                keys.append(m.group(1))
    return keys


def check_changed_shards(todo: Sequence[Path], idents: Sequence[str], store: Store,
                         done: set[str] | None = None) -> None:
    """Refuse shards that were rewritten since they were encoded into ``store``.

    A shard to do whose file name equals that of a done part (``<file>#<digest>``) but whose
    digest differs is either another corpus's shard of the same name (fine: its keys are new) or
    the same shard rewritten, e.g. by ``cmcr shard`` after its input changed: its keys (row
    numbers, file names) are then already in the store but now name other samples, and encoding
    it would leave the old embeddings under keys that refer to the new samples. The second case
    is told apart by the keys (read from the tar's member names) and refused before anything is
    encoded.

    Raises:
        ChangedShardError: names the shard, both digests, the store and the fixes.
    """
    done = store.done_sources() if done is None else done
    by_name: dict[str, list[str]] = {}
    for src in done:
        name, sep, digest = src.rpartition("#")
        if sep:
            by_name.setdefault(name, []).append(digest)
    suspects = [(p, ident) for p, ident in zip(todo, idents, strict=True) if "#" in ident and not is_url(p)
                and ident.rpartition("#")[0] in by_name]
    if not suspects:
        return
    existing = set(store.keys())
    for p, ident in suspects:
        try:
            keys = shard_keys(p)
        except (tarfile.TarError, OSError, EOFError):
            continue  # the encode records the read failure
        clash = next((k for k in keys if k in existing), None)
        if clash is None:
            continue
        name, _, digest = ident.rpartition("#")
        old = ", ".join(by_name[name])
        raise ChangedShardError(
            f"shard {p} changed since it was encoded into the store {store.path}: the store has a part of "
            f"{name} with digest {old}, the shard now has digest {digest}, and its keys (e.g. {clash!r}) are "
            f"already in the store, where they hold the embeddings of the old content. Encode into a new "
            f"store (--store), or pass --overwrite to start this store over (it deletes every part of the "
            f"store: never while another cmcr process writes it)"
        )


def iter_shard_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The samples of one webdataset shard (a file or a URL), in tar order (see
    :func:`cmcr.pipeline.corpora.iter_tar_samples`)."""
    return iter_tar_samples(str(path) if is_url(path) else Path(path))


# ----------------------------------------------------------------------------------- preprocessing
@dataclass
class Prepared:
    """Preprocessed samples of one batch (CPU side).

    Attributes:
        keys: N keys; items: N model inputs (tensors or dicts); infos: N per-row facts from the
        preprocessor; metas: N per-sample metadata dicts from the shard; failures: records of samples
        that failed; decode_s: seconds spent decoding + preprocessing; decoder_s: the part of it spent
        in the decoders (:mod:`cmcr.pipeline.stageclock`); read_s: seconds reading the samples from
        the tar; collate_s: seconds collating the batch; worker: the DataLoader worker that made
        the batch (-1: the main process); worker_cpu_s / worker_samples: that worker's CPU seconds
        (``time.process_time``: reading, decoding, preprocessing, collating, also of the batches it
        skipped) and samples prepared since it started iterating, up to and including this batch —
        the decode load :class:`AutoThreads` sizes the forward pass's threads from.
    """

    keys: list[str] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    decode_s: float = 0.0
    decoder_s: float = 0.0
    read_s: float = 0.0
    collate_s: float = 0.0
    worker: int = -1
    worker_cpu_s: float = 0.0
    worker_samples: int = 0


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The per-sample ``json`` member of a shard sample as a dict (empty if absent or invalid)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
        return meta if isinstance(meta, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def sample_member(sample: dict[str, Any], modality: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the member of a shard sample that holds the ``modality`` payload
    (extensions from the one list, :data:`cmcr.pipeline.media.MEDIA_EXTENSIONS`).

    Raises:
        SampleError: no member with an extension of that modality.
    """
    if modality in MEDIA_EXTENSIONS:
        ext = media_member(sample, modality)
        if ext is not None:
            return ext, sample[ext]
    found = sorted(k for k in sample if not k.startswith("__"))
    raise SampleError(f"sample {sample.get('__key__')!r} has no {modality} member (found {found})")


def sample_payload(sample: dict[str, Any], modality: str) -> bytes:
    """The bytes of :func:`sample_member`."""
    return sample_member(sample, modality)[1]


def decode_payload(sample: dict[str, Any], modality: str,
                   pointcloud: PointCloudDecoding | None = None) -> tuple[Any, dict[str, Any]]:
    """The decode stage: what ``Encoder.preprocessor(modality)`` gets for a shard sample, plus per-row facts.

    ``image`` / ``audio`` / ``text``: the member's bytes (the preprocessor decodes them), no facts.
    ``3d``: the points decoded here (:func:`cmcr.pipeline.pointcloud.decode_points` with the
    ``pointcloud`` settings): ``np.ndarray (N, 3|6) float32``, and the decode facts (``format``,
    ``vertices``, ``faces``, ``has_color``, ``radius``) for the metadata columns. The contract is
    in the docstring of :mod:`cmcr.pipeline.pointcloud`.

    Raises:
        SampleError: no member of the modality, or a 3D file that cannot be used (names the key and why).
    """
    ext, data = sample_member(sample, modality)
    if modality == "3d":
        return decode_points(data, ext, pointcloud, what=f"sample {sample.get('__key__')!r} (.{ext})")
    return data, {}


def prepare_sample(sample: dict[str, Any], preprocess: Callable[[Any], tuple[Any, dict]], modality: str,
                   source: str, out: Prepared, pointcloud: PointCloudDecoding | None = None) -> None:
    """Decode (:func:`decode_payload`) + preprocess one shard sample into ``out`` (or add a failure record)."""
    key = str(sample.get("__key__"))
    if "__error__" in sample:  # the tar reader refused it (duplicate/link member, size limit): nothing to decode
        out.failures.append({"key": key, "source": source, "stage": "read", "error": sample["__error__"]})
        return
    meta = sample_meta(sample)
    t = time.perf_counter()
    d0 = decode_seconds()
    try:
        raw, facts = decode_payload(sample, modality, pointcloud)
        item, info = preprocess(raw)
        if facts:
            info = {**facts, **info}
    except SampleError as e:
        out.failures.append({"key": key, "source": source, "stage": "decode", "error": str(e)})
    except Exception as e:  # a bug or an unexpected library error must not kill the shard either
        out.failures.append({"key": key, "source": source, "stage": "decode",
                             "error": f"{type(e).__name__}: {e}"})
    else:
        out.keys.append(key)
        out.items.append(item)
        out.infos.append(info)
        out.metas.append(meta)
    out.decode_s += time.perf_counter() - t
    out.decoder_s += decode_seconds() - d0


def prepare_batch(samples: Sequence[dict[str, Any]], preprocess: Callable[[Any], tuple[Any, dict]],
                  modality: str, source: str, pointcloud: PointCloudDecoding | None = None) -> Prepared:
    """:func:`prepare_sample` over a list of samples."""
    out = Prepared()
    for s in samples:
        prepare_sample(s, preprocess, modality, source, out, pointcloud)
    return out


# ----------------------------------------------------------------------------------- embedding
def embed_items(encoder: Encoder, modality: str, keys: Sequence[str], items: Sequence[Any], source: str,
                batch: Any = None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Embed preprocessed items; a failing batch is retried sample by sample.

    Args:
        batch: the already collated items (optional; saves a collate when workers did it).

    Returns:
        ``(emb, ok, failures)``: ``emb`` ``(M, D)`` float32 L2-normalised rows of the items that
        succeeded, ``ok`` ``(N,)`` bool mask over ``items``, failure records (stage ``embed``).
    """
    n = len(items)
    if n == 0:
        return np.zeros((0, encoder.dim), np.float32), np.zeros(0, bool), []
    failures: list[dict[str, Any]] = []
    try:
        emb = encoder.embed(modality, batch if batch is not None else collate_items(items))
        ok = np.ones(n, bool)
    except Exception as e:
        if n == 1:
            return (np.zeros((0, encoder.dim), np.float32), np.zeros(1, bool),
                    [{"key": keys[0], "source": source, "stage": "embed", "error": f"{type(e).__name__}: {e}"}])
        log.warning("batch of %d from %s failed in the model (%s); retrying one by one", n, source, e)
        rows, ok = [], np.zeros(n, bool)
        for i in range(n):
            e1, ok1, f1 = embed_items(encoder, modality, [keys[i]], [items[i]], source)
            failures += f1
            if ok1[0]:
                rows.append(e1[0])
                ok[i] = True
        emb = np.stack(rows) if rows else np.zeros((0, encoder.dim), np.float32)
        return emb, ok, failures
    finite = np.isfinite(emb).all(axis=1)
    # Encoder.embed normalises with a clamped norm: an all-zero model output stays a zero row, which
    # cannot be a unit vector (a cosine store would refuse the whole part).
    usable = finite & (np.einsum("ij,ij->i", np.where(finite[:, None], emb, 0), np.where(finite[:, None], emb, 0))
                       > 0.25)
    if not usable.all():
        for i in np.flatnonzero(~usable):
            error = ("the model returned NaN/Inf for this sample" if not finite[i] else
                     "the model returned an all-zero embedding for this sample (norm 0: it cannot be normalised)")
            failures.append({"key": keys[i], "source": source, "stage": "embed", "error": error})
        ok &= usable
        emb = emb[usable]
    return np.ascontiguousarray(emb, dtype=np.float32), ok, failures


# ----------------------------------------------------------------------------------- writing
def metadata_table(modality: str, infos: Sequence[dict[str, Any]], metas: Sequence[dict[str, Any]]) -> pa.Table:
    """The store metadata columns (:data:`METADATA_SCHEMAS`) for N rows.

    ``source`` and ``label`` come from the shard's per-sample json, the modality columns from the
    preprocessor's per-row info, and every other json field goes to ``meta_json``.
    """
    schema = METADATA_SCHEMAS[modality]
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for info, meta in zip(infos, metas, strict=True):
        for name in schema.names:
            if name == "meta_json":
                rest = {k: v for k, v in meta.items() if k not in _META_SKIP}
                # preprocessing notes without a column of their own (e.g. ``rescaled_int16``)
                rest.update({k: v for k, v in info.items() if k in PREPROCESSING_NOTES and v})
                cols[name].append(json.dumps(rest, sort_keys=True, default=str) if rest else None)
            elif name in ("source", "label"):
                v = meta.get(name)
                cols[name].append(None if v is None else str(v))
            else:
                cols[name].append(info.get(name))
    return pa.Table.from_pydict(cols, schema=schema)


def store_preprocessing(encoder: Encoder, modality: str, pointcloud: PointCloudDecoding | None = None) -> dict:
    """The ``preprocessing`` recorded in the store manifest: the encoder's, plus for ``3d`` the
    decode stage's :meth:`~cmcr.pipeline.pointcloud.PointCloudDecoding.identity` under ``decode``."""
    pre = dict(encoder.preprocessing(modality))
    if modality == "3d":
        pre["decode"] = (pointcloud or PointCloudDecoding()).identity()
    return pre


def media_roots_of_shards(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The media folders the shards' samples came from (``media_roots`` of the ``shards.json`` beside
    them, written by ``cmcr shard``): their rows' ``source`` paths are relative to one of these.
    ``[]`` when no index records any (tars made elsewhere)."""
    roots: set[str] = set()
    for folder in {Path(p).parent for p in paths if not is_url(p)}:
        try:
            index = json.loads((folder / "shards.json").read_text())
        except (OSError, ValueError):
            continue
        roots.update(str(r) for r in (index.get("media_roots") or []) if isinstance(r, str))
    return sorted(roots)


def encode_provenance(encoder: Encoder, modality: str, dtype: str,
                      pointcloud: PointCloudDecoding | None = None) -> dict[str, Any]:
    """What an encoded store is derived from, as the output claim of :func:`open_store` compares it:
    modality, the encoder identity (the fields that change the vectors), dim, preprocessing, storage
    dtype and compute precision."""
    return {"modality": modality, "encoder": comparable_identity(encoder.identity()), "dim": encoder.dim,
            "preprocessing": store_preprocessing(encoder, modality, pointcloud), "dtype": dtype,
            COMPUTE_PRECISION: getattr(encoder, "precision", "fp32")}


def _recorded_encode(path: Path, precision: str) -> dict[str, Any] | None:
    """The provenance of the store at ``path`` as :func:`encode_provenance` (``None``: no store there).
    A store from before compute precision was recorded counts as made in ``precision`` (a warning follows)."""
    if not (path / MANIFEST).exists():
        return None
    store = Store.open(path, validate="none")
    return {"modality": store.modality, "encoder": comparable_identity(store.encoder), "dim": store.dim,
            "preprocessing": store.preprocessing, "dtype": store.dtype,
            COMPUTE_PRECISION: (store.manifest.get("extra") or {}).get(COMPUTE_PRECISION, precision)}


def open_store(store_path: str | os.PathLike, encoder: Encoder, modality: str, *, overwrite: bool = False,
               dtype: str = "float16", command: str | None = None, start_over: bool = False,
               pointcloud: PointCloudDecoding | None = None, media_roots: Sequence[str] = ()) -> Store:
    """Claim the store folder for ``encoder``/``modality`` (:func:`~cmcr.stores.files.claim_output`) and
    open it: a store made the same way (:func:`encode_provenance`) is resumed, none is created.

    Args:
        pointcloud: 3d decode settings (recorded, see :func:`store_preprocessing`).
        overwrite: start over: remove the store at ``store_path`` (any identity) first, so nothing is
            resumed (the one meaning of ``--overwrite``).
        start_over: the same as ``overwrite`` (kept for callers of older versions).

    Raises:
        StoreMismatchError: a store made by another encoder identity / preprocessing / modality / dtype /
            compute precision exists at ``store_path`` and ``overwrite`` is False (the message names
            the fields that differ).
        OutputLockedError: another process starts this store over, or (``overwrite``) encodes into it.
    """
    encoder.check_modality(modality)
    if encoder.text_quantization is not None:
        raise EncoderError(f"{store_path}: this encoder embeds text with a {encoder.text_quantization} text tower "
                           f"(cmcr serve --quantize-text), for queries only; store rows are computed by the "
                           f"unquantised model. Load the encoder without quantisation to write a store")
    overwrite = overwrite or start_over
    precision = getattr(encoder, "precision", "fp32")

    def hint(old: Mapping[str, Any]) -> str:
        flags = [f"--{flag} {old[name]}" for name, flag, now in ((COMPUTE_PRECISION, "precision", precision),
                                                                  ("dtype", "dtype", dtype)) if old.get(name) != now]
        add = f"pass {' '.join(flags)} to add to it, or " if flags else ""
        return f"rows made differently must not mix in one store: {add}encode into another --store"

    with claim_output(store_path, kind="store", provenance=encode_provenance(encoder, modality, dtype, pointcloud),
                      overwrite=overwrite, recorded=lambda p: _recorded_encode(p, precision),
                      error=StoreMismatchError, shared=True,
                      hint=hint):
        store = Store.open_or_create(store_path, modality=modality, encoder=encoder.identity(), dim=encoder.dim,
                                     preprocessing=store_preprocessing(encoder, modality, pointcloud),
                                     dtype=dtype, command=command,
                                     extra={COMPUTE_PRECISION: precision,
                                            **({"media_roots": list(media_roots)} if media_roots else {})})
    if (store.manifest.get("extra") or {}).get(COMPUTE_PRECISION) is None and store.num_rows:
        log.warning("%s records no compute precision (made by an older cmcr); appending %s rows", store_path,
                    precision)
    return store


@dataclass
class ShardResult:
    """Rows of one shard ready to be written as a part.

    Attributes:
        source: the shard's absolute path (failure records); part_source: the part's ``source``
        (:func:`shard_identity`; ``source`` when ``None``).
    """

    source: str
    part_source: str | None = None
    keys: list[str] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0

    def add(self, prepared: Prepared, emb: np.ndarray, ok: np.ndarray, failures: list[dict[str, Any]]) -> None:
        idx = np.flatnonzero(ok)
        self.keys += [prepared.keys[i] for i in idx]
        self.infos += [prepared.infos[i] for i in idx]
        self.metas += [prepared.metas[i] for i in idx]
        if len(emb):
            self.embeddings.append(emb)
        self.failures += prepared.failures + failures
        self.samples += len(prepared.keys) + len(prepared.failures)


def write_part(store: Store, modality: str, result: ShardResult, dim: int) -> int:
    """Append one shard's rows (and failure records) to the store as one atomic part; returns rows.

    A key repeated inside the shard becomes a ``write`` failure (the first sample keeps it). A key
    already in the store came from another shard: the same key would name two samples (two
    corpora with the same keys, or one sharded twice into different folders), so nothing of this
    shard is written and :class:`KeyClashError` stops the run.

    Raises:
        KeyClashError: names the first clashing key, the shard, the store and the fixes.
    """
    keys, infos, metas = result.keys, result.infos, result.metas
    emb = np.concatenate(result.embeddings) if result.embeddings else np.zeros((0, dim), np.float32)
    failures = list(result.failures)
    seen: set[str] = set()
    clashes = store.keys_present(keys)
    if clashes and (result.part_source or result.source) in store.done_sources():
        # another process encoding into this store wrote this very shard (same content digest) meanwhile:
        # its part is complete and equal in meaning; nothing to add, nothing to start over
        log.warning("%s: already encoded into %s by another process meanwhile; its part is kept", result.source,
                    store.path)
        return 0
    if clashes:
        raise KeyClashError(
            f"{len(clashes)} key(s) of shard {result.source} are already in the store {store.path} from "
            f"another shard (first: {clashes[0]!r}); a key must name one sample, so no part was written for "
            f"this shard. Give the corpora distinct keys (e.g. another table/list name, or --key-column with "
            f"unique ids when sharding), encode them into separate stores, or pass --overwrite to start the "
            f"store over (it deletes every part of the store: never while another cmcr process writes it)"
        )
    keep = []
    for i, k in enumerate(keys):
        if k in seen:
            failures.append({"key": k, "source": result.source, "stage": "write",
                             "error": "duplicate key: an earlier sample of this shard has it"})
        else:
            keep.append(i)
            seen.add(k)
    if len(keep) != len(keys):
        keys = [keys[i] for i in keep]
        infos = [infos[i] for i in keep]
        metas = [metas[i] for i in keep]
        emb = emb[keep]
    store.append_part(keys, emb, metadata_table(modality, infos, metas), source=result.part_source or result.source,
                      failures=failures)
    return len(keys)


def encode_shard(shard: str | os.PathLike, encoder: Encoder, modality: str, *, batch_size: int = 64,
                 pointcloud: PointCloudDecoding | None = None) -> ShardResult:
    """Read, preprocess and embed one shard in this process (no DataLoader); the caller writes it
    with :func:`write_part`. A corrupt tar yields a ``read`` failure for the samples not reached."""
    source = shard_source(shard)
    pre = encoder.preprocessor(modality)
    try:
        ident = shard_identity(shard)
    except OSError:
        ident = source
    result = ShardResult(source=source, part_source=ident)
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        prepared = prepare_batch(batch, pre, modality, source, pointcloud)
        emb, ok, fails = embed_items(encoder, modality, prepared.keys, prepared.items, source)
        result.add(prepared, emb, ok, fails)
        batch.clear()

    try:
        for sample in iter_shard_samples(shard):
            batch.append(sample)
            if len(batch) >= batch_size:
                flush()
    except (tarfile.TarError, OSError, EOFError) as e:
        result.failures.append({"key": "", "source": source, "stage": "read", "error": f"unreadable shard: {e}"})
    if batch:
        flush()
    return result


# ----------------------------------------------------------------------------------- DataLoader
class ShardBatches(IterableDataset):
    """Iterable over preprocessed, collated batches of several shards (a torch IterableDataset).

    Yields dicts: ``{"kind": "batch", "shard": i, "batch": b, "prepared": Prepared, "collated": ...}``
    for the batches of this worker (``b % num_workers == worker_id``), and for every shard one
    ``{"kind": "end", "shard": i, "batches": n, "error": str | None}`` per worker. A shard URL is read
    once, by worker ``i % num_workers`` (every batch of it); the other workers end it with ``batches:
    None``, so a remote shard is downloaded once while several URLs download in parallel.
    """

    def __init__(self, shards: Sequence[Path], preprocess: Callable[[Any], tuple[Any, dict]], modality: str,
                 batch_size: int, pointcloud: PointCloudDecoding | None = None):
        self.shards = [s if is_url(s) else Path(s) for s in shards]
        self.preprocess = preprocess
        self.modality = modality
        self.batch_size = batch_size
        self.pointcloud = pointcloud
        self._wid, self._cpu0, self._prepared = -1, 0.0, 0  # this process's decode load (reset per iteration)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        self._wid = wid if info is not None else -1
        self._cpu0, self._prepared = time.process_time(), 0
        for i, shard in enumerate(self.shards):
            source = shard_source(shard)
            stride, slot = nw, wid
            if is_url(shard):
                if i % nw != wid:
                    yield {"kind": "end", "shard": i, "batches": None, "error": None}
                    continue
                stride, slot = 1, 0
            b, chunk, error = 0, [], None
            tr = time.perf_counter()
            try:
                for sample in iter_shard_samples(shard):
                    chunk.append(sample)
                    if len(chunk) == self.batch_size:
                        if b % stride == slot:
                            yield self._batch(i, b, chunk, source, time.perf_counter() - tr)
                        b, chunk = b + 1, []
                        tr = time.perf_counter()
            except (tarfile.TarError, OSError, EOFError) as e:
                error = f"unreadable shard ({type(e).__name__}: {e})"
            if chunk:
                if b % stride == slot:
                    yield self._batch(i, b, chunk, source, time.perf_counter() - tr)
                b += 1
            yield {"kind": "end", "shard": i, "batches": b, "error": error}

    def _batch(self, i: int, b: int, samples: list[dict[str, Any]], source: str,
               read_s: float = 0.0) -> dict[str, Any]:
        prepared = prepare_batch(samples, self.preprocess, self.modality, source, self.pointcloud)
        prepared.read_s = read_s
        collated = None
        if prepared.items:
            tc = time.perf_counter()
            try:
                collated = collate_items(prepared.items)
            except Exception:  # mismatched shapes: the main process embeds one by one
                collated = None
            prepared.collate_s = time.perf_counter() - tc
        self._prepared += len(samples)
        prepared.worker = self._wid
        prepared.worker_cpu_s = time.process_time() - self._cpu0
        prepared.worker_samples = self._prepared
        return {"kind": "batch", "shard": i, "batch": b, "prepared": prepared, "collated": collated}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class EncodeReport:
    """Summary of :func:`encode_shards`.

    Attributes:
        store: store folder; rows: rows written in this run; failures: failure records in this run;
        shards_done / shards_skipped / shards_failed: counts; samples: samples read;
        decode_s: CPU seconds spent decoding + preprocessing (summed over workers), of which
        decoder_s in the decoders; read_s: seconds reading shards; collate_s: seconds collating
        batches (both summed over workers);
        wait_s: seconds the main process waited for data (the decode bottleneck, in wall time);
        model_s: seconds in the forward pass; write_s: seconds writing parts; wall_s: total;
        torch_threads: torch intra-op threads of the forward pass (main process / each actor; with
        :class:`AutoThreads` the last choice); thread_changes: ``[batch, threads]`` of each choice
        of :class:`AutoThreads` (empty without it); decode_share: the decode workers' share of the
        CPU work per sample that :class:`AutoThreads` measured, other_load: the cores other
        processes kept busy meanwhile, as it last measured them (both ``None`` without it);
        empty_shards: shards of this run that held no sample (reported, not failures).
    """

    store: str
    rows: int = 0
    failures: int = 0
    samples: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    decode_s: float = 0.0
    decoder_s: float = 0.0
    read_s: float = 0.0
    collate_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    torch_threads: int = 0
    thread_changes: list[list[int]] = field(default_factory=list)
    decode_share: float | None = None
    other_load: float | None = None
    failure_examples: list[dict[str, Any]] = field(default_factory=list)
    empty_shards: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def model_busy(self) -> float:
        """Fraction of wall time the forward pass was running."""
        return self.model_s / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def stages(self) -> dict[str, float]:
        """Where the time went, seconds per stage: ``read`` (tar), ``decode`` (bytes -> image /
        waveform / caption), ``preprocess`` (resize, resample, tokenise...), ``collate`` — CPU
        seconds summed over the decode workers, which run in parallel with the main process —
        and ``forward``, ``write``, ``wait`` (main process wall seconds; ``wait`` = waiting for
        workers, the decode bottleneck)."""
        return {"read": self.read_s, "decode": self.decoder_s, "preprocess": max(self.decode_s - self.decoder_s, 0.0),
                "collate": self.collate_s, "forward": self.model_s, "write": self.write_s, "wait": self.wait_s}

    def add_prepared(self, prepared: Prepared) -> None:
        """Count the worker-side seconds of one prepared batch."""
        self.decode_s += prepared.decode_s
        self.decoder_s += prepared.decoder_s
        self.read_s += prepared.read_s
        self.collate_s += prepared.collate_s

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "failure_examples"}
        d.update(samples_per_s=self.samples_per_s, model_busy=self.model_busy, stages=self.stages,
                 failure_examples=self.failure_examples[:10])
        return d


#: A failure policy: called by :func:`finish_shard` with a shard's failure records once they are recorded
#: (in the store's failure table and the report) and the shard's good rows are written. It returns to go
#: on or raises to stop the run (the webdataset ``handler=`` idea).
FailureHandler = Callable[[Sequence[Mapping[str, Any]]], None]


def record_and_continue(failures: Sequence[Mapping[str, Any]]) -> None:
    """The default failure policy: a failed sample is one recorded failure; the run goes on."""
    return None


def fail_fast(failures: Sequence[Mapping[str, Any]]) -> None:
    """The ``--fail-fast`` failure policy: stop the run at the first shard with a failed sample.

    The failures are already in the store's failure table and the shard's good rows in its part (nothing
    is lost; a rerun resumes after the shards written so far and retries an unreadable one).

    Raises:
        InputDataError: naming the first failure's source, key, stage and error.
    """
    if failures:
        f = failures[0]
        more = f" (+{len(failures) - 1} more in this shard)" if len(failures) > 1 else ""
        raise InputDataError(
            f"{f.get('source')}: sample {f.get('key')!r} failed at stage {f.get('stage')}: {f.get('error')}{more}. "
            f"Stopped by --fail-fast after recording it; the parts written so far are kept. Fix or remove the "
            f"input and rerun the same command to resume (or drop --fail-fast to record failures and go on)")


def finish_shard(store: Store, modality: str, dim: int, shard: Path, identity: str,
                 batches: Sequence[tuple[Prepared, np.ndarray, np.ndarray, list[dict[str, Any]]]],
                 read_error: str | None, report: EncodeReport,
                 handler: FailureHandler = record_and_continue) -> None:
    """Write one complete shard (every engine ends a shard here) and count it in ``report``.

    Args:
        shard: the shard file; identity: its :func:`shard_identity` (the part's ``source``).
        batches: the shard's batches in order, each ``(Prepared, emb (M, D) float32, ok (N,) bool,
            embed failure records)`` as returned by :func:`embed_items`.
        read_error: why the tar could not be read to the end, or ``None``. Then no part is written
            (a rerun retries the shard): only a ``read`` failure plus the batches' failure records.
        handler: the failure policy (:func:`record_and_continue`, :func:`fail_fast`), called last with
            the shard's failure records when there are any.
    """
    result = ShardResult(source=shard_source(shard), part_source=identity)
    for batch in batches:
        result.add(*batch)
    if not read_error and result.samples == 0:
        report.empty_shards.append(str(shard))
        log.warning("%s: empty shard (no samples); an empty part records it as done", shard)
    if read_error:
        report.shards_failed += 1
        fail = {"key": "", "source": result.source, "stage": "read", "error": read_error}
        store.add_failures([fail, *result.failures])
        report.failures += 1 + len(result.failures)
        report.failure_examples += [fail, *result.failures][:5]
        log.error("%s: %s; no part written (fix or remove the shard, then rerun)", shard, read_error)
        handler([fail, *result.failures])
        return
    tw = time.perf_counter()
    report.rows += write_part(store, modality, result, dim)
    report.write_s += time.perf_counter() - tw
    report.failures += len(result.failures)
    report.failure_examples += result.failures[: max(0, 10 - len(report.failure_examples))]
    report.shards_done += 1
    if result.failures:
        handler(result.failures)


def progress_bar(enabled: bool):
    """The encode progress bar (shards, samples, samples/s, failures, current shard); both engines use it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("shards · {task.fields[samples]} samples · {task.fields[rate]:.1f}/s · "
                               "{task.fields[failures]} failures · {task.fields[shard]}"),
                    TimeElapsedColumn(), transient=False, **progress_options(enabled))


@locks_output("store_path", shared=lambda a: not (a["overwrite"] or a["start_over"]))
def encode_shards(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    encoder: Encoder,
    modality: str,
    store_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    dtype: str = "float16",
    prefetch_factor: int = 4,
    command: str | None = None,
    torch_threads: int | None = None,
    start_over: bool = False,
    pointcloud: PointCloudDecoding | None = None,
    handler: FailureHandler = record_and_continue,
) -> EncodeReport:
    """Encode webdataset shards into a store: one atomic part per shard; reruns resume.

    Args:
        shards: folder(s), tar file(s), glob or brace pattern (see :func:`list_shards`).
        encoder: a loaded :class:`~cmcr.pipeline.encoders.Encoder`.
        modality: ``image`` / ``audio`` / ``text`` / ``3d`` (one the encoder embeds).
        store_path: store folder (created if missing).
        batch_size: samples per forward pass.
        num_workers: DataLoader worker processes for decode/preprocess (0 = in the main process).
        overwrite: start over: remove an existing store at ``store_path`` first (any identity; nothing
            resumed). Without it a store made the same way is resumed, another one is refused.
        start_over: the same as ``overwrite``.
        dtype: storage dtype of a new store (``float16`` or ``float32``).
        torch_threads: torch threads of the forward pass in this process, restored afterwards (an
            explicit value is used as is for the whole run). ``None``: on a CPU encoder with decode
            workers :class:`AutoThreads` (from the second batch on the cores that the measured
            decode load and other processes leave free, :func:`threads_for_decode_share`; never
            more than torch's current setting); on a CPU encoder without workers torch's current
            setting (at most the CPUs); on a GPU torch's setting as is.
        pointcloud: decode settings of 3d samples (mesh sampling, size limits; defaults of
            :class:`~cmcr.pipeline.pointcloud.PointCloudDecoding`); ignored for other modalities.
        handler: the failure policy, called with each shard's failure records after they are recorded
            and its good rows written: :func:`record_and_continue` (default) or :func:`fail_fast`
            (``--fail-fast``: raises :class:`InputDataError` at the first shard with a failure).

    Returns:
        An :class:`EncodeReport` (rows, failures and where the time went; ``torch_threads`` used).

    Raises:
        InputDataError: no shards, or their ``shards.json`` records another modality;
        StoreMismatchError: the store was made by another encoder, preprocessing, dtype or precision
        (without ``overwrite``; the message names the fields);
        OutputLockedError: another process starts the store over, or (``overwrite``) encodes into it;
        EncoderError: the encoder cannot embed ``modality``; ConfigError: ``batch_size < 1`` or
        ``num_workers < 0``; ChangedShardError: a shard changed since it was encoded into the store
        (nothing is encoded); KeyClashError: a shard's keys are already in the store from another
        shard (parts written before it are kept).
    """
    t0 = time.perf_counter()
    check_run_settings(batch_size=batch_size, num_workers=num_workers)
    paths = list_shards(shards)
    check_shards_modality(paths, modality)
    store = open_store(store_path, encoder, modality, overwrite=overwrite, dtype=dtype, command=command,
                       start_over=start_over, pointcloud=pointcloud, media_roots=media_roots_of_shards(paths))
    report = EncodeReport(store=str(store.path))
    todo, idents = shards_to_do(paths, store)
    report.shards_skipped = len(paths) - len(todo)
    if not todo:
        report.wall_s = time.perf_counter() - t0
        return report

    nw = max(0, int(num_workers))
    before = torch.get_num_threads()
    auto = None
    if torch_threads is None and encoder.device == "cpu":
        if nw:
            auto = AutoThreads()
            torch_threads = auto.threads
        else:  # decoding and the forward pass take turns: all cores to each
            torch_threads = max(1, min(before, usable_cpus()))
    report.torch_threads = int(torch_threads or before)
    torch.set_num_threads(report.torch_threads)
    try:
        _run_local(todo, idents, encoder, modality, store, report, t0, batch_size=batch_size, nw=nw,
                   prefetch_factor=prefetch_factor, progress=progress, pointcloud=pointcloud, handler=handler,
                   auto=auto)
    finally:
        torch.set_num_threads(before)
        if auto is not None:
            report.torch_threads = auto.threads
            report.thread_changes = [list(h) for h in auto.history]
            report.decode_share = auto.decode_share
            report.other_load = auto.last_others
    report.wall_s = time.perf_counter() - t0
    return report


def check_run_settings(*, batch_size: int, num_workers: int = 0) -> None:
    """Validate the loop settings of both engines.

    Raises:
        ConfigError: ``batch_size < 1`` or ``num_workers < 0``.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ConfigError(f"number of workers must be >= 0 (0 = decode in the main process), got {num_workers}")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_decode_share(cpus: int, cap: int, decode_cpu_s: float, forward_cpu_s: float,
                             others: float = 0.0) -> int:
    """torch threads of a CPU forward pass that shares ``cpus`` cores with decode workers (and with
    ``others`` cores' worth of other processes' work).

    The rule: give the forward pass the cores that neither the decode nor other processes need. Of
    the CPU work per sample, the decode workers' share is ``s = decode / (decode + forward)``; of the
    ``cpus - others`` cores left to this run they keep a share ``s`` busy, and the forward pass gets
    ``round((cpus - others) * (1 - s))`` threads (halves round up), at least 1 and at most ``cap``.
    On an idle 2-core machine: 2 threads while the decode costs at most a third of the forward pass
    (ViT-B-32 on 640x480 JPEGs, CLAP audio and text: < 15 %), 1 thread when decoding costs more or
    when another process keeps more than about half a core busy. Measured on 2 cores
    (docs/encode.md#performance): idle, one thread next to two mostly idle workers ran at
    ~0.5-0.86x a plain decode-then-forward loop with two threads; with other processes holding a
    core, one thread was 1.4-2.4x faster than two for images and text (the two threads wait for
    each other at every parallel region while one of them waits for a core).

    Args:
        cpus: cores the process may use (:func:`usable_cpus`); cap: the most threads to use (torch's
            setting before the run: its default is one per physical core, a caller's lower setting is kept).
        decode_cpu_s: CPU seconds of the decode workers (read, decode, preprocess, collate) for some
            samples; forward_cpu_s: core seconds of the forward pass (wall seconds x threads) for the
            same number of samples (any common unit: only the ratio matters).
        others: cores kept busy by other processes (:meth:`AutoThreads.others`), clipped to ``[0, cpus - 1]``.

    Returns:
        The number of threads, in ``[1, min(cap, cpus)]``; with nothing measured (zeros) ``min(cap, cpus)``.
    """
    top = max(1, min(int(cap), int(cpus)))
    free = cpus - min(max(0.0, float(others)), cpus - 1.0)
    total = max(0.0, decode_cpu_s) + max(0.0, forward_cpu_s)
    share = max(0.0, decode_cpu_s) / total if total > 0 else 0.0
    return max(1, min(top, math.floor(free * (1.0 - share) + 0.5)))


def _busy_cpu_seconds(cpus: set[int]) -> float | None:
    """Seconds the CPUs ``cpus`` have been busy since boot, from ``/proc/stat`` (user, nice, system,
    irq, softirq and steal time). Niced work counts: with the scheduler's autogroups (the Linux
    default) a niced process in another session gets as much of a core as ours. ``None`` where it
    cannot be read (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        hz = os.sysconf("SC_CLK_TCK")
        busy = 0
        for line in lines:
            name, *vals = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in vals[:8])
            busy += user + nice + system + irq + softirq + steal
        return busy / hz
    except (OSError, ValueError, AttributeError):
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a thread that ended meanwhile
        return ""


def _own_cpu_seconds() -> float | None:
    """CPU seconds of this process (all its threads) plus those of its child processes (the decode
    workers, forked by whichever thread: live ones from ``/proc/<pid>/stat``, exited ones from
    ``os.times``). ``None`` where ``/proc`` cannot tell (not Linux)."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        if not Path(f"/proc/self/task/{os.getpid()}/children").exists():  # kernel without CONFIG_PROC_CHILDREN
            return None
        pids = {pid for task in Path("/proc/self/task").iterdir() for pid in _read(task / "children").split()}
        own = time.process_time() + os.times().children_user + os.times().children_system
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            own += (int(fields[11]) + int(fields[12])) / hz
        return own
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class AutoThreads:
    """The default torch threads of a CPU forward pass next to DataLoader decode workers (the local
    engine of :func:`encode_shards` when ``torch_threads`` is not given).

    Starts at the most threads allowed, ``min(cap, cpus)``, as if decoding were cheap (a real
    model's forward pass on a CPU usually dwarfs it; otherwise only the first batch pays). After
    every embedded batch it recomputes :func:`threads_for_decode_share` from the measured decode
    load — the workers' CPU seconds per sample (their ``time.process_time``, so a worker waiting
    for a core is not counted as decoding) against the forward pass's core seconds per sample
    (wall seconds x threads; the first batch's forward pass, which pays one-off set-up costs,
    counts only until the second one is in) — and from other processes' load (:meth:`others`: the
    machine's busy CPU seconds from ``/proc/stat`` minus those of this process and its workers, per
    wall second since the run started), and sets torch's threads when the answer changes, so a run
    uses measured threads from its second batch on. ``threads`` is the current choice, ``history``
    the ``(batch, threads)`` changes, ``last_others`` the last other load (cores).
    """

    def __init__(self, cap: int | None = None, cpus: int | None = None):
        self.cpus = usable_cpus() if cpus is None else int(cpus)
        self.cap = torch.get_num_threads() if cap is None else int(cap)
        self.threads = threads_for_decode_share(self.cpus, self.cap, 0.0, 0.0)
        self.history: list[tuple[int, int]] = [(0, self.threads)]
        self.last_others: float | None = None
        self._workers: dict[int, tuple[float, int]] = {}
        self._forward_cpu_s, self._forward_n, self._batches = 0.0, 0, 0
        try:
            self._cpuset = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self._cpuset = set(range(self.cpus))
        self._clock0 = self._clock()

    def _clock(self) -> tuple[float, float, float] | None:
        busy, own = _busy_cpu_seconds(self._cpuset), _own_cpu_seconds()
        return None if busy is None or own is None else (time.perf_counter(), busy, own)

    def others(self) -> float:
        """Cores' worth of CPU time other processes used since the run started (0 where unknown)."""
        now = self._clock()
        if now is None or self._clock0 is None:
            return 0.0
        wall = now[0] - self._clock0[0]
        if wall <= 0.0:
            return 0.0
        return max(0.0, ((now[1] - self._clock0[1]) - (now[2] - self._clock0[2])) / wall)

    @property
    def decode_share(self) -> float | None:
        """The decode workers' share of the CPU work per sample so far (``None`` before it is measured)."""
        d, f = self._per_sample()
        return d / (d + f) if d + f > 0 else None

    def _per_sample(self) -> tuple[float, float]:
        cpu = sum(c for c, _ in self._workers.values())
        n = sum(k for _, k in self._workers.values())
        if not (n and self._forward_n):
            return 0.0, 0.0
        return cpu / n, self._forward_cpu_s / self._forward_n

    def observe(self, prepared: Prepared, forward_s: float) -> int:
        """Count one embedded batch (its worker's load, ``forward_s`` wall seconds of its forward
        pass at the current threads) and set torch's threads for the next one; returns them."""
        if prepared.worker >= 0:
            self._workers[prepared.worker] = (prepared.worker_cpu_s, prepared.worker_samples)
        if not prepared.items:  # every sample failed: no forward pass to measure
            return self.threads
        self._batches += 1
        cpu_s, n = forward_s * self.threads, len(prepared.items)
        if self._batches == 2:  # from now on without the first batch's one-off set-up costs
            self._forward_cpu_s, self._forward_n = 0.0, 0
        self._forward_cpu_s += cpu_s
        self._forward_n += n
        d, f = self._per_sample()
        if f > 0:
            self.last_others = self.others()
            new = threads_for_decode_share(self.cpus, self.cap, d, f, self.last_others)
            if new != self.threads:
                self.threads = new
                self.history.append((self._batches, new))
                torch.set_num_threads(new)
        return self.threads


def _run_local(todo: list[Path], idents: list[str], encoder: Encoder, modality: str, store: Store,
               report: EncodeReport, t0: float, *, batch_size: int, nw: int, prefetch_factor: int,
               progress: bool, pointcloud: PointCloudDecoding | None = None,
               handler: FailureHandler = record_and_continue, auto: AutoThreads | None = None) -> None:
    """The DataLoader loop of :func:`encode_shards` (writes each shard once all its batches are in;
    ``auto``: sizes torch's threads after each batch)."""
    if modality == "3d" and nw:
        import trimesh  # noqa: F401  (imported once here, inherited by the forked workers: ~1-4 s each otherwise)
    dataset = ShardBatches(todo, encoder.preprocessor(modality), modality, batch_size, pointcloud)
    loader = DataLoader(dataset, batch_size=None, num_workers=nw, worker_init_fn=_worker_init if nw else None,
                        prefetch_factor=prefetch_factor if nw else None, persistent_workers=False,
                        pin_memory=encoder.device.startswith("cuda"),
                        multiprocessing_context="fork" if nw and os.name == "posix" else None)
    n_workers = max(1, nw)
    pending: dict[int, dict[str, Any]] = {}
    live_failures = 0

    with progress_bar(progress) as bar:
        task = bar.add_task(f"encode {modality}", total=len(todo), samples=0, rate=0.0, failures=0, shard="")
        it = iter(loader)
        while True:
            tw = time.perf_counter()
            try:
                msg = next(it)
            except StopIteration:
                break
            report.wait_s += time.perf_counter() - tw
            i = msg["shard"]
            st = pending.setdefault(i, {"batches": {}, "ends": 0, "n": None, "error": None})
            if msg["kind"] == "batch":
                prepared: Prepared = msg["prepared"]
                report.add_prepared(prepared)
                tm = time.perf_counter()
                emb, ok, fails = embed_items(encoder, modality, prepared.keys, prepared.items,
                                             shard_source(todo[i]), batch=msg["collated"])
                forward_s = time.perf_counter() - tm
                report.model_s += forward_s
                if auto is not None:
                    auto.observe(prepared, forward_s)
                st["batches"][msg["batch"]] = (prepared, emb, ok, fails)
                report.samples += len(prepared.keys) + len(prepared.failures)
                live_failures += len(prepared.failures) + len(fails)
                elapsed = time.perf_counter() - t0
                bar.update(task, samples=report.samples, rate=report.samples / max(elapsed, 1e-9),
                           failures=live_failures, shard=shard_name(todo[i]))
            else:
                st["ends"] += 1
                if msg["batches"] is not None:  # None: a worker that did not read this (URL) shard
                    st["n"] = msg["batches"]
                st["error"] = st["error"] or msg["error"]
            if st["ends"] == n_workers and len(st["batches"]) >= (st["n"] or 0):
                batches = [st["batches"][b] for b in range(st["n"])]
                finish_shard(store, modality, encoder.dim, todo[i], idents[i], batches, st["error"], report,
                             handler)
                del pending[i]
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=1, samples=report.samples, rate=report.samples / max(elapsed, 1e-9),
                           failures=report.failures, shard=shard_name(todo[i]))
    if pending:  # a worker died: those shards have no part; a rerun retries them
        log.error("%d shard(s) did not complete: %s", len(pending), [shard_name(todo[i]) for i in pending])
