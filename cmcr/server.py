"""``cmcr serve``: the HTTP face of :class:`cmcr.service.SearchService` (FastAPI + uvicorn).

Routes (JSON unless noted; OpenAPI at ``/docs`` and ``/openapi.json``):

=========================  ======================================================================
``GET  /api/health``        ``{"status": "ok", "version": ...}``
``GET  /api/galleries``     connector, galleries (name, rows, modality, side), query modalities,
                            ``random_weights``
``POST /api/search``        JSON ``{"gallery", "k", "text" | "key" (+ "key_gallery"), "side"}``
``POST /api/search/media``  multipart: ``file`` (image/audio/point cloud), form ``gallery``, ``k``
``POST /api/localize``      multipart: ``file`` (a sound), form ``gallery`` (of images), ``key``: PNG
                            overlay of where the sound is in that image (``cmcr localize``);
                            ``X-Cmcr-Localization`` header: the heatmap's summary as JSON
``GET  /media/{g}/{key}``   the media file of a gallery row (from the store's recorded media root)
``GET  /``                  the web page (text box, drop zone, result grid with players)
=========================  ======================================================================

Errors are JSON ``{"detail": "..."}`` with 4xx codes: 400 bad query, 404 unknown gallery/key/media,
413 upload too large, 422 unreadable or too long media.
"""

import functools
import io
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cmcr import __version__
from cmcr.errors import CmcrError, InputDataError

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_AUDIO_SECONDS = 60.0
MAX_K = 200


class TextOrKeyQuery(BaseModel):
    """Body of ``POST /api/search``: a caption or the key of a stored row (other fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    gallery: str = Field(..., description="gallery name (GET /api/galleries)")
    k: int = Field(10, ge=1, le=MAX_K, description="number of hits")
    text: str | None = Field(None, description="a caption")
    key: str | None = Field(None, description="key of a stored row (query by example)")
    key_gallery: str | None = Field(None, description="gallery holding `key` (default: `gallery`)")
    side: Literal["A", "B"] | None = Field(None, description="connector side whose encoder embeds the text (A/B)")


def create_app(service: Any, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> Any:
    """A FastAPI application answering queries with ``service`` (a loaded
    :class:`~cmcr.service.SearchService`).

    Args:
        service: the search service (connector, galleries, query encoders held in memory).
        max_upload_bytes: largest accepted upload (bytes); larger gets HTTP 413.
        max_audio_seconds: longest accepted audio upload (seconds); longer gets HTTP 422.
    """
    import jinja2

    app = FastAPI(title="cmcr search", version=__version__,
                  description="Cross-modal search in a C-MCR connected space (text, images, audio, 3D).")
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(WEB_DIR)),
                                   autoescape=jinja2.select_autoescape(["html"]))
    facts = service.describe()
    random_ids = service.random_weights()

    def _answer(q: Any, info: dict[str, Any], gallery: str, k: int, started: float) -> dict[str, Any]:
        try:
            hits = service.search(q, gallery, k)
        except InputDataError as e:
            raise HTTPException(404, str(e)) from e
        g = service.gallery(gallery)
        for h in hits:
            h["media_url"] = f"/media/{gallery}/{h['key']}" if g.media_roots else None
            h["thumb_url"] = f"/thumb/{gallery}/{h['key']}" if g.media_roots and g.modality == "3d" else None
        return {"query": info, "gallery": gallery, "modality": g.modality, "hits": hits,
                "random_weights": bool(random_ids), "took_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """Liveness: status and version."""
        return {"status": "ok", "version": __version__, "galleries": len(service.galleries)}

    @app.get("/api/galleries")
    def galleries() -> dict[str, Any]:
        """Connector, galleries and what a query may be."""
        return {**facts, "random_weight_encoders": random_ids}

    @app.post("/api/search")
    def search(body: TextOrKeyQuery) -> dict[str, Any]:
        """Search a gallery by a caption or by the key of a stored row."""
        started = time.perf_counter()
        if (body.text is None) == (body.key is None):
            raise HTTPException(400, "give exactly one of `text` or `key`")
        if body.gallery not in service.galleries:
            raise HTTPException(404, f"no gallery {body.gallery!r}; known: {', '.join(service.galleries)}")
        try:
            if body.text is not None:
                # default: the text encoder of the gallery's own MCR (e.g. CLAP text for audio rows)
                q, info = service.embed_text(body.text, side=body.side or service.gallery(body.gallery).side)
            else:
                q, info = service.embed_key(body.key_gallery or body.gallery, body.key)
        except InputDataError as e:
            raise HTTPException(404 if body.key is not None else 400, str(e)) from e
        return _answer(q, info, body.gallery, body.k, started)

    async def read_upload(file: UploadFile, gallery: str) -> tuple[bytes, str]:
        """An upload's bytes and name, checked once for every upload route: the gallery exists (404), the size
        limit (413), not empty and an audio file within the duration limit (422)."""
        if gallery not in service.galleries:
            raise HTTPException(404, f"no gallery {gallery!r}; known: {', '.join(service.galleries)}")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{file.filename}: larger than the {max_upload_bytes} bytes this server "
                                     f"accepts (cmcr serve --max-upload-mb)")
        if not data:
            raise HTTPException(422, f"{file.filename}: empty file")
        name = file.filename or "upload"
        from cmcr.service import modality_of_filename

        try:
            if modality_of_filename(name) == "audio":
                _check_audio_duration(data, name, max_audio_seconds)
        except InputDataError as e:
            raise HTTPException(422, str(e)) from e
        return data, name

    @app.post("/api/search/media")
    async def search_media(file: UploadFile = File(..., description="image, audio or point-cloud file"),
                           gallery: str = Form(...), k: int = Form(10, ge=1, le=MAX_K),
                           side: Literal["A", "B"] | None = Form(None)) -> dict[str, Any]:
        """Search a gallery with an uploaded media file (the modality comes from the file extension)."""
        started = time.perf_counter()
        data, name = await read_upload(file, gallery)
        try:
            import anyio

            q, info = await anyio.to_thread.run_sync(lambda: service.embed_media(data, name, side=side))
        except InputDataError as e:
            raise HTTPException(422, str(e)) from e
        return await anyio.to_thread.run_sync(lambda: _answer(q, info, gallery, k, started))  # off the event loop

    @app.post("/api/localize")
    async def localize(file: UploadFile = File(..., description="the sound (audio file)"),
                       gallery: str = Form(..., description="a gallery of images"),
                       key: str = Form(..., description="the image row to localise the sound in")) -> Any:
        """Where the uploaded sound comes from in one gallery image: a PNG (image + colour map + colour bar)."""
        data, name = await read_upload(file, gallery)
        g = service.gallery(gallery)
        if g.modality == "image" and g.row_of(key) is None:  # other galleries: 422 below (nothing to localise in)
            raise HTTPException(404, f"gallery {gallery} has no key {key!r}")
        try:
            import anyio

            png, info = await anyio.to_thread.run_sync(lambda: service.localize(data, name, gallery, key))
        except InputDataError as e:
            raise HTTPException(422, str(e)) from e
        import json

        summary = {k: info[k] for k in ("peak_xy", "min", "max", "image_score", "grid") if k in info}
        return Response(png, media_type="image/png", headers={"X-Cmcr-Localization": json.dumps(summary)})

    def media_file(gallery: str, key: str) -> Path:
        if gallery not in service.galleries:
            raise HTTPException(404, f"no gallery {gallery!r}")
        path = service.gallery(gallery).media_path(key)
        if path is None:
            raise HTTPException(404, f"no media file for key {key!r} in gallery {gallery!r}")
        return path

    @app.get("/media/{gallery}/{key:path}")
    def media(gallery: str, key: str) -> Any:
        """The media file of a gallery row, served from the gallery's media root (never outside it)."""
        return FileResponse(media_file(gallery, key))

    @app.get("/thumb/{gallery}/{key:path}")
    def thumb(gallery: str, key: str) -> Any:
        """A PNG preview of a 3D gallery row (the point cloud or mesh rendered from its media file)."""
        path = media_file(gallery, key)
        try:
            png = _thumbnail_png(str(path), path.stat().st_mtime_ns)
        except CmcrError as e:
            raise HTTPException(422, f"{key}: cannot render ({e})") from e
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> Any:
        """The search page."""
        html = templates.get_template("index.html").render(
            facts=facts, random_ids=random_ids, version=__version__,
            accept=",".join(sorted(_accepted_extensions(facts["query_modalities"]))))
        return HTMLResponse(html)

    @app.exception_handler(CmcrError)
    def _cmcr_error(_request: Any, exc: CmcrError) -> Any:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    def _invalid_request(_request: Any, exc: RequestValidationError) -> Any:
        return JSONResponse(status_code=422, content={"detail": validation_sentence(exc.errors())})

    return app


