"""Tests of cmcr.stores.index: the pure planner, building/tuning, stale detection, search checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.errors import StoreIndexError
from cmcr.stores.index import Hit, build_index, open_index, plan_index
from tests.fixtures_stores import clustered_embeddings

GiB = 1024**3


# ---------------------------------------------------------------------- plan_index (pure)
def test_plan_small_store_is_exact():
    p = plan_index(5_000, 512, 2 * GiB)
    assert p["kind"] == "flat" and p["factory"] == "Flat"
    assert p["estimated_memory_bytes"] == 5_000 * 512 * 4
    assert "exact" in p["reason"]


def test_plan_mid_size_is_hnsw_and_large_is_ivf():
    mid = plan_index(300_000, 512, 2 * GiB)
    assert mid["kind"] == "hnsw" and mid["params"]["M"] == 32
    big = plan_index(1_000_000, 512, 2 * GiB)
    assert big["kind"] == "ivf"
    assert big["factory"] == f"IVF{big['params']['nlist']},SQfp16"
    nlist = big["params"]["nlist"]
    assert nlist & (nlist - 1) == 0 and 512 <= nlist <= 2048  # power of two near sqrt(N)
    assert big["estimated_memory_bytes"] <= 2 * GiB


def test_plan_flat_too_big_for_budget_falls_through():
    # 50k x 512 float32 = 100 MiB exact; a 64 MiB budget forces a compressed index
    p = plan_index(50_000, 512, 64 * 1024**2)
    assert p["kind"] in ("hnsw", "ivf") and p["estimated_memory_bytes"] <= 64 * 1024**2


def test_plan_code_shrinks_with_budget():
    rows, dim = 2_000_000, 512
    codes = [plan_index(rows, dim, b)["params"]["code"] for b in (8 * GiB, 1.5 * GiB, GiB // 2)]
    assert codes == ["SQfp16", "SQ8", "PQ"]
    pq = plan_index(rows, dim, GiB // 2)
    assert dim % pq["params"]["pq_m"] == 0
    assert pq["estimated_memory_bytes"] <= GiB // 2


def test_plan_is_monotone_in_rows_and_pure():
    kinds = [plan_index(r, 256, 2 * GiB)["kind"] for r in (10, 100_000, 100_001, 500_000, 500_001, 10**8)]
    assert kinds == ["flat", "flat", "hnsw", "hnsw", "ivf", "ivf"]
    assert plan_index(123_456, 64, GiB) == plan_index(123_456, 64, GiB)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="rows >= 1"):
        plan_index(0, 16, GiB)
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index(10, 16, GiB, kind="annoy")
    with pytest.raises(ValueError, match="too small"):
        plan_index(10**9, 512, 1024**2)


def test_plan_forced_kind():
    assert plan_index(10, 16, GiB, kind="ivf")["kind"] == "ivf"
    assert plan_index(10**7, 16, 100 * GiB, kind="flat")["kind"] == "flat"


# ---------------------------------------------------------------------- build / open / search
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_build_tune_and_search(store_factory, kind):
    store = store_factory(n=4000, dim=32)
    info = build_index(store, kind=kind, sample_queries=200, progress=False)
    assert info["kind"] == kind and info["rows"] == 4000 and info["dim"] == 32
    assert info["recall_at_10"] >= 0.95 and info["target_reached"]
    assert info["recall_queries"] == 200
    assert info["store_fingerprint"] == store.fingerprint()
    on_disk = json.loads((store.path / "index" / "index.json").read_text())
    assert on_disk == info
    assert (store.path / "index" / info["file"]).stat().st_size == info["file_bytes"]
    if kind == "ivf":
        assert "nprobe" in info["params"] and info["tuning"][-1]["nprobe"] == info["params"]["nprobe"]
    if kind == "hnsw":
        assert info["params"]["efSearch"] >= 11

    index = open_index(store)
    x = store.embeddings(np.float32)
    scores, rows = index.search_arrays(x[:5], k=10)
    assert scores.shape == (5, 10) and scores.dtype == np.float32 and rows.dtype == np.int64
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each row finds itself first
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    hits = index.search(x[3], k=3)
    assert len(hits) == 1 and len(hits[0]) == 3
    h = hits[0][0]
    assert isinstance(h, Hit) and h.key == "image-000003" and h.row == 3
    assert h.metadata == {"label": 3, "caption": "item 3"}
    assert abs(h.score - 1.0) < 5e-3


def test_search_matches_exact_bruteforce(store_factory):
    store = store_factory(n=500, dim=16)
    build_index(store, progress=False)
    x = store.embeddings(np.float32)
    q = clustered_embeddings(7, 16, seed=5) * 3.0  # un-normalised queries are normalised
    scores, rows = open_index(store, mmap=False).search_arrays(q, k=5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ x.T), axis=1)[:, :5]
    assert (rows == ref).mean() > 0.97  # float16 ties may swap
    np.testing.assert_allclose(scores[:, 0], np.max(qn @ x.T, axis=1), atol=1e-4)


def test_query_checks(store_factory):
    store = store_factory(n=100, dim=16)
    build_index(store, progress=False)
    index = open_index(store)
    with pytest.raises(StoreIndexError, match=r"shape \(Q, 16\)"):
        index.search_arrays(np.ones((2, 8), np.float32))
    bad = np.ones((3, 16), np.float32)
    bad[2, 4] = np.nan
    with pytest.raises(StoreIndexError, match="query row 2 holds NaN"):
        index.search_arrays(bad)
    with pytest.raises(StoreIndexError, match="all zeros"):
        index.search_arrays(np.zeros((1, 16)))
    with pytest.raises(StoreIndexError, match="k must be"):
        index.search_arrays(np.ones(16), k=0)
    # float64, Fortran-ordered input is accepted and converted
    q = np.asfortranarray(np.ones((2, 16), dtype=np.float64))
    s, r = index.search_arrays(q, k=3)
    assert s.shape == (2, 3)
    # k larger than the store: missing results are -1 and dropped from hits
    s, r = index.search_arrays(np.ones(16), k=150)
    assert (r[0] == -1).sum() == 50 and np.isneginf(s[0][r[0] == -1]).all()
    assert len(index.search(np.ones(16), k=150)[0]) == 100


def test_missing_and_stale_index(store_factory):
    store = store_factory(n=300, dim=16, parts=1)
    with pytest.raises(StoreIndexError, match="no index"):
        open_index(store)
    build_index(store, progress=False)
    store.append_part(["new-1"], clustered_embeddings(1, 16, seed=9),
                      metadata={"label": [1], "caption": ["x"]}, source="later")
    with pytest.raises(StoreIndexError, match="stale"):
        open_index(store)
    info = build_index(store, progress=False)
    assert info["rows"] == 301
    assert len(list((store.path / "index").glob("*.faiss"))) == 1  # the old file was removed
    assert open_index(store).search(clustered_embeddings(1, 16, seed=9), k=1)[0][0].key == "new-1"


def test_empty_store_and_tiny_budget(store_factory, tmp_path):
    from cmcr.stores.store import Store

    empty = Store.create(tmp_path / "empty", modality="text", encoder={"family": "t"}, dim=8)
    with pytest.raises(StoreIndexError, match="empty"):
        build_index(empty, progress=False)
    store = store_factory(n=100, dim=16)
    with pytest.raises(StoreIndexError, match="too small"):
        build_index(store, memory_budget_bytes=10, progress=False)


def test_l2_store_scores_are_distances(tmp_path):
    from cmcr.stores.store import Store

    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32) * 2
    store = Store.create(tmp_path / "l2", modality="image", encoder={"family": "t"}, dim=8, dtype="float32",
                         normalized=False, metric="l2")
    store.append_part([f"k{i}" for i in range(200)], x)
    build_index(store, progress=False)
    s, r = open_index(store).search_arrays(x[:3] + 0.01, k=2)  # not normalised for l2
    assert r[:, 0].tolist() == [0, 1, 2]
    assert np.all(s[:, 0] < s[:, 1]) and np.all(s[:, 0] < 0.01)


# ---------------------------------------------------------------------- never lose to exact search
def _uniform_store(tmp_path, n=6000, dim=32):
    from cmcr.stores.store import Store

    x = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = Store.create(tmp_path / "uniform", modality="image", encoder={"family": "t"}, dim=dim)
    store.append_part([f"u{i}" for i in range(n)], x)
    return store


def test_auto_falls_back_to_flat_when_the_candidate_cannot_win(tmp_path):
    # PQ4 codes of uniform random rows cannot reach recall@10 0.95 at any nprobe: the auto decision
    # must end with an exact index, say why, and keep the candidate's measurements
    store = _uniform_store(tmp_path)
    plan = plan_index(store.num_rows, store.dim, 10 * 1024**2, kind="ivf")
    plan = {**plan, "factory": "IVF64,PQ4x8", "params": {"nlist": 64, "nprobe": 1, "code": "PQ", "pq_m": 4}}
    info = build_index(store, plan=plan, sample_queries=100, progress=False)
    assert info["kind"] == "flat" and info["factory"] == "Flat" and info["recall_at_10"] == 1.0
    assert info["target_reached"] and not info["kept_below_target"]
    cand = info["decision"]["candidate"]
    assert cand["kind"] == "ivf" and cand["factory"] == "IVF64,PQ4x8" and not cand["target_reached"]
    assert any("fell back to exact search" in r for r in info["decision"]["reasons"])
    assert info["file"].startswith("flat-")
    x = store.embeddings(np.float32)
    assert open_index(store).search_arrays(x[:3], k=1)[1][:, 0].tolist() == [0, 1, 2]


def test_forced_kind_below_target_is_refused_unless_kept(tmp_path):
    store = _uniform_store(tmp_path)
    plan = {**plan_index(store.num_rows, store.dim, GiB, kind="ivf"), "factory": "IVF64,PQ4x8",
            "params": {"nlist": 64, "nprobe": 1, "code": "PQ", "pq_m": 4}}
    with pytest.raises(StoreIndexError, match="keep-below-target"):
        build_index(store, kind="ivf", plan=plan, sample_queries=100, progress=False)
    assert not (store.path / "index" / "index.json").exists()
    info = build_index(store, kind="ivf", plan=plan, sample_queries=100, progress=False, keep_below_target=True)
    assert info["kind"] == "ivf" and not info["target_reached"] and info["kept_below_target"]
    open_index(store)  # kept on purpose: served
    # a below-target record that was not kept on purpose is never served
    path = store.path / "index" / "index.json"
    path.write_text(json.dumps({**info, "kept_below_target": False}))
    with pytest.raises(StoreIndexError, match="below|< target"):
        open_index(store)


def test_speed_against_flat_is_measured_and_saved(store_factory):
    store = store_factory(n=3000, dim=32)
    info = build_index(store, kind="ivf", sample_queries=100, progress=False)
    sp = info["speed"]
    assert sp["batch_queries"] == 100 and sp["single_queries"] == 50 and sp["flat_rows_timed"] == 3000
    for key in ("flat_batch_qps", "index_batch_qps", "flat_single_qps", "index_single_qps", "batch_speedup",
                "single_speedup"):
        assert sp[key] > 0
    assert info["decision"]["forced"] and info["decision"]["candidate"]["speed"] == sp
    assert all("batch_seconds" in t for t in info["tuning"])


def test_measure_speed_vs_flat_scales_the_flat_sample():
    import faiss

    from cmcr.stores.index import measure_speed_vs_flat

    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    sample = faiss.IndexFlatIP(16)
    sample.add(x[:500])
    full = faiss.IndexFlatIP(16)
    full.add(x)
    sp = measure_speed_vs_flat(full, sample, rows=2000, queries=x[:64], single_queries=8, repeats=2)
    assert sp["single_queries"] == 8 and sp["flat_rows_timed"] == 500
    assert "scaled to 2000 rows" in sp["method"]


def test_probe_sends_a_hopeless_plan_straight_to_exact_search(tmp_path, monkeypatch):
    # issue 11: on data where no approximate index can win, the auto build must find out on a sample
    # (the probe) instead of training, filling and tuning the full candidate first
    import cmcr.stores.index as ix

    monkeypatch.setattr(ix, "PROBE_MIN_ROWS", 4000)
    monkeypatch.setattr(ix, "PROBE_ROWS", 3000)
    store = _uniform_store(tmp_path)
    # 2 x 4-bit PQ codes (cheap to train) of uniform rows never reach recall@10 0.95
    plan = {**plan_index(store.num_rows, store.dim, 10 * 1024**2, kind="ivf"), "factory": "IVF64,PQ2x4",
            "params": {"nlist": 64, "nprobe": 1, "code": "PQ", "pq_m": 2}}
    info = build_index(store, plan=plan, sample_queries=100, progress=False)
    probe = info["decision"]["probe"]
    assert probe["rows"] == 3000 and probe["queries"] == 100 and probe["factory"].endswith(",PQ2x4")
    assert not probe["beats_flat"] and not probe["reached"] and probe["steps"]
    assert all(s["recall_at_10"] < 0.95 for s in probe["steps"])
    assert info["kind"] == "flat" and info["recall_at_10"] == 1.0 and info["train_rows"] == 0
    assert info["tuning"] == [] and info["speed"] is None  # the full candidate was never built
    assert info["tuning_margin_steps"] == 0  # recorded for the plan the probe left (flat), not the first one
    assert any(r.startswith("probe of IVF64,PQ2x4 on 3,000 sampled rows") for r in info["decision"]["reasons"])
    assert "no setting" in info["plan"]["reason"] or "probe predicts" in info["plan"]["reason"]
    assert open_index(store).search_arrays(store.embeddings(np.float32)[:2], k=1)[1][:, 0].tolist() == [0, 1]


def test_probe_is_skipped_for_small_stores_and_forced_kinds(tmp_path, monkeypatch):
    import cmcr.stores.index as ix

    store = _uniform_store(tmp_path, n=3000)
    info = build_index(store, kind="ivf", sample_queries=50, progress=False, keep_below_target=True)
    assert info["decision"]["probe"] is None  # forced
    monkeypatch.setattr(ix, "PROBE_MIN_ROWS", 10_000)
    info = build_index(store, plan=plan_index(3000, 32, kind="ivf"), sample_queries=50, progress=False)
    assert info["decision"]["probe"] is None  # below PROBE_MIN_ROWS


def test_probe_plan_reports_its_walk(store_factory):
    from cmcr.stores.index import probe_plan

    store = store_factory(n=3000, dim=32)
    pr = probe_plan(store, plan_index(3000, 32, kind="ivf"), probe_rows=2000, probe_queries=100)
    assert pr["rows"] == 2000 and pr["knob"] == "nprobe" and pr["factory"].startswith("IVF")
    nprobes = [s["nprobe"] for s in pr["steps"]]
    assert nprobes == sorted(nprobes) and nprobes[0] == 1
    last = pr["steps"][-1]
    # the walk ends at the first setting reaching the target, or once even the extrapolation loses
    assert last["recall_at_10"] >= 0.95 or last["predicted_speedup"] < 1.0 or last["nprobe"] == 32
    assert pr["beats_flat"] == (pr["reached"] and pr["predicted_speedup"] >= 1.0)
    with pytest.raises(ValueError):
        probe_plan(store, plan_index(3000, 32, kind="flat"))


def _gap_setting(tmp_path, n=20000, dim=64):
    """A clustered store and a store of cross-modal-like queries: the rows' directions shrunk and pushed
    along one shared 'modality gap' vector, far from every row (as text queries of an image gallery)."""
    from cmcr.stores.store import Store

    rng = np.random.default_rng(0)
    c = rng.standard_normal((200, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def rows(m):
        ctr = c[rng.integers(0, 200, m)]
        u = rng.standard_normal((m, dim))
        u -= (u * ctr).sum(1, keepdims=True) * ctr
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return (0.8 * ctr + 0.6 * u).astype(np.float32)

    gap = rng.standard_normal(dim)
    gap /= np.linalg.norm(gap)

    def queries(m):
        q = rows(m) * 0.25 + gap + rng.standard_normal((m, dim)) * 0.05
        return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)

    x = rows(n)
    store = Store.create(tmp_path / "gallery", modality="image", encoder={"family": "t"}, dim=dim)
    store.append_part([f"r{i}" for i in range(n)], x)
    qstore = Store.create(tmp_path / "captions", modality="text", encoder={"family": "t"}, dim=dim)
    qstore.append_part([f"q{i}" for i in range(2000)], queries(2000))
    held = queries(300)
    exact = np.argsort(-(held @ x.T), axis=1)[:, :10]
    return store, qstore, held, exact


def test_tuning_on_the_queries_it_will_answer(tmp_path):
    """Tuned on its own rows, HNSW reports recall@10 ~1.0 yet misses many true neighbours of queries across a
    modality gap; tuned on a store of such queries (`--queries`) it raises efSearch until they reach the
    target, and held-out queries of the same kind get that recall too."""
    store, qstore, held, exact = _gap_setting(tmp_path)

    def heldout_recall() -> float:
        _, got = open_index(store).search_arrays(held, 10)
        return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got, exact, strict=True)]))

    own = build_index(store, kind="hnsw", sample_queries=300, progress=False)
    own_heldout = heldout_recall()
    assert own["recall_at_10"] >= 0.95 and own["recall_queries_from"] is None
    assert own_heldout < 0.9  # the own-rows figure overstates cross-modal recall
    tuned = build_index(store, kind="hnsw", sample_queries=300, progress=False, queries_from=qstore.path)
    assert tuned["recall_queries_from"] == str(qstore.path) and str(qstore.path) in tuned["recall_method"]
    assert tuned["build_settings"]["queries_from"]["fingerprint"] == qstore.fingerprint()
    assert tuned["params"]["efSearch"] > own["params"]["efSearch"] and tuned["recall_at_10"] >= 0.95
    assert heldout_recall() >= 0.95
    # same settings and queries: reused; the store's own rows again: rebuilt
    again = build_index(store, kind="hnsw", sample_queries=300, progress=False, queries_from=qstore.path)
    assert again["created_at"] == tuned["created_at"]
    assert build_index(store, kind="hnsw", sample_queries=300, progress=False)["recall_queries_from"] is None


def test_queries_store_of_another_dim_is_refused(tmp_path):
    from cmcr.stores.store import Store

    store = _uniform_store(tmp_path, n=500)
    other = Store.create(tmp_path / "q", modality="text", encoder={"family": "t"}, dim=16)
    other.append_part(["a"], np.full((1, 16), 0.25, np.float32))
    with pytest.raises(StoreIndexError, match="dim 16.*same space"):
        build_index(store, queries_from=other.path, progress=False)
