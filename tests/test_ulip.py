"""ULIP-2 PointBERT encoder: checkpoint contract, strict safe loading, grouping, preprocessing, towers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmcr.errors import EncoderError
from cmcr.pipeline.audio import SampleError

CONTRACT = Path("/work/shared/data/cmcr-release/ulip2_pointbert_state_dict.json")
FIXTURE_CONTRACT = Path(__file__).parent / "fixtures" / "cmcr-release" / "ulip2_pointbert_state_dict.json"
TINY_ULIP = "ulip:cmcr-tiny-ulip@random"


@pytest.fixture(scope="module")
def tiny_ulip():
    from cmcr.pipeline.encoders import load_encoder

    return load_encoder(TINY_ULIP, device="cpu")


def cloud(n: int, seed: int = 0, cols: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) * np.array([3.0, 1.0, 0.5]) + 5.0
    if cols == 6:
        x = np.concatenate([x, rng.uniform(0, 1, (n, 3))], axis=1)
    return x.astype(np.float32)


def test_full_model_state_dict_equals_the_release_contract():
    """Key for key, shape for shape, dtype for dtype (built on the meta device: no memory, fast)."""
    from cmcr.pipeline.ulip_model import build_model

    contract = json.loads(FIXTURE_CONTRACT.read_text())
    assert len(contract) == 462
    sd = build_model("PointBERT", device="meta").state_dict()
    want = {k: (tuple(s), t) for k, s, t in contract}
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert sum(int(np.prod(s)) for s, _ in want.values()) == 171_873_283


@pytest.mark.skipif(not CONTRACT.exists(), reason="shared release data not mounted")
def test_bundled_contract_is_the_release_file():
    assert json.loads(CONTRACT.read_text()) == json.loads(FIXTURE_CONTRACT.read_text())


def test_round_trip_in_the_released_file_form(tmp_path, tiny_ulip):
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.ulip_model import save_ulip_checkpoint

    path = tmp_path / "tiny_ulip.pt"
    save_ulip_checkpoint(tiny_ulip.model, path, npoints=8192)
    raw = torch.load(path, weights_only=False)  # our own file: check its form
    assert isinstance(raw["args"], argparse.Namespace) and all(k.startswith("module.") for k in raw["state_dict"])
    enc = load_encoder(f"ulip:cmcr-tiny-ulip@{path}", device="cpu")
    assert enc.identity()["weights"].startswith("sha256:") and "seed" not in enc.identity()
    for k, v in tiny_ulip.model.state_dict().items():
        assert torch.equal(v, enc.model.state_dict()[k]), k
    pts = cloud(300)
    np.testing.assert_allclose(enc.encode("3d", [pts]), tiny_ulip.encode("3d", [pts]), atol=1e-6)


def test_wrong_checkpoint_gives_a_clear_error(tmp_path, tiny_ulip):
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.ulip_model import build_model, save_ulip_checkpoint

    path = tmp_path / "bad.pt"
    m = build_model("cmcr-tiny-ulip")
    m.pc_projection = torch.nn.Parameter(torch.zeros(64, 32))  # wrong shape
    save_ulip_checkpoint(m, path)
    sd = torch.load(path, weights_only=False)
    del sd["state_dict"]["module.ln_final.bias"]
    sd["state_dict"]["module.extra.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(EncoderError) as e:
        load_encoder(f"ulip:cmcr-tiny-ulip@{path}", device="cpu")
    msg = str(e.value)
    assert str(path) in msg and "1 missing key(s): ln_final.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "pc_projection [64, 32] (model: [64, 64])" in msg and "ULIP_PointBERT" in msg
    # the full-size architecture with a tiny file: the same kind of message, naming the spec to use
    save_ulip_checkpoint(tiny_ulip.model, path)
    with pytest.raises(EncoderError, match="does not match architecture 'PointBERT'.*wrong shape"):
        load_encoder(f"ulip:PointBERT@{path}", device="cpu")


def test_checkpoint_loading_never_unpickles_other_objects(tmp_path):
    from cmcr.pipeline.encoders import load_encoder

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"module.x": torch.zeros(1)}, "args": Path("/etc")}, path)  # a non-allowlisted class
    with pytest.raises(EncoderError, match=r"cannot read ULIP checkpoint .*weights_only"):
        load_encoder(f"ulip:cmcr-tiny-ulip@{path}", device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EncoderError, match="cannot read ULIP checkpoint"):
        load_encoder(f"ulip:cmcr-tiny-ulip@{tmp_path / 'junk.pt'}", device="cpu")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(f"ulip:cmcr-tiny-ulip@{tmp_path / 'missing.pt'}", device="cpu")
    with pytest.raises(EncoderError, match="needs a checkpoint file or @random"):
        load_encoder("ulip:PointBERT", device="cpu")
    with pytest.raises(EncoderError, match="unknown ULIP architecture"):
        load_encoder("ulip:PointNeXt@random", device="cpu")


def test_grouping_is_fps_plus_knn_and_deterministic():
    from cmcr.pipeline.ulip_model import farthest_point_sample, group_points

    torch.manual_seed(0)
    xyz = torch.rand(2, 200, 3)
    idx = farthest_point_sample(xyz, 10)
    assert idx[:, 0].tolist() == [0, 0]  # fixed start point
    # brute-force FPS for the first cloud
    chosen = [0]
    d = ((xyz[0] - xyz[0, 0]) ** 2).sum(-1)
    for _ in range(9):
        nxt = int(d.argmax())
        chosen.append(nxt)
        d = torch.minimum(d, ((xyz[0] - xyz[0, nxt]) ** 2).sum(-1))
    assert idx[0].tolist() == chosen
    # the GPU path (torch kernels) picks the same points as the CPU path (numpy)
    from cmcr.pipeline.ulip_model import _fps_torch

    assert torch.equal(_fps_torch(xyz, 10), idx)
    neigh, centres = group_points(xyz, 10, 8)
    assert neigh.shape == (2, 10, 8, 3) and centres.shape == (2, 10, 3)
    # every neighbourhood is the 8 nearest points, relative to its centre; the centre itself is in it
    for b in range(2):
        for g in range(10):
            dist = ((xyz[b] - centres[b, g]) ** 2).sum(-1)
            want = xyz[b, dist.argsort()[:8]] - centres[b, g]
            torch.testing.assert_close(neigh[b, g], want)
            assert torch.allclose(neigh[b, g, 0], torch.zeros(3))
    n2, c2 = group_points(xyz, 10, 8)
    assert torch.equal(n2, neigh) and torch.equal(c2, centres)
    with pytest.raises(ValueError, match="cannot be split into 300 groups"):
        group_points(xyz, 300, 8)


def test_3d_embeddings_are_deterministic_and_invariant(tiny_ulip):
    a, b = cloud(500, 0), cloud(500, 1)
    e = tiny_ulip.encode("3d", [a, b])
    assert e.shape == (2, 64) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(e, tiny_ulip.encode("3d", [a, b]))
    # translation and scale of the input do not matter (centred, unit sphere); colour columns are dropped
    np.testing.assert_allclose(tiny_ulip.encode("3d", [a * 3.0 - 7.0])[0], e[0], atol=1e-5)
    with6 = np.concatenate([a, np.random.default_rng(0).uniform(0, 1, (500, 3)).astype(np.float32)], 1)
    np.testing.assert_allclose(tiny_ulip.encode("3d", [with6])[0], e[0], atol=1e-6)
    assert not np.allclose(e[0], e[1])


def test_3d_preprocessing_output_and_bad_samples(tiny_ulip):
    pre = tiny_ulip.preprocessor("3d")
    item, _ = pre(cloud(10000, cols=6))
    x = item.numpy()
    assert x.shape == (8192, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    assert np.linalg.norm(x, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    assert pre(cloud(100))[0].shape == (8192, 3)  # fewer than n_points but enough for the groups: repeated
    # reasons as worded by pipeline/pointcloud.prepare_points or, without it, by the fallback
    for bad, reason in [(cloud(15), r"15 (distinct )?points.*16"),
                        (np.full((100, 3), 2.0, np.float32), r"all .*points are (equal|the same)"),
                        (np.where(np.arange(300)[:, None] == 3, np.nan, cloud(300)), "NaN/Inf"),
                        (np.zeros((100, 4), np.float32), r"expected .*\(N, 3\)"),
                        (np.zeros(100, np.float32), r"expected .*\(N, 3\)"),
                        ("not an array", r"expected an \(N, 3\|6\) array")]:
        with pytest.raises(SampleError, match=reason):
            pre(bad)
    assert tiny_ulip.preprocessing("3d")["use_color"] is False and tiny_ulip.preprocessing("3d")["n_points"] == 8192


def test_3d_query_file_equals_the_array(tiny_ulip, tmp_path):
    ok = tmp_path / "cloud.npy"
    np.save(ok, cloud(400))
    np.testing.assert_allclose(tiny_ulip.encode("3d", [ok]), tiny_ulip.encode("3d", [cloud(400)]), atol=1e-6)


def test_full_size_batch_of_fewer_points_than_groups_is_a_sample_error():
    """The full-size grouping needs 512 points: a 300-point cloud is refused by the preprocessor
    (a per-sample failure), not a crash in the model."""
    from cmcr.pipeline.ulip_encoder import PointCloudPreprocessor

    with pytest.raises(SampleError, match=r"300 (distinct )?points.*512"):
        PointCloudPreprocessor(8192, 512)(cloud(300))


def test_image_and_text_towers(tiny_ulip, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(50, 80), (64, 64)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    item, info = tiny_ulip.preprocessor("image")(paths[0].read_bytes())
    assert tuple(item.shape) == (3, 32, 32) and info == {"width": 80, "height": 50}
    e = tiny_ulip.encode("image", paths)
    assert e.shape == (2, 64) and np.isfinite(e).all()
    # text: pooled at end-of-text; the length-trimmed forward equals the full 77-token forward
    texts = ["a chair", "a point cloud model of a very long table with many legs"]
    ids = torch.stack([tiny_ulip.preprocessor("text")(t)[0] for t in texts])
    assert ids.shape == (2, 77)
    m = tiny_ulip.model
    with torch.no_grad():
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, m.attn_mask))
        full = x[torch.arange(2), ids.argmax(-1)] @ m.text_projection
        torch.testing.assert_close(m.encode_text(ids), full, atol=1e-5, rtol=1e-5)
    ids_long = tiny_ulip.preprocessor("text")("word " * 200)
    assert ids_long[1]["truncated"] is True


def test_spec_parsing_and_identity(tiny_ulip):
    from cmcr.pipeline.encoders import parse_spec

    s = parse_spec("ulip:PointBERT@/models/pointbert_ULIP-2.pt")
    assert (s.family, s.architecture, str(s.checkpoint)) == ("ulip", "PointBERT", "/models/pointbert_ULIP-2.pt")
    assert parse_spec("ulip:cmcr-tiny-ulip@random:3").seed == 3
    assert tiny_ulip.identity() == {"family": "ulip", "architecture": "cmcr-tiny-ulip", "weights": "random",
                                    "dim": 64, "seed": 0}
    assert tiny_ulip.modalities == ("3d", "image", "text")
    with pytest.raises(EncoderError, match="embeds"):
        tiny_ulip.check_modality("audio")
