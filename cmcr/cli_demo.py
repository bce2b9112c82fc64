"""`cmcr demo`: the whole pipeline on the bundled real sample media (see cmcr/demo.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder (shards, stores, report)."),
    fast: bool = typer.Option(False, "--fast", help="Tiny random-init encoders and fewer captions/epochs (seconds)."),
    clip: str = typer.Option(None, "--clip", envvar="CMCR_CLIP_ENCODER",
                             help="CLIP encoder spec (default open_clip:ViT-B-32, openai weights)."),
    clap: str = typer.Option(None, "--clap", envvar="CMCR_CLAP_ENCODER",
                             help="CLAP encoder spec (default clap:HTSAT-tiny, 630k-audioset)."),
    clap_tokenizer: str = typer.Option(None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
                                       help="Folder with RoBERTa vocab.json + merges.txt (real CLAP checkpoints)."),
    captions: int = typer.Option(None, "--captions", min=16,
                                 help="Use the first N of the 3,500 bundled captions (default 1000; 500 with --fast)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Connector training epochs (default 20; 8 with --fast)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    synthetic: bool = typer.Option(True, "--synthetic/--no-synthetic", help="Also run the synthetic check."),
    num_workers: int = typer.Option(2, "--num-workers", min=0, help="Decode worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: discard the demo run in --out, whatever its settings (a rerun "
                                        "with the same settings resumes without it; other settings are refused)."),
    release: bool = typer.Option(False, "--release",
                                 help="Instead: the C-MCR authors' demo (toilet/BBQ/train through their released "
                                      "connectors, softmax(10·cos) next to their numbers; writes <out>/release)."),
    three_d: bool = typer.Option(False, "--3d",
                                 help="Instead: the second system, CLIP + ULIP-2 through images, on the bundled "
                                      "point clouds/meshes, images and captions (3D search, zero-shot 3D, the "
                                      "released 3D matrices; writes <out>/3d)."),
    ulip: str = typer.Option(None, "--ulip", envvar="CMCR_ULIP_ENCODER",
                             help="With --release / --3d: ULIP encoder spec (default ulip:PointBERT)."),
    clap_clip: Path = typer.Option(None, "--clap-clip", help="With --release: the released clap_clip.pt "
                                   "(not shipped; default: a random stand-in, flagged)."),
    ulip_clip: Path = typer.Option(None, "--ulip-clip", help="With --release: the released ulip_clip.pt "
                                   "(default: the copy in cmcr/data/release)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (demo.json) on stdout; progress on stderr."),
) -> None:
    """Run shard -> encode -> connect -> project -> eval -> search on the bundled media and write a report.

    Uses pretrained weights with no flag: the Hugging Face cache, else a one-time download into it where the hub
    is reachable (later runs work offline), or local checkpoint specs (also from the environment variables
    CMCR_CLIP_ENCODER / CMCR_CLAP_ENCODER / CMCR_CLAP_TOKENIZER). Only when the hub is unreachable and the files
    are not cached does it say so loudly and run random-init encoders ("not meaningful"); a missing or broken
    file on a reachable hub is an error.

    Example: cmcr demo --out demo-out
    Example: cmcr demo --clip open_clip:ViT-B-32@/ckpt/clip.pt --clap clap:HTSAT-tiny@/ckpt/630k-audioset-best.pt
    --clap-tokenizer /ckpt/roberta-base
    Example: cmcr demo --release --clip open_clip:ViT-B-32 --clap clap:HTSAT-tiny-fusion@/ckpt/630k-fusion-best.pt
    --ulip ulip:PointBERT@/ckpt/pointbert_ULIP-2.pt --clap-clip /ckpt/clap_clip.pt

    Example: cmcr demo --3d --ulip ulip:PointBERT@/ckpt/pointbert_ULIP-2.pt
    """
    if three_d:
        from rich.console import Console

        from cmcr.demo_3d import Demo3DOptions, run_demo_3d

        result = run_demo_3d(Demo3DOptions(out=out, fast=fast, clip=clip, ulip=ulip, captions=captions, epochs=epochs,
                                           device=device, num_workers=num_workers, ulip_clip=ulip_clip,
                                           overwrite=overwrite),
                             Console(stderr=True) if as_json else None)
        if as_json:
            import json

            typer.echo(json.dumps(result, indent=2, default=str))
        return
    if release:
        from cmcr.release_demo import ReleaseDemoOptions, run_release_demo

        run_release_demo(ReleaseDemoOptions(out=out, fast=fast, clip=clip, clap=clap, ulip=ulip,
                                            clap_tokenizer=clap_tokenizer, clap_clip=clap_clip, ulip_clip=ulip_clip,
                                            device=device))
        return
    from cmcr.demo import DemoOptions, run_demo

    console = None
    if as_json:
        from rich.console import Console

        console = Console(stderr=True)
    opts = DemoOptions(out=out, fast=fast, clip=clip, clap=clap, clap_tokenizer=clap_tokenizer, captions=captions,
                       epochs=epochs, device=device, synthetic=synthetic, num_workers=num_workers, overwrite=overwrite)
    result = run_demo(opts, console)
    if as_json:
        import json

        typer.echo(json.dumps(result.to_json(), indent=2, default=str))


def register(app: typer.Typer) -> None:
    """Add ``cmcr demo`` to the root app."""
    app.command("demo")(demo)
