"""Benchmark of the encode stage: samples/s and forward-pass busy fraction, pipeline vs plain loop.

For each modality (image: open_clip ViT-B-32, audio: CLAP HTSAT-tiny, text: ViT-B-32 text tower;
random weights, CPU unless CUDA is present) the same generated shards are encoded twice in one
run:

* **pipeline**: ``encode_shards`` (DataLoader workers decode/preprocess, main process embeds and
  writes store parts);
* **plain**: decode + preprocess in the main process, batch, forward (no store writing).

Printed per modality: samples/s, forward busy fraction (model seconds / wall seconds), the
pipeline/plain throughput ratio, and where the pipeline's time went per stage (read, decode,
preprocess, collate, forward, write, wait). Then a resume check: a ``cmcr encode`` subprocess is killed
(SIGKILL) after its first parts, rerun, and compared with the clean run (rows and vectors).

Default run is short (~2-3 min on 2 cores); reference sizes: ``--images 1000 --audio 200 --texts 5000``.

    python benchmarks/bench_encode.py
    python benchmarks/bench_encode.py --images 1000 --audio 200 --texts 5000 --workers 2
    python benchmarks/bench_encode.py --tiny      # tiny test models (smoke run, seconds)
    python benchmarks/bench_encode.py --threads 2 # the forward pass with torch's default threads (2 cores)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--audio", type=int, default=24)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--modalities", default="image,audio,text")
    ap.add_argument("--tiny", action="store_true", help="tiny test models instead of ViT-B-32 / HTSAT-tiny")
    ap.add_argument("--no-resume-check", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the pipeline's forward pass (default: encode_shards' choice, on CPU "
                         "CPUs - workers; pass the core count to see torch's default)")
    args = ap.parse_args()

    import torch

    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.shards import write_shards

    clip_spec = "open_clip:cmcr-tiny-clip@random" if args.tiny else "open_clip:ViT-B-32@random"
    clap_spec = "clap:cmcr-tiny-clap@random" if args.tiny else "clap:HTSAT-tiny@random"
    specs = {"image": clip_spec, "text": clip_spec, "audio": clap_spec}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"cuda {torch.cuda.is_available()}, workers {args.workers}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="cmcr-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        make_corpus(work / "corpus", args.images, args.audio, args.texts)
        rep = write_shards([work / "corpus" / "images", work / "corpus" / "audio", work / "corpus" / "captions.txt"],
                           work / "shards", args.samples_per_shard)
        print(f"corpus + shards: {rep.counts} in {time.perf_counter() - t:.1f} s")
        rows = []
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
            r = encode_shards(shards, enc, modality, work / f"store-{modality}", batch_size=args.batch_size,
                              num_workers=args.workers, progress=False, torch_threads=args.threads)
            p = plain_loop(shards, enc, modality, args.batch_size)
            pipe_sps, plain_sps = r.samples / r.wall_s, p["samples"] / p["wall_s"]
            rows.append((modality, spec, r.samples, pipe_sps, r.model_busy, plain_sps, p["model_s"] / p["wall_s"],
                         pipe_sps / plain_sps, r))
        print()
        print(f"{'modality':8} {'encoder':34} {'n':>5} {'pipeline/s':>10} {'busy':>6} {'plain/s':>9} {'busy':>6} "
              f"{'ratio':>6}   pipeline seconds: decode(cpu) wait model write wall (torch threads)")
        for m, spec, n, ps, pb, ls, lb, ratio, r in rows:
            print(f"{m:8} {spec:34} {n:5d} {ps:10.1f} {pb:6.0%} {ls:9.1f} {lb:6.0%} {ratio:6.2f}   "
                  f"{r.decode_s:.1f} {r.wait_s:.1f} {r.model_s:.1f} {r.write_s:.1f} {r.wall_s:.1f} ({r.torch_threads})")
        print()
        print("where the pipeline's time went, per stage (s): read / decode / preprocess / collate are CPU seconds "
              "summed over the decode workers (in parallel with the main process); forward / write / wait are "
              "main-process wall seconds")
        for m, _spec, _n, _ps, _pb, _ls, _lb, _ratio, r in rows:
            st = r.stages
            print(f"{m:8} " + "  ".join(f"{k} {v:.2f}" for k, v in st.items()) + f"  | wall {r.wall_s:.2f}, "
                  f"forward busy {r.model_busy:.0%}")
        if not args.no_resume_check and "image" in args.modalities.split(","):
            print()
            print(resume_check(work / "shards" / "image", specs["image"], "image", work / "store-image", work,
                               args.batch_size, args.workers))
    return 0


def _first_payload(shard: Path, modality: str):
    from cmcr.pipeline.encode import iter_shard_samples, sample_payload

    for s in iter_shard_samples(shard):
        yield sample_payload(s, modality)
        return


if __name__ == "__main__":
    sys.exit(main())
