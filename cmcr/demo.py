"""`cmcr demo`: the whole product on the bundled real media, end to end.

shard → encode (CLIP: captions + images; CLAP: captions + audio) → connect → project →
evaluate (audio→image by shared label, with chance level; zero-shot across the two MCRs) →
example searches (an audio file → top images; a caption → top audio clips) → the synthetic
check → a Markdown and an HTML report with the retrieval table and thumbnails.

Weights: pretrained, with no flag — the default specs' files (CLIP ViT-B-32 ``openai`` weights, the
laion_clap ``630k-audioset-best.pt`` checkpoint, the ``roberta-base`` tokenizer files) come from the
Hugging Face cache, or are downloaded into it once where the hub is reachable
(:mod:`cmcr.pipeline.hub`). Only when the hub cannot be reached (connection refused, timeout,
``HF_HUB_OFFLINE=1``) and a file is not cached does the demo fall back to random-init encoders of
the same architectures, saying so loudly and marking every output "random weights: not
meaningful". A missing or broken file on a reachable hub, or a bad local checkpoint, is an error.

The demo only glues the three rooms together; every step is a library call that the CLI
commands expose too.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from cmcr.stores.files import OUTPUT_LOCK, atomic_write_json, claim_output, locks_output

log = logging.getLogger(__name__)

SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"
DEFAULT_CLIP = "open_clip:ViT-B-32"  # open_clip's default pretrained tag: openai
DEFAULT_CLAP = "clap:HTSAT-tiny"  # laion_clap's 630k-audioset non-fusion checkpoint
FAST_CLIP = "open_clip:cmcr-tiny-clip@random"
FAST_CLAP = "clap:cmcr-tiny-clap@random"
RANDOM_BANNER = "random weights: not meaningful"
#: Captions used by default: the text towers dominate CPU time (RoBERTa-base: ~0.1 s per caption on
#: 2 cores), so the demo stays under ~10 minutes; ``--captions 3500`` uses the whole bundled subset.
DEFAULT_CAPTIONS = 1000
AUDIO_QUERY_LABEL = "dog"  # label of the example audio query
TEXT_QUERY = "a dog barking loudly"
#: Labels of the localisation pictures (a bundled clip and a bundled image of each; photos preferred).
LOCALIZATION_LABELS = ("dog", "cat", "cow", "horse")
#: Dense input size of the localisation pictures: 448 px gives ViT-B-32 a 14 x 14 patch grid (224: 7 x 7).
LOCALIZATION_SIZE = 448
PROMPT_TEMPLATE = "a photo or a sound of a {}."
#: Short headers for the terminal tables (the reports keep the full column names).
DISPLAY_NAMES = {"queries_without_positive": "no positive", "median_rank": "median rank",
                 "chance_R@1": "chance R@1", "chance_R@5": "chance R@5", "chance_R@10": "chance R@10",
                 "chance_mAP": "chance mAP", "chance_top1": "chance top1", "chance_top5": "chance top5",
                 "image_to_audio_R@1": "img→aud R@1", "zeroshot_top1": "zero-shot top1",
                 "zeroshot_chance": "zero-shot chance"}
CONSOLE_RETRIEVAL = ["direction", "queries", "queries_without_positive", "pool", "R@1", "R@5", "R@10", "mAP",
                     "chance_R@1", "chance_R@5", "chance_mAP"]
CONSOLE_SYNTHETIC = ["variant", "pool", "R@1", "R@5", "R@10", "mAP", "chance_R@1", "chance_mAP",
                     "image_to_audio_R@1", "zeroshot_top1", "seconds"]
RETRIEVAL_COLUMNS = ["direction", "queries", "queries_without_positive", "pool", "R@1", "R@5", "R@10", "mAP",
                     "median_rank", "chance_R@1", "chance_R@5", "chance_R@10", "chance_mAP"]
PER_CLASS_COLUMNS = ["label", "queries", "positives", "R@1", "R@5", "mAP", "chance_R@1", "chance_R@5", "chance_mAP"]
ZEROSHOT_COLUMNS = ["task", "classes", "items", "top1", "top5", "chance_top1", "chance_top5"]
SYNTHETIC_COLUMNS = ["variant", "direction", "pool", "R@1", "R@5", "R@10", "mAP", "chance_R@1", "chance_R@5",
                     "chance_mAP", "image_to_audio_R@1", "zeroshot_top1", "zeroshot_chance", "seconds"]


@dataclass
class DemoOptions:
    """Options of :func:`run_demo` (the CLI flags of ``cmcr demo``).

    Attributes:
        out: output folder (shards, stores, connector, report).
        fast: tiny random-init encoders, 500 captions, few epochs (for tests; seconds, not minutes).
        clip, clap: encoder specs (``None`` = pretrained defaults, or the tiny ones with ``fast``).
        clap_tokenizer: folder with RoBERTa ``vocab.json`` + ``merges.txt`` for a real CLAP checkpoint.
        captions: number of bundled captions used as the shared (text) corpus (``None`` = 1,000 of the
            3,500 bundled, or 500 with ``fast``).
        epochs: connector training epochs (``None`` = 20, or 8 with ``fast``).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``...
        synthetic: also run the synthetic check (ablations table).
        num_workers: DataLoader workers for decoding.
        overwrite: start over: discard the demo run in ``out`` (whatever its settings) and run it anew.
    """

    out: Path = Path("demo-out")
    fast: bool = False
    clip: str | None = None
    clap: str | None = None
    clap_tokenizer: str | None = None
    captions: int | None = None
    epochs: int | None = None
    device: str = "auto"
    synthetic: bool = True
    num_workers: int = 2
    seed: int = 0
    overwrite: bool = False


@dataclass
class DemoResult:
    """What :func:`run_demo` measured (also written to ``<out>/demo.json``)."""

    random_weights: bool
    encoders: dict[str, str]
    weight_notes: list[str]
    counts: dict[str, int]
    encode: dict[str, dict[str, Any]]
    connect: dict[str, Any]
    retrieval: list[dict[str, Any]]
    zeroshot: list[dict[str, Any]]
    searches: list[dict[str, Any]]
    synthetic: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    localization: list[dict[str, Any]] = field(default_factory=list)
    report_md: str = ""
    report_html: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _random_variant(spec: str) -> str:
    return spec.split("@", 1)[0] + "@random"


def load_or_random(name: str, spec: str, notes: list[str], *, device: str = "auto",
                   clap_tokenizer: str | None = None, no_hub_fallback: bool = False):  # noqa: ANN201
    """Load the encoder ``spec``; fall back to its random-init variant **only** when its weights must come
    from the model hub and the hub is unreachable (a note in ``notes`` says so). Any other failure (a
    missing local file, a broken download, a wrong checkpoint) is raised.

    Args:
        name: what the encoder is called in the note (``CLIP``...).
        no_hub_fallback: also fall back when a default spec (no ``@weights``) names a model that no hub
            serves (ULIP-2): there is nothing to download, so the demo runs on random weights and says so.

    Raises:
        CmcrError: the encoder cannot be built (and no fallback applies).
    """
    from cmcr.errors import EncoderError, HubUnreachableError
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.hub import endpoint as hub_endpoint

    try:
        enc = load_encoder(spec, device=device, clap_tokenizer=clap_tokenizer)
        if enc.family == "clap" and not spec.endswith("@random") and "@random:" not in spec:
            enc.preprocessing("text")  # the demo embeds captions: get the tokenizer files now
        return enc
    except HubUnreachableError as e:  # the case for a fallback
        why = f"the model hub {hub_endpoint()} is unreachable ({_first_line(e)})"
    except EncoderError as e:
        if not (no_hub_fallback and "@" not in spec):
            raise
        why = _first_line(e)
    fallback = _random_variant(spec)
    notes.append(f"{name}: pretrained weights for {spec!r} unavailable because {why}; using random init {fallback!r}")
    return load_encoder(fallback, device=device, clap_tokenizer=clap_tokenizer)


def load_demo_encoders(opts: DemoOptions, console: Console):
    """Load the CLIP and CLAP encoders, falling back to random init (loudly) when weights are missing.

    Returns:
        ``(clip, clap, notes, random_weights)`` — the two :class:`~cmcr.pipeline.encoders.Encoder`,
        human-readable notes on where weights came from, and whether any encoder is random-init.
    """
    clip_spec = opts.clip or (FAST_CLIP if opts.fast else DEFAULT_CLIP)
    clap_spec = opts.clap or (FAST_CLAP if opts.fast else DEFAULT_CLAP)
    notes: list[str] = []
    encoders = [load_or_random(name, spec, notes, device=opts.device, clap_tokenizer=opts.clap_tokenizer)
                for name, spec in (("CLIP", clip_spec), ("CLAP", clap_spec))]
    from cmcr.trainer.evaluate import random_weight_identities

    random_weights = bool(random_weight_identities(*(e.identity() for e in encoders)))
    if random_weights:
        console.print(Panel.fit(
            "[bold]No pretrained weights in use[/] for at least one encoder.\n"
            "The pipeline runs end to end, but every number below is [bold red]" + RANDOM_BANNER + "[/].\n"
            "Get real numbers: run once where the model hub is reachable (the weights are cached for later "
            "offline runs), or see docs/encode.md 'Real checkpoints online and offline'; e.g. "
            "[cyan]--clip open_clip:ViT-B-32-quickgelu@/path/to/open_clip_model.safetensors "
            "--clap clap:HTSAT-tiny@/path/to/630k-audioset-best.pt --clap-tokenizer /path/to/roberta-base[/]\n"
            + "\n".join(f"• {n}" for n in notes),
            title="[bold red]RANDOM WEIGHTS", border_style="red"))
    return encoders[0], encoders[1], notes, random_weights


def encoder_spec(enc: Any, spec: str) -> str:
    """The spec that rebuilds ``enc``, which was loaded from ``spec``: its random-init variant (with its
    seed) when :func:`load_or_random` fell back to random weights, else ``spec`` itself."""
    ident = enc.identity()
    if str(ident.get("weights", "")).startswith("random"):
        seed = int(ident.get("seed") or 0)
        return f"{ident['family']}:{ident['architecture']}@random" + (f":{seed}" if seed else "")
    return spec


def serve_command(connector: Path, galleries: list[Path], encoders: list[tuple[Any, str]],
                  clap_tokenizer: str | None = None) -> str:
    """The one ``cmcr serve`` command line that serves a demo's output: its connector, galleries and
    ``(encoder, spec it was loaded from)`` pairs (see :func:`encoder_spec`)."""
    import shlex

    parts = ["cmcr", "serve", "-c", str(connector)]
    for g in galleries:
        parts += ["-g", str(g)]
    for enc, spec in encoders:
        parts += ["-e", encoder_spec(enc, spec)]
    if clap_tokenizer:
        parts += ["--clap-tokenizer", str(clap_tokenizer)]
    return shlex.join(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def prepare_corpus(out: Path, n_captions: int | None) -> dict[str, Path]:
    """Write the demo's inputs under ``<out>/corpus``: the caption table (first ``n_captions``
    rows of the bundled subset) — images and audio are read from the bundled folders directly."""
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    src = SAMPLE_DATA / "text" / "coco_captions_subset.csv"
    dst = corpus / "captions.csv"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if n_captions is not None:
        rows = rows[:n_captions]
    tmp = dst.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["caption", "image_id"])
        w.writeheader()
        w.writerows({"caption": r["caption"], "image_id": r["image_id"]} for r in rows)
    os.replace(tmp, dst)
    return {"captions": dst, "images": SAMPLE_DATA / "images", "audio": SAMPLE_DATA / "audio"}


DEMO_MARKER = "demo-settings.json"
DEMO_OUTPUTS = ("corpus", "shards", "stores", "connector", "projected", "synthetic", "report_files", "localization",
                "report.md", "report.html", "demo.json", DEMO_MARKER)


def check_output_folder(out: Path) -> None:
    """Refuse an ``out`` folder that holds something other than a demo run (nothing is touched).

    Raises:
        ConfigError: ``out`` is a file, or a non-empty folder without the demo's settings file.
    """
    from cmcr.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    # "release" is the folder of `cmcr demo --release` (cmcr/release_demo.py), which may share --out
    if out.is_dir() and any(p.name not in ("release", OUTPUT_LOCK) for p in out.iterdir()) \
            and not (out / DEMO_MARKER).exists():
        raise ConfigError(f"--out {out} is not empty and holds no demo run ({DEMO_MARKER} missing); "
                          f"pass an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)


def claim_output_folder(out: Path, settings: dict[str, Any], *, overwrite: bool) -> None:
    """Claim ``out`` for the demo (:func:`~cmcr.stores.files.claim_output`) and record the run's settings
    there: a rerun with the same settings resumes (finished shards and stores are reused), a rerun with
    other settings (other encoders, caption count...) is refused before anything is touched, and
    ``overwrite`` starts over (the demo's outputs are removed first, whatever their settings).

    Raises:
        ConfigError: ``out`` holds a demo run with other settings and ``overwrite`` is False, or files
            that are not a demo run's.
    """
    from cmcr.errors import ConfigError

    def clear(folder: Path) -> None:  # only what the demo writes: `cmcr demo --release` may share the folder
        for name in DEMO_OUTPUTS:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    with claim_output(out, kind="demo run", provenance=settings, overwrite=overwrite, record=DEMO_MARKER,
                      error=ConfigError, foreign=("release",), clear=clear) as claim:
        claim.publish()


def _labels(store) -> list[Any]:  # noqa: ANN001
    return store.metadata(["label"]).column("label").to_pylist()


@locks_output("opts", folder=lambda o: o.out)
def run_demo(opts: DemoOptions, console: Console | None = None,
             step: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo end to end and write ``<out>/report.md``, ``<out>/report.html``, ``<out>/demo.json``.

    Steps: :func:`plan_demo` (encoders, output claim) -> :func:`execute_demo` (shard, encode, connect,
    project + evaluate, search, synthetic check) -> :func:`publish_demo` (reports).

    Raises:
        CmcrError: a stage failed in a way the demo cannot recover from (the message names it).
    """
    console = console or Console(width=None if Console().is_terminal else 130)
    out = Path(opts.out)
    check_output_folder(out)
    seconds: dict[str, float] = {}

    def stage(name: str):
        if step:
            step(name)
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    planned = plan_demo(opts, out, console, stage, seconds)
    executed = execute_demo(opts, out, console, stage, seconds, **planned)
    return publish_demo(opts, out, console, seconds, **planned, **executed)


def plan_demo(opts: DemoOptions, out: Path, console: Console, stage: Callable[[str], float],
              seconds: dict[str, float]) -> dict[str, Any]:
    """Plan step of :func:`run_demo`: load the encoders (stage 1) and claim ``out`` with the run's
    settings (:func:`claim_output_folder`). Returns ``clip, clap, notes, random_weights, encoders,
    n_captions`` by name."""
    t = stage("1/7 weights")
    clip, clap, notes, random_weights = load_demo_encoders(opts, console)
    encoders = {name: json.dumps(enc.identity(), sort_keys=True) for name, enc in (("clip", clip), ("clap", clap))}
    seconds["weights"] = time.perf_counter() - t

    n_captions = opts.captions if opts.captions is not None else (500 if opts.fast else DEFAULT_CAPTIONS)
    claim_output_folder(out, {"encoders": encoders, "captions": n_captions, "fast": opts.fast, "seed": opts.seed},
                        overwrite=opts.overwrite)
    return {"clip": clip, "clap": clap, "notes": notes, "random_weights": random_weights, "encoders": encoders,
            "n_captions": n_captions}


def execute_demo(opts: DemoOptions, out: Path, console: Console, stage: Callable[[str], float],
                 seconds: dict[str, float], *, clip: Any, clap: Any, notes: list[str], random_weights: bool,
                 encoders: dict[str, str], n_captions: int) -> dict[str, Any]:
    """Execute step of :func:`run_demo`: stages 2-7 (shard, encode, connect, project + evaluate, search,
    synthetic check), each reusing what a rerun with the same settings finished. Returns what the report
    needs by name."""
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.shards import write_shards
    from cmcr.trainer.config import TrainConfig
    from cmcr.trainer.connector import Connector
    from cmcr.trainer.evaluate import evaluate_retrieval, project_store
    from cmcr.trainer.loop import train_connector
    from cmcr.trainer.metrics import zeroshot_accuracy

    t = stage("2/7 shard")
    inputs = prepare_corpus(out, n_captions)
    shard_dir = out / "shards"
    reports = {
        "text": write_shards([inputs["captions"]], shard_dir / "captions", samples_per_shard=1000, modality="text"),
        "image": write_shards([inputs["images"]], shard_dir / "images", samples_per_shard=64, modality="image"),
        "audio": write_shards([inputs["audio"]], shard_dir / "audio", samples_per_shard=64, modality="audio"),
    }
    counts = {m: r.counts.get(m, 0) for m, r in reports.items()}
    console.print(f"shards: {counts['text']} captions, {counts['image']} images, {counts['audio']} audio clips")
    seconds["shard"] = time.perf_counter() - t

    t = stage("3/7 encode")
    stores_dir = out / "stores"
    plan = [("clip_text", clip, "text"), ("clip_image", clip, "image"),
            ("clap_text", clap, "text"), ("clap_audio", clap, "audio")]
    encode_reports: dict[str, dict[str, Any]] = {}
    for name, enc, modality in plan:
        rep = encode_shards(reports[modality].shards[modality], enc, modality, stores_dir / name,
                            batch_size=64 if modality == "text" else 16, num_workers=opts.num_workers,
                            progress=True, command="cmcr demo")
        encode_reports[name] = rep.to_json()
        console.print(f"{name}: {rep.rows} rows, {rep.failures} failures, {rep.samples_per_s:.1f} samples/s")
    seconds["encode"] = time.perf_counter() - t

    t = stage("4/7 connect")
    cfg = TrainConfig(epochs=opts.epochs or (8 if opts.fast else 20), batch_size=256, device=opts.device,
                      seed=opts.seed, name_a="clip", name_b="clap")
    connect = train_connector(stores_dir / "clip_text", stores_dir / "clap_text", stores_dir / "clip_image",
                              stores_dir / "clap_audio", out / "connector", cfg, overwrite=True, progress=True)
    connector = Connector.load(out / "connector")
    seconds["connect"] = time.perf_counter() - t

    t = stage("5/7 project + evaluate")
    projected = out / "projected"
    z_img_store = project_store(connector, stores_dir / "clip_image", projected / "clip_image", overwrite=True)
    z_aud_store = project_store(connector, stores_dir / "clap_audio", projected / "clap_audio", overwrite=True)
    retrieval = []
    for q_store, g_store in ((z_aud_store, z_img_store), (z_img_store, z_aud_store)):
        m = evaluate_retrieval(q_store, g_store, by="label")
        retrieval.append({"direction": m["direction"], "positives": "same label", **_flat(m)})
    z_img, z_aud = z_img_store.embeddings(np.float32), z_aud_store.embeddings(np.float32)
    zeroshot = _zeroshot(clip, clap, connector, z_img, _labels(z_img_store), z_aud, _labels(z_aud_store),
                         zeroshot_accuracy)
    per_class = _per_class(z_aud, _labels(z_aud_store), z_img, _labels(z_img_store))
    _print_table(console, "retrieval in the connected space (positives: same label)", retrieval, random_weights,
                 CONSOLE_RETRIEVAL)
    _print_table(console, "zero-shot classification across the two MCRs", zeroshot, random_weights,
                 ZEROSHOT_COLUMNS)
    seconds["evaluate"] = time.perf_counter() - t

    t = stage("6/7 search")
    searches = _example_searches(clip, connector, z_img_store, z_aud_store, z_aud)
    for s in searches:
        console.print(f"[bold]{s['query']}[/] → " + ", ".join(f"{h['key']} ({h['label']}, {h['score']:.3f})"
                                                             for h in s["hits"][:5]))
    localization = _localization(clip, clap, connector, out, random_weights)
    for row in localization:
        console.print(f"[bold]where is the {row['label']} sound?[/] {row['audio']} in {row['image']}: peak at "
                      f"(x={row['peak_xy'][0]}, y={row['peak_xy'][1]}) -> {row['png']}",
                      highlight=False, soft_wrap=True)
    seconds["search"] = time.perf_counter() - t

    synthetic: list[dict[str, Any]] = []
    if opts.synthetic:
        t = stage("7/7 synthetic check")
        synthetic = _synthetic(out / "synthetic", opts.fast)
        _print_table(console, "synthetic check: audio→image with known true pairs", synthetic, False,
                     CONSOLE_SYNTHETIC)
        seconds["synthetic"] = time.perf_counter() - t
    return {"counts": counts, "encode_reports": encode_reports, "connect": connect, "retrieval": retrieval,
            "zeroshot": zeroshot, "searches": searches, "synthetic": synthetic, "per_class": per_class,
            "projected": projected, "localization": localization}


def publish_demo(opts: DemoOptions, out: Path, console: Console, seconds: dict[str, float], *, clip: Any, clap: Any,
                 notes: list[str], random_weights: bool, encoders: dict[str, str], n_captions: int,
                 counts: dict[str, int], encode_reports: dict[str, dict[str, Any]], connect: dict[str, Any],
                 retrieval: list[dict[str, Any]], zeroshot: list[dict[str, Any]], searches: list[dict[str, Any]],
                 synthetic: list[dict[str, Any]], per_class: list[dict[str, Any]], projected: Path,
                 localization: list[dict[str, Any]]) -> DemoResult:
    """Publish step of :func:`run_demo`: the :class:`DemoResult`, ``report.md`` / ``report.html`` /
    ``demo.json`` (:func:`write_reports`) and the closing lines on the console."""
    result = DemoResult(random_weights=random_weights, encoders=encoders, weight_notes=notes, counts=counts,
                        encode=encode_reports,
                        connect={"connector": str(connect["connector"]), "metrics": connect["metrics"],
                                 "data": connect["data"], "device": connect["device"]},
                        retrieval=retrieval, zeroshot=zeroshot, searches=searches, synthetic=synthetic,
                        seconds={k: round(v, 2) for k, v in seconds.items()}, per_class=per_class,
                        localization=localization)
    serve = serve_command(out / "connector", [projected / "clip_image", projected / "clap_audio"],
                          [(clip, opts.clip or (FAST_CLIP if opts.fast else DEFAULT_CLIP)),
                           (clap, opts.clap or (FAST_CLAP if opts.fast else DEFAULT_CLAP))], opts.clap_tokenizer)
    write_reports(result, out, serve)
    console.print(f"\nreport: {result.report_md} and {result.report_html}")
    console.print(f"browse it: {serve}", highlight=False, soft_wrap=True)
    if random_weights:
        console.print(f"[bold red]{RANDOM_BANNER.upper()}[/]: the encoders were random-init; see the notes above.")
    return result


def _flat(m: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in m.items() if k != "chance" and not isinstance(v, (dict, list))}
    for k, v in (m.get("chance") or {}).items():
        row[f"chance_{k}"] = v
    return row


def _zeroshot(clip, clap, connector, z_img, img_labels, z_aud, aud_labels, zeroshot_accuracy):  # noqa: ANN001
    """Class prompts through one MCR's text encoder, items of the other MCR's modality."""
    rows = []
    for text_enc, side, items, labels, what in ((clip, "A", z_aud, aud_labels, "audio (CLAP) vs CLIP-text prompts"),
                                                 (clap, "B", z_img, img_labels, "images (CLIP) vs CLAP-text prompts")):
        classes = sorted({lab for lab in labels if lab})
        prompts = [PROMPT_TEMPLATE.format(c.replace("_", " ")) for c in classes]
        z_cls = connector.project(side, text_enc.encode("text", prompts), identity=text_enc.identity(),
                                  modality="text")
        acc = zeroshot_accuracy(items, labels, z_cls, classes)
        rows.append({"task": what, "classes": len(classes), "items": len(labels), **_flat(acc)})
    return rows


def _example_searches(clip, connector, z_img_store, z_aud_store, z_aud) -> list[dict[str, Any]]:  # noqa: ANN001
    """Two searches through the projected stores' FAISS indexes: an audio clip's projection → images, and a
    caption through CLIP's text encoder → audio clips (CLIP never saw audio)."""
    from cmcr.stores.index import open_index

    aud_meta = z_aud_store.metadata(["label", "source"]).to_pylist()
    q_row = next((i for i, m in enumerate(aud_meta) if m.get("label") == AUDIO_QUERY_LABEL), 0)
    z_query_audio = z_aud[q_row]  # the projected audio rows, already read for the evaluation
    z_txt = connector.project("A", clip.encode("text", [TEXT_QUERY]), identity=clip.identity(), modality="text")

    def hits(store, query: np.ndarray, k: int = 5) -> list[dict[str, Any]]:  # noqa: ANN001
        return [{"key": h.key, "score": float(h.score), "label": h.metadata.get("label"),
                 "source": h.metadata.get("source")} for h in open_index(store).search(query, k=k)[0]]

    return [
        {"query": f"audio {aud_meta[q_row]['key']} (label {aud_meta[q_row].get('label')}) → images",
         "kind": "audio->image", "hits": hits(z_img_store, z_query_audio), "query_key": aud_meta[q_row]["key"],
         "query_label": aud_meta[q_row].get("label"), "query_source": aud_meta[q_row].get("source")},
        {"query": f"caption {TEXT_QUERY!r} (CLIP text) → audio clips", "kind": "text->audio",
         "hits": hits(z_aud_store, z_txt[0]), "query_text": TEXT_QUERY},
    ]


def _localization(clip, clap, connector, out: Path, random_weights: bool) -> list[dict[str, Any]]:  # noqa: ANN001
    """Localisation pictures (``cmcr localize``) for a bundled clip and image of each of
    :data:`LOCALIZATION_LABELS`: ``<out>/localization/<label>.png`` (overlay) and ``.npy`` (heatmap). Returns one
    row per picture; ``[]`` (with a log line) when the CLIP side is not an open_clip ViT."""
    from cmcr.errors import CmcrError
    from cmcr.localize import Localizer, write_outputs

    try:
        loc = Localizer(connector, clip, clap, size=LOCALIZATION_SIZE)
    except CmcrError as e:
        log.warning("no localisation pictures: %s", e)
        return []
    with open(SAMPLE_DATA / "labels.csv", newline="", encoding="utf-8") as f:
        files = list(csv.DictReader(f))
    rows = []
    for label in LOCALIZATION_LABELS:
        audio = sorted(r["path"] for r in files if r["label"] == label and r["modality"] == "audio")
        images = sorted((not Path(r["path"]).name.startswith("coco_"), r["path"])
                        for r in files if r["label"] == label and r["modality"] == "image")
        if not audio or not images:
            continue
        a, i = SAMPLE_DATA / audio[0], SAMPLE_DATA / images[0][1]
        m = loc.localize(i, loc.embed_query(a))
        write_outputs(m, out / "localization", label, title=f"{a.name} in {i.name}", random_weights=random_weights)
        rows.append({"label": label, "audio": audio[0], "image": images[0][1],
                     "png": f"localization/{label}.png", "npy": f"localization/{label}.npy",
                     "grid": list(m.grid.shape), **{k: v for k, v in m.summary().items()
                                                     if k in ("peak_xy", "min", "max", "image_score")}})
    return rows


def _per_class(z_aud: np.ndarray, aud_labels: list[Any], z_img: np.ndarray, img_labels: list[Any]
               ) -> list[dict[str, Any]]:
    """Audio -> image retrieval by shared label, per class (labels with at least one image), with chance."""
    from cmcr.trainer.metrics import retrieval_metrics

    rows = []
    for label in sorted({lab for lab in aud_labels if lab and lab in set(img_labels)}):
        idx = [i for i, lab in enumerate(aud_labels) if lab == label]
        m = retrieval_metrics(z_aud[idx], z_img, [label] * len(idx), img_labels, ks=(1, 5))
        rows.append({"label": label, "queries": m["queries"], "positives": int(round(m["mean_positives"])),
                     **_flat({k: v for k, v in m.items() if k not in ("pool", "queries_without_positive",
                                                                      "median_rank", "mean_positives")})})
        rows[-1].pop("queries_without_positive", None)
    return rows


def _synthetic(out: Path, fast: bool) -> list[dict[str, Any]]:
    from cmcr.trainer.synthetic import SyntheticSpec, run_synthetic_check

    spec = SyntheticSpec(n_shared=600, n_memory_a=600, n_memory_b=600, n_eval=200) if fast else SyntheticSpec()
    return run_synthetic_check(out, spec, overwrite=True)  # the demo owns this folder; the check takes seconds


def _print_table(console: Console, title: str, rows: list[dict[str, Any]], random_weights: bool,
                 columns: list[str]) -> None:
    if not rows:
        return
    table = Table(title=title + (f"  [red]({RANDOM_BANNER})[/]" if random_weights else ""))
    cols = [c for c in columns if c in rows[0]]
    for c in cols:
        table.add_column(DISPLAY_NAMES.get(c, c), no_wrap=c in ("direction", "variant"))
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


# ---------------------------------------------------------------------------- reports
def _thumbnail(source: str | None, dst_dir: Path, key: str) -> str | None:
    """A 128 px JPEG thumbnail of an image (``source`` absolute or relative to the bundled images)."""
    source = _media_source(source, "images")
    if source is None:
        return None
    try:
        from PIL import Image

        dst_dir.mkdir(parents=True, exist_ok=True)
        name = key.replace("/", "__") + ".jpg"
        with Image.open(source) as im:
            im = im.convert("RGB")
            im.thumbnail((128, 128))
            im.save(dst_dir / name, quality=85)
        return f"{dst_dir.name}/{name}"
    except OSError:
        return None


def _columns(rows: list[dict[str, Any]], columns: list[str] | None) -> list[str]:
    if columns is None:
        return [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
    return [c for c in columns if c in rows[0]]


def _md_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(DISPLAY_NAMES.get(c, c) for c in cols) + " |",
             "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _media_source(source: str | None, folder: str) -> Path | None:
    """A row's media file: ``source`` as is, or relative to the bundled ``folder`` (``images``/``audio``)."""
    if not source:
        return None
    for p in (Path(source), SAMPLE_DATA / folder / source):
        if p.is_file():
            return p
    return None


def _copy_audio(source: str | None, dst_dir: Path, key: str) -> str | None:
    """Copy an audio clip next to the report (players need a file); returns its relative path."""
    src = _media_source(source, "audio")
    if src is None:
        return None
    name = key.replace("/", "__") + src.suffix
    shutil.copyfile(src, dst_dir / name)
    return f"{dst_dir.name}/{name}"


def _report_search(s: dict[str, Any], files: Path) -> dict[str, Any]:
    """One example search made ready for the templates: the query (player / caption) and hits with
    thumbnails or players, marked same-label or not."""
    gallery = "image" if s["kind"].endswith("image") else "audio"
    query_label = s.get("query_label")
    hits = []
    for h in s["hits"]:
        hit = dict(h)
        hit["thumbnail"] = _thumbnail(h.get("source"), files, h["key"]) if gallery == "image" else None
        hit["audio"] = _copy_audio(h.get("source"), files, h["key"]) if gallery == "audio" else None
        hit["same_label"] = (h.get("label") == query_label) if query_label else None
        hits.append(hit)
    query_audio = (_copy_audio(s.get("query_source"), files, "query__" + str(s.get("query_key")))
                   if s["kind"].startswith("audio") else None)
    return {"title": s["query"], "kind": s["kind"], "gallery_modality": gallery, "hits": hits,
            "query_audio": query_audio, "query_text": s.get("query_text"), "query_label": query_label}


def _read_history(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _read_training(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()).get("training") or {})
    except (OSError, ValueError):
        return {}


def _loss_svg(history: list[dict[str, Any]], chance: float, width: int = 640, height: int = 300) -> str:
    """An SVG line chart of the per-epoch inter-MCR InfoNCE terms with the chance line ``chance`` (ln B)."""
    series = [(name, color, [r.get(name) for r in history]) for name, color in
              (("inter_shared", "#2f5bd3"), ("inter_pseudo", "#c2572b")) if any(r.get(name) for r in history)]
    left, right, top, bottom = 56, 150, 16, 40
    values = [v for _, _, vals in series for v in vals if v is not None] + [chance]
    lo, hi = 0.0, max(values) * 1.1
    n = max(1, len(history))

    def x(i: int) -> float:
        return left + (width - left - right) * (i / max(1, n - 1))

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - lo) / (hi - lo or 1))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12" role="img" aria-label="training loss per epoch">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>']
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:.1f}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(chance):.1f}" y2="{y(chance):.1f}" '
                 f'stroke="#777" stroke-dasharray="6 4"/><text x="{width - right + 6}" y="{y(chance) + 4:.1f}" '
                 f'fill="#555">chance ln B = {chance:.2f}</text>')
    for k, (name, color, vals) in enumerate(series):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals) if v is not None)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{width - right + 6}" y="{top + 14 + 16 * k}" fill="{color}">{name}</text>')
    for i in range(n):
        if n <= 10 or i % max(1, n // 10) == 0 or i == n - 1:
            parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle" fill="#555">'
                         f'{history[i].get("epoch", i + 1) if history else 1}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle" '
                 f'fill="#333">epoch</text><text x="14" y="{(top + height - bottom) / 2:.0f}" fill="#333" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})" text-anchor="middle">InfoNCE loss'
                 f'</text></svg>')
    return "".join(parts)


