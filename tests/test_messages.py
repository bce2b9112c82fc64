"""Messages that must not lead users wrong (issue 13 defect 8): the advice in each is followed and works."""

from __future__ import annotations

from pathlib import Path

import pytest

import cmcr.pipeline.encode as encode_mod
from cmcr.errors import InputDataError, TrainingError
from cmcr.pipeline.encode import encode_shards
from cmcr.pipeline.shards import write_shards
from cmcr.stores.store import Store
from tests.fixtures_connect import tiny_config


def test_nan_loss_advice_is_one_that_works(tiny_synthetic: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cmcr.trainer import losses
    from cmcr.trainer.loop import train_connector

    p = tiny_synthetic
    args = (p["text_a"], p["text_b"], p["image_a"], p["audio_b"], tmp_path / "run")
    real = losses.cmcr_loss
    calls = {"n": 0}

    def exploding(*a, **kw):  # fine for the first epoch, then NaN
        loss, parts = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] > 4:
            parts = {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(losses, "cmcr_loss", exploding)
    with pytest.raises(TrainingError, match="non-finite loss") as e:
        train_connector(*args, tiny_config(epochs=3, batch_size=64), plot=False)
    msg = str(e.value)
    assert "--overwrite" in msg and "then rerun with --resume" not in msg
    monkeypatch.setattr(losses, "cmcr_loss", real)
    lower = tiny_config(epochs=3, batch_size=64, lr=1e-3)
    with pytest.raises(TrainingError, match="other settings"):  # why --resume is not the advice
        train_connector(*args, lower, resume=True, plot=False)
    result = train_connector(*args, lower, overwrite=True, plot=False)  # the advice works
    assert result["metrics"]["loss"] == result["metrics"]["loss"]


def test_concurrent_encode_of_the_same_shard_is_not_a_clash(tiny_clip, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\nbirds\n")
    shards = write_shards(lst, tmp_path / "shards", samples_per_shard=2).shards["text"]
    first = encode_shards(shards, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    assert first.rows == 3
    # a second process that listed its work before the first one wrote: every shard looks to-do
    monkeypatch.setattr(encode_mod, "shards_to_do",
                        lambda paths, store: (list(paths), [encode_mod.shard_identity(q) for q in paths]))
    second = encode_shards(shards, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    assert second.rows == 0
    store = Store.open(tmp_path / "store", validate="full")
    assert store.num_rows == 3 and len(store.parts) == 2


def test_key_clash_advice_warns_that_overwrite_deletes_everything(tiny_clip, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "caps.txt").write_text("a dog\n")
    (tmp_path / "b" / "caps.txt").write_text("a cat\n")
    s1 = write_shards(tmp_path / "a" / "caps.txt", tmp_path / "s1").shards["text"]
    s2 = write_shards(tmp_path / "b" / "caps.txt", tmp_path / "s2").shards["text"]
    encode_shards(s1, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    with pytest.raises((encode_mod.KeyClashError, encode_mod.ChangedShardError), match="never while another cmcr"):
        encode_shards(s2, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)


def test_wrong_modality_hint_names_only_folders_that_exist(tmp_path: Path) -> None:
    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\n")
    shards = write_shards(lst, tmp_path / "shards").shards["text"]
    with pytest.raises(InputDataError) as e:
        encode_mod.check_shards_modality(shards, "image")
    msg = str(e.value)
    assert "-m text" in msg and str(tmp_path / "shards" / "image") not in msg
    assert "holds text" in msg and "shard image files first" in msg
    # where the other modality's shards exist, the hint names that folder
    (tmp_path / "pics").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "x.png")
    write_shards([lst, tmp_path / "pics"], tmp_path / "shards")
    with pytest.raises(InputDataError, match=f"the image samples, {tmp_path / 'shards' / 'image'}"):
        encode_mod.check_shards_modality(shards, "image")
