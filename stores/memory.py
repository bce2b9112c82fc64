"""Memories and semantic completion (C-MCR section 3.1, "semantic enhancement").

A *memory* is a store of the non-shared modality inside one MCR (CLIP image embeddings of
unrelated images, CLAP audio embeddings of unrelated clips). The *completion* (pseudo embedding)
of a query ``q`` is the softmax-weighted mean of the memory rows::

    p(q) = sum_k softmax_k(<q, m_k> / tau) * m_k          (C-MCR, Eq. 1; tau = 0.01 by default)

Three ways to compute it:

* :func:`complete_exact` — exact, for any memory size: chunked *online softmax* (running max,
  running denominator, running weighted sum), so RAM is bounded by ``chunk_rows x D`` plus the
  query block, whatever the memory size. The memory may be an array or a :class:`Store`
  (streamed part by part).
* :func:`complete_topk` — approximate: FAISS retrieves the top-k memory rows of each query and
  the softmax runs over those k only. With tau = 0.01 the weights of far rows are negligible, so
  the two agree closely (see ``benchmarks/bench_connect.py``).
* :func:`complete_paired_store` — completion from a *paired memory* (weights from one MCR's
  rows, averaging the same items' rows of both MCRs): the memory-centric pseudo pairs.
* :class:`MemoryQueue` — a fixed-capacity FIFO of memory rows refilled from the memory store,
  for memories larger than device memory during training.

:func:`complete_store` computes the completions of a whole query store once (encoders are
frozen) and writes them as a store keyed like the queries.

This module imports neither ``cmcr.pipeline`` nor ``cmcr.trainer``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcr.errors import StoreMismatchError, StoreValidationError
from cmcr.stores.files import (
    claim_output,
    locks_output,
    resolve_device,  # noqa: F401 - the one device helper, re-exported
)
from cmcr.stores.store import Store, canonical_json, same_encoder

log = logging.getLogger(__name__)

#: Default completion temperature tau_m (method.md section 1; C-MCR paper).
DEFAULT_TEMPERATURE = 0.01
#: Memory rows per chunk of the online softmax (RAM: chunk_rows x D x 4 bytes, 32 MiB at D=512).
DEFAULT_CHUNK_ROWS = 16384
#: Queries per block (RAM: query_rows x chunk_rows x 4 bytes of logits).
DEFAULT_QUERY_ROWS = 1024
#: Default number of neighbours of the approximate completion.
DEFAULT_TOPK = 256
#: Bytes of gathered neighbour rows per sub-block of the top-k completion (queries x k x D x 4).
TOPK_GATHER_BYTES = 64 << 20
#: A memory store is held in RAM for the exact completion only up to this size as float32; larger
#: memories are streamed chunk by chunk (RAM bounded by the chunk, not by the memory).
MEMORY_IN_RAM_BYTES = 256 << 20
#: Queries per completion call of :func:`complete_store` (progress is reported after each).
COMPLETION_QUERY_BLOCK = 4096
#: Memory rows per chunk of :func:`complete_store`'s exact completion: the logits and weights of
#: one step are COMPLETION_QUERY_BLOCK x COMPLETION_CHUNK_ROWS float32 (64 MiB each).
COMPLETION_CHUNK_ROWS = 4096


# ---------------------------------------------------------------------------------------- memory
@dataclass
class Memory:
    """A memory held in RAM: ``embeddings`` ``(M, D)`` (float16 or float32, unit rows), the store's
    ``modality`` and encoder ``identity``, and the source store's ``fingerprint``."""

    embeddings: np.ndarray
    modality: str
    identity: dict[str, Any]
    fingerprint: str
    path: str | None = None

    @classmethod
    def from_store(cls, store: Store | str | os.PathLike, *, dtype: str = "float32") -> Memory:
        """Load a whole memory store into RAM (``(M, D)`` in ``dtype``).

        Raises:
            StoreValidationError: the store is empty.
        """
        store = store if isinstance(store, Store) else Store.open(store)
        if store.num_rows == 0:
            raise StoreValidationError(f"{store.path}: the memory store is empty; encode some {store.modality} first")
        return cls(embeddings=store.embeddings(dtype=np.dtype(dtype)), modality=store.modality,
                   identity=store.encoder, fingerprint=store.fingerprint(), path=str(store.path))

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def _memory_chunks(memory: np.ndarray | Store | Memory, chunk_rows: int) -> Iterator[np.ndarray]:
    """Yield ``(m, D)`` float32 chunks of the memory (a store is streamed part by part)."""
    if isinstance(memory, Memory):
        memory = memory.embeddings
    if isinstance(memory, Store):
        for batch in memory.iter_batches(batch_size=chunk_rows, dtype=np.float32):
            yield batch.embeddings
        return
    for start in range(0, len(memory), chunk_rows):
        yield np.asarray(memory[start:start + chunk_rows], dtype=np.float32)


