"""Connect-stage figures: training pairs/s, completion exact vs top-k (time, agreement), peak RAM
of exact completion streaming a memory store larger than the RAM budget.

    python benchmarks/bench_connect.py                 # short default run
    python benchmarks/bench_connect.py --full          # reference sizes (512-d, batch 4096, 1M memory)
"""

from __future__ import annotations

import argparse
import resource
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


def bench_streaming_ram(dim: int, n_memory: int, chunk_rows: int) -> None:
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "mem", modality="audio", encoder={"family": "bench"}, dim=dim)
        for i in range(0, n_memory, 50_000):
            n = min(50_000, n_memory - i)
            store.append_part([f"m{j}" for j in range(i, i + n)], unit(rng, n, dim), source=f"p{i}")
        size_mb = n_memory * dim * 4 / 2**20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        complete_exact(unit(rng, 2048, dim), store, chunk_rows=chunk_rows, query_rows=2048)
        dt = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"streamed exact completion: memory store {n_memory} x {dim} ({size_mb:.0f} MiB as float32), "
              f"chunk {chunk_rows} rows: {dt:.2f} s; peak RSS {before:.0f} -> {after:.0f} MiB "
              f"(+{after - before:.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="reference sizes")
    args = ap.parse_args()
    if args.full:
        bench_streaming_ram(512, 2_000_000, 16384)  # first: peak RSS is process-wide
        bench_training(512, 4096, 10)
        bench_completion(512, 20_000, 1_000_000, 256)
    else:
        bench_streaming_ram(512, 300_000, 16384)  # first: peak RSS is process-wide
        bench_training(512, 4096, 3)
        bench_completion(512, 2000, 100_000, 256)


if __name__ == "__main__":
    main()
