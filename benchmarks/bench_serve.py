"""Load test of `cmcr serve` on 127.0.0.1: N concurrent clients for a bounded time.

Builds (once, under --work) a connector whose side A is a random-init **ViT-B-32** (the real text tower:
realistic query cost) and side B a random stand-in, and a projected gallery of --rows rows (default
100k) with its FAISS index; starts `cmcr serve` in a subprocess and runs --clients threads sending text
queries (and then image-upload queries) for --seconds each. Prints p50/p90/p99 latency, throughput,
errors and the server's RSS sampled over time (flat = no leak), and the in-process baseline for
the same text query (encode + project + search without HTTP) measured in the same run.

    python benchmarks/bench_serve.py                      # 100k gallery, 4 clients, 20 s per phase
    python benchmarks/bench_serve.py --rows 20000 --seconds 5 --clients 2

Goal (issue 12): text query on a 100k gallery p50 <= 50 ms on 2 cores, no errors, RSS flat.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CAPTIONS = ["a dog barking", "a train passing by", "rain on a window", "a crowd cheering in a stadium",
            "a bird singing in the morning", "a man playing the piano", "a cat meowing", "cars in traffic"]


def build(work: Path, rows: int) -> tuple[Path, Path, str]:
    """Connector + projected gallery of ``rows`` rows (reused when present)."""
    import torch

    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.index import build_index
    from cmcr.stores.store import Store
    from cmcr.trainer.config import TrainConfig
    from cmcr.trainer.connector import Connector, SideInfo
    from cmcr.trainer.projector import make_projector, projector_architecture

    spec = "open_clip:ViT-B-32@random"
    conn_dir, gal_dir = work / "connector", work / f"gallery-{rows}"
    if (conn_dir / "connector.json").is_file() and (gal_dir / "manifest.json").is_file():
        return conn_dir, gal_dir, spec
    enc = load_encoder(spec, device="cpu")
    ident_b = {"family": "bench", "architecture": "stand-in", "weights": "random", "dim": enc.dim}
    cfg = TrainConfig()
    arch = projector_architecture(enc.dim, cfg)
    torch.manual_seed(0)
    conn = Connector(sides={"A": SideInfo("clip", enc.identity(), ["text", "image"], enc.dim, "text"),
                            "B": SideInfo("other", ident_b, ["text", "image"], enc.dim, "text")},
                     projectors={"A": make_projector(arch), "B": make_projector(arch)},
                     architecture={"A": arch, "B": arch})
    conn.save(conn_dir)
    conn = Connector.load(conn_dir)
    rng = np.random.default_rng(0)
    # clustered rows like real embeddings: 1000 centres, rows at cos ~0.8 to theirs
    centres = rng.standard_normal((1000, cfg.out_dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    store = Store.create(gal_dir, modality="image", encoder=conn.projected_identity("B", ident_b),
                         dim=cfg.out_dim, dtype="float32")
    step = 50_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        noise = rng.standard_normal((n, cfg.out_dim)).astype(np.float32) * (0.75 / np.sqrt(cfg.out_dim))
        x = centres[rng.integers(0, 1000, n)] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.append_part([f"img{i:07d}" for i in range(start, start + n)], x,
                          {"label": [f"c{i % 1000}" for i in range(start, start + n)]}, source=f"bench-{start}")
    build_index(store, progress=False)
    return conn_dir, gal_dir, spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def phase(url: str, make_request, clients: int, seconds: float, pid: int) -> dict:  # noqa: ANN001
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    rss: list[float] = []

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            n = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = make_request(c, i, n)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:80]}")
                    else:
                        lat.append((time.perf_counter() - t) * 1000)
                except Exception as e:  # noqa: BLE001 - count every failure
                    errors.append(type(e).__name__)
                n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(rss_mb(pid))
        time.sleep(1.0)
    for t in threads:
        t.join()
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors))[:3],
            "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "qps": len(lat) / seconds,
            "rss_mb_first": rss[0] if rss else float("nan"), "rss_mb_last": rss[-1] if rss else float("nan"),
            "rss_mb_max": max(rss) if rss else float("nan")}


def in_process_baseline(conn_dir: Path, gal_dir: Path, spec: str, repeats: int = 30) -> float:
    """Median ms of the same text query without HTTP (encode + project + index search)."""
    from cmcr.service import SearchService

    svc = SearchService(conn_dir, [gal_dir], encoders=[spec])
    name = next(iter(svc.galleries))
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        q, _ = svc.embed_text(CAPTIONS[i % len(CAPTIONS)])
        svc.search(q, name, 10)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmcr-bench-serve"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    conn_dir, gal_dir, spec = build(args.work, args.rows)
    print(f"setup: connector + {args.rows}-row gallery in {time.perf_counter() - t:.1f} s ({gal_dir})")
    baseline = in_process_baseline(conn_dir, gal_dir, spec)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cmcr.cli", "serve", "-c", str(conn_dir), "-g", str(gal_dir),
                             "-e", spec, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import httpx

        t = time.perf_counter()
        while True:
            try:
                httpx.get(url + "/api/health", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit(proc.stderr.read().decode()) from None
                time.sleep(0.2)
        print(f"server up in {time.perf_counter() - t:.1f} s (pid {proc.pid}, RSS {rss_mb(proc.pid):.0f} MB)")
        gallery = gal_dir.name
        text = phase(url, lambda c, i, n: c.post("/api/search", json={
            "text": CAPTIONS[(i + n) % len(CAPTIONS)], "gallery": gallery, "k": 10}), args.clients, args.seconds,
            proc.pid)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpeg = buf.getvalue()
        media = phase(url, lambda c, i, n: c.post("/api/search/media", files={"file": ("q.jpg", jpeg)},
                                                  data={"gallery": gallery, "k": "10"}),
                      args.clients, args.seconds, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nload test: {args.clients} concurrent clients x {args.seconds:g} s per phase, gallery {args.rows} rows, "
          f"{os.cpu_count()} cores; query encoder {spec}")
    print(f"{'phase':<14}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'req/s':>8}"
          f"{'RSS first':>11}{'RSS last':>10}{'RSS max':>9}")
    for name, r in (("text query", text), ("image upload", media)):
        print(f"{name:<14}{r['requests']:>9}{r['errors']:>7}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['qps']:>8.1f}{r['rss_mb_first']:>11.0f}{r['rss_mb_last']:>10.0f}{r['rss_mb_max']:>9.0f}")
    print(f"in-process baseline (same text query, no HTTP, one caller): median {baseline:.1f} ms; "
          f"HTTP p50 / baseline = {text['p50_ms'] / baseline:.2f}x (with {args.clients} clients queueing on 2 cores)")
    print(json.dumps({"text": text, "image_upload": media, "baseline_ms": baseline}))


if __name__ == "__main__":
    main()
