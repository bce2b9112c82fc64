"""Benchmark of the ULIP-2 PointBERT 3D encoder: samples/s and where the time goes.

Full-size random-init ``ulip:PointBERT@random`` (512 groups x 32 points, 12 blocks x 384), clouds of
8192 points (ULIP's ``npoints``; made from 10000-point raw clouds like the C-MCR release clouds).
Measured side by side in one run, each stage repeated (min and median printed):

* **preprocess** — :func:`cmcr.pipeline.ulip_encoder.prepare_cloud` per sample (10000 -> 8192 points,
  centre, unit sphere; CPU, in DataLoader workers during ``cmcr encode``);
* **grouping** — farthest-point sampling (512 centres) + kNN (32) in plain torch, per batch;
* **network** — mini-PointNet + transformer + projection on the grouped batch;
* **embed** — the whole ``Encoder.embed`` (grouping + network + normalisation): samples/s.

The grouping share is ``grouping / (grouping + network)`` (medians). On the CPU, farthest-point
sampling is also timed A/B in the same run: the numpy loop cmcr uses vs the torch loop (used on GPU)
with torch's threads, alternating, min and median and their ratio.

    python benchmarks/bench_ulip.py                    # CPU, batch 4, 3 repeats (~1-2 min on 2 cores)
    python benchmarks/bench_ulip.py --device cuda --batch 32
    python benchmarks/bench_ulip.py --tiny             # tiny test config (smoke run, seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _timed(fn, sync) -> float:  # noqa: ANN001
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run(device: str, batch: int, repeats: int, tiny: bool, threads: int | None) -> dict:
    import torch

    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.ulip_encoder import prepare_cloud

    if threads:
        torch.set_num_threads(threads)
    spec = "ulip:cmcr-tiny-ulip@random" if tiny else "ulip:PointBERT@random"
    t0 = time.perf_counter()
    enc = load_encoder(spec, device=device)
    build_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rng = np.random.default_rng(0)
    raw = [rng.standard_normal((10000, 3)).astype(np.float32) * (1.0, 0.6, 0.3) for _ in range(batch)]
    min_pts = max(enc.cfg.num_group, enc.cfg.group_size)
    pe = enc.model.point_encoder

    prep, group, net, embed = [], [], [], []
    clouds = None
    out: dict = {}
    with torch.inference_mode():
        # warm-up (allocator, kernels)
        x = torch.from_numpy(np.stack([prepare_cloud(r, enc.n_points, min_pts) for r in raw])).to(device)
        enc.embed("3d", x.cpu())
        for _ in range(repeats):
            prep.append(_timed(lambda: [prepare_cloud(r, enc.n_points, min_pts) for r in raw], lambda: None) / batch)
            group.append(_timed(lambda: out.update(g=pe.group(x)), sync))
            net.append(_timed(lambda: pe.forward_groups(*out["g"]) @ enc.model.pc_projection, sync))
            embed.append(_timed(lambda: enc.embed("3d", x.cpu()), sync))
            clouds = x
    med = statistics.median
    res = {
        "spec": spec, "device": device, "torch_threads": torch.get_num_threads(), "batch": batch,
        "points": int(clouds.shape[1]), "groups": enc.cfg.num_group, "group_size": enc.cfg.group_size,
        "repeats": repeats, "build_s": round(build_s, 2),
        "preprocess_ms_per_sample": {"min": min(prep) * 1e3, "median": med(prep) * 1e3},
        "grouping_ms_per_batch": {"min": min(group) * 1e3, "median": med(group) * 1e3},
        "network_ms_per_batch": {"min": min(net) * 1e3, "median": med(net) * 1e3},
        "embed_ms_per_batch": {"min": min(embed) * 1e3, "median": med(embed) * 1e3},
        "samples_per_s": {"max": batch / min(embed), "median": batch / med(embed)},
        "grouping_share": med(group) / (med(group) + med(net)),
    }
    if not device.startswith("cuda"):
        from cmcr.pipeline.ulip_model import _fps_numpy, _fps_torch

        xn = clouds.numpy()
        a_np, a_t = [], []
        for _ in range(repeats):  # alternate A and B so both see the same machine load
            a_np.append(_timed(lambda: _fps_numpy(xn, enc.cfg.num_group), sync))
            a_t.append(_timed(lambda: _fps_torch(clouds, enc.cfg.num_group), sync))
        res["fps_numpy_ms_per_batch"] = {"min": min(a_np) * 1e3, "median": med(a_np) * 1e3}
        res["fps_torch_ms_per_batch"] = {"min": min(a_t) * 1e3, "median": med(a_t) * 1e3}
        res["fps_torch_over_numpy"] = {"min": min(a_t) / min(a_np), "median": med(a_t) / med(a_np)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="tiny test config instead of the full-size model")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.device, a.batch, a.repeats, a.tiny, a.threads)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['spec']} on {r['device']} ({r['torch_threads']} threads), batch {r['batch']} x {r['points']} points, "
          f"{r['groups']} groups x {r['group_size']}, {r['repeats']} repeats (model built in {r['build_s']} s)")
    for k in ("preprocess_ms_per_sample", "grouping_ms_per_batch", "network_ms_per_batch", "embed_ms_per_batch",
              "fps_numpy_ms_per_batch", "fps_torch_ms_per_batch"):
        if k in r:
            print(f"  {k:26s} min {r[k]['min']:9.1f}  median {r[k]['median']:9.1f}")
    print(f"  3D encode: {r['samples_per_s']['median']:.2f} samples/s (best {r['samples_per_s']['max']:.2f})")
    print(f"  time share: grouping {100 * r['grouping_share']:.1f} %, network (mini-PointNet + transformer) "
          f"{100 * (1 - r['grouping_share']):.1f} %")
    if "fps_torch_over_numpy" in r:
        f = r["fps_torch_over_numpy"]
        print(f"  farthest-point sampling, torch loop / numpy loop: {f['median']:.2f}x (min/min {f['min']:.2f}x)")


if __name__ == "__main__":
    main()
