"""The controlled synthetic check (trainer/synthetic.py): the connection beats chance widely, and
completion and noise each help (method.md section 5)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from cmcr.stores.store import Store
from cmcr.trainer.synthetic import SyntheticSpec, generate_synthetic_stores, run_synthetic_check, synthetic_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for seconds on 1 CPU thread; the margins below held on every one of 8 seeds (0-7) at
# this size: mAP full - no_noise >= 0.048, full - no_completion >= 0.098 (docs/method.md has the table).
ABLATION_SPEC = dict(n_shared=1500, n_memory_a=1500, n_memory_b=1500, n_eval=300, seed=0)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> dict[str, dict]:
    """One trained connector per variant (full, no_noise, no_completion), shared by the tests below."""
    rows = run_synthetic_check(tmp_path_factory.mktemp("ablation"), SyntheticSpec(**ABLATION_SPEC),
                               synthetic_config(seed=0, epochs=6), variants=("full", "no_noise", "no_completion"))
    return {r["variant"]: r for r in rows}


def test_generator_writes_ordinary_stores(tmp_path):
    spec = SyntheticSpec(n_shared=50, n_memory_a=40, n_memory_b=30, n_eval=20, classes=4)
    paths = generate_synthetic_stores(tmp_path, spec)
    ta, tb = Store.open(paths["text_a"]), Store.open(paths["text_b"])
    assert ta.keys() == tb.keys() and ta.encoder != tb.encoder and ta.modality == tb.modality == "text"
    assert Store.open(paths["image_a"]).encoder == ta.encoder and Store.open(paths["audio_b"]).num_rows == 30
    ia, ab = Store.open(paths["eval_image_a"]), Store.open(paths["eval_audio_b"])
    assert ia.keys() == ab.keys() and "label" in ia.metadata_columns
    assert generate_synthetic_stores(tmp_path, spec) == paths  # idempotent


def test_generator_has_a_clip_like_geometry(tmp_path):
    """Narrow per-modality cones (random same-modality cos ~0.5), a modality gap (random text-image
    cos ~0.1) and weak true pairs (cos ~0.35), as for CLIP ViT-B/32."""
    spec = SyntheticSpec(n_shared=400, n_memory_a=400, n_memory_b=10, n_eval=400, seed=3)
    p = generate_synthetic_stores(tmp_path, spec)
    text, img = Store.open(p["text_a"]).embeddings(np.float32), Store.open(p["image_a"]).embeddings(np.float32)
    assert text.shape == (400, 128) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    rand_img = float(np.mean(np.sum(img[:200] * img[200:], axis=1)))
    rand_txt_img = float(np.mean(np.sum(text * img, axis=1)))  # unrelated latents: no pairs here
    assert 0.4 < rand_img < 0.7 and 0.0 < rand_txt_img < 0.25
    # a true pair: the eval images and the class prompts are not pairs, so compare text and image of
    # the same latents through the generator directly
    from cmcr.trainer.synthetic import SyntheticMCR

    mcr = SyntheticMCR("a", ("text", "image"), spec, np.random.default_rng(0))
    z = np.random.default_rng(1).standard_normal((300, spec.latent_dim))
    rng = np.random.default_rng(2)
    paired = float(np.mean(np.sum(mcr.embed(z, "text", rng) * mcr.embed(z, "image", rng), axis=1)))
    assert rand_txt_img + 0.15 < paired < 0.5


def test_connection_beats_chance_by_a_wide_margin(ablation):
    row = ablation["full"]
    assert row["pool"] == 300 and row["chance_R@1"] == pytest.approx(1 / 300)
    assert row["R@1"] > 10 * row["chance_R@1"]
    assert row["mAP"] > 8 * row["chance_mAP"]
    assert row["zeroshot_top1"] > 5 * row["zeroshot_chance"]


def test_completion_helps(ablation):
    assert ablation["full"]["mAP"] > ablation["no_completion"]["mAP"] + 0.05
    assert ablation["full"]["R@1"] > ablation["no_completion"]["R@1"]


def test_noise_helps(ablation):
    # noise makes the projectors robust to the shift from pseudo embeddings (means of memory rows,
    # item content averaged away) to single real embeddings at inference
    assert ablation["full"]["mAP"] > ablation["no_noise"]["mAP"] + 0.025
    assert ablation["full"]["R@1"] > ablation["no_noise"]["R@1"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ablations_hold_over_seeds(tmp_path, seed):
    rows = {r["variant"]: r for r in run_synthetic_check(
        tmp_path, SyntheticSpec(**{**ABLATION_SPEC, "seed": seed}), synthetic_config(seed=seed, epochs=6),
        variants=("full", "no_noise", "no_completion"))}
    assert rows["full"]["mAP"] > rows["no_noise"]["mAP"] + 0.025
    assert rows["full"]["mAP"] > rows["no_completion"]["mAP"] + 0.05


def test_rerun_with_other_settings_needs_overwrite(tmp_path):
    from cmcr.errors import ConfigError, StoreMismatchError

    small = dict(n_shared=40, n_memory_a=30, n_memory_b=30, n_eval=10, classes=3, dim=16, hidden=16)
    paths = generate_synthetic_stores(tmp_path / "stores", SyntheticSpec(**small))
    before = Store.open(paths["text_a"]).embeddings(np.float32)
    with pytest.raises(StoreMismatchError, match=r"synthetic.seed: recorded 0, now 1.*--overwrite"):
        generate_synthetic_stores(tmp_path / "stores", SyntheticSpec(**small, seed=1))
    assert np.array_equal(Store.open(paths["text_a"]).embeddings(np.float32), before)  # untouched
    generate_synthetic_stores(tmp_path / "stores", SyntheticSpec(**small, seed=1), overwrite=True)
    assert not np.array_equal(Store.open(paths["text_a"]).embeddings(np.float32), before)
    # an interrupted store (same settings, fewer rows) is regenerated, not an error
    shutil.rmtree(paths["eval_audio_b"])
    Store.create(paths["eval_audio_b"], modality="audio", encoder=Store.open(paths["audio_b"]).encoder, dim=16,
                 dtype="float32", extra={"synthetic": dataclasses.asdict(SyntheticSpec(**small, seed=1))})
    generate_synthetic_stores(tmp_path / "stores", SyntheticSpec(**small, seed=1))
    assert Store.open(paths["eval_audio_b"]).num_rows == 10
    with pytest.raises(ConfigError, match="n_shared"):
        SyntheticSpec(n_shared=0)
    with pytest.raises(ConfigError, match="bogus"):
        run_synthetic_check(tmp_path, SyntheticSpec(**small), variants=("bogus",))


def test_a_variant_named_twice_is_trained_once(tmp_path):
    small = dict(n_shared=40, n_memory_a=30, n_memory_b=30, n_eval=10, classes=3, dim=16, hidden=16)
    rows = run_synthetic_check(tmp_path, SyntheticSpec(**small), synthetic_config(16, epochs=1),
                               variants=("full", "no_noise", "full"))
    assert [r["variant"] for r in rows] == ["full", "no_noise"]
