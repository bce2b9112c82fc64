"""`cmcr shard` and `cmcr encode`: the batch stage (corpora -> shards -> embedding stores)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from cmcr.console import err_console, out_console, plain

console = err_console()

SPEC_HELP = (
    "Encoder spec FAMILY:ARCHITECTURE or FAMILY:ARCHITECTURE@WEIGHTS: open_clip:ViT-B-32 (tag openai), "
    "open_clip:ViT-B-32@laion2b_s34b_b79k, open_clip:ViT-B-32@/path/ckpt.pt, "
    "open_clip:ViT-B-32@random (or @random:SEED), "
    "clap:HTSAT-tiny@/path/630k-audioset-best.pt, clap:HTSAT-tiny-fusion@/path/630k-fusion-best.pt (the paper's "
    "fusion CLAP), clap:HTSAT-tiny@random, "
    "ulip:PointBERT@/path/pointbert_ULIP-2.pt, ulip:PointBERT@random, and the tiny test models "
    "open_clip:cmcr-tiny-clip@random, clap:cmcr-tiny-clap@random, ulip:cmcr-tiny-ulip@random."
)


def shard(
    inputs: list[str] = typer.Argument(..., help="Folders, .txt lists (paths or captions), .csv/.tsv/.jsonl tables, "
                                                 "existing .tar shards (resharded; image+caption tars give paired "
                                                 "image and text shards), or shard URLs: 'pipe:CMD', http(s)://, "
                                                 "s3:// (brace ranges expanded)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards go to OUT/<modality>/shard-NNNNNN.tar."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", "-n", min=1, help="Samples per shard."),
    modality: str | None = typer.Option(None, help="Keep only this modality (image, audio, text, 3d)."),
    text_column: str | None = typer.Option(None, help="Table column holding captions (auto: text, caption, sentence)."),
    path_column: str | None = typer.Option(None, help="Table column holding media paths (auto: path, file, ...)."),
    key_column: str | None = typer.Option(None, help="Table column holding unique sample ids used as keys."),
    label_column: str = typer.Option("label", help="Table column holding the label."),
    max_member_bytes: int | None = typer.Option(
        None, "--max-member-bytes", min=1, envvar="CMCR_MAX_MEMBER_BYTES",
        help="Resharding tars: largest member read into memory (default 256 MiB)."),
    max_sample_bytes: int | None = typer.Option(
        None, "--max-sample-bytes", min=1, envvar="CMCR_MAX_SAMPLE_BYTES",
        help="Resharding tars: largest sample read into memory (default 512 MiB)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (stdout)."),
) -> None:
    """Write webdataset shards with stable, safe keys and per-sample JSON metadata.

    Same input, same shards (byte for byte). Modality comes from the file extension (3d: .npy, .ply,
    .obj, .off, .stl, .glb); README/LICENSE-named text files in media folders are skipped, not captions.

    Example: cmcr shard cmcr/data/sample/images cmcr/data/sample/audio --out shards -n 1000

    Remote img2dataset shards: cmcr shard 'https://host/cc3m/{00000..00099}.tar' --out shards
    (-> shards/image + shards/text, paired by key; an input that cannot be read is reported and exits 1).
    """
    from cmcr.errors import InputDataError
    from cmcr.pipeline.shards import write_shards

    _set_limits(CMCR_MAX_MEMBER_BYTES=max_member_bytes, CMCR_MAX_SAMPLE_BYTES=max_sample_bytes)
    report = write_shards(inputs, out, samples_per_shard, modality=modality, text_column=text_column,
                          path_column=path_column, key_column=key_column, label_column=label_column)
    if as_json:
        _print_json(report.to_json())
        _raise_failed_inputs(report, out, InputDataError)
        return
    table = Table(title=f"shards in {out}")
    for col in ("modality", "samples", "shards", "folder"):
        table.add_column(col)
    for mod, paths in report.shards.items():
        table.add_row(mod, str(report.counts[mod]), str(len(paths)), str(out / mod))
    out_console().print(table)
    for mod in report.replaced:
        console.print(f"[yellow]warning: {plain(out / mod)} held shards of different content before; stores encoded "
                      f"from the old shards no longer match them: encode into a new store, or with --overwrite[/]",
                      highlight=False)
    skipped = report.skipped + report.duplicates
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} entries[/]:")
        for s in skipped[:20]:
            console.print(f"  {s.source}: {s.reason}", highlight=False, markup=False)
        if len(skipped) > 20:
            console.print(f"  ... and {len(skipped) - 20} more (run with -v to log all)")
    _raise_failed_inputs(report, out, InputDataError)


def _raise_failed_inputs(report, out: Path, error: type[Exception]) -> None:  # noqa: ANN001
    """Exit 1 naming every input that could not be read (the others were sharded)."""
    if report.failed:
        lines = "; ".join(s.reason for s in report.failed[:5])
        more = f" (and {len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
        raise error(f"{len(report.failed)} input(s) could not be read to their end: {lines}{more}. The other inputs "
                    f"were sharded into {out} (the failures are listed in its shards.json, failed_inputs); fix them "
                    f"and rerun the same command (the same inputs give the same shards)")


def encode(
    shards: list[str] = typer.Argument(..., help="Shard folder(s), .tar files, globs or brace patterns "
                                                 "(e.g. shards/image or 'shards/image/shard-{000000..000009}.tar'), "
                                                 "or shard URLs ('pipe:CMD', http(s)://, s3://)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help=SPEC_HELP),
    modality: str = typer.Option(..., "--modality", "-m",
                                 help="image or text (open_clip); audio or text (clap); 3d, image or text (ulip)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store folder (created if missing; a rerun resumes)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Samples per forward pass."),
    num_workers: int = typer.Option(2, "--num-workers", "-j", min=0,
                                    help="DataLoader workers decoding/preprocessing (0: in the main process)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 autocast (rows are normalised in float32)."),
    dtype: str = typer.Option("float16", help="Storage dtype of a new store: float16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: remove the store at --store first, whatever it holds "
                                        "(without it a store made the same way resumes; another is refused)."),
    clap_tokenizer: Path | None = typer.Option(
        None, envvar="CMCR_CLAP_TOKENIZER",
        help="Folder with RoBERTa vocab.json + merges.txt for CLAP text (env CMCR_CLAP_TOKENIZER)."),
    threads: int | None = typer.Option(
        None, min=1, help="torch threads of the forward pass, fixed for the run (default on CPU with workers: "
                   "CPUs minus --num-workers for the first batch, then the cores the measured decode load leaves "
                   "free; without workers or on a GPU torch's default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    mesh_samples: int = typer.Option(10_000, "--mesh-samples", min=1,
                                     help="-m 3d: points sampled uniformly on a mesh's surface (recorded in the "
                                          "store manifest)."),
    max_3d_mb: float = typer.Option(256.0, "--max-3d-mb", min=0.001,
                                    help="-m 3d: larger files become failures (MiB)."),
    max_3d_points: int = typer.Option(5_000_000, "--max-3d-points", min=1,
                                      help="-m 3d: clouds with more points / meshes with more vertices become "
                                           "failures."),
    engine: str = typer.Option(
        "local", "--engine",
        help="local: this process + DataLoader workers; ray: Ray Data, decode/preprocess in tasks and the encoder "
             "in actors (pip install 'cmcr[ray]'; see docs/ray.md)."),
    address: str | None = typer.Option(
        None, "--address",
        help="--engine ray: cluster address (auto, host:6379, ray://head:10001); default $RAY_ADDRESS, else Ray "
             "started on this machine."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="--engine ray: encoder actors (model copies)."),
    gpus_per_replica: float | None = typer.Option(
        None, "--gpus-per-replica",
        help="--engine ray: GPUs per encoder actor (0.5 = two per GPU); default 1 when the cluster has GPUs, else 0."),
    max_image_pixels: int | None = typer.Option(
        None, "--max-image-pixels", min=1, envvar="CMCR_MAX_IMAGE_PIXELS",
        help="Largest image (width x height) decoded; bigger ones are recorded failures (default 89478485, "
             "PIL's limit; env CMCR_MAX_IMAGE_PIXELS)."),
    max_member_bytes: int | None = typer.Option(
        None, "--max-member-bytes", min=1, envvar="CMCR_MAX_MEMBER_BYTES",
        help="Largest tar member read into memory; bigger ones fail their sample (default 268435456 = 256 MiB)."),
    max_sample_bytes: int | None = typer.Option(
        None, "--max-sample-bytes", min=1, envvar="CMCR_MAX_SAMPLE_BYTES",
        help="Largest tar sample (all its members) read into memory (default 536870912 = 512 MiB)."),
    fail_fast: bool = typer.Option(
        False, "--fail-fast",
        help="Stop at the first shard with a failed sample (exit 1 naming it), after recording its failures and "
             "writing its good rows; a rerun resumes. Default: record each failure and go on."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (stdout); no progress bar."),
) -> None:
    """Embed shards into a store: one atomic part per shard, failures in the store's failure table.

    A rerun skips shards that already have a part. The summary shows rows, failures and the
    seconds spent decoding, in the model and writing.

    Example: cmcr encode shards/image --encoder open_clip:ViT-B-32@/ckpt/vit-b-32.pt -m image --store stores/clip-image

    On a Ray cluster (docs/ray.md): cmcr encode /shared/shards/image -e open_clip:ViT-B-32@/shared/vit-b-32.pt
    -m image -s /shared/stores/clip-image --engine ray --address auto --replicas 8 --gpus-per-replica 1
    """
    from cmcr.errors import ConfigError, InputDataError
    from cmcr.pipeline.encoders import parse_spec
    from cmcr.pipeline.media import MEDIA_EXTENSIONS
    from cmcr.pipeline.pointcloud import PointCloudDecoding

    parse_spec(encoder)  # a malformed spec is a usage error (exit 2), before any shard is looked at
    if modality not in MEDIA_EXTENSIONS:  # the modalities cmcr reads (each encoder embeds some of them)
        raise ConfigError(f"--modality {modality!r}: use one of {', '.join(MEDIA_EXTENSIONS)}")
    command = " ".join(shlex.quote(a) for a in ["cmcr", *sys.argv[1:]])
    _set_limits(CMCR_MAX_IMAGE_PIXELS=max_image_pixels, CMCR_MAX_MEMBER_BYTES=max_member_bytes,
                CMCR_MAX_SAMPLE_BYTES=max_sample_bytes)
    tokenizer = str(clap_tokenizer) if clap_tokenizer else None
    pointcloud = PointCloudDecoding(mesh_samples=mesh_samples, max_bytes=int(max_3d_mb * 2**20),
                                    max_points=max_3d_points)
    try:
        report = _run(shards, encoder, modality, store, batch_size=batch_size, num_workers=num_workers,
                      device=device, precision=precision, dtype=dtype, overwrite=overwrite, tokenizer=tokenizer,
                      threads=threads, progress=progress and not as_json, engine=engine, address=address,
                      replicas=replicas, gpus_per_replica=gpus_per_replica, command=command, pointcloud=pointcloud,
                      fail_fast=fail_fast)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted — the store holds {_complete_parts(store)} complete parts; rerun the "
                      f"same command to resume[/]", highlight=False)
        raise typer.Exit(130) from None
    if as_json:
        _print_json(report.to_json())
    else:
        _print_report(report, modality, store, engine)
    if report.rows == 0 and report.failures > 0:
        raise InputDataError(
            f"every sample failed: {report.failures} failure(s), no row written to {store} "
            f"({report.shards_done} shard(s) done, {report.shards_failed} unreadable). Wrong --modality for these "
            f"shards, or broken inputs? See the failures above and in {store}/failures.parquet"
        )


def _print_json(obj: object) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


def _set_limits(**values: int | None) -> None:
    """Put size limits in the environment: the image decoder and the tar reader read them in every
    DataLoader worker / Ray task (``pipeline.images.max_pixels``, ``pipeline.corpora.TarLimits``)."""
    import os

    for name, value in values.items():
        if value is not None:
            os.environ[name] = str(value)


def _complete_parts(store: Path) -> int:
    """Parts in the store at ``store`` (0 when there is none yet)."""
    from cmcr.stores.store import Store

    try:
        return len(Store.open(store, validate="none").parts)
    except Exception:  # no store yet, or unreadable: nothing complete to report
        return 0


def _run(shards: list[str], encoder: str, modality: str, store: Path, *, batch_size: int, num_workers: int,
         device: str, precision: str, dtype: str, overwrite: bool, tokenizer: str | None, threads: int | None,
         progress: bool, engine: str, address: str | None, replicas: int, gpus_per_replica: float | None,
         command: str, pointcloud=None, fail_fast: bool = False):  # noqa: ANN001
    """Run one engine; returns its report."""
    from cmcr.errors import ConfigError
    from cmcr.pipeline import encode as encode_mod

    handler = encode_mod.fail_fast if fail_fast else encode_mod.record_and_continue

    if engine == "ray":
        from cmcr.pipeline.ray_engine import encode_shards_ray

        report = encode_shards_ray(shards, encoder, modality, store, batch_size=batch_size, num_workers=0,
                                   overwrite=overwrite, start_over=overwrite, progress=progress, dtype=dtype,
                                   command=command, device=device, precision=precision, clap_tokenizer=tokenizer,
                                   address=address, replicas=replicas, gpus_per_replica=gpus_per_replica,
                                   pointcloud=pointcloud, handler=handler)
    elif engine == "local":
        from cmcr.pipeline.encode import encode_shards
        from cmcr.pipeline.encoders import load_encoder

        enc = load_encoder(encoder, device=device, precision=precision, clap_tokenizer=tokenizer)
        report = encode_shards(shards, enc, modality, store, batch_size=batch_size, num_workers=num_workers,
                               overwrite=overwrite, start_over=overwrite, progress=progress, dtype=dtype,
                               command=command, torch_threads=threads or None, pointcloud=pointcloud,
                               handler=handler)
    else:
        raise ConfigError(f"--engine must be local or ray, got {engine!r}")
    return report


def _print_report(report, modality: str, store: Path, engine: str) -> None:
    """The summary table and the first failures."""
    t = Table(title=f"encode {modality} -> {store}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("rows written", str(report.rows))
    t.add_row("failures", str(report.failures))
    t.add_row("shards done / skipped / failed",
              f"{report.shards_done} / {report.shards_skipped} / {report.shards_failed}")
    t.add_row("samples/s", f"{report.samples_per_s:.1f}")
    t.add_row("decode+preprocess (CPU s, all workers)", f"{report.decode_s:.2f}")
    st = report.stages
    t.add_row("  per stage (CPU s, all workers)", f"read {st['read']:.2f} · decode {st['decode']:.2f} · "
              f"preprocess {st['preprocess']:.2f} · collate {st['collate']:.2f}")
    t.add_row("waiting for data (s)", f"{report.wait_s:.2f}")
    t.add_row("model forward (s)", f"{report.model_s:.2f}")
    t.add_row("writing parts (s)", f"{report.write_s:.2f}")
    t.add_row("wall (s)", f"{report.wall_s:.2f}")
    t.add_row("model busy", f"{100 * report.model_busy:.0f}%" if report.wall_s else "-")
    threads = str(report.torch_threads or "-")
    if report.decode_share is not None:
        threads += f" (auto: decode {100 * report.decode_share:.0f}% of the CPU work)"
    t.add_row("torch threads (forward pass)", threads)
    if engine == "ray":
        t.add_row("Ray replicas x GPUs", f"{report.replicas} x {report.gpus_per_replica:g}")
        t.add_row("Ray start-up: init / first result (s)", f"{report.ray_init_s:.2f} / {report.first_result_s:.2f}")
    out_console().print(t)
    for f in report.failure_examples[:5]:
        console.print(f"  failure {f['key']!r} ({f['stage']}): {f['error']}", highlight=False, markup=False)
    if report.failures:
        console.print(f"[yellow]{report.failures} failures recorded in {plain(store)}/failures.parquet[/]")
    for shard_path in report.empty_shards[:20]:
        console.print(f"[yellow]warning:[/] empty shard (no samples): {plain(shard_path)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``shard`` and ``encode`` to the root app."""
    app.command("shard")(shard)
    app.command("encode")(encode)
