"""Benchmark: the local encode engine vs the Ray Data engine (local mode) on the same shards.

Prints samples/s of both engines, their ratio, and what Ray costs before the first result
(``ray.init``, actor start-up + model load in each replica). Synthetic JPEG images (random
pixels, fixed seed) are sharded with ``cmcr shard``'s writer into a temp folder; the encoder is a
random-init model (default: the 3.4 M-parameter ``cmcr-tiny-clip``; pass
``--encoder open_clip:ViT-B-32@random`` for a realistic model size).

Default run (~1-3 min on 2 cores): 768 images in 12 shards, batch 32, 2 Ray replicas.

    python benchmarks/bench_ray.py
    python benchmarks/bench_ray.py --samples 4096 --shards 32 --encoder open_clip:ViT-B-32@random --replicas 2
    python benchmarks/bench_ray.py --json bench_ray.json

Not a test: nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` random-pixel JPEGs of ``size`` x ``size`` in ``folder`` (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"img{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=768, help="images to encode")
    ap.add_argument("--shards", type=int, default=12, help="shards they are split into")
    ap.add_argument("--size", type=int, default=160, help="image side in pixels")
    ap.add_argument("--encoder", default="open_clip:cmcr-tiny-clip@random", help="encoder spec")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2, help="local engine: DataLoader workers")
    ap.add_argument("--replicas", type=int, default=2, help="Ray: encoder actors")
    ap.add_argument("--cpus-per-replica", type=float, default=0.5,
                    help="Ray: CPUs reserved per actor (2 x 0.5 leaves 1 CPU for preprocessing on 2 cores)")
    ap.add_argument("--ray-cpus", type=int, default=None, help="Ray local mode: CPUs (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np

    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.ray_engine import encode_shards_ray, import_ray
    from cmcr.pipeline.shards import write_shards
    from cmcr.stores.store import Store

    ray = import_ray()
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        make_images(tmp_path / "images", args.samples, args.size)
        per_shard = -(-args.samples // args.shards)
        shards = write_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=per_shard).shards["image"]
        print(f"data: {args.samples} images {args.size}x{args.size} in {len(shards)} shards "
              f"({time.perf_counter() - t:.1f} s to make); encoder {args.encoder}; batch {args.batch_size}; "
              f"{os.cpu_count()} CPUs")

        t = time.perf_counter()
        enc = load_encoder(args.encoder, device="cpu")
        load_s = time.perf_counter() - t
        import torch

        threads = torch.get_num_threads()  # torch's default: one per core
        local = encode_shards(shards, enc, "image", tmp_path / "local", batch_size=args.batch_size,
                              num_workers=args.num_workers, progress=False, torch_threads=threads)
        print(f"local engine, torch's {threads} threads: {local.wall_s:.2f} s, {local.samples_per_s:.1f} samples/s "
              f"(model busy {100 * local.model_busy:.0f}%, model load {load_s:.2f} s not counted)")
        # encode_shards' default on a CPU: CPUs - workers threads (the Ray actors run with one thread each;
        # on 2 cores, torch's default threads + 2 decode workers oversubscribe the CPUs)
        local1 = encode_shards(shards, enc, "image", tmp_path / "local-1thread", batch_size=args.batch_size,
                               num_workers=args.num_workers, progress=False)
        print(f"local engine, default {local1.torch_threads} thread(s): {local1.wall_s:.2f} s, "
              f"{local1.samples_per_s:.1f} samples/s (model {local1.model_s:.2f} s vs {local.model_s:.2f} s with "
              f"{threads} threads)")

        t = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        runs = []
        for name in ("ray-1", "ray-2"):  # ray-2: Ray already up, but actors start again (new pipeline)
            rep = encode_shards_ray(shards, args.encoder, "image", tmp_path / name, batch_size=args.batch_size,
                                    replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                                    driver_encoder=enc, progress=False)
            steady = (rep.samples / (rep.wall_s - rep.first_result_s)) if rep.wall_s > rep.first_result_s else 0.0
            runs.append({"run": name, "wall_s": rep.wall_s, "samples_per_s": rep.samples_per_s,
                         "first_result_s": rep.first_result_s, "after_first_result_samples_per_s": steady,
                         "model_s": rep.model_s, "decode_s": rep.decode_s, "rows": rep.rows})
            print(f"{name} ({args.replicas} replicas x {args.cpus_per_replica:g} CPU): {rep.wall_s:.2f} s, "
                  f"{rep.samples_per_s:.1f} samples/s; first result after {rep.first_result_s:.2f} s; "
                  f"after that {steady:.1f} samples/s (upper bound: tasks preprocess during actor start-up); "
                  f"model (summed over replicas) "
                  f"{rep.model_s:.2f} s")
        ray.shutdown()

        a, b = Store.open(tmp_path / "local"), Store.open(tmp_path / "ray-1")
        rows_a = {k: i for i, k in enumerate(a.keys())}
        keys = b.keys()
        diff = float(np.abs(a.embeddings(np.float32)[[rows_a[k] for k in keys]] - b.embeddings(np.float32)).max())
        best = max(r["samples_per_s"] for r in runs)
        figures = {
            "samples": args.samples, "shards": len(shards), "encoder": args.encoder, "batch_size": args.batch_size,
            "cpus": os.cpu_count(), "local_wall_s": local.wall_s, "local_samples_per_s": local.samples_per_s,
            "local_model_s": local.model_s, "local_1thread_samples_per_s": local1.samples_per_s,
            "local_1thread_model_s": local1.model_s,
            "ray_init_s": ray_init_s, "ray_runs": runs,
            "ratio_ray_over_local_first_run": runs[0]["samples_per_s"] / local.samples_per_s,
            "ratio_ray_over_local_best_run": best / local.samples_per_s,
            "ray_startup_overhead_s": ray_init_s + runs[0]["first_result_s"],
            "max_abs_diff_local_vs_ray": diff, "same_keys": sorted(a.keys()) == sorted(keys),
        }
        print()
        print(f"{'':34s}{'samples/s':>12s}{'wall s':>10s}")
        print(f"{'local engine':34s}{local.samples_per_s:12.1f}{local.wall_s:10.2f}")
        print(f"{'local engine, 1 torch thread':34s}{local1.samples_per_s:12.1f}{local1.wall_s:10.2f}")
        for r in runs:
            print(f"{r['run'] + ' (Ray local mode)':34s}{r['samples_per_s']:12.1f}{r['wall_s']:10.2f}")
        print(f"ratio Ray / local (1st run, incl. actor start): {figures['ratio_ray_over_local_first_run']:.2f}")
        print(f"ratio Ray / local (2nd run, Ray already up):    {runs[1]['samples_per_s'] / local.samples_per_s:.2f}")
        print(f"ratio Ray / local with 1 torch thread (1st run): {runs[0]['samples_per_s'] / local1.samples_per_s:.2f}")
        print(f"Ray start-up: ray.init {ray_init_s:.2f} s + first result after {runs[0]['first_result_s']:.2f} s "
              f"(actor start, model load, first batch) = {figures['ray_startup_overhead_s']:.2f} s")
        print(f"same keys: {figures['same_keys']}; max |local - ray| = {diff:.2e} (float16 store)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
            print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
