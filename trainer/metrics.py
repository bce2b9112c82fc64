"""Retrieval and zero-shot metrics (method.md section 6), with chance levels.

Positives are defined by *labels*: gallery row j is a positive of query i when
``gallery_labels[j] == query_labels[i]``. Instance-level retrieval uses the keys as labels (one
positive per query when keys are unique); class-level retrieval uses a label column.

* recall@k — fraction of queries with at least one positive among the top k.
* mAP — mean over queries of the average precision; with one positive it is the mean reciprocal
  rank (method.md section 6).
* chance — the expected value of each metric under a uniformly random ranking:
  R@k = 1 - C(N - n, k) / C(N, k) and AP = (H_N + (n - 1)/(N - 1) * (N - H_N)) / N for a query with
  n positives among N (H_N the harmonic number; for n = 1 both reduce to k/N and H_N/N).

Ties between a positive and a negative are broken by the sort order (stable, gallery order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _codes(query_labels: Sequence[Any], gallery_labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    vocab: dict[Any, int] = {}
    g = np.array([vocab.setdefault(x, len(vocab)) for x in gallery_labels], dtype=np.int64)
    q = np.array([vocab.get(x, -1) for x in query_labels], dtype=np.int64)
    return q, g


def chance_recall(n_pool: int, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Expected recall@k of a random ranking, per query (``n_pos`` ``(Q,)`` int)."""
    n_pos = np.asarray(n_pos, dtype=np.float64)
    k = min(k, n_pool)
    miss = np.ones_like(n_pos)
    for i in range(k):
        miss *= np.clip((n_pool - n_pos - i) / (n_pool - i), 0.0, 1.0)
    return 1.0 - miss


def chance_ap(n_pool: int, n_pos: np.ndarray) -> np.ndarray:
    """Expected average precision of a random ranking, per query (``n_pos`` ``(Q,)`` int)."""
    n_pos = np.asarray(n_pos, dtype=np.float64)
    h = float(np.sum(1.0 / np.arange(1, n_pool + 1)))
    if n_pool == 1:
        return np.ones_like(n_pos)
    return (h + (n_pos - 1) / (n_pool - 1) * (n_pool - h)) / n_pool


def retrieval_metrics(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: Sequence[Any],
    gallery_labels: Sequence[Any],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    max_block_cells: int = 20_000_000,
) -> dict[str, Any]:
    """Recall@k, mAP and their chance levels of cosine retrieval from ``queries`` into ``gallery``.

    Args:
        queries: ``(Q, D)`` float array of unit rows.
        gallery: ``(N, D)`` float array of unit rows (same space).
        query_labels / gallery_labels: Q and N hashable labels (keys for instance-level retrieval).
        ks: the k of recall@k.
        max_block_cells: queries are scored in blocks of ``max_block_cells / N`` rows (RAM bound).

    Returns:
        ``{"pool": N, "queries": Q_scored, "queries_without_positive": Q - Q_scored,
        "R@1": ..., "mAP": ..., "mean_positives": ..., "chance": {"R@1": ..., "mAP": ...},
        "median_rank": ...}``; metrics are fractions in [0, 1]. Queries without any positive in the
        gallery are not scored (and counted).
    """
    q = np.asarray(queries, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {q.shape} and gallery {g.shape} must be 2-D with the same dim")
    if len(query_labels) != len(q) or len(gallery_labels) != len(g):
        raise ValueError("one label per query row and per gallery row is required")
    qc, gc = _codes(query_labels, gallery_labels)
    counts = np.bincount(gc, minlength=int(gc.max(initial=-1)) + 1)
    n_pos_all = np.where(qc >= 0, counts[np.maximum(qc, 0)] if len(counts) else 0, 0)
    scored = np.flatnonzero(n_pos_all > 0)
    n = len(g)
    result: dict[str, Any] = {"pool": n, "queries": int(len(scored)),
                              "queries_without_positive": int(len(q) - len(scored))}
    if len(scored) == 0 or n == 0:
        result.update({f"R@{k}": float("nan") for k in ks})
        result.update({"mAP": float("nan"), "median_rank": float("nan"), "mean_positives": 0.0,
                       "chance": {**{f"R@{k}": float("nan") for k in ks}, "mAP": float("nan")}})
        return result
    block = max(1, max_block_cells // max(n, 1))
    first_rank = np.empty(len(scored), dtype=np.int64)
    ap = np.empty(len(scored), dtype=np.float64)
    for start in range(0, len(scored), block):
        rows = scored[start:start + block]
        scores = q[rows] @ g.T  # (b, N)
        order = np.argsort(-scores, axis=1, kind="stable")
        is_pos = gc[order] == qc[rows][:, None]  # (b, N) in ranked order
        cum = np.cumsum(is_pos, axis=1)
        ranks = np.arange(1, n + 1)[None, :]
        ap[start:start + len(rows)] = (np.where(is_pos, cum / ranks, 0.0).sum(axis=1) / is_pos.sum(axis=1))
        first_rank[start:start + len(rows)] = np.argmax(is_pos, axis=1) + 1
    n_pos = n_pos_all[scored]
    for k in ks:
        result[f"R@{k}"] = float(np.mean(first_rank <= k))
    result["mAP"] = float(np.mean(ap))
    result["median_rank"] = float(np.median(first_rank))
    result["mean_positives"] = float(np.mean(n_pos))
    result["chance"] = {**{f"R@{k}": float(np.mean(chance_recall(n, n_pos, k))) for k in ks},
                        "mAP": float(np.mean(chance_ap(n, n_pos)))}
    return result


def zeroshot_accuracy(
    embeddings: np.ndarray,
    labels: Sequence[str],
    class_embeddings: np.ndarray,
    class_names: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Zero-shot classification accuracy: each item takes the classes of its most similar class
    embeddings (prompts through the text side; method.md section 6).

    Args:
        embeddings: ``(N, D)`` unit rows (e.g. projected audio).
        labels: N true class names (items whose label is not a class are skipped and counted).
        class_embeddings: ``(C, D)`` unit rows, one per class (prompt embeddings, projected).
        class_names: C names.

    Returns:
        ``{"top1": ..., "top5": ..., "items": N_scored, "classes": C, "items_without_class": ...,
        "chance": {"top1": 1/C, "top5": min(5, C)/C}}`` (fractions).
    """
    index = {name: i for i, name in enumerate(class_names)}
    target = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
    keep = target >= 0
    x = np.asarray(embeddings, dtype=np.float32)[keep]
    t = target[keep]
    c = len(class_names)
    out: dict[str, Any] = {"items": int(keep.sum()), "classes": c, "items_without_class": int((~keep).sum())}
    scores = x @ np.asarray(class_embeddings, dtype=np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in ks:
        out[f"top{k}"] = float(np.mean((order[:, :k] == t[:, None]).any(axis=1))) if len(t) else float("nan")
    out["chance"] = {f"top{k}": min(k, c) / c for k in ks}
    return out
