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
                 str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(out)]) == 2  # needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["project", str(out), str(p["eval_audio_b"]), str(tmp_path / "aud")]) == 0
    assert main(["project", str(out), str(p["eval_image_a"]), str(tmp_path / "img")]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", str(tmp_path / "aud"), str(tmp_path / "img"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["direction"] == "audio->image" and r["pool"] == 60 and "chance" in r
    assert main(["search", "-c", str(out), "-g", str(tmp_path / "img"), "--key", "pair000003", "--store",
                 str(p["eval_audio_b"]), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"] and "label" in hits[0]["metadata"]
    # a raw (unprojected) gallery is refused with a clear error
    assert main(["search", "-c", str(out), "-g", str(p["eval_image_a"]), "--key", "pair000003", "--store",
                 str(p["eval_audio_b"])]) == 2
    assert "cmcr project" in capsys.readouterr().err


def test_bench_synthetic_cli(tmp_path, capsys):
    rc = main(["bench", "synthetic", "--out", str(tmp_path / "s"), "--n-shared", "200", "--n-memory", "200",
               "--n-eval", "50", "--epochs", "1", "--variants", "full", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["variant"] == "full" and rows[0]["pool"] == 50 and abs(rows[0]["chance_R@1"] - 1 / 50) < 1e-12


def test_help_texts_have_examples(capsys):
    for cmd in (["connect"], ["project"], ["search"], ["eval", "retrieval"], ["eval", "zeroshot"],
                ["bench", "synthetic"]):
        main([*cmd, "--help"])
        assert "Example" in capsys.readouterr().out
