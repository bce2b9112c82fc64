"""Retrieval and zero-shot metrics (trainer/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cmcr.trainer.metrics import chance_ap, chance_recall, retrieval_metrics, zeroshot_accuracy


def test_known_ranks():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    # query 0 -> gallery "a" rank 1; query 1 -> "b": scores [0, .6, 1] rank 2; query 2 -> "c": [.6, .96, .8] rank 2
    m = retrieval_metrics(q, g, ["a", "b", "c"], ["a", "b", "c"], ks=(1, 2))
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@2"] == 1.0
    assert m["mAP"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["pool"] == 3 and m["queries"] == 3 and m["median_rank"] == 2


def test_labels_multiple_positives_and_missing():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]], dtype=np.float32)
    m = retrieval_metrics(q, g, ["x", "nope"], ["y", "x", "x"], ks=(1,))
    # query 0 (label x): ranking g0 (y), g2 (x), g1 (x) -> AP = (1/2 + 2/3)/2
    assert m["queries"] == 1 and m["queries_without_positive"] == 1
    assert m["R@1"] == 0 and m["mAP"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_chance_formulas_match_simulation():
    rng = np.random.default_rng(0)
    n, npos = 50, np.array([1, 5])
    assert chance_recall(n, np.array([1]), 5)[0] == pytest.approx(5 / 50)
    sims = []
    for _ in range(3000):
        order = rng.permutation(n)
        r = []
        for p in npos:
            is_pos = order < p
            ranks = np.flatnonzero(is_pos) + 1
            r.append((np.arange(1, p + 1) / ranks).mean())
        sims.append(r)
    np.testing.assert_allclose(np.mean(sims, axis=0), chance_ap(n, npos), atol=0.012)


def test_random_embeddings_sit_at_chance_and_blocks_do_not_matter():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = rng.standard_normal((300, 8)).astype(np.float32)
    keys = list(range(300))
    a = retrieval_metrics(x, y, keys, keys)
    b = retrieval_metrics(x, y, keys, keys, max_block_cells=1000)
    assert a == b
    assert abs(a["R@10"] - a["chance"]["R@10"]) < 0.05


def test_zeroshot():
    c = np.eye(3, dtype=np.float32)
    x = np.array([[1, 0.1, 0], [0, 1, 0.5], [0.2, 0.1, 1], [0, 0, 1]], dtype=np.float32)
    r = zeroshot_accuracy(x, ["a", "b", "a", "zzz"], c, ["a", "b", "c"], ks=(1, 2))
    assert r["items"] == 3 and r["items_without_class"] == 1
    assert r["top1"] == pytest.approx(2 / 3) and r["top2"] == 1.0 and r["chance"]["top1"] == pytest.approx(1 / 3)