def _memory_len_dim(memory: np.ndarray | Store | Memory) -> tuple[int, int]:
    if isinstance(memory, Store):
        return memory.num_rows, memory.dim
    arr = memory.embeddings if isinstance(memory, Memory) else memory
    return int(arr.shape[0]), int(arr.shape[1])


# ------------------------------------------------------------------------------ exact completion
def online_softmax_completion(
    queries: torch.Tensor, chunks: Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], temperature: float
) -> torch.Tensor:
    """Exact ``softmax(q Mᵀ / tau) M`` over a memory given as a stream of chunks.

    A chunk may also be a pair ``(keys, values)`` (``(m_i, D)`` and ``(m_i, D_v)``): the weights
    come from the keys and average the values, ``softmax(q Kᵀ / tau) V`` — a *paired memory*, e.g.
    CLAP-text keys with the same captions' CLIP-text values (the memory-centric pseudo pairs of
    docs/method.md).

    Keeps, per query, the running maximum logit ``m``, the running denominator ``l = sum exp(s - m)``
    and the running numerator ``acc = sum exp(s - m) * row``; when a chunk raises the maximum the
    old sums are rescaled by ``exp(m_old - m_new)`` (the online softmax of Milakov & Gimelshein,
    2018). The result equals the dense formula up to float32 rounding, for any memory size. The
    exponentials and the rescaling run in place on each chunk's logits (no second ``(Q, m)`` temporary:
    1.38x faster at 1024 queries x 16,384-row chunks, about as fast as the two matrix products alone;
    ``benchmarks/bench_connect.py``). Call it without autograd (every caller holds ``torch.no_grad``).

    Args:
        queries: ``(Q, D)`` float32 tensor.
        chunks: iterator of ``(m_i, D)`` float32 tensors on the queries' device, or of
            ``(keys, values)`` pairs of them.
        temperature: tau > 0.

    Returns:
        ``(Q, D)`` (``(Q, D_v)`` for paired chunks) float32, not normalised.
    """
    q = queries / temperature
    run_max = denom = acc = None
    for item in chunks:
        chunk, vals = item if isinstance(item, tuple) else (item, item)
        logits = q @ chunk.T  # (Q, m), a fresh tensor: the steps below work in place on it
        chunk_max = logits.amax(dim=1, keepdim=True)
        if acc is None:  # first chunk: nothing to rescale
            run_max = chunk_max
            weights = logits.sub_(run_max).exp_()
            denom = weights.sum(dim=1, keepdim=True)
            acc = weights @ vals
            continue
        new_max = torch.maximum(run_max, chunk_max)
        scale = torch.exp(run_max - new_max)
        weights = logits.sub_(new_max).exp_()
        denom.mul_(scale).add_(weights.sum(dim=1, keepdim=True))
        acc.mul_(scale).addmm_(weights, vals)
        run_max = new_max
    if acc is None:
        raise StoreValidationError("the memory is empty; completion needs at least one memory row")
    return acc / denom


