"""`cmcr demo` in fast mode: the whole pipeline on the bundled real media, with tiny random encoders."""

from __future__ import annotations

import json

import pytest

from cmcr.cli import main
from cmcr.stores.store import Store


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    # weights that must come from the hub, which is unreachable here (HF_HUB_OFFLINE=1, nothing cached):
    # the only case that falls back to random init — loudly, not a crash
    code = main(["demo", "--fast", "--out", str(out), "--captions", "120", "--epochs", "2", "--no-synthetic",
                 "--num-workers", "0", "--clap", "clap:cmcr-tiny-clap"])
    assert code == 0
    return out


def test_demo_writes_stores_connector_and_report(demo_run, sample_data):
    result = json.loads((demo_run / "demo.json").read_text())
    n_images = len(list((sample_data / "images").rglob("*.*")))
    n_audio = len(list((sample_data / "audio").rglob("*.ogg")))
    assert result["counts"] == {"text": 120, "image": n_images, "audio": n_audio}
    for name, rows in (("clip_text", 120), ("clap_text", 120), ("clip_image", n_images), ("clap_audio", n_audio)):
        assert Store.open(demo_run / "stores" / name, validate="full").num_rows == rows
    assert (demo_run / "connector" / "loss_curve.png").is_file()
    directions = {r["direction"]: r for r in result["retrieval"]}
    assert set(directions) == {"audio->image", "image->audio"}
    a2i = directions["audio->image"]
    assert a2i["pool"] == n_images and 0 <= a2i["R@1"] <= 1 and 0 < a2i["chance_R@1"] < 1
    # the two audio-only distractor labels have no image: counted, not scored
    assert a2i["queries_without_positive"] == 2 and a2i["queries"] == n_audio - 2
    assert [len(s["hits"]) for s in result["searches"]] == [5, 5]
    assert result["searches"][0]["query"].startswith("audio dog/")


def test_demo_marks_random_weights_everywhere(demo_run):
    result = json.loads((demo_run / "demo.json").read_text())
    assert result["random_weights"] is True
    assert any("unreachable" in n and "@random" in n for n in result["weight_notes"])
    assert "RANDOM WEIGHTS: NOT MEANINGFUL" in (demo_run / "report.md").read_text()
    assert "RANDOM WEIGHTS: NOT MEANINGFUL" in (demo_run / "report.html").read_text()


def test_demo_report_has_thumbnails_of_the_image_hits(demo_run):
    md = (demo_run / "report.md").read_text()
    thumbs = sorted((demo_run / "report_files").glob("*.jpg"))
    assert len(thumbs) == 5
    assert all(f"report_files/{t.name}" in md for t in thumbs)


def test_demo_refuses_a_folder_with_another_run_or_other_content(demo_run, tmp_path, capsys):
    manifest_before = (demo_run / "stores" / "clip_text" / "manifest.json").read_text()
    # other settings (caption count) into the same folder: refused before anything is touched
    assert main(["demo", "--fast", "--out", str(demo_run), "--captions", "60", "--no-synthetic"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (demo_run / "stores" / "clip_text" / "manifest.json").read_text() == manifest_before
    # a folder that holds something else
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["demo", "--fast", "--out", str(other), "--no-synthetic"]) == 2
    assert "holds no demo run" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