def validation_sentence(errors: Any) -> str:
    """FastAPI/pydantic validation errors as the one sentence every error of this API is
    (``{"detail": "..."}``), naming each field: ``"k: Input should be greater than or equal to 1 (got 0)"``."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see /docs for the fields of this request)"
        elif "input" in e and e.get("type") not in ("missing", "json_invalid") and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"[:120]
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def _accepted_extensions(modalities: list[str]) -> set[str]:
    from cmcr.service import query_extensions

    return query_extensions(modalities)


@functools.lru_cache(maxsize=512)
def _thumbnail_png(path: str, mtime_ns: int) -> bytes:
    """Rendered preview of a 3D media file (cached per path and modification time)."""
    from cmcr.pipeline.pointcloud import load_points
    from cmcr.service import render_points_png

    data = Path(path).read_bytes()
    return render_points_png(load_points(data, Path(path).suffix, what=path))


def _check_audio_duration(data: bytes, name: str, max_seconds: float) -> None:
    """Raise :class:`InputDataError` when an audio upload is unreadable or longer than ``max_seconds``."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for bad files
        raise InputDataError(f"{name}: not a readable audio file ({type(e).__name__})") from e
    if info.duration > max_seconds:
        raise InputDataError(f"{name}: {info.duration:.1f} s of audio; this server accepts up to {max_seconds:g} s "
                             f"(cmcr serve --max-audio-seconds)")


def serve(service: Any, *, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Run the HTTP server in the foreground (uvicorn) until interrupted."""
    import uvicorn

    uvicorn.run(create_app(service, **app_kwargs), host=host, port=port, log_level="warning")
