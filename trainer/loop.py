"""The C-MCR training loop: stores in, connector folder out.

Library entry point :func:`train_connector` (used by ``cmcr connect`` and the demo)::

    from cmcr.trainer.loop import train_connector
    result = train_connector("st/clip_text", "st/clap_text", "st/clip_image", "st/clap_audio",
                             "runs/clip-clap", config=load_config(None, epochs=10))
    result["metrics"]          # final metrics (also in runs/clip-clap/connector.json)

Output folder::

    run.json                               the run's provenance: training settings + store fingerprints
                                           (written first; a rerun with others is refused, see below)
    connector.safetensors, connector.json   the connector (written at the end)
    checkpoints/epoch-NNNN.pt              one per epoch (the newest ``keep_checkpoints`` kept)
    metrics.jsonl                          one JSON line per epoch
    loss_curve.png                         training loss and held-out recall@1 per epoch (written at the end)
    completions/A, completions/B           pseudo embeddings (stores keyed like the shared stores)
    completions/centric-memory_{a,b}/      memory-centric sources' pseudo partners (stores keyed like the
                                           memory; only with ``centric`` naming that memory)

Seeds are recorded; ``resume=True`` continues from the newest checkpoint when the training
settings and the stores' fingerprints are unchanged (``epochs`` may grow). Checkpoints are read
with ``torch.load(weights_only=True)`` only (:mod:`cmcr.safeload`): a corrupt newest checkpoint is
skipped with a warning (the previous one is used), one holding other pickled objects stops the run. A non-finite loss
stops the run with :class:`TrainingError` and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcr.errors import TrainingError
from cmcr.stores.files import (
    atomic_replace,
    atomic_write_bytes,
    canonical_json,
    claim_output,
    locks_output,
    progress_options,
    temp_path,
)
from cmcr.stores.memory import MemoryQueue, resolve_device
from cmcr.stores.store import Store
from cmcr.trainer import losses
from cmcr.trainer.config import TrainConfig
from cmcr.trainer.connector import Connector, SideInfo
from cmcr.trainer.data import (
    ConnectStores,
    PairData,
    batch_rows,
    canonical_centric,
    load_pairs,
    open_connect_stores,
    resolve_centric,
    split_pairs,
    steps_per_epoch,
)
from cmcr.trainer.metrics import retrieval_metrics
from cmcr.trainer.projector import build_projector, projector_architecture

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
#: The run's provenance (:func:`run_provenance`), written before training; a rerun is compared with it.
RUN_FILE = "run.json"


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay from 1 to ``min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _Rows:
    """Row-aligned arrays served as float32 device tensors (whole arrays moved to a CUDA device
    once when they fit comfortably; otherwise gathered per batch from host RAM)."""

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device):
        self.device = device
        on_device = False
        if device.type == "cuda":
            need = sum(a.shape[0] * a.shape[1] * 4 for a in arrays.values())
            free, _ = torch.cuda.mem_get_info(device)
            on_device = need < 0.5 * free
        self.on_device = on_device
        self.arrays: dict[str, Any] = (
            {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(device) for k, v in arrays.items()}
            if on_device else arrays)

    def get(self, name: str, rows: np.ndarray) -> torch.Tensor:
        if self.on_device:
            return self.arrays[name][torch.from_numpy(rows).to(self.device)]
        return torch.from_numpy(np.asarray(self.arrays[name][rows], dtype=np.float32)).to(self.device)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / CHECKPOINT_DIR).glob("epoch-*.pt"))


def _save_checkpoint(folder: Path, state: dict[str, Any], keep: int) -> Path:
    ck = folder / CHECKPOINT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    path = ck / f"epoch-{state['epoch']:04d}.pt"
    tmp = temp_path(path)
    torch.save(state, tmp)
    atomic_replace(tmp, path)
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


_CHECKPOINT_KEYS = ("epoch", "projector_a", "projector_b", "optimizer", "scheduler", "noise_generator",
                    "torch_rng", "config", "stores", "history")


def _load_resume_checkpoint(existing: list[Path], device: torch.device) -> tuple[Path, dict[str, Any]]:
    """The newest readable training checkpoint: ``(path, state)``.

    Checkpoints are read with :func:`cmcr.safeload.load_torch_file` (``weights_only=True``; they
    hold only tensors and plain values, so nothing is allowlisted). A corrupt newest checkpoint
    (truncated, empty, not a torch file, keys missing) is skipped with a warning and the previous
    one is used. A checkpoint that names objects outside the allowlist is *not* skipped: it was
    not written by cmcr, and the run stops with an error naming it.

    Raises:
        TrainingError: a checkpoint holds unsafe objects, or no checkpoint is readable.
    """
    from cmcr.errors import CorruptFileError, UnsafeFileError
    from cmcr.safeload import load_torch_file

    problems = []
    for path in reversed(existing):
        try:
            state = load_torch_file(path, what="training checkpoint", map_location=device)
            missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["(not a dict)"]
            if missing:
                raise CorruptFileError(f"training checkpoint {path} lacks {missing}; it is not a complete cmcr "
                                       f"checkpoint")
        except UnsafeFileError as e:
            raise TrainingError(f"{e}. cmcr writes its checkpoints with tensors and plain values only, so this "
                                f"file was changed or replaced by someone else: delete it (or pass --overwrite) "
                                f"and rerun") from None
        except CorruptFileError as e:
            problems.append(str(e))
            older = [p for p in existing if p < path]
            log.warning("%s; %s", e, f"resuming from the previous checkpoint {older[-1].name}" if older else
                        "no older checkpoint is left")
            continue
        return path, state
    raise TrainingError(f"no readable checkpoint in {existing[0].parent} ({'; '.join(problems)}); pass --overwrite to "
                        f"start over")


def _write_history(folder: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_bytes(folder / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path) -> None:
    """Write a PNG of the per-epoch losses (and held-out recall@1 when recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in ("loss", "inter_shared", "inter_pseudo", "intra"):
        vals = [r.get(name) for r in history]
        if any(v for v in vals):
            ax.plot(epochs, vals, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    val = [r.get("val_shared_R@1") for r in history]
    if any(v is not None for v in val):
        ax2 = ax.twinx()
        ax2.plot(epochs, val, color="black", linestyle="--", label="held-out shared R@1")
        ax2.set_ylabel("held-out recall@1")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("C-MCR training")
    fig.tight_layout()
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _validate(proj_a: torch.nn.Module, proj_b: torch.nn.Module, data: PairData, rows: np.ndarray,
              device: torch.device) -> dict[str, float]:
    """Held-out metrics: A->B recall@1 / mAP of the shared pairs (and of the pseudo pairs)."""
    if len(rows) < 2:
        return {}
    out: dict[str, float] = {}
    proj_a.eval()
    proj_b.eval()
    pairs = [("shared", data.s_a, data.s_b)]
    if data.p_a is not None and data.p_b is not None:
        pairs.append(("pseudo", data.p_a, data.p_b))
    with torch.no_grad():
        for name, xa, xb in pairs:
            za = proj_a(torch.from_numpy(np.asarray(xa[rows], dtype=np.float32)).to(device)).cpu().numpy()
            zb = proj_b(torch.from_numpy(np.asarray(xb[rows], dtype=np.float32)).to(device)).cpu().numpy()
            m = retrieval_metrics(za, zb, list(range(len(rows))), list(range(len(rows))), ks=(1, 5))
            out[f"val_{name}_R@1"] = m["R@1"]
            out[f"val_{name}_mAP"] = m["mAP"]
    proj_a.train()
    proj_b.train()
    return out


@locks_output("out_dir")
def train_connector(
    shared_a: Store | str | Path,
    shared_b: Store | str | Path,
    memory_a: Store | str | Path,
    memory_b: Store | str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    plot: bool = True,
) -> dict[str, Any]:
    """Train a C-MCR connector from four stores and write it to ``out_dir``.

    Steps: :func:`plan_training_run` (stores, output claim, seeds, resume checkpoint) ->
    :func:`execute_training` (pairs, projectors, the epochs) -> :func:`publish_connector`.

    Args:
        shared_a, shared_b: the shared modality encoded by MCR A and MCR B (joined by key).
        memory_a, memory_b: each MCR's memory (its other modality), same encoder as its shared store.
        out_dir: output folder (see the module docstring).
        config: a :class:`TrainConfig` (defaults from method.md when ``None``).
        resume: continue from the newest checkpoint in ``out_dir``.
        overwrite: start over: discard an earlier run in ``out_dir`` (checkpoints, metrics, completions,
            connector), whatever its settings (the one meaning of ``--overwrite``).
        progress: ``True`` for a rich progress bar (loss, pairs/s), or a callable receiving one
            dict per step (``epoch``, ``step``, ``loss``, ``pairs_per_s``).
        plot: write ``loss_curve.png`` (matplotlib) at the end; ``False`` skips it (ablation
            sweeps, tests).

    Returns:
        ``{"connector": path, "metrics": final metrics, "history": per-epoch rows, "data": join
        report, "config": config dict, "device": str}``.

    Raises:
        StoreMismatchError: the stores do not form a valid setting (see :func:`open_connect_stores`).
        TrainingError: a non-finite loss (last good checkpoint kept), a resume that does not match
            the checkpoint, or an earlier run in ``out_dir`` without ``resume``/``overwrite``, or one with
            other settings or stores (``run.json``; the message names the fields) without ``overwrite``.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    stores, cfg, device, resumed = plan_training_run(shared_a, shared_b, memory_a, memory_b, out, cfg,
                                                     resume=resume, overwrite=overwrite)
    trained = execute_training(stores, out, cfg, device, resumed, resume=resume, progress=progress, plot=plot)
    return publish_connector(out, stores, cfg, device, **trained)


def plan_training_run(
    shared_a: Store | str | Path,
    shared_b: Store | str | Path,
    memory_a: Store | str | Path,
    memory_b: Store | str | Path,
    out: Path,
    cfg: TrainConfig,
    *,
    resume: bool,
    overwrite: bool,
) -> tuple[ConnectStores, TrainConfig, torch.device, tuple[Path, dict[str, Any]] | None]:
    """Plan step of :func:`train_connector`: open the four stores, name the sources of pairs
    canonically (``cfg.centric``), claim ``out`` (``run.json``; an
    earlier run of other settings is refused, ``overwrite`` starts over), seed, and read the resume
    checkpoint (before the slow data loading, so an unsafe or unreadable file stops the run at once).

    Returns:
        ``(stores, cfg, device, resumed)``: ``cfg`` with its centric sources by canonical name;
        ``resumed`` is ``(checkpoint path, state)`` or ``None``.
    """
    stores = open_connect_stores(shared_a, shared_b, memory_a, memory_b)
    # the sources of pairs by their canonical names ("shared" -> "text"), so run.json, checkpoints and the
    # connector record what was used and a rerun or resume with other sources is refused
    cfg = cfg.replace(**canonical_centric(resolve_centric(stores, cfg)))
    with claim_output(out, kind="connector run", provenance=run_provenance(cfg, stores), overwrite=overwrite,
                      record=RUN_FILE, error=TrainingError,
                      hint="--resume continues only a run with the same settings and stores (epochs and device may "
                           "change)") as claim:
        pass  # decided; ``locks_output`` holds the lock for the whole run
    out.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(out)
    if existing and not resume:
        if not overwrite:
            raise TrainingError(
                f"{out} already holds a training run with these settings (last checkpoint {existing[-1].name}); "
                f"pass --resume to continue it or --overwrite to start over "
                f"(library: resume=True / overwrite=True)"
            )
        # a run from before run.json was recorded: the claim had nothing to start over
        shutil.rmtree(out / CHECKPOINT_DIR)
        (out / METRICS_FILE).unlink(missing_ok=True)
        existing = []
    claim.publish()  # run.json first: a rerun after a crash is compared with it
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    # read the checkpoint before the (slow) data loading: an unsafe or unreadable file stops the run at once
    resumed = _load_resume_checkpoint(existing, device) if resume and existing else None
    return stores, cfg, device, resumed


def execute_training(stores: ConnectStores, out: Path, cfg: TrainConfig, device: torch.device,
                     resumed: tuple[Path, dict[str, Any]] | None, *, resume: bool,
                     progress: bool | Callable[[dict[str, Any]], None], plot: bool) -> dict[str, Any]:
    """Execute step of :func:`train_connector`: load the pairs (completions), build the projectors and
    the optimiser, restore a resumed run, and train epoch by epoch (a checkpoint and ``metrics.jsonl``
    per epoch, the loss curve at the end).

    Returns:
        ``{"proj_a", "proj_b", "data", "history", "train_rows", "val_rows", "warnings"}``.

    Raises:
        TrainingError: a non-finite loss, too few pairs, or a checkpoint that does not match.
    """
    reporter = _Reporter(progress)
    queue = cfg.completion == "queue"  # the queue completes per batch: no precomputed shared-centric completion
    reporter.completion_sides = sum((0 if queue else 2) if s.role == "shared" else (1 if queue else 2)
                                    for s in resolve_centric(stores, cfg)) if cfg.use_completion else 0
    data = load_pairs(stores, cfg, out, progress=reporter.completion if progress else None)
    train_rows, val_rows = split_pairs(len(data), cfg)
    if len(train_rows) < 2:
        raise TrainingError(f"only {len(train_rows)} training pair(s) after the held-out split; need >= 2")
    arrays = {"s_a": data.s_a, "s_b": data.s_b}
    if data.p_a is not None and data.p_b is not None:
        arrays.update(p_a=data.p_a, p_b=data.p_b)
    for src in data.sources:
        if len(src) < 2:
            raise TrainingError(f"the {src.source.name}-centric source has {len(src)} memory row(s); need >= 2")
        arrays.update({f"{src.source.role}:{k}": v for k, v in
                       (("s_a", src.s_a), ("s_b", src.s_b), ("p_a", src.p_a), ("p_b", src.p_b)) if v is not None})
    rows = _Rows(arrays, device)
    schedule = _Schedule(data, train_rows, cfg)

    dim_a, dim_b = stores.shared_a.dim, stores.shared_b.dim
    proj_a = build_projector(dim_a, cfg).to(device)
    proj_b = build_projector(dim_b, cfg).to(device)
    params = list(proj_a.parameters()) + list(proj_b.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_steps = schedule.steps_per_epoch
    total_steps = cfg.epochs * n_steps
    warnings = few_steps_warning(schedule.largest, cfg.batch_size, cfg.epochs)
    for w in warnings:
        log.warning("%s", w)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(cfg.seed)
    store_info = stores.describe()
    history: list[dict[str, Any]] = []
    start_epoch = 0

    if resumed is not None:
        ckpt_path, ckpt = resumed
        old_cfg = dict(ckpt["config"])
        if "centric" not in old_cfg:  # a checkpoint from before the centric sources: shared pairs only
            old_cfg.update(centric=stores.shared_modality, centric_weights={stores.shared_modality: 1.0})
        if (old_cfg.get("centric"), old_cfg.get("centric_weights")) != (cfg.centric, cfg.centric_weights):
            raise TrainingError(
                f"{ckpt_path}: the checkpoint was trained with the sources of pairs centric={old_cfg.get('centric')!r} "
                f"(weights {old_cfg.get('centric_weights')}), this run asks for centric={cfg.centric!r} (weights "
                f"{cfg.centric_weights}); resume with the same --centric / centric_weights, or pass --overwrite"
            )
        if canonical_json(old_cfg) != canonical_json(cfg.training_fields()):
            raise TrainingError(
                f"{ckpt_path}: the checkpoint was trained with other settings {canonical_json(ckpt['config'])}; "
                f"resume with the same config (only epochs/device may change) or pass --overwrite"
            )
        old_fp = {k: v["fingerprint"] for k, v in ckpt["stores"].items()}
        new_fp = {k: v["fingerprint"] for k, v in store_info.items()}
        if old_fp != new_fp:
            raise TrainingError(f"{ckpt_path}: the stores changed since the checkpoint ({old_fp} -> {new_fp}); "
                                f"resume needs the same stores, or pass --overwrite")
        proj_a.load_state_dict(ckpt["projector_a"])
        proj_b.load_state_dict(ckpt["projector_b"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        noise_gen.set_state(ckpt["noise_generator"].to("cpu") if device.type == "cpu" else ckpt["noise_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt["history"])
        _write_history(out, history)
        log.info("resuming from %s (epoch %d of %d)", ckpt_path, start_epoch, cfg.epochs)
    elif resume:
        log.info("no checkpoint in %s: starting a new run", out)

    queues: dict[str, MemoryQueue] = {}
    if cfg.use_completion and cfg.completion == "queue":
        queues = {"A": MemoryQueue(stores.memory_a, cfg.queue_capacity, device=device, seed=cfg.seed),
                  "B": MemoryQueue(stores.memory_b, cfg.queue_capacity, device=device, seed=cfg.seed + 1)}

    proj_a.train()
    proj_b.train()
    reporter.start(total_steps, start_epoch * n_steps)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "inter_shared": 0.0, "inter_pseudo": 0.0, "intra": 0.0}
            if schedule.multi:
                sums.update({f"loss_{src.name}": 0.0 for src in data.centric})
            seen = 0
            for step in range(n_steps):
                loss: torch.Tensor | None = None
                parts: dict[str, float] = {}
                n_rows = 0
                for src, idx in schedule.batches(epoch * n_steps + step):
                    prefix = "" if src.role == "shared" else f"{src.role}:"
                    s_a, s_b = rows.get(prefix + "s_a", idx), rows.get(prefix + "s_b", idx)
                    p_a = rows.get(prefix + "p_a", idx) if prefix + "p_a" in rows.arrays else None
                    p_b = rows.get(prefix + "p_b", idx) if prefix + "p_b" in rows.arrays else None
                    if queues:  # complete the missing pseudo side(s) against the memory queues, per batch
                        if p_a is None:
                            p_a = queues["A"].complete(s_a, cfg.memory_temperature)
                            queues["A"].advance(len(idx))
                        if p_b is None:
                            p_b = queues["B"].complete(s_b, cfg.memory_temperature)
                            queues["B"].advance(len(idx))
                    src_loss, src_parts = losses.cmcr_loss(
                        proj_a, proj_b, s_a, s_b, p_a, p_b, temperature=cfg.temperature, noise_std=cfg.noise_std,
                        intra_weight=cfg.intra_weight, generator=noise_gen)
                    loss = src.weight * src_loss if loss is None else loss + src.weight * src_loss
                    for k in ("inter_shared", "inter_pseudo", "intra", "loss"):
                        parts[k] = parts.get(k, 0.0) + src.weight * src_parts[k]
                    if schedule.multi:
                        parts[f"loss_{src.name}"] = src_parts["loss"]
                    n_rows = max(n_rows, len(idx))
                assert loss is not None
                if not math.isfinite(parts["loss"]):
                    last = _checkpoints(out)
                    # --resume only continues with unchanged settings (and would meet the same loss): the fix is
                    # new settings, i.e. a run started over (or in another --out)
                    rerun = ("rerun with --overwrite (it starts over; --resume needs unchanged settings and would "
                             "reach the same loss) or with another --out" if last else "rerun")
                    raise TrainingError(
                        f"non-finite loss ({parts}) at epoch {epoch + 1}, step {step + 1}; training stopped. The last "
                        f"good checkpoint is {last[-1] if last else 'none (first epoch)'}. Lower the learning rate "
                        f"(lr={cfg.lr}) or raise the temperature (temperature={cfg.temperature}), then {rerun}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k in sums:
                    sums[k] += parts[k] * n_rows
                seen += n_rows
                reporter.step(epoch + 1, cfg.epochs, parts["loss"], seen / max(time.perf_counter() - t0, 1e-9))
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch + 1, **{k: v / seen for k, v in sums.items()},
                                   "lr": scheduler.get_last_lr()[0], "pairs": seen, "seconds": round(seconds, 4),
                                   "pairs_per_s": seen / max(seconds, 1e-9)}
            row.update(_validate(proj_a, proj_b, data, val_rows, device))
            history.append(row)
            _save_checkpoint(out, {
                "epoch": epoch + 1, "projector_a": proj_a.state_dict(), "projector_b": proj_b.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "noise_generator": noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "config": cfg.training_fields(), "stores": store_info, "history": history,
            }, cfg.keep_checkpoints)
            _write_history(out, history)
    finally:
        reporter.stop()
        if history and plot:  # also after a failure: the curve up to the last good epoch
            plot_loss_curve(history, out / LOSS_CURVE)
    return {"proj_a": proj_a, "proj_b": proj_b, "data": data, "history": history, "train_rows": train_rows,
            "val_rows": val_rows, "warnings": warnings}


def publish_connector(out: Path, stores: ConnectStores, cfg: TrainConfig, device: torch.device, *,
                      proj_a: torch.nn.Module, proj_b: torch.nn.Module, data: PairData,
                      history: list[dict[str, Any]], train_rows: np.ndarray, val_rows: np.ndarray,
                      warnings: list[str]) -> dict[str, Any]:
    """Publish step of :func:`train_connector`: the final metrics and the connector (weights, then
    ``connector.json``, atomically); returns :func:`train_connector`'s result."""
    final = dict(history[-1]) if history else {}
    final["val_pairs"] = int(len(val_rows))
    final["train_pairs"] = int(len(train_rows))
    connector = make_connector(proj_a, proj_b, stores, cfg, data, final)
    connector.save(out)
    return {"connector": str(out), "fingerprint": connector.fingerprint, "metrics": final, "history": history,
            "data": data.join, "config": cfg.to_dict(), "device": str(device), "warnings": warnings}


class _Schedule:
    """Which rows of which source each optimiser step trains on (deterministic, so a resumed run
    sees the same batches).

    Every step takes one batch from every source in ``data.centric`` (the loss is the weighted sum
    of the per-source C-MCR losses). An epoch is one pass over the shared pairs when they are a
    source (so ``epochs`` means what it means for C-MCR, and a memory much larger than the caption
    set does not lengthen the epoch), else over the largest memory source; every other source
    cycles through its rows at its own pace, reshuffled on each of its passes. The shared source's
    batches are exactly those of a run with the shared pairs only (:func:`batch_rows` seeded by
    ``(seed, pass)``).
    """

    def __init__(self, data: PairData, train_rows: np.ndarray, cfg: TrainConfig):
        self.batch_size = cfg.batch_size
        self.entries: list[tuple[Any, np.ndarray, int, int]] = []  # (source, rows, seed, steps per pass)
        extra = 0
        memory = {s.source.role: s for s in data.sources}
        for src in data.centric:
            if src.role == "shared":
                rows, seed = train_rows, cfg.seed
            else:
                extra += 1
                rows, seed = np.arange(len(memory[src.role]), dtype=np.int64), cfg.seed + 1_000_003 * extra
            self.entries.append((src, rows, seed, steps_per_epoch(len(rows), cfg.batch_size)))
        lead = next((e for e in self.entries if e[0].role == "shared"), None) or max(self.entries,
                                                                                   key=lambda e: len(e[1]))
        self.largest = len(lead[1])  # rows of the source that defines an epoch
        self.steps_per_epoch = lead[3]
        self.multi = len(self.entries) > 1 or self.entries[0][0].role != "shared"
        self._cache: dict[tuple[int, int], list[np.ndarray]] = {}

    def batches(self, global_step: int) -> list[tuple[Any, np.ndarray]]:
        """``[(source, rows)]`` of step ``global_step`` (0-based over the whole run)."""
        out = []
        for i, (src, rows, seed, per_pass) in enumerate(self.entries):
            p, j = divmod(global_step, per_pass)
            if (i, p) not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != i}  # one pass per source held
                self._cache[(i, p)] = list(batch_rows(rows, self.batch_size, seed, p))
            out.append((src, self._cache[(i, p)][j]))
        return out


def run_provenance(cfg: TrainConfig, stores: ConnectStores) -> dict[str, Any]:
    """What a connector run is derived from (``run.json``; compared by the output claim): the training
    settings that must not change on ``--resume`` (:meth:`TrainConfig.training_fields`) and the four
    stores' fingerprints."""
    return {"training": cfg.training_fields(),
            "stores": {k: v["fingerprint"] for k, v in stores.describe().items()}}


#: Fewer optimiser steps per epoch than this draws a warning (see :func:`few_steps_warning`).
MIN_STEPS_PER_EPOCH = 4


def few_steps_warning(n_train: int, batch_size: int, epochs: int) -> list[str]:
    """A warning when the batch is so large against the training pairs that an epoch is only a
    step or two (e.g. batch 4096 on 3,500 captions: one step per epoch, ``epochs`` steps in all)."""
    steps = steps_per_epoch(n_train, batch_size)
    if steps >= MIN_STEPS_PER_EPOCH:
        return []
    suggest = max(2, 2 ** int(math.log2(max(2, n_train // (2 * MIN_STEPS_PER_EPOCH)))))
    return [f"batch size {batch_size} against {n_train} training pairs makes {steps} optimiser step(s) per epoch "
            f"({steps * epochs} in all): the projectors barely train. Pass --batch-size {suggest} (or smaller), or "
            f"many more --epochs"]


def make_connector(proj_a: torch.nn.Module, proj_b: torch.nn.Module, stores: ConnectStores, cfg: TrainConfig,
                   data: PairData, metrics: dict[str, Any]) -> Connector:
    """Wrap trained projectors (moved to CPU, eval mode) and their provenance in a :class:`Connector`."""
    shared = stores.shared_modality
    sides = {
        "A": SideInfo(mcr=cfg.name_a, encoder=stores.shared_a.encoder,
                      modalities=[shared, stores.memory_a.modality], input_dim=stores.shared_a.dim,
                      shared_modality=shared),
        "B": SideInfo(mcr=cfg.name_b, encoder=stores.shared_b.encoder,
                      modalities=[shared, stores.memory_b.modality], input_dim=stores.shared_b.dim,
                      shared_modality=shared),
    }
    arch = {"A": projector_architecture(stores.shared_a.dim, cfg),
            "B": projector_architecture(stores.shared_b.dim, cfg)}
    centric = [{**s.to_json(), "rows": int(metrics.get("train_pairs", len(data)))} for s in data.centric
               if s.role == "shared"] + [s.describe() for s in data.sources]
    return Connector(sides=sides, projectors={"A": proj_a.cpu().eval(), "B": proj_b.cpu().eval()},
                     architecture=arch,
                     training={**cfg.to_dict(), "centric_sources": centric, "torch": torch.__version__},
                     stores=stores.describe(), metrics=metrics, data=data.join)


class _Reporter:
    """Rich progress bar (the last step's loss, labelled "step loss"; pairs/s), or a user callback, or nothing."""

    def __init__(self, progress: bool | Callable[[dict[str, Any]], None]):
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.task = None
        self.comp_bar: Any = None
        self.comp_tasks: dict[str, Any] = {}
        self.completion_sides = 2  # bars to show before the completion display stops (set by the loop)
        self.comp_started: dict[str, tuple[float, float]] = {}  # side -> (start, last plain line)
        self.comp_plain = False  # completion progress as plain lines (stderr is not a terminal)
        if progress is True:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("step loss {task.fields[loss]:.4f}"),
                                TextColumn("{task.fields[rate]:,.0f} pairs/s"), TimeRemainingColumn(),
                                **progress_options())

    def completion(self, side: str, done: int, total: int) -> None:
        """Progress of the semantic completion of one side: a rich bar on stderr (queries done,
        queries/s, time left), one per side, or the user callback."""
        if self.callback:
            self.callback({"stage": "completion", "side": side, "done": done, "total": total})
            return
        if self.bar is None:
            return
        if self.comp_bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class QueriesPerSecond(ProgressColumn):
                def render(self, task):  # noqa: ANN001, ANN202
                    return Text(f"{task.speed:,.0f} queries/s" if task.speed else "? queries/s")

            self.comp_bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     QueriesPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(),
                                     **progress_options())
            self.comp_plain = not self.comp_bar.console.is_terminal and not self.comp_bar.disable
            if self.comp_plain:  # the plain lines below replace the bar (rich would draw it once more at the end)
                self.comp_bar.disable = True
            self.comp_bar.start()
        if side not in self.comp_tasks:
            self.comp_tasks[side] = self.comp_bar.add_task(f"completion {side}", total=total)
            self.comp_started[side] = (time.perf_counter(), 0.0)
        self.comp_bar.update(self.comp_tasks[side], completed=done, total=total)
        if self.comp_plain:
            # stderr is a log file or a pipe: rich draws nothing until the end, so print a plain line
            # at most every 10 s and at the end of each side
            t0, last = self.comp_started[side]
            now = time.perf_counter()
            if now - last >= 10.0 or done >= total:
                self.comp_started[side] = (t0, now)
                rate = done / max(now - t0, 1e-9)
                self.comp_bar.console.print(
                    f"completion {side}: {done:,}/{total:,} queries ({100 * done / max(total, 1):.0f} %), "
                    f"{rate:,.0f} queries/s, {now - t0:.0f} s elapsed", highlight=False, soft_wrap=True)
        if all(t.finished for t in self.comp_bar.tasks) and len(self.comp_tasks) >= self.completion_sides:
            self.comp_bar.stop()

    def start(self, total: int, done: int) -> None:
        if self.comp_bar is not None:
            self.comp_bar.stop()
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("training", total=total, completed=done, loss=float("nan"), rate=0.0)

    def step(self, epoch: int, epochs: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"epoch {epoch}/{epochs}", loss=loss, rate=rate)
        elif self.callback:
            self.callback({"stage": "train", "epoch": epoch, "loss": loss, "pairs_per_s": rate})

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
