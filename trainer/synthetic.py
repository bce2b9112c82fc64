"""A controlled check of the whole connect stage (method.md section 6, "Controlled check").

Two synthetic MCRs share a latent space of concepts but embed it with their own random
non-linear maps, plus a per-modality offset (the *modality gap* of contrastive models) and
per-item noise:

    e_X^m(z) = norm(W2_X tanh(W1_X z) + gap_X^m + noise),    X in {A, B}, m a modality of X

MCR A embeds text and image, MCR B text and audio (text is shared). The corpora are unpaired,
as in C-MCR: captions (latents) encoded by both MCRs, unrelated images in A's memory, unrelated
audio in B's memory. A held-out set of latents gives true (audio, image) pairs with shared keys,
so audio->image retrieval through the connector can be scored against the truth (chance 1/N).
Latents are drawn around class centres, so the held-out items also carry class labels and the
class centres' texts give zero-shot "prompts".

Everything goes through ordinary stores and the real code path (completion, training,
connector, projection, metrics); no encoder is involved.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.stores.store import Store
from cmcr.trainer.config import TrainConfig
from cmcr.trainer.connector import Connector
from cmcr.trainer.loop import train_connector
from cmcr.trainer.metrics import retrieval_metrics

log = logging.getLogger(__name__)

#: The ablations of method.md section 5 (and the paper's Table 5), as config changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_completion": {"use_completion": False},
    "no_noise": {"noise_std": 0.0},
    "no_intra": {"intra_weight": 0.0},
}


@dataclass
class SyntheticSpec:
    """Sizes and shape of the synthetic MCR pair (test-size defaults: seconds on 2 CPU cores).

    Attributes:
        dim: embedding width of both MCRs.
        latent_dim: width of the shared latent (the "semantics").
        hidden: width of each MCR's random non-linear map.
        classes: number of class centres the latents are drawn around.
        spread: std of a latent around its class centre (relative to the centres' unit scale).
        gap: norm of each modality's offset (the modality gap), relative to the signal's.
        noise: per-item noise std per dimension before normalisation.
        n_shared, n_memory_a, n_memory_b, n_eval: corpus sizes.
        seed: generator seed.
    """

    dim: int = 32
    latent_dim: int = 8
    hidden: int = 64
    classes: int = 10
    spread: float = 0.6
    gap: float = 0.8
    noise: float = 0.05
    n_shared: int = 3000
    n_memory_a: int = 3000
    n_memory_b: int = 3000
    n_eval: int = 500
    seed: int = 0


class SyntheticMCR:
    """One synthetic MCR: a random non-linear map of the latent plus one offset per modality."""

    def __init__(self, name: str, modalities: tuple[str, ...], spec: SyntheticSpec, rng: np.random.Generator):
        self.name = name
        self.modalities = modalities
        self.spec = spec
        self.w1 = rng.standard_normal((spec.latent_dim, spec.hidden)) / np.sqrt(spec.latent_dim)
        self.b1 = rng.standard_normal(spec.hidden) * 0.5
        self.w2 = rng.standard_normal((spec.hidden, spec.dim)) / np.sqrt(spec.hidden)
        self.gaps = {}
        for m in modalities:
            g = rng.standard_normal(spec.dim)
            self.gaps[m] = g / np.linalg.norm(g)
        self.identity = {"family": "synthetic", "architecture": name, "weights": f"seed-{spec.seed}", "dim": spec.dim}

    def embed(self, z: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
        """``(N, latent_dim)`` latents -> ``(N, dim)`` float32 unit embeddings of ``modality``."""
        signal = np.tanh(z @ self.w1 + self.b1) @ self.w2
        scale = np.sqrt(np.mean(np.sum(signal**2, axis=1)))
        x = signal / scale + self.spec.gap * self.gaps[modality]
        x = x + rng.standard_normal(x.shape) * self.spec.noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate_synthetic_stores(out_dir: str | Path, spec: SyntheticSpec | None = None) -> dict[str, Path]:
    """Write the stores of a synthetic MCR pair under ``out_dir`` and return their paths.

    Stores (keys in brackets): ``text_a``, ``text_b`` (``cap*``, the shared corpus encoded by both
    MCRs), ``image_a`` (``img*``, memory of A), ``audio_b`` (``aud*``, memory of B),
    ``eval_image_a``, ``eval_audio_b`` (``pair*``: true pairs, with a ``label`` column),
    ``classes_text_a``, ``classes_text_b`` (class names: class-centre texts, zero-shot prompts).
    An existing complete set (same spec) is reused.
    """
    spec = spec or SyntheticSpec()
    out = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    mcr_a = SyntheticMCR("mcr-a", ("text", "image"), spec, rng)
    mcr_b = SyntheticMCR("mcr-b", ("text", "audio"), spec, rng)
    centres = rng.standard_normal((spec.classes, spec.latent_dim))
    class_names = [f"class{c:02d}" for c in range(spec.classes)]

    def latents(n: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, spec.classes, n)
        return centres[c] + spec.spread * rng.standard_normal((n, spec.latent_dim)), c

    z_shared, _ = latents(spec.n_shared)
    z_mem_a, _ = latents(spec.n_memory_a)
    z_mem_b, _ = latents(spec.n_memory_b)
    z_eval, c_eval = latents(spec.n_eval)
    labels = [class_names[c] for c in c_eval]
    plan = {
        "text_a": (mcr_a, "text", z_shared, [f"cap{i:06d}" for i in range(spec.n_shared)], None),
        "text_b": (mcr_b, "text", z_shared, [f"cap{i:06d}" for i in range(spec.n_shared)], None),
        "image_a": (mcr_a, "image", z_mem_a, [f"img{i:06d}" for i in range(spec.n_memory_a)], None),
        "audio_b": (mcr_b, "audio", z_mem_b, [f"aud{i:06d}" for i in range(spec.n_memory_b)], None),
        "eval_image_a": (mcr_a, "image", z_eval, [f"pair{i:06d}" for i in range(spec.n_eval)], {"label": labels}),
        "eval_audio_b": (mcr_b, "audio", z_eval, [f"pair{i:06d}" for i in range(spec.n_eval)], {"label": labels}),
        "classes_text_a": (mcr_a, "text", centres, class_names, {"label": class_names}),
        "classes_text_b": (mcr_b, "text", centres, class_names, {"label": class_names}),
    }
    spec_extra = {"synthetic": dataclasses.asdict(spec)}
    paths: dict[str, Path] = {}
    for name, (mcr, modality, z, keys, meta) in plan.items():
        path = out / name
        emb = mcr.embed(z, modality, rng)  # always drawn, so every store's noise is seed-stable
        paths[name] = path
        if (path / "manifest.json").exists():
            st = Store.open(path)
            if st.manifest.get("extra") == spec_extra and st.num_rows == len(keys):
                continue
            raise FileExistsError(f"{path} holds another store; use an empty output folder")
        store = Store.create(path, modality=modality, encoder=mcr.identity, dim=spec.dim, dtype="float32",
                             extra=spec_extra)
        store.append_part(keys, emb, metadata=meta, source="synthetic")
    return paths


def project_embeddings(connector: Connector, store: Store) -> np.ndarray:
    """All rows of ``store`` through the connector side that accepts it: ``(N, out_dim)`` float32."""
    side = connector.side_for(store.encoder, store.modality)
    return connector.project(side, store.embeddings(np.float32), identity=store.encoder, modality=store.modality)


def run_synthetic_check(
    out_dir: str | Path,
    spec: SyntheticSpec | None = None,
    config: TrainConfig | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    *,
    progress: bool = False,
    plot: bool = False,
) -> list[dict[str, Any]]:
    """Generate the synthetic stores, train one connector per variant, score audio->image retrieval.

    Args:
        out_dir: stores go to ``out_dir/stores``, connectors to ``out_dir/<variant>``.
        spec: synthetic sizes (test-size defaults).
        config: base training config (defaults: :func:`synthetic_config`).
        variants: names from :data:`VARIANTS` (``full``, ``no_completion``, ``no_noise``, ``no_intra``).
        progress: rich progress bars while training.
        plot: also write each variant's ``loss_curve.png`` (off by default: matplotlib costs seconds).

    Returns:
        One row per variant: ``{"variant", "R@1", "R@5", "R@10", "mAP", "pool", "chance_R@1",
        "chance_R@5", "chance_mAP", "direction", "image_to_audio_R@1", "zeroshot_top1", "seconds"}``.
    """
    import time

    spec = spec or SyntheticSpec()
    cfg = config or synthetic_config()
    out = Path(out_dir)
    paths = generate_synthetic_stores(out / "stores", spec)
    eval_img, eval_aud = Store.open(paths["eval_image_a"]), Store.open(paths["eval_audio_b"])
    cls_b = Store.open(paths["classes_text_b"])
    table = []
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        t0 = time.perf_counter()
        vcfg = cfg.replace(**VARIANTS[name])
        train_connector(paths["text_a"], paths["text_b"], paths["image_a"], paths["audio_b"], out / name, vcfg,
                        overwrite=True, progress=progress, plot=plot)
        conn = Connector.load(out / name)
        z_img, z_aud = project_embeddings(conn, eval_img), project_embeddings(conn, eval_aud)
        keys = eval_img.keys()
        if eval_aud.keys() != keys:
            raise AssertionError("synthetic eval stores must share keys row by row")
        a2i = retrieval_metrics(z_aud, z_img, keys, keys)
        i2a = retrieval_metrics(z_img, z_aud, keys, keys)
        z_cls = project_embeddings(conn, cls_b)
        labels = eval_aud.metadata(["label"]).column("label").to_pylist()
        from cmcr.trainer.metrics import zeroshot_accuracy

        zs = zeroshot_accuracy(z_aud, labels, z_cls, cls_b.keys())
        table.append({"variant": name, "direction": "audio->image", "R@1": a2i["R@1"], "R@5": a2i["R@5"],
                      "R@10": a2i["R@10"], "mAP": a2i["mAP"], "pool": a2i["pool"],
                      "chance_R@1": a2i["chance"]["R@1"], "chance_R@5": a2i["chance"]["R@5"],
                      "chance_mAP": a2i["chance"]["mAP"], "image_to_audio_R@1": i2a["R@1"],
                      "zeroshot_top1": zs["top1"], "zeroshot_chance": zs["chance"]["top1"],
                      "seconds": round(time.perf_counter() - t0, 2)})
    return table


def synthetic_config(**changes: Any) -> TrainConfig:
    """Training config sized for the synthetic check (small projector, CPU, seconds)."""
    base = TrainConfig(hidden_dim=128, out_dim=32, epochs=15, batch_size=256, lr=2e-3, val_fraction=0.05,
                       device="cpu", name_a="mcr-a", name_b="mcr-b", keep_checkpoints=1)
    return base.replace(**changes)
