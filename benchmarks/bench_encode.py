"""Benchmark of the encode stage: samples/s and forward-pass busy fraction, pipeline vs plain loop.

For each modality (image: open_clip ViT-B-32, audio: CLAP HTSAT-tiny, text: ViT-B-32 text tower;
random weights, CPU unless CUDA is present) the same generated shards are encoded twice in one
run:

* **pipeline**: ``encode_shards`` (DataLoader workers decode/preprocess, main process embeds and
  writes store parts);
* **plain**: decode + preprocess in the main process, batch, forward (no store writing).

Both arms run ``--repeats`` rounds, alternated (pipeline, plain; then plain, pipeline; ...), warm
against warm. Printed per modality and round: samples/s of each arm, the pipeline's forward busy
fraction (model seconds / wall seconds), its torch threads (AutoThreads' ``[batch, threads]``
choices), the decode share and other processes' load it measured, the pipeline/plain ratio; then
where the pipeline's time went per stage (read, decode, preprocess, collate, forward, write as
shares of all stage seconds; wait as a share of the wall); a summary with min / median over the
rounds. ``--compare-threads N`` adds a third arm: the pipeline with N fixed torch threads. Then a
resume check: a ``cmcr encode`` subprocess is killed (SIGKILL) after its first parts, rerun, and
compared with the clean run (rows and vectors).

Default run is short (2 rounds, ~4-6 min on 2 cores); reference sizes: ``--images 1000 --audio 200 --texts 5000``.

    python benchmarks/bench_encode.py
    python benchmarks/bench_encode.py --images 1000 --audio 200 --texts 5000 --workers 2
    python benchmarks/bench_encode.py --tiny      # tiny test models (smoke run, seconds)
    python benchmarks/bench_encode.py --threads 2 # the forward pass with torch's default threads (2 cores)
    python benchmarks/bench_encode.py --compare-threads 1  # AutoThreads vs the old CPUs-minus-workers rule
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402


def make_corpus(root: Path, n_images: int, n_audio: int, n_texts: int, seed: int = 0) -> None:
    """Photo-sized JPEGs (640x480 noise + gradients), 5 s 44.1 kHz stereo WAVs, captions."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None]
    for i in range(n_images):
        noise = rng.normal(0, 40, (480, 640, 3)).astype(np.float32)
        arr = np.clip(base + noise + rng.uniform(0, 60, 3), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"img_{i:05d}.jpg", quality=90)
    (root / "audio").mkdir(exist_ok=True)
    t = np.arange(5 * 44100) / 44100
    for i in range(n_audio):
        f = 200 + 20 * i
        x = np.stack([np.sin(2 * np.pi * f * t), np.sin(2 * np.pi * 1.5 * f * t)], 1) * 0.3
        x += 0.01 * rng.standard_normal(x.shape)
        sf.write(root / "audio" / f"clip_{i:05d}.wav", x.astype(np.float32), 44100, subtype="PCM_16")
    words = "a dog cat bird car train plane man woman child runs sits on the with near red blue big small".split()
    lines = [" ".join(rng.choice(words, size=int(rng.integers(5, 20)))) for _ in range(n_texts)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")


def plain_loop(shards: list[Path], encoder, modality: str, batch_size: int) -> dict[str, float]:
    """Decode in the main process, batch, forward. Returns samples, wall_s, model_s."""
    from cmcr.pipeline.encode import iter_shard_samples, prepare_batch
    from cmcr.pipeline.encoders import collate_items

    pre = encoder.preprocessor(modality)
    t0 = time.perf_counter()
    model_s, n = 0.0, 0
    for shard in shards:
        batch = []
        samples = list(iter_shard_samples(shard))
        for i in range(0, len(samples), batch_size):
            batch = samples[i:i + batch_size]
            prepared = prepare_batch(batch, pre, modality, str(shard))
            tm = time.perf_counter()
            encoder.embed(modality, collate_items(prepared.items))
            model_s += time.perf_counter() - tm
            n += len(prepared.items)
    wall = time.perf_counter() - t0
    return {"samples": n, "wall_s": wall, "model_s": model_s}


def resume_check(shards_dir: Path, spec: str, modality: str, clean_store: Path, work: Path, batch_size: int,
                 workers: int) -> str:
    """Kill a `cmcr encode` subprocess after its first part, rerun, compare with the clean store."""
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.store import Store

    store = work / "resumed"
    cmd = [sys.executable, "-m", "cmcr.cli", "encode", str(shards_dir), "-e", spec, "-m", modality,
           "--store", str(store), "-b", str(batch_size), "-j", str(workers), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        m = store / "manifest.json"
        if m.exists():
            try:
                parts = len(json.loads(m.read_text())["parts"])
            except (json.JSONDecodeError, KeyError):
                parts = 0
            if parts >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = parts
                break
        time.sleep(0.05)
    if killed_at is None:
        return "resume: run finished before it could be killed (use more/larger shards)"
    enc = load_encoder(spec, device="auto")
    rep = encode_shards(shards_dir, enc, modality, store, batch_size=batch_size, num_workers=workers, progress=False)
    a, b = Store.open(clean_store), Store.open(store, validate="full")
    same_keys = a.keys() == b.keys()
    same_vec = same_keys and np.array_equal(a.embeddings(), b.embeddings())
    return (f"resume: killed after {killed_at} part(s), rerun skipped {rep.shards_skipped} and wrote "
            f"{rep.shards_done} shard(s); rows {b.num_rows} vs clean {a.num_rows}; keys identical: {same_keys}; "
            f"vectors identical: {same_vec}")


def _stats(xs: list[float]) -> tuple[float, float]:
    """(min, median) of a list."""
    return float(np.min(xs)), float(np.median(xs))


def _stage_shares(reports) -> str:
    """Where the pipeline's time went, summed over the repeats: each stage's share of all stage seconds
    (read / decode / preprocess / collate: worker CPU seconds; forward / write: main-process wall), then
    the main process's waiting for data as a share of the wall."""
    tot = {k: sum(r.stages[k] for r in reports) for k in reports[0].stages}
    wait, wall = tot.pop("wait"), sum(r.wall_s for r in reports)
    work = sum(tot.values()) or 1.0
    return "  ".join(f"{k} {v / work:.1%}" for k, v in tot.items()) + f"  | wait {wait / max(wall, 1e-9):.1%} of wall"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--audio", type=int, default=24)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--modalities", default="image,audio,text")
    ap.add_argument("--repeats", type=int, default=2, help="A/B rounds per modality (order alternates per round)")
    ap.add_argument("--tiny", action="store_true", help="tiny test models instead of ViT-B-32 / HTSAT-tiny")
    ap.add_argument("--no-resume-check", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the pipeline's forward pass (default: encode_shards' choice, on CPU "
                         "AutoThreads: sized from the measured decode load)")
    ap.add_argument("--compare-threads", type=int, default=None, metavar="N",
                    help="add a third arm to each round: the pipeline with N fixed torch threads (e.g. 1, the "
                         "CPUs-minus-workers rule on 2 cores with 2 workers)")
    args = ap.parse_args()

    import torch

    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.shards import write_shards

    clip_spec = "open_clip:cmcr-tiny-clip@random" if args.tiny else "open_clip:ViT-B-32@random"
    clap_spec = "clap:cmcr-tiny-clap@random" if args.tiny else "clap:HTSAT-tiny@random"
    specs = {"image": clip_spec, "text": clip_spec, "audio": clap_spec}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"cuda {torch.cuda.is_available()}, workers {args.workers}, batch {args.batch_size}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="cmcr-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        make_corpus(work / "corpus", args.images, args.audio, args.texts)
        rep = write_shards([work / "corpus" / "images", work / "corpus" / "audio", work / "corpus" / "captions.txt"],
                           work / "shards", args.samples_per_shard)
        print(f"corpus + shards: {rep.counts} in {time.perf_counter() - t:.1f} s")
        results = []
        encoders = {}
        for modality in args.modalities.split(","):
            spec = specs[modality]
            if spec not in encoders:
                t = time.perf_counter()
                encoders[spec] = load_encoder(spec, device=args.device)
                print(f"loaded {spec} in {time.perf_counter() - t:.1f} s")
            enc = encoders[spec]
            shards = rep.shards[modality]
            enc.embed(modality, enc.collate(modality, [enc.preprocessor(modality)(
                next(iter(_first_payload(shards[0], modality))))[0]]))  # warm-up
            arms = ["pipeline", "plain"] + (["fixed"] if args.compare_threads else [])
            runs: dict[str, list] = {a: [] for a in arms}
            for k in range(max(1, args.repeats)):
                for arm in arms if k % 2 == 0 else arms[::-1]:  # A/B alternated: ABC, CBA, ABC ...
                    if arm == "plain":
                        runs[arm].append(plain_loop(shards, enc, modality, args.batch_size))
                        continue
                    threads = args.compare_threads if arm == "fixed" else args.threads
                    runs[arm].append(encode_shards(shards, enc, modality, work / f"store-{modality}-{arm}-{k}",
                                                   batch_size=args.batch_size, num_workers=args.workers,
                                                   progress=False, torch_threads=threads))
            results.append((modality, spec, runs))
            _print_modality(modality, spec, runs, args.compare_threads)
        print()
        print("summary (min / median over the rounds; ratio: pipeline/plain of the same round)")
        print(f"{'modality':8} {'n':>5} {'pipeline/s':>13} {'plain/s':>13} {'ratio':>11} {'busy':>9} threads")
        for modality, _spec, runs in results:
            pipe, plain = runs["pipeline"], runs["plain"]
            ps = [r.samples / r.wall_s for r in pipe]
            ls = [p["samples"] / p["wall_s"] for p in plain]
            ratio = [a / b for a, b in zip(ps, ls, strict=True)]
            busy = [r.model_busy for r in pipe]
            print(f"{modality:8} {pipe[0].samples:5d} {_fmt(ps, '.1f'):>13} {_fmt(ls, '.1f'):>13} "
                  f"{_fmt(ratio, '.2f'):>11} {_fmt(busy, '.0%'):>9} {pipe[-1].torch_threads}")
        if not args.no_resume_check and "image" in args.modalities.split(","):
            print()
            print(resume_check(work / "shards" / "image", specs["image"], "image", work / "store-image-pipeline-0",
                               work, args.batch_size, args.workers))
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _fmt(xs: list[float], spec: str) -> str:
    lo, med = _stats(xs)
    return f"{lo:{spec}}/{med:{spec}}"


def _print_modality(modality: str, spec: str, runs: dict, compare: int | None) -> None:
    """Per-round lines of one modality, then its per-stage time shares."""
    print(f"\n{modality} ({spec}), {len(runs['plain'])} round(s), samples/s per arm "
          f"(forward busy; pipeline: torch threads [batch, threads] changes, decode share of CPU work, "
          f"other processes' load in cores)")
    for k, p in enumerate(runs["plain"]):
        r = runs["pipeline"][k]
        line = (f"  round {k + 1}: pipeline {r.samples / r.wall_s:7.1f} ({r.model_busy:.0%}; "
                f"{r.thread_changes or r.torch_threads}, decode share "
                f"{'-' if r.decode_share is None else f'{r.decode_share:.1%}'}, other load "
                f"{'-' if r.other_load is None else f'{r.other_load:.2f}'})  "
                f"plain {p['samples'] / p['wall_s']:7.1f} ({p['model_s'] / p['wall_s']:.0%})  "
                f"ratio {r.samples / r.wall_s / (p['samples'] / p['wall_s']):.2f}")
        if compare:
            f = runs["fixed"][k]
            line += f"  | {compare} thread(s) fixed {f.samples / f.wall_s:7.1f} ({f.model_busy:.0%})"
        print(line)
    print(f"  pipeline stage shares: {_stage_shares(runs['pipeline'])}")
    if compare:
        print(f"  {compare}-thread stage shares: {_stage_shares(runs['fixed'])}")


def _first_payload(shard: Path, modality: str):
    from cmcr.pipeline.encode import iter_shard_samples, sample_payload

    for s in iter_shard_samples(shard):
        yield sample_payload(s, modality)
        return


if __name__ == "__main__":
    sys.exit(main())
