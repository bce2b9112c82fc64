"""The 3D C-MCR system end to end with tiny random encoders: CLIP + ULIP connected through images.

shared = the same images encoded by CLIP (A) and ULIP (B), memories = CLIP captions (A) and ULIP
point clouds (B); ``cmcr connect --config 3d`` (the released 3D head); ``cmcr search`` 3D -> images,
3D -> text, text -> 3D; ``cmcr eval zeroshot --templates modelnet40_64``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcr.cli import main
from tests.fixtures_encode import TINY_CLIP

TINY_ULIP = "ulip:cmcr-tiny-ulip@random"
SHAPES = ("chair", "table", "lamp", "airplane")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_cloud(shape: str, seed: int, n: int = 600) -> np.ndarray:
    """A rough point cloud per shape name (just distinct geometry; labels for zero-shot)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 1, (n, 3))
    scale = {"chair": (0.5, 0.5, 1.0), "table": (1.0, 0.6, 0.3), "lamp": (0.2, 0.2, 1.5),
             "airplane": (2.0, 0.3, 0.3)}[shape]
    return (u * np.array(scale) + rng.normal(0, 0.01, (n, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_3d(tiny_clip, sample_data, tmp_path_factory):
    """Stores of CLIP (images, captions) and ULIP (the same images, point clouds), and .npy cloud files."""
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.shards import write_shards
    from cmcr.stores.store import Store
    from tests.test_cli_connect import _subset

    ulip = load_encoder(TINY_ULIP, device="cpu")
    d = tmp_path_factory.mktemp("tiny_3d")
    caps = d / "caps.csv"
    caps.write_text("caption\n" + "".join(f"a photo of a {w} number {i}\n" for i, w in enumerate(SHAPES * 5)))
    text_shards = write_shards(caps, d / "sh_text").shards["text"]
    img_shards = write_shards(_subset(sample_data / "images", d / "img", labels=6, per_label=2),
                              d / "sh_img").shards["image"]
    st = {}
    for name, shards, enc, mod in (("clip_image", img_shards, tiny_clip, "image"),
                                   ("ulip_image", img_shards, ulip, "image"),
                                   ("clip_text", text_shards, tiny_clip, "text")):
        encode_shards(shards, enc, mod, d / name, batch_size=16, num_workers=0, progress=False)
        st[name] = d / name
    # ULIP 3D memory: synthetic clouds (arrays) -> the ULIP 3D tower -> a store with labels
    (d / "clouds").mkdir()
    keys, labels, clouds = [], [], []
    for i in range(16):
        shape = SHAPES[i % len(SHAPES)]
        keys.append(f"{shape}/{i:03d}")
        labels.append(shape)
        clouds.append(synthetic_cloud(shape, i))
        np.save(d / "clouds" / f"{i:03d}.npy", clouds[-1])
    emb = ulip.encode("3d", clouds)
    s = Store.create(d / "ulip_3d", modality="3d", encoder=ulip.identity(), dim=ulip.dim, dtype="float32",
                     preprocessing=ulip.preprocessing("3d"))
    s.append_part(keys, emb, metadata={"label": labels}, source="synthetic")
    st["ulip_3d"] = d / "ulip_3d"
    return d, st


def _json(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_3d_connect_search_and_zeroshot(tiny_3d, capsys):
    from cmcr.stores.store import Store
    from cmcr.trainer.connector import Connector

    d, st = tiny_3d
    conn = d / "conn"
    r = _json(capsys, ["connect", "--shared-a", str(st["clip_image"]), "--shared-b", str(st["ulip_image"]),
                       "--memory-a", str(st["clip_text"]), "--memory-b", str(st["ulip_3d"]), "--out", str(conn),
                       "--config", "3d", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--json"])
    n_img = Store.open(st["clip_image"]).num_rows
    assert n_img >= 8 and r["data"]["pairs"] == n_img == Store.open(st["ulip_image"]).num_rows
    c = Connector.load(conn)
    assert c.sides["A"].mcr == "clip" and c.sides["B"].mcr == "ulip"
    assert set(c.sides["B"].modalities) == {"image", "3d"} and set(c.sides["A"].modalities) == {"image", "text"}
    # the released 3D head: one Linear-BN-ReLU block per side
    for side in "AB":
        kinds = [type(m).__name__ for m in c.projectors[side].modules()]
        assert kinds.count("Linear") == 1 and "BatchNorm1d" in kinds and "ReLU" in kinds, kinds
    for name in ("ulip_3d", "clip_image", "clip_text"):
        assert main(["project", str(conn), str(st[name]), str(d / f"{name}.cmcr")]) == 0
    cloud = d / "clouds" / "005.npy"
    # 3D -> 3D: the cloud itself comes first; 3D -> images and 3D -> text return ranked hits
    r = _json(capsys, ["search", "-c", str(conn), "-g", str(d / "ulip_3d.cmcr"), "--media", str(cloud),
                       "--modality", "3d", "--encoder", TINY_ULIP, "-k", "3", "--json"])
    assert r["query"]["modality"] == "3d" and r["hits"][0]["key"] == "table/005" and r["hits"][0]["score"] > 0.99
    assert r["random_weights"] is True
    for gallery in ("clip_image.cmcr", "clip_text.cmcr"):
        r = _json(capsys, ["search", "-c", str(conn), "-g", str(d / gallery), "--media", str(cloud),
                           "--modality", "3d", "--encoder", TINY_ULIP, "-k", "5", "--json"])
        scores = [h["score"] for h in r["hits"]]
        assert len(r["hits"]) == 5 and scores == sorted(scores, reverse=True)
        assert {h["key"] for h in r["hits"]} <= set(Store.open(st[gallery.removesuffix(".cmcr")]).keys())
    # text -> 3D through CLIP's text tower (side A)
    r = _json(capsys, ["search", "-c", str(conn), "-g", str(d / "ulip_3d.cmcr"), "--text", "a chair",
                       "--encoder", TINY_CLIP, "-k", "4", "--json"])
    assert len(r["hits"]) == 4 and all(h["metadata"]["label"] in SHAPES for h in r["hits"])
    # a 3D query through the CLIP encoder is refused (CLIP has no 3D tower)
    capsys.readouterr()
    assert main(["search", "-c", str(conn), "-g", str(d / "ulip_3d.cmcr"), "--media", str(cloud),
                 "--modality", "3d", "--encoder", TINY_CLIP]) == 2
    assert "3d" in capsys.readouterr().err
    # zero-shot 3D classification with ULIP's 64 ModelNet40 templates averaged per class
    r = _json(capsys, ["eval", "zeroshot", "-c", str(conn), "-s", str(d / "ulip_3d.cmcr"), "--classes",
                       ",".join(SHAPES), "--encoder", TINY_CLIP, "--templates", "modelnet40_64", "--json"])
    assert r["side"] == "A" and r["items"] == 16 and r["classes"] == 4 and "64 templates" in r["prompt"]
    # the same number by hand: 64 prompts per class -> CLIP text -> side A -> mean of unit rows -> nearest
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.trainer.evaluate import bundled_template_sets

    enc = load_encoder(TINY_CLIP, device="cpu")
    tmpl = bundled_template_sets()["modelnet40_64"]
    z = c.project("A", enc.encode("text", [t.format(n) for n in SHAPES for t in tmpl]), identity=enc.identity(),
                  modality="text").reshape(4, 64, -1)
    z = z / np.linalg.norm(z, axis=2, keepdims=True)
    zc = z.mean(1)
    zc /= np.linalg.norm(zc, axis=1, keepdims=True)
    g = Store.open(d / "ulip_3d.cmcr")
    pred = np.argmax(g.embeddings(np.float32) @ zc.T, axis=1)
    labels = g.metadata(["label"]).column("label").to_pylist()
    assert r["top1"] == pytest.approx(np.mean([SHAPES[p] == t for p, t in zip(pred, labels, strict=True)]), abs=1e-6)
    # --prompt and --templates together are refused; unknown template sets name the bundled ones
    capsys.readouterr()
    base = ["eval", "zeroshot", "-c", str(conn), "-s", str(d / "ulip_3d.cmcr"), "--classes", "chair,lamp",
            "--encoder", TINY_CLIP]
    assert main([*base, "--templates", "modelnet40_64", "--prompt", "a {}"]) == 1
    assert main([*base, "--templates", "nope"]) == 2
    assert "modelnet40_64" in capsys.readouterr().err


def test_templates_and_class_lists(tmp_path):
    from cmcr.cli_connect import _class_names
    from cmcr.errors import ConfigError
    from cmcr.trainer.evaluate import average_prompt_embeddings, bundled_class_lists, load_templates

    t = load_templates("modelnet40_64")
    assert len(t) == 64 and t[0] == "a point cloud model of {}."
    assert len(bundled_class_lists()["modelnet40"]) == 40
    assert _class_names("modelnet40")[:3] == ["airplane", "bathtub", "bed"]
    (tmp_path / "t.json").write_text('["a {}.", "a 3D model of a {}."]')
    (tmp_path / "t.txt").write_text("a {}.\n\nthe {} in the scene.\n")
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    assert load_templates(str(tmp_path / "t.json")) == ["a {}.", "a 3D model of a {}."]
    assert load_templates(str(tmp_path / "t.txt")) == ["a {}.", "the {} in the scene."]
    with pytest.raises(ConfigError, match="exactly one"):
        load_templates(str(tmp_path / "bad.txt"))
    e = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    np.testing.assert_allclose(average_prompt_embeddings(e, 2), [[2 ** -0.5, 2 ** -0.5], [1, 0]], atol=1e-6)


def test_config_preset_3d():
    from cmcr.errors import ConfigError
    from cmcr.trainer.config import load_config, preset_names

    c = load_config("3d", epochs=3)
    assert (c.depth, c.batchnorm, c.final_activation, c.activation, c.out_dim) == (1, True, True, "relu", 512)
    assert (c.name_a, c.name_b, c.epochs) == ("clip", "ulip", 3)
    assert "3d" in preset_names() and "default" in preset_names()
    with pytest.raises(ConfigError, match="presets"):
        load_config("no-such-preset")
