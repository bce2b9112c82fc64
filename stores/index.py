"""FAISS indexes for embedding stores: plan, build, tune, save beside the store, search.

Plan-then-execute, in the style of autofaiss (``autofaiss/external/optimize.py``):

1. :func:`plan_index` — a pure function of (rows, dim, memory budget) that picks the index kind,
   the FAISS factory string and its parameters, with the reason in words. Unit-tested alone.
2. :func:`build_index` — trains and fills the planned index by streaming the store (RAM bounded by
   the index itself plus one batch), then tunes the search-time knob (``nprobe`` for IVF,
   ``efSearch`` for HNSW) against exact search on sampled store rows until recall@10 reaches the
   target (0.95 by default), and writes the index, its parameters and the measured recall to
   ``<store>/index/``.
3. :func:`open_index` — loads it (memory-mapped by default), refuses a stale index (one built for
   other store contents), and answers queries with keys, scores and metadata.

Index kinds (FAISS factory strings; ``D`` = dim, ``N`` = rows):

* ``flat`` — ``Flat``: exact inner product (or L2), for small stores. 4·D bytes per row.
* ``hnsw`` — ``HNSW32,SQfp16``: graph index with float16 vectors (lossless for a float16 store),
  ~2·D + 264 bytes per row; for mid-size stores (its build cost grows ~N log N).
* ``ivf`` — ``IVF{nlist},SQfp16`` / ``IVF{nlist},SQ8`` / ``IVF{nlist},PQ{m}x8``: inverted lists with
  the richest code that fits the memory budget (2·D, D or m bytes per row, plus 8 bytes of id).

Cosine and inner-product stores use ``METRIC_INNER_PRODUCT`` (scores are inner products, higher
is better); ``l2`` stores use ``METRIC_L2`` (scores are squared distances, lower is better).
FAISS ids are store row numbers (row order of :meth:`Store.embeddings`).

Index folder layout (documented in ``docs/indexes.md``)::

    <store>/index/index.json            parameters, measured recall, store fingerprint (written last)
    <store>/index/<kind>-<fp>.faiss     the FAISS index file named by index.json
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from cmcr.errors import StoreIndexError
from cmcr.stores.files import (
    atomic_replace,
    atomic_write_json,
    canonical_json,
    claim_output,
    locks_output,
    progress_options,
)
from cmcr.stores.store import Store, _now

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_INFO = "index.json"
INDEX_FORMAT = "cmcr-index"
INDEX_FORMAT_VERSION = 2
KINDS = ("auto", "flat", "hnsw", "ivf")

#: Stores up to this many rows get an exact (flat) index when it fits the memory budget.
FLAT_MAX_ROWS = 100_000
#: Stores up to this many rows may get an HNSW index; beyond, IVF builds much faster on CPU.
HNSW_MAX_ROWS = 500_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
#: nlist ~= IVF_NLIST_FACTOR * sqrt(N), rounded to a power of two (autofaiss uses 4-16 x sqrt(N)
#: on big machines; 1 keeps k-means training and list assignment affordable on a few CPU cores,
#: at the price of a larger nprobe, which the recall tuning finds).
IVF_NLIST_FACTOR = 1.0
#: Training points per IVF list (FAISS warns below 39; 40 trains 1024 lists on 40,960 rows).
IVF_TRAIN_PER_LIST = 40
#: Largest number of training points read from the store.
MAX_TRAIN_POINTS = 500_000
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
DEFAULT_TARGET_RECALL = 0.95
RECALL_K = 10
#: Fraction of the budget kept for FAISS overheads (quantizer tables, allocator slack).
_BUDGET_SLACK = 0.9
#: Grid steps chosen past the first setting whose leave-one-out recall reaches the target.
TUNING_MARGIN_STEPS = {"flat": 0, "ivf": 1, "hnsw": 2}
_NPROBE_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
_EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
#: k-means iterations of IVF training (FAISS default 25; 10 is within noise of it on embedding-like
#: data and cuts the 1M-row training time by more than half on 2 cores).
IVF_KMEANS_ITERATIONS = 10
#: First store rows kept in an exact index to time flat search during the build (scaled to N rows).
FLAT_TIMING_ROWS = 65536
#: Queries answered one by one when timing single-query search; A/B repeats of the speed check.
SPEED_SINGLE_QUERIES = 50
SPEED_REPEATS = 3
#: Auto builds of stores with at least this many rows first probe the planned kind on a sample
#: (:func:`probe_plan`) and go straight to exact search when it cannot beat it.
PROBE_MIN_ROWS = 200_000
#: Rows of the probe sample, and (at most) sample rows used as its queries: as many as the build's
#: batch check, since flat search's BLAS product gains most from large batches (measured on 65,536
#: uniform rows: IVF scanning every list ran 1.5x flat's speed for 200 queries, 0.28x for 1000).
PROBE_ROWS = 65536
PROBE_QUERIES = 1000


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        key: the store key of the row.
        score: inner product (cosine for a cosine store; higher is better) or squared L2 distance
            (``l2`` stores; lower is better), float.
        row: row number in the store (order of :meth:`Store.embeddings`).
        metadata: the row's metadata columns (``key`` excluded) as a dict.
    """

    key: str
    score: float
    row: int
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- planning (pure)
def _pow2_round(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def _hnsw_bytes_per_row(dim: int, m: int = HNSW_M) -> float:
    # float16 codes + level-0 links (2M int32) + upper levels (~M int32 / (M-1)... small) + level table
    return 2 * dim + 2 * m * 4 + m * 4 / max(m - 1, 1) + 8


def plan_index(
    rows: int,
    dim: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    *,
    kind: str = "auto",
    flat_max_rows: int = FLAT_MAX_ROWS,
    hnsw_max_rows: int = HNSW_MAX_ROWS,
) -> dict[str, Any]:
    """Choose a FAISS index for ``rows`` vectors of width ``dim`` under a memory budget.

    Pure function (no I/O), autofaiss style. Rules, in order:

    1. ``rows <= flat_max_rows`` and the flat index (4·dim bytes/row) fits: ``flat`` (exact).
    2. ``rows <= hnsw_max_rows`` and HNSW32 with float16 vectors fits: ``hnsw``.
    3. Otherwise ``ivf`` with ``nlist`` = power of two near ``sqrt(rows)`` (at most rows/39) and
       the richest code that fits what the budget leaves per row: float16 (``SQfp16``, 2·dim B),
       8-bit scalar (``SQ8``, dim B) or product quantisation (``PQ{m}x8``, m B with m | dim).

    Args:
        rows: number of vectors N (>= 1).
        dim: vector width D (>= 1).
        memory_budget_bytes: RAM the index may use at search time, bytes.
        kind: ``auto`` (the rules above) or force ``flat`` / ``hnsw`` / ``ivf``.
        flat_max_rows, hnsw_max_rows: thresholds of rules 1 and 2.

    Returns:
        ``{"kind", "factory", "params", "estimated_memory_bytes", "memory_budget_bytes", "rows",
        "dim", "reason"}``. ``params`` holds ``nlist`` (+ the starting ``nprobe``) for IVF,
        ``M``/``efConstruction``/``efSearch`` for HNSW, ``code`` and ``pq_m`` where relevant.

    Raises:
        ValueError: rows/dim < 1, an unknown kind, or a budget too small for any index.
    """
    rows, dim, budget = int(rows), int(dim), int(memory_budget_bytes)
    if rows < 1 or dim < 1:
        raise ValueError(f"plan_index needs rows >= 1 and dim >= 1, got rows={rows}, dim={dim}")
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    base = {"rows": rows, "dim": dim, "memory_budget_bytes": budget}
    flat_bytes = rows * dim * 4
    hnsw_bytes = int(rows * _hnsw_bytes_per_row(dim))
    usable = budget * _BUDGET_SLACK

    if kind == "flat" or (kind == "auto" and rows <= flat_max_rows and flat_bytes <= usable):
        why = ("forced" if kind == "flat" else
               f"{rows} rows <= {flat_max_rows} and the exact index ({flat_bytes / 2**20:.1f} MiB) fits the budget")
        return {**base, "kind": "flat", "factory": "Flat", "params": {},
                "estimated_memory_bytes": flat_bytes, "reason": f"exact search: {why}"}
    if kind == "hnsw" or (kind == "auto" and rows <= hnsw_max_rows and hnsw_bytes <= usable):
        why = ("forced" if kind == "hnsw" else
               f"{rows} rows <= {hnsw_max_rows} and HNSW{HNSW_M} with float16 vectors "
               f"({hnsw_bytes / 2**20:.1f} MiB) fits the budget")
        return {**base, "kind": "hnsw", "factory": f"HNSW{HNSW_M},SQfp16",
                "params": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 64, "code": "SQfp16"},
                "estimated_memory_bytes": hnsw_bytes, "reason": f"graph search: {why}"}

    nlist = _pow2_round(IVF_NLIST_FACTOR * math.sqrt(rows))
    nlist = max(1, min(nlist, 65536, 2 ** int(math.log2(max(rows // 39, 1)))))
    quantizer_bytes = nlist * dim * 4
    per_row = (usable - quantizer_bytes) / rows - 8  # 8 bytes of id per row in the inverted lists
    if per_row >= 2 * dim:
        code, code_bytes, factory, extra = "SQfp16", 2 * dim, f"IVF{nlist},SQfp16", {}
    elif per_row >= dim:
        code, code_bytes, factory, extra = "SQ8", dim, f"IVF{nlist},SQ8", {}
    else:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= per_row and m <= 256]
        if not divisors or max(divisors) < 4:
            need = int((quantizer_bytes + rows * (8 + min(4, dim))) / _BUDGET_SLACK)
            raise ValueError(
                f"a memory budget of {budget} bytes is too small for {rows} x {dim} vectors "
                f"(the smallest IVF-PQ index needs about {need} bytes); raise the budget"
            )
        m = max(divisors)
        code, code_bytes, factory, extra = "PQ", m, f"IVF{nlist},PQ{m}x8", {"pq_m": m}
    est = int(quantizer_bytes + rows * (code_bytes + 8))
    why = "forced" if kind == "ivf" else (
        f"{rows} rows > {flat_max_rows if rows > flat_max_rows else 0} for exact search"
        + (f" and > {hnsw_max_rows} for HNSW" if rows > hnsw_max_rows else " and HNSW does not fit the budget"))
    return {**base, "kind": "ivf", "factory": factory,
            "params": {"nlist": nlist, "nprobe": min(16, nlist), "code": code, **extra},
            "estimated_memory_bytes": est,
            "reason": f"inverted lists: {why}; {code} codes ({code_bytes} B/row) fit "
                      f"{max(per_row, 0):.0f} B/row left by the budget"}


# ---------------------------------------------------------------------- helpers
def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _index_dir(store: Store) -> Path:
    return store.path / INDEX_DIR


def rows_progress(enabled: bool = True):
    """A rich progress bar showing rows done / total and throughput in rows per second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RowsPerSecond(ProgressColumn):
        def render(self, task):  # noqa: ANN001, ANN202
            return Text(f"{task.speed:,.0f} rows/s" if task.speed else "? rows/s", style="progress.data.speed")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RowsPerSecond(),
                    TimeRemainingColumn(), transient=True, **progress_options(enabled))


def _gather_rows(store: Store, rows: np.ndarray, batch_rows: int) -> np.ndarray:
    """``(len(rows), D) float32`` copies of the given (sorted, unique) store rows, streamed."""
    out = np.empty((len(rows), store.dim), dtype=np.float32)
    if len(rows) == 0:
        return out
    start, filled = 0, 0
    for batch in store.iter_batches(batch_rows):
        n = len(batch.keys)
        lo, hi = np.searchsorted(rows, [start, start + n])
        if hi > lo:
            out[filled:filled + hi - lo] = batch.embeddings[rows[lo:hi] - start]
            filled += hi - lo
        start += n
        if filled == len(rows):
            break
    return out


def _leave_one_out_recall(approx: np.ndarray, exact: np.ndarray, query_rows: np.ndarray, k: int) -> float:
    """Mean |approx ∩ exact| / k over queries, each list first stripped of the query's own row
    (sampled store rows are the queries; their self-match would inflate recall)."""
    total = 0.0
    for a, e, r in zip(approx, exact, query_rows, strict=True):
        e_set = [x for x in e if x != r and x >= 0][:k]
        if not e_set:
            continue
        a_top = [x for x in a if x != r and x >= 0][:k]
        total += len(set(a_top) & set(e_set)) / len(e_set)
    return total / max(len(query_rows), 1)


def _set_search_param(index: faiss.Index, kind: str, value: int) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)


def _prepare_queries(queries: Any, dim: int, normalize: bool) -> np.ndarray:
    """Check and convert queries: ``(Q, D)`` (or ``(D,)``) finite floats -> C-contiguous float32,
    L2-normalised when ``normalize``.

    Raises:
        StoreIndexError: wrong rank/width, non-numeric, NaN/Inf or zero rows (the row is named).
    """
    try:
        q = np.asarray(queries)
    except Exception as e:  # ragged lists etc.
        raise StoreIndexError(f"queries cannot be read as an array ({e}); pass a (Q, {dim}) float array") from e
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise StoreIndexError(f"queries must have shape (Q, {dim}) (the index's dim), got {q.shape}")
    if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
        raise StoreIndexError(f"queries must be numbers, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    finite = np.isfinite(q).all(axis=1)
    if not finite.all():
        raise StoreIndexError(f"query row {int(np.flatnonzero(~finite)[0])} holds NaN or Inf")
    if normalize:
        norms = np.linalg.norm(q, axis=1)
        if (norms == 0).any():
            raise StoreIndexError(f"query row {int(np.flatnonzero(norms == 0)[0])} is all zeros (cannot normalise)")
        q = np.ascontiguousarray(q / norms[:, None], dtype=np.float32)
    return q


# ---------------------------------------------------------------------- build
class _ExactTopK:
    """Exact top-k of fixed queries over store rows fed batch by batch (brute force, streamed).

    ``update(x, start)`` takes ``(n, D)`` float32 rows numbered ``start..start+n-1``; ``rows``
    is the ``(Q, k) int64`` result so far, best first. RAM: ``Q x batch`` float32 scores.
    """

    def __init__(self, queries: np.ndarray, k: int, metric: str):
        self.q = queries
        self.k = k
        self.metric = metric
        self.best_s = np.zeros((len(queries), 0), dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def update(self, x: np.ndarray, start: int) -> None:
        if len(x) == 0 or len(self.q) == 0:
            return
        kk = min(self.k, len(x))
        # faiss.knn: BLAS product + per-query heap, multi-threaded (several times faster than
        # numpy's product + argpartition on the same rows)
        d, i = faiss.knn(self.q, np.ascontiguousarray(x, dtype=np.float32), kk, metric=_faiss_metric(self.metric))
        s = -d if self.metric == "l2" else d
        cand_s = np.concatenate([self.best_s, s.astype(np.float32, copy=False)], axis=1)
        cand_i = np.concatenate([self.rows, i.astype(np.int64) + start], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :self.k]
        self.best_s = np.take_along_axis(cand_s, order, 1)
        self.rows = np.take_along_axis(cand_i, order, 1)


def _exact_topk(store: Store, queries: np.ndarray, k: int, metric: str, batch_rows: int) -> np.ndarray:
    """``(Q, k) int64`` exact top-k rows of ``queries`` over the whole store (streamed)."""
    acc = _ExactTopK(queries, k, metric)
    start = 0
    for batch in store.iter_batches(batch_rows, dtype=np.float32):
        acc.update(batch.embeddings, start)
        start += len(batch.embeddings)
    return acc.rows


def _timed_search(index: faiss.Index, queries: np.ndarray, k: int, single: bool) -> float:
    """Seconds to answer ``queries`` (one batched call, or one call per query when ``single``)."""
    t = time.perf_counter()
    if single:
        for i in range(len(queries)):
            index.search(queries[i:i + 1], k)
    else:
        index.search(queries, k)
    return time.perf_counter() - t


def measure_speed_vs_flat(index: faiss.Index, flat_sample: faiss.Index, rows: int, queries: np.ndarray, *,
                          k: int = RECALL_K, single_queries: int = SPEED_SINGLE_QUERIES,
                          repeats: int = SPEED_REPEATS) -> dict[str, Any]:
    """Queries/s of ``index`` and of exact flat search, timed side by side (A/B pairs, best of
    ``repeats``), in batch mode (all ``queries`` in one call) and single-query mode.

    Flat search is timed on ``flat_sample`` (an exact index over the first ``flat_sample.ntotal``
    store rows) and scaled to ``rows`` linearly: brute force costs the same per row at any size
    (a BLAS product plus a top-k per query; one scan per single query), and the sample is already
    larger than the CPU caches. ``benchmarks/bench_index.py`` checks the estimate against a flat
    index over every row.

    Returns:
        ``{"batch_queries", "single_queries", "flat_rows_timed", "flat_batch_qps", "index_batch_qps",
        "batch_speedup", "flat_single_qps", "index_single_qps", "single_speedup", "method"}``
        (speedup = index queries/s over flat queries/s; >= 1 means the index is not slower).
    """
    scale = rows / max(flat_sample.ntotal, 1)
    singles = queries[:max(1, min(single_queries, len(queries)))]
    fb = ib = fs = is_ = math.inf
    for _ in range(max(1, repeats)):
        fb = min(fb, _timed_search(flat_sample, queries, k, single=False) * scale)
        ib = min(ib, _timed_search(index, queries, k, single=False))
        fs = min(fs, _timed_search(flat_sample, singles, k, single=True) * scale)
        is_ = min(is_, _timed_search(index, singles, k, single=True))
    q, s = len(queries), len(singles)
    out = {"batch_queries": q, "single_queries": s, "flat_rows_timed": int(flat_sample.ntotal),
           "flat_batch_qps": round(q / max(fb, 1e-9), 1), "index_batch_qps": round(q / max(ib, 1e-9), 1),
           "flat_single_qps": round(s / max(fs, 1e-9), 1), "index_single_qps": round(s / max(is_, 1e-9), 1)}
    out["batch_speedup"] = round(fb / max(ib, 1e-9), 3)
    out["single_speedup"] = round(fs / max(is_, 1e-9), 3)
    out["method"] = (f"best of {max(1, repeats)} A/B pairs on this machine, k={k}; flat timed on the first "
                     f"{int(flat_sample.ntotal)} rows and scaled to {rows} rows")
    return out


def _new_index(plan: dict[str, Any], dim: int, metric: str) -> faiss.Index:
    index = faiss.index_factory(dim, plan["factory"], _faiss_metric(metric))
    if plan["kind"] == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = int(plan["params"].get("efConstruction",
                                                                               HNSW_EF_CONSTRUCTION))
    if plan["kind"] == "ivf":
        faiss.extract_index_ivf(index).cp.niter = IVF_KMEANS_ITERATIONS
    return index


def _flat_plan(rows: int, dim: int, budget: int, why: str) -> dict[str, Any]:
    flat_bytes = rows * dim * 4
    note = "" if flat_bytes <= budget * _BUDGET_SLACK else (
        f" (the exact index, {flat_bytes / 2**20:.0f} MiB, is over the memory budget; it is memory-mapped at "
        f"search time, so the RAM it takes is reclaimable page cache)")
    return {"rows": rows, "dim": dim, "memory_budget_bytes": budget, "kind": "flat", "factory": "Flat",
            "params": {}, "estimated_memory_bytes": flat_bytes, "reason": f"exact search: {why}{note}"}


def _index_provenance(fingerprint: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What a store's index is derived from: the store's rows (fingerprint) and the build settings."""
    return {"store_fingerprint": fingerprint, "build_settings": settings}


def _scan_speedup_model(kind: str, rows: int, nlist: int, fraction: float) -> float:
    """Modelled speed-up over flat search of an index scanning ``fraction`` of ``rows``: IVF
    compares a query with ``nlist`` centroids, then with ``fraction·rows`` listed rows; HNSW
    visits ~``fraction``-proportional nodes per level of a ``log(rows)``-deep graph."""
    if kind == "ivf":
        return rows / max(nlist + fraction * rows, 1.0)
    return rows / max(fraction * math.log2(max(rows, 2)), 1e-9)


def probe_plan(
    store: Store,
    plan: dict[str, Any],
    *,
    target_recall: float = DEFAULT_TARGET_RECALL,
    seed: int = 0,
    batch_rows: int = 65536,
    probe_rows: int | None = None,
    probe_queries: int | None = None,
) -> dict[str, Any]:
    """Try the planned approximate index on a random sample of the store and predict whether, built
    over every row, it can beat exact search at the target recall — before paying for the full build.

    Steps: draw ``probe_rows`` rows (``seed``), build the same kind on them (IVF: the planner's
    ``nlist`` for the sample size, same code; HNSW: same factory), compute the exact top-11 of
    ``probe_queries`` sample rows over the sample, then walk the planned knob's grid (``nprobe`` /
    ``efSearch``) measuring leave-one-out recall@10 and the batch time against exact search over
    the sample, side by side. Each step's speed-up is extrapolated to the full store by a scan
    model (:func:`_scan_speedup_model`: IVF costs ``nlist + fraction·N`` row comparisons per query,
    flat ``N``), which favours the index at scale; the walk stops at the first setting reaching
    the target, or as soon as even the extrapolated speed-up is below 1 (a larger setting only
    scans more). The recall a fraction of lists reaches does not rise with N on hard (uniform)
    data, so a probe that cannot win predicts a full index that cannot win either.

    Args:
        store: the store; plan: a non-flat plan from :func:`plan_index`.
        target_recall, seed, batch_rows: as in :func:`build_index`.
        probe_rows, probe_queries: sample size and queries drawn from it (default
            :data:`PROBE_ROWS`, :data:`PROBE_QUERIES`).

    Returns:
        ``{"rows", "queries", "factory", "knob", "steps": [{knob, recall_at_10, probe_speedup,
        predicted_speedup}], "reached", "predicted_speedup", "beats_flat": bool, "seconds", "reason"}``
        (``predicted_speedup`` at the chosen step; ``beats_flat`` false means the full build
        should go straight to exact search).

    Raises:
        ValueError: ``plan`` is flat.
    """
    if plan["kind"] == "flat":
        raise ValueError("probe_plan needs an approximate (hnsw / ivf) plan")
    t0 = time.perf_counter()
    n, dim = store.num_rows, store.dim
    rng = np.random.default_rng(seed + 7919)
    m = int(min(PROBE_ROWS if probe_rows is None else probe_rows, n))
    rows = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    x = _gather_rows(store, rows, batch_rows)
    if store.metric == "cosine":
        x = _prepare_queries(x, dim, normalize=True)
    nq = int(min(PROBE_QUERIES if probe_queries is None else probe_queries, m))
    qpos = np.sort(rng.choice(m, size=nq, replace=False))
    queries = np.ascontiguousarray(x[qpos])
    if plan["kind"] == "ivf":
        sub = plan_index(m, dim, plan.get("memory_budget_bytes", DEFAULT_MEMORY_BUDGET), kind="ivf")
        nlist = int(sub["params"]["nlist"])
        factory = f"IVF{nlist}," + plan["factory"].split(",", 1)[1]
        sub = {**sub, "factory": factory, "params": {**sub["params"], "nlist": nlist}}
        knob, grid = "nprobe", [v for v in _NPROBE_GRID if v <= nlist] + ([nlist] if nlist not in _NPROBE_GRID else [])
        full_nlist = int(plan["params"].get("nlist", nlist))
    else:
        sub, nlist, full_nlist = plan, 0, 0
        knob, grid = "efSearch", list(_EF_GRID)
    index = _new_index(sub, dim, store.metric)
    if not index.is_trained:
        nt = int(min(m, max(IVF_TRAIN_PER_LIST * nlist, 10_000)))
        index.train(x[:nt] if nt < m else x)
    index.add(x)
    flat = faiss.IndexFlat(dim, _faiss_metric(store.metric))
    flat.add(x)
    k_eval = min(RECALL_K + 1, m)
    _, exact = flat.search(queries, k_eval)
    flat_s = min(_timed_search(flat, queries, RECALL_K, single=False) for _ in range(2))
    steps: list[dict[str, Any]] = []
    reached, beats, chosen = False, False, None
    for value in grid:
        _set_search_param(index, plan["kind"], max(value, k_eval) if knob == "efSearch" else value)
        _, approx = index.search(queries, k_eval)
        sec = _timed_search(index, queries, RECALL_K, single=False)
        r = _leave_one_out_recall(approx, exact, qpos, RECALL_K)
        sp = flat_s / max(sec, 1e-9)
        if knob == "nprobe":
            frac = value / max(nlist, 1)
            pred = sp * _scan_speedup_model("ivf", n, full_nlist, frac) / _scan_speedup_model("ivf", m, nlist, frac)
        else:
            pred = sp * _scan_speedup_model("hnsw", n, 0, 1.0) / _scan_speedup_model("hnsw", m, 0, 1.0)
        chosen = {knob: int(value), "recall_at_10": round(r, 4), "probe_speedup": round(sp, 3),
                  "predicted_speedup": round(pred, 3)}
        steps.append(chosen)
        if r >= target_recall:
            reached, beats = True, pred >= 1.0
            break
        if pred < 1.0:
            break
    assert chosen is not None
    where = f"probe of {plan['factory']} on {m:,} sampled rows ({sub['factory']}, {nq} queries)"
    if reached and beats:
        reason = (f"{where}: recall@10 {chosen['recall_at_10']:.3f} >= {target_recall} at {knob}={chosen[knob]}, "
                  f"{chosen['probe_speedup']:.1f}x exact search on the sample, ~{chosen['predicted_speedup']:.1f}x "
                  f"extrapolated to {n:,} rows: building it")
    elif reached:
        reason = (f"{where}: recall@10 {chosen['recall_at_10']:.3f} reached at {knob}={chosen[knob]} but only "
                  f"~{chosen['predicted_speedup']:.2f}x exact search extrapolated to {n:,} rows: cannot beat it")
    elif chosen["predicted_speedup"] < 1.0:
        reason = (f"{where}: recall@10 {chosen['recall_at_10']:.3f} < {target_recall} at {knob}={chosen[knob]} while "
                  f"already ~{chosen['predicted_speedup']:.2f}x exact search extrapolated to {n:,} rows "
                  f"({chosen['probe_speedup']:.2f}x on the sample); a larger {knob} only scans more: "
                  "no setting can beat exact search")
    else:
        reason = (f"{where}: recall@10 {chosen['recall_at_10']:.3f} < {target_recall} even at the largest "
                  f"{knob}={chosen[knob]}: no setting reaches the target")
    return {"rows": m, "queries": nq, "factory": sub["factory"], "knob": knob, "steps": steps,
            "reached": reached, "predicted_speedup": chosen["predicted_speedup"], "beats_flat": bool(beats),
            "seconds": round(time.perf_counter() - t0, 3), "reason": reason}


def _recorded_index(folder: Path) -> dict[str, Any] | None:
    """The provenance ``index.json`` in ``folder`` records (``None``: no usable index there)."""
    try:
        info = json.loads((folder / INDEX_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not (folder / str(info.get("file"))).is_file():
        return None
    return _index_provenance(info.get("store_fingerprint"), info.get("build_settings"))


#: What :func:`execute_index_plan` returns (names of :func:`build_index`'s locals, in this order).
_EXECUTED = ("index", "chosen_plan", "params", "recall", "reached", "tuning", "speed", "candidate", "reasons", "q",
             "qps", "n_train", "train_seconds", "add_seconds", "tune_seconds", "kept_below", "t0", "probe", "plan")


def execute_index_plan(store: Store, plan: dict[str, Any], *, forced: bool, budget: int, sample_queries: int,
                       seed: int, target_recall: float, batch_rows: int, progress: bool,
                       keep_below_target: bool, query_store: Store | None = None) -> dict[str, Any]:
    """Execute step of :func:`build_index`: read the training sample and the query rows, train, add every
    row, tune the search-time knob against exact search, time it, decide (and fall back to flat).
    Nothing is written. Returns :data:`_EXECUTED` by name (the FAISS index, the chosen plan and what
    was measured). With ``query_store`` the recall and speed queries are rows of that store (see
    :func:`build_index`'s ``queries_from``) instead of sampled rows of ``store``.

    Raises:
        StoreIndexError: a forced kind below the target recall (without ``keep_below_target``).
    """
    n, dim = store.num_rows, store.dim
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    index = _new_index(plan, dim, store.metric)
    params = dict(plan["params"])
    reasons: list[str] = [f"planned {plan['factory']}: {plan['reason']}"]
    probe = None
    if not forced and plan["kind"] != "flat" and n >= PROBE_MIN_ROWS:  # cheap check before the full build
        probe = probe_plan(store, plan, target_recall=target_recall, seed=seed, batch_rows=batch_rows,
                           probe_queries=min(sample_queries, PROBE_QUERIES))
        reasons.append(probe["reason"])
        log.info("%s: %s", store.path, probe["reason"])
        if not probe["beats_flat"]:
            plan = _flat_plan(n, dim, budget, f"the probe predicts no approximate index beats it ({plan['factory']})")
            index = _new_index(plan, dim, store.metric)
            params = {}

    # -- one read for the training sample and the query rows
    if query_store is None:
        q = int(min(sample_queries, n))
        query_rows = np.sort(rng.choice(n, size=q, replace=False))
    else:  # rows of another store: none is a store row, so no own row to leave out (-1 matches nothing)
        q = int(min(sample_queries, query_store.num_rows))
        picked = np.sort(rng.choice(query_store.num_rows, size=q, replace=False))
        query_rows = np.full(q, -1, dtype=np.int64)
    n_train = 0
    train_rows = np.zeros(0, dtype=np.int64)
    if not index.is_trained:
        nlist = int(params.get("nlist", 1))
        n_train = int(min(n, max(IVF_TRAIN_PER_LIST * nlist, 10_000), MAX_TRAIN_POINTS))
        train_rows = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
    t = time.perf_counter()
    if query_store is None:
        wanted = np.union1d(train_rows, query_rows)
        gathered = _gather_rows(store, wanted, batch_rows)
        queries = gathered[np.searchsorted(wanted, query_rows)]
    else:
        wanted = train_rows
        gathered = _gather_rows(store, wanted, batch_rows)
        queries = _gather_rows(query_store, picked, batch_rows)
    if store.metric == "cosine":
        queries = _prepare_queries(queries, dim, normalize=True)
    train_seconds = 0.0
    if n_train:
        xt = gathered[np.searchsorted(wanted, train_rows)]
        del gathered
        log.info("training %s on %d rows", plan["factory"], n_train)
        index.train(xt)
        del xt
        train_seconds = time.perf_counter() - t
    else:
        del gathered

    # -- add every row; the exact top-k of the queries and the flat timing sample come from the same pass
    k_eval = min(RECALL_K + 1, n)
    exact_acc = _ExactTopK(queries, k_eval, store.metric)
    flat_sample = faiss.IndexFlat(dim, _faiss_metric(store.metric))
    t = time.perf_counter()
    start = 0
    with rows_progress(progress) as bar:
        task = bar.add_task(f"indexing {store.path.name} ({plan['factory']})", total=n)
        for batch in store.iter_batches(batch_rows, dtype=np.float32):
            x = batch.embeddings
            index.add(x)
            if plan["kind"] != "flat":
                exact_acc.update(x, start)
                if flat_sample.ntotal < FLAT_TIMING_ROWS:
                    flat_sample.add(np.ascontiguousarray(x[:FLAT_TIMING_ROWS - flat_sample.ntotal]))
            start += len(x)
            bar.advance(task, len(x))
    add_seconds = time.perf_counter() - t
    if index.ntotal != n:
        raise StoreIndexError(f"{store.path}: index holds {index.ntotal} rows after adding, store has {n}")

    # -- tune the search-time knob against exact search (autofaiss: "measured recall beside the index")
    t = time.perf_counter()
    tuning: list[dict[str, float]] = []
    knob = {"ivf": "nprobe", "hnsw": "efSearch"}.get(plan["kind"])
    speed: dict[str, Any] | None = None
    gave_up = False
    if plan["kind"] == "flat":
        recall = 1.0
    else:
        exact = exact_acc.rows
        flat_batch_s = _timed_search(flat_sample, queries, RECALL_K, single=False) * n / max(flat_sample.ntotal, 1)
        limit = params.get("nlist", 10**9) if knob == "nprobe" else 10**9
        grid = [v for v in (_NPROBE_GRID if knob == "nprobe" else _EF_GRID) if v <= limit]
        if knob == "nprobe" and limit not in grid:
            grid.append(int(limit))
        # grid steps of margin past the first value reaching the target: queries that are store rows
        # sit next to themselves in the graph / their own list, so leave-one-out recall is optimistic
        # for new queries (measured: HNSW 0.98 leave-one-out vs 0.94 held-out one step past the target)
        margin_steps = TUNING_MARGIN_STEPS[plan["kind"]]
        recall, chosen, left = 0.0, grid[-1], None
        for value in grid:
            _set_search_param(index, plan["kind"], max(value, k_eval) if knob == "efSearch" else value)
            ts = time.perf_counter()
            _, approx = index.search(queries, k_eval)
            seconds = time.perf_counter() - ts
            r = _leave_one_out_recall(approx, exact, query_rows, RECALL_K)
            tuning.append({knob: value, "recall_at_10": round(r, 4), "batch_seconds": round(seconds, 4)})
            if left is None and r < target_recall and seconds > flat_batch_s and not forced:
                # slower than exact search already and still below the target: a larger setting only gets slower
                gave_up = True
                reasons.append(f"{knob}={value} reached recall@10 {r:.3f} < {target_recall} while already slower "
                               f"than exact search ({seconds:.3f} s vs ~{flat_batch_s:.3f} s for "
                               f"{q} queries): stopped tuning")
                recall, chosen = r, value
                break
            recall, chosen = r, value
            if left is None and r >= target_recall:
                left = margin_steps
            if left is not None:
                if left == 0:
                    break
                left -= 1
        params[knob] = int(max(chosen, k_eval) if knob == "efSearch" else chosen)
        _set_search_param(index, plan["kind"], params[knob])
        if not gave_up:
            speed = measure_speed_vs_flat(index, flat_sample, n, queries)
    reached = bool(recall >= target_recall)
    candidate = {"kind": plan["kind"], "factory": plan["factory"], "params": dict(params),
                 "recall_at_10": round(float(recall), 4), "target_reached": reached, "speed": speed}

    # -- decide: keep the approximate index only if it reaches the target and is not slower than flat
    chosen_plan = plan
    if plan["kind"] == "flat":
        reasons.append("exact search: recall 1.0 by construction")
    else:
        slower = [m for m in ("batch", "single") if speed is not None and speed[f"{m}_speedup"] < 1.0]
        if speed is not None:
            reasons.append(
                f"{plan['factory']} with {knob}={params[knob]}: recall@10 {recall:.3f} (target {target_recall}); "
                f"vs exact search: batch {speed['batch_speedup']:.2f}x "
                f"({speed['index_batch_qps']:,.0f} vs {speed['flat_batch_qps']:,.0f} queries/s), "
                f"single {speed['single_speedup']:.2f}x "
                f"({speed['index_single_qps']:,.0f} vs {speed['flat_single_qps']:,.0f} queries/s)")
        if forced:
            if not reached and not keep_below_target:
                raise StoreIndexError(
                    f"{store.path}: the {plan['kind']} index reached recall@10 {recall:.3f} < target {target_recall} "
                    f"({plan['factory']}, {knob}={params[knob]}); nothing was saved. Use --kind auto (falls back "
                    f"to exact search), raise --memory-budget, lower --target-recall, or pass "
                    f"--keep-below-target to keep it anyway")
            if slower:
                log.warning("%s: the forced %s index is slower than exact search in %s mode", store.path,
                            plan["kind"], " and ".join(slower))
                reasons.append(f"kept as asked (--kind {plan['kind']}) although slower than exact search in "
                               f"{' and '.join(slower)} mode")
            else:
                reasons.append(f"kept as asked (--kind {plan['kind']})")
        elif not reached or slower:
            why = (f"recall@10 {recall:.3f} < target {target_recall}" if not reached else
                   f"slower than exact search in {' and '.join(slower)} mode")
            chosen_plan = _flat_plan(n, dim, budget, f"no approximate index beats it ({plan['factory']}: {why})")
            reasons.append(f"fell back to exact search: {why}")
            log.info("%s: %s; falling back to exact (flat) search", store.path, why)
        else:
            reasons.append(f"kept {plan['factory']}: reaches the target and is at least as fast as exact search "
                           "in batch and single-query modes")

    if chosen_plan is not plan:  # the fallback: one more pass over the store
        index = _new_index(chosen_plan, dim, store.metric)
        with rows_progress(progress) as bar:
            task = bar.add_task(f"indexing {store.path.name} (Flat)", total=n)
            for batch in store.iter_batches(batch_rows, dtype=np.float32):
                index.add(batch.embeddings)
                bar.advance(task, len(batch.embeddings))
        params, recall, reached, tuning = {}, 1.0, True, tuning
        speed = {**speed, "index_batch_qps": speed["flat_batch_qps"], "index_single_qps": speed["flat_single_qps"],
                 "batch_speedup": 1.0, "single_speedup": 1.0} if speed else None
    # an exact index over a big store: 100 queries suffice for its speed (1000 took 517 s of a 1M-row
    # uniform build at load 20, after the probe had already decided)
    nq = q if chosen_plan["kind"] != "flat" or n <= FLAT_MAX_ROWS else min(q, 100)
    tq = time.perf_counter()
    index.search(queries[:nq], RECALL_K)
    qps = nq / max(time.perf_counter() - tq, 1e-9)
    tune_seconds = time.perf_counter() - t
    kept_below = bool(not reached and keep_below_target)

    return {"index": index, "chosen_plan": chosen_plan, "params": params, "recall": recall, "reached": reached,
            "tuning": tuning, "speed": speed, "candidate": candidate, "reasons": reasons, "q": q, "qps": qps,
            "n_train": n_train, "train_seconds": train_seconds, "add_seconds": add_seconds,
            "tune_seconds": tune_seconds, "kept_below": kept_below, "t0": t0, "probe": probe, "plan": plan}


def publish_index(store: Store, index: faiss.Index, info: dict[str, Any]) -> dict[str, Any]:
    """Publish step of :func:`build_index`: the index file first (under a new name), then ``index.json``
    (last, atomically), then older ``.faiss`` files are dropped; returns ``info`` with ``file_bytes``."""
    folder = _index_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    fname = info["file"]
    tmp = folder / f".tmp-{fname}-{os.getpid()}"
    faiss.write_index(index, str(tmp))
    atomic_replace(tmp, folder / fname)
    info = {**info, "file_bytes": (folder / fname).stat().st_size}
    atomic_write_json(folder / INDEX_INFO, info)
    for old in folder.glob("*.faiss"):
        if old.name != fname:
            old.unlink(missing_ok=True)
    return info


@locks_output("store", folder=lambda s: getattr(s, "path", s))
def build_index(
    store: Store | str | os.PathLike,
    *,
    kind: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    sample_queries: int = 1000,
    seed: int = 0,
    target_recall: float = DEFAULT_TARGET_RECALL,
    batch_rows: int = 65536,
    progress: bool = True,
    plan: dict[str, Any] | None = None,
    keep_below_target: bool = False,
    overwrite: bool = False,
    queries_from: Store | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build, tune, check against exact search and save a FAISS index for ``store`` in ``<store>/index/``.

    Steps: plan (:func:`plan_index`, unless ``plan`` is given) -> read the training sample (up to
    ``40·nlist`` rows) and ``sample_queries`` query rows, both sampled with ``seed``, in one pass ->
    train -> add every row in batches (faiss id = store row), computing the queries' exact top-11
    in the same pass and keeping the first rows for timing flat search -> raise ``nprobe`` /
    ``efSearch`` until leave-one-out recall@10 reaches ``target_recall`` -> time the index against
    exact flat search side by side (:func:`measure_speed_vs_flat`, batch and single-query modes)
    -> decide -> write the index file, then ``index.json`` (last, atomically). A previous index of
    the store is replaced. The named steps: :func:`plan_index` (plan), :func:`execute_index_plan`
    (read, train, add, tune, decide; writes nothing) and :func:`publish_index` (publish).

    The decision (``auto``): the approximate index is kept only when it reaches the target recall
    **and** answers batched and single queries at least as fast as flat search; otherwise the
    store gets an exact ``Flat`` index (recall 1.0, never slower than itself), and the reasons
    are saved in ``index.json`` under ``decision`` (``cmcr store index --plan`` prints them). Tuning
    stops early once the index is slower than flat search before reaching the target (it cannot win).
    A forced ``kind`` is kept when it is slower than flat (with a warning), but one below the target
    recall is refused unless ``keep_below_target``.

    Args:
        store: a :class:`Store` or its path.
        kind: ``auto``, ``flat``, ``hnsw`` or ``ivf``.
        memory_budget_bytes: RAM budget of the index at search time, bytes.
        sample_queries: number of store rows used as queries for the recall and speed measurements.
        seed: seed of the training and query samples (recorded).
        target_recall: recall@10 to reach when tuning the search-time parameter.
        batch_rows: rows per streamed batch while adding.
        progress: show rich progress bars.
        plan: a plan dict from :func:`plan_index` to execute instead of the auto plan (with
            ``kind="auto"`` the decision rules above still apply to it).
        keep_below_target: keep (and serve) an approximate index whose recall stays below the target.
        queries_from: a store of the **queries this index will answer** (same dim and space: e.g. projected
            captions for a projected image gallery searched by text); ``sample_queries`` of its rows,
            not the store's own rows, are the recall and speed queries. Cross-modal queries sit far from
            the rows (the modality gap) and an HNSW / IVF index reaches much lower recall for them than
            for rows like its own (measured: HNSW efSearch 32, recall@10 0.998 on store rows, 0.30 on
            text queries of a 100k image gallery; docs/indexes.md#tuning-on-the-queries-it-will-answer),
            so tuning on them sets ``efSearch`` / ``nprobe`` for the searches that will really happen.
        overwrite: build anew even when the index there was built from these settings and store rows
            (the one meaning of ``--overwrite``). Without it such an index is reused (its record is
            returned); an index of other settings or older rows is rebuilt
            (:func:`~cmcr.stores.files.claim_output` with ``rebuild_on_mismatch``).

    Returns:
        The index record written to ``index.json`` (see ``docs/indexes.md``): kind, factory, params,
        rows, dim, metric, store_fingerprint, build seconds, recall_at_10, recall_queries,
        target_reached, tuning curve, speed (vs flat), decision, queries_per_second, file, file_bytes...

    Raises:
        StoreIndexError: the store is empty, the budget is too small, or a forced kind stays below
            the target recall (without ``keep_below_target``; nothing is written).
    """
    if not isinstance(store, Store):
        store = Store.open(store)
    n, dim = store.num_rows, store.dim
    if n == 0:
        raise StoreIndexError(f"{store.path}: the store is empty; add rows before building an index")
    query_store = None
    if queries_from is not None:
        query_store = queries_from if isinstance(queries_from, Store) else Store.open(queries_from)
        if query_store.dim != dim:
            raise StoreIndexError(f"queries store {query_store.path} has dim {query_store.dim}, the store {store.path} "
                                  f"has {dim}: give a store of queries in the same space (e.g. both projected by "
                                  "the same connector)")
        if query_store.num_rows == 0:
            raise StoreIndexError(f"queries store {query_store.path} is empty")
    settings = {"kind": kind, "memory_budget_bytes": memory_budget_bytes, "sample_queries": sample_queries,
                "seed": seed, "target_recall": target_recall, "keep_below_target": keep_below_target, "plan": plan}
    if query_store is not None:  # recorded only when given: indexes built before this option stay current
        settings["queries_from"] = {"path": str(query_store.path), "fingerprint": query_store.fingerprint()}
    with claim_output(_index_dir(store), kind="index", provenance=_index_provenance(store.fingerprint(), settings),
                      overwrite=overwrite, recorded=_recorded_index, clear=False,
                      rebuild_on_mismatch=True) as claim:
        if claim.reuse:
            log.info("%s: the index was built from these settings and rows; reusing it", store.path)
            return read_index_info(store)
    forced = kind != "auto"
    if plan is None:
        try:
            plan = plan_index(n, dim, memory_budget_bytes, kind=kind)
        except ValueError as e:
            raise StoreIndexError(f"{store.path}: {e}") from e
    budget = int(plan.get("memory_budget_bytes", memory_budget_bytes))
    fingerprint = store.fingerprint()
    built = execute_index_plan(store, plan, forced=forced, budget=budget, sample_queries=sample_queries, seed=seed,
                               target_recall=target_recall, batch_rows=batch_rows, progress=progress,
                               keep_below_target=keep_below_target, query_store=query_store)
    (index, chosen_plan, params, recall, reached, tuning, speed, candidate, reasons, q, qps, n_train, train_seconds,
     add_seconds, tune_seconds, kept_below, t0, probe, plan) = (built[k] for k in _EXECUTED)
    fname = f"{chosen_plan['kind']}-{fingerprint}.faiss"
    info = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "kind": chosen_plan["kind"],
        "factory": chosen_plan["factory"],
        "params": params,
        "metric": store.metric,
        "faiss_metric": "l2" if store.metric == "l2" else "inner_product",
        "rows": n,
        "dim": dim,
        "store_fingerprint": fingerprint,
        "store_dtype": store.dtype,
        "plan": {k: chosen_plan[k] for k in ("reason", "estimated_memory_bytes", "memory_budget_bytes")
                 if k in chosen_plan},
        "recall_at_10": round(float(recall), 4),
        "recall_queries": q,
        "recall_method": ("leave-one-out: sampled store rows as queries, own row removed from both result lists; "
                          "exact = brute force over the store") if query_store is None else
                         (f"queries from another store: {q} rows sampled from {query_store.path}; "
                          "exact = brute force over the store"),
        "recall_queries_from": None if query_store is None else str(query_store.path),
        "target_recall": target_recall,
        "target_reached": reached,
        "kept_below_target": kept_below,
        "tuning_margin_steps": TUNING_MARGIN_STEPS.get(plan["kind"], 0),
        "tuning": tuning,
        "speed": speed,
        "decision": {"forced": forced, "candidate": candidate, "reasons": reasons, "probe": probe},
        "queries_per_second": round(qps, 1),
        "train_rows": n_train,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "train_seconds": round(train_seconds, 3),
        "add_seconds": round(add_seconds, 3),
        "tune_seconds": round(tune_seconds, 3),
        "file": fname,
        "file_bytes": None,  # set by publish_index
        "faiss_version": faiss.__version__,
        "created_at": _now(),
        "build_settings": json.loads(canonical_json(settings)),
    }
    info = publish_index(store, index, info)
    if kept_below:
        log.warning("%s: index reached recall@10 %.3f < target %.2f, kept as asked (--keep-below-target)",
                    store.path, recall, target_recall)
    return info


# ---------------------------------------------------------------------- open / search
def read_index_info(store: Store | str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` record of a store's index.

    Raises:
        StoreIndexError: the store has no index (or the record is unreadable).
    """
    path = Path(store.path if isinstance(store, Store) else store) / INDEX_DIR / INDEX_INFO
    if not path.exists():
        raise StoreIndexError(f"{path.parent.parent}: no index ({path} missing); build one with `cmcr store index`")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreIndexError(f"{path}: unreadable index record ({e}); rebuild with `cmcr store index`") from e


def open_index(store: Store | str | os.PathLike, *, mmap: bool = True) -> StoreIndex:
    """Load the index of ``store`` (memory-mapped by default) and check it is current.

    Raises:
        StoreIndexError: no index, an index file missing/unreadable, a stale index (built for
            an older store fingerprint: rows were added since), or one below its target recall that
            was not kept on purpose (``keep_below_target``) — rebuild with ``cmcr store index``.
    """
    if not isinstance(store, Store):
        store = Store.open(store)
    info = read_index_info(store)
    fp = store.fingerprint()
    if info.get("store_fingerprint") != fp:
        raise StoreIndexError(
            f"{store.path}: the index is stale: built for store fingerprint {info.get('store_fingerprint')} "
            f"({info.get('rows')} rows), the store is now {fp} ({store.num_rows} rows); "
            f"rebuild it with `cmcr store index {store.path}`"
        )
    if not info.get("target_reached", True) and not info.get("kept_below_target", False):
        raise StoreIndexError(
            f"{store.path}: the index reached recall@10 {info.get('recall_at_10')} < target "
            f"{info.get('target_recall')} and was not kept on purpose; rebuild it with "
            f"`cmcr store index {store.path}` (auto falls back to exact search) or with --keep-below-target "
            f"to serve it anyway"
        )
    fpath = _index_dir(store) / info["file"]
    if not fpath.exists():
        raise StoreIndexError(f"{fpath}: index file named by {INDEX_INFO} is missing; rebuild with `cmcr store index`")
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        index = faiss.read_index(str(fpath), flags)
    except RuntimeError as e:
        raise StoreIndexError(f"{fpath}: cannot read the FAISS index ({e}); rebuild with `cmcr store index`") from e
    if index.ntotal != store.num_rows or index.d != store.dim:
        raise StoreIndexError(
            f"{fpath}: index holds {index.ntotal} x {index.d}, store is {store.num_rows} x {store.dim}; rebuild it"
        )
    knob = {"ivf": "nprobe", "hnsw": "efSearch"}.get(info["kind"])
    if knob and knob in info["params"]:
        _set_search_param(index, info["kind"], info["params"][knob])
    return StoreIndex(store=store, index=index, info=info)


class StoreIndex:
    """A loaded FAISS index bound to its store (use :func:`open_index`).

    Attributes:
        store: the :class:`Store`; ``index``: the faiss index; ``info``: the ``index.json`` record.
    """

    def __init__(self, store: Store, index: faiss.Index, info: dict[str, Any]):
        self.store = store
        self.index = index
        self.info = info
        self._keys: pa.Array | None = None
        self._meta: pa.Table | None = None

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_search_param(self, value: int) -> None:
        """Override ``nprobe`` (IVF) or ``efSearch`` (HNSW) for later searches; no-op for flat."""
        _set_search_param(self.index, self.kind, value)

    def search_arrays(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Nearest store rows of each query.

        Args:
            queries: ``(Q, D)`` or ``(D,)`` numbers; checked (dim, finite), L2-normalised for a cosine
                store, converted to C-contiguous float32.
            k: neighbours per query (>= 1).

        Returns:
            ``(scores, rows)``: ``(Q, k) float32`` scores (inner products, or squared L2 distances
            for ``l2`` stores) and ``(Q, k) int64`` store rows, best first; ``-1`` rows (score
            ``-inf``/``inf``) where the index found fewer than k.

        Raises:
            StoreIndexError: invalid queries or k.
        """
        if int(k) < 1:
            raise StoreIndexError(f"k must be >= 1, got {k}")
        q = _prepare_queries(queries, self.dim, normalize=self.store.metric == "cosine")
        scores, rows = self.index.search(q, int(k))
        scores = np.asarray(scores, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        missing = rows < 0
        if missing.any():
            scores[missing] = np.inf if self.store.metric == "l2" else -np.inf
        return scores, rows

    def search(self, queries: Any, k: int = 10) -> list[list[Hit]]:
        """Like :meth:`search_arrays`, as :class:`Hit` lists (key, score, row, metadata); missing
        results (-1) are dropped."""
        scores, rows = self.search_arrays(queries, k)
        if self._keys is None:
            self._keys = self.store.keys_array().combine_chunks()
            self._meta = self.store.metadata() if self.store.metadata_columns else None
        flat = np.unique(rows[rows >= 0])
        keys = self._keys.take(pa.array(flat)).to_pylist() if len(flat) else []
        metas: list[dict[str, Any]] = [{} for _ in flat]
        if self._meta is not None and len(flat):
            sub = self._meta.drop_columns(["key"]).take(pa.array(flat)).to_pylist()
            metas = sub
        lookup = {int(r): (kk, m) for r, kk, m in zip(flat, keys, metas, strict=True)}
        out: list[list[Hit]] = []
        for srow, rrow in zip(scores, rows, strict=True):
            hits = []
            for s, r in zip(srow, rrow, strict=True):
                if r < 0:
                    continue
                kk, m = lookup[int(r)]
                hits.append(Hit(key=kk, score=float(s), row=int(r), metadata=dict(m)))
            out.append(hits)
        return out


def describe_index(store: Store) -> dict[str, Any] | None:
    """The index record of ``store`` plus ``"stale": bool``, or ``None`` when it has none."""
    try:
        info = read_index_info(store)
    except StoreIndexError:
        return None
    return {**info, "stale": info.get("store_fingerprint") != store.fingerprint()}


__all__: Sequence[str] = ("Hit", "StoreIndex", "build_index", "describe_index", "open_index", "plan_index",
                          "probe_plan", "read_index_info")
