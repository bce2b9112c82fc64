"""`cmcr localize` (where a sound comes from in an image) and `cmcr eval localization` (cIoU / AUC).

Thin: parse, call :mod:`cmcr.localize` / :mod:`cmcr.trainer.localization`, report with rich.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cmcr.console import out_console
from cmcr.errors import InputDataError

console = out_console()

_CLAP_TOKENIZER_HELP = ("Folder with RoBERTa vocab.json + merges.txt for a CLAP encoder (env CMCR_CLAP_TOKENIZER; "
                        "only read for text).")


def localize(
    connector: Path = typer.Option(..., "--connector", "-c", help="Connector folder with an open_clip ViT side."),
    audio: Path = typer.Option(..., "--audio", "-a", help="Query sound (audio file of the other side's encoder)."),
    image: Path | None = typer.Option(None, "--image", "-i", help="One image to localise the sound in."),
    images: Path | None = typer.Option(None, "--images", help="A folder of images (recursive) instead of --image."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <name>.png overlays, <name>.npy heatmaps, "
                                                      "localize.json."),
    image_encoder: str | None = typer.Option(None, "--image-encoder",
                                             help="Spec of the CLIP side (default: rebuilt from the connector when "
                                                  "it names a pretrained tag or random weights)."),
    audio_encoder: str | None = typer.Option(None, "--audio-encoder", help="Spec of the audio side (same default)."),
    size: int | None = typer.Option(None, "--size", min=1,
                                    help="Dense input size in pixels, a multiple of the patch size (default: the "
                                         "model's, e.g. 224 -> 7x7 patches for ViT-B-32; 448 -> 14x14)."),
    dense_path: str = typer.Option("value", "--dense-path",
                                   help="value (MaskCLIP value path of the last block, no residual/MLP) or "
                                        "value+residual (MaskCLIP's code: plus residual and MLP)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    clap_tokenizer: Path | None = typer.Option(None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
                                               help=_CLAP_TOKENIZER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Heatmap of where a sound's source is in an image (dense CLIP patches vs the projected audio).

    Each ViT patch is taken to CLIP's joint space MaskCLIP-style, projected by the connector's CLIP side
    and scored (cosine) against the projected audio; the grid is upsampled to the image. Writes a PNG
    overlay (image + colour map + colour bar) and the (H, W) float32 array per image, and localize.json
    (peak pixel, score range, the whole-image score; images of a folder ranked by it).

    Example: cmcr localize -c runs/clip-clap --audio dog.wav --image park.jpg --out loc/

    Example: cmcr localize -c runs/clip-clap --audio dog.wav --images photos/ --out loc/ --size 448 --json
    """
    from cmcr.localize import Localizer, image_files, localize_images, output_name, write_outputs
    from cmcr.stores.files import atomic_write_json

    if (image is None) == (images is None):
        raise InputDataError("give exactly one of --image FILE or --images FOLDER")
    if not audio.is_file():
        raise InputDataError(f"--audio {audio}: file not found")
    if image is not None and not image.is_file():
        raise InputDataError(f"--image {image}: file not found")
    files = [image] if image is not None else image_files(images)
    loc = Localizer.load(connector, image_encoder=image_encoder, query_encoder=audio_encoder, device=device,
                         size=size, path=dense_path, clap_tokenizer=str(clap_tokenizer) if clap_tokenizer else None)
    random = bool(loc.random_weights())
    q = loc.embed_query(audio)
    maps, failures = localize_images(loc, files, q)
    if image is not None and failures:
        raise InputDataError(failures[0]["error"])
    rows = []
    for m in sorted(maps, key=lambda m: -m.image_score):
        name = output_name(m.image, images)
        files_out = write_outputs(m, out, name, title=f"{audio.name} in {m.image.name}", random_weights=random)
        rows.append({**m.summary(), **files_out})
    grid = list(maps[0].grid.shape) if maps else None
    report = {"connector": str(connector), "audio": str(audio), "image_side": loc.image_side,
              "query_side": loc.query_side, "image_encoder": loc.image_encoder.identity(),
              "dense_input": loc.size, "grid": grid, "dense_path": dense_path, "random_weights": random,
              "images": rows, "failures": failures}
    atomic_write_json(out / "localize.json", report)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    if random:
        console.print("[bold red]note: random weights: not meaningful[/] (random-init encoder weights)")
    for r in rows:
        console.print(f"{r['image']}: peak at (x={r['peak_xy'][0]}, y={r['peak_xy'][1]}), score "
                      f"{r['min']:.3f}..{r['max']:.3f}, image score {r['image_score']:.3f} -> {r['png']}",
                      highlight=False, markup=False, soft_wrap=True)
    for f in failures:
        console.print(f"skipped {f['image']}: {f['error']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{len(rows)} heatmap(s) ({grid[0]}x{grid[1]} patches) in {out}" if grid else
                  f"no heatmap written ({len(failures)} image(s) failed)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``localize`` to the root app and ``localization`` to the ``eval`` group."""
    app.command("localize")(localize)
