"""`cmcr serve`: a cross-modal search service and web page over projected galleries (see cmcr/server.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from cmcr.errors import InputDataError


def serve(
    connector: Path = typer.Option(..., "--connector", "-c", help="Connector folder."),
    gallery: list[Path] = typer.Option(..., "--gallery", "-g",
                                       help="Projected store to search (repeat for several)."),
    encoder: list[str] = typer.Option([], "--encoder", "-e",
                                      help="Encoder spec for text/media queries (repeat: one per connector side)."),
    clap_tokenizer: str | None = typer.Option(None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
                                              help="Folder with RoBERTa vocab.json + merges.txt (CLAP text)."),
    media_root: list[str] = typer.Option([], "--media-root",
                                         help="GALLERY=FOLDER: where a gallery's media files live (default: "
                                              "recorded in the store)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, help="Largest accepted upload (MB)."),
    max_audio_seconds: float = typer.Option(60.0, "--max-audio-seconds", min=0.1,
                                            help="Longest accepted audio upload (s)."),
    device: str = typer.Option("cpu", "--device", help="Device of the query encoders (cpu, cuda, auto)."),
    threads: int = typer.Option(1, "--threads", min=1,
                                help="torch/FAISS threads per query (1: concurrent queries use separate cores)."),
    slots: int | None = typer.Option(None, "--slots", min=1,
                                     help="Encoder forward passes at once (default: CPUs // --threads); more "
                                          "waiting text queries are micro-batched (--max-batch)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1,
                                  help="Text queries waiting for the encoder are embedded together, up to this many."),
    quantize_text: str | None = typer.Option(None, "--quantize-text",
                                             help="int8: text queries through an int8 text tower (faster, "
                                                  "approximate; opt-in). Default: float32."),
    query_cache: int = typer.Option(1024, "--query-cache", min=0,
                                    help="LRU cache of text query embeddings (entries; 0: off)."),
    shortlist: bool = typer.Option(True, "--shortlist/--no-shortlist",
                                   help="Exact search of large flat galleries through a certified float16 "
                                        "shortlist (same hits, half the bytes scanned)."),
) -> None:
    """Serve cross-modal search over HTTP: a JSON API (OpenAPI at /docs) and a web page at /.

    Loads the connector, the galleries (with their FAISS indexes) and the query encoders once.

    Example: cmcr serve -c runs/clip-clap -g st/clip_image.cmcr -g st/clap_audio.cmcr
    -e open_clip:ViT-B-32 -e clap:HTSAT-tiny@/ckpt/630k-audioset-best.pt --port 8000
    """
    from cmcr.console import err_console
    from cmcr.server import serve as run
    from cmcr.service import SearchService

    if quantize_text not in (None, "int8"):
        raise InputDataError(f"--quantize-text {quantize_text!r}: the only quantised text path is int8")
    roots = {}
    for item in media_root:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InputDataError(f"--media-root {item!r}: use GALLERY=FOLDER (gallery name as in GET /api/galleries)")
        roots[name] = folder
    service = SearchService(connector, [str(g) for g in gallery], encoders=encoder, clap_tokenizer=clap_tokenizer,
                            media_roots=roots, device=device, threads=threads, slots=slots, max_batch=max_batch,
                            quantize_text=quantize_text, cache_size=query_cache,
                            shortlist=shortlist)
    console = err_console()  # not wrapped at 80 columns when piped to a log
    for g in service.describe()["galleries"]:
        console.print(f"gallery {g['name']}: {g['rows']} {g['modality']} rows (side {g['side']}, {g['mcr']})"
                      f"{'' if g['media'] else ', no media root'}", highlight=False)
    for hint in service.hints():
        console.print(f"hint: {hint}", highlight=False)
    if quantize_text:
        console.print(f"text queries: {quantize_text} text tower (approximate embeddings; stores are never "
                      f"written by this service)", highlight=False)
    if service.random_weights():
        console.print("note: random-init encoder weights behind this service: results are not meaningful",
                      style="bold red", highlight=False)
    console.print(f"serving on http://{host}:{port}/ (API docs: http://{host}:{port}/docs); Ctrl-C stops",
                  highlight=False)
    run(service, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_audio_seconds=max_audio_seconds)


def register(app: typer.Typer) -> None:
    """Add ``cmcr serve`` to the root app."""
    app.command("serve")(serve)