def complete_exact(
    queries: np.ndarray,
    memory: np.ndarray | Store | Memory,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    query_rows: int = DEFAULT_QUERY_ROWS,
    normalize: bool = True,
    device: str | torch.device = "cpu",
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Exact semantic completion of ``queries`` from ``memory`` (C-MCR Eq. 1), bounded RAM.

    Args:
        queries: ``(Q, D)`` (or ``(D,)``) float array of unit rows from the memory's own MCR.
        memory: ``(M, D)`` array, a :class:`Memory`, or a :class:`Store` (streamed chunk by chunk;
            each query block re-reads the store, so use large ``query_rows`` for store memories).
        temperature: tau_m (default 0.01, method.md section 1).
        chunk_rows: memory rows per chunk (RAM bound).
        query_rows: queries per block.
        normalize: L2-normalise the pseudo embeddings (they are stored in cosine stores and the
            trainer normalises them anyway after adding noise).
        device: torch device for the arithmetic (``"auto"``: CUDA when present).
        values: optional ``(M, D_v)`` array row-aligned with an in-RAM ``memory`` (a *paired
            memory*): the softmax weights of the memory rows average these rows instead
            (``softmax(q Mᵀ/tau) V``); chunked like the memory.

    Returns:
        ``(Q, D)`` (``(Q, D_v)`` with ``values``) float32 pseudo embeddings (``(D,)`` for a single query).

    Raises:
        StoreMismatchError: query and memory dims differ, or ``values`` has another row count.
        ValueError: ``temperature <= 0``, or ``values`` with a :class:`Store` memory.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    single = np.ndim(queries) == 1
    q_all = np.atleast_2d(np.array(queries, dtype=np.float32))  # a writable copy for torch
    m_len, m_dim = _memory_len_dim(memory)
    if q_all.shape[1] != m_dim:
        raise StoreMismatchError(f"queries have dim {q_all.shape[1]}, the memory has dim {m_dim}")
    if m_len == 0:
        raise StoreValidationError("the memory is empty; completion needs at least one memory row")
    if values is not None:
        if isinstance(memory, Store):
            raise ValueError("values (a paired memory) need the memory rows as an array, not a store")
        if len(values) != m_len:
            raise StoreMismatchError(f"values have {len(values)} rows, the memory has {m_len}")
    dev = resolve_device(device)
    out = np.empty((len(q_all), m_dim if values is None else int(values.shape[1])), dtype=np.float32)

    def tensors() -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        if values is None:
            for c in _memory_chunks(memory, chunk_rows):
                yield torch.from_numpy(np.require(c, np.float32, ["C", "W"])).to(dev)
            return
        for c, v in zip(_memory_chunks(memory, chunk_rows), _memory_chunks(values, chunk_rows), strict=True):
            yield (torch.from_numpy(np.require(c, np.float32, ["C", "W"])).to(dev),
                   torch.from_numpy(np.require(v, np.float32, ["C", "W"])).to(dev))

    cached: list[Any] | None = None
    # An in-RAM memory that fits in one chunk is moved to the device once for all query blocks.
    if not isinstance(memory, Store) and m_len <= chunk_rows:
        cached = list(tensors())
    with torch.no_grad():
        for start in range(0, len(q_all), query_rows):
            q = torch.from_numpy(q_all[start:start + query_rows]).to(dev)
            chunks = iter(cached) if cached is not None else tensors()
            p = online_softmax_completion(q, chunks, temperature)
            if normalize:
                p = torch.nn.functional.normalize(p, dim=1)
            out[start:start + len(q)] = p.cpu().numpy()
    return out[0] if single else out


def complete_dense(queries: np.ndarray, memory: np.ndarray, *, temperature: float = DEFAULT_TEMPERATURE,
                   normalize: bool = True) -> np.ndarray:
    """Reference completion ``softmax(q Mᵀ / tau) M`` in one dense float64 step (small inputs only;
    used by the tests and the benchmark). Returns ``(Q, D)`` float32."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    m = np.asarray(memory, dtype=np.float64)
    logits = q @ m.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    p = w @ m
    if normalize:
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p.astype(np.float32)


# ------------------------------------------------------------------------------ top-k completion
def build_memory_index(memory: np.ndarray, *, kind: str = "auto", seed: int = 0) -> Any:
    """A FAISS inner-product index over ``memory`` ``(M, D)`` for :func:`complete_topk`.

    ``kind``: ``"flat"`` (exact search), ``"hnsw"`` (HNSW32, fast approximate search) or
    ``"auto"`` (flat up to 200 000 rows, HNSW above).
    """
    import faiss

    x = np.ascontiguousarray(memory, dtype=np.float32)
    d = x.shape[1]
    if kind == "auto":
        kind = "flat" if len(x) <= 200_000 else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        faiss.cvar.rand_seed = seed  # type: ignore[attr-defined]
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown memory index kind {kind!r}: use auto, flat or hnsw")
    index.add(x)
    return index


def _index_rows(index: Any, ids: np.ndarray) -> np.ndarray:
    """``(n, D)`` float32 rows of a FAISS index (or :class:`~cmcr.stores.index.StoreIndex`) by id.
    IVF indexes get a direct map on first use (8 bytes per row)."""
    import faiss

    idx = index.index if hasattr(index, "search_arrays") else index
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return np.asarray(idx.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64)), dtype=np.float32)


def complete_topk(
    queries: np.ndarray,
    memory: np.ndarray | Memory | None,
    *,
    k: int = DEFAULT_TOPK,
    temperature: float = DEFAULT_TEMPERATURE,
    index: Any = None,
    query_rows: int = 8192,
    normalize: bool = True,
    gather_bytes: int = TOPK_GATHER_BYTES,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Approximate completion: softmax over the top-``k`` memory rows of each query only.

    RAM: the search results of ``query_rows`` queries plus ``gather_bytes`` of gathered neighbour
    rows (the weighted sum runs in sub-blocks of ``gather_bytes / (k·D·4)`` queries), whatever the
    number of queries.

    Args:
        queries: ``(Q, D)`` float array.
        memory: ``(M, D)`` array (rows are gathered by id), a :class:`Memory`, or ``None``: the rows
            are then read back from ``index`` (``reconstruct_batch``; float16 codes are exact for a
            float16 store), so a memory-mapped store index serves both search and rows.
        k: neighbours per query (clipped to M).
        temperature: tau_m.
        index: a FAISS index over the memory (``search(x, k) -> (scores, ids)``) or an object with
            ``search_arrays(x, k)`` (e.g. :class:`cmcr.stores.index.StoreIndex`); built with
            :func:`build_memory_index` when ``None`` (then ``memory`` is required).
        query_rows: queries per FAISS search call.
        normalize: L2-normalise the result.
        gather_bytes: RAM bound of the gathered rows, bytes.
        values: optional ``(M, D_v)`` rows aligned with the memory rows (a paired memory): the
            top-k weights average these rows instead of the memory rows.

    Returns:
        ``(Q, D)`` (``(Q, D_v)`` with ``values``) float32.

    Raises:
        ValueError: ``temperature <= 0``, or neither ``memory`` nor ``index``.
        StoreMismatchError: query and memory dims differ.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mem = memory.embeddings if isinstance(memory, Memory) else memory
    if mem is None and index is None:
        raise ValueError("complete_topk needs the memory rows or an index over them")
    m_len = len(mem) if mem is not None else int(index.index.ntotal if hasattr(index, "search_arrays")
                                                 else index.ntotal)
    m_dim = mem.shape[1] if mem is not None else int(index.index.d if hasattr(index, "search_arrays") else index.d)
    single = np.ndim(queries) == 1
    q_all = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q_all.shape[1] != m_dim:
        raise StoreMismatchError(f"queries have dim {q_all.shape[1]}, the memory has dim {m_dim}")
    k = max(1, min(int(k), m_len))
    if values is not None and len(values) != m_len:
        raise StoreMismatchError(f"values have {len(values)} rows, the memory has {m_len}")
    if index is None:
        index = build_memory_index(mem)
    v_dim = m_dim if values is None else int(values.shape[1])
    sub = max(1, int(gather_bytes) // (k * v_dim * 4))
    out = np.empty((len(q_all), v_dim), dtype=np.float32)
    for start in range(0, len(q_all), query_rows):
        q = q_all[start:start + query_rows]
        if hasattr(index, "search_arrays"):
            scores, ids = index.search_arrays(q, k)
        else:
            scores, ids = index.search(q, k)
        scores = np.asarray(scores, dtype=np.float64)
        ids = np.asarray(ids)
        valid = ids >= 0  # FAISS pads with -1 when fewer than k results exist
        logits = np.where(valid, scores / temperature, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
        w = w.astype(np.float32)
        safe = np.where(valid, ids, 0)
        for s in range(0, len(q), sub):
            e = min(s + sub, len(q))
            flat_ids = safe[s:e].reshape(-1)
            if values is not None:
                got = np.asarray(values[flat_ids], dtype=np.float32)
            else:
                got = _index_rows(index, flat_ids) if mem is None else np.asarray(mem[flat_ids], dtype=np.float32)
            p = np.einsum("qk,qkd->qd", w[s:e], got.reshape(e - s, k, -1))
            if normalize:
                p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
            out[start + s:start + e] = p
    return out[0] if single else out


def memory_store_index(memory_store: Store, *, progress: bool = False) -> Any:
    """The memory store's own FAISS index (:mod:`cmcr.stores.index`), memory-mapped, for
    :func:`complete_topk`: reused when current, else built with ``build_index`` and saved beside
    the store (``<store>/index/``; ``cmcr store index`` builds it ahead of time). The planner keeps
    an approximate index only if it reaches recall@10 >= 0.95 and beats exact search; otherwise
    the index is exact (flat)."""
    from cmcr.stores.index import build_index, describe_index, open_index

    desc = describe_index(memory_store)
    usable = desc is not None and not desc["stale"] and (desc.get("target_reached") or desc.get("kept_below_target"))
    if not usable:
        log.info("building the FAISS index of memory store %s (%d rows) for the top-k completion",
                 memory_store.path, memory_store.num_rows)
        try:
            build_index(memory_store, progress=progress)
        except OSError as e:
            raise StoreValidationError(
                f"{memory_store.path}: cannot write the memory store's FAISS index for the top-k completion "
                f"({e}); make the store writable and run `cmcr store index {memory_store.path}`, or use the "
                f"exact completion"
            ) from e
    return open_index(memory_store)


# ------------------------------------------------------------------------------ completion store
def completion_params(method: str, temperature: float, k: int | None, query_store: Store,
                      memory_store: Store) -> dict[str, Any]:
    """The parameters recorded in (and checked against) a completion store's ``extra.completion``."""
    return {
        "method": method,
        "temperature": float(temperature),
        "k": int(k) if method == "topk" and k is not None else None,
        "query_store": {"path": str(query_store.path), "fingerprint": query_store.fingerprint(),
                        "modality": query_store.modality},
        "memory_store": {"path": str(memory_store.path), "fingerprint": memory_store.fingerprint(),
                         "modality": memory_store.modality, "rows": memory_store.num_rows},
    }


@locks_output("out_path")
def complete_store(
    query_store: Store | str | os.PathLike,
    memory_store: Store | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    method: str = "exact",
    temperature: float = DEFAULT_TEMPERATURE,
    k: int = DEFAULT_TOPK,
    batch_rows: int = 65536,
    chunk_rows: int = COMPLETION_CHUNK_ROWS,
    memory_in_ram: bool | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Any = None,
    query_block: int = COMPLETION_QUERY_BLOCK,
) -> Store:
    """Complete every row of ``query_store`` from ``memory_store`` and write the pseudo embeddings
    as a store keyed like the queries (one part per block of ``batch_rows`` queries; a rerun
    resumes after the last finished block).

    The output store has the memory's modality, encoder identity, preprocessing and dim, dtype
    float32, and ``extra = {"pseudo": True, "completion": completion_params(...)}`` so it can never
    be mistaken for real embeddings of that modality.

    Args:
        query_store: shared-modality store of one MCR (e.g. CLAP text).
        memory_store: memory store of the same MCR (e.g. CLAP audio): same encoder identity and dim,
            another modality.
        out_path: output store folder.
        method: ``"exact"`` (:func:`complete_exact`) or ``"topk"`` (:func:`complete_topk`).
        temperature: tau_m; k: neighbours of ``"topk"``.
        batch_rows: queries per part.
        chunk_rows: memory rows per chunk of the exact completion.
        memory_in_ram: hold the memory in RAM for the exact method (default: when it is at most
            :data:`MEMORY_IN_RAM_BYTES` as float32); otherwise it is streamed from disk chunk by
            chunk for every query block, so RAM stays bounded by ``chunk_rows`` and ``query_block``
            whatever the memory size. The ``topk`` method searches and reads rows through the
            memory store's own FAISS index (:func:`memory_store_index`, memory-mapped; built and
            saved beside the memory store when missing).
        device: torch device of the exact completion.
        overwrite: start the output store over, whatever it holds (the one meaning of ``--overwrite``);
            without it a store made with the same parameters and inputs is resumed, another is refused.
        progress: optional callable ``progress(done_rows, total_rows)``, called after every
            ``query_block`` queries.
        query_block: queries per completion call.

    Returns:
        The completion :class:`Store`.

    Raises:
        StoreMismatchError: the memory comes from another encoder or dim than the queries, has the
            queries' modality, or an existing output store was made with other parameters.
    """
    qs = query_store if isinstance(query_store, Store) else Store.open(query_store)
    ms = memory_store if isinstance(memory_store, Store) else Store.open(memory_store)
    if not same_encoder(qs.encoder, ms.encoder):
        raise StoreMismatchError(
            f"memory store {ms.path} was made by encoder {canonical_json(ms.encoder)}, but the query store "
            f"{qs.path} by {canonical_json(qs.encoder)}; a memory must come from the same MCR (encoder) as "
            f"the queries it completes"
        )
    if qs.dim != ms.dim:
        raise StoreMismatchError(f"query store {qs.path} has dim {qs.dim}, memory store {ms.path} has dim {ms.dim}")
    if qs.modality == ms.modality:
        raise StoreMismatchError(
            f"memory store {ms.path} holds {ms.modality!r} like the query store {qs.path}; the memory must hold "
            f"the other modality of the MCR (e.g. audio for CLAP text queries)"
        )
    if method not in ("exact", "topk"):
        raise ValueError(f"completion method must be 'exact' or 'topk', got {method!r}")
    params = completion_params(method, temperature, k, qs, ms)
    out_path = Path(out_path)
    out = _open_completion_store(out_path, ms, params, overwrite)
    done = out.done_sources()
    total = qs.num_rows
    if memory_in_ram is None:
        memory_in_ram = ms.num_rows * ms.dim * 4 <= MEMORY_IN_RAM_BYTES
    need_blocks = [(s, min(s + batch_rows, total)) for s in range(0, total, batch_rows)
                   if f"queries:{s}-{min(s + batch_rows, total)}" not in done]
    if not need_blocks:
        return out
    memory: np.ndarray | Store | None = None
    index = None
    if method == "topk":
        index = memory_store_index(ms)  # memory-mapped: serves the search and the neighbour rows
    else:
        memory = ms.embeddings(dtype=np.float32) if memory_in_ram else ms
    pos = 0
    finished = total - sum(e - s for s, e in need_blocks)
    if progress is not None:
        progress(finished, total)
    for batch in qs.iter_batches(batch_size=batch_rows, dtype=np.float32):
        start, end = pos, pos + len(batch.keys)
        pos = end
        source = f"queries:{start}-{end}"
        if source in done:
            continue
        pseudo = np.empty_like(batch.embeddings)
        for s in range(0, len(pseudo), query_block):  # bounded RAM and a progress report per block
            e = min(s + query_block, len(pseudo))
            if method == "exact":
                # A streamed memory is re-read once per query block of the exact completion.
                pseudo[s:e] = complete_exact(batch.embeddings[s:e], memory, temperature=temperature,  # type: ignore[arg-type]
                                             chunk_rows=chunk_rows, query_rows=query_block, device=device)
            else:
                pseudo[s:e] = complete_topk(batch.embeddings[s:e], None, k=k, temperature=temperature, index=index)
            if progress is not None and e < len(pseudo):
                progress(finished + e, total)
        out.append_part(batch.keys, pseudo, source=source)
        finished += end - start
        if progress is not None:
            progress(finished, total)
    return out


def complete_paired_store(
    query_store: Store | str | os.PathLike,
    keys: np.ndarray,
    values: dict[str, tuple[np.ndarray, Store]],
    out_dir: str | os.PathLike,
    *,
    memory: dict[str, Any],
    method: str = "exact",
    temperature: float = DEFAULT_TEMPERATURE,
    k: int = DEFAULT_TOPK,
    batch_rows: int = 65536,
    chunk_rows: int = COMPLETION_CHUNK_ROWS,
    device: str | torch.device = "cpu",
    progress: Any = None,
    query_block: int = COMPLETION_QUERY_BLOCK,
    overwrite: bool = False,
) -> dict[str, Store]:
    """Complete every row of ``query_store`` from a *paired memory* and write one store per value.

    The weights of query ``q`` are ``w = softmax(q Kᵀ / tau)`` over the key rows ``K``; output
    ``name`` is ``norm(w V_name)`` for each value array ``V_name`` row-aligned with ``K``. This is
    the first hop of a memory-centric pseudo pair (docs/method.md, "Memory-centric pseudo pairs"):
    a CLAP audio clip weighs the captions by their CLAP text (``K``) and the same weights average
    the captions' CLAP text and CLIP text (two values), giving its pseudo caption in both MCRs.

    The queries are streamed from the store in blocks of ``batch_rows`` (one part per block in
    every output, resumed after the last block all outputs hold); the key and value rows are in
    RAM and consumed in chunks of ``chunk_rows`` (``exact``: the online softmax of
    :func:`online_softmax_completion`) or searched with a FAISS index over the keys (``topk``:
    :func:`complete_topk`, flat up to 200 000 rows, HNSW above).

    Args:
        query_store: the queries, e.g. MCR B's memory store (CLAP audio).
        keys: ``(N, D)`` float array of unit rows from the query store's encoder (e.g. CLAP text).
        values: ``name -> ((N, D_v) array, like)``; output ``out_dir/name`` is a store with
            ``like``'s modality, encoder identity, preprocessing and dim (``D_v`` must equal it).
        out_dir: folder of the output stores.
        memory: a JSON-able description of the paired memory (paths, fingerprints, the rows used);
            recorded in each output's ``extra.completion.paired``; an existing output made with
            the same description, method, temperature and query store is reused (resumed), one
            made with others is refused (:func:`~cmcr.stores.files.claim_output`) unless ``overwrite``.
        method: ``"exact"`` or ``"topk"``; temperature: tau_m; k: neighbours of ``"topk"``.
        batch_rows, chunk_rows, device, progress, query_block: as :func:`complete_store`.
        overwrite: start every output over (the one meaning of ``--overwrite``).

    Returns:
        ``name -> Store`` of the outputs, keyed like ``query_store``.

    Raises:
        StoreMismatchError: the keys' dim differs from the query store's, or a value array has
            another row count than the keys or another dim than its ``like`` store.
        ValueError: an unknown ``method``, no values, or ``temperature <= 0``.
    """
    qs = query_store if isinstance(query_store, Store) else Store.open(query_store)
    if method not in ("exact", "topk"):
        raise ValueError(f"paired completion method must be 'exact' or 'topk', got {method!r}")
    if not values:
        raise ValueError("complete_paired_store needs at least one value array")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2 or keys.shape[1] != qs.dim:
        raise StoreMismatchError(f"the paired memory's keys have shape {keys.shape}, the query store {qs.path} has "
                                 f"dim {qs.dim}")
    names = list(values)
    for name in names:
        arr, like = values[name]
        if len(arr) != len(keys) or arr.shape[1] != like.dim:
            raise StoreMismatchError(f"paired value {name!r} has shape {arr.shape}; expected ({len(keys)}, {like.dim})")
    stacked = np.ascontiguousarray(np.concatenate([np.asarray(values[n][0], dtype=np.float32) for n in names],
                                                  axis=1))
    bounds = np.cumsum([0] + [values[n][1].dim for n in names])
    params = {
        "method": method, "temperature": float(temperature), "k": int(k) if method == "topk" else None,
        "query_store": {"path": str(qs.path), "fingerprint": qs.fingerprint(), "modality": qs.modality},
        "memory_store": {"path": str(memory.get("path")), "fingerprint": memory.get("fingerprint")},
        "paired": memory,
    }
    out_dir = Path(out_dir)
    outs = {n: _open_completion_store(out_dir / n, values[n][1], {**params, "value": n}, overwrite)
            for n in names}
    done = {n: outs[n].done_sources() for n in names}
    total = qs.num_rows
    need = [(s, min(s + batch_rows, total)) for s in range(0, total, batch_rows)
            if any(f"queries:{s}-{min(s + batch_rows, total)}" not in d for d in done.values())]
    if not need:
        return outs
    index = build_memory_index(keys) if method == "topk" else None
    finished = total - sum(e - s for s, e in need)
    if progress is not None:
        progress(finished, total)
    pos = 0
    for batch in qs.iter_batches(batch_size=batch_rows, dtype=np.float32):
        start, end = pos, pos + len(batch.keys)
        pos = end
        source = f"queries:{start}-{end}"
        if all(source in d for d in done.values()):
            continue
        mixed = np.empty((len(batch.keys), stacked.shape[1]), dtype=np.float32)
        for s in range(0, len(mixed), query_block):
            e = min(s + query_block, len(mixed))
            if method == "exact":
                mixed[s:e] = complete_exact(batch.embeddings[s:e], keys, values=stacked, temperature=temperature,
                                            chunk_rows=chunk_rows, query_rows=query_block, normalize=False,
                                            device=device)
            else:
                mixed[s:e] = complete_topk(batch.embeddings[s:e], keys, values=stacked, k=k, index=index,
                                           temperature=temperature, normalize=False)
            if progress is not None and e < len(mixed):
                progress(finished + e, total)
        for i, n in enumerate(names):
            if source in done[n]:  # an interrupted run wrote this block to some outputs only
                continue
            part = mixed[:, bounds[i]:bounds[i + 1]]
            part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
            outs[n].append_part(batch.keys, part, source=source)
        finished += end - start
        if progress is not None:
            progress(finished, total)
    return outs


def _completion_provenance(params: dict[str, Any]) -> dict[str, Any]:
    """What a completion store is derived from: its parameters and the two input stores' fingerprints
    (their paths may move)."""
    out = {k: v for k, v in params.items() if k not in ("query_store", "memory_store")}
    for name in ("query_store", "memory_store"):
        out[name] = (params.get(name) or {}).get("fingerprint")
    return out


def _recorded_completion(path: Path) -> dict[str, Any] | None:
    """The provenance a completion store at ``path`` records (``None``: no store there)."""
    if not (path / "manifest.json").exists():
        return None
    old = (Store.open(path, validate="none").manifest.get("extra") or {}).get("completion") or {}
    return _completion_provenance(old)


def _open_completion_store(path: Path, memory: Store, params: dict[str, Any], overwrite: bool) -> Store:
    """Claim ``path`` (:func:`~cmcr.stores.files.claim_output`): reuse the completion store there when
    its parameters and input fingerprints match, start it over with ``overwrite``, else refuse."""
    with claim_output(path, kind="completion store", provenance=_completion_provenance(params), overwrite=overwrite,
                      recorded=_recorded_completion, error=StoreMismatchError) as claim:
        if claim.reuse:
            return Store.open(path)
        # The batching of an earlier, unfinished run may differ: a rerun with another batch_rows would
        # produce overlapping sources, which append_part rejects by key (safe, never silently wrong).
        return Store.create(path, modality=memory.modality, encoder=memory.encoder, dim=memory.dim,
                            dtype="float32", preprocessing=memory.preprocessing,
                            extra={"pseudo": True, "completion": params})


# ---------------------------------------------------------------------------------- memory queue
class MemoryQueue:
    """A fixed-capacity FIFO of memory rows on the training device, refilled from a memory store.

    For memories larger than device memory: the queue holds ``capacity`` rows; :meth:`advance`
    drops the ``n`` oldest rows and appends the next ``n`` rows of the store (cycling through the
    store, reshuffled with ``seed`` on every pass). Completions against :attr:`tensor` are
    completions against a moving window of the memory (cf. MoCo's queue).

    Args:
        store: the memory store.
        capacity: rows held (clipped to the store size).
        device: torch device.
        seed: shuffling seed (recorded by the trainer).
        read_rows: rows read from the store per refill read (shuffled within the read; one read
            block waits as float32 until the queue has taken it).
        chunk_rows: queue rows per chunk of :meth:`complete` (RAM: batch x chunk_rows x 4 bytes of logits).

    RAM: the queue, ``capacity x D x 4`` bytes (128 MiB at the default 65,536 x 512), plus one read
    block of ``read_rows x D x 4`` bytes and its shuffled copy while it is taken (32 MiB each at
    16,384 x 512), plus the ``batch x chunk_rows`` logits of :meth:`complete`. Before issue 11's
    fix the read block was 65,536 rows and the first fill concatenated the whole capacity once
    more: ~400 MB over exact completion for the two sides.
    """

    def __init__(self, store: Store, capacity: int, *, device: str | torch.device = "cpu", seed: int = 0,
                 read_rows: int = 16384, chunk_rows: int = 8192):
        if store.num_rows == 0:
            raise StoreValidationError(f"{store.path}: the memory store is empty")
        if capacity <= 0:
            raise ValueError(f"queue capacity must be positive, got {capacity}")
        self.store = store
        self.capacity = int(min(capacity, store.num_rows))
        self.device = resolve_device(device)
        self.read_rows = read_rows
        self.chunk_rows = max(1, int(chunk_rows))
        self._rng = np.random.default_rng(seed)
        self._pass = 0
        self._stream = self._rows()
        self._pending: np.ndarray | None = None
        self.tensor = torch.empty((self.capacity, store.dim), dtype=torch.float32, device=self.device)
        self._head = 0  # index of the oldest row
        filled = 0
        while filled < self.capacity:  # block by block: no second capacity-sized copy
            block = self._take(min(self.read_rows, self.capacity - filled))
            self.tensor[filled:filled + len(block)] = torch.from_numpy(np.ascontiguousarray(block)).to(self.device)
            filled += len(block)
        self.rows_served = self.capacity

    def _rows(self) -> Iterator[np.ndarray]:
        # Shuffle part order and rows within each read block per pass: RAM stays bounded by read_rows.
        while True:
            parts = list(self.store.parts)
            order = self._rng.permutation(len(parts))
            for i in order:
                for block in self.store.iter_part_embeddings(int(i), self.read_rows, np.float32):
                    yield block[self._rng.permutation(len(block))]
            self._pass += 1

    def _take(self, n: int) -> np.ndarray:
        out = []
        have = 0
        while have < n:
            if self._pending is None or len(self._pending) == 0:
                self._pending = next(self._stream)
            take = self._pending[: n - have]
            self._pending = self._pending[len(take):]
            out.append(take)
            have += len(take)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def advance(self, n: int) -> None:
        """Replace the ``n`` oldest rows by the next ``n`` rows of the store (``n`` clipped to capacity)."""
        n = int(min(n, self.capacity))
        if n <= 0:
            return
        new = torch.from_numpy(np.ascontiguousarray(self._take(n))).to(self.device)
        idx = (torch.arange(n, device=self.device) + self._head) % self.capacity
        self.tensor[idx] = new
        self._head = (self._head + n) % self.capacity
        self.rows_served += n

    @property
    def passes(self) -> int:
        """Completed passes over the store."""
        return self._pass

    def complete(self, queries: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
        """Exact completion of ``queries`` ``(B, D)`` float32 against the rows now in the queue;
        returns ``(B, D)`` float32, L2-normalised, without gradient."""
        with torch.no_grad():
            # chunks of the queue bound the logits to B x chunk_rows (not B x capacity)
            p = online_softmax_completion(queries.float(), iter(self.tensor.split(self.chunk_rows)), temperature)
            return torch.nn.functional.normalize(p, dim=1)
