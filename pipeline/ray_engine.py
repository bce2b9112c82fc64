"""``cmcr encode --engine ray``: the encode stage on Ray Data, one actor per encoder replica.

Same input, same output as the local engine (:func:`cmcr.pipeline.encode.encode_shards`): the same
shards become the same store parts (one per input shard, written atomically, skipped on a rerun),
with the same keys, rows in shard order within a part, metadata columns and failure records.
Only where the work runs changes::

    shards not yet in store.done_sources()
      └─ ray.data.from_items([{shard, path}])            one block per shard
           └─ flat_map(_read_and_preprocess)   (tasks)   read the tar, decode + preprocess + collate
                │                                        batch_size samples per row (ShardBatches)
                └─ map_batches(EncoderActor)   (actors)  one actor per replica, the model loaded from
                     │                                   the encoder SPEC string, GPU when asked
                     └─ driver                           groups rows per shard; writes a shard's part
                                                         with the store API once all its batches
                                                         (and its end marker) have arrived

Why the driver writes: a part exists only once every row of its shard is in, so a worker (or the
whole Ray job) dying midway never leaves a partial part; the shards not written are simply done on
the next run. Rows are deduplicated by ``(shard, batch)`` in the driver, so Ray's task retries and
actor restarts cannot double a row.

Fault tolerance (Ray Data defaults, bounded here): a dead encoder actor is restarted and its
in-flight batches are retried up to ``max_retries`` times; a batch that keeps killing its actor (or
any other error escaping Ray) ends the run with :class:`RayEngineError`, naming the shards that got
no part (finished parts stay; rerun the same command).

Ray is an optional dependency (``pip install 'cmcr[ray]'``); this module imports it lazily.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import pickle
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import CmcrError, ConfigError, EncoderError
from cmcr.pipeline.encode import (
    EncodeReport,
    ShardBatches,
    check_run_settings,
    check_shards_modality,
    embed_items,
    finish_shard,
    list_shards,
    media_roots_of_shards,
    open_store,
    progress_bar,
    record_and_continue,
    shard_name,
    shard_source,
    shards_to_do,
)
from cmcr.pipeline.encoders import Encoder, load_encoder
from cmcr.stores.files import locks_output

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cmcr[ray]'"
_PICKLE_PROTOCOL = 5


class RayEngineError(CmcrError):
    """Ray is missing, mis-configured, or a Ray run ended before every shard got its part.

    Attributes:
        report: the :class:`RayEncodeReport` of the run (``None`` when nothing ran).
    """

    def __init__(self, message: str, report: RayEncodeReport | None = None):
        super().__init__(message)
        self.report = report


def import_ray() -> Any:
    """Import ``ray`` and ``ray.data``.

    Raises:
        RayEngineError: ray (with its Data library) is not installed; says how to install it.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayEngineError(
            f"--engine ray needs Ray Data, which is not installed here ({e}). Install it with "
            f"{INSTALL_HINT} (or pip install 'ray[data]'), or use the local engine (--engine local)"
        ) from e
    return ray


@dataclass
class RayEncodeReport(EncodeReport):
    """:class:`~cmcr.pipeline.encode.EncodeReport` plus what the Ray engine adds.

    Attributes:
        replicas: encoder actors; gpus_per_replica: GPUs per actor (0 = CPU actors);
        address: the cluster address used (``None`` = a local Ray started on this machine);
        ray_init_s: seconds connecting to / starting Ray (0 when it was already running);
        first_result_s: seconds from starting the pipeline to the first embedded batch reaching the
        driver (actor start-up + model load + the first read/preprocess/forward);
        shards_incomplete: shard paths that got no part because the run ended early.
        ``model_s`` sums the actors' forward-pass seconds and ``decode_s`` the tasks' decode +
        preprocess seconds (CPU seconds over the cluster, not wall time); ``wait_s`` is the driver's
        wait for results.
    """

    replicas: int = 1
    gpus_per_replica: float = 0.0
    address: str | None = None
    ray_init_s: float = 0.0
    first_result_s: float = 0.0
    shards_incomplete: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- Ray stages
