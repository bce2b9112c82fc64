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


def test_demo_report_shows_queries_players_per_class_and_the_loss_chance_line(demo_run):
    """The report (jinja2 templates, the serve page's look): the query audio playable, audio hits with players,
    image hits with thumbnails, hits marked same-label or not, per-class recall with chance, the loss curve
    with its ln(B) chance line, and the random-weights note once at the top."""
    import math
    import re

    html = (demo_run / "report.html").read_text()
    result = json.loads((demo_run / "demo.json").read_text())
    assert html.count("RANDOM WEIGHTS: NOT MEANINGFUL") == 1
    assert html.index("RANDOM WEIGHTS") < html.index("Retrieval in the connected space")
    players = re.findall(r'<audio controls[^>]*src="(report_files/[^"]+)"', html)
    assert len(players) == 1 + 5  # the query clip + the five audio hits of the caption search
    assert all((demo_run / p).is_file() and (demo_run / p).stat().st_size > 0 for p in players)
    assert html.count("same label") + html.count("other label") == 5  # the audio query's image hits are marked
    labels = {r["label"] for r in result["per_class"]}
    assert "dog" in labels and all(0 <= r["R@1"] <= 1 and 0 < r["chance_R@1"] < 1 for r in result["per_class"])
    assert "Per-class audio → image recall" in html and ">chance R@5</th>" in html  # readable column names
    assert ">audio → image</td>" in html  # the direction, one unbreakable cell
    svg = (demo_run / "report_files" / "loss.svg").read_text()
    assert svg.startswith("<svg") and "<polyline" in svg and svg in html
    assert f"ln B = {math.log(118):.2f}" in svg  # 120 captions - 2 held out, batch 256 -> B = 118
    md = (demo_run / "report.md").read_text()
    assert "report_files/loss.svg" in md and "| same label |" in md


def test_demo_report_shows_localisation_pictures_of_same_label_pairs(demo_run):
    import numpy as np
    from PIL import Image

    result = json.loads((demo_run / "demo.json").read_text())
    pics = result["localization"]
    assert [p["label"] for p in pics] == ["dog", "cat", "cow", "horse"]
    md, page = (demo_run / "report.md").read_text(), (demo_run / "report.html").read_text()
    for p in pics:
        assert p["audio"].startswith(f"audio/{p['label']}/") and p["image"].startswith(f"images/{p['label']}/")
        assert p["grid"] == [56, 56]  # tiny CLIP: 8 px patches at the 448 px dense input
        assert (demo_run / p["png"]).read_bytes()[:4] == b"\x89PNG"
        with Image.open(demo_run / p["png"]) as im:
            assert im.width > 100
        assert np.load(demo_run / p["npy"]).ndim == 2
        assert f"]({p['png']})" in md and f'src="{p["png"]}"' in page
    assert "Where is the sound?" in md and "Random weights: not meaningful" in page
