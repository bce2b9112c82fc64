"""GPU check (issue 11): encode, connect and completion figures on one CUDA device, no network.

Run through ``benchmarks/gpu_check.sh`` (a 5-minute limit). Random weights of the real
architectures (open_clip ViT-B-32, CLAP HTSAT-tiny; seeded, so the CPU and the GPU copies are the
same model). Measures, on the GPU:

* image / text / audio encode samples/s through ``encode_shards`` (batch ``--batch`` >= 256,
  ``--precision`` bf16 or fp16 autocast, ``--workers`` decode workers), forward-busy %, time per stage;
* equality against CPU float32 embeddings of the same samples (cosine >= 0.999 required);
* connect training pairs/s (D = 512, reference head, batch 4096, full C-MCR loss, AdamW);
* exact completion time (``complete_exact`` on the GPU, ``--queries`` x ``--memory`` rows).

Prints one Markdown block ready to paste into docs/benchmarks.md. Without CUDA it says so and
runs a tiny CPU dry run of the same code (tiny models, a few samples) and exits 0.
Anchor: clip-retrieval reports ~2500 images/s for ViT-B/32 on one A100 (decode-bound).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import make_corpus  # noqa: E402

from cmcr.pipeline.encode import encode_shards, iter_shard_samples, prepare_batch  # noqa: E402
from cmcr.pipeline.encoders import collate_items, load_encoder  # noqa: E402
from cmcr.pipeline.shards import write_shards  # noqa: E402
from cmcr.stores.memory import complete_exact  # noqa: E402
from cmcr.trainer.config import TrainConfig  # noqa: E402
from cmcr.trainer.losses import cmcr_loss  # noqa: E402
from cmcr.trainer.projector import build_projector  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def equality(spec: str, modality: str, shard: Path, device: str, precision: str, n: int) -> float:
    """Min cosine between CPU float32 and ``device``/``precision`` embeddings of the first n samples."""
    cpu = load_encoder(spec, device="cpu")
    dev = load_encoder(spec, device=device, precision=precision)
    samples = [s for _, s in zip(range(n), iter_shard_samples(shard), strict=False)]
    prepared = prepare_batch(samples, cpu.preprocessor(modality), modality, str(shard))
    a = cpu.embed(modality, collate_items(prepared.items))
    b = dev.embed(modality, collate_items(prepared.items))
    return float(np.min(np.sum(a * b, axis=1)))


def connect_pairs_per_s(device: str, dim: int, batch: int, steps: int) -> float:
    cfg = TrainConfig(batch_size=batch) if dim >= 512 else TrainConfig(batch_size=batch, hidden_dim=dim, out_dim=dim)
    pa, pb = build_projector(dim, cfg).to(device), build_projector(dim, cfg).to(device)
    opt = torch.optim.AdamW(list(pa.parameters()) + list(pb.parameters()), lr=1e-3)
    x = [torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1) for _ in range(4)]
    g = torch.Generator(device=device).manual_seed(0)
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            _sync(device)
            t0 = time.perf_counter()
        loss, _ = cmcr_loss(pa, pb, *x, temperature=0.01, noise_std=0.025, intra_weight=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def completion_seconds(device: str, dim: int, queries: int, memory: int) -> float:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((memory, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = m[rng.integers(0, memory, queries)] + 0.5 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    complete_exact(q[:16], m[:4096], device=device)  # warm-up
    _sync(device)
    t = time.perf_counter()
    complete_exact(q, m, device=device, chunk_rows=65536, query_rows=4096)
    _sync(device)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--workers", type=int, default=min(15, max(1, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--audio", type=int, default=256)
    ap.add_argument("--texts", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=20000, help="completion queries")
    ap.add_argument("--memory", type=int, default=1_000_000, help="completion memory rows")
    ap.add_argument("--dry-run", action="store_true", help="the tiny CPU run (what happens without CUDA)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.dry_run
    if cuda:
        device, precision = "cuda", args.precision
        clip, clap = "open_clip:ViT-B-32@random", "clap:HTSAT-tiny@random"
        batch, workers = args.batch, args.workers
        counts = {"image": args.images, "audio": args.audio, "text": args.texts}
        conn = (512, 4096, 20)
        comp = (args.queries, args.memory)
        machine = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    else:
        print("no CUDA device: this is a tiny CPU dry run of the GPU check (tiny random models, a few samples); "
              "run it on a CUDA machine for the figures")
        device, precision = "cpu", "fp32"
        torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is several times faster
        clip, clap = "open_clip:cmcr-tiny-clip@random", "clap:cmcr-tiny-clap@random"
        batch, workers = 4, 1
        counts = {"image": 8, "audio": 4, "text": 16}
        conn = (32, 64, 2)
        comp = (64, 1024)
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"
    specs = {"image": clip, "text": clip, "audio": clap}
    t_all = time.perf_counter()
    lines = [f"GPU check — {machine}; torch {torch.__version__}; "
             f"{'autocast ' + precision if cuda else 'fp32 (dry run)'}, batch {batch}, {workers} decode workers"]
    lines.append("")
    lines.append("| modality | encoder | samples | samples/s | forward busy | stages (s): read / decode / preprocess / "
                 "collate (CPU, all workers) · forward / write / wait | cos vs CPU fp32 (min) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    with tempfile.TemporaryDirectory(prefix="cmcr-gpu-check-") as tmp:
        work = Path(tmp)
        make_corpus(work / "corpus", counts["image"], counts["audio"], counts["text"])
        rep = write_shards([work / "corpus" / "images", work / "corpus" / "audio", work / "corpus" / "captions.txt"],
                           work / "shards", max(batch * 2, 64))
        for modality in ("image", "text", "audio"):
            spec = specs[modality]
            enc = load_encoder(spec, device=device, precision=precision)
            shards = rep.shards[modality]
            warm = prepare_batch([next(iter_shard_samples(shards[0]))], enc.preprocessor(modality), modality, "w")
            enc.embed(modality, collate_items(warm.items))
            r = encode_shards(shards, enc, modality, work / f"store-{modality}", batch_size=batch,
                              num_workers=workers, progress=False)
            cos = equality(spec, modality, shards[0], device, precision, n=32 if cuda else 4)
            ok &= cos >= 0.999
            st = r.stages
            lines.append(f"| {modality} | {spec} | {r.samples} | {r.samples_per_s:,.1f} | {r.model_busy:.0%} | "
                         f"{st['read']:.1f} / {st['decode']:.1f} / {st['preprocess']:.1f} / {st['collate']:.1f} · "
                         f"{st['forward']:.1f} / {st['write']:.1f} / {st['wait']:.1f} | {cos:.5f} |")
            del enc
    pps = connect_pairs_per_s(device, *conn)
    cs = completion_seconds(device, conn[0], *comp)
    lines.append("")
    lines.append(f"- connect training: {pps:,.0f} pairs/s (D = {conn[0]}, reference head, batch {conn[1]}, full C-MCR "
                 f"loss, AdamW, {device})")
    lines.append(f"- exact completion: {comp[0]:,} queries x {comp[1]:,} memory rows (D = {conn[0]}, tau 0.01) in "
                 f"{cs:.2f} s on {device} ({comp[0] * comp[1] / cs / 1e9:.2f} G query-row pairs/s)")
    lines.append(f"- equality with CPU fp32 embeddings: {'all >= 0.999' if ok else 'FAILED (< 0.999)'}")
    lines.append(f"- whole check: {time.perf_counter() - t_all:.0f} s")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
