"""Memory-centric pseudo pairs over seeds (docs/method.md, "Memory-centric pseudo pairs").

Runs :func:`cmcr.trainer.synthetic.run_synthetic_check` (the code path of ``cmcr bench synthetic``:
stores, completion, training, connector, projection) for each seed and the variants ``full``
(text-centric C-MCR), ``plus_audio``, ``plus_image``, ``all_centric``; one JSON file per seed under
``--out`` (a rerun skips seeds already done, so seeds can be split over processes), then prints the
table of audio->image and image->audio R@1 / mAP per variant (mean ± std over seeds, min, max) and
how many seeds each variant beat ``full`` on.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_centric.py --out /tmp/centric --seeds 0-7
    python benchmarks/bench_centric.py --out /tmp/centric --report
    # control: text-centric with 3x the epochs (as many batch gradients as all_centric)
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_centric.py --out /tmp/full18 --seeds 0-7 \
        --epochs 18 --variants full
    python benchmarks/bench_centric.py --out /tmp/centric --report --control /tmp/full18
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = ("full", "plus_audio", "plus_image", "all_centric")
METRICS = (("R@1", "a->i R@1"), ("mAP", "a->i mAP"), ("image_to_audio_R@1", "i->a R@1"),
           ("image_to_audio_mAP", "i->a mAP"))


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def run(args: argparse.Namespace) -> None:
    from cmcr.trainer.synthetic import SyntheticSpec, run_synthetic_check, synthetic_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in parse_seeds(args.seeds):
        done = out / f"seed-{seed}.json"
        if done.exists():
            continue
        spec = SyntheticSpec(dim=args.dim, seed=seed, n_shared=args.n_shared, n_memory_a=args.n_memory,
                             n_memory_b=args.n_memory, n_eval=args.n_eval)
        t0 = time.perf_counter()
        cfg = synthetic_config(args.dim, seed=seed, epochs=args.epochs)
        rows = run_synthetic_check(out / f"work-{seed}", spec, cfg, tuple(args.variants.split(",")), overwrite=True)
        rec = {"seed": seed, "spec": vars(args), "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(done)
        print(f"seed {seed}: " + ", ".join(f"{r['variant']} a->i mAP {r['mAP']:.3f} i->a mAP "
                                            f"{r['image_to_audio_mAP']:.3f}" for r in rows)
              + f" ({rec['seconds']} s)", flush=True)


def report(args: argparse.Namespace) -> None:
    recs = sorted((json.loads(p.read_text()) for p in Path(args.out).glob("seed-*.json")), key=lambda r: r["seed"])
    if not recs:
        raise SystemExit(f"no seed-*.json in {args.out}")
    by = {v: {m: [] for m, _ in METRICS} for v in VARIANTS}
    for rec in recs:
        for r in rec["rows"]:
            if r["variant"] in by:
                for m, _ in METRICS:
                    by[r["variant"]][m].append(r[m])
    seeds = [r["seed"] for r in recs]
    spec = {k: v for k, v in recs[0]["spec"].items() if k not in ("out", "seeds", "report", "control")}
    print(f"seeds {seeds}; settings {spec}; seconds per seed "
          f"{[r['seconds'] for r in recs]}")
    print("| variant | " + " | ".join(label for _, label in METRICS) + " | seeds > full (a->i mAP / i->a mAP) |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for v in VARIANTS:
        if not by[v]["mAP"]:
            continue
        cells = []
        for m, _ in METRICS:
            x = np.asarray(by[v][m])
            cells.append(f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0:.3f} [{x.min():.3f}, {x.max():.3f}]")
        wins = "—"
        if v != "full" and len(by[v]["mAP"]) == len(by["full"]["mAP"]):
            w1 = sum(a > b for a, b in zip(by[v]["mAP"], by["full"]["mAP"], strict=True))
            w2 = sum(a > b for a, b in zip(by[v]["image_to_audio_mAP"], by["full"]["image_to_audio_mAP"], strict=True))
            wins = f"{w1}/{len(seeds)} / {w2}/{len(seeds)}"
        print(f"| {v} | " + " | ".join(cells) + f" | {wins} |")
    print("\nper seed (a->i mAP, i->a mAP):")
    for rec in recs:
        print(f"seed {rec['seed']}: " + ", ".join(f"{r['variant']} {r['mAP']:.3f}/{r['image_to_audio_mAP']:.3f}"
                                                  for r in rec["rows"]))
    if args.control:
        compare_control(recs, Path(args.control))


def compare_control(recs: list[dict], control: Path) -> None:
    """``all_centric`` against a control run's ``full`` (e.g. text-centric trained for 3x the epochs:
    the same number of batch gradients), seed by seed."""
    ctrl = {json.loads(p.read_text())["seed"]: json.loads(p.read_text()) for p in control.glob("seed-*.json")}
    wins = {m: 0 for m, _ in METRICS}
    n = 0
    print(f"\nall_centric vs control {control} (full, {next(iter(ctrl.values()))['spec']['epochs']} epochs):"
          if ctrl else f"\nno control seeds in {control}")
    for rec in recs:
        if rec["seed"] not in ctrl:
            continue
        a = next(r for r in rec["rows"] if r["variant"] == "all_centric")
        c = next(r for r in ctrl[rec["seed"]]["rows"] if r["variant"] == "full")
        n += 1
        for m, _ in METRICS:
            wins[m] += a[m] > c[m]
        print(f"seed {rec['seed']}: " + ", ".join(f"{label} {a[m]:.3f} vs {c[m]:.3f}" for m, label in METRICS))
    if n:
        print("all_centric wins: " + ", ".join(f"{label} {wins[m]}/{n}" for m, label in METRICS))
        for m, label in METRICS:
            cv = np.asarray([next(r for r in ctrl[s]["rows"] if r["variant"] == "full")[m] for s in sorted(ctrl)])
            print(f"control {label}: {cv.mean():.3f} ± {cv.std(ddof=1) if len(cv) > 1 else 0:.3f} "
                  f"[{cv.min():.3f}, {cv.max():.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-shared", type=int, default=1500)
    ap.add_argument("--n-memory", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--report", action="store_true", help="Only print the table of the seeds done in --out.")
    ap.add_argument("--control", help="A second --out folder (e.g. --variants full --epochs 18) to compare "
                                      "all_centric against, seed by seed.")
    args = ap.parse_args()
    if not args.report:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
