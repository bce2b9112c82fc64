"""`cmcr connect`, `project`, `search`, `eval retrieval`, `eval zeroshot`, `bench synthetic`.

Thin: parse, call :mod:`cmcr.trainer` / :mod:`cmcr.stores`, report with rich. Only ``search``
(media or text query) and ``eval zeroshot`` load an encoder (:mod:`cmcr.pipeline.encoders`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from cmcr.console import err_console, out_console
from cmcr.errors import ConnectorError, InputDataError

console = out_console()

eval_app = typer.Typer(help="Evaluate connected spaces: retrieval and zero-shot classification.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks and controlled checks.", no_args_is_help=True)


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _random_note(sources: list) -> list[dict]:  # noqa: ANN001
    """Print the random-weights note when an encoder behind ``sources`` has random-init weights;
    returns those identities (``[]``: none, nothing printed)."""
    from cmcr.trainer.evaluate import RANDOM_WEIGHTS_NOTE, describe_identity, random_weight_identities

    found = random_weight_identities(*sources)
    if found:
        console.print(f"[bold red]note: {RANDOM_WEIGHTS_NOTE}[/] (random-init encoder weights: "
                      f"{', '.join(describe_identity(i) for i in found)})", highlight=False)
    return found


def connect(
    shared_a: Path = typer.Option(..., "--shared-a", help="Shared-modality store of MCR A (e.g. CLIP text)."),
    shared_b: Path = typer.Option(..., "--shared-b", help="Shared store of MCR B (e.g. CLAP text), same keys."),
    memory_a: Path = typer.Option(..., "--memory-a", help="Memory store of MCR A (e.g. CLIP images)."),
    memory_b: Path = typer.Option(..., "--memory-b", help="Memory store of MCR B (e.g. CLAP audio)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (connector, checkpoints, metrics)."),
    config: Path | None = typer.Option(None, "--config", help="TOML config file or preset name (3d = released "
                                       "CLIP-ULIP 3D head; defaults: trainer/configs/default.toml)."),
    name_a: str | None = typer.Option(None, help="Name of MCR A in the connector (e.g. clip)."),
    name_b: str | None = typer.Option(None, help="Name of MCR B in the connector (e.g. clap)."),
    epochs: int | None = typer.Option(None, help="Training epochs."),
    batch_size: int | None = typer.Option(None, help="Pairs per batch."),
    lr: float | None = typer.Option(None, help="AdamW learning rate."),
    noise_std: float | None = typer.Option(None, help="Gaussian noise sigma (0 disables)."),
    intra_weight: float | None = typer.Option(None, help="Weight lambda of the intra-MCR term (0 disables)."),
    temperature: float | None = typer.Option(None, help="InfoNCE temperature tau_c."),
    memory_temperature: float | None = typer.Option(None, help="Completion temperature tau_m."),
    completion: str | None = typer.Option(None, help="exact | topk | queue."),
    no_completion: bool = typer.Option(False, "--no-completion", help="Ablation: train on shared pairs only."),
    centric: str | None = typer.Option(
        None, "--centric", help="Sources of training pairs, comma-separated modality names: the shared one (text: "
                                "C-MCR's caption-centric pairs, the default) and/or a memory's (audio, image; 3D: "
                                "text, 3d) for memory-centric pairs. Weights: centric_weights in --config."),
    seed: int | None = typer.Option(None, help="Random seed (recorded)."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: discard the earlier run in --out (checkpoints, completions, "
                                        "connector), whatever its settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a C-MCR connector from four stores (no encoder is loaded).

    Example: cmcr connect --shared-a st/clip_text --shared-b st/clap_text --memory-a st/clip_image
    --memory-b st/clap_audio --out runs/clip-clap --name-a clip --name-b clap --epochs 20
    """
    from cmcr.trainer.config import load_config
    from cmcr.trainer.loop import train_connector

    cfg = load_config(config, name_a=name_a, name_b=name_b, epochs=epochs, batch_size=batch_size, lr=lr,
                      noise_std=noise_std, intra_weight=intra_weight, temperature=temperature,
                      memory_temperature=memory_temperature, completion=completion, seed=seed, device=device,
                      use_completion=False if no_completion else None, centric=centric)
    result = train_connector(shared_a, shared_b, memory_a, memory_b, out, cfg, resume=resume, overwrite=overwrite,
                             progress=not as_json)
    if as_json:
        _print_json({k: result[k] for k in ("connector", "fingerprint", "metrics", "data", "device", "warnings")})
        return
    d = result["data"]
    console.print(f"pairs: {d['pairs']} (keys only in A: {d['only_a']}, only in B: {d['only_b']})")
    m = result["metrics"]
    chance = f" (chance 1/{m['val_pairs']} = {1 / m['val_pairs']:.4f})" if m.get("val_pairs") else ""
    console.print(f"connector {result['fingerprint']} written to {result['connector']} — last epoch mean loss "
                  f"{m.get('loss', float('nan')):.4f}" + (f", held-out shared R@1 {m['val_shared_R@1']:.3f}{chance}"
                                                         if "val_shared_R@1" in m else ""), markup=False)
    # result["warnings"] (e.g. too few steps per epoch) were logged to stderr as they arose
    console.print(f"metrics: {Path(out) / 'metrics.jsonl'}, loss curve: {Path(out) / 'loss_curve.png'}", markup=False)