def _read_and_preprocess(row: dict[str, Any], *, preprocess: Any, modality: str,
                         batch_size: int, pointcloud: Any = None) -> Iterator[dict[str, Any]]:
    """Ray task (``flat_map``): one shard -> its preprocessed, collated batches + one end row.

    Output rows: ``{"shard": i, "batch": b, "kind": "batch", "payload": pickle((source, Prepared, collated))}``
    and ``{"shard": i, "batch": n_batches, "kind": "end", "payload": pickle(read error or None)}``.
    Reuses :class:`~cmcr.pipeline.encode.ShardBatches` (single worker view), so batches, failure
    records and the unreadable-shard message are those of the local engine.
    """
    import torch

    torch.set_num_threads(1)
    i = int(row["shard"])
    source = shard_source(row["path"])
    for msg in ShardBatches([row["path"]], preprocess, modality, batch_size, pointcloud):
        if msg["kind"] == "batch":
            payload = pickle.dumps((source, msg["prepared"], msg["collated"]), protocol=_PICKLE_PROTOCOL)
            yield {"shard": i, "batch": int(msg["batch"]), "kind": "batch", "payload": payload}
        else:
            yield {"shard": i, "batch": int(msg["batches"]), "kind": "end",
                   "payload": pickle.dumps(msg["error"], protocol=_PICKLE_PROTOCOL)}


class EncoderActor:
    """Ray Data actor (``map_batches``): holds one encoder replica and embeds preprocessed batches.

    Built from the encoder SPEC string (the model is loaded in the actor, never pickled). The
    replica's identity and preprocessing must equal the driver's (same weights, same library
    versions), else :class:`EncoderError` (e.g. a checkpoint path that differs on a worker node).

    Each call gets rows of :func:`_read_and_preprocess`; ``batch`` rows are embedded with
    :func:`~cmcr.pipeline.encode.embed_items` (a failing batch is retried sample by sample there)
    and come back with ``payload = pickle((Prepared without items, emb (M, D) float32, ok (N,) bool,
    failures, model seconds))``; ``end`` rows pass through.
    """

    def __init__(self, spec: str, modality: str, device: str, precision: str, clap_tokenizer: str | None,
                 expected_identity: dict[str, Any], expected_preprocessing: dict[str, Any],
                 torch_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        self.modality = modality
        self.encoder = load_encoder(spec, device=device, precision=precision, clap_tokenizer=clap_tokenizer)
        ident, pre = self.encoder.identity(), self.encoder.preprocessing(modality)
        if ident != expected_identity or pre != expected_preprocessing:
            raise EncoderError(
                f"the encoder replica on {os.uname().nodename} differs from the driver's: identity {ident} vs "
                f"{expected_identity}, preprocessing {pre} vs {expected_preprocessing}. Install the same cmcr, "
                f"open_clip/laion_clap versions and checkpoint files (same path) on every node"
            )

    def embed_row(self, payload: bytes) -> bytes:
        """Embed one preprocessed batch (a ``batch`` row's payload); returns the result payload."""
        source, prepared, collated = pickle.loads(payload)
        t = time.perf_counter()
        emb, ok, fails = embed_items(self.encoder, self.modality, prepared.keys, prepared.items, source,
                                     batch=collated)
        model_s = time.perf_counter() - t
        prepared.items = []  # the driver needs keys/infos/metas/failures, not the model inputs
        return pickle.dumps((prepared, emb, ok, fails, model_s), protocol=_PICKLE_PROTOCOL)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.embed_row(p) if k == "batch" else p for k, p in zip(batch["kind"], batch["payload"], strict=True)]
        payload = np.empty(len(out), dtype=object)
        payload[:] = out
        return {"shard": batch["shard"], "batch": batch["batch"], "kind": batch["kind"], "payload": payload}


# ----------------------------------------------------------------------------------- driver
def _actor_device(device: str, gpus_per_replica: float) -> str:
    """The torch device inside an actor: Ray exposes the actor's GPUs as ``cuda:0..``."""
    if gpus_per_replica > 0:
        if device not in ("auto", "") and not device.startswith("cuda"):
            raise ConfigError(f"--device {device} contradicts --gpus-per-replica {gpus_per_replica}; "
                              f"use --gpus-per-replica 0 for CPU replicas")
        return "cuda"
    if device.startswith("cuda"):
        raise ConfigError(f"--device {device} needs GPU replicas: pass --gpus-per-replica 1 (or 0.5 to put two "
                          f"replicas on one GPU)")
    return "cpu"


