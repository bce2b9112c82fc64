"""Memories and semantic completion (stores/memory.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmcr.errors import StoreMismatchError
from cmcr.stores.memory import (
    Memory,
    MemoryQueue,
    complete_dense,
    complete_exact,
    complete_store,
    complete_topk,
)
from cmcr.stores.store import Store
from tests.fixtures_connect import ENC_A, ENC_B, unit_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("chunk_rows,query_rows", [(7, 5), (1000, 1000), (1, 64)])
def test_exact_chunked_matches_dense(chunk_rows, query_rows):
    rng = np.random.default_rng(0)
    q, m = unit_rows(rng, 37, 16), unit_rows(rng, 301, 16)
    ref = complete_dense(q, m, temperature=0.01)
    got = complete_exact(q, m, temperature=0.01, chunk_rows=chunk_rows, query_rows=query_rows)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    raw = complete_exact(q, m, temperature=0.05, chunk_rows=chunk_rows, normalize=False)
    np.testing.assert_allclose(raw, complete_dense(q, m, temperature=0.05, normalize=False), atol=2e-5)


def test_exact_extreme_logits_do_not_overflow():
    # tau tiny: logits up to 1e4 would overflow exp() without the running max.
    rng = np.random.default_rng(1)
    q, m = unit_rows(rng, 4, 8), unit_rows(rng, 50, 8)
    got = complete_exact(q, m, temperature=1e-4, chunk_rows=3)
    assert np.isfinite(got).all()
    nearest = m[np.argmax(q @ m.T, axis=1)]
    np.testing.assert_allclose(got, nearest, atol=1e-3)


def test_exact_single_query_and_dim_mismatch():
    rng = np.random.default_rng(2)
    m = unit_rows(rng, 20, 8)
    assert complete_exact(m[0], m).shape == (8,)
    with pytest.raises(StoreMismatchError):
        complete_exact(unit_rows(rng, 2, 4), m)


def test_exact_streams_a_store(make_store):
    rng = np.random.default_rng(3)
    m = unit_rows(rng, 120, 16)
    store = make_store("mem", m, modality="image", encoder=ENC_A, parts=3)
    q = unit_rows(rng, 9, 16)
    np.testing.assert_allclose(complete_exact(q, store, chunk_rows=17), complete_dense(q, m), atol=2e-5)
    mem = Memory.from_store(store)
    assert len(mem) == 120 and mem.modality == "image" and mem.identity == ENC_A


def test_topk_agrees_with_exact_at_low_temperature():
    rng = np.random.default_rng(4)
    q, m = unit_rows(rng, 50, 16), unit_rows(rng, 2000, 16)
    exact = complete_exact(q, m, temperature=0.01)
    approx = complete_topk(q, m, k=64, temperature=0.01)
    cos = np.sum(exact * approx, axis=1)
    assert cos.min() > 0.999
    # k = M is the exact completion
    np.testing.assert_allclose(complete_topk(q, m, k=5000, temperature=0.1), complete_dense(q, m, temperature=0.1),
                               atol=1e-4)
    # k = 1 is the nearest memory row
    np.testing.assert_allclose(complete_topk(q, m, k=1), m[np.argmax(q @ m.T, axis=1)], atol=1e-5)


def test_complete_store_keys_identity_and_resume(make_store, tmp_path):
    rng = np.random.default_rng(5)
    texts = unit_rows(rng, 30, 16)
    audio = unit_rows(rng, 200, 16)
    qs = make_store("text_b", texts, modality="text", encoder=ENC_B, keys=[f"cap{i}" for i in range(30)])
    ms = make_store("audio_b", audio, modality="audio", encoder=ENC_B)
    out = complete_store(qs, ms, tmp_path / "pseudo", batch_rows=8)
    assert out.keys() == qs.keys()
    assert out.modality == "audio" and out.encoder == ENC_B
    assert out.manifest["extra"]["pseudo"] is True
    np.testing.assert_allclose(out.embeddings(np.float32), complete_dense(texts, audio), atol=2e-5)
    assert len(out.parts) == 4
    # a rerun with the same inputs is a no-op; other parameters are refused unless overwrite
    again = complete_store(qs, ms, tmp_path / "pseudo", batch_rows=8)
    assert len(again.parts) == 4
    with pytest.raises(StoreMismatchError):
        complete_store(qs, ms, tmp_path / "pseudo", temperature=0.1)
    topk = complete_store(qs, ms, tmp_path / "pseudo", method="topk", k=32, overwrite=True)
    assert topk.manifest["extra"]["completion"]["method"] == "topk"
    cos = np.sum(topk.embeddings(np.float32) * complete_dense(texts, audio), axis=1)
    assert cos.min() > 0.99


def test_complete_store_resumes_after_partial_run(make_store, tmp_path):
    rng = np.random.default_rng(6)
    qs = make_store("t", unit_rows(rng, 20, 8), modality="text", encoder=ENC_B)
    ms = make_store("a", unit_rows(rng, 40, 8), modality="audio", encoder=ENC_B)
    calls = []
    complete_store(qs, ms, tmp_path / "p", batch_rows=5, progress=lambda d, t: calls.append(d))
    # drop the last part by rewriting the manifest the way a killed run would have left it
    import json

    mpath = tmp_path / "p" / "manifest.json"
    man = json.loads(mpath.read_text())
    man["parts"] = man["parts"][:2]
    man["num_rows"] = 10
    mpath.write_text(json.dumps(man))
    calls.clear()
    out = complete_store(qs, ms, tmp_path / "p", batch_rows=5, progress=lambda d, t: calls.append(d))
    assert calls == [10, 15, 20]  # where it starts, then after each block
    assert out.keys() == qs.keys()


def test_complete_store_refuses_other_encoder_or_same_modality(make_store, tmp_path):
    rng = np.random.default_rng(7)
    qs = make_store("t", unit_rows(rng, 5, 8), modality="text", encoder=ENC_B)
    other = make_store("img", unit_rows(rng, 5, 8), modality="image", encoder=ENC_A)
    same = make_store("t2", unit_rows(rng, 5, 8), modality="text", encoder=ENC_B)
    with pytest.raises(StoreMismatchError, match="same MCR"):
        complete_store(qs, other, tmp_path / "x")
    with pytest.raises(StoreMismatchError, match="other modality"):
        complete_store(qs, same, tmp_path / "y")


def test_memory_queue_fifo_cycles_through_store(make_store):
    rng = np.random.default_rng(8)
    m = unit_rows(rng, 50, 8)
    store = make_store("m", m, modality="audio", encoder=ENC_B, parts=3)
    queue = MemoryQueue(Store.open(store.path), capacity=20, seed=0, read_rows=7)
    assert queue.tensor.shape == (20, 8)
    seen = {tuple(np.round(r, 5)) for r in queue.tensor.numpy()}
    for _ in range(3):
        queue.advance(10)
        seen |= {tuple(np.round(r, 5)) for r in queue.tensor.numpy()}
    # 20 + 30 rows served = one full pass: every memory row was in the queue once
    assert seen == {tuple(np.round(r, 5)) for r in m}
    before = queue.tensor.clone()
    queue.advance(5)
    assert (queue.tensor != before).any(dim=1).sum() == 5
    assert queue.passes >= 1
    q = torch.from_numpy(unit_rows(rng, 3, 8))
    p = queue.complete(q)
    np.testing.assert_allclose(p.numpy(), complete_dense(q.numpy(), queue.tensor.numpy()), atol=2e-5)


def test_topk_rows_from_the_index_and_bounded_gather():
    import faiss

    rng = np.random.default_rng(11)
    q, m = unit_rows(rng, 40, 16), unit_rows(rng, 600, 16)
    ref = complete_topk(q, m, k=32, temperature=0.05)
    # sub-blocks of one query at a time (gather bound of one k x D block) give the same result
    np.testing.assert_allclose(complete_topk(q, m, k=32, temperature=0.05, gather_bytes=1), ref, atol=1e-6)
    # rows read back from an IVF index (direct map made on first use) instead of a memory array
    ivf = faiss.index_factory(16, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(m)
    ivf.add(m)
    faiss.extract_index_ivf(ivf).nprobe = 4  # every list: exact top-k
    np.testing.assert_allclose(complete_topk(q, None, k=32, temperature=0.05, index=ivf), ref, atol=1e-5)
    with pytest.raises(ValueError, match="memory rows or an index"):
        complete_topk(q, None)


def test_complete_store_topk_uses_the_memory_store_index(make_store, tmp_path):
    from cmcr.stores.index import read_index_info

    rng = np.random.default_rng(12)
    qs = make_store("t", unit_rows(rng, 12, 8), modality="text", encoder=ENC_B)
    ms = make_store("a", unit_rows(rng, 90, 8), modality="audio", encoder=ENC_B)
    out = complete_store(qs, ms, tmp_path / "p", method="topk", k=16, query_block=5)
    assert read_index_info(ms)["rows"] == 90  # built and saved beside the memory store, reused later
    cos = np.sum(out.embeddings(np.float32) * complete_dense(qs.embeddings(np.float32), ms.embeddings(np.float32)),
                 axis=1)
    assert cos.min() > 0.99


def test_queue_completion_in_chunks_matches_dense(make_store):
    rng = np.random.default_rng(13)
    m = unit_rows(rng, 50, 8)
    store = make_store("m", m, modality="audio", encoder=ENC_B)
    queue = MemoryQueue(Store.open(store.path), capacity=30, seed=0, chunk_rows=7)
    q = torch.from_numpy(unit_rows(rng, 4, 8))
    np.testing.assert_allclose(queue.complete(q).numpy(), complete_dense(q.numpy(), queue.tensor.numpy()), atol=2e-5)
