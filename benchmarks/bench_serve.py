"""Load test of `cmcr serve` on 127.0.0.1: N concurrent clients for a bounded time, serving options A/B.

Builds (once, under --work) a connector whose side A is a random-init **ViT-B-32** (the real text tower:
realistic query cost) and side B a random stand-in, and a projected gallery of --rows rows (default
100k, flat exact index) and then measures, in one run:

1. **in process, A/B pairs** (alternated, --pairs each, min and median; distinct captions): a search from a
   new (request) thread with and without the service's FAISS thread count applied in it, the exact
   shortlist with numpy's BLAS on every core vs held to 1 thread (process CPU ms shows the spin-waits);
   torch threads 2 vs 1 for one text forward; float32 vs the opt-in int8 text tower (and their cosine agreement over
   64 captions); two queries in one forward vs two forwards; flat index vs the certified float16
   shortlist search vs an HNSW index; the whole query (embed + project + search) as served before and now;
   the HNSW index's recall@10 on text queries against exact search;
2. **over HTTP**: five servers started side by side, ``before`` (2 threads, one forward at a time, no
   batching, flat search: the old service), ``now`` (the defaults: 1 thread per query, concurrent
   forwards + micro-batching, shortlist search), ``now-int8`` (``--quantize-text int8``), and ``hnsw`` /
   ``hnsw-int8``: the same two over a copy of the gallery (hard links) with an HNSW index tuned on 1000
   projected captions (``cmcr store index --kind hnsw --queries``), text phases alternated over --rounds
   rounds so each sees the same machine load, then one image-upload phase each.
   Every text request is a **distinct** caption (the query cache never hits; cached answers are counted
   and reported). Prints p50/p90/p99, errors, req/s, the servers' RSS over time and the load average.

    python benchmarks/bench_serve.py                      # 100k gallery, 2 clients, 10 s phases
    python benchmarks/bench_serve.py --rows 20000 --seconds 5 --rounds 1

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

_SUBJ = ["a dog", "a small cat", "two children", "an old man", "a red car", "a train", "a bird", "a crowd", "a woman",
         "a brass band", "rain", "a helicopter", "the wind", "a baby", "a horse", "a violin"]
_VERB = ["barking", "running", "singing", "passing by", "playing", "laughing", "falling", "cheering", "crying",
         "whistling", "splashing", "humming"]
_WHERE = ["in a park", "on a window", "in the street", "at night", "in a stadium", "by the sea", "in a kitchen",
          "in the forest", "under a bridge", "on a farm"]


def caption(i: int) -> str:
    """The i-th of many distinct captions (every request of the load test is a new text)."""
    a, b, c = i % len(_SUBJ), (i // len(_SUBJ)) % len(_VERB), (i // (len(_SUBJ) * len(_VERB))) % len(_WHERE)
    return f"{_SUBJ[a]} {_VERB[b]} {_WHERE[c]}, take {i}"


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


def text_queries(work: Path, conn_dir: Path, spec: str, n: int = 1000) -> Path:
    """A projected store of ``n`` captions (not among the load test's) embedded like a served text query:
    the queries the gallery's HNSW index is tuned on (``cmcr store index --queries``); reused when present."""
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.store import Store
    from cmcr.trainer.connector import Connector

    path = work / f"text-queries-{n}"
    if (path / "manifest.json").is_file():
        return path
    conn = Connector.load(conn_dir)
    enc = load_encoder(spec, device="cpu")
    caps = [caption(5_000_000 + i) for i in range(n)]
    raw = np.concatenate([enc.encode("text", caps[i:i + 64]) for i in range(0, n, 64)])
    q = conn.project("A", raw, identity=enc.identity(), modality="text")
    store = Store.create(path, modality="text", encoder=conn.projected_identity("A", enc.identity()),
                         dim=q.shape[1], dtype="float32")
    store.append_part([f"q{i}" for i in range(n)], q, {"caption": caps}, source="bench-captions")
    return path


def hnsw_copy(gal_dir: Path, queries: Path) -> Path:
    """The gallery's rows under a second store folder (hard links, no copy) with a forced HNSW index tuned
    on projected text queries (``cmcr store index --kind hnsw --queries``: recall@10 of text queries
    measured and saved); reused when present."""
    import shutil

    from cmcr.stores.index import build_index, read_index_info

    dst = gal_dir.with_name(gal_dir.name + "-hnsw")
    try:
        info = read_index_info(dst)
        if info["kind"] == "hnsw" and info.get("recall_queries_from") == str(queries):
            return dst
    except Exception:  # noqa: BLE001 - missing or stale copy: rebuild it
        pass
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(gal_dir, dst, copy_function=os.link, ignore=shutil.ignore_patterns("index"))
    t = time.perf_counter()
    info = build_index(dst, kind="hnsw", progress=False, queries_from=queries)
    print(f"setup: {info['factory']} {info['params']} index of the gallery copy in {time.perf_counter() - t:.1f} s, "
          f"recall@10 {info['recall_at_10']:.3f} on {info['recall_queries']} text queries", flush=True)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


T0 = time.perf_counter()
RSS_LOG: list[tuple[float, int, float]] = []  # (seconds since start, server pid, RSS MB)


def phase(url: str, make_request, clients: int, seconds: float, pid: int) -> dict:  # noqa: ANN001
    import httpx

    lat: list[float] = []
    cached: list[bool] = []
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
                        cached.append(bool(r.json()["query"].get("cached")))
                except Exception as e:  # noqa: BLE001 - count every failure
                    errors.append(type(e).__name__)
                n += 1

    load0, cpu0 = os.getloadavg()[0], cpu_s(pid)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(rss_mb(pid))
        RSS_LOG.append((round(time.perf_counter() - T0, 1), pid, rss[-1]))
        time.sleep(1.0)
    for t in threads:
        t.join()
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors))[:3],
            "cached": sum(cached), "lat": lat, "load": [load0, os.getloadavg()[0]],
            "server_cpu_ms_per_request": (cpu_s(pid) - cpu0) * 1000 / max(1, len(lat) + len(errors)),
            "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "qps": len(lat) / seconds,
            "rss_mb_first": rss[0] if rss else float("nan"), "rss_mb_last": rss[-1] if rss else float("nan"),
            "rss_mb_max": max(rss) if rss else float("nan")}


