"""CLI: connect, project, search (by key), eval retrieval, bench synthetic (cmcr/cli_connect.py)."""

from __future__ import annotations

import json

import pytest

from cmcr.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_connect_project_search_eval(tiny_synthetic, tmp_path, capsys, monkeypatch):
    from cmcr.trainer import loop

    plotted = []  # the PNG itself is checked in test_trainer; here only that connect asks for it
    monkeypatch.setattr(loop, "plot_loss_curve", lambda history, path: plotted.append((len(history), path)))
    p = tiny_synthetic
    out = tmp_path / "conn"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nhidden_dim = 32\nout_dim = 16\n[optim]\nbatch_size = 64\n[run]\ndevice = 'cpu'\n")
    rc = main(["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
               str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(out), "--config", str(cfg),
               "--epochs", "2", "--name-a", "mcr-a", "--name-b", "mcr-b", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"]["epoch"] == 2 and res["data"]["pairs"] == 240
    meta = json.loads((out / "connector.json").read_text())
    assert meta["training"]["hidden_dim"] == 32 and meta["sides"]["A"]["mcr"] == "mcr-a"
    assert plotted == [(2, out / "loss_curve.png")]
    assert main(["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
                 str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(out)]) == 1  # needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["project", str(out), str(p["eval_audio_b"]), str(tmp_path / "aud")]) == 0
    assert main(["project", str(out), str(p["eval_image_a"]), str(tmp_path / "img")]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", str(tmp_path / "aud"), str(tmp_path / "img"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["direction"] == "audio->image" and r["pool"] == 60 and "chance" in r
    assert main(["search", "-c", str(out), "-g", str(tmp_path / "img"), "--key", "pair000003", "--store",
                 str(p["eval_audio_b"]), "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    hits = res["hits"]
    assert res["random_weights"] is False  # synthetic encoders are not random-init
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"] and "label" in hits[0]["metadata"]
    # a raw (unprojected) gallery is refused with a clear error
    assert main(["search", "-c", str(out), "-g", str(p["eval_image_a"]), "--key", "pair000003", "--store",
                 str(p["eval_audio_b"])]) == 1
    assert "cmcr project" in capsys.readouterr().err


def test_connect_labels_step_loss_and_epoch_mean_loss(tiny_synthetic, tmp_path, capsys, monkeypatch):
    """The bar shows the running step loss, the summary the last epoch's mean: both say which."""
    from cmcr.trainer import loop

    monkeypatch.setattr(loop, "plot_loss_curve", lambda history, path: None)
    p = tiny_synthetic
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nhidden_dim = 32\nout_dim = 16\n[optim]\nbatch_size = 64\n[run]\ndevice = 'cpu'\n")
    assert main(["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
                 str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(tmp_path / "c"), "--config",
                 str(cfg), "--epochs", "1", "--name-a", "mcr-a", "--name-b", "mcr-b"]) == 0
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "last epoch mean loss" in out and "final loss" not in out
    assert "step loss" in err and "step loss" not in out  # the progress bar's final render, on stderr
    mean = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"last epoch mean loss {mean:.4f}" in out


def test_bench_synthetic_cli(tmp_path, capsys):
    rc = main(["bench", "synthetic", "--out", str(tmp_path / "s"), "--n-shared", "200", "--n-memory", "200",
               "--n-eval", "50", "--epochs", "1", "--variants", "full", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["variant"] == "full" and rows[0]["pool"] == 50 and abs(rows[0]["chance_R@1"] - 1 / 50) < 1e-12


COMMANDS = (["connect"], ["project"], ["search"], ["eval", "retrieval"], ["eval", "zeroshot"], ["bench", "synthetic"])


def test_help_texts_have_examples(capsys):
    for cmd in COMMANDS:
        main([*cmd, "--help"])
        assert "Example" in capsys.readouterr().out


def test_help_examples_parse_and_name_real_encoder_specs():
    """Each example parses with the command's own options, and every --encoder value is a valid
    FAMILY:ARCHITECTURE[@WEIGHTS] spec naming a known architecture."""
    import shlex

    import open_clip
    import typer.main

    from cmcr.cli import app
    from cmcr.pipeline.clap_encoder import ARCHITECTURES
    from cmcr.pipeline.encoders import parse_spec

    root = typer.main.get_command(app)
    for cmd in COMMANDS:
        command = root
        for name in cmd:
            command = command.commands[name]
        doc = command.callback.__doc__
        example = " ".join(doc.split("Example:", 1)[1].split("\n\n", 1)[0].split())
        argv = shlex.split(example)
        assert argv[: 1 + len(cmd)] == ["cmcr", *cmd], example
        ctx = command.make_context(" ".join(cmd), argv[1 + len(cmd):])  # raises on unknown options / missing args
        spec = ctx.params.get("encoder")
        if spec is not None:
            parsed = parse_spec(spec)
            known = ARCHITECTURES if parsed.family == "clap" else open_clip.list_models()
            assert parsed.architecture in known, example
            assert parsed.weights is None or parsed.is_random or parsed.checkpoint is not None, example


# --- search --text/--media and eval zeroshot through real (tiny, random-init) encoders ---------------


def _subset(src, dst, labels=8, per_label=2):
    """Symlink the first ``per_label`` files of the first ``labels`` class folders of ``src`` into
    ``dst/<label>/`` (same relative paths, so keys and labels are those of the full sample set)."""
    for folder in sorted(p for p in src.iterdir() if p.is_dir())[:labels]:
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_label]:
            (dst / folder.name / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="module")
def tiny_encoded(tiny_clip, tiny_clap, sample_data, tmp_path_factory):
    """CLIP/CLAP stores of tiny random-init encoders: captions by both, 16 sample images by CLIP,
    16 sample sounds by CLAP; a connector trained on them; images, sounds and CLIP captions projected."""
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.shards import write_shards
    from cmcr.trainer.evaluate import project_store
    from cmcr.trainer.loop import train_connector
    from tests.fixtures_connect import tiny_config

    d = tmp_path_factory.mktemp("tiny_encoded")
    caps = d / "caps.csv"
    caps.write_text("caption\n" + "".join(f"{w} number {i}\n" for i, w in enumerate(
        ["a dog barking", "a cat meowing", "church bells ringing", "birds chirping", "a car engine",
         "rain falling", "a crackling fire", "a cow mooing", "an airplane flying", "a clock ticking"] * 3)))
    text_shards = write_shards(caps, d / "sh_text").shards["text"]
    img_shards = write_shards(_subset(sample_data / "images", d / "img"), d / "sh_img").shards["image"]
    aud_shards = write_shards(_subset(sample_data / "audio", d / "aud"), d / "sh_aud").shards["audio"]
    st = {}
    for name, shards, enc, mod in (("clip_text", text_shards, tiny_clip, "text"),
                                   ("clap_text", text_shards, tiny_clap, "text"),
                                   ("clip_image", img_shards, tiny_clip, "image"),
                                   ("clap_audio", aud_shards, tiny_clap, "audio")):
        encode_shards(shards, enc, mod, d / name, batch_size=16, num_workers=0, progress=False)
        st[name] = d / name
    conn = d / "conn"
    train_connector(st["clip_text"], st["clap_text"], st["clip_image"], st["clap_audio"], conn,
                    tiny_config(epochs=1, batch_size=16, val_fraction=0.0), plot=False)
    for name in ("clip_image", "clap_audio", "clip_text"):
        project_store(conn, st[name], d / f"{name}.cmcr")
        st[f"{name}.cmcr"] = d / f"{name}.cmcr"
    return conn, st


def _search_json(capsys, *args):
    capsys.readouterr()
    assert main(["search", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_search_by_media_and_text_finds_the_item_itself(tiny_encoded, sample_data, capsys):
    from tests.fixtures_encode import TINY_CLAP, TINY_CLIP

    conn, st = tiny_encoded
    from cmcr.stores.store import Store

    img = Store.open(st["clip_image"])
    key, source = img.keys()[5], img.metadata(["source"]).column("source")[5].as_py()
    # an image file through the CLIP encoder -> side A -> the projected images: itself first, cos ~1
    res = _search_json(capsys, "-c", conn, "-g", st["clip_image.cmcr"], "--media", sample_data / "images" / source,
                       "--encoder", TINY_CLIP, "-k", "3")
    assert res["query"]["modality"] == "image" and res["hits"][0]["key"] == key
    assert res["hits"][0]["score"] > 0.99 and res["hits"][0]["score"] >= res["hits"][1]["score"]
    # a sound file through CLAP (side B) into the projected sounds: itself first
    aud = Store.open(st["clap_audio"])
    akey, asrc = aud.keys()[3], aud.metadata(["source"]).column("source")[3].as_py()
    res = _search_json(capsys, "-c", conn, "-g", st["clap_audio.cmcr"], "--media", sample_data / "audio" / asrc,
                       "--encoder", TINY_CLAP, "-k", "2")
    assert res["hits"][0]["key"] == akey and res["hits"][0]["score"] > 0.99
    # a caption's text through CLIP's text tower into the projected CLIP captions: that caption first
    txt = Store.open(st["clip_text"])
    tkey, text = txt.keys()[7], txt.metadata(["text"]).column("text")[7].as_py()
    res = _search_json(capsys, "-c", conn, "-g", st["clip_text.cmcr"], "--text", text, "--encoder", TINY_CLIP)
    assert res["query"] == {"text": text} and res["hits"][0]["key"] == tkey and res["hits"][0]["score"] > 0.99
    # the same key as a --key query gives the same ranking as the encoded query
    by_key = _search_json(capsys, "-c", conn, "-g", st["clip_text.cmcr"], "--key", tkey, "--store", st["clip_text"])
    assert [h["key"] for h in by_key["hits"][:3]] == [h["key"] for h in res["hits"][:3]]


def test_search_refuses_media_the_encoder_does_not_embed(tiny_encoded, sample_data, capsys):
    from tests.fixtures_encode import TINY_CLAP, TINY_CLIP

    conn, st = tiny_encoded
    wav = next((sample_data / "audio").rglob("*.ogg"))
    capsys.readouterr()
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--media", str(wav),
                 "--encoder", TINY_CLIP]) == 2  # CLIP has no audio tower: a usage mistake
    err = capsys.readouterr().err
    assert "audio" in err and "cmcr-tiny-clip" in err
    png = next((sample_data / "images").rglob("*.png"))
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--media", str(png),
                 "--encoder", TINY_CLAP]) == 2  # CLAP has no image tower
    assert "image" in capsys.readouterr().err
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--text", "a dog"]) == 1
    assert "--encoder" in capsys.readouterr().err


def test_eval_zeroshot_encodes_prompts_on_the_right_side(tiny_encoded, capsys):
    import numpy as np

    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.store import Store
    from cmcr.trainer.connector import Connector
    from tests.fixtures_encode import TINY_CLAP

    conn, st = tiny_encoded
    aud = Store.open(st["clap_audio.cmcr"])
    labels = aud.metadata(["label"]).column("label").to_pylist()
    names = sorted(set(labels))
    capsys.readouterr()
    assert main(["eval", "zeroshot", "-c", str(conn), "-s", str(st["clap_audio.cmcr"]), "--classes", ",".join(names),
                 "--encoder", TINY_CLAP, "--prompt", "the sound of a {}", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["side"] == "B" and r["items"] == aud.num_rows and r["classes"] == len(names)
    assert r["chance"]["top1"] == pytest.approx(1 / len(names)) and r["top5"] >= r["top1"]
    # the same numbers by hand: prompts -> CLAP text -> side B -> nearest class
    enc = load_encoder(TINY_CLAP, device="cpu")
    c = Connector.load(conn)
    zc = c.project("B", enc.encode("text", [f"the sound of a {n}" for n in names]), identity=enc.identity(),
                   modality="text")
    pred = np.argmax(aud.embeddings(np.float32) @ zc.T, axis=1)
    assert r["top1"] == pytest.approx(np.mean([names[p] == t for p, t in zip(pred, labels, strict=True)]), abs=1e-6)


def test_bench_synthetic_rerun_other_settings_and_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    base = ["bench", "synthetic", "--out", str(out), "--n-shared", "60", "--n-memory", "60", "--n-eval", "10",
            "--dim", "16", "--epochs", "1", "--variants", "full", "--json"]
    assert main(base) == 0
    assert main(base) == 0  # same settings: reuses the stores
    capsys.readouterr()
    assert main([*base, "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "seed" in err and "Traceback" not in err
    assert main([*base, "--seed", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*base, "--variants", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main([*base, "--n-shared", "0"]) == 2
    assert "--n-shared" in capsys.readouterr().err


def test_search_media_that_is_missing_a_folder_or_unreadable(tmp_path, capsys, monkeypatch):
    from cmcr import cli_connect

    common = ["search", "-c", str(tmp_path / "conn"), "-g", str(tmp_path / "g"), "--encoder", "clap:HTSAT-tiny"]
    assert main([*common, "--media", str(tmp_path / "nope.wav")]) == 1
    err = capsys.readouterr().err
    assert f"--media {tmp_path / 'nope.wav'}: file not found" in " ".join(err.split()) and "Traceback" not in err
    assert main([*common, "--media", str(tmp_path)]) == 1
    assert "is a folder" in " ".join(capsys.readouterr().err.split())
    wav = tmp_path / "locked.wav"
    wav.write_bytes(b"RIFF")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_connect, "open", refuse, raising=False)  # running as root: chmod 000 does not stop reads
    assert main([*common, "--media", str(wav)]) == 1
    assert "cannot be read (Permission denied)" in " ".join(capsys.readouterr().err.split())


def test_search_table_shows_full_label_and_source_and_a_human_title(tiny_encoded, sample_data, capsys, monkeypatch):
    from rich.console import Console

    from cmcr import cli_connect
    from cmcr.stores.store import Store
    from tests.fixtures_encode import TINY_CLIP

    conn, st = tiny_encoded
    img = Store.open(st["clip_image"])
    source = img.metadata(["source"]).column("source")[5].as_py()
    media = sample_data / "images" / source
    monkeypatch.setattr(cli_connect, "console", Console(width=250, force_terminal=False))
    capsys.readouterr()
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--media", str(media), "--encoder",
                 TINY_CLIP, "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"top 3 in {st['clip_image.cmcr']} for image file {media}" in out and "{'" not in out
    header = next(line for line in out.splitlines() if "rank" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == ["rank", "key", "score", "label", "source"]
    assert source in out and img.metadata(["label"]).column("label")[5].as_py() in out
    assert "height" not in out and "see --json" in out  # the other columns only with --json
    # tiny random-init encoders: the note, in the table output and as a flag in --json
    assert "random weights: not meaningful" in out and "cmcr-tiny-clip" in out
    res = _search_json(capsys, "-c", conn, "-g", st["clip_image.cmcr"], "--media", media, "--encoder", TINY_CLIP)
    assert res["random_weights"] is True and "height" in res["hits"][0]["metadata"]
    # a narrow terminal folds long values instead of cutting them
    monkeypatch.setattr(cli_connect, "console", Console(width=60, force_terminal=False))
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--media", str(media), "--encoder",
                 TINY_CLIP, "-k", "3"]) == 0
    assert "…" not in capsys.readouterr().out


def test_eval_reports_dropped_queries_and_random_weights(tiny_encoded, tiny_synthetic, tiny_trained, tmp_path,
                                                         capsys, monkeypatch):
    from rich.console import Console

    from cmcr import cli_connect
    from tests.fixtures_encode import TINY_CLAP

    monkeypatch.setattr(cli_connect, "console", Console(width=250, force_terminal=False))
    conn, st = tiny_encoded
    # images -> sounds by label (tiny random-init encoders): the note, and the flag in --json
    capsys.readouterr()
    assert main(["eval", "retrieval", str(st["clip_image.cmcr"]), str(st["clap_audio.cmcr"]), "--by", "label",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["random_weights"] is True
    assert main(["eval", "retrieval", str(st["clip_image.cmcr"]), str(st["clap_audio.cmcr"]), "--by", "label"]) == 0
    out = capsys.readouterr().out
    assert "positives: same `label`" in out and "random weights: not meaningful" in out
    assert f"{r['queries']} queries" in out and "without a positive" not in out  # every label has a sound
    assert main(["eval", "retrieval", str(st["clip_image.cmcr"]), str(st["clap_audio.cmcr"]), "--by", "bogus"]) == 2
    assert "--by" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "-c", str(conn), "-s", str(st["clap_audio.cmcr"]), "--classes", "dog,cat",
                 "--encoder", TINY_CLAP]) == 0
    assert "random weights: not meaningful" in capsys.readouterr().out
    assert main(["eval", "zeroshot", "-c", str(conn), "-s", str(st["clap_audio.cmcr"]), "--classes", "dog,cat",
                 "--encoder", TINY_CLAP, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["random_weights"] is True
    # synthetic encoders are not random-init: no note, flag False; queries whose key the gallery lacks are dropped
    from cmcr.stores.store import Store
    from tests.fixtures_connect import write_store

    p = tiny_synthetic
    assert main(["project", str(tiny_trained), str(p["eval_audio_b"]), str(tmp_path / "aud")]) == 0
    assert main(["project", str(tiny_trained), str(p["eval_image_a"]), str(tmp_path / "img")]) == 0
    img = Store.open(tmp_path / "img")
    write_store(tmp_path / "img50", img.embeddings()[:50], modality="image", encoder=img.encoder, keys=img.keys()[:50])
    capsys.readouterr()
    assert main(["eval", "retrieval", str(tmp_path / "aud"), str(tmp_path / "img50"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["random_weights"] is False and r["queries"] == 50 and r["queries_without_positive"] == 10
    assert main(["eval", "retrieval", str(tmp_path / "aud"), str(tmp_path / "img50")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "random weights" not in out and "positives: same key" in out
    assert "60 queries (50 scored; 10 without a positive in the gallery, not scored)" in out


def test_eval_zeroshot_classes_file_missing_or_a_folder(tmp_path, capsys):
    from cmcr.cli_connect import _class_names

    common = ["eval", "zeroshot", "-c", str(tmp_path / "conn"), "-s", str(tmp_path / "s"), "--encoder",
              "open_clip:ViT-B-32"]
    assert main([*common, "--classes", "classes.txt"]) == 1  # not silently one class named "classes.txt"
    assert "--classes classes.txt: file not found" in " ".join(capsys.readouterr().err.split())
    assert main([*common, "--classes", str(tmp_path)]) == 1
    assert "is a folder" in " ".join(capsys.readouterr().err.split())
    f = tmp_path / "c.txt"
    f.write_text("dog\n\ncat\n")
    assert _class_names(str(f)) == ["dog", "cat"] and _class_names("dog, cat") == ["dog", "cat"]


def test_search_k_must_be_positive(capsys):
    assert main(["search", "-c", "x", "-g", "y", "--text", "a dog", "-k", "0"]) == 2
    assert "-k" in capsys.readouterr().err


def test_search_media_modality_comes_from_the_one_extension_list(tiny_encoded, sample_data, capsys, tmp_path):
    """Issue 13, defect 10b: ``--media x.tiff`` (an image extension shard and encode accept) was
    "cannot tell the modality"; every media extension of cmcr.pipeline.media is recognised."""
    from pathlib import Path

    from PIL import Image

    from cmcr.cli_connect import _guess_modality
    from cmcr.pipeline.media import MEDIA_EXTENSIONS
    from cmcr.stores.store import Store
    from tests.fixtures_encode import TINY_CLIP

    for mod in ("image", "audio", "3d"):
        for ext in MEDIA_EXTENSIONS[mod]:
            assert _guess_modality(Path(f"x.{ext.upper()}")) == mod
    conn, st = tiny_encoded
    img = Store.open(st["clip_image"])
    key, source = img.keys()[2], img.metadata(["source"]).column("source")[2].as_py()
    tiff = tmp_path / "query.tiff"
    Image.open(sample_data / "images" / source).save(tiff, format="TIFF")
    res = _search_json(capsys, "-c", conn, "-g", st["clip_image.cmcr"], "--media", tiff, "--encoder", TINY_CLIP)
    assert res["query"]["modality"] == "image" and res["hits"][0]["key"] == key
    doc = tmp_path / "notes.md"
    doc.write_text("x")
    assert main(["search", "-c", str(conn), "-g", str(st["clip_image.cmcr"]), "--media", str(doc),
                 "--encoder", TINY_CLIP]) == 1
    assert "cannot tell the modality" in capsys.readouterr().err


def test_cli_on_bundled_media_random_weights(tiny_encoded, capsys, monkeypatch):
    from rich.console import Console

    from cmcr import cli_connect

    monkeypatch.setattr(cli_connect, "console", Console(width=200, force_terminal=False))
    conn, st = tiny_encoded
    capsys.readouterr()
    args = ["eval", "counterfactual", str(st["clap_audio.cmcr"]), str(st["clip_image.cmcr"]), "--protocol", "label"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["random_weights"] is True and r["protocol"]["protocol"] == "label"
    assert 0 < r["matched"] < r["pairs"] and 0 <= r["AP"] <= 1 and r["per_class"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "random weights: not meaningful" in out and "AP" in out and "max-F1" in out and "per class" in out
    # raw stores through the connector give the same numbers as the projected ones
    assert main(["eval", "counterfactual", str(st["clap_audio"]), str(st["clip_image"]), "-c", str(conn),
                 "--protocol", "label", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["AP"] == pytest.approx(r["AP"], abs=1e-5)
    # usage errors exit 2 with one message; the bundled stores share no key (shuffled needs true pairs)
    assert main([*args, "--different-class"]) == 2
    assert "--protocol shuffled" in capsys.readouterr().err
    assert main(["eval", "counterfactual", str(st["clap_audio.cmcr"]), str(st["clip_image.cmcr"])]) == 1
    assert "--protocol label" in capsys.readouterr().err


def test_connect_centric_sources_from_cli_and_toml(tiny_synthetic, tmp_path, capsys):
    """--centric picks the sources by modality name; weights come from the TOML; a bad name is one message."""
    p = tiny_synthetic
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nhidden_dim = 32\nout_dim = 16\n[optim]\nbatch_size = 64\n[run]\ndevice = 'cpu'\n"
                   "[centric]\ncentric_weights = { audio = 0.5 }\n")
    base = ["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
            str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--config", str(cfg), "--epochs", "1", "--json"]
    assert main([*base, "--out", str(tmp_path / "c"), "--centric", "text,audio"]) == 0
    capsys.readouterr()
    training = json.loads((tmp_path / "c" / "connector.json").read_text())["training"]
    assert training["centric"] == "text,audio" and training["centric_weights"] == {"text": 1.0, "audio": 0.5}
    assert main([*base, "--out", str(tmp_path / "d"), "--centric", "text,3d"]) == 2
    err = capsys.readouterr().err
    assert "'3d' is not a source" in err and "audio (memory B)" in err and "Traceback" not in err
