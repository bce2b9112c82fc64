"""A small Python client of a running ``cmcr serve`` (HTTP JSON API; see docs/serve.md).

Example::

    from cmcr.client import CmcrClient
    c = CmcrClient("http://127.0.0.1:8000")
    c.galleries()["galleries"][0]["name"]             # 'clip_image.cmcr'
    c.search_text("a dog barking", gallery="clap_audio.cmcr", k=5)["hits"]
    c.search_file("dog.wav", gallery="clip_image.cmcr")["hits"][0]["key"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cmcr.errors import CmcrError


class ServerError(CmcrError):
    """The server answered with an error (``status`` is the HTTP code, the message its detail)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server error {status}: {detail}")
        self.status = status
        self.detail = detail


class CmcrClient:
    """Client of one ``cmcr serve`` instance.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, timeout: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CmcrClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _json(self, response: Any) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:200]}
        if response.status_code >= 400:
            detail = body.get("detail") if isinstance(body, dict) else body
            raise ServerError(response.status_code, detail if isinstance(detail, str) else str(detail))
        return body

    def _send(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        import httpx

        try:
            return self._json(self._http.request(method, path, **kw))
        except httpx.HTTPError as e:
            raise CmcrError(f"cannot reach cmcr server {self.url} ({type(e).__name__}: {e}); is `cmcr serve` "
                            f"running there?") from e

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "version": ...}``."""
        return self._send("GET", "/api/health")

    def galleries(self) -> dict[str, Any]:
        """Connector, galleries (name, rows, modality), query modalities, ``random_weights``."""
        return self._send("GET", "/api/galleries")

    def search_text(self, text: str, *, gallery: str, k: int = 10, side: str | None = None) -> dict[str, Any]:
        """Hits of ``gallery`` for a caption (``{"hits": [{"key", "score", "metadata", "media_url"}...]}``)."""
        return self._send("POST", "/api/search", json={"text": text, "gallery": gallery, "k": k, "side": side})

    def search_key(self, key: str, *, gallery: str, key_gallery: str | None = None, k: int = 10) -> dict[str, Any]:
        """Hits of ``gallery`` for the stored row ``key`` of ``key_gallery`` (default: the same gallery)."""
        return self._send("POST", "/api/search", json={"key": key, "gallery": gallery, "k": k,
                                                       "key_gallery": key_gallery})

    def search_file(self, path: str | os.PathLike, *, gallery: str, k: int = 10) -> dict[str, Any]:
        """Hits of ``gallery`` for a media file (image, audio, point cloud), uploaded."""
        p = Path(path)
        with open(p, "rb") as f:
            return self._send("POST", "/api/search/media", files={"file": (p.name, f)},
                              data={"gallery": gallery, "k": str(k)})

    def media(self, media_url: str) -> bytes:
        """The bytes of a hit's ``media_url``."""
        r = self._http.get(media_url)
        if r.status_code >= 400:
            raise ServerError(r.status_code, r.text[:200])
        return r.content