def _ab(name: str, fa, fb, pairs: int, settle: float = 0.0) -> dict:  # noqa: ANN001
    """Time ``fa(i)`` and ``fb(i)`` alternately (order flipped every pair): min and median ms of each.

    ``settle`` (s): wait after each call inside its CPU window (not its wall time), so that threads it
    left spin-waiting (OpenBLAS, OpenMP) are charged to it and not to the next call."""
    ta: list[float] = []
    tb: list[float] = []
    ca: list[float] = []
    cb: list[float] = []
    for i in range(pairs):
        order = ((fa, ta, ca), (fb, tb, cb)) if i % 2 == 0 else ((fb, tb, cb), (fa, ta, ca))
        for f, ts, cs in order:
            t, c = time.perf_counter(), time.process_time()
            f(i)
            ts.append((time.perf_counter() - t) * 1000)
            time.sleep(settle)
            cs.append((time.process_time() - c) * 1000)
    ta, tb, ca, cb = ta[1:], tb[1:], ca[1:], cb[1:]  # first pair: warm-up
    return {"name": name, "a_min": min(ta), "a_med": statistics.median(ta), "b_min": min(tb),
            "b_med": statistics.median(tb), "ratio_med": statistics.median(ta) / statistics.median(tb),
            "ratio_min": min(ta) / min(tb), "a_cpu_med": statistics.median(ca), "b_cpu_med": statistics.median(cb)}


