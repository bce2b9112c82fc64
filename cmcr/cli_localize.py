"""`cmcr localize` (where a sound comes from in an image) and `cmcr eval localization` (cIoU / AUC).

Thin: parse, call :mod:`cmcr.localize` / :mod:`cmcr.trainer.localization`, report with rich.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cmcr.console import out_console
from cmcr.errors import ConfigError, InputDataError

console = out_console()

#: Largest dense input side in pixels (``--size``): 2048 px is a 64 x 64 grid for ViT-B-32; the ViT's memory
#: grows with the fourth power of the side, and 100000 px exhausted a 24 GiB machine.
MAX_DENSE_SIZE = 2048

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
    size: int | None = typer.Option(None, "--size", min=32, max=MAX_DENSE_SIZE,
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
        raise ConfigError("give exactly one of --image FILE or --images FOLDER")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the overlays and heatmaps")
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


def eval_localization(
    annotations: Path = typer.Option(..., "--annotations", "-b",
                                     help="Box annotations: VGG-SS .json, Flickr-SoundNet .xml folder, or cmcr .csv "
                                          "(docs/tasks.md)."),
    heatmaps: Path | None = typer.Option(None, "--heatmaps",
                                         help="Folder of <key>.npy (H, W) heatmaps (e.g. from `cmcr localize`) to "
                                              "score instead of computing them."),
    connector: Path | None = typer.Option(None, "--connector", "-c", help="Connector with an open_clip ViT side."),
    images: Path | None = typer.Option(None, "--images", help="Folder of images, file stem = sample key."),
    audio: Path | None = typer.Option(None, "--audio", help="Folder of audio clips, file stem = sample key."),
    image_encoder: str | None = typer.Option(None, "--image-encoder", help="Spec of the CLIP side (see localize)."),
    audio_encoder: str | None = typer.Option(None, "--audio-encoder", help="Spec of the audio side."),
    size: int | None = typer.Option(None, "--size", min=32, max=MAX_DENSE_SIZE,
                                    help="Dense input size (see localize)."),
    dense_path: str = typer.Option("value", "--dense-path", help="value | value+residual (see localize)."),
    threshold: str = typer.Option("0.5", "--threshold",
                                  help="Active-pixel threshold tau on the min-max normalised heatmap (0.5, Senocak "
                                       "et al.), or 'median' (top half of the pixels: the LVS / EZ-VSL protocol)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write each computed heatmap (.npy + .png) here."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    clap_tokenizer: Path | None = typer.Option(None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
                                               help=_CLAP_TOKENIZER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (per-sample cIoU included)."),
) -> None:
    """Sound-source localisation against box annotations: cIoU@0.5 and AUC, with the pool size and a
    centre-prior baseline (the chance level), per class when the annotations have labels.

    Pairs: the image and the audio clip with the same file stem, annotated under that key. Either
    give --heatmaps (saved arrays), or a connector and the two folders to compute them.

    Example: cmcr eval localization -c runs/clip-clap --images vggss/frames --audio vggss/audio
    --annotations vggss.json --json

    Example: cmcr eval localization --heatmaps loc/ --annotations boxes.csv --threshold median
    """
    from cmcr.trainer.localization import evaluate_heatmaps
    from cmcr.trainer.tasks import read_box_annotations

    tau: float | str = threshold
    if threshold != "median":
        try:
            tau = float(threshold)
        except ValueError as e:
            raise ConfigError(f"--threshold {threshold!r}: give a number in [0, 1] or 'median'") from e
        if not 0.0 <= tau <= 1.0:
            raise ConfigError(f"--threshold {threshold}: give a number in [0, 1] or 'median'")
    ann = read_box_annotations(annotations)
    random = False
    failures: list[dict[str, str]] = []
    if heatmaps is not None:
        if connector or images or audio:
            raise ConfigError("give --heatmaps, or --connector with --images and --audio, not both")
        maps = _read_heatmaps(heatmaps)
        random = _heatmaps_were_random(heatmaps)
    else:
        if not (connector and images and audio):
            raise ConfigError("give --heatmaps FOLDER, or --connector with --images FOLDER and --audio FOLDER")
        maps, random, failures = _compute_heatmaps(
            connector, images, audio, set(ann), image_encoder=image_encoder, audio_encoder=audio_encoder, size=size,
            dense_path=dense_path, device=device, out=out,
            clap_tokenizer=str(clap_tokenizer) if clap_tokenizer else None)
    r = evaluate_heatmaps(maps, ann, threshold=tau)
    r.update({"annotations": str(annotations), "random_weights": random, "failures": failures})
    if as_json:
        typer.echo(json.dumps(r, indent=2, default=str))
        return
    from rich.table import Table

    if random:
        console.print("[bold red]note: random weights: not meaningful[/] (random-init encoder weights)")
    console.print(f"localisation on {r['pairs']} annotated pairs (pool {r['pool']}), active pixels: "
                  f"{'top half (median)' if tau == 'median' else f'normalised heatmap >= {tau}'}",
                  highlight=False, markup=False)
    t = Table()
    for col in ("metric", "value", "centre prior (chance)"):
        t.add_column(col)
    for name in ("cIoU@0.5", "mean_cIoU", "AUC"):
        t.add_row(name, f"{r[name]:.4f}", f"{r['chance'][name]:.4f}")
    console.print(t)
    skipped = len(r["not_annotated"]) + r["annotated_without_heatmap"] + len(failures)
    if skipped:
        console.print(f"not scored: {len(r['not_annotated'])} heatmap(s) without annotation, "
                      f"{r['annotated_without_heatmap']} annotation(s) without a pair, {len(failures)} failed pair(s)",
                      highlight=False, markup=False)


def _read_heatmaps(folder: Path) -> dict:
    """``{stem: (H, W) float32}`` from a folder of ``.npy`` files (no pickles are loaded)."""
    import numpy as np

    if not folder.is_dir():
        raise InputDataError(f"--heatmaps {folder}: not a folder")
    maps = {}
    for p in sorted(folder.glob("*.npy")):
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputDataError(f"--heatmaps: {p} is not a readable .npy array ({e})") from e
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise InputDataError(f"--heatmaps: {p} holds a {a.dtype} array of shape {a.shape}; expected (H, W) floats")
        maps[p.stem] = a.astype(np.float32)
    if not maps:
        raise InputDataError(f"--heatmaps {folder}: no .npy file")
    return maps


def _heatmaps_were_random(folder: Path) -> bool:
    """``random_weights`` of the ``localize.json`` that `cmcr localize` wrote beside saved heatmaps (False when
    the folder has none: the heatmaps' provenance is then unknown)."""
    try:
        return bool(json.loads((folder / "localize.json").read_text()).get("random_weights"))
    except (OSError, ValueError, AttributeError):
        return False


def _compute_heatmaps(connector: Path, images: Path, audio: Path, keys: set, *, image_encoder: str | None,
                      audio_encoder: str | None, size: int | None, dense_path: str, device: str, out: Path | None,
                      clap_tokenizer: str | None) -> tuple[dict, bool, list[dict[str, str]]]:
    """Heatmaps of the (image, audio) pairs sharing a file stem that is an annotation key; one bad pair is
    recorded in the failures and skipped."""
    from cmcr.errors import CmcrError
    from cmcr.localize import Localizer, image_files, write_outputs
    from cmcr.pipeline.audio import AUDIO_EXTENSIONS

    if not audio.is_dir():
        raise InputDataError(f"--audio {audio}: not a folder")
    clips = {p.stem: p for p in sorted(audio.rglob("*")) if p.is_file()
             and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS}
    pairs = [(p.stem, p, clips[p.stem]) for p in image_files(images) if p.stem in clips and p.stem in keys]
    if not pairs:
        raise InputDataError(f"no (image, audio) pair of {images} and {audio} has a file stem that is an annotation "
                             f"key; name image and clip after the sample key (e.g. frames/abc.jpg + audio/abc.wav)")
    loc = Localizer.load(connector, image_encoder=image_encoder, query_encoder=audio_encoder, device=device,
                         size=size, path=dense_path, clap_tokenizer=clap_tokenizer)
    random = bool(loc.random_weights())
    maps, failures = {}, []
    for key, img, clip in pairs:
        try:
            m = loc.localize(img, loc.embed_query(clip))
        except CmcrError as e:
            failures.append({"key": key, "error": str(e)})
            continue
        maps[key] = m.heatmap
        if out is not None:
            write_outputs(m, out, key, title=f"{clip.name} in {img.name}", random_weights=random)
    return maps, random, failures


def register(app: typer.Typer) -> None:
    """Add ``localize`` to the root app and ``localization`` to the ``eval`` group."""
    from cmcr.cli_connect import eval_app

    app.command("localize")(localize)
    eval_app.command("localization")(eval_localization)
