"""Benchmark of the 3d decode stage and preprocessing (CPU, one process, no model).

Measured side by side in one run, repeated (min and median seconds per cloud):

* decode: a plain ``(10000, 6)`` ``.npy`` release cloud, the same cloud as OpenShape's pickled dict
  (restricted unpickler), and the bundled cow mesh (5856 faces -> 10000 surface samples);
* prepare: farthest-point sampling + unit-sphere normalisation of a 10000-point cloud to P = 8192
  (ULIP's default), 2048 and 1024 points, and of a 200000-point cloud to 8192 (subsampled to 32768
  first), with the FPS / random-subsample time ratio for P = 8192 (what FPS costs over the
  cheapest fixed-size sampling).

    python benchmarks/bench_pointcloud.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return min(runs), statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import trimesh  # noqa: F401  (import time is not decode time)

    from cmcr.pipeline.pointcloud import decode_points, prepare_points

    sample = ROOT / "cmcr" / "data" / "sample" / "3d"
    npy = (sample / "train" / "train_xyzrgb.npy").read_bytes()
    pickled = (ROOT / "tests" / "fixtures" / "cmcr-release" / "BBQ_openshape.npy").read_bytes()
    cow = (sample / "cow" / "spot_triangulated.obj").read_bytes()
    cloud, _ = decode_points(npy, "npy")
    big = np.random.default_rng(0).normal(size=(200_000, 3)).astype(np.float32)
    rng = np.random.default_rng(0)

    rows = [
        ("decode .npy (10000, 6)", lambda: decode_points(npy, "npy")),
        ("decode OpenShape pickled dict .npy", lambda: decode_points(pickled, "npy")),
        ("decode cow .obj -> 10000 surface samples", lambda: decode_points(cow, "obj")),
        ("prepare 10000 -> 8192 (FPS)", lambda: prepare_points(cloud, 8192)),
        ("prepare 10000 -> 8192 (random subsample, reference)",
         lambda: cloud[np.sort(rng.choice(len(cloud), 8192, replace=False))]),
        ("prepare 10000 -> 2048 (FPS)", lambda: prepare_points(cloud, 2048)),
        ("prepare 10000 -> 1024 (FPS)", lambda: prepare_points(cloud, 1024)),
        ("prepare 200000 -> 8192 (subsample 32768, FPS)", lambda: prepare_points(big, 8192)),
    ]
    results = {}
    print(f"{'step':<55} {'min s':>8} {'median s':>9}")
    for name, fn in rows:
        lo, med = _time(fn, args.repeat if "200000" not in name else max(1, args.repeat // 2))
        results[name] = med
        print(f"{name:<55} {lo:>8.4f} {med:>9.4f}")
    ratio = results["prepare 10000 -> 8192 (FPS)"] / results["prepare 10000 -> 8192 (random subsample, reference)"]
    print(f"\nFPS / random subsample at P = 8192: {ratio:.0f}x (median)")


if __name__ == "__main__":
    main()