@locks_output("store_path", shared=lambda a: not (a["overwrite"] or a["start_over"]))
def encode_shards_ray(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    encoder: str,
    modality: str,
    store_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    start_over: bool = False,
    progress: bool = True,
    dtype: str = "float16",
    command: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    clap_tokenizer: str | None = None,
    address: str | None = None,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
    max_retries: int = 3,
    driver_encoder: Encoder | None = None,
    actor_class: type = EncoderActor,
    pointcloud: Any = None,
    handler: Any = record_and_continue,
) -> RayEncodeReport:
    """Encode webdataset shards into a store on Ray Data (see the module docstring).

    The store equals the local engine's on the same input (same keys, vectors within float
    tolerance, metadata, failure records); parts are appended in the order shards finish.

    Args:
        shards: folder(s), tar file(s), glob or brace pattern (see :func:`~cmcr.pipeline.encode.list_shards`);
            on a cluster the paths must be readable at the same path on every node.
        encoder: encoder SPEC string (``FAMILY:ARCHITECTURE[@WEIGHTS]``); each actor loads it.
        modality: ``image`` / ``audio`` / ``text`` / ``3d``.
        store_path: store folder (created if missing), written by this (driver) process only.
        batch_size: samples per forward pass (and per preprocessed Ray row).
        num_workers: cap on concurrent read/preprocess tasks (0 = as many as Ray schedules).
        overwrite, start_over, dtype, command: as in the local engine.
        device: ``auto`` / ``cpu`` / ``cuda``: must agree with ``gpus_per_replica``.
        precision, clap_tokenizer: passed to :func:`~cmcr.pipeline.encoders.load_encoder` in each actor.
        address: Ray cluster address (``auto``, ``ray://head:10001``, ``host:6379``); ``None`` connects
            to ``$RAY_ADDRESS`` if set, else starts Ray on this machine (local mode). Ignored when
            Ray is already initialised in this process.
        replicas: encoder actors (model copies).
        gpus_per_replica: GPUs per actor (fractions share a GPU); ``None`` = 1 when the cluster has
            GPUs, else 0 (CPU actors).
        cpus_per_replica: CPUs reserved per actor (also its torch threads, at least 1).
        max_retries: retries of a batch whose actor died (a restarted actor takes it over).
        driver_encoder: an already loaded encoder of the same spec, used in the driver for the
            store identity and the preprocessor (else the spec is loaded here on the CPU).
        actor_class: the actor class (a subclass of :class:`EncoderActor`; tests inject faults).
        pointcloud: 3d decode settings (:class:`~cmcr.pipeline.pointcloud.PointCloudDecoding`), as
            in the local engine.

    Returns:
        A :class:`RayEncodeReport`.

    Raises:
        RayEngineError: Ray missing (install hint), too few CPUs for the replicas in local mode, or
            the run ended with shards left without a part (finished parts are kept; rerun).
        InputDataError, StoreMismatchError, EncoderError, ConfigError: as in the local engine.
    """
    t0 = time.perf_counter()
    ray = import_ray()
    if replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {replicas}")
    check_run_settings(batch_size=batch_size, num_workers=num_workers)
    paths = list_shards(shards)
    check_shards_modality(paths, modality)
    enc = driver_encoder if driver_encoder is not None else load_encoder(
        encoder, device="cpu", precision=precision, clap_tokenizer=clap_tokenizer)
    store = open_store(store_path, enc, modality, overwrite=overwrite, dtype=dtype, command=command,
                       start_over=start_over, pointcloud=pointcloud, media_roots=media_roots_of_shards(paths))
    report = RayEncodeReport(store=str(store.path), replicas=replicas, address=address,
                             torch_threads=max(1, int(cpus_per_replica)))
    todo, idents = shards_to_do(paths, store)
    report.shards_skipped = len(paths) - len(todo)
    if not todo:
        report.wall_s = time.perf_counter() - t0
        return report

    started_here = False
    if not ray.is_initialized():
        ti = time.perf_counter()
        kwargs: dict[str, Any] = {"include_dashboard": False} if address is None else {}
        try:
            ray.init(address=address, logging_level=logging.WARNING, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise RayEngineError(
                f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'this machine'} "
                f"({type(e).__name__}: {e}). Check that it is up (`ray status` on the head node) and the "
                f"address (auto, host:6379, ray://head:10001), or leave --address out to run Ray on this machine"
            ) from e
        report.ray_init_s = time.perf_counter() - ti
        started_here = True
    try:
        _run_pipeline(ray, todo, idents, enc, encoder, modality, store, report, batch_size=batch_size,
                      num_workers=num_workers, progress=progress, device=device, precision=precision,
                      clap_tokenizer=clap_tokenizer, address=address, gpus_per_replica=gpus_per_replica,
                      cpus_per_replica=cpus_per_replica, max_retries=max_retries, actor_class=actor_class,
                      started_here=started_here, pointcloud=pointcloud, handler=handler)
    finally:
        report.wall_s = time.perf_counter() - t0
        if started_here:
            ray.shutdown()
    return report


