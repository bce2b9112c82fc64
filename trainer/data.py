"""Training data of a connector, read straight from stores (no encoder is loaded).

The four stores of ``cmcr connect`` (method.md, "Data"):

* ``shared_a`` / ``shared_b`` — the shared modality (captions for CLIP+CLAP, images for
  CLIP+ULIP) encoded by MCR A and MCR B, joined **by key** (:func:`cmcr.stores.join_by_key`);
  keys on one side only are reported, never silently paired.
* ``memory_a`` / ``memory_b`` — the other modality of each MCR (CLIP images, CLAP audio), from
  the same encoder as that MCR's shared store.

Pseudo embeddings (semantic completion) are computed once per memory with
:func:`cmcr.stores.memory.complete_store` and cached under ``<out>/completions/{A,B}``.

Sources of pairs (``TrainConfig.centric``, method.md "Memory-centric pseudo pairs"): the
*shared-centric* pairs above (C-MCR's caption-centric pairs) and, per memory, *memory-centric*
pairs built around that memory's real rows (:func:`resolve_centric`, :class:`SourceData`), cached
under ``<out>/completions/centric-memory_{a,b}/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, StoreMismatchError, TrainingError
from cmcr.stores.memory import complete_paired_store, complete_store
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


#: Roles of the sources of training pairs: the shared modality and each MCR's memory.
CENTRIC_ROLES = ("shared", "memory_a", "memory_b")


@dataclass(frozen=True)
class CentricSource:
    """One source of training pairs: ``name`` (the modality, e.g. ``text``, ``audio``), ``role``
    (one of :data:`CENTRIC_ROLES`) and its loss ``weight``."""

    name: str
    role: str
    weight: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "weight": self.weight}


def resolve_centric(stores: ConnectStores, cfg: TrainConfig) -> list[CentricSource]:
    """The sources named by ``cfg.centric`` for these stores, in the order shared, memory A, memory B.

    A source is named by its modality (``text``: the shared modality of CLIP+CLAP; ``audio``,
    ``image``: the memories; for CLIP+ULIP ``image`` is shared and ``text``, ``3d`` are the
    memories) or by its role (``shared``, ``memory_a``, ``memory_b``). Weights come from
    ``cfg.centric_weights`` (same names; missing = 1.0).

    Raises:
        ConfigError: an unknown name, a name given twice, a modality name both memories hold
            (use ``memory_a`` / ``memory_b``), a weight of 0 for a source in use, a weight for an
            unknown name, or a memory-centric source with ``use_completion = false``.
    """
    by_role = {"shared": stores.shared_modality, "memory_a": stores.memory_a.modality,
               "memory_b": stores.memory_b.modality}
    names: dict[str, str] = {}  # accepted name -> role
    for role, modality in by_role.items():
        names[role] = role
        if modality in names and names[modality] != role:
            names[modality] = ""  # ambiguous: both memories hold this modality
        else:
            names[modality] = role
    hint = (f"sources here: {by_role['shared']} (shared), {by_role['memory_a']} (memory A), {by_role['memory_b']} "
            f"(memory B); or by role: shared, memory_a, memory_b")

    def role_of(name: str, what: str) -> str:
        role = names.get(name)
        if role is None:
            raise ConfigError(f"{what} {name!r} is not a source of these stores; {hint}")
        if role == "":
            raise ConfigError(f"{what} {name!r} is ambiguous: both memories hold {name}; use memory_a or memory_b")
        return role

    roles = [role_of(n, "centric source") for n in cfg.centric_names()]
    if len(set(roles)) != len(roles):
        raise ConfigError(f"centric={cfg.centric!r} names a source twice; {hint}")
    weights: dict[str, float] = {}
    for n, w in cfg.centric_weights.items():
        weights[role_of(n, "centric_weights key")] = float(w)
    out = []
    for role in CENTRIC_ROLES:
        if role not in roles:
            continue
        w = weights.get(role, 1.0)
        if w <= 0:
            raise ConfigError(f"centric_weights gives source {by_role[role]!r} weight {w}; drop it from centric "
                              f"instead of weighting it 0")
        out.append(CentricSource(by_role[role], role, w))
    if not cfg.use_completion and any(s.role != "shared" for s in out):
        raise ConfigError("use_completion = false (--no-completion) trains on the shared pairs only; memory-centric "
                          "sources are completions: drop them from centric (--centric shared)")
    return out


def canonical_centric(sources: list[CentricSource]) -> dict[str, Any]:
    """The config values that name ``sources`` canonically: ``{"centric": "text,audio",
    "centric_weights": {"text": 1.0, "audio": 1.0}}`` (recorded in checkpoints and connectors, so a
    run with other sources or weights is never resumed from this one's checkpoints)."""
    return {"centric": ",".join(s.name for s in sources), "centric_weights": {s.name: s.weight for s in sources}}


@dataclass
class SourceData:
    """Row-aligned training tensors of one memory-centric source (row i belongs to memory key ``keys[i]``).

    For the memory of MCR B (``role = "memory_b"``, e.g. CLAP audio): ``p_b`` holds the real
    memory rows; ``s_b`` / ``s_a`` their pseudo shared-modality partners in B and A (one softmax
    over the training pairs' B rows, averaging their B and A rows); ``p_a`` the completion of
    ``s_a`` from A's memory (``None`` with queue completion: completed per batch). The mirror for
    ``role = "memory_a"``. Arrays are ``(N, D_A)`` / ``(N, D_B)``; real rows in store dtype,
    pseudo rows float32.
    """

    source: CentricSource
    keys: list[str]
    s_a: np.ndarray
    s_b: np.ndarray
    p_a: np.ndarray | None
    p_b: np.ndarray | None
    completions: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> dict[str, Any]:
        return {**self.source.to_json(), "rows": len(self.keys), "completions": self.completions}


@dataclass
class PairData:
    """Row-aligned training tensors (row i of each array belongs to shared key ``keys[i]``).

    Attributes:
        s_a, s_b: ``(N, D_A)`` / ``(N, D_B)`` shared embeddings (store dtype, float16 or float32).
        p_a, p_b: ``(N, D_A)`` / ``(N, D_B)`` float32 pseudo embeddings, or ``None`` (no completion
            or on-the-fly completion from a memory queue).
        join: counts of the key join (``pairs``, ``only_a``, ``only_b``, and up to 10 example keys).
        centric: the sources of training pairs in use (:func:`resolve_centric`).
        sources: the memory-centric sources' data, in the order of ``centric``.
    """

    keys: list[str]
    s_a: np.ndarray
    s_b: np.ndarray
    p_a: np.ndarray | None = None
    p_b: np.ndarray | None = None
    join: dict[str, Any] = field(default_factory=dict)
    centric: list[CentricSource] = field(default_factory=list)
    sources: list[SourceData] = field(default_factory=list)

    @property
    def uses_shared(self) -> bool:
        """Whether the shared-centric (caption-centric) pairs are a training source."""
        return any(s.role == "shared" for s in self.centric)

    def __len__(self) -> int:
        return len(self.keys)


def load_pairs(stores: ConnectStores, cfg: TrainConfig, work_dir: str | Path,
               progress: Callable[[str, int, int], None] | None = None) -> PairData:
    """Join the shared stores by key and attach the pseudo embeddings (computed once, cached).

    Args:
        stores: from :func:`open_connect_stores`.
        cfg: uses ``use_completion``, ``completion``, ``memory_temperature``, ``completion_topk``,
            ``device``, ``centric``, ``centric_weights`` (and the held-out split settings).
        work_dir: completions go to ``work_dir/completions/{A,B}`` and, per memory-centric source,
            ``work_dir/completions/centric-<role>/`` (reused when up to date; other settings are refused,
            :func:`~cmcr.stores.files.claim_output`).
        progress: optional ``progress(side, done_rows, total_rows)`` (``side``: ``A``, ``B``, or a
            label of a memory-centric step such as ``audio-centric``).

    Memory-centric sources (method.md "Memory-centric pseudo pairs"): the memory's rows query the
    *training* pairs only (the held-out pairs of :func:`split_pairs` stay unseen).

    Raises:
        TrainingError: fewer than 2 keys are shared by the two shared stores.
        ConfigError: see :func:`resolve_centric`.
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
    centric = resolve_centric(stores, cfg)
    s_a = stores.shared_a.embeddings()[join.rows_left]
    s_b = stores.shared_b.embeddings()[join.rows_right]
    data = PairData(keys=join.keys, s_a=s_a, s_b=s_b, join=report, centric=centric)
    for src in centric:
        if src.role != "shared":
            data.sources.append(_memory_centric(stores, cfg, data, src, Path(work_dir) / "completions", progress))
    if cfg.use_completion and cfg.completion in ("exact", "topk") and data.uses_shared:
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


def _memory_centric(stores: ConnectStores, cfg: TrainConfig, data: PairData, src: CentricSource, work: Path,
                    progress: Callable[[str, int, int], None] | None) -> SourceData:
    """The pairs of one memory-centric source (see :class:`SourceData`), computed once and cached.

    Hop 1 (:func:`complete_paired_store`): each memory row queries its own MCR's shared rows of
    the training pairs; the softmax weights average those pairs' rows of both MCRs (the pseudo
    shared partners, one store each). Hop 2 (:func:`complete_store`): the pseudo partner in the
    other MCR queries that MCR's memory (skipped with queue completion: done per batch).
    """
    train_rows, _ = split_pairs(len(data), cfg)
    own, other = ("a", "b") if src.role == "memory_a" else ("b", "a")
    memory = stores.memory_a if own == "a" else stores.memory_b
    other_memory = stores.memory_b if own == "a" else stores.memory_a
    shared = {"a": stores.shared_a, "b": stores.shared_b}
    rows = {"a": np.asarray(data.s_a[train_rows]), "b": np.asarray(data.s_b[train_rows])}
    digest = hashlib.sha256("\n".join(data.keys[i] for i in train_rows).encode()).hexdigest()
    desc = {"path": str(shared[own].path), "fingerprint": shared[own].fingerprint(),
            "values": {f"shared_{x}": {"path": str(shared[x].path), "fingerprint": shared[x].fingerprint()}
                       for x in ("a", "b")},
            "rows": int(len(train_rows)), "rows_sha256": digest}
    folder = work / f"centric-{src.role}"
    label = f"{src.name}-centric"
    cb = (lambda d, t: progress(label, d, t)) if progress else None
    method = cfg.completion if cfg.completion in ("exact", "topk") else "exact"
    outs = complete_paired_store(memory, rows[own], {f"shared_{x}": (rows[x], shared[x]) for x in ("a", "b")},
                                 folder, memory=desc, method=method, temperature=cfg.memory_temperature,
                                 k=cfg.completion_topk, device=cfg.device, progress=cb)
    pseudo = {x: outs[f"shared_{x}"].embeddings(np.float32) for x in ("a", "b")}
    completed: np.ndarray | None = None
    paths = {k: str(v.path) for k, v in outs.items()}
    if cfg.completion in ("exact", "topk"):
        cb2 = (lambda d, t: progress(f"{label} {other.upper()}", d, t)) if progress else None
        comp = complete_store(outs[f"shared_{other}"], other_memory, folder / f"memory_{other}",
                              method=cfg.completion, temperature=cfg.memory_temperature, k=cfg.completion_topk,
                              device=cfg.device, progress=cb2)
        completed = comp.embeddings(np.float32)
        paths[f"memory_{other}"] = str(comp.path)
    real = memory.embeddings()
    p = {own: real, other: completed}
    return SourceData(source=src, keys=memory.keys(), s_a=pseudo["a"], s_b=pseudo["b"], p_a=p["a"], p_b=p["b"],
                      completions=paths)


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
