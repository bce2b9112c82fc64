"""Memory-centric pseudo pairs (trainer/data.py, stores/memory.py; docs/method.md "Memory-centric
pseudo pairs"): every pseudo partner equals a by-hand softmax over the right memory, sources are
switchable by modality name, weights come from the config, provenance is recorded and a resume
with other sources is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.errors import ConfigError, StoreMismatchError, TrainingError
from cmcr.stores.memory import complete_dense, complete_exact, complete_topk
from cmcr.stores.store import Store
from cmcr.trainer.config import load_config
from cmcr.trainer.data import load_pairs, open_connect_stores, resolve_centric, split_pairs
from cmcr.trainer.loop import train_connector
from tests.fixtures_connect import tiny_config, unit_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAU = 0.01


def _softmax_mean(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """By hand, float64: ``norm(softmax(q Kᵀ / tau) V)`` row by row."""
    logits = q.astype(np.float64) @ keys.astype(np.float64).T / TAU
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    p = w @ values.astype(np.float64)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _stores(p):
    return open_connect_stores(p["text_a"], p["text_b"], p["image_a"], p["audio_b"])


@pytest.mark.parametrize("method", ["exact", "topk"])
def test_each_pseudo_partner_is_a_softmax_over_the_right_memory(tiny_synthetic, tmp_path, method):
    p = tiny_synthetic
    cfg = tiny_config(centric="text,audio,image", completion=method, completion_topk=10_000)
    stores = _stores(p)
    data = load_pairs(stores, cfg, tmp_path)
    train, val = split_pairs(len(data), cfg)
    assert len(val) > 0
    ta, tb = Store.open(p["text_a"]).embeddings(np.float32), Store.open(p["text_b"]).embeddings(np.float32)
    img, aud = Store.open(p["image_a"]).embeddings(np.float32), Store.open(p["audio_b"]).embeddings(np.float32)
    # text-centric (today's C-MCR): captions complete from each MCR's own memory
    np.testing.assert_allclose(data.p_a, _softmax_mean(ta, img, img), atol=2e-5)
    np.testing.assert_allclose(data.p_b, _softmax_mean(tb, aud, aud), atol=2e-5)
    src = {s.source.name: s for s in data.sources}
    assert [s.name for s in data.centric] == ["text", "image", "audio"]
    # audio-centric: real CLAP-side audio -> softmax over B's text of the *training* captions; the same
    # weights average those captions' A text; that pseudo A text completes from A's image memory
    a = src["audio"]
    assert a.keys == Store.open(p["audio_b"]).keys() and a.source.role == "memory_b"
    np.testing.assert_array_equal(a.p_b, aud)
    np.testing.assert_allclose(a.s_b, _softmax_mean(aud, tb[train], tb[train]), atol=2e-5)
    np.testing.assert_allclose(a.s_a, _softmax_mean(aud, tb[train], ta[train]), atol=2e-5)
    np.testing.assert_allclose(a.p_a, _softmax_mean(a.s_a, img, img), atol=2e-5)
    # image-centric: the mirror image through A's text -> B's text -> B's audio memory
    i = src["image"]
    assert i.source.role == "memory_a"
    np.testing.assert_array_equal(i.p_a, img)
    np.testing.assert_allclose(i.s_a, _softmax_mean(img, ta[train], ta[train]), atol=2e-5)
    np.testing.assert_allclose(i.s_b, _softmax_mean(img, ta[train], tb[train]), atol=2e-5)
    np.testing.assert_allclose(i.p_b, _softmax_mean(i.s_b, aud, aud), atol=2e-5)
    # the held-out captions are never in a memory-centric mixture: changing one changes nothing
    assert not np.allclose(_softmax_mean(aud, tb, tb), a.s_b, atol=2e-5)
    # stores keyed like their queries, written once and reused (same files on a second load)
    folder = tmp_path / "completions" / "centric-memory_b"
    assert Store.open(folder / "shared_a").keys() == Store.open(p["audio_b"]).keys()
    before = {f: f.stat().st_mtime_ns for f in folder.rglob("*.npy")}
    load_pairs(stores, cfg, tmp_path)
    assert before and {f: f.stat().st_mtime_ns for f in folder.rglob("*.npy")} == before
    # another temperature is another completion: never reused; refused by the output claim (a connect run
    # with --overwrite clears its completions first), and the recorded store is left as it was
    with pytest.raises(StoreMismatchError, match="temperature"):
        load_pairs(stores, cfg.replace(memory_temperature=0.05), tmp_path)
    assert Store.open(folder / "shared_a").manifest["extra"]["completion"]["temperature"] == cfg.memory_temperature
    assert {f: f.stat().st_mtime_ns for f in folder.rglob("*.npy")} == before


def test_paired_memory_exact_and_topk_match_the_dense_formula():
    rng = np.random.default_rng(0)
    q, keys, vals = unit_rows(rng, 7, 8), unit_rows(rng, 50, 8), unit_rows(rng, 50, 5)
    want = _softmax_mean(q, keys, vals)
    got = complete_exact(q, keys, values=vals, temperature=TAU, chunk_rows=8, query_rows=3)  # many chunks
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(complete_topk(q, keys, values=vals, k=50, temperature=TAU), want, atol=2e-5)
    np.testing.assert_allclose(complete_exact(q, keys, temperature=TAU), complete_dense(q, keys), atol=2e-5)


def test_sources_by_modality_or_role_and_errors(tiny_synthetic):
    stores = _stores(tiny_synthetic)
    got = resolve_centric(stores, tiny_config(centric="audio, shared", centric_weights={"text": 2.0}))
    assert [(s.name, s.role, s.weight) for s in got] == [("text", "shared", 2.0), ("audio", "memory_b", 1.0)]
    assert [s.name for s in resolve_centric(stores, tiny_config(centric="memory_a"))] == ["image"]
    with pytest.raises(ConfigError, match=r"'3d' is not a source.*text \(shared\), image \(memory A\)"):
        resolve_centric(stores, tiny_config(centric="text,3d"))
    with pytest.raises(ConfigError, match="twice"):
        resolve_centric(stores, tiny_config(centric="text,shared"))
    with pytest.raises(ConfigError, match="weight 0"):
        resolve_centric(stores, tiny_config(centric="text,audio", centric_weights={"audio": 0}))
    with pytest.raises(ConfigError, match="--no-completion"):
        resolve_centric(stores, tiny_config(centric="text,audio", use_completion=False))
    with pytest.raises(ConfigError, match="centric_weights"):
        tiny_config(centric_weights={"audio": -1.0})


def test_weights_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[centric]\ncentric = "text,audio"\ncentric_weights = { text = 1, audio = 0.5 }\n')
    cfg = load_config(path)
    assert cfg.centric_names() == ["text", "audio"] and cfg.centric_weights == {"text": 1.0, "audio": 0.5}
    assert load_config("default").centric == "shared" and load_config("3d").centric_weights == {}


def test_train_records_sources_and_refuses_a_resume_with_others(tiny_synthetic, tmp_path):
    p = tiny_synthetic
    args = (p["text_a"], p["text_b"], p["image_a"], p["audio_b"], tmp_path / "run")
    cfg = tiny_config(epochs=1, centric="text,audio", centric_weights={"audio": 0.5})
    res = train_connector(*args, cfg, plot=False)
    meta = json.loads((tmp_path / "run" / "connector.json").read_text())
    training = meta["training"] if "training" in meta else meta["provenance"]["training"]
    assert training["centric"] == "text,audio" and training["centric_weights"] == {"text": 1.0, "audio": 0.5}
    srcs = {s["name"]: s for s in training["centric_sources"]}
    assert srcs["audio"]["role"] == "memory_b" and srcs["audio"]["weight"] == 0.5 and srcs["audio"]["rows"] == 300
    assert srcs["text"]["rows"] == res["metrics"]["train_pairs"]
    assert res["metrics"]["loss_audio"] > 0 and res["metrics"]["loss_text"] > 0
    with pytest.raises(TrainingError, match=r"centric: recorded 'text,audio', now 'text,image,audio'"):
        train_connector(*args, cfg.replace(epochs=2, centric="text,audio,image"), resume=True, plot=False)
    with pytest.raises(TrainingError, match="weights"):
        train_connector(*args, cfg.replace(epochs=2, centric_weights={"audio": 1.0}), resume=True, plot=False)
    # the same sources, named by role, resume fine
    res2 = train_connector(*args, cfg.replace(epochs=2, centric="shared,memory_b"), resume=True, plot=False)
    assert [r["epoch"] for r in res2["history"]] == [1, 2]


def test_memory_centric_only_and_queue_mode(tiny_synthetic, tmp_path):
    p = tiny_synthetic
    args = (p["text_a"], p["text_b"], p["image_a"], p["audio_b"])
    only = train_connector(*args, tmp_path / "only", tiny_config(epochs=1, centric="image"), plot=False)
    assert only["metrics"]["inter_pseudo"] > 0 and only["metrics"]["intra"] > 0
    assert not (tmp_path / "only" / "completions" / "A").exists()  # no text-centric completion computed
    q = train_connector(*args, tmp_path / "q", tiny_config(epochs=1, centric="text,audio,image", completion="queue",
                                                           queue_capacity=100), plot=False)
    assert q["metrics"]["inter_pseudo"] > 0
    # queue mode precomputes only the first hop (captions in RAM); the second is done per batch
    assert (tmp_path / "q" / "completions" / "centric-memory_b" / "shared_a").exists()
    assert not (tmp_path / "q" / "completions" / "centric-memory_b" / "memory_a").exists()


def test_source_names_follow_the_stores_3d_layout(make_store):
    """CLIP+ULIP: images are shared, the memories hold CLIP text and ULIP 3D (nothing audio/image-specific)."""
    from tests.fixtures_connect import ENC_A, ENC_B

    rng = np.random.default_rng(0)
    keys = [f"img{i}" for i in range(20)]
    stores = open_connect_stores(
        make_store("clip_image", unit_rows(rng, 20, 16), modality="image", encoder=ENC_A, keys=keys),
        make_store("ulip_image", unit_rows(rng, 20, 16), modality="image", encoder=ENC_B, keys=keys),
        make_store("clip_text", unit_rows(rng, 30, 16), modality="text", encoder=ENC_A),
        make_store("ulip_3d", unit_rows(rng, 25, 16), modality="3d", encoder=ENC_B))
    got = resolve_centric(stores, tiny_config(centric="3d,image,text", centric_weights={"3d": 0.25}))
    assert [(s.name, s.role, s.weight) for s in got] == [("image", "shared", 1.0), ("text", "memory_a", 1.0),
                                                         ("3d", "memory_b", 0.25)]
    assert [s.name for s in resolve_centric(stores, tiny_config())] == ["image"]  # default: shared = image here
    with pytest.raises(ConfigError, match="'audio' is not a source"):
        resolve_centric(stores, tiny_config(centric="image,audio"))
    res = train_connector(stores.shared_a, stores.shared_b, stores.memory_a, stores.memory_b,
                          stores.shared_a.path.parent / "run3d", tiny_config(epochs=1, centric="image,text,3d"),
                          plot=False)
    assert res["config"]["centric"] == "image,text,3d" and res["metrics"]["loss_3d"] > 0


def test_schedule_epoch_is_a_pass_over_the_shared_pairs_memories_cycle():
    from cmcr.trainer.data import CentricSource, PairData, SourceData
    from cmcr.trainer.loop import _Schedule

    shared, audio = CentricSource("text", "shared", 1.0), CentricSource("audio", "memory_b", 1.0)
    z = np.zeros((1, 1))
    data = PairData(keys=[f"c{i}" for i in range(100)], s_a=z, s_b=z, centric=[shared, audio],
                    sources=[SourceData(audio, [f"a{i}" for i in range(250)], z, z, None, z)])
    sched = _Schedule(data, np.arange(90), tiny_config(batch_size=30))
    assert sched.steps_per_epoch == 3  # 90 training pairs / 30, not 250 memory rows / 30
    seen = np.concatenate([dict((s.name, r) for s, r in sched.batches(t))["audio"] for t in range(9)])
    assert len(seen) == 250 and sorted(seen) == list(range(250))  # one full pass of the memory in 9 steps
    text = [dict((s.name, r) for s, r in sched.batches(t))["text"] for t in range(3)]
    assert sorted(np.concatenate(text)) == list(range(90))
    only = _Schedule(PairData(keys=data.keys, s_a=z, s_b=z, centric=[audio], sources=data.sources), np.arange(90),
                     tiny_config(batch_size=30))
    assert only.steps_per_epoch == 9 and only.largest == 250
