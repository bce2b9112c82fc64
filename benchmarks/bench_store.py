"""Store and index benchmark: write/read throughput and search speed / recall.

Prints figures (never asserts on time). Reference size (issues 2 and 11): 1,000,000 x 512 float16 rows.

Store figures are ratios to numpy measured side by side in the same run, as A/B pairs repeated
``--repeat`` times (min and median of the per-pair ratios are printed), so the load of a shared
machine cancels out as far as it can:

* write: ``Store.append_part`` (row checks + .npy + keys Parquet + sha256 + fsyncs + manifest) and
  ``import_embeddings`` of the ``.npy`` with a ``.txt`` keys file (what ``cmcr store import`` runs),
  each against ``numpy.save`` + ``fsync`` of the same matrix (target <= 3x);
* read: ``Store.open(...).embeddings()`` against ``numpy.load`` of the same matrix from ``.npy``, both
  from a warm page cache (target <= 1.5x); and the streaming read ``iter_batches`` with its peak extra
  anonymous memory (bounded by the batch, not by the store);
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
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cmcr.stores.importing import import_embeddings
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


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ratio_line(name: str, ours: list[float], base: list[float], base_name: str, target: float) -> dict[str, float]:
    """Print and return min / median of the per-pair ratios ours[i] / base[i]."""
    r = sorted(o / b for o, b in zip(ours, base, strict=True))
    fig = {"ratio_min": r[0], "ratio_median": float(np.median(r)), "s_min": min(ours), "baseline_s_min": min(base)}
    print(f"{name}: {min(ours):.3f} s (min) vs {base_name} {min(base):.3f} s -> ratio min {r[0]:.2f}x, "
          f"median {np.median(r):.2f}x over {len(r)} pairs (target <= {target}x)")
    return fig


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_during(fn) -> tuple[float, float]:  # noqa: ANN001
    """(seconds, peak extra RssAnon MiB over the value before) of ``fn()``, sampled every 5 ms."""
    import threading

    base, peak, stop = rss_anon_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_mib() - base)
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        s = timed(fn)
    finally:
        stop.set()
        th.join()
    return s, peak[0]


def save_fsync(path: Path, x: np.ndarray) -> None:
    """The write baseline: numpy.save + fsync (what any durable writer must at least pay)."""
    with open(path, "wb") as f:
        np.save(f, x)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--part-rows", type=int, default=250_000, help="rows per append_part call")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--memory-budget", type=float, default=2.0, help="GiB for the auto index")
    ap.add_argument("--repeat", type=int, default=5, help="A/B pairs per store figure (min and median printed)")
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

    load = os.getloadavg()
    figures["load_average_1_5_15"] = load
    print(f"machine load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs")

    # -- write: A/B pairs of numpy.save + fsync vs append_part vs import (.npy + keys file)
    keys_txt = work / "keys.txt"
    keys_txt.write_text("".join(k + "\n" for k in keys))
    import_src = work / "import-src.npy"
    save_fsync(import_src, x)  # flushed now: its write-back must not land inside the timed pairs
    save_s, append_s, import_s = [], [], []
    for rep in range(args.repeat):
        for what in (("numpy", "append", "import") if rep % 2 == 0 else ("import", "append", "numpy")):
            if what == "numpy":
                save_s.append(timed(lambda: save_fsync(npy_path, x)))
            elif what == "append":
                shutil.rmtree(store_path, ignore_errors=True)

                def append() -> None:
                    st = Store.create(store_path, modality="image", encoder={"family": "bench", "dim": d}, dim=d)
                    for s in range(0, n, args.part_rows):
                        e = min(n, s + args.part_rows)
                        st.append_part(keys[s:e], x[s:e], source=f"chunk-{s}")

                append_s.append(timed(append))
            else:
                out = work / "imported"
                shutil.rmtree(out, ignore_errors=True)
                import_s.append(timed(lambda: import_embeddings(import_src, out, modality="image",  # noqa: B023
                                                                encoder={"family": "bench"}, keys=keys_txt,
                                                                progress=False)))
    figures["write_append"] = ratio_line("write: append_part", append_s, save_s, "numpy.save+fsync", 3)
    figures["write_import"] = ratio_line("write: store import (.npy + keys.txt)", import_s, save_s,
                                         "numpy.save+fsync", 3)
    figures["write_rows_per_s"] = n / min(append_s)
    figures["import_rows_per_s"] = n / min(import_s)
    print(f"       append_part {n / min(append_s):,.0f} rows/s, import {n / min(import_s):,.0f} rows/s")
    shutil.rmtree(work / "imported", ignore_errors=True)
    import_src.unlink()
    store = Store.open(store_path)

    # -- read: A/B pairs of numpy.load vs Store.embeddings(), both warm (one untimed read of each first)
    np.load(npy_path)
    z = Store.open(store_path).embeddings()
    assert np.array_equal(z, x), "store read back different rows"
    del z
    load_s, read_s = [], []
    for rep in range(args.repeat):
        pair = [("numpy", lambda: np.load(npy_path)), ("store", lambda: Store.open(store_path).embeddings())]
        for name, fn in (pair if rep % 2 == 0 else pair[::-1]):
            (load_s if name == "numpy" else read_s).append(timed(fn))
    figures["read"] = ratio_line("read: Store.embeddings()", read_s, load_s, "numpy.load", 1.5)
    f32_s = timed(lambda: Store.open(store_path).embeddings(np.float32))
    print(f"       Store.embeddings(float32) {f32_s:.3f} s (converts while reading)")
    batch = 65536
    it_s, it_peak = peak_rss_during(lambda: sum(len(b.keys) for b in Store.open(store_path).iter_batches(batch)))
    figures.update(iter_batches_s=it_s, iter_batches_peak_extra_mib=it_peak,
                   iter_batches_batch_mib=batch * d * 2 / 2**20, store_mib=n * d * 2 / 2**20)
    print(f"read (streaming): iter_batches({batch}) keys + rows {it_s:.2f} s ({it_s / min(load_s):.2f}x numpy.load); "
          f"peak extra RssAnon {it_peak:,.0f} MiB for {batch * d * 2 / 2**20:,.0f} MiB batches "
          f"(the store: {n * d * 2 / 2**20:,.0f} MiB)")
    npy_path.unlink()
    keys_txt.unlink()

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
