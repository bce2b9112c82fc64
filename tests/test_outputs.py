"""The derived-output protocol (cmcr.stores.files.claim_output), issue 13 design step: every writer
reuses a matching output, refuses another one naming the differing fields, starts over with
``--overwrite``, and refuses a concurrent writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmcr.errors import ConfigError, OutputLockedError, StoreMismatchError
from cmcr.stores.files import claim_output, output_lock, provenance_differences
from tests.test_files import Holder


def test_provenance_differences_name_nested_fields() -> None:
    diffs = provenance_differences({"a": 1, "enc": {"arch": "ViT-B-32", "dim": 512}, "gone": 1},
                                   {"a": 1, "enc": {"arch": "ViT-L-14", "dim": 512}, "new": [1, 2]})
    assert diffs == ["enc.arch: recorded 'ViT-B-32', now 'ViT-L-14'", "gone: recorded 1, now (none)",
                     "new: recorded (none), now [1,2]"]
    assert provenance_differences({"x": 1}, {"x": 1}) == []
    many = provenance_differences({f"k{i}": i for i in range(10)}, {}, limit=3)
    assert len(many) == 4 and many[-1] == "... and 7 more"


def test_claim_new_reuse_refuse_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with claim_output(out, kind="thing", provenance={"lr": 0.1, "seed": 0}, record="rec.json") as c:
        assert not c.reuse and not c.started_over
        (out / "result.bin").write_bytes(b"x")
        c.publish()
    with claim_output(out, kind="thing", provenance={"seed": 0, "lr": 0.1}, record="rec.json") as c:
        assert c.reuse and c.recorded == {"lr": 0.1, "seed": 0}
    with pytest.raises(StoreMismatchError) as e:
        with claim_output(out, kind="thing", provenance={"lr": 0.2, "seed": 0}, record="rec.json",
                          error=StoreMismatchError, hint="resume needs the same lr"):
            pass
    msg = str(e.value)
    assert "lr: recorded 0.1, now 0.2" in msg and "--overwrite" in msg and "resume needs the same lr" in msg
    assert "seed" not in msg and (out / "result.bin").exists()  # refused before anything was touched
    with claim_output(out, kind="thing", provenance={"lr": 0.2}, record="rec.json", overwrite=True) as c:
        assert c.started_over and not c.reuse
        assert not (out / "result.bin").exists() and not (out / "rec.json").exists()
        c.publish()
    assert (out / "rec.json").read_text().strip().startswith("{")


def test_foreign_folder_refused_even_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"not empty and holds no demo run \(thesis.tex\)"):
            with claim_output(out, kind="demo run", provenance={}, record="r.json", foreign=("release",),
                              overwrite=overwrite):
                pass
    assert (out / "thesis.tex").read_text() == "keep me"


def test_concurrent_claim_refused_and_shared_claims_coexist(tmp_path: Path) -> None:
    out = tmp_path / "store"
    with Holder(out):
        with pytest.raises(OutputLockedError):
            with claim_output(out, kind="store", provenance={}, shared=True):
                pass
    # shared writers (encode runs appending to one store) coexist; a start-over is refused meanwhile
    with output_lock(out, shared=True):
        import subprocess
        import sys

        code = ("import sys\nfrom cmcr.stores.files import output_lock\nfrom cmcr.errors import OutputLockedError\n"
                "try:\n    with output_lock(sys.argv[1], shared=sys.argv[2] == '1'):\n        print('ok')\n"
                "except OutputLockedError as e:\n    print('refused', e)\n")
        shared = subprocess.run([sys.executable, "-c", code, str(out), "1"], capture_output=True, text=True)
        exclusive = subprocess.run([sys.executable, "-c", code, str(out), "0"], capture_output=True, text=True)
        assert shared.stdout.startswith("ok"), shared.stderr
        assert exclusive.stdout.startswith("refused") and "shared writers" in exclusive.stdout
    with claim_output(out, kind="store", provenance={}, overwrite=True):  # free again
        pass


# ------------------------------------------------------------------------------ every writer follows it
def test_completions_reuse_refuse_naming_the_field_and_start_over(make_store, tmp_path: Path) -> None:
    import numpy as np

    from cmcr.stores.memory import complete_store
    from tests.fixtures_connect import unit_rows

    enc = {"family": "t", "architecture": "b", "weights": "w", "dim": 8}
    rng = np.random.default_rng(0)
    qs = make_store("t", unit_rows(rng, 12, 8), modality="text", encoder=enc)
    ms = make_store("a", unit_rows(rng, 20, 8), modality="audio", encoder=enc)
    first = complete_store(qs, ms, tmp_path / "p", batch_rows=4)
    assert complete_store(qs, ms, tmp_path / "p", batch_rows=4).manifest["updated_at"] == first.manifest["updated_at"]
    with pytest.raises(StoreMismatchError, match=r"temperature: recorded .*, now 0.5.*--overwrite"):
        complete_store(qs, ms, tmp_path / "p", temperature=0.5)
    again = complete_store(qs, ms, tmp_path / "p", batch_rows=6, overwrite=True)  # same settings, started over
    assert len(again.parts) == 2 and again.num_rows == 12


def test_projection_refuses_another_connector_naming_it(tiny_trained: Path, tiny_synthetic: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from cmcr.trainer.evaluate import project_store

    out = tmp_path / "proj"
    first = project_store(tiny_trained, tiny_synthetic["eval_audio_b"], out, index=False)
    assert project_store(tiny_trained, tiny_synthetic["eval_audio_b"], out, index=False).num_rows == first.num_rows
    with pytest.raises(StoreMismatchError, match=r"source_store: recorded .*--overwrite"):
        project_store(tiny_trained, tiny_synthetic["eval_image_a"], out, index=False)
    other = project_store(tiny_trained, tiny_synthetic["eval_image_a"], out, index=False, overwrite=True)
    assert other.modality == "image"


def test_index_reused_when_current_rebuilt_otherwise(store_factory) -> None:
    from cmcr.stores.index import build_index

    store = store_factory(n=300, dim=16)
    first = build_index(store, progress=False, sample_queries=50)
    assert build_index(store, progress=False, sample_queries=50)["created_at"] == first["created_at"]
    assert first["build_settings"]["sample_queries"] == 50
    other = build_index(store, progress=False, sample_queries=40)  # other settings: rebuilt, not refused
    assert other["recall_queries"] == 40
    again = build_index(store, progress=False, sample_queries=40, overwrite=True)
    assert again["build_settings"] == other["build_settings"]


def test_encode_refuses_other_dtype_naming_it_and_lock_is_shared(tiny_clip, tmp_path: Path) -> None:
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.shards import write_shards

    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\n")
    shards = write_shards(lst, tmp_path / "shards").shards["text"]
    kw = {"num_workers": 0, "progress": False}
    assert encode_shards(shards, tiny_clip, "text", tmp_path / "st", **kw).rows == 2
    assert encode_shards(shards, tiny_clip, "text", tmp_path / "st", **kw).shards_skipped == 1  # reused
    with pytest.raises(StoreMismatchError, match=r"dtype: recorded 'float16', now 'float32'.*--dtype float16"):
        encode_shards(shards, tiny_clip, "text", tmp_path / "st", dtype="float32", **kw)
    with Holder(tmp_path / "st"):  # an exclusive holder (another run starting it over) refuses encoders
        with pytest.raises(OutputLockedError):
            encode_shards(shards, tiny_clip, "text", tmp_path / "st", **kw)
    with output_lock(tmp_path / "st", shared=True):  # a side-by-side encoder: fine, but not a start-over
        assert encode_shards(shards, tiny_clip, "text", tmp_path / "st", **kw).rows == 0
    rep = encode_shards(shards, tiny_clip, "text", tmp_path / "st", dtype="float32", overwrite=True, **kw)
    assert rep.rows == 2


def test_connect_run_refuses_other_settings_naming_them(tiny_synthetic: dict[str, Path], tmp_path: Path) -> None:
    import json

    from cmcr.errors import TrainingError
    from cmcr.trainer.loop import train_connector
    from tests.fixtures_connect import tiny_config

    args = [tiny_synthetic[k] for k in ("text_a", "text_b", "image_a", "audio_b")]
    train_connector(*args, tmp_path / "c", tiny_config(epochs=1), plot=False)
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run["training"]["lr"] == 2e-3 and set(run["stores"]) == {"shared_a", "shared_b", "memory_a", "memory_b"}
    with pytest.raises(TrainingError, match=r"training.lr: recorded 0.002, now 0.01.*--overwrite.*--resume"):
        train_connector(*args, tmp_path / "c", tiny_config(epochs=1, lr=1e-2), resume=True, plot=False)
    res = train_connector(*args, tmp_path / "c", tiny_config(epochs=1, lr=1e-2), overwrite=True, plot=False)
    assert json.loads((tmp_path / "c" / "run.json").read_text())["training"]["lr"] == 1e-2 and res["history"]
