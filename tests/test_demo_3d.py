"""`cmcr demo --3d`: CLIP + ULIP-2 through images on the bundled point clouds, meshes, images and captions
(tiny random encoders)."""

from __future__ import annotations

import json

import numpy as np

from cmcr.cli import main


def test_demo_3d_runs_the_second_system_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--3d", "--fast", "--out", str(out), "--num-workers", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "3d" / "demo3d.json").read_text())
    assert printed["counts"] == result["counts"] == {"image": 56, "3d": 4, "text": 200}
    # the Spot cow mesh and the three release clouds, labels from their folders
    assert result["zeroshot"]["classes"] == ["bbq", "cow", "toilet", "train"]
    assert result["zeroshot"]["items"] == 4 and result["zeroshot"]["chance_top1"] == 0.25
    assert "modelnet40_64 (64)" in result["zeroshot"]["templates"]
    assert [len(s["hits"]) for s in result["searches"]] == [5, 5]
    assert result["searches"][0]["query"].startswith("3D cow/") and "→ images" in result["searches"][0]["query"]
    assert all(h["text"] for h in result["searches"][1]["hits"])  # 3D -> captions returns captions
    titles = [m["title"] for m in result["release_matrices"]]
    assert titles == ["3D x Vision", "3D x Text"]
    for m in result["release_matrices"]:
        assert m["available"] and m["random"]
        assert np.allclose(np.asarray(m["cmcr"]).sum(axis=1), 1.0, atol=1e-4)
    assert result["random_weights"] is True
    assert (out / "3d" / "projected" / "ulip_3d" / "manifest.json").is_file()
