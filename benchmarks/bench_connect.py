"""Connect-stage figures: training pairs/s, completion exact vs top-k (time, agreement), exact completion's
inner loop now vs before (A/B pairs), peak RAM
of exact completion streaming a memory store larger than the RAM budget, and connect at scale.

    python benchmarks/bench_connect.py                 # short default run
    python benchmarks/bench_connect.py --full          # reference sizes (512-d, batch 4096, 1M memory)
    python benchmarks/bench_connect.py --scale         # connect at scale, small grid (see below)
    python benchmarks/bench_connect.py --scale --captions 100000 --memory 1000000   # issue 11 sizes

``--scale``: for each (captions N, memory rows M, completion mode) a fresh subprocess runs
``train_connector`` on four stores (D = 512, float16) and prints its completion time, epoch time
and peak anonymous RSS (sampled every 5 ms); a second fresh subprocess runs **a plain in-memory
PyTorch loop** on the same stores (every store loaded into RAM as float32, completion as a dense
``softmax(q Mᵀ / τ) M`` per block of 1024 queries (fewer for a big memory: logits ≤ 256 MiB),
same projectors, loss and batches), and the
ratios cmcr / plain are printed. The grid (``--captions``, ``--memory``: comma lists) shows how
time and RSS grow with N and with M.
"""

from __future__ import annotations

import argparse
import os
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


def _online_softmax_before(queries: torch.Tensor, chunks, temperature: float) -> torch.Tensor:  # noqa: ANN001
    """The online softmax as it was before the in-place version (a new tensor per step): the baseline."""
    import math

    q = queries / temperature
    run_max = torch.full((q.shape[0], 1), -math.inf)
    denom = torch.zeros((q.shape[0], 1))
    acc = None
    for chunk in chunks:
        if acc is None:
            acc = torch.zeros((q.shape[0], chunk.shape[1]))
        logits = q @ chunk.T
        new_max = torch.maximum(run_max, logits.max(dim=1, keepdim=True).values)
        scale = torch.exp(run_max - new_max)
        weights = torch.exp(logits - new_max)
        denom = denom * scale + weights.sum(dim=1, keepdim=True)
        acc = acc * scale + weights @ chunk
        run_max = new_max
    return acc / denom


def bench_online_softmax(dim: int, n_queries: int, n_memory: int, chunk_rows: int, pairs: int = 4) -> None:
    """Exact completion's inner loop, now (in place) vs before, A/B pairs alternated: min and median."""
    import statistics

    from cmcr.stores.memory import online_softmax_completion

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    mem = torch.nn.functional.normalize(torch.randn(n_memory, dim, generator=g), dim=1)
    chunks = list(mem.split(chunk_rows))
    with torch.no_grad():
        diff = (online_softmax_completion(q, iter(chunks), 0.01) - _online_softmax_before(q, iter(chunks), 0.01))
        t_now: list[float] = []
        t_before: list[float] = []
        for i in range(pairs + 1):
            order = [(online_softmax_completion, t_now), (_online_softmax_before, t_before)]
            for f, ts in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                f(q, iter(chunks), 0.01)
                ts.append(time.perf_counter() - t)
        t_now, t_before = t_now[1:], t_before[1:]  # first pair: warm-up
        t = time.perf_counter()
        for c in chunks:
            (q @ c.T) @ c
        t_gemm = time.perf_counter() - t
    n_pairs = n_queries * n_memory
    print(f"exact completion inner loop, {n_queries} queries x {n_memory} memory rows (chunks of {chunk_rows}), "
          f"dim {dim}, {torch.get_num_threads()} threads, {pairs} A/B pairs: now {min(t_now):.3f} / "
          f"{statistics.median(t_now):.3f} s (min / median), before {min(t_before):.3f} / "
          f"{statistics.median(t_before):.3f} s; before / now: min {min(t_before) / min(t_now):.2f}x, median "
          f"{statistics.median(t_before) / statistics.median(t_now):.2f}x; the two matrix products alone "
          f"{t_gemm:.3f} s; {min(t_now) / n_pairs:.2e} s per query-memory pair; max |now - before| "
          f"{diff.abs().max().item():.1e}")


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