def write_reports(result: DemoResult, out: Path, serve: str = "") -> None:
    """Write ``report.md`` and ``report.html`` from the jinja2 templates in ``cmcr/web`` (the HTML shares the
    look of the ``cmcr serve`` page; thumbnails, audio clips and the loss curve go to ``report_files/``),
    then ``demo.json``.

    Args:
        result: what the demo measured.
        out: the demo folder (reads ``connector/metrics.jsonl`` and ``connector/connector.json``).
        serve: the ``cmcr serve`` command for this run (shown at the end).
    """
    import jinja2
    from markupsafe import Markup

    from cmcr import __version__

    files = out / "report_files"
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    searches = [_report_search(s, files) for s in result.searches]
    history = _read_history(out / "connector" / "metrics.jsonl")
    training = _read_training(out / "connector" / "connector.json")
    last = history[-1] if history else {}
    batch = max(2, min(int(training.get("batch_size") or 2), int(last.get("train_pairs") or last.get("pairs") or 2)))
    chance_loss = math.log(batch)
    svg = _loss_svg(history, chance_loss)
    (files / "loss.svg").write_text(svg)
    n_val = int(last.get("val_pairs") or 0)
    held_out = (f"{last['val_shared_R@1']:.3f} over {n_val} held-out caption pairs (chance {1 / n_val:.3f})"
                if last.get("val_shared_R@1") is not None and n_val else "not measured (too few captions)")
    corpus_line = (f"Corpus: {result.counts.get('text', 0)} captions (shared modality), "
                   f"{result.counts.get('image', 0)} images (CLIP memory), {result.counts.get('audio', 0)} audio "
                   f"clips (CLAP memory). No audio–image pair is used for training; evaluation pairs audio and "
                   f"images by their shared label. The memories are the same images and clips that are evaluated "
                   f"(unpaired, but not held out: the bundled set is small); with your own data, use separate "
                   f"memory corpora.")

    def h_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> Markup:
        if not rows:
            return Markup("<p><em>none</em></p>")
        cols = _columns(rows, columns)
        head = "".join(f"<th title='{html.escape(c)}'>{html.escape(DISPLAY_NAMES.get(c, c))}</th>" for c in cols)

        def cell(v: Any) -> str:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return f"<td class='num'>{html.escape(_fmt(v))}</td>"
            return f"<td class='txt'>{html.escape(_fmt(v).replace('->', ' → '))}</td>"  # never split an arrow

        body = "".join("<tr>" + "".join(cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
        return Markup(f"<table><tr>{head}</tr>{body}</table>")

    context = {"r": result, "searches": searches, "per_class": result.per_class, "corpus_line": corpus_line,
               "retrieval_columns": RETRIEVAL_COLUMNS, "zeroshot_columns": ZEROSHOT_COLUMNS,
               "synthetic_columns": SYNTHETIC_COLUMNS, "per_class_columns": PER_CLASS_COLUMNS,
               "batch": batch, "chance_loss": chance_loss, "held_out": held_out, "loss_svg": svg,
               "serve": serve, "version": __version__,
               "subtitle": f"CLIP ↔ CLAP connected through {result.counts.get('text', 0)} captions"}
    web = Path(__file__).resolve().parent / "web"
    env_html = jinja2.Environment(loader=jinja2.FileSystemLoader(str(web)), autoescape=True)
    env_md = jinja2.Environment(loader=jinja2.FileSystemLoader(str(web)), autoescape=False,
                                keep_trailing_newline=True)
    (out / "report.md").write_text(env_md.get_template("report.md").render(**context, md_table=_md_table))
    (out / "report.html").write_text(env_html.get_template("report.html").render(**context, table=h_table))
    result.report_md = str(out / "report.md")
    result.report_html = str(out / "report.html")
    atomic_write_json(out / "demo.json", result.to_json())