def _encode_stage(ds: Any, actor_class: type, report: RayEncodeReport, spec: str, modality: str, actor_device: str,
                  precision: str, clap_tokenizer: str | None, enc: Encoder, gpus_per_replica: float,
                  cpus_per_replica: float, max_retries: int) -> Any:
    """The encoder actor pool stage (``map_batches``): one actor per replica, one batch per call."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor_class, batch_size=1, batch_format="numpy",
        compute=ActorPoolStrategy(size=report.replicas),
        fn_constructor_kwargs={"spec": spec, "modality": modality, "device": actor_device, "precision": precision,
                               "clap_tokenizer": clap_tokenizer, "expected_identity": enc.identity(),
                               "expected_preprocessing": enc.preprocessing(modality),
                               "torch_threads": max(1, int(cpus_per_replica))},
        num_cpus=cpus_per_replica, num_gpus=gpus_per_replica or None,
        max_restarts=-1, max_task_retries=max_retries)


def _run_pipeline(ray: Any, todo: list[Path], idents: list[str], enc: Encoder, spec: str, modality: str, store: Any,
                  report: RayEncodeReport, *, batch_size: int, num_workers: int, progress: bool, device: str,
                  precision: str, clap_tokenizer: str | None, address: str | None, gpus_per_replica: float | None,
                  cpus_per_replica: float, max_retries: int, actor_class: type, started_here: bool,
                  pointcloud: Any = None, handler: Any = record_and_continue) -> None:
    """Build and drain the Ray Data pipeline; write each shard's part as soon as it is complete."""
    from ray.data import DataContext, TaskPoolStrategy

    resources = ray.cluster_resources()
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    report.gpus_per_replica = float(gpus_per_replica)
    actor_device = _actor_device(device, gpus_per_replica)
    need = report.replicas * cpus_per_replica + 1  # + one CPU left for the read/preprocess tasks
    if resources.get("CPU", 0) < need:
        msg = (f"Ray has {resources.get('CPU', 0):g} CPUs but {report.replicas} replicas x {cpus_per_replica:g} "
               f"CPUs + 1 CPU for reading/preprocessing need {need:g}: pass fewer --replicas, a smaller "
               f"cpus_per_replica (e.g. 0.5), or a bigger cluster")
        if started_here and address is None:  # a local Ray cannot grow: it would wait forever
            raise RayEngineError(msg, report)
        log.warning("%s (waiting for the cluster to scale up)", msg)
    if gpus_per_replica > 0 and resources.get("GPU", 0) < gpus_per_replica:
        log.warning("the cluster has %g GPUs now; each replica asks for %g (waiting for the autoscaler)",
                    resources.get("GPU", 0), gpus_per_replica)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own rich bar shows shards, samples/s and failures
    read = functools.partial(_read_and_preprocess, preprocess=enc.preprocessor(modality), modality=modality,
                             batch_size=batch_size, pointcloud=pointcloud)
    ds = ray.data.from_items([{"shard": i, "path": str(p)} for i, p in enumerate(todo)],
                             override_num_blocks=len(todo))
    ds = ds.flat_map(read, num_cpus=1, compute=TaskPoolStrategy(size=num_workers) if num_workers > 0 else None)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_task_retries (its default, -1, would retry a batch
        # that kills every actor forever); the **ray_remote_args route is deprecated for Ray 2.64
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _encode_stage(ds, actor_class, report, spec, modality, actor_device, precision, clap_tokenizer, enc,
                           gpus_per_replica, cpus_per_replica, max_retries)

    pending: dict[int, dict[str, Any]] = {}
    written: set[int] = set()
    error: str | None = None
    live_failures = 0
    t_start = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"encode {modality} (ray x{report.replicas})", total=len(todo), samples=0, rate=0.0,
                            failures=0, shard="")
        rows = iter(ds.iter_rows())
        try:
            while True:
                tw = time.perf_counter()
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except Exception as e:  # Ray gave up (a batch kept killing its actor, a node died, ...)
                    # keep only the text: the exception's traceback would keep the executor and its
                    # actors (CPUs, GPUs) alive for as long as the caller holds the error
                    error = f"{type(e).__name__}: {str(e)[:500]}"
                    break
                report.wait_s += time.perf_counter() - tw
                i = int(row["shard"])
                if i in written:  # a retried task repeating rows of a finished shard
                    continue
                st = pending.setdefault(i, {"batches": {}, "n": None, "error": None})
                if row["kind"] == "batch":
                    b = int(row["batch"])
                    if b in st["batches"]:
                        continue
                    prepared, emb, ok, fails, model_s = pickle.loads(row["payload"])
                    if not report.first_result_s:
                        report.first_result_s = time.perf_counter() - t_start
                    st["batches"][b] = (prepared, emb, ok, fails)
                    report.add_prepared(prepared)
                    report.model_s += model_s
                    report.samples += len(prepared.keys) + len(prepared.failures)
                    live_failures += len(prepared.failures) + len(fails)
                    elapsed = time.perf_counter() - t_start
                    bar.update(task, samples=report.samples, rate=report.samples / max(elapsed, 1e-9),
                               failures=live_failures, shard=shard_name(todo[i]))
                else:
                    st["n"] = int(row["batch"])
                    st["error"] = pickle.loads(row["payload"])
                if st["n"] is not None and len(st["batches"]) >= st["n"]:
                    batches = [st["batches"][b] for b in range(st["n"])]
                    finish_shard(store, modality, enc.dim, todo[i], idents[i], batches, st["error"], report,
                                 handler)
                    del pending[i]
                    written.add(i)
                    elapsed = time.perf_counter() - t_start
                    bar.update(task, advance=1, samples=report.samples, rate=report.samples / max(elapsed, 1e-9),
                               failures=report.failures, shard=shard_name(todo[i]))
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
    del rows, ds  # the executor shuts down and releases its actors once unreferenced
    gc.collect()
    if error is not None:
        report.shards_incomplete = [str(todo[i]) for i in range(len(todo)) if i not in written]
        names = ", ".join(shard_name(p) for p in report.shards_incomplete[:5])
        more = f" and {len(report.shards_incomplete) - 5} more" if len(report.shards_incomplete) > 5 else ""
        raise RayEngineError(
            f"the Ray run ended early ({error}); {len(written)} shard part(s) were written, "
            f"{len(report.shards_incomplete)} shard(s) got none ({names}{more}). Finished parts are kept: "
            f"rerun the same command to encode the rest", report)
    missing = [str(todo[i]) for i in range(len(todo)) if i not in written]
    if missing:  # cannot happen unless rows were lost; never write a partial part
        report.shards_incomplete = missing
        log.error("%d shard(s) did not complete: %s; rerun to retry them", len(missing), missing[:5])


__all__ = ["INSTALL_HINT", "EncoderActor", "RayEncodeReport", "RayEngineError", "encode_shards_ray",
           "import_ray"]