def in_process(conn_dir: Path, gal_dir: Path, hnsw_dir: Path, spec: str, pairs: int) -> tuple[list[dict], dict]:
    """In-process A/B pairs of the serving options (see the module docstring) and the int8 agreement."""
    import itertools

    from cmcr.pipeline.openclip_encoder import Int8TextTower
    from cmcr.service import SearchService, open_gallery, set_threads
    from cmcr.stores.store import Store

    svc = SearchService(conn_dir, [gal_dir], encoders=[spec], cache_size=0, threads=1)
    name = next(iter(svc.galleries))
    g = svc.galleries[name]
    enc = svc.encoders[0][0]
    int8 = Int8TextTower(enc.model)
    shortlist = g.shortlist
    hg = open_gallery(Store.open(hnsw_dir))
    ctr = itertools.count(10**6)

    def fwd(texts: list[str], q8: bool = False, threads: int = 1):  # noqa: ANN202
        set_threads(threads)
        enc._int8_text = int8 if q8 else None
        return enc.encode("text", texts)

    def query(threads: int, short: bool, q8: bool, hnsw: bool = False) -> None:
        set_threads(threads)
        enc._int8_text = int8 if q8 else None
        g.shortlist = shortlist if short else None
        q = svc.embed_text(caption(next(ctr)))[0]
        hg.search(q, 10) if hnsw else svc.search(q, name, 10)

    qs = [svc.embed_text(caption(i))[0] for i in range(pairs)]

    def search(i: int, short: bool) -> None:
        g.shortlist = shortlist if short else None
        g.search(qs[i], 10)

    def in_thread(fn) -> None:  # noqa: ANN001
        """Run ``fn`` in a new thread, as the HTTP server's request threads do (OpenMP's count is per thread)."""
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    def blas(n: int, fn) -> None:  # noqa: ANN001
        import threadpoolctl

        with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
            fn()

    rows = [
        _ab("shortlist search in a request thread: FAISS threads not applied (A) vs applied (B)",
            lambda i: in_thread(lambda: shortlist.search(qs[i] / np.linalg.norm(qs[i]), 10)),
            lambda i: in_thread(lambda: search(i, True)), pairs, settle=0.3),
        _ab("HNSW search in a request thread: FAISS threads not applied (A) vs applied (B)",
            lambda i: in_thread(lambda: hg.index.search_arrays(qs[i][None], k=10)),
            lambda i: in_thread(lambda: hg.search(qs[i], 10)), pairs, settle=0.3),
        _ab("shortlist search: numpy BLAS on every core (A) vs held to 1 thread (B)",
            lambda i: blas(os.cpu_count() or 1, lambda: search(i, True)), lambda i: blas(1, lambda: search(i, True)),
            pairs, settle=0.3),
        _ab("text forward: 2 threads (A) vs 1 thread (B)",
            lambda i: fwd([caption(next(ctr))], threads=2), lambda i: fwd([caption(next(ctr))]), pairs),
        _ab("text forward, 1 thread: float32 (A) vs int8 (B)",
            lambda i: fwd([caption(next(ctr))]), lambda i: fwd([caption(next(ctr))], q8=True), pairs),
        _ab("2 queries: 2 forwards (A) vs 1 batched forward (B)",
            lambda i: (fwd([caption(next(ctr))]), fwd([caption(next(ctr))])),
            lambda i: fwd([caption(next(ctr)), caption(next(ctr))]), pairs),
        _ab(f"search {g.store.num_rows} rows, k=10: flat index (A) vs certified fp16 shortlist (B)",
            lambda i: search(i, False), lambda i: search(i, True), pairs),
        _ab(f"search {g.store.num_rows} rows, k=10: certified fp16 shortlist (A) vs HNSW index (B)",
            lambda i: search(i, True), lambda i: hg.search(qs[i], 10), pairs),
        _ab("whole query: before (2 threads, flat) (A) vs now (1 thread, shortlist) (B)",
            lambda i: query(2, False, False), lambda i: query(1, True, False), pairs),
        _ab("whole query: now float32 (A) vs now int8 text (B)",
            lambda i: query(1, True, False), lambda i: query(1, True, True), pairs),
        _ab("whole query, int8 text: exact shortlist (A) vs HNSW index (B)",
            lambda i: query(1, True, True), lambda i: query(1, True, True, hnsw=True), pairs),
    ]
    exact_hits = [{h["row"] for h in g.search(q, 10)} for q in qs]
    hnsw_recall = float(np.mean([len(e & {h["row"] for h in hg.search(q, 10)}) / 10
                                 for q, e in zip(qs, exact_hits, strict=True)]))
    caps = [caption(i) for i in range(64)]
    ref, q8 = fwd(caps), fwd(caps, q8=True)
    cos = (ref * q8).sum(axis=1)
    overlap = []
    for a, b in zip(ref, q8, strict=True):
        pa = svc.connector.project("A", a[None], identity=enc.identity(), modality="text")[0]
        pb = svc.connector.project("A", b[None], identity=enc.identity(), modality="text")[0]
        ha = {h["row"] for h in g.search(pa, 10)}
        overlap.append(len(ha & {h["row"] for h in g.search(pb, 10)}) / 10)
    g.shortlist, enc._int8_text = shortlist, None
    agree = {"captions": len(caps), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
             "top10_overlap_mean": float(np.mean(overlap)), "top10_overlap_min": float(np.min(overlap)),
             "hnsw_recall_at_10": hnsw_recall, "hnsw_queries": len(qs)}
    return rows, agree


