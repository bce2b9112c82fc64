"""A controlled check of the whole connect stage (method.md section 6, "Controlled check").

Two synthetic MCRs share a latent space of concepts ``z`` but embed it with their own random
non-linear maps. Each embedding is built like a real CLIP/CLAP embedding (method.md section 1):

    e_X^m = norm( sqrt(cone) * c_X^m  +  sqrt(semantic) * g_X(z)  +  sqrt(item) * U_X^m w )

* ``c_X^m`` — the unit centre of modality m's narrow cone in MCR X (the *modality gap*): random
  rows of one modality share ``cone`` of their squared norm, so their cosine is about ``cone``
  (~0.5, as for CLIP images); the two centres of one MCR have cosine ``cone_overlap``.
* ``g_X(z) = W2 tanh(W1 z + b1)`` (unit RMS) — the semantics, the only part a caption shares with
  an image or a sound; a true (text, image) pair has cosine about ``cone*cone_overlap + semantic``
  (~0.35; CLIP ViT-B/32 gives ~0.3).
* ``U_X^m w`` — item-specific content that the other modality does not share (an image's
  background, a caption's wording), in a modality-specific subspace of rank ``item_rank``
  (``w`` ~ N(0, I/item_rank), so its norm is about 1). A caption's wording ``w`` is the same for
  both MCRs' text encoders (it is one caption); images and sounds get their own.

MCR A embeds text and image, MCR B text and audio (text is shared). The corpora are unpaired,
as in C-MCR: captions encoded by both MCRs, unrelated images in A's memory, unrelated audio in
B's memory. A held-out set of latents gives true (audio, image) pairs with shared keys, so
audio->image retrieval through the connector can be scored against the truth (chance 1/N).
Latents are drawn around class centres, so held-out items carry class labels and the class
centres' texts give zero-shot "prompts".

Why noise matters here (the paper's reason): a pseudo image is a softmax-weighted *mean* of a few
memory images, so its item-specific part is averaged away, while at inference the projector sees
single real images with their full item content, in directions it never saw in training. Gaussian
noise on the training inputs makes the projectors insensitive to such unseen directions. Without
the ``item`` term (``item=0``) the benefit of noise shrinks and is not robust over seeds.

Everything goes through ordinary stores and the real code path (completion, training,
connector, projection, metrics); no encoder is involved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, StoreMismatchError
from cmcr.stores.files import OUTPUT_LOCK, claim_output, clear_output, locks_output
from cmcr.stores.store import Store
from cmcr.trainer.config import TrainConfig
from cmcr.trainer.connector import Connector
from cmcr.trainer.loop import train_connector
from cmcr.trainer.metrics import retrieval_metrics, zeroshot_accuracy

log = logging.getLogger(__name__)

#: The ablations of method.md section 5 (and the paper's Table 5), and the sources of pseudo pairs
#: (method.md "Memory-centric pseudo pairs"), as config changes. ``full`` is C-MCR as published
#: (text-centric pairs only, whatever the base config's ``centric``; so are the three ablations);
#: ``plus_audio`` / ``plus_image`` add the audio- / image-centric pairs, ``all_centric`` both.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"centric": "shared"},
    "no_completion": {"use_completion": False, "centric": "shared"},
    "no_noise": {"noise_std": 0.0, "centric": "shared"},
    "no_intra": {"intra_weight": 0.0, "centric": "shared"},
    "plus_audio": {"centric": "text,audio"},
    "plus_image": {"centric": "text,image"},
    "all_centric": {"centric": "text,audio,image"},
}


@dataclass
class SyntheticSpec:
    """Sizes and shape of the synthetic MCR pair (defaults: tens of seconds per variant on 2 CPU cores).

    Attributes:
        dim: embedding width of both MCRs (512 in the reference setup; 128 by default for speed).
        latent_dim: width of the shared latent (the "semantics").
        hidden: width of each MCR's random non-linear semantic map.
        classes: number of class centres the latents are drawn around.
        spread: std of a latent around its class centre (the centres have unit-scale entries).
        cone: share of an embedding's squared norm on its modality's cone centre (~ cosine of two
            random rows of one modality).
        semantic: share on the semantic signal ``g_X(z)``.
        item: share on item-specific content the other modality does not share.
        cone_overlap: cosine between the two modality centres of one MCR (the size of the gap:
            random text-image rows have cosine ~ ``cone * cone_overlap``).
        item_rank: rank of each modality's item subspace (``0``: ``dim // 4``).
        n_shared, n_memory_a, n_memory_b, n_eval: corpus sizes.
        seed: generator seed.
    """

    dim: int = 128
    latent_dim: int = 16
    hidden: int = 256
    classes: int = 20
    spread: float = 0.6
    cone: float = 0.5
    semantic: float = 0.25
    item: float = 0.25
    cone_overlap: float = 0.2
    item_rank: int = 0
    n_shared: int = 3000
    n_memory_a: int = 3000
    n_memory_b: int = 3000
    n_eval: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the sizes and shares.

        Raises:
            ConfigError: a size is below 1 (``n_eval`` below 2, ``dim`` below 2), ``item_rank`` is
                negative, or a share (``cone``, ``semantic``, ``item``, ``cone_overlap``) lies outside [0, 1].
        """
        minimum = {"dim": 2, "latent_dim": 1, "hidden": 1, "classes": 1, "n_shared": 2, "n_memory_a": 1,
                   "n_memory_b": 1, "n_eval": 2}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                flag = {"n_memory_a": "n-memory", "n_memory_b": "n-memory"}.get(name, name.replace("_", "-"))
                raise ConfigError(f"synthetic {name} must be an integer >= {low}, got {value!r} "
                                  f"(`cmcr bench synthetic --{flag}`)")
        if self.item_rank < 0:
            raise ConfigError(f"synthetic item_rank must be >= 0 (0: dim // 4), got {self.item_rank}")
        for name in ("cone", "semantic", "item", "cone_overlap"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"synthetic {name} must lie in [0, 1], got {value}")
        if self.semantic <= 0.0:
            raise ConfigError("synthetic semantic must be > 0: without a shared signal there is nothing to connect")

    @property
    def rank(self) -> int:
        """The item subspace rank in use."""
        return self.item_rank or max(1, self.dim // 4)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class SyntheticMCR:
    """One synthetic MCR: a random non-linear semantic map, one cone centre and one item subspace
    per modality (see the module docstring)."""

    def __init__(self, name: str, modalities: tuple[str, ...], spec: SyntheticSpec, rng: np.random.Generator):
        self.name = name
        self.modalities = modalities
        self.spec = spec
        self.w1 = rng.standard_normal((spec.latent_dim, spec.hidden)) / np.sqrt(spec.latent_dim)
        self.b1 = rng.standard_normal(spec.hidden) * 0.5
        self.w2 = rng.standard_normal((spec.hidden, spec.dim)) / np.sqrt(spec.hidden)
        shared = _unit(rng.standard_normal(spec.dim))
        rho = spec.cone_overlap
        self.centres: dict[str, np.ndarray] = {}
        self.item_bases: dict[str, np.ndarray] = {}
        for m in modalities:
            own = _unit(rng.standard_normal(spec.dim))
            self.centres[m] = _unit(np.sqrt(rho) * shared + np.sqrt(1 - rho) * own)
            self.item_bases[m] = np.linalg.qr(rng.standard_normal((spec.dim, spec.rank)))[0]  # (dim, rank)
        self.identity = {"family": "synthetic", "architecture": name, "weights": f"seed-{spec.seed}", "dim": spec.dim}

    def embed(self, z: np.ndarray, modality: str, rng: np.random.Generator,
              item: np.ndarray | None = None) -> np.ndarray:
        """``(N, latent_dim)`` latents -> ``(N, dim)`` float32 unit embeddings of ``modality``.

        ``item``: ``(N, rank)`` item-specific coordinates (a caption's wording, shared by both
        MCRs' text); drawn fresh from ``rng`` when ``None``.
        """
        spec = self.spec
        signal = np.tanh(z @ self.w1 + self.b1) @ self.w2
        signal = signal / np.sqrt(np.mean(np.sum(signal**2, axis=1)))
        if item is None:
            item = rng.standard_normal((len(z), spec.rank)) / np.sqrt(spec.rank)
        x = (math.sqrt(spec.cone) * self.centres[modality] + math.sqrt(spec.semantic) * signal
             + math.sqrt(spec.item) * item @ self.item_bases[modality].T)
        return _unit(x).astype(np.float32)


@locks_output("out_dir")
def generate_synthetic_stores(out_dir: str | Path, spec: SyntheticSpec | None = None, *,
                              overwrite: bool = False) -> dict[str, Path]:
    """Write the stores of a synthetic MCR pair under ``out_dir`` and return their paths.

    Stores (keys in brackets): ``text_a``, ``text_b`` (``cap*``, the shared corpus encoded by both
    MCRs), ``image_a`` (``img*``, memory of A), ``audio_b`` (``aud*``, memory of B),
    ``eval_image_a``, ``eval_audio_b`` (``pair*``: true pairs, with a ``label`` column),
    ``classes_text_a``, ``classes_text_b`` (class names: class-centre texts, zero-shot prompts).
    An existing complete set made with the same spec is reused; an incomplete one (an interrupted
    run) is regenerated.

    Args:
        overwrite: start the stores over, whatever they hold (the one meaning of ``--overwrite``);
            without it stores made with other settings are an error.

    Raises:
        StoreMismatchError: ``out_dir`` holds a store made with other settings (or not by this
            generator) and ``overwrite`` is False; the message names the settings that differ.
    """
    spec = spec or SyntheticSpec()
    spec.validate()
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
    # a caption's (and a class prompt's) wording is one text, seen by both MCRs' text encoders
    wording = rng.standard_normal((spec.n_shared, spec.rank)) / np.sqrt(spec.rank)
    prompt_wording = rng.standard_normal((spec.classes, spec.rank)) / np.sqrt(spec.rank)
    cap_keys = [f"cap{i:06d}" for i in range(spec.n_shared)]
    pair_keys = [f"pair{i:06d}" for i in range(spec.n_eval)]
    plan = {
        "text_a": (mcr_a, "text", z_shared, wording, cap_keys, None),
        "text_b": (mcr_b, "text", z_shared, wording, cap_keys, None),
        "image_a": (mcr_a, "image", z_mem_a, None, [f"img{i:06d}" for i in range(spec.n_memory_a)], None),
        "audio_b": (mcr_b, "audio", z_mem_b, None, [f"aud{i:06d}" for i in range(spec.n_memory_b)], None),
        "eval_image_a": (mcr_a, "image", z_eval, None, pair_keys, {"label": labels}),
        "eval_audio_b": (mcr_b, "audio", z_eval, None, pair_keys, {"label": labels}),
        "classes_text_a": (mcr_a, "text", centres, prompt_wording, class_names, {"label": class_names}),
        "classes_text_b": (mcr_b, "text", centres, prompt_wording, class_names, {"label": class_names}),
    }
    spec_extra = {"synthetic": dataclasses.asdict(spec)}
    folder = out.parent if out.name == "stores" else out
    paths: dict[str, Path] = {}
    for name, (mcr, modality, z, item, keys, meta) in plan.items():
        path = out / name
        emb = mcr.embed(z, modality, rng, item)  # always drawn, so every store is seed-stable
        paths[name] = path
        with claim_output(path, kind="synthetic store", provenance={"generator": GENERATOR, **spec_extra},
                          overwrite=overwrite, recorded=_synthetic_spec_of, error=StoreMismatchError,
                          hint=f"--overwrite (overwrite=True) starts {folder} over"
                          ) as claim:
            if claim.reuse:
                if Store.open(path, validate="none").num_rows == len(keys):
                    continue
                log.info("%s is incomplete (interrupted run): regenerating it", path)
            clear_output(path)  # an interrupted or started-over store (the claim's lock file stays)
            store = Store.create(path, modality=modality, encoder=mcr.identity, dim=spec.dim, dtype="float32",
                                 extra=spec_extra)
            store.append_part(keys, emb, metadata=meta, source="synthetic")
    return paths


#: The generator named in a synthetic store's provenance (see :func:`generate_synthetic_stores`).
GENERATOR = "cmcr.trainer.synthetic"


def _synthetic_spec_of(path: Path) -> dict[str, Any] | None:
    """The provenance of the synthetic store at ``path`` as :func:`generate_synthetic_stores` compares it:
    ``{"generator", "synthetic": settings}``; ``None`` when nothing is there. A folder that is not a
    readable synthetic store of this generator records ``generator`` as such (refused, never reused)."""
    if not path.is_dir() or not any(p.name != OUTPUT_LOCK for p in path.iterdir()):
        return None  # nothing there (the claim's lock file aside)
    try:
        extra = Store.open(path, validate="none").manifest.get("extra") or {}
    except Exception:  # noqa: BLE001 - anything unreadable counts as "another store"
        extra = {}
    found = extra.get("synthetic")
    if not isinstance(found, dict):
        return {"generator": "(none: not a synthetic store of this generator)"}
    return {"generator": GENERATOR, "synthetic": found}


def project_embeddings(connector: Connector, store: Store) -> np.ndarray:
    """All rows of ``store`` through the connector side that accepts it: ``(N, out_dim)`` float32."""
    side = connector.side_for(store.encoder, store.modality)
    return connector.project(side, store.embeddings(np.float32), identity=store.encoder, modality=store.modality)


@locks_output("out_dir")
def run_synthetic_check(
    out_dir: str | Path,
    spec: SyntheticSpec | None = None,
    config: TrainConfig | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    *,
    progress: bool = False,
    plot: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Generate the synthetic stores, train one connector per variant, score audio->image retrieval.

    Args:
        out_dir: stores go to ``out_dir/stores``, connectors to ``out_dir/<variant>``.
        spec: synthetic sizes (test-size defaults).
        config: base training config (default: :func:`synthetic_config` at ``spec.dim``).
        variants: names from :data:`VARIANTS` (``full``, ``no_completion``, ``no_noise``, ``no_intra``,
            ``plus_audio``, ``plus_image``, ``all_centric``).
        progress: rich progress bars while training.
        plot: also write each variant's ``loss_curve.png`` (off by default: matplotlib costs seconds).
        overwrite: start ``out_dir`` over: remove the stores and variant folders an earlier run with
            other settings left there (only those; nothing else in ``out_dir`` is touched). Without
            it, a rerun with the same settings reuses the stores and retrains the variants.

    Returns:
        One row per variant: ``{"variant", "R@1", "R@5", "R@10", "mAP", "pool", "chance_R@1",
        "chance_R@5", "chance_mAP", "direction", "image_to_audio_R@1", "image_to_audio_mAP",
        "zeroshot_top1", "centric", "seconds"}``.

    Raises:
        ConfigError: an unknown variant, or invalid sizes in ``spec``.
        StoreMismatchError: ``out_dir`` holds stores made with other settings and ``overwrite`` is False.
    """
    import time

    spec = spec or SyntheticSpec()
    spec.validate()
    cfg = config or synthetic_config(spec.dim)
    variants = tuple(dict.fromkeys(variants))  # a variant named twice is trained once (order kept)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                          f"{', '.join(VARIANTS)} (comma-separated, e.g. --variants full,no_noise)")
    out = Path(out_dir)
    if overwrite:
        for name in ("stores", *VARIANTS):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    paths = generate_synthetic_stores(out / "stores", spec, overwrite=overwrite)
    eval_img, eval_aud = Store.open(paths["eval_image_a"]), Store.open(paths["eval_audio_b"])
    cls_b = Store.open(paths["classes_text_b"])
    table = []
    for name in variants:
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
        zs = zeroshot_accuracy(z_aud, labels, z_cls, cls_b.keys())
        table.append({"variant": name, "direction": "audio->image", "R@1": a2i["R@1"], "R@5": a2i["R@5"],
                      "R@10": a2i["R@10"], "mAP": a2i["mAP"], "pool": a2i["pool"],
                      "chance_R@1": a2i["chance"]["R@1"], "chance_R@5": a2i["chance"]["R@5"],
                      "chance_mAP": a2i["chance"]["mAP"], "image_to_audio_R@1": i2a["R@1"],
                      "image_to_audio_mAP": i2a["mAP"], "centric": conn.training.get("centric"),
                      "zeroshot_top1": zs["top1"], "zeroshot_chance": zs["chance"]["top1"],
                      "seconds": round(time.perf_counter() - t0, 2)})
    return table


def synthetic_config(dim: int = 128, **changes: Any) -> TrainConfig:
    """Training config for the synthetic check at embedding width ``dim``: the reference head
    shape scaled to ``dim`` (Linear(dim, 2 dim)-BN-ReLU-Linear(2 dim, dim)-BN), CPU, batch 256,
    10 epochs, and noise σ = 0.025·sqrt(512/dim), which keeps the paper's cos(x, noisy x) ≈ 0.87
    of σ = 0.025 at D = 512 (method.md section 1). ``changes`` override any :class:`TrainConfig` field."""
    base = TrainConfig(hidden_dim=2 * dim, out_dim=dim, epochs=10, batch_size=256, lr=1e-3, val_fraction=0.05,
                       noise_std=round(0.025 * math.sqrt(512 / dim), 6), device="cpu", name_a="mcr-a",
                       name_b="mcr-b", keep_checkpoints=1)
    return base.replace(**changes)
