"""Training loop: outputs, checkpoints, resume, non-finite guard, store checks (trainer/loop.py, data.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.errors import StoreMismatchError, TrainingError
from cmcr.trainer import loop
from cmcr.trainer.connector import Connector
from cmcr.trainer.data import batch_rows, steps_per_epoch
from cmcr.trainer.loop import train_connector
from tests.fixtures_connect import ENC_A, tiny_config, unit_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(paths, out, cfg, **kw):
    kw.setdefault("plot", False)
    return train_connector(paths["text_a"], paths["text_b"], paths["image_a"], paths["audio_b"], out, cfg, **kw)


@pytest.fixture(scope="module")
def full_run(tiny_synthetic, tmp_path_factory):
    """One uninterrupted 2-epoch run with a loss curve: (result, folder)."""
    out = tmp_path_factory.mktemp("full_run") / "run"
    return _train(tiny_synthetic, out, tiny_config(epochs=2, keep_checkpoints=1), plot=True), out


def test_train_writes_connector_metrics_and_curve(full_run):
    res, out = full_run
    for name in ("connector.json", "connector.safetensors", "metrics.jsonl", "loss_curve.png"):
        assert (out / name).exists(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["inter_pseudo"] > 0 and rows[-1]["intra"] > 0
    assert "val_shared_R@1" in rows[-1]
    # keep_checkpoints=1: only the newest survives
    assert [p.name for p in (out / "checkpoints").glob("epoch-*.pt")] == ["epoch-0002.pt"]
    meta = json.loads((out / "connector.json").read_text())
    assert meta["training"]["seed"] == 0 and meta["training"]["noise_std"] == 0.025
    assert meta["data"]["pairs"] == 240 and meta["stores"]["memory_b"]["modality"] == "audio"
    assert res["metrics"]["epoch"] == 2 and res["fingerprint"] == Connector.load(out).fingerprint
    assert (out / "completions" / "A" / "manifest.json").exists()


def test_rerun_without_resume_is_refused_and_overwrite_starts_over(tiny_synthetic, tmp_path):
    _train(tiny_synthetic, tmp_path / "r", tiny_config(epochs=1))
    with pytest.raises(TrainingError, match="--resume"):
        _train(tiny_synthetic, tmp_path / "r", tiny_config(epochs=1))
    res = _train(tiny_synthetic, tmp_path / "r", tiny_config(epochs=1), overwrite=True)
    assert len(res["history"]) == 1


def test_interrupted_run_resumes_to_same_weights(full_run, tiny_synthetic, tmp_path, monkeypatch):
    ref, ref_dir = full_run
    real = loop._validate
    calls = {"n": 0}

    def crash_after_first_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_validate", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_synthetic, tmp_path / "cut", tiny_config(epochs=2))
    monkeypatch.setattr(loop, "_validate", real)
    with pytest.raises(TrainingError, match="other settings"):
        _train(tiny_synthetic, tmp_path / "cut", tiny_config(epochs=2, lr=0.1), resume=True)
    res = _train(tiny_synthetic, tmp_path / "cut", tiny_config(epochs=2), resume=True)
    assert [r["epoch"] for r in res["history"]] == [1, 2]
    assert res["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5)  # seeded and resumable
    a = Connector.load(ref_dir).projectors["A"].state_dict()
    b = Connector.load(tmp_path / "cut").projectors["A"].state_dict()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_synthetic, tmp_path, monkeypatch):
    real = loop.losses.cmcr_loss
    state = {"steps": 0}

    def nan_in_second_epoch(*a, **k):
        state["steps"] += 1
        loss, parts = real(*a, **k)
        if state["steps"] > 4:  # 216 training pairs / 64 = 4 steps per epoch
            parts["loss"] = float("nan")
        return loss, parts

    monkeypatch.setattr(loop.losses, "cmcr_loss", nan_in_second_epoch)
    with pytest.raises(TrainingError, match="non-finite loss.*epoch 2.*epoch-0001.pt"):
        _train(tiny_synthetic, tmp_path / "nan", tiny_config(epochs=3))
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").glob("*.pt")] == ["epoch-0001.pt"]
    assert not (tmp_path / "nan" / "connector.json").exists()


def test_batches_never_end_with_one_row():
    rows = np.arange(129)
    batches = list(batch_rows(rows, 64, seed=0, epoch=0))
    assert [len(b) for b in batches] == [64, 65]
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()
    assert steps_per_epoch(129, 64) == 2 and steps_per_epoch(128, 64) == 2 and steps_per_epoch(130, 64) == 3
    # final batch of one row trains without a BatchNorm error
    assert [len(b) for b in batch_rows(np.arange(3), 2, 0, 0)] == [3]


def test_queue_completion_and_no_completion_modes(tiny_synthetic, tmp_path):
    q = _train(tiny_synthetic, tmp_path / "q", tiny_config(epochs=1, completion="queue", queue_capacity=100))
    assert q["metrics"]["inter_pseudo"] > 0
    n = _train(tiny_synthetic, tmp_path / "n", tiny_config(epochs=1, use_completion=False))
    assert n["metrics"]["inter_pseudo"] == 0 and not (tmp_path / "n" / "completions").exists()


def test_store_checks(tiny_synthetic, tmp_path, make_store):
    p = tiny_synthetic
    with pytest.raises(StoreMismatchError, match="same modality"):
        train_connector(p["text_a"], p["eval_audio_b"], p["image_a"], p["audio_b"], tmp_path / "x", tiny_config())
    with pytest.raises(StoreMismatchError, match="same MCR"):
        train_connector(p["text_a"], p["text_b"], p["audio_b"], p["audio_b"], tmp_path / "x", tiny_config())
    with pytest.raises(StoreMismatchError, match="same encoder"):
        train_connector(p["text_a"], p["text_a"], p["image_a"], p["image_a"], tmp_path / "x", tiny_config())
    rng = np.random.default_rng(0)
    other = make_store("t_other", unit_rows(rng, 5, 16), modality="text", encoder={**ENC_A, "dim": 16},
                       keys=[f"zz{i}" for i in range(5)])
    with pytest.raises(StoreMismatchError, match="same MCR"):
        train_connector(other, p["text_b"], p["image_a"], p["audio_b"], tmp_path / "x", tiny_config())
