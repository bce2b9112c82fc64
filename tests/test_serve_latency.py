"""Serving latency features: micro-batched text forwards, the query-embedding cache, the opt-in int8
text tower (recorded, refused for store writes) and the certified float16 exact search."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cmcr.errors import EncoderError

TINY = "open_clip:cmcr-tiny-clip@random"
CAPTIONS = ["a dog barking at a cat on the sofa", "two elephants", "x", "rain on a window at night",
            "a very long caption " * 30, "a crowd cheering", "a bird", "piano music in a small room"]


@pytest.fixture(scope="module")
def service_dirs(tmp_path_factory):
    """A connector (side A: the tiny CLIP, side B: a stand-in) and a 3000-row projected gallery."""
    import torch

    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.store import Store
    from cmcr.trainer.config import TrainConfig
    from cmcr.trainer.connector import Connector, SideInfo
    from cmcr.trainer.projector import make_projector, projector_architecture

    work = tmp_path_factory.mktemp("latency")
    enc = load_encoder(TINY, device="cpu")
    ident_b = {"family": "test", "architecture": "stand-in", "weights": "random", "dim": enc.dim}
    cfg = TrainConfig(hidden_dim=64, out_dim=32)
    arch = projector_architecture(enc.dim, cfg)
    torch.manual_seed(0)
    conn = Connector(sides={"A": SideInfo("clip", enc.identity(), ["text", "image"], enc.dim, "text"),
                            "B": SideInfo("other", ident_b, ["text", "image"], enc.dim, "text")},
                     projectors={"A": make_projector(arch), "B": make_projector(arch)},
                     architecture={"A": arch, "B": arch})
    conn.save(work / "connector")
    conn = Connector.load(work / "connector")
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = Store.create(work / "gallery", modality="image", encoder=conn.projected_identity("B", ident_b),
                         dim=32, dtype="float32")
    store.append_part([f"r{i}" for i in range(3000)], x, {"label": ["l"] * 3000}, source="test")
    return work / "connector", work / "gallery"


def _service(service_dirs, **kw):
    from cmcr.service import SearchService

    conn, gal = service_dirs
    return SearchService(conn, [gal], encoders=[TINY], **kw)


def test_microbatcher_gathers_waiting_callers_and_isolates_failures():
    from cmcr.service import MicroBatcher

    sizes: list[int] = []

    def fn(items):  # noqa: ANN001, ANN202
        sizes.append(len(items))
        time.sleep(0.05)
        if "bad" in items:
            raise ValueError("bad item")
        return [i * 2 for i in items]

    mb = MicroBatcher(fn, slots=1, max_batch=8)
    out: dict[int, object] = {}

    def call(i):  # noqa: ANN001, ANN202
        try:
            out[i] = mb(i if i != 5 else "bad")
        except ValueError as e:
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(sizes) > 1  # callers that waited shared a call
    assert all(out[i] == 2 * i for i in range(10) if i != 5)
    assert isinstance(out[5], ValueError)  # only the bad item's caller failed
    with pytest.raises(ValueError):
        MicroBatcher(fn, slots=0)


def test_batched_text_embeddings_equal_single_ones(tiny_clip):
    together = tiny_clip.encode("text", CAPTIONS)
    alone = np.stack([tiny_clip.encode("text", [c])[0] for c in CAPTIONS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_concurrent_service_queries_equal_sequential_ones(service_dirs):
    svc = _service(service_dirs, slots=1, max_batch=8, cache_size=0)
    seq = {c: svc.embed_text(c)[0] for c in CAPTIONS}
    got: dict[str, np.ndarray] = {}
    threads = [threading.Thread(target=lambda c=c: got.__setitem__(c, svc.embed_text(c)[0])) for c in CAPTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in CAPTIONS:
        np.testing.assert_allclose(got[c], seq[c], atol=1e-5)
    name = next(iter(svc.galleries))
    assert [h["key"] for h in svc.search(got[CAPTIONS[0]], name, 5)] == \
           [h["key"] for h in svc.search(seq[CAPTIONS[0]], name, 5)]


def test_query_cache_hits_only_for_the_same_identity(service_dirs, tiny_clip):
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.service import QueryCache

    svc = _service(service_dirs, cache_size=4)
    q1, info1 = svc.embed_text("a dog barking")
    q2, info2 = svc.embed_text("a dog barking")
    assert "cached" not in info1 and info2["cached"] is True
    np.testing.assert_array_equal(q1, q2)
    assert svc.cache.hits == 1
    enc = svc.encoders[0][0]
    key = QueryCache.key(enc, svc.connector.fingerprint, "A", "text", "a dog barking")
    other_seed = load_encoder("open_clip:cmcr-tiny-clip@random:1", device="cpu")
    assert QueryCache.key(other_seed, svc.connector.fingerprint, "A", "text", "a dog barking") != key
    assert QueryCache.key(enc, "another-connector", "A", "text", "a dog barking") != key
    for i in range(5):  # LRU: size 4
        svc.embed_text(f"caption {i}")
    assert svc.cache.get(key) is None
    off = _service(service_dirs, cache_size=0)
    off.embed_text("a dog barking")
    assert "cached" not in off.embed_text("a dog barking")[1]


def test_int8_text_tower_is_recorded_close_and_refused_for_stores(service_dirs, tmp_path):
    from cmcr.pipeline.encode import open_store
    from cmcr.pipeline.encoders import load_encoder

    ref = load_encoder(TINY, device="cpu")
    q8 = load_encoder(TINY, device="cpu")
    q8.quantize_text("int8")
    assert q8.text_quantization == "int8" and q8.identity() == ref.identity()
    cos = (ref.encode("text", CAPTIONS) * q8.encode("text", CAPTIONS)).sum(1)
    assert cos.min() > 0.99 and cos.max() < 1.0 - 1e-7  # close, and really another computation
    with pytest.raises(EncoderError, match="queries only"):
        open_store(tmp_path / "st", q8, "text")
    with pytest.raises(EncoderError, match="int8"):
        q8.quantize_text("int4")
    svc = _service(service_dirs, quantize_text="int8")
    _, info = svc.embed_text("a dog")
    assert info["text_quantization"] == "int8"
    assert svc.describe()["encoders"][0]["text_quantization"] == "int8"
    assert svc._text_batchers[id(svc.encoders[0][0])].max_batch == 1  # per-call activation scales: no batching


def test_exact_shortlist_equals_brute_force():
    from cmcr.service import ExactShortlist

    rng = np.random.default_rng(0)
    x = rng.standard_normal((30000, 48)).astype(np.float32)
    x[100:110] = x[99]  # exact ties
    x[200] = x[201] + 1e-5  # near ties, below float16 resolution
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sl = ExactShortlist(x, chunk=7000)
    queries = np.concatenate([x[[99, 200, 5]], rng.standard_normal((20, 48)).astype(np.float32)])
    for q in queries:
        q = q / np.linalg.norm(q)
        for k in (1, 10, 60):
            rows, scores = sl.search(q, k)
            s = x @ q
            want = np.lexsort((np.arange(len(x)), -s))[:k]
            assert rows == [int(i) for i in want]
            np.testing.assert_allclose(scores, s[want], rtol=0, atol=1e-6)
    # rows all within the float16 error of each other: the bound cannot certify, the full scan answers
    flat = np.tile(x[:1], (30000, 1)) + rng.standard_normal((30000, 48)).astype(np.float32) * 1e-6
    sl2 = ExactShortlist(flat)
    rows, _ = sl2.search(x[0], 5)
    assert rows == [int(i) for i in np.lexsort((np.arange(30000), -(flat @ x[0])))[:5]]
    assert sl2.full_scans == 1 and sl.full_scans == 0


def test_serve_refuses_an_unknown_quantisation_before_loading_anything(capsys, tmp_path):
    from cmcr.cli import main

    assert main(["serve", "-c", str(tmp_path / "none"), "-g", str(tmp_path / "none"), "--quantize-text", "int4"]) != 0
    assert "the only quantised text path is int8" in capsys.readouterr().err


def test_hnsw_gallery_is_searched_by_its_index_and_exact_big_galleries_get_the_hint(service_dirs, tmp_path,
                                                                                    monkeypatch):
    """An HNSW-indexed gallery answers through its index (recall@10 against exact search ≥ 0.9 here, the
    saved recall is what `cmcr store index` measured); an exact gallery at or above SHORTLIST_MIN_ROWS gets
    the start-up hint naming the command that indexes it, an indexed one does not."""
    import shutil

    from cmcr import service as svc_mod
    from cmcr.stores.index import build_index

    conn, gal = service_dirs
    hnsw = tmp_path / "gallery-hnsw"
    shutil.copytree(gal, hnsw, ignore=shutil.ignore_patterns("index"))
    info = build_index(hnsw, kind="hnsw", progress=False)
    assert info["kind"] == "hnsw"
    monkeypatch.setattr(svc_mod, "SHORTLIST_MIN_ROWS", 1000)
    from cmcr.service import SearchService

    svc = SearchService(conn, [gal, hnsw], encoders=[TINY])
    kinds = {g["name"]: g["search"] for g in svc.describe()["galleries"]}
    assert kinds == {"gallery": "exact", "gallery-hnsw": "hnsw"}
    hints = svc.hints()
    assert len(hints) == 1 and f"cmcr store index {gal} --kind hnsw" in hints[0] and "3,000 rows" in hints[0]
    assert svc.galleries["gallery"].shortlist is not None and svc.galleries["gallery-hnsw"].shortlist is None
    recall = []
    for text in CAPTIONS:
        q, _ = svc.embed_text(text)
        exact = [h["key"] for h in svc.search(q, "gallery", 10)]
        approx = [h["key"] for h in svc.search(q, "gallery-hnsw", 10)]
        recall.append(len(set(exact) & set(approx)) / 10)
    assert np.mean(recall) >= 0.9, recall
    monkeypatch.setattr(svc_mod, "SHORTLIST_MIN_ROWS", 10_000)
    assert svc.hints() == []


def test_thread_setting_reaches_request_threads(service_dirs):
    """OpenMP's thread count (FAISS) is per thread: a search from a new (request) thread must run with the
    service's count, not every core, and numpy's BLAS is held to it too."""
    import faiss
    import threadpoolctl
    import torch

    from cmcr.service import set_threads

    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), threadpoolctl.threadpool_info())
    try:
        faiss.omp_set_num_threads(3)  # what a fresh thread would otherwise get (here: a known value)
        svc = _service(service_dirs, threads=1)
        q = svc.embed_text("a dog")[0]
        seen: list[int] = []

        def request() -> None:
            seen.append(faiss.omp_get_max_threads())  # a fresh thread: OpenMP's process default
            svc.search(q, "gallery", 5)
            seen.append(faiss.omp_get_max_threads())

        t = threading.Thread(target=request)
        t.start()
        t.join()
        assert seen[1] == 1, seen  # seen[0]: the cores (or OMP_NUM_THREADS) before the search pinned it
        blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert blas and all(n == 1 for n in blas)
        with pytest.raises(Exception, match="threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        for info in before[2]:
            if info["user_api"] == "blas":
                threadpoolctl.threadpool_limits(limits=info["num_threads"], user_api="blas")
                break
        from cmcr import service as service_mod

        service_mod._FAISS_THREADS["n"] = None
