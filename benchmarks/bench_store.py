"""Store and index benchmark: write/read throughput and search speed / recall.

Prints figures (never asserts on time). Reference size (issue 2): 1,000,000 x 512 float16 rows:

* write: rows/s of ``Store.append_part`` (validation + Parquet + sha256 + manifest);
* read: ``Store.embeddings()`` time as a ratio to ``numpy.load`` of the same matrix from ``.npy``
  (same run, warm page cache; target <= 3x);
* search: exact (``IndexFlatIP``) and auto index queries/s (1000 queries, k=10, batched), and the auto
  index's recall@10 (target >= 0.95) — both the leave-one-out figure saved in ``index.json`` and
  recall on held-out queries from the same distribution.

Rows are synthetic but structured like real embeddings: a 64-d latent mixture of overlapping
Gaussians (one cluster per ~1000 rows, spread ``LATENT_NOISE`` = centre spread) mapped linearly to
``dim`` plus isotropic noise, L2-normalised.
(Uniform random unit vectors in 512-d have no near neighbours and make every ANN index look bad.)

Usage::

    python benchmarks/bench_store.py                  # 120,000 rows (a couple of minutes on 2 cores)
    python benchmarks/bench_store.py --rows 1000000   # reference size
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cmcr.stores.index import build_index, open_index, plan_index
from cmcr.stores.store import Store

#: Spread of rows around their cluster centre in the latent space (centres have unit spread): at 1.0
#: clusters overlap, so near neighbours often lie in other clusters / IVF lists, as in real embeddings.
LATENT_NOISE = 1.0


def synthetic(rows: int, dim: int, seed: int, clusters: int, latent: int = 64, chunk: int = 100_000) -> np.ndarray:
    """``(rows, dim) float16`` clustered unit rows; ``seed`` draws the rows, the space (centres,
    projection) is the same for every seed, so different seeds give held-out samples."""
    rng = np.random.default_rng(seed)
    gen = np.random.default_rng(12345)  # the space (centres, projection) is shared by every seed
    centres = gen.standard_normal((clusters, latent)).astype(np.float32)
    proj = gen.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    out = np.empty((rows, dim), dtype=np.float16)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        z = centres[rng.integers(0, clusters, n)] + LATENT_NOISE * rng.standard_normal((n, latent)).astype(np.float32)
        x = z @ proj + 0.25 * rng.standard_normal((n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + n] = x
    return out


def best_of(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--part-rows", type=int, default=250_000, help="rows per append_part call")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--memory-budget", type=float, default=2.0, help="GiB for the auto index")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for read timings")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--no-index", action="store_true", help="skip the search part")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cmcr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path, npy_path = work / "store", work / "emb.npy"
    shutil.rmtree(store_path, ignore_errors=True)
    n, d = args.rows, args.dim
    figures: dict[str, object] = {"rows": n, "dim": d, "dtype": "float16", "faiss_threads": faiss.omp_get_max_threads()}
    print(f"cmcr store benchmark: {n:,} x {d} float16, faiss threads {faiss.omp_get_max_threads()}, in {work}")

    t = time.perf_counter()
    clusters = max(n // 1000, 16)
    x = synthetic(n, d, seed=0, clusters=clusters)
    keys = [f"row-{i:09d}" for i in range(n)]
    print(f"generated data in {time.perf_counter() - t:.1f} s")

    # -- write
    store = Store.create(store_path, modality="image", encoder={"family": "bench", "dim": d}, dim=d)
    t = time.perf_counter()
    for s in range(0, n, args.part_rows):
        e = min(n, s + args.part_rows)
        store.append_part(keys[s:e], x[s:e], source=f"chunk-{s}")
    write_s = time.perf_counter() - t
    figures["write_rows_per_s"] = n / write_s
    print(f"write: {n / write_s:,.0f} rows/s ({write_s:.2f} s, {len(store.parts)} parts, "
          f"{sum((store_path / p.file).stat().st_size for p in store.parts) / 2**20:,.0f} MiB)")

    # -- read vs numpy.load (same matrix, same run; both served from the page cache)
    np.save(npy_path, x)
    np_s, y = best_of(lambda: np.load(npy_path), args.repeat)
    del y
    st_s, z = best_of(lambda: Store.open(store_path).embeddings(), args.repeat)
    assert np.array_equal(z, x), "store read back different rows"
    del z
    it_s, _ = best_of(lambda: sum(len(b.keys) for b in Store.open(store_path).iter_batches(65536)), 1)
    figures.update(read_numpy_load_s=np_s, read_store_s=st_s, read_ratio=st_s / np_s, iter_batches_s=it_s)
    print(f"read:  numpy.load {np_s:.3f} s, Store.embeddings() {st_s:.3f} s -> ratio {st_s / np_s:.2f}x "
          f"(target <= 3x); iter_batches (keys + rows) {it_s:.2f} s")
    npy_path.unlink()

    if not args.no_index:
        # held-out queries from the same distribution
        q = synthetic(args.queries, d, seed=1, clusters=clusters).astype(np.float32)
        xf = x.astype(np.float32)
        flat = faiss.IndexFlatIP(d)
        flat.add(xf)
        del xf
        ex_s, (_, exact) = best_of(lambda: flat.search(q, 10), 1)
        del flat
        figures["exact_queries_per_s"] = args.queries / ex_s
        print(f"exact search (IndexFlatIP, {args.queries} queries, k=10): {args.queries / ex_s:,.0f} queries/s")

        budget = int(args.memory_budget * 1024**3)
        plan = plan_index(n, d, budget)
        print(f"auto plan: {plan['factory']} {plan['params']} - {plan['reason']}")
        info = build_index(store, memory_budget_bytes=budget, sample_queries=args.queries)
        index = open_index(store)
        ap_s, (_, rows) = best_of(lambda: index.search_arrays(q, 10), 2)
        held_out = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact, strict=True)]))
        figures.update(index_kind=info["kind"], index_factory=info["factory"], index_params=info["params"],
                       index_build_s=info["build_seconds"], index_train_s=info["train_seconds"],
                       index_add_s=info["add_seconds"], index_file_mib=info["file_bytes"] / 2**20,
                       auto_queries_per_s=args.queries / ap_s, recall_at_10_leave_one_out=info["recall_at_10"],
                       recall_at_10_held_out=held_out)
        print(f"auto index: {info['factory']} {info['params']}, built in {info['build_seconds']:.1f} s "
              f"(train {info['train_seconds']:.1f} s, add {info['add_seconds']:.1f} s), "
              f"{info['file_bytes'] / 2**20:,.0f} MiB")
        print(f"auto search: {args.queries / ap_s:,.0f} queries/s; recall@10 {info['recall_at_10']:.3f} "
              f"(leave-one-out, saved in index.json), {held_out:.3f} (held-out queries) (target >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
