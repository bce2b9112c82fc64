"""Counterfactual audio-image recognition: protocols, scoring, report, CLI (trainer/counterfactual.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.errors import ConfigError, InputDataError, StoreMismatchError
from cmcr.stores.store import Store
from cmcr.trainer.counterfactual import derangement, evaluate_counterfactual, read_pairs_file, shuffled_pairs
from cmcr.trainer.metrics import chance_ap
from cmcr.trainer.tasks import average_precision, max_f1
from tests.fixtures_connect import unit_rows, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENC = {"family": "test", "architecture": "shared-space", "weights": "seed-1", "dim": 8}
CLASSES = ["dog", "cat", "bell", "rain"]


@pytest.fixture
def paired(tmp_path):
    """Raw audio and image stores of one encoder (one space, no connector): 40 shared keys, 4 classes;
    each image is its audio plus a little noise, so matched pairs score ~1 and shuffled ones ~0."""
    rng = np.random.default_rng(0)
    a = unit_rows(rng, 40, 8)
    i = a + 0.05 * rng.standard_normal(a.shape).astype(np.float32)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    keys = [f"v{n:03d}" for n in range(40)]
    labels = [CLASSES[n % 4] for n in range(40)]
    sa = write_store(tmp_path / "aud", a, modality="audio", encoder=ENC, keys=keys, metadata={"label": labels})
    si = write_store(tmp_path / "img", i, modality="image", encoder=ENC, keys=keys, metadata={"label": labels})
    return sa, si


def test_shuffled_protocol_known_answer(paired):
    sa, si = paired
    r = evaluate_counterfactual(sa, si, protocol="shuffled", negatives=3, seed=1)
    assert r["matched"] == 40 and r["mismatched"] == 120 - r["protocol"]["duplicate_negatives_dropped"]
    assert r["AP"] == 1.0 and r["max_F1"] == 1.0
    assert r["mean_score"]["matched"] > 0.95 and abs(r["mean_score"]["mismatched"]) < 0.3
    p = r["positive_rate"]
    assert r["chance"]["positive_rate"] == p and r["chance"]["max_F1"] == pytest.approx(2 * p / (1 + p))
    assert r["chance"]["AP"] == pytest.approx(chance_ap(r["pairs"], np.array([40]))[0])
    assert set(r["per_class"]) == set(CLASSES) and r["classes_scored"] == 4
    assert all(c["AP"] == 1.0 and c["matched"] == 10 for c in r["per_class"].values())
    assert r["random_weights"] is False and r["connector"] is None
    # seeded: the same seed gives the same pairs, another seed other ones
    assert evaluate_counterfactual(sa, si, negatives=3, seed=1) == r
    a1 = shuffled_pairs(sa, si, seed=1)
    a2 = shuffled_pairs(sa, si, seed=2)
    assert not np.array_equal(a1.image_rows, a2.image_rows) and np.array_equal(a1.audio_rows, a2.audio_rows)


def test_shuffled_different_class_negatives(paired):
    sa, si = paired
    lp = shuffled_pairs(sa, si, negatives=2, seed=0, different_class=True)
    akeys, ikeys = np.array(sa.keys()), np.array(si.keys())
    a_cls = np.array(sa.metadata(["label"]).column("label").to_pylist())
    i_cls = np.array(si.metadata(["label"]).column("label").to_pylist())
    neg = ~lp.labels
    assert neg.sum() > 60
    assert (a_cls[lp.audio_rows[neg]] != i_cls[lp.image_rows[neg]]).all()
    assert (akeys[lp.audio_rows[lp.labels]] == ikeys[lp.image_rows[lp.labels]]).all()
    assert [lp.class_names[c] for c in lp.class_codes[:4]] == a_cls[lp.audio_rows[:4]].tolist()
    with pytest.raises(ConfigError, match="--different-class needs a `kind` column"):
        shuffled_pairs(sa, si, different_class=True, label_column="kind")


def test_derangement_properties():
    rng = np.random.default_rng(5)
    for n in (2, 3, 17, 200):
        p = derangement(n, rng)
        assert sorted(p.tolist()) == list(range(n)) and (p != np.arange(n)).all()
    classes = ["a"] * 30 + ["b"] * 30
    p = derangement(60, rng, classes)
    assert (p >= 0).all() and all(classes[i] != classes[j] for i, j in enumerate(p))
    # one class holds 3/4 of the items: some cannot get a partner of another class
    lopsided = ["a"] * 15 + ["b"] * 5
    p = derangement(20, rng, lopsided)
    ok = p >= 0
    assert 0 < ok.sum() <= 10 and all(lopsided[i] != lopsided[j] for i, j in enumerate(p) if j >= 0)


def test_pairs_file_exact_scores(tmp_path):
    """Pairs whose cosines are set by hand: the report must equal AP / max-F1 of those cosines."""
    angles = np.deg2rad([0, 20, 40, 60, 80, 100])
    img = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    aud = np.array([[1.0, 0.0]], dtype=np.float32)
    enc = {**ENC, "dim": 2}
    sa = write_store(tmp_path / "a", aud, modality="audio", encoder=enc, keys=["snd"])
    si = write_store(tmp_path / "i", img, modality="image", encoder=enc, keys=[f"im{k}" for k in range(6)])
    labels = [1, 0, 1, 1, 0, 0]
    f = tmp_path / "pairs.csv"
    f.write_text("audio,image,label,class\n" + "".join(f"snd,im{k},{y},c{k % 2}\n" for k, y in enumerate(labels))
                 + "snd,missing_image,1,c0\n")
    r = evaluate_counterfactual(sa, si, protocol="pairs", pairs_file=f)
    cos = np.cos(angles)
    assert r["AP"] == pytest.approx(average_precision(cos, labels)) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    f1, thr = max_f1(cos, labels)
    assert r["max_F1"] == pytest.approx(f1) and r["threshold"] == pytest.approx(thr, abs=1e-6)
    assert r["skipped"]["pairs_with_missing_key"] == 1 and r["skipped"]["image_keys_missing"] == 1
    assert set(r["per_class"]) == {"c0", "c1"} and r["per_class"]["c0"]["pairs"] == 3
    # JSONL, words as labels
    j = tmp_path / "pairs.jsonl"
    j.write_text("\n".join(json.dumps({"audio_key": "snd", "image_key": f"im{k}", "matched": bool(y)})
                           for k, y in enumerate(labels)))
    rj = evaluate_counterfactual(sa, si, protocol="pairs", pairs_file=j)
    assert rj["AP"] == pytest.approx(r["AP"]) and "per_class" not in rj


def test_pairs_file_errors(tmp_path, paired):
    sa, si = paired
    f = tmp_path / "p.csv"
    f.write_text("audio,image,label\nv000,v000,1\nv001,v002,maybe\n")
    with pytest.raises(InputDataError, match=r"p.csv row 3: label is 'maybe'"):
        read_pairs_file(f)
    f.write_text("audio,picture,label\nv000,v000,1\n")
    with pytest.raises(InputDataError, match=r"row 2: needs fields audio, image and label"):
        read_pairs_file(f)
    f.write_text("audio,image,label\nv000,v000,1\nv001,v001,1\n")
    with pytest.raises(InputDataError, match="all 2 pairs are matched"):
        evaluate_counterfactual(sa, si, protocol="pairs", pairs_file=f)
    f.write_text("audio,image,label\nx,y,1\nz,y,0\n")
    with pytest.raises(InputDataError, match="none of the pairs has both keys"):
        evaluate_counterfactual(sa, si, protocol="pairs", pairs_file=f)
    with pytest.raises(ConfigError, match="--protocol pairs goes with --pairs"):
        evaluate_counterfactual(sa, si, protocol="pairs")
    with pytest.raises(ConfigError, match="belong to --protocol shuffled"):
        evaluate_counterfactual(sa, si, protocol="label", negatives=2)


def test_label_protocol_and_space_checks(paired, tmp_path):
    sa, si = paired
    r = evaluate_counterfactual(sa, si, protocol="label")
    assert r["pairs"] == 1600 and r["matched"] == 400 and r["positive_rate"] == 0.25
    # the whole cross product, by hand: cosines of every (audio, image) row pair, matched = same label
    cos = sa.embeddings(np.float32) @ si.embeddings(np.float32).T
    lab = np.array(sa.metadata(["label"]).column("label").to_pylist())
    assert r["AP"] == pytest.approx(average_precision(cos.ravel(), (lab[:, None] == lab[None, :]).ravel()), abs=1e-6)
    other = write_store(tmp_path / "other", unit_rows(np.random.default_rng(1), 40, 8), modality="image",
                        encoder={**ENC, "architecture": "another"}, keys=sa.keys())
    with pytest.raises(StoreMismatchError, match="different embedding spaces; pass --connector"):
        evaluate_counterfactual(sa, other)
    lone = write_store(tmp_path / "lone", unit_rows(np.random.default_rng(2), 5, 8), modality="image", encoder=ENC,
                       keys=[f"x{k}" for k in range(5)])
    with pytest.raises(InputDataError, match="share 0 key"):
        evaluate_counterfactual(sa, lone)


def test_synthetic_world_connector_separates_true_pairs(tiny_synthetic, tiny_trained):
    """The synthetic MCR pair: held-out true (audio, image) pairs share a latent, so through a trained
    connector matched pairs must score above shuffled ones, and more so against another class."""
    p = tiny_synthetic
    aud, img = Store.open(p["eval_audio_b"]), Store.open(p["eval_image_a"])
    r = evaluate_counterfactual(aud, img, connector=tiny_trained, protocol="shuffled", negatives=2, seed=0)
    assert r["connector"] == str(tiny_trained) and r["matched"] == 60
    # tiny world, 6 epochs: AP 0.47 vs chance 0.36 (a 15-epoch connector: 0.54)
    assert r["AP"] > r["chance"]["AP"] + 0.07 and r["max_F1"] > r["chance"]["max_F1"]
    assert r["mean_score"]["matched"] > r["mean_score"]["mismatched"] + 0.1
    # negatives of another class are easier to reject (they share less of the latent)
    rd = evaluate_counterfactual(aud, img, connector=tiny_trained, negatives=2, seed=0, different_class=True)
    assert rd["AP"] > r["AP"] and rd["mean_score"]["mismatched"] < r["mean_score"]["mismatched"]
    rl = evaluate_counterfactual(aud, img, connector=tiny_trained, protocol="label")
    assert rl["AP"] > rl["chance"]["AP"] + 0.07 and rl["classes_scored"] == 5


def test_shuffled_joins_by_key_not_by_row(paired, tmp_path):
    """The image store holds the same pairs in another order plus unpaired rows: same numbers."""
    sa, si = paired
    rng = np.random.default_rng(7)
    order = rng.permutation(40)
    emb = si.embeddings(np.float32)[order]
    keys = [si.keys()[k] for k in order]
    labels = [si.metadata(["label"]).column("label").to_pylist()[k] for k in order]
    extra = unit_rows(rng, 5, 8)
    mixed = write_store(tmp_path / "mixed", np.r_[extra, emb], modality="image", encoder=ENC,
                        keys=[f"zz{k}" for k in range(5)] + keys, metadata={"label": ["dog"] * 5 + labels})
    r = evaluate_counterfactual(sa, mixed, negatives=2, seed=3)
    assert r["AP"] == 1.0 and r["matched"] == 40 and r["protocol"]["keys_only_in_image"] == 5
    lp = shuffled_pairs(sa, mixed, negatives=1, seed=3)
    pos = lp.labels
    assert [sa.keys()[a] for a in lp.audio_rows[pos]] == [mixed.keys()[i] for i in lp.image_rows[pos]]


def test_stores_of_one_modality_or_without_labelled_rows_are_named(paired, tmp_path):
    sa, si = paired
    with pytest.raises(ConfigError, match="both hold image embeddings"):
        evaluate_counterfactual(si, si, protocol="label")
    captions = write_store(tmp_path / "captions", unit_rows(np.random.default_rng(3), 6, 8), modality="text",
                           encoder=ENC, keys=[f"c{k}" for k in range(6)], metadata={"label": [None] * 6})
    with pytest.raises(InputDataError, match=r"captions \(text\) has a `label` value"):
        evaluate_counterfactual(captions, si, protocol="label")