def project(
    connector: Path = typer.Argument(..., help="Connector folder (from `cmcr connect`)."),
    store: Path = typer.Argument(..., help="Store to project (its encoder picks the side)."),
    out: Path = typer.Argument(..., help="Output store folder."),
    no_index: bool = typer.Option(False, "--no-index", help="Do not build the FAISS index."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: discard the output store, whatever it holds "
                                   "(without it the same projection resumes; another is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Project a store into the connected space (new store + FAISS index).

    Example: cmcr project runs/clip-clap st/esc50_audio st/esc50_audio.cmcr
    """
    from cmcr.trainer.evaluate import project_store

    s = project_store(connector, store, out, index=not no_index, overwrite=overwrite)
    if as_json:
        _print_json({"store": str(s.path), "rows": s.num_rows, "source_store": str(store), "side": s.encoder["side"],
                     "mcr": s.encoder["mcr"], "dim": s.dim, "fingerprint": s.fingerprint(),
                     "index": (s.path / "index" / "index.json").is_file()})
        return
    console.print(f"{s.num_rows} rows of {store} projected by side {s.encoder['side']} ({s.encoder['mcr']}) "
                  f"into {out}")


def search(
    connector: Path | None = typer.Option(None, "--connector", "-c", help="Connector folder (not with --server)."),
    gallery: Path = typer.Option(..., "--gallery", "-g",
                                 help="Projected store to search (`cmcr project`); with --server, a gallery name."),
    media: Path | None = typer.Option(None, "--media", help="Query file (image, audio or 3d) to encode."),
    text: str | None = typer.Option(None, "--text", help="Query text to encode."),
    key: str | None = typer.Option(None, "--key", help="Query by the key of a row of --store."),
    store: Path | None = typer.Option(None, "--store", help="Store holding --key (raw or projected)."),
    encoder: str | None = typer.Option(None, "--encoder", help="Encoder spec for --media/--text (see `cmcr encode`)."),
    modality: str | None = typer.Option(None, "--modality",
                                        help="Modality of --media (image/audio/3d); guessed from its extension."),
    k: int = typer.Option(10, "-k", min=1, help="Number of results."),
    clap_tokenizer: Path | None = typer.Option(
        None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
        help="Folder with RoBERTa vocab.json + merges.txt for a CLAP text encoder (env CMCR_CLAP_TOKENIZER; "
             "default: the Hugging Face cache, else downloaded once)."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    server: str | None = typer.Option(None, "--server",
                                      help="URL of a running `cmcr serve` to ask instead of loading models here."),
) -> None:
    """Search a projected store with a media file, a text or a key of a store.

    Example: cmcr search -c runs/clip-clap -g st/vggss_image.cmcr --media dog.wav
    --encoder clap:HTSAT-tiny@/path/630k-audioset-best.pt

    Example: cmcr search --server http://127.0.0.1:8000 -g clip_image --media dog.wav
    """
    from cmcr.stores.store import Store
    from cmcr.trainer.connector import Connector, is_projected
    from cmcr.trainer.evaluate import check_same_space

    given = sum(x is not None for x in (media, text, key))
    if given != 1:
        raise InputDataError("give exactly one query: --media FILE, --text TEXT or --key KEY (with --store)")
    if media is not None:
        _check_readable_file(media, "--media")
    if server is not None:
        _search_server(server, str(gallery), media=media, text=text, key=key, store=store, k=k, as_json=as_json)
        return
    if connector is None:
        raise InputDataError("give --connector (the connector folder), or --server URL of a running `cmcr serve`")
    conn = Connector.load(connector)
    g = Store.open(gallery)
    if not (is_projected(g.encoder) and g.encoder.get("connector") == conn.fingerprint):
        raise ConnectorError(f"{gallery} was not projected by connector {connector} ({conn.fingerprint}); run "
                             f"`cmcr project {connector} <store> {gallery}` first")
    if key is not None:
        if store is None:
            raise InputDataError("--key needs --store (the store holding that key)")
        s = Store.open(store)
        row = s.rows_of([key])
        emb = s.embeddings_of(row, np.float32)
        if is_projected(s.encoder):
            check_same_space(s, g)
            q = emb
        else:
            side = conn.side_for(s.encoder, s.modality)
            q = conn.project(side, emb, identity=s.encoder, modality=s.modality)
        query = {"key": key, "store": str(store)}
        title = f"key {key} of {store}"
        sources = [conn, g, s]
    else:
        if encoder is None:
            raise InputDataError("--media/--text need --encoder (the encoder spec of one connector side)")
        from cmcr.pipeline.encoders import load_encoder

        mod = "text" if text is not None else (modality or _guess_modality(media))
        enc = load_encoder(encoder, clap_tokenizer=str(clap_tokenizer) if clap_tokenizer else None)
        raw = enc.encode(mod, [text if text is not None else str(media)])
        side = conn.side_for(enc.identity(), mod)
        q = conn.project(side, raw, identity=enc.identity(), modality=mod)
        query = {"text": text} if text is not None else {"media": str(media), "modality": mod}
        title = f"text {text!r}" if text is not None else f"{mod} file {media}"
        sources = [conn, g, enc.identity()]
    hits = _search(g, q, k)
    if as_json:
        from cmcr.trainer.evaluate import random_weight_identities

        _print_json({"query": query, "gallery": str(gallery), "hits": hits,
                     "random_weights": bool(random_weight_identities(*sources))})
        return
    _random_note(sources)
    _print_hits(hits, f"top {k} in {gallery} for {title}")


def _search_server(url: str, gallery: str, *, media: Path | None, text: str | None, key: str | None,
                   store: Path | None, k: int, as_json: bool) -> None:
    """``cmcr search --server``: ask a running ``cmcr serve`` (:mod:`cmcr.client`) and print its hits."""
    from cmcr.client import CmcrClient

    with CmcrClient(url) as client:
        if text is not None:
            res = client.search_text(text, gallery=gallery, k=k)
            title = f"text {text!r}"
        elif media is not None:
            res = client.search_file(media, gallery=gallery, k=k)
            title = f"{res['query'].get('modality')} file {media}"
        else:
            res = client.search_key(key, gallery=gallery, key_gallery=str(store) if store else None, k=k)
            title = f"key {key}"
    if as_json:
        _print_json(res)
        return
    if res.get("random_weights"):
        from cmcr.trainer.evaluate import RANDOM_WEIGHTS_NOTE

        console.print(f"[bold red]note: {RANDOM_WEIGHTS_NOTE}[/] (the server runs random-init encoder weights)",
                      highlight=False)
    _print_hits(res["hits"], f"top {k} in {gallery} at {url} for {title}")


def _print_hits(hits: list[dict], title: str) -> None:
    """The hits table (rank, key, score, label/source when present)."""
    console.print(title, highlight=False, soft_wrap=True)
    shown = [c for c in ("label", "source") if any((h["metadata"] or {}).get(c) is not None for h in hits)]
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("key", overflow="fold")
    table.add_column("score", justify="right")
    for c in shown:
        table.add_column(c, overflow="fold")
    for i, h in enumerate(hits, 1):
        meta = h["metadata"] or {}
        table.add_row(str(i), str(h["key"]), f"{h['score']:.4f}", *[_cell(meta.get(c)) for c in shown])
    console.print(table)
    if any(set(h["metadata"] or {}) - set(shown) for h in hits):
        console.print("other metadata columns: see --json", style="dim")


def _cell(value: object) -> str:
    """A table cell: the full value (rich folds long ones), ``-`` when absent."""
    return "-" if value is None else str(value)


def _check_readable_file(path: Path, flag: str) -> None:
    """Raise :class:`InputDataError` (one line naming ``flag`` and ``path``) unless ``path`` is a readable file."""
    if not path.exists():
        raise InputDataError(f"{flag} {path}: file not found")
    if path.is_dir():
        raise InputDataError(f"{flag} {path}: is a folder; give one image, audio or 3d file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputDataError(f"{flag} {path}: cannot be read ({e.strerror or e})") from e


def _guess_modality(path: Path | None) -> str:
    """The modality of a --media file from its extension (:func:`cmcr.service.modality_of_filename`)."""
    from cmcr.service import modality_of_filename

    return modality_of_filename(str(path), hint="Pass --modality, or --text for a caption")


def _search(gallery, q: np.ndarray, k: int) -> list[dict]:  # noqa: ANN001
    """Top-k hits through the store's FAISS index, or exactly when it has none (:mod:`cmcr.service`)."""
    from cmcr.service import open_gallery

    return open_gallery(gallery).search(np.atleast_2d(q)[0], k)


@eval_app.command("retrieval")
def eval_retrieval(
    query: Path = typer.Argument(..., help="Query store (projected, e.g. audio)."),
    gallery: Path = typer.Argument(..., help="Gallery store in the same space (e.g. projected images)."),
    by: str = typer.Option("key", "--by", help="Positives by shared 'key' or by shared 'label'."),
    label_column: str = typer.Option("label", help="Metadata column holding labels (with --by label)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Retrieval from a query store into a gallery store: R@1/5/10, mAP, pool size, chance level.

    Example: cmcr eval retrieval st/vggss_audio.cmcr st/vggss_image.cmcr --by key --json
    """
    from cmcr.trainer.evaluate import evaluate_retrieval

    r = evaluate_retrieval(query, gallery, by=by, label_column=label_column)
    if as_json:
        _print_json(r)
        return
    if r["random_weights"]:
        from cmcr.stores.store import Store

        _random_note([Store.open(query), Store.open(gallery)])
    dropped = r["queries_without_positive"]
    total = r["queries"] + dropped
    counted = (f"{total} queries ({r['queries']} scored; {dropped} without a positive in the gallery, not scored)"
               if dropped else f"{total} queries")
    same = "key" if by == "key" else f"`{label_column}`"
    console.print(f"{r['direction']} retrieval, positives: same {same}, pool {r['pool']}, {counted}",
                  highlight=False, soft_wrap=True)
    table = Table()
    for col in ("metric", "value", "chance"):
        table.add_column(col)
    for name in ("R@1", "R@5", "R@10", "mAP"):
        table.add_row(name, f"{r[name]:.4f}", f"{r['chance'][name]:.4f}")
    console.print(table)


@eval_app.command("zeroshot")
def eval_zeroshot(
    connector: Path = typer.Option(..., "--connector", "-c", help="Connector folder."),
    store: Path = typer.Option(..., "--store", "-s", help="Projected store with a label column."),
    classes: str = typer.Option(..., "--classes", help="Comma-separated class names, a file with one per line, or a "
                                                       "bundled list (modelnet40)."),
    encoder: str = typer.Option(..., "--encoder", help="Text encoder spec of one connector side."),
    prompt: str | None = typer.Option(None, "--prompt",
                                      help="Prompt template ({} = class name); default 'a sound of a {}.'."),
    templates: str | None = typer.Option(
        None, "--templates", help="Prompt templates averaged per class instead of --prompt: a bundled set "
                                  "(modelnet40_64 = ULIP's 64 ModelNet40 prompts) or a file (JSON list / one per "
                                  "line)."),
    label_column: str = typer.Option("label", help="Metadata column with the true class."),
    clap_tokenizer: Path | None = typer.Option(
        None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
        help="Folder with RoBERTa vocab.json + merges.txt for a CLAP text encoder (env CMCR_CLAP_TOKENIZER; "
             "default: the Hugging Face cache, else downloaded once)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Zero-shot classification: class prompts -> text encoder -> connector side -> nearest class.

    With --templates, every class gets one prompt per template; the projected prompts of a class are
    averaged (unit rows, mean, renormalised), as ULIP does for 3D zero-shot. --classes modelnet40 names
    the bundled ModelNet40 class list.

    Example: cmcr eval zeroshot -c runs/clip-clap -s st/esc50_audio.cmcr --classes classes.txt
    --encoder open_clip:ViT-B-32 --prompt "the sound of a {}."
    """
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.trainer.connector import Connector
    from cmcr.trainer.evaluate import average_prompt_embeddings, evaluate_zeroshot, load_templates

    if templates is not None and prompt is not None:
        raise InputDataError("give --prompt or --templates, not both")
    names = _class_names(classes)
    tmpl = load_templates(templates) if templates is not None else [prompt or "a sound of a {}."]
    conn = Connector.load(connector)
    enc = load_encoder(encoder, clap_tokenizer=str(clap_tokenizer) if clap_tokenizer else None)
    raw = enc.encode("text", [t.format(n) for n in names for t in tmpl])
    side = conn.side_for(enc.identity(), "text")
    zc = conn.project(side, raw, identity=enc.identity(), modality="text")
    if len(tmpl) > 1:
        zc = average_prompt_embeddings(zc, len(names))
    prompt = tmpl[0] if templates is None else f"{templates} ({len(tmpl)} templates, averaged per class)"
    r = evaluate_zeroshot(store, zc, names, label_column=label_column)
    from cmcr.stores.store import Store
    from cmcr.trainer.evaluate import random_weight_identities

    sources = [conn, Store.open(store), enc.identity()]
    r.update({"prompt": prompt, "side": side, "random_weights": bool(random_weight_identities(*sources))})
    if as_json:
        _print_json(r)
        return
    _random_note(sources)
    console.print(f"zero-shot on {store} ({r['items']} items, {r['classes']} classes, prompt {prompt!r}, text side "
                  f"{side}): top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} (chance {r['chance']['top1']:.4f} / "
                  f"{r['chance']['top5']:.4f})", markup=False, highlight=False)
    skipped = r.get("items_without_class", 0)
    if skipped:
        err_console().print(f"warning: {skipped} item(s) of {store} were skipped: their `{label_column}` is not one "
                            f"of the {r['classes']} classes (add those classes to --classes, or check the label "
                            f"column)", markup=False, highlight=False)


@eval_app.command("counterfactual")
def eval_counterfactual(
    audio: Path = typer.Argument(..., help="Audio store (projected by `cmcr project`, or raw with --connector)."),
    image: Path = typer.Argument(..., help="Image store (projected, or raw with --connector)."),
    connector: Path | None = typer.Option(None, "--connector", "-c", help="Connector folder (projects raw stores)."),
    pairs: Path | None = typer.Option(None, "--pairs", help="CSV/JSONL of labelled pairs: audio,image,label[,class] "
                                                            "(label 1 = matched, 0 = mismatched)."),
    protocol: str | None = typer.Option(None, "--protocol",
                                        help="pairs (with --pairs), shuffled (shared keys = matched, seeded "
                                             "derangements = mismatched; the default) or label (every audio x image "
                                             "combination, matched = same label)."),
    negatives: int = typer.Option(1, "--negatives", min=1, help="shuffled: mismatched pairs per matched pair."),
    different_class: bool = typer.Option(False, "--different-class",
                                         help="shuffled: mismatched pairs only between different labels."),
    seed: int = typer.Option(0, "--seed", help="shuffled: derangement seed (recorded)."),
    label_column: str = typer.Option("label", "--label-column", help="Metadata column with class labels."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Counterfactual audio-image recognition: does a sound belong to an image? AP and max-F1 with chance.

    Each (audio, image) pair is scored by its cosine in the connected space; the report gives average
    precision and the best F1 over the decision threshold, their chance levels (positive rate), and
    per-class numbers when the pairs have classes (docs/tasks.md).

    Example: cmcr eval counterfactual st/vggss_audio.cmcr st/vggss_image.cmcr --protocol shuffled --negatives 3
    --different-class --json
    """
    from cmcr.trainer.counterfactual import evaluate_counterfactual

    proto = protocol or ("pairs" if pairs is not None else "shuffled")
    r = evaluate_counterfactual(audio, image, connector=connector, protocol=proto, pairs_file=pairs,
                                negatives=negatives, different_class=different_class, seed=seed,
                                label_column=label_column)
    if as_json:
        _print_json(r)
        return
    if r["random_weights"]:
        from cmcr.trainer.evaluate import RANDOM_WEIGHTS_NOTE

        console.print(f"[bold red]note: {RANDOM_WEIGHTS_NOTE}[/] (an encoder behind these stores has random-init "
                      f"weights)", highlight=False)
    p = r["protocol"]
    how = {"pairs": f"pairs from {p.get('pairs_file')}",
           "shuffled": f"shuffled pairs (seed {p.get('seed')}, {p.get('negatives_per_positive')} negative(s) per "
                       f"pair, negatives of {p.get('negatives_of')})",
           "label": f"every audio x image combination, matched = same `{p.get('label_column')}`"}[p["protocol"]]
    console.print(f"counterfactual {r['audio_store']} x {r['image_store']}: {how}; {r['pairs']} pairs "
                  f"({r['matched']} matched, {r['mismatched']} mismatched)", markup=False, highlight=False,
                  soft_wrap=True)
    if r["skipped"]:
        err_console().print(f"warning: {r['skipped']['pairs_with_missing_key']} pair(s) of {pairs} skipped: a key is "
                            f"not in its store (e.g. {r['skipped']['examples']})", markup=False, highlight=False)
    table = Table()
    for col in ("metric", "value", "chance"):
        table.add_column(col)
    table.add_row("AP", f"{r['AP']:.4f}", f"{r['chance']['AP']:.4f}")
    table.add_row("max-F1", f"{r['max_F1']:.4f} (cos >= {r['threshold']:.4f})", f"{r['chance']['max_F1']:.4f}")
    table.add_row("mean cos matched / mismatched", f"{r['mean_score']['matched']:.4f} / "
                  f"{r['mean_score']['mismatched']:.4f}", "")
    console.print(table)
    per_class = r.get("per_class") or {}
    if per_class:
        shown = sorted(per_class.items())[:40]
        t = Table(title=f"per class ({r['classes_scored']} of {len(per_class)} with both kinds of pair)")
        for col in ("class", "pairs", "matched", "AP", "chance AP", "max-F1", "chance F1"):
            t.add_column(col)
        for name, c in shown:
            def fmt(x: object) -> str:
                return "-" if x is None else f"{x:.4f}"
            t.add_row(name, str(c["pairs"]), str(c["matched"]), fmt(c["AP"]), fmt(c["chance"]["AP"]),
                      fmt(c["max_F1"]), fmt(c["chance"]["max_F1"]))
        console.print(t)
        if len(per_class) > len(shown):
            console.print(f"{len(per_class) - len(shown)} more classes: see --json", style="dim")


def _class_names(classes: str) -> list[str]:
    p = Path(classes)
    from cmcr.trainer.evaluate import bundled_class_lists

    bundled = bundled_class_lists()
    if classes in bundled and not p.exists():
        return list(bundled[classes])
    if p.is_dir():
        raise InputDataError(f"--classes {classes}: is a folder; give a file with one class name per line, or "
                             f"comma-separated names")
    if p.exists():
        try:
            names = [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputDataError(f"--classes {classes}: cannot be read as UTF-8 text ({e})") from e
    elif "," not in classes and ("/" in classes or p.suffix.lower() in (".txt", ".csv", ".lst", ".tsv")):
        raise InputDataError(f"--classes {classes}: file not found (give a file with one class name per line, "
                             f"or comma-separated names)")
    else:
        names = [x.strip() for x in classes.split(",") if x.strip()]
    if not names:
        raise InputDataError(f"no class names in {classes!r}")
    return names


@bench_app.command("synthetic")
def bench_synthetic(
    out: Path = typer.Option(Path("cmcr-synthetic"), "--out", "-o", help="Work folder (stores, connectors)."),
    seed: int = typer.Option(0, help="Generator and training seed."),
    dim: int = typer.Option(128, min=2, help="Embedding width of both synthetic MCRs (512 = the reference setup)."),
    n_shared: int = typer.Option(3000, min=2, help="Shared corpus size (captions encoded by both MCRs)."),
    n_memory: int = typer.Option(3000, min=1, help="Memory size of each MCR."),
    n_eval: int = typer.Option(500, min=2, help="Held-out true (audio, image) pairs (the retrieval pool)."),
    epochs: int = typer.Option(10, min=1, help="Training epochs per variant."),
    variants: str = typer.Option("full,no_completion,no_noise,no_intra,plus_audio,plus_image,all_centric",
                                 help="Comma-separated variants (full = text-centric C-MCR, no_completion, no_noise, "
                                      "no_intra; plus_audio, plus_image, all_centric add memory-centric pairs)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: discard --out's stores and variant folders, whatever their "
                                        "settings (without it the same settings are reused; others are refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Controlled check: two synthetic MCRs with a shared latent; audio->image retrieval with ablations.

    A rerun into the same --out with the same settings reuses the stores; other settings need --overwrite.

    Example: cmcr bench synthetic --out /tmp/syn --epochs 10 --dim 512
    """
    from cmcr.trainer.synthetic import SyntheticSpec, run_synthetic_check, synthetic_config

    spec = SyntheticSpec(dim=dim, seed=seed, n_shared=n_shared, n_memory_a=n_memory, n_memory_b=n_memory,
                         n_eval=n_eval)
    table = run_synthetic_check(out, spec, synthetic_config(dim, seed=seed, epochs=epochs),
                                tuple(v.strip() for v in variants.split(",") if v.strip()), overwrite=overwrite)
    if as_json:
        _print_json(table)
        return
    t = Table(title=f"synthetic check: audio->image retrieval, pool {n_eval} (chance R@1 {1 / n_eval:.4f})")
    for col in ("variant", "sources", "R@1", "R@5", "mAP", "chance R@1", "image->audio R@1", "image->audio mAP",
                "zero-shot top-1", "s"):
        t.add_column(col)
    for r in table:
        t.add_row(r["variant"], str(r["centric"]), f"{r['R@1']:.3f}", f"{r['R@5']:.3f}", f"{r['mAP']:.3f}",
                  f"{r['chance_R@1']:.4f}", f"{r['image_to_audio_R@1']:.3f}", f"{r['image_to_audio_mAP']:.3f}",
                  f"{r['zeroshot_top1']:.3f}", f"{r['seconds']:.1f}")
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("connect")(connect)
    app.command("project")(project)
    app.command("search")(search)
    app.add_typer(eval_app, name="eval")
    app.add_typer(bench_app, name="bench")
