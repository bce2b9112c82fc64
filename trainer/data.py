"""Training data of a connector, read straight from stores (no encoder is loaded).

The four stores of ``cmcr connect`` (method.md, "Data"):

* ``shared_a`` / ``shared_b`` — the shared modality (captions for CLIP+CLAP, images for
  CLIP+ULIP) encoded by MCR A and MCR B, joined **by key** (:func:`cmcr.stores.join_by_key`);
  keys on one side only are reported, never silently paired.
* ``memory_a`` / ``memory_b`` — the other modality of each MCR (CLIP images, CLAP audio), from
  the same encoder as that MCR's shared store.

Pseudo embeddings (semantic completion) are computed once per memory with
:func:`cmcr.stores.memory.complete_store` and cached under ``<out>/completions/{A,B}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import StoreMismatchError, TrainingError
from cmcr.stores.memory import complete_store
from cmcr.stores.store import Store, canonical_json, join_by_key, same_encoder
from cmcr.trainer.config import TrainConfig
from cmcr.trainer.connector import is_projected

log = logging.getLogger(__name__)

STORE_ROLES = ("shared_a", "shared_b", "memory_a", "memory_b")


@dataclass
class ConnectStores:
    """The four opened and cross-checked training stores."""

    shared_a: Store
    shared_b: Store
    memory_a: Store
    memory_b: Store

    @property
    def shared_modality(self) -> str:
        return self.shared_a.modality

    def describe(self) -> dict[str, Any]:
        """Per role: path, fingerprint, rows, modality, encoder identity (recorded in the connector)."""
        return {role: {"path": str(s.path), "fingerprint": s.fingerprint(), "rows": s.num_rows,
                       "modality": s.modality, "encoder": s.encoder, "dim": s.dim}
                for role, s in zip(STORE_ROLES, (self.shared_a, self.shared_b, self.memory_a, self.memory_b),
                                   strict=True)}


def as_store(x: Store | str | os.PathLike) -> Store:
    """``x`` itself when it is a :class:`Store`, else the store opened at that path."""
    return x if isinstance(x, Store) else Store.open(x)


def open_connect_stores(shared_a: Store | str | Path, shared_b: Store | str | Path,
                        memory_a: Store | str | Path, memory_b: Store | str | Path) -> ConnectStores:
    """Open the four stores and check that they form a valid C-MCR setting.

    Raises:
        StoreMismatchError: the shared stores hold different modalities or come from the same
            encoder; a memory comes from another encoder (or dim) than its MCR's shared store,
            or holds the shared modality; a store is a pseudo (completion) or projected store.
    """
    sa, sb, ma, mb = (as_store(x) for x in (shared_a, shared_b, memory_a, memory_b))
    for role, s in zip(STORE_ROLES, (sa, sb, ma, mb), strict=True):
        if (s.manifest.get("extra") or {}).get("pseudo"):
            raise StoreMismatchError(f"{s.path} ({role}) holds pseudo embeddings (a completion store); pass the "
                                     f"store of real embeddings")
        if is_projected(s.encoder):
            raise StoreMismatchError(f"{s.path} ({role}) was projected by a connector; pass a raw encoder store")
        if s.num_rows == 0:
            raise StoreMismatchError(f"{s.path} ({role}) is empty")
    if sa.modality != sb.modality:
        raise StoreMismatchError(
            f"the shared stores must hold the same modality: {sa.path} holds {sa.modality!r}, {sb.path} holds "
            f"{sb.modality!r} (e.g. CLIP text and CLAP text of the same captions)"
        )
    if same_encoder(sa.encoder, sb.encoder):
        raise StoreMismatchError(
            f"{sa.path} and {sb.path} come from the same encoder {canonical_json(sa.encoder)}; C-MCR connects two "
            f"different MCRs — encode the shared corpus with each MCR"
        )
    for side, shared, memory in (("A", sa, ma), ("B", sb, mb)):
        if not same_encoder(memory.encoder, shared.encoder):
            raise StoreMismatchError(
                f"memory store {memory.path} of MCR {side} was made by encoder {canonical_json(memory.encoder)}, but "
                f"MCR {side}'s shared store {shared.path} by {canonical_json(shared.encoder)}; the memory must come "
                f"from the same MCR"
            )
        if memory.modality == shared.modality:
            raise StoreMismatchError(
                f"memory store {memory.path} of MCR {side} holds {memory.modality!r}, the shared modality; the memory "
                f"holds the MCR's other modality (e.g. image for CLIP, audio for CLAP)"
            )
        if memory.dim != shared.dim:
            raise StoreMismatchError(f"memory store {memory.path} has dim {memory.dim}, {shared.path} has {shared.dim}")
    return ConnectStores(sa, sb, ma, mb)


@dataclass
class PairData:
    """Row-aligned training tensors (row i of each array belongs to shared key ``keys[i]``).

    Attributes:
        s_a, s_b: ``(N, D_A)`` / ``(N, D_B)`` shared embeddings (store dtype, float16 or float32).
        p_a, p_b: ``(N, D_A)`` / ``(N, D_B)`` float32 pseudo embeddings, or ``None`` (no completion
            or on-the-fly completion from a memory queue).
        join: counts of the key join (``pairs``, ``only_a``, ``only_b``, and up to 10 example keys).
    """

    keys: list[str]
    s_a: np.ndarray
    s_b: np.ndarray
    p_a: np.ndarray | None = None
    p_b: np.ndarray | None = None
    join: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def load_pairs(stores: ConnectStores, cfg: TrainConfig, work_dir: str | Path,
               progress: Callable[[str, int, int], None] | None = None) -> PairData:
    """Join the shared stores by key and attach the pseudo embeddings (computed once, cached).

    Args:
        stores: from :func:`open_connect_stores`.
        cfg: uses ``use_completion``, ``completion``, ``memory_temperature``, ``completion_topk``, ``device``.
        work_dir: completions go to ``work_dir/completions/{A,B}`` (reused when up to date).
        progress: optional ``progress(side, done_rows, total_rows)``.

    Raises:
        TrainingError: fewer than 2 keys are shared by the two shared stores.
    """
    join = join_by_key(stores.shared_a, stores.shared_b)
    report = {"pairs": len(join.keys), "only_a": len(join.only_left), "only_b": len(join.only_right),
              "only_a_examples": join.only_left[:10], "only_b_examples": join.only_right[:10]}
    if join.only_left or join.only_right:
        log.warning("shared stores: %s (examples only in A: %s, only in B: %s)", join.summary(),
                    join.only_left[:3], join.only_right[:3])
    if len(join.keys) < 2:
        raise TrainingError(
            f"the shared stores {stores.shared_a.path} and {stores.shared_b.path} have {len(join.keys)} key(s) in "
            f"common; training needs at least 2 pairs — encode the same corpus (same keys) with both MCRs"
        )
    s_a = stores.shared_a.embeddings()[join.rows_left]
    s_b = stores.shared_b.embeddings()[join.rows_right]
    data = PairData(keys=join.keys, s_a=s_a, s_b=s_b, join=report)
    if cfg.use_completion and cfg.completion in ("exact", "topk"):
        work = Path(work_dir) / "completions"
        for side, shared, memory, rows in (("A", stores.shared_a, stores.memory_a, join.rows_left),
                                            ("B", stores.shared_b, stores.memory_b, join.rows_right)):
            cb = (lambda d, t, s=side: progress(s, d, t)) if progress else None
            comp = complete_store(shared, memory, work / side, method=cfg.completion,
                                  temperature=cfg.memory_temperature, k=cfg.completion_topk, device=cfg.device,
                                  progress=cb)
            if comp.num_rows != shared.num_rows:
                raise TrainingError(
                    f"completion store {comp.path} has {comp.num_rows} rows, expected {shared.num_rows}")
            pseudo = comp.embeddings(np.float32)[rows]  # keyed like the shared store, same row order
            if side == "A":
                data.p_a = pseudo
            else:
                data.p_b = pseudo
    return data


def split_pairs(n: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)`` int64: a seeded held-out split of the shared pairs (model
    selection data the training never sees; empty when fewer than 2 rows would be held out)."""
    rng = np.random.default_rng([cfg.seed, 7919])
    perm = rng.permutation(n)
    n_val = min(int(n * cfg.val_fraction), cfg.val_max)
    if n_val < 2 or n - n_val < 2:
        return np.sort(perm), np.empty(0, dtype=np.int64)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def batch_rows(rows: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Shuffled batches of ``rows`` for one epoch (seeded by ``(seed, epoch)``).

    A final batch of one row is merged into the previous batch: BatchNorm cannot train on one
    row and InfoNCE needs negatives. Yields ``(b,) int64`` arrays, b >= 2 whenever len(rows) >= 2.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rows[rng.permutation(len(rows))]
    bounds = list(range(0, len(perm), batch_size)) + [len(perm)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        yield perm[s:e]


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Number of batches :func:`batch_rows` yields for ``n_rows`` rows."""
    steps = -(-n_rows // batch_size)
    if steps > 1 and n_rows % batch_size == 1:
        steps -= 1
    return steps
