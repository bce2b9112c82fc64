"""Connector files, projection of stores, evaluation (trainer/connector.py, evaluate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.errors import ConnectorError, StoreMismatchError
from cmcr.stores.store import Store
from cmcr.trainer.connector import Connector
from cmcr.trainer.evaluate import evaluate_retrieval, evaluate_zeroshot, project_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_trained):
    return tiny_trained


def test_load_validates_and_projects_in_eval_mode(trained, tiny_synthetic):
    conn = Connector.load(trained)
    assert conn.sides["A"].mcr == "mcr-a" and conn.sides["A"].modalities == ["text", "image"]
    assert conn.sides["B"].modalities == ["text", "audio"]
    img = Store.open(tiny_synthetic["eval_image_a"])
    side = conn.side_for(img.encoder, "image")
    assert side == "A"
    x = img.embeddings(np.float32)
    z = conn.project(side, x, identity=img.encoder, modality="image")
    assert z.shape == (60, 16) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    # eval mode: one row gives the same answer as inside a batch (BatchNorm running stats)
    np.testing.assert_allclose(conn.project(side, x[3], identity=img.encoder, modality="image"), z[3], atol=1e-5)
    assert not any(m.training for m in conn.projectors["A"].modules())


def test_wrong_encoder_modality_or_dim_is_refused(trained, tiny_synthetic):
    conn = Connector.load(trained)
    aud = Store.open(tiny_synthetic["eval_audio_b"])
    x = aud.embeddings(np.float32)
    with pytest.raises(ConnectorError, match="encoder"):
        conn.project("A", x, identity=aud.encoder, modality="audio")
    with pytest.raises(ConnectorError, match="modalities"):
        conn.project("B", x, identity=aud.encoder, modality="image")
    with pytest.raises(ConnectorError, match="dim"):
        conn.project("B", x[:, :8], identity=aud.encoder, modality="audio")
    with pytest.raises(ConnectorError, match="no side"):
        conn.side_for({"family": "other"}, "audio")
    with pytest.raises(ConnectorError, match="identity"):
        conn.project("B", x, identity=None, modality="audio")


def test_tampered_or_missing_files_fail_to_load(trained, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(trained, copy)
    w = copy / "connector.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ConnectorError, match="sha256"):
        Connector.load(copy)
    meta = json.loads((trained / "connector.json").read_text())
    meta["format_version"] = 99
    shutil.copy(trained / "connector.safetensors", w)
    (copy / "connector.json").write_text(json.dumps(meta))
    with pytest.raises(ConnectorError, match="version"):
        Connector.load(copy)
    with pytest.raises(ConnectorError, match="not a connector"):
        Connector.load(tmp_path / "nothing")


def test_project_store_and_evaluate(trained, tiny_synthetic, tmp_path):
    conn = Connector.load(trained)
    aud = project_store(conn, tiny_synthetic["eval_audio_b"], tmp_path / "aud")
    img = project_store(trained, tiny_synthetic["eval_image_a"], tmp_path / "img")
    assert aud.encoder["family"] == "cmcr-connector" and aud.encoder["side"] == "B"
    assert aud.encoder["connector"] == conn.fingerprint and aud.encoder["base"]["architecture"] == "mcr-b"
    assert aud.keys() == Store.open(tiny_synthetic["eval_audio_b"]).keys() and "label" in aud.metadata_columns
    assert (tmp_path / "aud" / "index").exists()
    again = project_store(conn, tiny_synthetic["eval_audio_b"], tmp_path / "aud")  # rerun: nothing to do
    assert len(again.parts) == len(aud.parts)
    res = evaluate_retrieval(aud, img, by="key")
    assert res["direction"] == "audio->image" and res["pool"] == 60
    assert res["chance"]["R@1"] == pytest.approx(1 / 60)
    assert res["R@10"] > res["chance"]["R@10"]
    by_label = evaluate_retrieval(aud, img, by="label")
    assert by_label["mean_positives"] > 1 and by_label["R@1"] >= res["R@1"]
    with pytest.raises(StoreMismatchError, match="different embedding spaces"):
        evaluate_retrieval(aud, tiny_synthetic["eval_image_a"])
    with pytest.raises(StoreMismatchError):
        project_store(conn, tiny_synthetic["eval_image_a"], tmp_path / "aud")
    with pytest.raises(ConnectorError, match="already in a connected space"):  # projecting a projected store
        project_store(conn, tmp_path / "aud", tmp_path / "twice")
    cls = Store.open(tiny_synthetic["classes_text_b"])
    zc = conn.project("B", cls.embeddings(np.float32), identity=cls.encoder, modality="text")
    zs = evaluate_zeroshot(aud, zc, cls.keys())
    assert zs["classes"] == 5 and zs["top1"] > zs["chance"]["top1"]
