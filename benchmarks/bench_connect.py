"""Connect-stage figures: training pairs/s, completion exact vs top-k (time, agreement), peak RAM
of exact completion streaming a memory store larger than the RAM budget.

    python benchmarks/bench_connect.py                 # short default run
    python benchmarks/bench_connect.py --full          # reference sizes (512-d, batch 4096, 1M memory)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmcr.stores.memory import complete_exact, complete_topk
from cmcr.stores.store import Store
from cmcr.trainer.config import TrainConfig
from cmcr.trainer.losses import cmcr_loss
from cmcr.trainer.projector import build_projector


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_training(dim: int, batch: int, steps: int) -> None:
    cfg = TrainConfig(batch_size=batch)
    pa, pb = build_projector(dim, cfg), build_projector(dim, cfg)
    opt = torch.optim.AdamW(list(pa.parameters()) + list(pb.parameters()), lr=1e-3)
    x = [torch.nn.functional.normalize(torch.randn(batch, dim), dim=1) for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss, _ = cmcr_loss(pa, pb, *x, temperature=0.01, noise_std=0.025, intra_weight=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    print(f"training: dim {dim}, batch {batch}, {torch.get_num_threads()} threads: "
          f"{steps * batch / dt:,.0f} pairs/s ({dt / steps * 1000:.0f} ms/step, full C-MCR loss)")


def bench_completion(dim: int, n_queries: int, n_memory: int, k: int) -> None:
    rng = np.random.default_rng(0)
    q, m = unit(rng, n_queries, dim), unit(rng, n_memory, dim)
    # make queries resemble memory rows a little (real captions have close memory items)
    q = q + 0.5 * m[rng.integers(0, n_memory, n_queries)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t0 = time.perf_counter()
    exact = complete_exact(q, m)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = complete_topk(q, m, k=k)
    t_topk = time.perf_counter() - t0
    cos = np.sum(exact * approx, axis=1)
    print(f"completion: {n_queries} queries x {n_memory} memory rows, dim {dim}: exact {t_exact:.2f} s, "
          f"top-{k} {t_topk:.2f} s (incl. flat index build); agreement cos mean {cos.mean():.5f}, min {cos.min():.5f}")


def _rss_mib() -> dict[str, float]:
    """Current RssAnon / RssFile of this process in MiB (Linux /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            name, kb = line.split()[:2]
            out[name.rstrip(":")] = int(kb) / 1024
    return out


def _stream_child(path: str, chunk_rows: int) -> None:
    """Run in a fresh process: exact completion of 256 queries against the store at ``path``.
    Prints the anonymous RSS before opening the store and its peak over the completion (MiB,
    sampled every 5 ms). Not ru_maxrss: Linux carries the parent's high-water mark across exec, and
    it counts the store's page-cache pages mapped by pyarrow (reclaimable)."""
    import threading

    torch.zeros(1)  # torch initialised before the baseline
    base_anon = _rss_mib()["RssAnon"]
    peak = {"anon": base_anon}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak["anon"] = max(peak["anon"], _rss_mib()["RssAnon"])

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    store = Store.open(path)
    q = unit(np.random.default_rng(2), 256, store.dim)
    t0 = time.perf_counter()
    complete_exact(q, store, chunk_rows=chunk_rows, query_rows=256)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    print(f"{base_anon:.0f} {peak['anon']:.0f} {dt:.3f}")


def bench_streaming_ram(dim: int, n_memory: int, chunk_rows: int) -> None:
    """Peak RAM of exact completion streaming a memory store, measured in a fresh subprocess (so
    neither writing the store nor earlier benchmarks count)."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "mem", modality="audio", encoder={"family": "bench"}, dim=dim)
        for i in range(0, n_memory, 50_000):
            n = min(50_000, n_memory - i)
            store.append_part([f"m{j}" for j in range(i, i + n)], unit(rng, n, dim), source=f"p{i}")
        f32_mb = n_memory * dim * 4 / 2**20
        disk_mb = sum(f.stat().st_size for f in (Path(tmp) / "mem").rglob("*") if f.is_file()) / 2**20
        out = subprocess.run([sys.executable, __file__, "--stream-child", str(Path(tmp) / "mem"), str(chunk_rows)],
                             check=True, capture_output=True, text=True).stdout.split()
        anon0, anon1, dt = (float(x) for x in out)
        print(f"streamed exact completion (fresh process): memory store {n_memory} x {dim} ({store.dtype}: "
              f"{disk_mb:.0f} MiB on disk, {f32_mb:.0f} MiB as float32), 256 queries, chunk {chunk_rows} rows: "
              f"{dt:.2f} s; anonymous RSS {anon0:.0f} MiB before, peak {anon1:.0f} MiB (+{anon1 - anon0:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="reference sizes")
    ap.add_argument("--stream-child", nargs=2, metavar=("STORE", "CHUNK_ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_child:
        _stream_child(args.stream_child[0], int(args.stream_child[1]))
        return
    if args.full:
        bench_streaming_ram(512, 2_000_000, 16384)
        bench_training(512, 4096, 10)
        bench_completion(512, 20_000, 1_000_000, 256)
    else:
        bench_streaming_ram(512, 500_000, 16384)
        bench_training(512, 4096, 3)
        bench_completion(512, 2000, 100_000, 256)


if __name__ == "__main__":
    main()
