"""`cmcr demo --3d`: the paper's second system on the bundled data — CLIP and ULIP-2 connected through
**images** (C-MCR §3, the 3D-language setting), then 3D <-> image/text search and zero-shot 3D
classification, and the authors' released ``3D x Vision`` / ``3D x Text`` matrices.

Steps (all under ``<out>/3d``): shard the bundled images, point clouds / meshes (the Spot cow mesh and
the three C-MCR release clouds) and captions; encode images with CLIP **and** ULIP (the shared
modality, joined by key), captions with CLIP (CLIP's memory) and 3D with ULIP (ULIP's memory); train
the connector with the released 3D head (``--config 3d``); project; search 3D -> images and 3D ->
captions; zero-shot 3D classification over the bundled 3D labels with ULIP's 64 ModelNet40 prompt
templates averaged per class; then the release matrices through the imported ``ulip_clip.pt``.

Weights: ``--clip`` as in the main demo, ``--ulip`` (default ``ulip:PointBERT``: no hub serves ULIP-2,
so without ``@/path/pointbert_ULIP-2.pt`` it runs random-init and says so). ``--fast``: tiny models.
With 4 point clouds the figures are illustrations, not measurements; the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel

from cmcr.demo import (
    DEFAULT_CLIP,
    RANDOM_BANNER,
    SAMPLE_DATA,
    _first_line,
    load_or_random,
    prepare_corpus,
    serve_command,
)
from cmcr.stores.files import atomic_write_json, claim_output, locks_output

DEFAULT_ULIP = "ulip:PointBERT"
FAST_ULIP = "ulip:cmcr-tiny-ulip-512@random"  # 512-d: the released ulip_clip.pt heads take 512-d rows
FAST_CLIP_512 = "open_clip:cmcr-tiny-clip-512@random"
TEMPLATES = "modelnet40_64"


@dataclass
class Demo3DOptions:
    """Options of :func:`run_demo_3d` (``cmcr demo --3d``).

    Attributes:
        out: the demo folder (this demo writes ``<out>/3d``).
        fast: tiny random-init encoders and few epochs (seconds).
        clip, ulip: encoder specs (``None``: defaults, or the tiny ones with ``fast``).
        captions: bundled captions used as CLIP's text memory (default 500; 200 with ``fast``).
        epochs: connector epochs (default 20; 4 with ``fast``).
        device: torch device.
        num_workers: decode workers.
        ulip_clip: the released ``ulip_clip.pt`` (default: the copy in ``cmcr/data/release``).
        overwrite: start ``<out>/3d`` over, whatever its settings (a rerun with the same settings resumes
            without it; one with other settings is refused).
    """

    out: Path = Path("demo-out")
    fast: bool = False
    clip: str | None = None
    ulip: str | None = None
    captions: int | None = None
    epochs: int | None = None
    device: str = "auto"
    num_workers: int = 2
    ulip_clip: Path | None = None
    seed: int = 0
    overwrite: bool = False


#: The settings record of ``<out>/3d`` (compared by the output claim on a rerun).
DEMO3D_MARKER = "demo3d-settings.json"


@locks_output("opts", folder=lambda o: Path(o.out) / "3d")
def run_demo_3d(opts: Demo3DOptions, console: Console | None = None) -> dict[str, Any]:
    """Run the CLIP + ULIP-2 demo end to end; writes ``<out>/3d/demo3d.json`` and returns its content.

    Returns:
        ``{"random_weights", "notes", "encoders", "counts", "zeroshot", "searches", "release_matrices",
        "seconds"}``.

    Raises:
        CmcrError: a stage failed in a way the demo cannot recover from (the message names it).
    """
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.shards import write_shards
    from cmcr.trainer.config import load_config
    from cmcr.trainer.connector import Connector
    from cmcr.trainer.evaluate import (
        average_prompt_embeddings,
        evaluate_zeroshot,
        load_templates,
        project_store,
        random_weight_identities,
    )
    from cmcr.trainer.loop import train_connector

    console = console or Console(width=None if Console().is_terminal else 130)
    out = Path(opts.out) / "3d"
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    notes: list[str] = []
    console.rule("[bold]CLIP + ULIP-2 through images (cmcr demo --3d)")
    t = time.perf_counter()
    clip_spec = opts.clip or (FAST_CLIP_512 if opts.fast else DEFAULT_CLIP)
    ulip_spec = opts.ulip or (FAST_ULIP if opts.fast else DEFAULT_ULIP)
    clip = load_or_random("CLIP", clip_spec, notes, device=opts.device)
    ulip = load_or_random("ULIP", ulip_spec, notes, device=opts.device, no_hub_fallback=True)
    random_ids = random_weight_identities(clip.identity(), ulip.identity())
    if random_ids:
        console.print(Panel.fit(
            "[bold]No pretrained weights in use[/] for at least one encoder: every number below is [bold red]"
            + RANDOM_BANNER + "[/].\nReal numbers: --clip open_clip:ViT-B-32 (downloaded where the hub is "
            "reachable) --ulip ulip:PointBERT@/path/pointbert_ULIP-2.pt\n" + "\n".join(f"• {n}" for n in notes),
            title="[bold red]RANDOM WEIGHTS", border_style="red"))
    seconds["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    n_captions = opts.captions or (200 if opts.fast else 500)
    from cmcr.errors import ConfigError

    settings = {"encoders": {"clip": clip.identity(), "ulip": ulip.identity()}, "captions": n_captions,
                "fast": opts.fast, "seed": opts.seed}
    with claim_output(out, kind="3D demo run", provenance=settings, overwrite=opts.overwrite, record=DEMO3D_MARKER,
                      error=ConfigError) as claim:
        claim.publish()
    corpus = prepare_corpus(out, n_captions)
    shards = out / "shards"
    rep_img = write_shards([corpus["images"]], shards / "images", samples_per_shard=64, modality="image")
    rep_3d = write_shards([SAMPLE_DATA / "3d"], shards / "3d", samples_per_shard=64, modality="3d")
    rep_txt = write_shards([corpus["captions"]], shards / "captions", samples_per_shard=1000, modality="text")
    counts = {"image": rep_img.counts["image"], "3d": rep_3d.counts["3d"], "text": rep_txt.counts["text"]}
    console.print(f"shards: {counts['image']} images (shared), {counts['3d']} point clouds/meshes (ULIP memory), "
                  f"{counts['text']} captions (CLIP memory)")
    seconds["shard"] = time.perf_counter() - t

    t = time.perf_counter()
    stores = out / "stores"
    plan = [("clip_image", clip, "image", rep_img.shards["image"]), ("ulip_image", ulip, "image",
                                                                       rep_img.shards["image"]),
            ("clip_text", clip, "text", rep_txt.shards["text"]), ("ulip_3d", ulip, "3d", rep_3d.shards["3d"])]
    for name, enc, modality, paths in plan:
        rep = encode_shards(paths, enc, modality, stores / name, batch_size=16, num_workers=opts.num_workers,
                            progress=True, command="cmcr demo --3d")
        console.print(f"{name}: {rep.rows} rows, {rep.failures} failures, {rep.samples_per_s:.1f} samples/s")
    seconds["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = load_config("3d", epochs=opts.epochs or (4 if opts.fast else 20), batch_size=16, device=opts.device,
                      seed=opts.seed, name_a="clip", name_b="ulip")
    train_connector(stores / "clip_image", stores / "ulip_image", stores / "clip_text", stores / "ulip_3d",
                    out / "connector", cfg, overwrite=True, progress=True)
    conn = Connector.load(out / "connector")
    seconds["connect"] = time.perf_counter() - t

    t = time.perf_counter()
    proj = out / "projected"
    z3d = project_store(conn, stores / "ulip_3d", proj / "ulip_3d", overwrite=True)
    zimg = project_store(conn, stores / "clip_image", proj / "clip_image", overwrite=True)
    ztxt = project_store(conn, stores / "clip_text", proj / "clip_text", overwrite=True)
    labels = sorted({lab for lab in z3d.metadata(["label"]).column("label").to_pylist() if lab})
    templates = load_templates(TEMPLATES)
    raw = clip.encode("text", [tp.format(c.replace("_", " ")) for c in labels for tp in templates])
    z_cls = average_prompt_embeddings(conn.project(conn.side_for(clip.identity(), "text"), raw,
                                                   identity=clip.identity(), modality="text"), len(labels))
    zs = evaluate_zeroshot(z3d, z_cls, labels)
    zeroshot = {"classes": labels, "items": zs.get("items"), "top1": zs.get("top1"),
                "chance_top1": (zs.get("chance") or {}).get("top1"), "templates": f"{TEMPLATES} ({len(templates)})"}
    console.print(f"zero-shot 3D classification over {len(labels)} classes ({', '.join(labels)}), CLIP-text prompts "
                  f"({zeroshot['templates']} averaged): top-1 {zeroshot['top1']:.3f} (chance "
                  f"{zeroshot['chance_top1']:.3f})" + (f"  [red]({RANDOM_BANNER})[/]" if random_ids else ""))
    searches = []
    from cmcr.service import open_gallery

    emb3d = z3d.embeddings(np.float32)
    keys3d = z3d.keys()
    meta3d = z3d.metadata(["label"]).column("label").to_pylist()
    query_row = next((i for i, lab in enumerate(meta3d) if lab == "cow"), 0)
    for gallery, what in ((zimg, "images"), (ztxt, "captions")):
        hits = open_gallery(gallery).search(emb3d[query_row], 5)
        searches.append({"query": f"3D {keys3d[query_row]} (label {meta3d[query_row]}) → {what}",
                         "hits": [{"key": h["key"], "score": h["score"], "label": h["metadata"].get("label"),
                                   "text": h["metadata"].get("text")} for h in hits]})
    for s in searches:
        console.print(f"[bold]{s['query']}[/] → " + ", ".join(
            f"{h['key']} ({(h['text'] or h['label'] or '')[:40]}, {h['score']:.3f})" for h in s["hits"]),
            highlight=False, soft_wrap=True)
    seconds["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    release = _release_matrices(opts, clip, ulip, out, notes, console)
    seconds["release"] = time.perf_counter() - t

    result = {"random_weights": bool(random_ids), "notes": notes,
              "encoders": {"clip": clip.identity(), "ulip": ulip.identity()}, "counts": counts,
              "zeroshot": zeroshot, "searches": searches, "release_matrices": release,
              "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    atomic_write_json(out / "demo3d.json", result)
    serve = serve_command(out / "connector", [proj / "clip_image", proj / "clip_text", proj / "ulip_3d"],
                          [(clip, clip_spec), (ulip, ulip_spec)])
    console.print(f"\nwritten: {out / 'demo3d.json'}; browse it: {serve}", highlight=False, soft_wrap=True)
    if random_ids:
        console.print(f"[bold red]{RANDOM_BANNER.upper()}[/]: the encoders were random-init; see the notes above.")
    return result


def _release_matrices(opts: Demo3DOptions, clip: Any, ulip: Any, out: Path, notes: list[str],
                      console: Console) -> list[dict[str, Any]]:
    """The authors' ``3D x Vision`` and ``3D x Text`` matrices through the imported ``ulip_clip.pt``, with
    their numbers (:mod:`cmcr.release_demo`)."""
    from cmcr.errors import CmcrError
    from cmcr.release_demo import (
        AUTHORS,
        ReleaseDemoOptions,
        _print_matrices,
        import_release_connectors,
        matrix_title,
        release_matrix,
    )

    encoders = {"clip": clip, "ulip": ulip}
    ropts = ReleaseDemoOptions(out=out, fast=opts.fast, ulip_clip=opts.ulip_clip, device=opts.device)
    try:
        connectors, _ = import_release_connectors(ropts, encoders, out / "release_connectors", [])
    except CmcrError as e:
        notes.append(f"release matrices: {_first_line(e)}")
        return []
    conn = connectors.get("ULIP_CLIP")
    results = []
    for rows, cols in ((("ulip", "3d"), ("clip", "image")), (("ulip", "3d"), ("clip", "text"))):
        title = matrix_title(rows, cols)
        entry = {"connector": "ULIP_CLIP", "title": title, "authors": AUTHORS[("ULIP_CLIP", title)], "cmcr": None,
                 "available": False, "reason": None,
                 "random": bool(any(str(e.identity().get("weights", "")).startswith("random")
                                    for e in encoders.values()))}
        if conn is None:
            entry["reason"] = "ulip_clip.pt could not be imported (see the notes)"
        else:
            try:
                m = release_matrix(conn, encoders, rows, cols)
                entry.update(cmcr=np.round(m, 6).tolist(), available=True)
            except CmcrError as e:
                entry["reason"] = _first_line(e)
        results.append(entry)
    console.print("the authors' released ULIP-CLIP connector on their demo items "
                  "(softmax(10·cos), toilet, BBQ, train):")
    _print_matrices(console, results)
    return results
