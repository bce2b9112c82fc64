"""``cmcr store ...``: import embeddings of other models, inspect, validate and index stores.

Thin: parse options, call :mod:`cmcr.stores.importing` / :mod:`cmcr.stores.index` /
:class:`cmcr.stores.store.Store`, report with rich (or ``--json``).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from cmcr.console import out_console, plain
from cmcr.errors import ConfigError, StoreFormatError, StoreValidationError

store_app = typer.Typer(
    name="store",
    help=(
        "Embedding stores: import embeddings of any model, show, validate and index them.\n\n"
        "Example: cmcr store info out/clip-image"
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = out_console()

IMPORT_HELP = """Build a store from embeddings made by another model (ULIP-2 for 3D, ImageBind, in-house...).

Inputs: .npy files of (N, D) float rows with --keys (.txt one per line, .csv/.parquet with a key column) and
optional --metadata (.csv/.parquet, one row per embedding, same order); or .parquet files with a key column
and an embedding column (list<float> or fixed_size_list<float>[D]) whose other columns become metadata.
Every row is checked (dim, NaN/Inf, unique keys). A cosine store needs unit rows: pass --normalize to
L2-normalise them (recorded in the manifest); otherwise un-normalised rows are refused. The store is written
in a temp folder and renamed when complete; rerunning a killed import resumes it.

Give the model identity (the same for every modality of one model, so 3D and text stores of ULIP-2 match):
--encoder-family plus --architecture / --weights, or --encoder-json.

Example (ULIP-2 PointBERT point-cloud embeddings exported with np.save, keys = Objaverse uids):

  cmcr store import ulip2_pc.npy --out stores/ulip2-3d --modality 3d \\
    --encoder-family ulip2 --architecture PointBERT \\
    --weights ULIP-2-PointBERT-10k-xyzrgb-pc-vit_g-objaverse.pt \\
    --keys uids.csv --key-column uid --metadata objaverse_meta.csv --normalize

Example (ImageBind audio embeddings in Parquet with columns id, embedding, path):

  cmcr store import imagebind_audio.parquet --out stores/ib-audio --modality audio \\
    --encoder-family imagebind --architecture imagebind_huge --key-column id --normalize
