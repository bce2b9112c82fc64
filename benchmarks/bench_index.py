"""Index planner benchmark: does the auto index beat exact (flat) search, at what recall, built how fast?

For each data set the script writes a store, runs ``build_index(store)`` (auto: plan, tune, check
against flat, fall back), then measures **side by side in the same run** (A/B pairs repeated,
min and median printed):

* batch mode: 1000 held-out queries in one ``search`` call, k = 10, flat (``IndexFlatIP`` over
  every row, float32) vs the saved index as served (``open_index``: memory-mapped, saved
  ``nprobe`` / ``efSearch``);
* single-query mode: ``--single`` held-out queries answered one call each;
* recall@10 of the saved index on the held-out queries against exact search (not leave-one-out);
* the build's own flat-speed estimate (timed on the first rows, scaled) against the real flat.

Data sets (``--data``):

* ``clustered``: like real embeddings (CLIP images): ``--centres`` centres uniform on the sphere, each
  row at cosine uniform in [0.70, 0.85] to its centre (the rest of the row is random);
* ``uniform``: uniform random unit rows — no near neighbours; the hard case where no ANN index
  wins and the planner must end no slower than flat.

Usage::

    python benchmarks/bench_index.py                          # 200,000 rows, both data sets
    python benchmarks/bench_index.py --rows 1000000           # reference size (issue 11)
    python benchmarks/bench_index.py --rows 1000000 --data clustered --json out.json
    python benchmarks/bench_index.py --rows 10000000 --data clustered --memory-budget 12 --workdir W --keep

Above ``--flat-rows`` (2M) rows the flat side holds only the first 2M rows (float32 in RAM) and its times
are scaled linearly to every row; recall stays against exact search over every row (streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cmcr.stores.index import build_index, open_index
from cmcr.stores.store import Store


def clustered(rows: int, dim: int, seed: int, centres: int, chunk: int = 100_000):
    """Yield ``(n, dim) float16`` chunks of clustered unit rows. The centres are the same for every
    ``seed`` (so another seed gives held-out queries of the same distribution)."""
    gen = np.random.default_rng(12345)
    c = gen.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        ctr = c[rng.integers(0, centres, n)]
        cos = rng.uniform(0.70, 0.85, (n, 1)).astype(np.float32)
        u = rng.standard_normal((n, dim)).astype(np.float32)
        u -= (u * ctr).sum(1, keepdims=True) * ctr  # orthogonal to the centre
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        yield (cos * ctr + np.sqrt(1 - cos**2) * u).astype(np.float16)


def uniform(rows: int, dim: int, seed: int, centres: int = 0, chunk: int = 100_000):
    """Yield ``(n, dim) float16`` chunks of uniform random unit rows."""
    rng = np.random.default_rng(seed)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        x = rng.standard_normal((n, dim)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


DATA = {"clustered": clustered, "uniform": uniform}


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def single(index, q: np.ndarray, k: int) -> None:  # noqa: ANN001
    for i in range(len(q)):
        index.search(q[i:i + 1], k)


def run(name: str, args: argparse.Namespace, work: Path) -> dict:
    gen = DATA[name]
    path = work / name
    t = time.perf_counter()
    if args.reuse and (path / "manifest.json").is_file() and Store.open(path).num_rows == args.rows:
        store = Store.open(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
        store = Store.create(path, modality="image", encoder={"family": "bench", "data": name}, dim=args.dim)
        pos = 0
        for x in gen(args.rows, args.dim, 0, args.centres, chunk=args.part_rows):
            store.append_part([f"r{i}" for i in range(pos, pos + len(x))], x, source=f"p{pos}")
            pos += len(x)
    write_s = time.perf_counter() - t
    print(f"\n== {name}: {args.rows:,} x {args.dim} float16 (store written in {write_s:.1f} s)")

    t = time.perf_counter()
    info = build_index(store, progress=False, memory_budget_bytes=int(args.memory_budget * 2**30))
    build_wall = time.perf_counter() - t
    print(f"build: {info['kind']} {info['factory']} {info['params']} in {build_wall:.1f} s "
          f"(train {info['train_seconds']:.1f}, add {info['add_seconds']:.1f}, tune+check {info['tune_seconds']:.1f}); "
          f"leave-one-out recall@10 {info['recall_at_10']:.3f}")
    for r in info["decision"]["reasons"]:
        print(f"  - {r}")

    # held-out queries and their exact answers
    q = np.concatenate(list(gen(args.queries, args.dim, 99, args.centres))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # flat side: IndexFlatIP over every row (float32 in RAM), or over the first --flat-rows rows with its
    # times scaled by rows / flat rows (exact search is linear in rows) when every row would not fit
    flat_rows = min(args.rows, args.flat_rows)
    scale = args.rows / flat_rows
    flat = faiss.IndexFlatIP(args.dim)
    for batch in store.iter_batches(65536, dtype=np.float32):
        flat.add(batch.embeddings[:flat_rows - flat.ntotal])
        if flat.ntotal >= flat_rows:
            break
    if scale > 1:
        from cmcr.stores.index import _exact_topk

        t = time.perf_counter()
        exact = _exact_topk(store, q, 10, store.metric, 65536)  # streamed over every row
        print(f"exact answers of {len(q)} held-out queries streamed over all {args.rows:,} rows in "
              f"{time.perf_counter() - t:.1f} s; flat timed on the first {flat_rows:,} rows x {scale:g}")
    else:
        _, exact = flat.search(q, 10)
    index = open_index(store)  # as served: memory-mapped, saved nprobe / efSearch
    _, got = index.search_arrays(q, 10)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got, exact, strict=True)]))

    qs = q[:args.single]
    fb, ib, fs, is_ = [], [], [], []
    for _ in range(args.repeat):
        fb.append(timed(lambda: flat.search(q, 10)) * scale)
        ib.append(timed(lambda: index.index.search(q, 10)))
        fs.append(timed(lambda: single(flat, qs, 10)) * scale)
        is_.append(timed(lambda: single(index.index, qs, 10)))
    nq, ns = len(q), len(qs)
    res = {
        "data": name, "rows": args.rows, "dim": args.dim, "kind": info["kind"], "factory": info["factory"],
        "params": info["params"], "build_seconds": round(build_wall, 1), "write_seconds": round(write_s, 1),
        "recall_loo": info["recall_at_10"], "recall_heldout": round(recall, 4),
        "flat_batch_qps": [round(nq / max(fb), 1), round(nq / statistics.median(fb), 1), round(nq / min(fb), 1)],
        "index_batch_qps": [round(nq / max(ib), 1), round(nq / statistics.median(ib), 1), round(nq / min(ib), 1)],
        "flat_single_qps": [round(ns / max(fs), 1), round(ns / statistics.median(fs), 1), round(ns / min(fs), 1)],
        "index_single_qps": [round(ns / max(is_), 1), round(ns / statistics.median(is_), 1),
                             round(ns / min(is_), 1)],
        "build_speed_estimate": info.get("speed"), "flat_rows_timed": flat_rows,
    }
    # ratios of paired runs (flat time / index time of the same repeat): min and median
    rb = sorted(f / i for f, i in zip(fb, ib, strict=True))
    rs = sorted(f / i for f, i in zip(fs, is_, strict=True))
    res["batch_speedup"] = {"min": round(rb[0], 2), "median": round(statistics.median(rb), 2)}
    res["single_speedup"] = {"min": round(rs[0], 2), "median": round(statistics.median(rs), 2)}
    print(f"held-out recall@10 {recall:.3f} ({nq} queries, exact = "
          f"{'IndexFlatIP over every row' if scale == 1 else 'streamed exact search over every row'})")
    print(f"batch ({nq} queries, {args.repeat} A/B pairs): flat {res['flat_batch_qps'][1]:,.0f} q/s, index "
          f"{res['index_batch_qps'][1]:,.0f} q/s (medians); index/flat speed ratio min {rb[0]:.2f}x, "
          f"median {statistics.median(rb):.2f}x")
    print(f"single ({ns} queries one by one, {args.repeat} A/B pairs): flat {res['flat_single_qps'][1]:,.1f} q/s, "
          f"index {res['index_single_qps'][1]:,.1f} q/s; index/flat speed ratio min {rs[0]:.2f}x, "
          f"median {statistics.median(rs):.2f}x")
    sp = info.get("speed")
    if sp:
        print(f"build-time estimate (flat timed on {sp['flat_rows_timed']:,} rows, scaled): batch "
              f"{sp['batch_speedup']:.2f}x, single {sp['single_speedup']:.2f}x; flat estimate "
              f"{sp['flat_batch_qps']:,.0f} q/s batch vs {res['flat_batch_qps'][1]:,.0f} measured on every row")
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--data", default="clustered,uniform")
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries of the batch mode")
    ap.add_argument("--single", type=int, default=20, help="queries of the single-query mode")
    ap.add_argument("--repeat", type=int, default=3, help="A/B pairs")
    ap.add_argument("--part-rows", type=int, default=250_000)
    ap.add_argument("--memory-budget", type=float, default=2.0, help="GiB")
    ap.add_argument("--flat-rows", type=int, default=2_000_000,
                    help="the flat side holds at most this many rows (float32 in RAM) and its times are scaled "
                         "by rows / flat rows; recall is still against exact search over every row")
    ap.add_argument("--reuse", action="store_true", help="reuse a store of --workdir with the same rows")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmcr-bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run(name, args, work) for name in args.data.split(",")]
    if args.workdir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