# ------------------------------------------------------------------------------------- at scale
def _peak_rss_sampler():
    """Start sampling this process's RssAnon every 5 ms; returns (peak dict, stop function)."""
    import threading

    peak = {"anon": _rss_mib()["RssAnon"]}
    peak["base"] = peak["anon"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak["anon"] = max(peak["anon"], _rss_mib()["RssAnon"])

    th = threading.Thread(target=sample, daemon=True)
    th.start()

    def finish() -> dict:
        stop.set()
        th.join()
        return peak

    return peak, finish


def make_scale_stores(root: Path, captions: int, memory: int, dim: int, seed: int = 0) -> dict[str, Path]:
    """Four stores of a C-MCR setting (shared text of A and B, image memory of A, audio memory of B):
    unit rows around 100 shared topics so completions and pairs are not pure noise."""
    rng = np.random.default_rng(seed)
    topics = unit(rng, 100, dim)
    enc_a, enc_b = {"family": "bench-a"}, {"family": "bench-b"}
    specs = {"shared_a": ("text", enc_a, captions), "shared_b": ("text", enc_b, captions),
             "memory_a": ("image", enc_a, memory), "memory_b": ("audio", enc_b, memory)}
    paths = {}
    for role, (modality, enc, n) in specs.items():
        path = root / f"{role}-{n}"
        paths[role] = path
        if (path / "manifest.json").exists():
            continue
        store = Store.create(path, modality=modality, encoder=enc, dim=dim)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x = topics[rng.integers(0, 100, m)] + 0.8 * unit(rng, m, dim)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.append_part([f"k{i}" for i in range(s, s + m)] if role.startswith("shared")
                              else [f"{role}{i}" for i in range(s, s + m)], x, source=f"p{s}")
    return paths


def _scale_child(spec: dict) -> dict:
    """One case in this (fresh) process: ``spec`` = {paths, mode, epochs, batch, plain}."""
    import json

    torch.zeros(1)
    peak, finish = _peak_rss_sampler()
    paths, mode, epochs, batch = spec["paths"], spec["mode"], spec["epochs"], spec["batch"]
    t0 = time.perf_counter()
    if not spec["plain"]:
        from cmcr.trainer.loop import train_connector

        marks: dict[str, float] = {}

        def cb(ev: dict) -> None:
            marks.setdefault(ev["stage"] + "_first", time.perf_counter())
            if ev["stage"] == "completion":
                marks["completion_last"] = time.perf_counter()

        cfg = TrainConfig(completion=mode, epochs=epochs, batch_size=batch, device="cpu", keep_checkpoints=1)
        with tempfile.TemporaryDirectory() as out:
            res = train_connector(paths["shared_a"], paths["shared_b"], paths["memory_a"], paths["memory_b"], out,
                                  config=cfg, progress=cb, plot=False)
        wall = time.perf_counter() - t0
        comp = marks.get("completion_last", t0) - t0 if mode != "queue" else 0.0
        epoch_s = float(np.mean([h["seconds"] for h in res["history"]]))
    else:
        s_a = Store.open(paths["shared_a"]).embeddings(np.float32)
        s_b = Store.open(paths["shared_b"]).embeddings(np.float32)
        m_a = torch.from_numpy(Store.open(paths["memory_a"]).embeddings(np.float32))
        m_b = torch.from_numpy(Store.open(paths["memory_b"]).embeddings(np.float32))
        tc = time.perf_counter()
        with torch.no_grad():
            p = []
            # queries per block: 1024, fewer for a big memory (block x memory logits <= 256 MiB)
            blk = int(max(16, min(1024, (256 << 20) // (4 * max(len(m_a), len(m_b))))))
            for s, m in ((s_a, m_a), (s_b, m_b)):
                out = torch.empty((len(s), m.shape[1]))
                for i in range(0, len(s), blk):
                    q = torch.from_numpy(s[i:i + blk])
                    out[i:i + blk] = torch.nn.functional.normalize(torch.softmax(q @ m.T / 0.01, dim=1) @ m, dim=1)
                p.append(out)
        comp = time.perf_counter() - tc
        cfg = TrainConfig(batch_size=batch)
        pa, pb = build_projector(s_a.shape[1], cfg), build_projector(s_b.shape[1], cfg)
        opt = torch.optim.AdamW(list(pa.parameters()) + list(pb.parameters()), lr=1e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        xa, xb = torch.from_numpy(s_a), torch.from_numpy(s_b)
        times = []
        for _ in range(epochs):
            te = time.perf_counter()
            perm = torch.randperm(len(xa))
            for i in range(0, len(perm), batch):
                idx = perm[i:i + batch]
                if len(idx) < 2:
                    continue
                loss, _ = cmcr_loss(pa, pb, xa[idx], xb[idx], p[0][idx], p[1][idx], temperature=0.01,
                                    noise_std=0.025, intra_weight=0.1, generator=g)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - te)
        epoch_s = float(np.mean(times))
        wall = time.perf_counter() - t0
    pk = finish()
    out = {"wall_s": wall, "completion_s": comp, "epoch_s": epoch_s, "rss_base_mib": pk["base"],
           "rss_peak_mib": pk["anon"]}
    print(json.dumps(out))
    return out


def _run_child(spec: dict) -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, __file__, "--scale-child", json.dumps(spec)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale(captions: list[int], memories: list[int], modes: list[str], dim: int, epochs: int, batch: int,
                workdir: Path | None, plain_loop: bool = True) -> None:
    """Connect at scale: time and peak RSS per (captions, memory, mode), cmcr vs a plain in-memory loop."""
    import shutil

    root = workdir or Path(tempfile.mkdtemp(prefix="cmcr-bench-connect-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"connect at scale: D = {dim}, {epochs} epoch(s), batch {batch}, CPU, {torch.get_num_threads()} threads; "
          f"time in s, peak anonymous RSS in MiB (fresh process each); ratio = cmcr / plain in-memory loop")
    print(f"{'captions':>9} {'memory':>9} {'mode':>6} | {'completion':>10} {'epoch':>7} {'wall':>7} {'RSS':>6} | "
          f"{'plain compl.':>12} {'epoch':>7} {'wall':>7} {'RSS':>6} | {'wall x':>6} {'RSS x':>6}")
    for n in captions:
        for m in memories:
            paths = {k: str(v) for k, v in make_scale_stores(root, n, m, dim).items()}
            plain = None
            for mode in modes:
                for name in ("index",):  # the memory store's FAISS index is rebuilt per memory size
                    for role in ("memory_a", "memory_b"):
                        shutil.rmtree(Path(paths[role]) / name, ignore_errors=True)
                r = _run_child({"paths": paths, "mode": mode, "epochs": epochs, "batch": batch, "plain": False})
                if plain is None and plain_loop:
                    plain = _run_child({"paths": paths, "mode": mode, "epochs": epochs, "batch": batch, "plain": True})
                rr = r["rss_peak_mib"] - r["rss_base_mib"]
                if plain is None:  # --no-plain: the dense loop's exact completion is out of reach at this size
                    print(f"{n:9,d} {m:9,d} {mode:>6} | {r['completion_s']:10.1f} {r['epoch_s']:7.1f} "
                          f"{r['wall_s']:7.1f} {rr:6.0f} | {'(no plain loop)':>35} | load average "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
                    continue
                pr = plain["rss_peak_mib"] - plain["rss_base_mib"]
                print(f"{n:9,d} {m:9,d} {mode:>6} | {r['completion_s']:10.1f} {r['epoch_s']:7.1f} {r['wall_s']:7.1f} "
                      f"{rr:6.0f} | {plain['completion_s']:12.1f} {plain['epoch_s']:7.1f} {plain['wall_s']:7.1f} "
                      f"{pr:6.0f} | {r['wall_s'] / plain['wall_s']:6.2f} {rr / max(pr, 1):6.2f}", flush=True)
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="reference sizes")
    ap.add_argument("--stream-child", nargs=2, metavar=("STORE", "CHUNK_ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", action="store_true", help="connect at scale (time and RSS vs a plain loop)")
    ap.add_argument("--captions", default="2000,4000", help="--scale: caption counts (comma list)")
    ap.add_argument("--memory", default="20000,40000", help="--scale: memory rows per side (comma list)")
    ap.add_argument("--modes", default="exact,topk,queue", help="--scale: completion modes")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=None, help="--scale: keep the stores here (reused)")
    ap.add_argument("--scale-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-plain", action="store_true",
                    help="--scale: skip the plain in-memory loop (its dense exact completion of 100k x 1M takes hours)")
    args = ap.parse_args()
    if args.stream_child:
        _stream_child(args.stream_child[0], int(args.stream_child[1]))
        return
    if args.scale_child:
        import json

        _scale_child(json.loads(args.scale_child))
        return
    if args.scale:
        bench_scale([int(x) for x in args.captions.split(",")], [int(x) for x in args.memory.split(",")],
                    args.modes.split(","), args.dim, args.epochs, args.batch, args.workdir,
                    plain_loop=not args.no_plain)
        return
    if args.full:
        bench_streaming_ram(512, 2_000_000, 16384)
        bench_training(512, 4096, 10)
        bench_completion(512, 20_000, 1_000_000, 256)
        bench_online_softmax(512, 4096, 262_144, 16384)
    else:
        bench_streaming_ram(512, 500_000, 16384)
        bench_training(512, 4096, 3)
        bench_completion(512, 2000, 100_000, 256)
        bench_online_softmax(512, 1024, 65_536, 16384)


if __name__ == "__main__":
    main()