"""


def _parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5G"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}; use e.g. 2GiB, 512MB or a number of bytes")
    value, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1000 if suffix == "b" and unit else 1024
    return int(value * base ** " kmgt".index(unit or " "))


def _load_json_arg(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    p = Path(text)
    raw = p.read_text() if p.suffix == ".json" and p.exists() else text
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option}: not valid JSON nor a .json file ({e}): {text!r}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{option}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _command_line(fallback: str) -> str:
    """The command line for provenance: argv when run as the ``cmcr`` script, else ``fallback``."""
    if sys.argv and Path(sys.argv[0]).name == "cmcr":
        return shlex.join(["cmcr", *sys.argv[1:]])
    return fallback


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@store_app.command("import", help=IMPORT_HELP)
def import_cmd(
    sources: list[Path] = typer.Argument(..., help=".npy or .parquet files (or folders of them), in row order."),
    out: Path = typer.Option(..., "--out", "-o", help="Store folder to create."),
    modality: str = typer.Option(..., "--modality", "-m", help="Modality of the rows: 3d, image, text, audio..."),
    encoder_family: str | None = typer.Option(None, "--encoder-family", help="Model family, e.g. ulip2, imagebind."),
    architecture: str | None = typer.Option(None, "--architecture", "--encoder-name",
                                            help="Architecture / model name, e.g. PointBERT, imagebind_huge."),
    weights: str | None = typer.Option(None, "--weights", help="Checkpoint file name, tag or sha256."),
    encoder_json: str | None = typer.Option(None, "--encoder-json",
                                            help="Full identity as JSON (or a .json file); merged under the flags."),
    keys: Path | None = typer.Option(None, "--keys", help="Keys of .npy rows: .txt, .csv or .parquet."),
    key_column: str = typer.Option("key", "--key-column", help="Key column of keys/metadata/Parquet files."),
    metadata: Path | None = typer.Option(None, "--metadata", help="Metadata of .npy rows: .csv or .parquet."),
    metadata_column: list[str] | None = typer.Option(None, "--metadata-column",
                                                     help="Keep only these metadata columns (repeatable)."),
    embedding_column: str = typer.Option("embedding", "--embedding-column", help="Embedding column of Parquet inputs."),
    row_keys: bool = typer.Option(False, "--row-keys", help="No keys: use '<file stem>/<row>'."),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise rows (recorded in the manifest)."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 or float32."),
    metric: str = typer.Option("cosine", "--metric", help="cosine (unit rows), inner_product or l2."),
    preprocessing_json: str | None = typer.Option(None, "--preprocessing-json",
                                                  help="Preprocessing of the source model as JSON (recorded)."),
    part_rows: int | None = typer.Option(None, "--part-rows", help="Rows per part (default ~512 MiB per part)."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows",
                                       help="Record NaN/zero/un-normalised rows as failures instead of stopping."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: import anew and replace the store at --out, whatever it holds "
                                        "(without it the same import is reused; another store is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new store's summary as JSON."),
) -> None:
    from cmcr.stores.importing import import_embeddings

    identity = _load_json_arg(encoder_json, "--encoder-json")
    for name, value in (("family", encoder_family), ("architecture", architecture), ("weights", weights)):
        if value is not None:
            identity[name] = value
    if not identity.get("family"):
        raise ConfigError("the encoder identity needs a family: pass --encoder-family (e.g. ulip2) or --encoder-json")
    store = import_embeddings(
        sources, out, modality=modality, encoder=identity, normalize=normalize, keys=keys, key_column=key_column,
        metadata=metadata, metadata_columns=metadata_column or None, embedding_column=embedding_column,
        row_keys=row_keys, dtype=dtype, metric=metric, preprocessing=_load_json_arg(preprocessing_json,
                                                                                    "--preprocessing-json"),
        part_rows=part_rows, skip_bad_rows=skip_bad_rows, overwrite=overwrite, progress=not as_json,
        command=_command_line("cmcr store import"),
    )
    if as_json:
        _print_json(store.describe())
        return
    failures = store.failures().num_rows
    console.print(f"[green]imported[/] {store.num_rows} rows x {store.dim} ({store.modality}) into {store.path}"
                  + (f", {failures} rejected row(s) in failures.parquet" if failures else ""))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@store_app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="Store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show what a store holds: modality, encoder identity, rows, dim, dtype, parts, failures, index.

    Example: cmcr store info stores/ulip2-3d --json
    """
    from cmcr.stores.index import describe_index
    from cmcr.stores.store import Store

    store = Store.open(path, validate="fast")
    desc = store.describe()
    desc["index"] = describe_index(store)
    if as_json:
        _print_json(desc)
        return
    rows: list[tuple[str, str]] = []  # (field, value): printed literally, one line each, no padding after
    rows.append(("store", desc["path"]))
    rows.append(("modality", desc["modality"]))
    rows.append(("encoder", json.dumps(desc["encoder"], sort_keys=True)))
    if desc["preprocessing"]:
        rows.append(("preprocessing", json.dumps(desc["preprocessing"], sort_keys=True)))
    rows.append(("rows x dim", f"{desc['rows']:,} x {desc['dim']} ({desc['dtype']}, {desc['metric']}"
                               f"{', unit rows' if desc['normalized'] else ''})"))
    rows.append(("parts", f"{desc['parts']} ({_human_bytes(desc['bytes_on_disk'])})"))
    rows.append(("metadata", ", ".join(desc["metadata_columns"]) or "-"))
    rows.append(("failures", str(desc["failures"])))
    rows.append(("fingerprint", desc["fingerprint"]))
    if (desc.get("extra") or {}).get("import"):
        imp = desc["extra"]["import"]
        rows.append(("imported from", ", ".join(imp.get("sources", []))
                     + (" (normalised on import)" if imp.get("normalized_on_import") else "")))
    idx = desc["index"]
    if idx is None:
        rows.append(("index", "none (build one with `cmcr store index`)"))
    else:
        params = f" {idx['params']}" if idx["params"] else ""
        rows.append(("index", f"{idx['kind']} {idx['factory']}{params}, recall@10 {idx['recall_at_10']:.3f} "
                                    f"on {idx['recall_queries']} queries"))
    rows.append(("updated", str(desc.get("updated_at"))))
    warnings = {"index": " [red]STALE: rebuild with `cmcr store index`[/]"} if idx is not None and idx["stale"] else {}
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        console.print(f"[bold]{k}[/]{' ' * (width - len(k))}{plain(v)}{warnings.get(k, '')}", highlight=False)


