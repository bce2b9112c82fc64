"""No code from user files: cmcr.safeload and every path that loads a torch file a user hands in
(CLAP checkpoints on encode, training checkpoints on ``connect --resume``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cmcr.cli import main
from cmcr.errors import CorruptFileError, TrainingError, UnsafeFileError
from cmcr.safeload import ARGPARSE_GLOBALS, NUMPY_SCALAR_GLOBALS, load_torch_file
from tests.fixtures_connect import tiny_config
from tests.fixtures_encode import tone, write_tiny_bpe_tokenizer, write_wav

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Creates ``marker`` when unpickled by a full unpickler (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant(obj: dict, path: Path, marker: Path) -> Path:
    """Save ``obj`` with a payload in it, and check that a full unpickling really would run it."""
    torch.save({**obj, "extra": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the control: full unpickling runs the payload
    assert marker.exists(), "the planted payload does not work; the test would prove nothing"
    marker.unlink()
    return path


def test_plain_and_allowlisted_files_load(tmp_path):
    torch.save({"w": torch.arange(3.0), "epoch": 3, "name": "x"}, tmp_path / "plain.pt")
    assert load_torch_file(tmp_path / "plain.pt", what="test file")["epoch"] == 3
    torch.save({"epoch": np.int64(7), "lr": np.float64(0.5), "f": np.float32(1.5), "ok": np.bool_(True)},
               tmp_path / "np.pt")
    with pytest.raises(UnsafeFileError, match=r"np\.pt.*numpy\.core\.multiarray\.scalar"):
        load_torch_file(tmp_path / "np.pt", what="test file")  # not allowlisted unless asked for
    got = load_torch_file(tmp_path / "np.pt", what="test file", allowed_globals=NUMPY_SCALAR_GLOBALS)
    assert got == {"epoch": 7, "lr": 0.5, "f": 1.5, "ok": True} and isinstance(got["epoch"], np.int64)
    with pytest.raises(UnsafeFileError):  # the allowlist is per call, never left installed
        load_torch_file(tmp_path / "np.pt", what="test file")
    torch.save({"args": argparse.Namespace(model="PointBERT", npoints=8192)}, tmp_path / "ns.pt")
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        load_torch_file(tmp_path / "ns.pt", what="test file", allowed_globals=NUMPY_SCALAR_GLOBALS)
    assert load_torch_file(tmp_path / "ns.pt", what="t", allowed_globals=ARGPARSE_GLOBALS)["args"].npoints == 8192


def test_payload_is_refused_with_a_clear_message(tmp_path):
    marker = tmp_path / "PWNED"
    f = plant({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeFileError) as e:
        load_torch_file(f, what="CLAP checkpoint", allowed_globals=NUMPY_SCALAR_GLOBALS)
    msg = str(e.value)
    assert not marker.exists()
    assert str(f) in msg and "CLAP checkpoint" in msg and "refuses to unpickle" in msg and "system" in msg
    assert "weights_only=False" in msg and "evil.weights.pt" in msg  # how to convert a file one trusts


def test_corrupt_and_unsupported_files(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 8)
    for name in ("trunc.pt", "empty.pt", "junk.pt", "missing.pt"):
        with pytest.raises(CorruptFileError, match=name):
            load_torch_file(tmp_path / name, what="test file")
    torch.save({"w": torch.zeros(2)}, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(UnsafeFileError, match="protocol 4"):
        load_torch_file(tmp_path / "p4.pt", what="test file")


# -- CLAP checkpoints: the real `cmcr encode` path ------------------------------------------------

def test_payload_in_clap_checkpoint_does_not_run_on_encode(tiny_clap, tmp_path, capsys):
    from cmcr.pipeline.clap_encoder import save_test_checkpoint

    good = save_test_checkpoint(tiny_clap, tmp_path / "good.pt")
    marker = tmp_path / "PWNED"
    evil = plant(torch.load(good, weights_only=True), tmp_path / "evil.pt", marker)
    tok = write_tiny_bpe_tokenizer(tmp_path / "tok")
    (tmp_path / "media").mkdir()
    write_wav(tmp_path / "media" / "a.wav", tone(0.5, 48000), 48000)
    assert main(["shard", str(tmp_path / "media"), "--out", str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    rc = main(["encode", str(tmp_path / "shards" / "audio"), "-e", f"clap:cmcr-tiny-clap@{evil}", "-m", "audio",
               "--store", str(tmp_path / "store"), "--clap-tokenizer", str(tok), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and not marker.exists()
    assert str(evil) in err and "refuses to unpickle" in err
    assert not (tmp_path / "store" / "manifest.json").exists()
    # the same checkpoint without the payload encodes
    assert main(["encode", str(tmp_path / "shards" / "audio"), "-e", f"clap:cmcr-tiny-clap@{good}", "-m", "audio",
                 "--store", str(tmp_path / "store"), "--clap-tokenizer", str(tok), "--num-workers", "0"]) == 0


# -- training checkpoints: `cmcr connect --resume` ------------------------------------------------

def _connect(p, out, *extra):
    return main(["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
                 str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(out), "--config",
                 str(out.parent / "c.toml"), *extra])


@pytest.fixture
def two_epoch_run(tiny_synthetic, tmp_path, monkeypatch):
    from cmcr.trainer import loop

    monkeypatch.setattr(loop, "plot_loss_curve", lambda history, path: None)
    (tmp_path / "c.toml").write_text("[model]\nhidden_dim = 32\nout_dim = 16\n[optim]\nbatch_size = 64\n"
                                     "[run]\ndevice = 'cpu'\n")
    out = tmp_path / "run"
    assert _connect(tiny_synthetic, out, "--epochs", "2") == 0
    ckpts = sorted((out / "checkpoints").glob("epoch-*.pt"))
    assert [c.name for c in ckpts] == ["epoch-0001.pt", "epoch-0002.pt"]
    return out, ckpts


def test_payload_in_newest_training_checkpoint_does_not_run_on_resume(two_epoch_run, tiny_synthetic, capsys):
    out, ckpts = two_epoch_run
    marker = out.parent / "PWNED"
    state = load_torch_file(ckpts[-1], what="training checkpoint")
    plant(state, ckpts[-1], marker)
    capsys.readouterr()
    rc = _connect(tiny_synthetic, out, "--epochs", "3", "--resume")
    err = capsys.readouterr().err
    assert rc == 1 and not marker.exists()
    assert "epoch-0002.pt" in err and "refuses to unpickle" in err and "--overwrite" in err


def test_corrupt_newest_training_checkpoint_falls_back_to_the_previous_one(two_epoch_run, tiny_synthetic, capsys,
                                                                           caplog):
    out, ckpts = two_epoch_run
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 3])  # a crash mid-write on a filesystem without atomic rename
    capsys.readouterr()
    assert _connect(tiny_synthetic, out, "--epochs", "3", "--resume", "--json") == 0
    cap = capsys.readouterr()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # stderr in the CLI
    assert any("epoch-0002.pt" in w and "resuming from the previous checkpoint epoch-0001.pt" in w for w in warned)
    import json

    assert json.loads(cap.out)["metrics"]["epoch"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # epoch 2 redone from epoch 1's state
    assert load_torch_file(out / "checkpoints" / "epoch-0002.pt", what="t")["epoch"] == 2  # rewritten


def test_no_readable_training_checkpoint_is_a_clear_error(tiny_synthetic, tmp_path, monkeypatch):
    from cmcr.trainer import loop

    monkeypatch.setattr(loop, "plot_loss_curve", lambda history, path: None)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch-0001.pt").write_bytes(b"")
    with pytest.raises(TrainingError, match="no readable checkpoint.*epoch-0001.pt.*--overwrite"):
        loop.train_connector(tiny_synthetic["text_a"], tiny_synthetic["text_b"], tiny_synthetic["image_a"],
                             tiny_synthetic["audio_b"], out, tiny_config(epochs=1), resume=True, plot=False)


def test_payload_in_open_clip_checkpoint_is_refused_before_open_clip_loads_it(tiny_clip, tmp_path):
    from cmcr.pipeline.encoders import load_encoder

    marker = tmp_path / "PWNED"
    good = tmp_path / "clip.pt"
    torch.save(tiny_clip.model.state_dict(), good)
    evil = plant({"state_dict": tiny_clip.model.state_dict()}, tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"open_clip checkpoint .*evil\.pt holds pickled objects"):
        load_encoder(f"open_clip:cmcr-tiny-clip@{evil}", device="cpu")
    assert not marker.exists()
    assert load_encoder(f"open_clip:cmcr-tiny-clip@{good}", device="cpu").identity()["weights"].startswith("sha256:")