SERVERS = {"before": ["--threads", "2", "--max-batch", "1", "--no-shortlist", "--query-cache", "0"],
           "now": [], "now-int8": ["--quantize-text", "int8"], "hnsw": [], "hnsw-int8": ["--quantize-text", "int8"]}
#: servers whose gallery is the HNSW-indexed copy (:func:`hnsw_copy`) instead of the exact one
HNSW_SERVERS = ("hnsw", "hnsw-int8")


def start_server(conn_dir: Path, gal_dir: Path, spec: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cmcr.cli", "serve", "-c", str(conn_dir), "-g", str(gal_dir),
                             "-e", spec, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str) -> None:
    import httpx

    while True:
        try:
            httpx.get(url + "/api/health", timeout=1)
            return
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read().decode()) from None
            time.sleep(0.5)


def _q(lat: list[float], p: float) -> float:
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")


def main() -> None:
    import itertools

    from cmcr.stores.index import read_index_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one phase")
    ap.add_argument("--rounds", type=int, default=2, help="alternated text phases per server")
    ap.add_argument("--pairs", type=int, default=15, help="A/B pairs per in-process comparison")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="which of " + ",".join(SERVERS) + " to load-test (empty: the in-process part only)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmcr-bench-serve"))
    args = ap.parse_args()
    if args.pairs < 2:
        ap.error("--pairs must be >= 2 (the first pair of each comparison is a warm-up)")
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    conn_dir, gal_dir, spec = build(args.work, args.rows)
    hnsw_dir = hnsw_copy(gal_dir, text_queries(args.work, conn_dir, spec))
    print(f"setup: connector + {args.rows}-row gallery in {time.perf_counter() - t:.1f} s ({gal_dir}); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    ab_rows, agree = in_process(conn_dir, gal_dir, hnsw_dir, spec, args.pairs)
    print(f"\nin process (one caller, distinct captions, {args.pairs} A/B pairs each, load average "
          f"{os.getloadavg()[0]:.1f}):")
    print(f"{'comparison (wall ms; CPU ms = process CPU time, median)':<78}{'A min':>8}{'A med':>8}{'B min':>8}"
          f"{'B med':>8}{'A/B med':>9}{'A/B min':>9}{'A CPU':>8}{'B CPU':>8}")
    for r in ab_rows:
        print(f"{r['name']:<78}{r['a_min']:>8.1f}{r['a_med']:>8.1f}{r['b_min']:>8.1f}{r['b_med']:>8.1f}"
              f"{r['ratio_med']:>9.2f}{r['ratio_min']:>9.2f}{r['a_cpu_med']:>8.1f}{r['b_cpu_med']:>8.1f}")
    print("(a 1-thread variant's CPU ms is about its wall time on an idle machine; 2 threads add both "
          "threads' time, spin-waits included)")
    print(f"int8 vs float32 text embeddings over {agree['captions']} captions: cos min {agree['cos_min']:.4f}, "
          f"mean {agree['cos_mean']:.4f}; top-10 hits shared: mean {agree['top10_overlap_mean']:.2f}, "
          f"min {agree['top10_overlap_min']:.2f} (random-init weights)", flush=True)
    print(f"HNSW gallery index vs exact search: recall@10 {agree['hnsw_recall_at_10']:.3f} over "
          f"{agree['hnsw_queries']} text queries (the index's own, saved: {read_index_info(hnsw_dir)['recall_at_10']})",
          flush=True)

    names = [n for n in args.servers.split(",") if n]
    if not names:  # --servers "": the in-process comparisons only
        print(json.dumps({"in_process": ab_rows, "int8_agreement": agree}))
        return
    gals = {n: hnsw_dir if n in HNSW_SERVERS else gal_dir for n in names}
    servers = {n: start_server(conn_dir, gals[n], spec, SERVERS[n]) for n in names}
    ctr = itertools.count()
    text: dict[str, list[dict]] = {n: [] for n in names}
    media: dict[str, dict] = {}
    try:
        for n, (proc, url) in servers.items():
            t = time.perf_counter()
            wait_up(proc, url)
            print(f"server {n} up in {time.perf_counter() - t:.1f} s (pid {proc.pid}, RSS {rss_mb(proc.pid):.0f} MB)",
                  flush=True)
        for n, (proc, url) in servers.items():  # warm-up, not counted: first forwards, index pages, threads
            phase(url, lambda c, i, k, g=gals[n].name: c.post("/api/search", json={
                "text": caption(next(ctr)), "gallery": g, "k": 10}), args.clients, 2.0, proc.pid)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                proc, url = servers[n]
                text[n].append(phase(url, lambda c, i, k, g=gals[n].name: c.post("/api/search", json={
                    "text": caption(next(ctr)), "gallery": g, "k": 10}), args.clients, args.seconds, proc.pid))
                print(f"  round {r + 1} {n:<9} text p50 {text[n][-1]['p50_ms']:.1f} ms, load {text[n][-1]['load']}",
                      flush=True)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpeg = buf.getvalue()
        for n, (proc, url) in servers.items():
            media[n] = phase(url, lambda c, i, k, g=gals[n].name: c.post(
                "/api/search/media", files={"file": ("q.jpg", jpeg)}, data={"gallery": g, "k": "10"}),
                             args.clients, args.seconds, proc.pid)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nload test: {args.clients} concurrent clients, {args.rounds} x {args.seconds:g} s text phases per server "
          f"(alternated), 1 x {args.seconds:g} s image phase; gallery {args.rows} rows; {os.cpu_count()} cores; "
          f"query encoder {spec}; every text request a distinct caption")
    print(f"{'server':<10}{'phase':<14}{'requests':>9}{'errors':>7}{'cached':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'req/s':>8}{'CPU ms/req':>11}{'RSS first':>11}{'RSS last':>10}{'RSS max':>9}{'load':>12}")
    summary: dict[str, dict] = {}
    for n in names:
        lat = [x for p in text[n] for x in p["lat"]]
        agg = {"requests": len(lat), "errors": sum(p["errors"] for p in text[n]),
               "cached": sum(p["cached"] for p in text[n]), "p50_ms": _q(lat, 0.5), "p90_ms": _q(lat, 0.9),
               "p99_ms": _q(lat, 0.99), "qps": len(lat) / (args.seconds * len(text[n])),
               "rss_mb_first": text[n][0]["rss_mb_first"], "rss_mb_last": text[n][-1]["rss_mb_last"],
               "rss_mb_max": max(p["rss_mb_max"] for p in text[n]),
               "load": [min(p["load"][0] for p in text[n]), max(p["load"][1] for p in text[n])],
               "error_kinds": sorted({e for p in text[n] for e in p["error_kinds"]}),
               "server_cpu_ms_per_request": statistics.median(p["server_cpu_ms_per_request"] for p in text[n])}
        summary[n] = {"text": agg, "image_upload": {k: v for k, v in media[n].items() if k != "lat"},
                      "text_rounds_p50_ms": [p["p50_ms"] for p in text[n]]}
        for ph, r in (("text query", agg), ("image upload", media[n])):
            print(f"{n:<10}{ph:<14}{r['requests']:>9}{r['errors']:>7}{r['cached']:>7}{r['p50_ms']:>9.1f}"
                  f"{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['qps']:>8.1f}{r['server_cpu_ms_per_request']:>11.1f}"
                  f"{r['rss_mb_first']:>11.0f}"
                  f"{r['rss_mb_last']:>10.0f}{r['rss_mb_max']:>9.0f}{r['load'][0]:>6.1f}-{r['load'][1]:<5.1f}")
    if "before" in names:
        for n in names:
            if n == "before":
                continue
            ratios = [b["p50_ms"] / a["p50_ms"] for a, b in zip(text[n], text["before"], strict=True)]
            print(f"text p50 before / {n}, per round: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x")
    print("CPU ms/req: the server's CPU time (all threads) per answered request; with 1 thread per query and "
          "no more clients than cores, about the p50 an idle machine would give")
    goal = {n: summary[n]["text"]["p50_ms"] <= 50 and summary[n]["text"]["errors"] == 0 for n in names}
    print("goal (text p50 <= 50 ms, no errors): " + ", ".join(f"{n} {'met' if v else 'NOT met'}"
                                                                for n, v in goal.items()))
    pids = {proc.pid: n for n, (proc, _) in servers.items()}
    print("server RSS over time (s: MB): " + "; ".join(
        f"{n} " + " ".join(f"{t:.0f}:{m:.0f}" for t, p, m in RSS_LOG[::max(1, len(RSS_LOG) // 40)] if pids[p] == n)
        for n in names))
    print(json.dumps({"in_process": ab_rows, "int8_agreement": agree, "servers": summary,
                      "clients": args.clients, "rows": args.rows, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