@store_app.command("validate")
def validate_cmd(
    path: Path = typer.Argument(..., help="Store folder."),
    fast: bool = typer.Option(False, "--fast", help="Check manifest, files, schemas and counts only (no rows)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a store's files and rows; exit 0 when valid, 1 when not.

    Checks the manifest, part files, schemas and row counts, and (unless --fast) the sha256 of every
    part, NaN/Inf, unit norms and unique keys of every row.

    Example: cmcr store validate stores/ulip2-3d --json
    """
    from cmcr.stores.store import Store

    try:
        store = Store.open(path, validate="fast" if fast else "full")
        report = {"ok": True, "path": str(path), "rows": store.num_rows, "parts": len(store.parts),
                  "checks": "fast" if fast else "full"}
    except (StoreFormatError, StoreValidationError) as e:
        report = {"ok": False, "path": str(path), "error": str(e), "checks": "fast" if fast else "full"}
    if as_json:
        _print_json(report)
    elif report["ok"]:
        console.print(f"[green]valid[/] {path}: {report['rows']:,} rows in {report['parts']} part(s) "
                      f"({report['checks']} checks)")
    else:
        console.print(f"[bold red]invalid[/] {report['error']}", highlight=False)
    if not report["ok"]:
        raise SystemExit(1)  # cli.main drops the return value of typer.Exit in standalone_mode=False


@store_app.command("index")
def index_cmd(
    path: Path = typer.Argument(..., help="Store folder."),
    kind: str = typer.Option("auto", "--kind", help="auto, flat (exact), hnsw or ivf."),
    memory_budget: str = typer.Option("2GiB", "--memory-budget", help="RAM the index may use, e.g. 2GiB, 512MB."),
    sample_queries: int = typer.Option(1000, "--sample-queries", help="Store rows used to measure recall@10."),
    queries: Path = typer.Option(None, "--queries",
                                 help="A store of the queries this index will answer (same space, e.g. projected "
                                      "captions for an image gallery searched by text): recall@10 and the tuning "
                                      "use --sample-queries of its rows instead of the store's own."),
    target_recall: float = typer.Option(0.95, "--target-recall", help="recall@10 that nprobe/efSearch tuning aims at."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training and query samples."),
    plan_only: bool = typer.Option(False, "--plan",
                                   help="Print the plan (big stores: the sample probe's verdict; once built: "
                                        "the decision and its reasons); save nothing."),
    keep_below_target: bool = typer.Option(False, "--keep-below-target",
                                           help="Keep (and serve) a forced --kind index below the target recall."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Start over: build anew even when the index was built from these settings "
                                        "and rows (reused without it; other settings or rows rebuild it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the index record as JSON."),
) -> None:
    """Build a FAISS index for a store in <store>/index/, with its measured recall@10.

    Exact for small stores; HNSW or IVF (float16 / SQ8 / PQ codes) chosen from rows, dim and the memory
    budget. nprobe / efSearch is raised until recall@10 against exact search on sampled store rows reaches
    the target; then the index is timed against exact search side by side (batch and single queries).
    With --kind auto it is kept only if it reaches the target and is not slower than exact search;
    otherwise the store gets an exact (flat) index. Parameters, recall, speeds and the reasons are saved
    in <store>/index/index.json; --plan prints the plan and, once built, the decision and its reasons.
    Stores of 200,000+ rows first probe the planned index on a 65,536-row sample: when even that says it
    cannot beat exact search, the build goes straight to the exact index (--plan runs the probe too).

    Cross-modal search (text queries against an image gallery) reaches much lower recall than the store's
    own rows suggest: give --queries a store of such queries to tune on them.

    Example: cmcr store index stores/ulip2-3d --memory-budget 4GiB
    """
    from cmcr.errors import ConfigError, StoreIndexError
    from cmcr.stores.index import KINDS, build_index, plan_index
    from cmcr.stores.store import Store

    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    store = Store.open(path, validate="fast")
    budget = _parse_bytes(memory_budget)
    if plan_only:
        try:
            plan = plan_index(max(store.num_rows, 1), store.dim, budget, kind=kind)
        except ValueError as e:
            raise StoreIndexError(f"{path}: {e}") from e
        from cmcr.stores.index import describe_index

        built = describe_index(store)
        if as_json:
            _print_json({**plan, "built": built})
            return
        console.print(f"plan: {plan['kind']} [bold]{plan['factory']}[/] {plan['params']}, "
                      f"~{_human_bytes(plan['estimated_memory_bytes'])}: {plan['reason']}", highlight=False)
        probe = None
        if kind == "auto" and plan["kind"] != "flat":
            from cmcr.stores import index as index_mod

            if store.num_rows >= index_mod.PROBE_MIN_ROWS:  # the same probe the build runs first (seconds)
                probe = index_mod.probe_plan(store, plan, target_recall=target_recall, seed=seed,
                                             probe_queries=min(sample_queries, index_mod.PROBE_QUERIES))
                console.print(f"probe: {probe['reason']}", highlight=False)
            console.print(f"the build measures recall@10 on {sample_queries} "
                          f"{'rows of ' + str(queries) if queries else 'store rows'} and times it against exact "
                          f"search (batch and single queries); it is kept only if recall@10 >= {target_recall} "
                          "and it is not slower than exact search, else the store gets an exact (flat) index",
                          highlight=False)
        if built is None:
            console.print("built: none yet", highlight=False)
        else:
            console.print(f"built: {built['kind']} {built['factory']} {built['params']}, recall@10 "
                          f"{built['recall_at_10']:.3f}" + (" [red](STALE)[/]" if built["stale"] else ""),
                          highlight=False)
            for reason in (built.get("decision") or {}).get("reasons", []):
                console.print(f"  - {reason}", highlight=False)
        return
    if kind not in ("auto", "flat", "hnsw", "ivf"):
        raise ConfigError(f"--kind must be auto, flat, hnsw or ivf, got {kind!r}")
    info = build_index(store, kind=kind, memory_budget_bytes=budget, sample_queries=sample_queries, seed=seed,
                       target_recall=target_recall, progress=not as_json, keep_below_target=keep_below_target,
                       overwrite=overwrite, queries_from=queries)
    if as_json:
        _print_json(info)
        return
    colour = "green" if info["target_reached"] else "yellow"
    console.print(f"[{colour}]indexed[/] {info['rows']:,} rows: {info['kind']} {info['factory']} {info['params']}, "
                  f"recall@10 {info['recall_at_10']:.3f} on {info['recall_queries']} queries"
                  f"{' of ' + str(info['recall_queries_from']) if info.get('recall_queries_from') else ''}, "
                  f"{info['queries_per_second']:,.0f} queries/s, {_human_bytes(info['file_bytes'])}, "
                  f"built in {info['build_seconds']:.1f} s")
    for reason in info["decision"]["reasons"]:
        console.print(f"  - {reason}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``store`` command group to the root app."""
    app.add_typer(store_app, name="store")
