"""The Ray Data engine of ``cmcr encode``: same store as the local engine, actor deaths retried,
a failed job leaves only complete parts and a rerun finishes it, missing ray says how to install.

Ray runs in local mode (``ray.init(num_cpus=2)`` once per module) and the module starts two Ray
pipelines in all (actor start-up dominates: a few seconds each): the CLI run with a dying replica,
and the failed job.
"""

from __future__ import annotations

import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from cmcr.cli import main
from cmcr.errors import ConfigError
from cmcr.pipeline.encode import encode_shards, shard_identity, shard_source
from cmcr.pipeline.ray_engine import (
    INSTALL_HINT,
    EncoderActor,
    RayEngineError,
    _actor_device,
    encode_shards_ray,
    import_ray,
)
from cmcr.pipeline.shards import write_shards
from cmcr.stores.store import Store
from tests.fixtures_encode import TINY_CLIP


@pytest.fixture(scope="module")
def ray_local():
    """Ray started on this machine (2 CPUs, no dashboard) for this module."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _shards(messy_images, tmp_path: Path, n: int = 4, corrupt: bool = True) -> list[Path]:
    """Messy-image shards (13 files, 4 bad) + one truncated tar at the end when ``corrupt``."""
    shards = write_shards(messy_images["rgb.jpg"].parent, tmp_path / "shards", samples_per_shard=n).shards["image"]
    if corrupt:
        bad = tmp_path / "shards" / "image" / "shard-999999.tar"
        data = shards[0].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(tarfile.TarError):
            list(tarfile.open(bad))
        shards = [*shards, bad]
    return shards


def _failures(store: Store) -> list[tuple]:
    """The failures table without its time column: the same bad input gives the same record text."""
    return sorted((f["key"], f["source"], f["stage"], f["error"]) for f in store.failures().to_pylist())


def assert_same_store(local: Path, ray_path: Path, sources: set[str] | None = None) -> None:
    """Same keys, same rows per part (order within a part), same vectors, metadata and failures."""
    a, b = Store.open(local, validate="full"), Store.open(ray_path, validate="full")
    assert a.manifest["encoder"] == b.manifest["encoder"] and a.preprocessing == b.preprocessing
    parts_a = {p.source: p for p in a.parts}
    parts_b = {p.source: p for p in b.parts}
    want = set(parts_a) if sources is None else sources
    assert set(parts_b) == want
    ka, kb = a.keys(), b.keys()
    rows_a = {k: i for i, k in enumerate(ka)}
    rows_b = {k: i for i, k in enumerate(kb)}
    off_a = np.cumsum([0] + [p.rows for p in a.parts])
    off_b = np.cumsum([0] + [p.rows for p in b.parts])
    for src in want:  # each part: same keys in the same (shard) order
        ia = next(i for i, p in enumerate(a.parts) if p.source == src)
        ib = next(i for i, p in enumerate(b.parts) if p.source == src)
        assert ka[off_a[ia]:off_a[ia + 1]] == kb[off_b[ib]:off_b[ib + 1]]
    keys = sorted(kb)
    assert len(keys) == len(set(keys))
    ea, eb = a.embeddings(np.float32), b.embeddings(np.float32)
    ia = [rows_a[k] for k in keys]
    ib = [rows_b[k] for k in keys]
    np.testing.assert_allclose(eb[ib], ea[ia], atol=2e-3)
    assert a.metadata().take(ia).equals(b.metadata().take(ib))
    if sources is None:
        assert _failures(a) == _failures(b)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayEngineError, match=r"pip install 'cmcr\[ray\]'") as e:
        import_ray()
    assert INSTALL_HINT in str(e.value)


def test_actor_device_follows_gpus_per_replica():
    assert _actor_device("auto", 0) == "cpu"
    assert _actor_device("auto", 1) == "cuda"
    assert _actor_device("cuda:1", 0.5) == "cuda"
    with pytest.raises(ConfigError, match="--gpus-per-replica 1"):
        _actor_device("cuda", 0)
    with pytest.raises(ConfigError, match="contradicts"):
        _actor_device("cpu", 1)


def test_failed_job_keeps_only_complete_parts_and_rerun_finishes(ray_local, tiny_clip, messy_images, tmp_path):
    shards = _shards(messy_images, tmp_path, n=3, corrupt=False)  # 5 shards
    encode_shards(shards, tiny_clip, "image", tmp_path / "local", batch_size=3, num_workers=0, progress=False)
    poison = shard_source(shards[2])

    class FailsOnShard(EncoderActor):
        def embed_row(self, payload: bytes) -> bytes:
            import pickle

            if pickle.loads(payload)[0] == poison:
                raise RuntimeError("simulated infrastructure failure")
            return super().embed_row(payload)

    with pytest.raises(RayEngineError, match="rerun the same command") as e:
        encode_shards_ray(shards, TINY_CLIP, "image", tmp_path / "ray", driver_encoder=tiny_clip,
                          actor_class=FailsOnShard, batch_size=3, replicas=1, progress=False)
    report = e.value.report
    deadline = time.monotonic() + 30  # the failed run's actors are released (else the rerun would starve)
    while ray_local.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 2
    assert shards[2].name in str(e.value) and str(shards[2]) in report.shards_incomplete
    store = Store.open(tmp_path / "ray", validate="full")
    written = store.done_sources()
    assert shard_identity(shards[2]) not in written
    assert written == {shard_identity(s) for s in shards} - {shard_identity(s) for s in report.shards_incomplete}
    if written:  # whatever finished before the failure is complete and right
        assert_same_store(tmp_path / "local", tmp_path / "ray", sources=written)
    # the rerun skips the finished parts; it may use either engine (same store, same resume rule) —
    # the local one here, which saves a second Ray start in the test suite
    rerun = encode_shards(shards, tiny_clip, "image", tmp_path / "ray", batch_size=3, num_workers=0, progress=False)
    assert rerun.shards_skipped == len(written) and rerun.shards_done == 5 - len(written)
    assert_same_store(tmp_path / "local", tmp_path / "ray")


def test_cli_engine_ray_equals_local_with_a_dying_actor_and_resumes(ray_local, tiny_clip, messy_images, tmp_path,
                                                                      monkeypatch, capsys):
    """`cmcr encode --engine ray --replicas 2` (one replica dies mid-run) writes the local engine's store."""
    import cmcr.pipeline.ray_engine as ray_engine

    shards = _shards(messy_images, tmp_path)  # 4 good shards (4, 4, 4, 1 samples) + 1 truncated tar
    local = encode_shards(shards, tiny_clip, "image", tmp_path / "local", batch_size=3, num_workers=0,
                          progress=False)
    marker = tmp_path / "actor-died"

    class DiesOnce(EncoderActor):  # a local class: cloudpickle ships it by value to the workers
        def embed_row(self, payload: bytes) -> bytes:
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the replica process dies mid-shard, without cleanup
            return super().embed_row(payload)

    reports = []

    def run(*args, **kwargs):  # the CLI's call, with the fault-injecting actor and two replicas on 2 CPUs
        reports.append(real(*args, **kwargs, actor_class=DiesOnce, cpus_per_replica=0.5))
        return reports[-1]

    real = ray_engine.encode_shards_ray
    monkeypatch.setattr(ray_engine, "encode_shards_ray", run)
    common = ["encode", str(shards[0].parent), "-e", TINY_CLIP, "-m", "image", "-b", "3", "--no-progress"]
    argv = [*common, "-s", str(tmp_path / "ray"), "--engine", "ray", "--replicas", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Ray replicas x GPUs" in out and "2 x 0" in out and "Ray start-up" in out
    rep = reports[0]
    assert marker.exists()  # a replica really died; its batch was retried on a restarted actor
    assert (rep.rows, rep.failures, rep.shards_done, rep.shards_failed) == (
        local.rows, local.failures, local.shards_done, local.shards_failed) == (9, 5, 4, 1)
    assert rep.samples == local.samples and rep.shards_incomplete == []
    assert rep.model_s > 0 and rep.first_result_s > 0 and rep.replicas == 2
    assert_same_store(tmp_path / "local", tmp_path / "ray")
    # rerun once the bad shard is removed: every part is skipped, no Ray pipeline runs
    shards[-1].unlink()
    assert main(argv) == 0
    assert (reports[1].shards_skipped, reports[1].rows, reports[1].first_result_s) == (4, 0, 0.0)
    assert main([*common, "-s", str(tmp_path / "x"), "--engine", "spark"]) == 2
    assert "--engine must be local or ray" in capsys.readouterr().err


def test_ray_engine_reads_shard_urls_like_the_local_engine(ray_local, tiny_clip, messy_images, tmp_path):
    """Remote shards (issue 13): ``pipe:`` URLs through Ray tasks give the local engine's store, and a
    failing URL is one ``read`` failure naming it."""
    shards = _shards(messy_images, tmp_path, n=5, corrupt=False)
    urls = [f"pipe:cat {s}" for s in shards] + [f"pipe:cat {tmp_path}/missing.tar"]
    encode_shards(urls, tiny_clip, "image", tmp_path / "local", batch_size=2, num_workers=2, progress=False)
    report = encode_shards_ray(urls, TINY_CLIP, "image", tmp_path / "ray", driver_encoder=tiny_clip, batch_size=2,
                               replicas=1, progress=False)
    assert report.shards_done == len(shards) and report.shards_failed == 1
    assert_same_store(tmp_path / "local", tmp_path / "ray")
    store = Store.open(tmp_path / "ray")
    assert store.done_sources() == set(urls[:-1])  # a URL's identity is the URL
    (read,) = [f for f in store.failures().to_pylist() if f["stage"] == "read"]
    assert read["source"] == urls[-1] and "exited with status 1" in read["error"]
