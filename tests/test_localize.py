"""Source localisation: MaskCLIP dense patches, scoring/upsampling, `cmcr localize`, `cmcr eval localization`.

Encoders are the tiny random-init CLIP/CLAP of pipeline/model_configs (no download). Where a number must mean
something, the connector is built by hand so the right answer is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmcr.errors import ConfigError, ConnectorError, EncoderError, InputDataError
from tests.fixtures_localize_helpers import TINY_CLAP, TINY_CLIP, linear_connector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = Path(__file__).resolve().parents[1] / "cmcr" / "data" / "sample"
DOG_AUDIO = SAMPLE / "audio" / "dog" / "sounds_dog_bark.ogg"


@pytest.fixture(scope="module")
def encoders():
    from cmcr.pipeline.encoders import load_encoder

    return load_encoder(TINY_CLIP, device="cpu"), load_encoder(TINY_CLAP, device="cpu")


def _image_batch(clip, path: Path, size: int | None = None) -> torch.Tensor:
    x, _ = clip.dense_preprocessor(size)(path.read_bytes())
    return x[None]


# ------------------------------------------------------------------------------------ dense patches
def test_dense_patches_shapes_unit_rows_and_sizes(encoders):
    clip, _ = encoders
    img = SAMPLE / "images" / "dog" / "coco_000000377575.jpg"
    d = clip.dense_embed(_image_batch(clip, img))
    assert d.shape == (1, 4, 4, clip.dim) and d.dtype == np.float32  # 32 px input, 8 px patches
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-5)
    assert clip.dense_embed(_image_batch(clip, img, 64)).shape == (1, 8, 8, clip.dim)  # pos. embedding resized
    with pytest.raises(EncoderError, match="multiple of the patch size"):
        clip.dense_preprocessor(36)


def _layer_norm(x, ln):
    return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


@pytest.mark.parametrize("path", ["value", "value+residual"])
def test_maskclip_path_equals_a_hand_computation_from_the_block_weights(encoders, path):
    from cmcr.pipeline.openclip_encoder import maskclip_patch_embeddings

    clip, _ = encoders
    visual = clip.model.visual
    x = _image_batch(clip, SAMPLE / "images" / "cat" / "skimage_chelsea.png")
    seen = {}
    last = visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda _m, args: seen.setdefault("tokens", args[0].detach().clone()))
    with torch.no_grad():
        pooled = visual(x)  # open_clip's own forward: the tokens entering the last block
        got = maskclip_patch_embeddings(visual, x, path=path)
    hook.remove()
    tokens = seen["tokens"]  # (1, 1 + 16, width), batch first
    d = tokens.shape[-1]
    w_v, b_v = last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:]
    w_o, b_o = last.attn.out_proj.weight, last.attn.out_proj.bias
    with torch.no_grad():
        v = _layer_norm(tokens, last.ln_1) @ w_v.T + b_v
        v = v @ w_o.T + b_o
        if path == "value+residual":
            v = tokens + v
            h = _layer_norm(v, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
            v = v + last.mlp.gelu(h) @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
        want = (_layer_norm(v, visual.ln_post) @ visual.proj)[:, 1:].reshape(1, 4, 4, -1)
        # the class token through the ordinary path is the model's pooled embedding (same ln_post + proj)
        cls = _layer_norm(last(tokens), visual.ln_post)[:, 0] @ visual.proj
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, pooled, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0, 0, 0], got[0, 3, 3])  # patches differ: no pooling happened


def test_non_vit_and_attention_pooled_towers_are_refused():
    from open_clip.transformer import VisionTransformer

    from cmcr.pipeline.openclip_encoder import maskclip_patch_embeddings

    with pytest.raises(EncoderError, match="ViT image tower"):
        maskclip_patch_embeddings(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 32, 32))
    coca = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                             attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4, output_dim=16)
    with pytest.raises(EncoderError, match="attentional pooler"):
        maskclip_patch_embeddings(coca, torch.zeros(1, 3, 32, 32))
    with pytest.raises(EncoderError, match="unknown dense path"):
        maskclip_patch_embeddings(coca, torch.zeros(1, 3, 32, 32), path="qk")


# ---------------------------------------------------------------------------- scoring and geometry
def test_scores_and_upsampling_put_the_peak_in_the_planted_region():
    from cmcr.trainer.localization import patch_scores, upsample_heatmap

    rng = np.random.default_rng(0)
    D, h, w = 32, 6, 8
    q = rng.normal(size=D)
    patches = rng.normal(size=(h, w, D))
    patches[1:3, 5:7] = q + 0.3 * rng.normal(size=(2, 2, D))  # the "object": rows 1-2, columns 5-6
    grid = patch_scores(patches, q)
    assert grid.shape == (h, w)
    assert grid[1:3, 5:7].min() > 0.8 and np.delete(grid.ravel(), [13, 14, 21, 22]).max() < 0.6
    H, W = 60, 160  # 10 x 20 px per patch
    heat = upsample_heatmap(grid, H, W)
    assert heat.shape == (H, W) and heat.dtype == np.float32
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 10 <= y < 30 and 100 <= x < 140  # inside the object's pixels (not transposed / flipped)
    np.testing.assert_allclose(upsample_heatmap(np.full((3, 4), 0.25), 7, 9), 0.25, atol=1e-6)
    with pytest.raises(InputDataError, match="same space"):
        patch_scores(patches, q[:5])
    with pytest.raises(InputDataError, match="zero"):
        patch_scores(patches, np.zeros(D))


def _pasted(obj, box: tuple[int, int, int, int], size=(128, 96)):  # noqa: ANN202 - a PIL image
    from PIL import Image

    im = Image.new("RGB", size, (128, 128, 128))
    x0, y0, x1, y1 = box
    im.paste(obj.resize((x1 - x0, y1 - y0)), (x0, y0))
    return im


def test_synthetic_pasted_object_is_localised_where_it_is(tmp_path, encoders):
    """A synthetic MCR pair where the answer is known: the "sound" of an object projects (side B, built by hand)
    onto the direction of that object pasted into a *reference* image (its mean projected patch minus the plain
    background's); the same object pasted elsewhere must light up where it was pasted: the peak inside the box and
    cIoU >= 0.5 on every image (measured: 0.76-0.84), against ~0.01 for the centre prior."""
    from PIL import Image

    from cmcr.localize import Localizer
    from cmcr.trainer.connector import Connector
    from cmcr.trainer.localization import evaluate_heatmaps
    from cmcr.trainer.tasks import BoxAnnotation

    clip, clap = encoders
    obj = Image.open(SAMPLE / "images" / "dog" / "coco_000000427034.jpg").convert("RGB").crop((150, 100, 450, 400))
    # size 64 -> an 8x8 grid, 16 x 12 px per patch on a 128 x 96 image; boxes lie on patch edges
    ref_box = (16, 60, 48, 84)
    _pasted(obj, ref_box).save(tmp_path / "ref.png")
    dim = clip.dim
    eye = torch.eye(dim)
    # side A: identity (unit rows stay unit rows); compute the reference object's mean patch in the connected space
    linear_connector(tmp_path / "c0", clip.identity(), clap.identity(), weight_a=eye, weight_b=eye)
    loc0 = Localizer(Connector.load(tmp_path / "c0"), clip, clap, size=64)
    from cmcr.pipeline.encoders import collate_items
    from cmcr.trainer.localization import project_patches

    x, _ = loc0.pre((tmp_path / "ref.png").read_bytes())
    z = project_patches(loc0.connector, "A", clip.dense_embed(collate_items([x])), identity=clip.identity())[0]
    inside = np.zeros((8, 8), bool)
    inside[5:7, 1:3] = True  # rows 5-6 (y 60..84), columns 1-2 (x 16..48)
    # the object's direction in the connected space: its mean patch against the plain background's
    target = z[inside].mean(0) - z[~inside].mean(0)
    target /= np.linalg.norm(target)
    a = clap.encode("audio", [str(DOG_AUDIO)])[0]
    weight_b = torch.from_numpy(np.outer(target, a) / float(a @ a)).float()  # rank 1: raw audio -> target
    linear_connector(tmp_path / "c1", clip.identity(), clap.identity(), weight_a=eye, weight_b=weight_b)
    loc = Localizer(Connector.load(tmp_path / "c1"), clip, clap, size=64)
    q = loc.embed_query(DOG_AUDIO)
    np.testing.assert_allclose(q, target, atol=1e-5)
    boxes = {"top_right": (80, 12, 112, 36), "bottom_left": (0, 72, 32, 96), "top_left": (16, 0, 48, 24)}
    heatmaps, anns = {}, {}
    for key, box in boxes.items():
        _pasted(obj, box).save(tmp_path / f"{key}.png")
        m = loc.localize(tmp_path / f"{key}.png", q)
        assert m.heatmap.shape == (96, 128)
        y, xx = np.unravel_index(np.argmax(m.heatmap), m.heatmap.shape)
        assert box[0] <= xx < box[2] and box[1] <= y < box[3], (key, xx, y)
        heatmaps[key] = m.heatmap
        anns[key] = BoxAnnotation(boxes=np.array([box], float), frame=None, label="dog", source=key)
    r = evaluate_heatmaps(heatmaps, anns)
    assert r["pairs"] == r["pool"] == 3
    assert r["cIoU@0.5"] == 1.0 and r["mean_cIoU"] > 0.6
    assert r["chance"]["cIoU@0.5"] == 0.0 and r["AUC"] > r["chance"]["AUC"] + 0.3
    assert r["per_class"][0]["label"] == "dog"


def test_connector_without_a_clip_side_and_wrong_encoders_are_refused(tmp_path, encoders):
    from cmcr.localize import Localizer
    from cmcr.trainer.connector import Connector

    clip, clap = encoders
    linear_connector(tmp_path / "c", clip.identity(), clap.identity())
    conn = Connector.load(tmp_path / "c")
    with pytest.raises(EncoderError, match="open_clip ViT"):
        Localizer(conn, clap, clip)
    with pytest.raises(ConnectorError, match="other side"):
        Localizer(conn, clip, clip)
    with pytest.raises(ConfigError, match="unknown dense path"):
        Localizer(conn, clip, clap, path="keys")
    linear_connector(tmp_path / "c2", clap.identity(), clap.identity())  # no open_clip side at all
    with pytest.raises(ConnectorError, match="no open_clip image side"):
        Localizer.load(tmp_path / "c2", device="cpu")
    with pytest.raises(ConnectorError, match="no side"):
        Localizer(Connector.load(tmp_path / "c2"), clip, clap)  # clip is the encoder of neither side


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_localize_and_eval_localization_on_bundled_images_random_weights(tmp_path, encoders, capsys):
    """The commands on the bundled real images with random weights (loudly labelled): outputs, JSON, boxes."""
    from PIL import Image

    from cmcr.cli import main

    clip, clap = encoders
    conn = linear_connector(tmp_path / "conn", clip.identity(), clap.identity())
    out = tmp_path / "loc"
    dogs = SAMPLE / "images" / "dog"
    assert main(["localize", "-c", str(conn), "--audio", str(DOG_AUDIO), "--images", str(dogs), "--out", str(out),
                 "--device", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["random_weights"] is True and rep["grid"] == [4, 4] and len(rep["images"]) == 4
    assert [r["image_score"] for r in rep["images"]] == sorted((r["image_score"] for r in rep["images"]),
                                                                reverse=True)
    for r in rep["images"]:
        png, npy = Path(r["png"]), Path(r["npy"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(Path(r["image"])) as im:
            assert np.load(npy).shape == (im.height, im.width)
    assert json.loads((out / "localize.json").read_text())["images"] == rep["images"]

    # boxes: the clip-art dogs' drawn pixels (bounding box of the non-white pixels), pixel coordinates
    rows = ["key,x0,y0,x1,y1,label"]
    for p in sorted(dogs.glob("openclipart_*.png")):
        a = np.asarray(Image.open(p).convert("L")) < 240
        ys, xs = np.nonzero(a)
        rows.append(f"{p.stem},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1},dog")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("\n".join(rows) + "\n")
    assert main(["eval", "localization", "--heatmaps", str(out), "--annotations", str(boxes), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pairs"] == 2 and len(r["not_annotated"]) == 2 and 0 <= r["cIoU@0.5"] <= 1
    assert set(r["chance"]) == {"cIoU@0.5", "mean_cIoU", "AUC"} and 0 <= r["AUC"] <= 1
    assert r["random_weights"] is True  # read from the localize.json beside the heatmaps

    # computed from folders: image and clip paired by file stem
    imgs, auds = tmp_path / "frames", tmp_path / "audio"
    imgs.mkdir()
    auds.mkdir()
    for p in sorted(dogs.glob("openclipart_*.png")):
        (imgs / p.name).write_bytes(p.read_bytes())
        (auds / f"{p.stem}.ogg").write_bytes(DOG_AUDIO.read_bytes())
    (imgs / "broken.png").write_bytes(b"not an image")
    (auds / "broken.ogg").write_bytes(DOG_AUDIO.read_bytes())
    boxes.write_text(boxes.read_text() + "broken,0,0,5,5,dog\n")
    assert main(["eval", "localization", "-c", str(conn), "--images", str(imgs), "--audio", str(auds),
                 "--annotations", str(boxes), "--device", "cpu", "--json"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["random_weights"] is True and r2["pairs"] == 2 and [f["key"] for f in r2["failures"]] == ["broken"]
    assert r2["per_sample"] == r["per_sample"]  # the same heatmaps as `cmcr localize` wrote

    assert main(["eval", "localization", "--heatmaps", str(out), "--annotations", str(boxes),
                 "--threshold", "2"]) == 2  # a usage error
    assert "--threshold" in capsys.readouterr().err


def test_encoder_specs_are_rebuilt_from_identities_that_name_their_weights():
    from cmcr.localize import spec_of_identity

    assert spec_of_identity({"family": "open_clip", "architecture": "ViT-B-32", "weights": "openai"}) == \
        "open_clip:ViT-B-32@openai"
    assert spec_of_identity({"family": "clap", "architecture": "cmcr-tiny-clap", "weights": "random", "seed": 3}) == \
        "clap:cmcr-tiny-clap@random:3"
    assert spec_of_identity({"family": "open_clip", "architecture": "ViT-B-16", "weights": "sha256:ab"}) is None
