"""Cross-modal search held in memory: one connector, its projected galleries and the query encoders.

:class:`SearchService` is what ``cmcr serve`` (HTTP) wraps: it loads the connector, opens every
gallery (a store projected by that connector, with its FAISS index when there is one) and the
query encoders **once**, then answers queries by text, uploaded media or the key of a stored row in
milliseconds. The same class answers ``cmcr search`` queries (docs/serve.md).

A query is embedded by a query encoder, projected by the connector side that accepts that encoder's
identity and modality (paper §3.2: both projectors map into one connected space) and compared by
cosine with the gallery rows (also projected), i.e. nearest neighbours by inner product of unit rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import CmcrError, ConnectorError, InputDataError

log = logging.getLogger(__name__)

#: modalities a query file may have (text comes as a string, not a file)
QUERY_MODALITIES = ("image", "audio", "3d")


def modality_of_filename(name: str, hint: str = "") -> str:
    """The modality of a media file name by its extension (``audio``, ``image``, ``3d``), from the one list
    of media extensions (:mod:`cmcr.pipeline.media`).

    Args:
        name: the file name or path.
        hint: appended to the error (e.g. the CLI's ``Pass --modality``).

    Raises:
        InputDataError: the extension is not a known media extension (names the file and lists them).
    """
    from cmcr.pipeline.media import MEDIA_EXTENSIONS, modality_of

    modality = modality_of(name)
    if modality not in QUERY_MODALITIES:
        known = "; ".join(f"{m}: {', '.join(MEDIA_EXTENSIONS[m])}" for m in QUERY_MODALITIES)
        raise InputDataError(f"cannot tell the modality of {name!r} from its extension; known: {known}"
                             + (f". {hint}" if hint else ""))
    return modality


def query_extensions(modalities: Sequence[str]) -> set[str]:
    """``.ext`` of every media file a query of these modalities may be (for the page's file picker)."""
    from cmcr.pipeline.media import MEDIA_EXTENSIONS

    return {f".{e}" for m in modalities if m in QUERY_MODALITIES for e in MEDIA_EXTENSIONS[m]}


@dataclass
class Gallery:
    """One searchable projected store.

    Attributes:
        name: URL-safe name (the store folder name, made unique).
        store: the opened :class:`~cmcr.stores.store.Store` (projected by the service's connector).
        index: its FAISS index (``None``: exact search over the in-memory rows).
        side: the connector side whose encoder made the rows (``"A"``/``"B"``).
        media_roots: folders the rows' ``source`` paths are relative to (may be empty).
    """

    name: str
    store: Any
    index: Any
    side: str
    media_roots: list[Path] = field(default_factory=list)
    _emb: np.ndarray | None = None
    _table: Any = None  # keys + metadata (pyarrow), read once; rows are taken from it per hit

    @property
    def modality(self) -> str:
        return self.store.modality

    def table(self) -> Any:
        """Keys and metadata columns of every row (a pyarrow Table, read once and kept)."""
        if self._table is None:
            self._table = self.store.metadata().combine_chunks()
        return self._table

    def row_of(self, key: str) -> int | None:
        """The row number of ``key`` (``None`` when the gallery has no such key)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        i = pc.index(self.table().column("key"), pa.scalar(key, pa.string())).as_py()
        return None if i < 0 else int(i)

    def rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """``{"key", "metadata"}`` of the given rows (only those rows become Python objects)."""
        picked = self.table().take(list(rows)).to_pylist()
        return [{"key": r.pop("key"), "metadata": r} for r in picked]

    def embeddings(self) -> np.ndarray:
        if self._emb is None:
            self._emb = np.ascontiguousarray(self.store.embeddings(np.float32))
        return self._emb

    def embedding_of(self, row: int) -> np.ndarray:
        """The ``(D,)`` float32 row (from memory when held, else read from its part only)."""
        if self._emb is not None:
            return self._emb[row]
        return self.store.embeddings_of([row], np.float32)[0]

    def search(self, q: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Top-``k`` rows for one query row ``q`` (``(D,)`` float32 unit vector) as hit dicts."""
        k = max(1, min(int(k), self.store.num_rows))
        q2 = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if self.index is not None:
            sc, rw = self.index.search_arrays(q2, k=k)
            keep = rw[0] >= 0
            rows = [int(r) for r in rw[0][keep]]
            scores = [float(x) for x in sc[0][keep]]
        else:
            s = self.embeddings() @ q2[0]
            top = np.argsort(-s, kind="stable")[:k]
            rows = [int(i) for i in top]
            scores = [float(s[i]) for i in top]
        return [{"key": h["key"], "score": sc, "row": r, "metadata": h["metadata"]}
                for r, sc, h in zip(rows, scores, self.rows(rows), strict=True)]

    def media_path(self, key: str) -> Path | None:
        """The media file of row ``key`` inside one of :attr:`media_roots`, or ``None``."""
        row = self.row_of(key)
        if row is None:
            return None
        return self.resolve_media(self.rows([row])[0]["metadata"].get("source"))

    def resolve_media(self, source: Any) -> Path | None:
        """``source`` (a row's path relative to its media root) as an existing file inside one of
        :attr:`media_roots`, or ``None``. Path traversal is refused: the resolved file must lie inside
        the root it was joined to."""
        if not source or not isinstance(source, str):
            return None
        for root in self.media_roots:
            root = root.resolve()
            p = (root / source).resolve()
            if p.is_file() and (p == root or root in p.parents):
                return p
        return None


def open_gallery(store: Any, name: str | None = None, media_roots: Sequence[str | os.PathLike] | None = None
                 ) -> Gallery:
    """A :class:`Gallery` over a projected store, with its FAISS index when it has a current one
    (else exact search over the rows held in memory).

    Args:
        store: an opened projected :class:`~cmcr.stores.store.Store`.
        name: gallery name (default: the store folder name).
        media_roots: folders of the rows' media (default: recorded in the store, see :func:`media_roots_of`).
    """
    index = None
    try:
        from cmcr.stores.index import open_index

        index = open_index(store)
    except (ImportError, CmcrError) as e:
        log.info("gallery %s: no usable index (%s); exact search", store.path, e)
    roots = [Path(r) for r in media_roots] if media_roots else media_roots_of(store)
    return Gallery(name=name or _safe_name(Path(store.path).name), store=store, index=index,
                   side=str(store.encoder.get("side", "")), media_roots=roots)


def media_roots_of(store: Any) -> list[Path]:
    """Folders the media of ``store`` live in, from its manifest (``extra.media_roots``), following a
    projected store back to the store it was projected from."""
    from cmcr.stores.store import Store

    seen: set[str] = set()
    s = store
    for _ in range(4):
        extra = s.manifest.get("extra") or {}
        roots = extra.get("media_roots")
        if roots:
            return [Path(r) for r in roots]
        src = (extra.get("projected") or {}).get("source_store")
        if not src or src in seen or not (Path(src) / "manifest.json").is_file():
            return []
        seen.add(src)
        try:
            s = Store.open(src)
        except CmcrError:
            return []
    return []


class SearchService:
    """A connector, its galleries and query encoders, loaded once.

    Args:
        connector: connector folder (``cmcr connect`` or ``cmcr connector import`` output).
        galleries: projected stores (``cmcr project`` output) of this connector.
        encoders: encoder specs for queries (``open_clip:ViT-B-32``, ``clap:HTSAT-tiny@ckpt.pt``...);
            each must be the encoder of one connector side. Empty: query by key only.
        clap_tokenizer: folder with the ``roberta-base`` tokenizer files (CLAP text queries).
        media_roots: ``{gallery name: folder}`` overriding the roots recorded in the stores.
        device: torch device of the encoders.

    Raises:
        ConnectorError: a gallery was not projected by this connector (wrong space), or an encoder is
            not the encoder of either side.
        CmcrError: a store, index or encoder cannot be opened.
    """

    def __init__(self, connector: str | os.PathLike, galleries: Sequence[str | os.PathLike], *,
                 encoders: Sequence[str] = (), clap_tokenizer: str | None = None,
                 media_roots: Mapping[str, str | os.PathLike] | None = None, device: str = "cpu"):
        from cmcr.stores.store import Store
        from cmcr.trainer.connector import Connector, is_projected

        if not galleries:
            raise InputDataError("give at least one --gallery (a store projected by the connector)")
        self.connector = Connector.load(connector)
        self.connector_path = Path(connector)
        self.galleries: dict[str, Gallery] = {}
        for g in galleries:
            store = Store.open(g)
            if not (is_projected(store.encoder) and store.encoder.get("connector") == self.connector.fingerprint):
                holds = "a projection by another connector" if is_projected(store.encoder) else "raw embeddings"
                raise ConnectorError(
                    f"gallery {g} is not in the space of connector {connector} ({self.connector.fingerprint}): "
                    f"it holds {holds}; run `cmcr project {connector} <store> {g}` first")
            name = _unique(_safe_name(Path(g).name), self.galleries)
            roots = [media_roots[name]] if media_roots and name in media_roots else None
            gal = self.galleries[name] = open_gallery(store, name, roots)
            if gal.index is None:
                gal.embeddings()  # exact search: hold the rows once
        self._lock = threading.Lock()
        self.encoders: list[tuple[Any, dict[str, str]]] = []
        for spec in encoders:
            from cmcr.pipeline.encoders import load_encoder

            enc = load_encoder(spec, device=device, clap_tokenizer=clap_tokenizer)
            sides = {}
            for mod in enc.modalities:
                try:
                    sides[mod] = self.connector.side_for(enc.identity(), mod)
                except ConnectorError:
                    continue
            if not sides:
                raise ConnectorError(f"encoder {spec} is not the encoder of either side of {connector}: "
                                     f"{self.connector.sides['A'].mcr} / {self.connector.sides['B'].mcr}")
            self.encoders.append((enc, sides))

    # ------------------------------------------------------------------------------- facts
    def random_weights(self) -> list[dict[str, Any]]:
        """Random-init encoder identities behind the connector, the galleries and the query encoders."""
        from cmcr.trainer.evaluate import random_weight_identities

        return random_weight_identities(self.connector, *(g.store for g in self.galleries.values()),
                                        *(enc.identity() for enc, _ in self.encoders))

    def query_modalities(self) -> list[str]:
        """Modalities a query may have (those of the query encoders)."""
        return sorted({m for _, sides in self.encoders for m in sides})

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: connector, galleries (name, rows, modality, side, media), encoders."""
        return {
            "connector": {"path": str(self.connector_path), "fingerprint": self.connector.fingerprint,
                          "sides": {s: {"mcr": i.mcr, "modalities": list(i.modalities)}
                                    for s, i in self.connector.sides.items()}},
            "galleries": [{"name": g.name, "path": str(g.store.path), "rows": g.store.num_rows,
                           "modality": g.modality, "side": g.side, "mcr": self.connector.sides[g.side].mcr,
                           "index": g.index is not None, "media": bool(g.media_roots)}
                          for g in self.galleries.values()],
            "query_modalities": self.query_modalities(),
            "localize": self.localizer() is not None,
            "encoders": [{"identity": enc.identity(), "sides": sides} for enc, sides in self.encoders],
            "random_weights": bool(self.random_weights()),
        }

    def gallery(self, name: str) -> Gallery:
        """The gallery called ``name``. Raises :class:`InputDataError` naming the known ones."""
        if name not in self.galleries:
            raise InputDataError(f"no gallery {name!r}; known: {', '.join(self.galleries)}")
        return self.galleries[name]

    # ------------------------------------------------------------------------------ queries
    def _encoder_for(self, modality: str, prefer_side: str | None) -> tuple[Any, str]:
        found = [(enc, sides[modality]) for enc, sides in self.encoders if modality in sides]
        if not found:
            raise InputDataError(f"no query encoder for {modality!r} queries; this service embeds "
                                 f"{self.query_modalities() or 'nothing (start it with --encoder)'}")
        for enc, side in found:
            if side == prefer_side:
                return enc, side
        return found[0]

    def embed_text(self, text: str, *, side: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """A caption -> ``(D,)`` float32 unit row in the connected space.

        Args:
            text: the caption (non-blank).
            side: prefer the text encoder of this connector side (``None``: the first one).

        Raises:
            InputDataError: blank text or no text encoder.
        """
        if not text or not text.strip():
            raise InputDataError("the text query is empty")
        enc, s = self._encoder_for("text", side)
        with self._lock:
            raw = enc.encode("text", [text])
        q = self.connector.project(s, raw, identity=enc.identity(), modality="text")[0]
        return q, {"text": text, "modality": "text", "side": s}

    def embed_media(self, data: bytes, filename: str, *, side: str | None = None) -> tuple[np.ndarray, dict]:
        """Uploaded media bytes (image, audio, point cloud) -> ``(D,)`` float32 unit row.

        The modality comes from ``filename``'s extension. Raises :class:`InputDataError` for an unknown
        extension, a missing encoder or a file the encoder cannot decode (the decoder's reason).
        """
        modality = modality_of_filename(filename)
        enc, s = self._encoder_for(modality, side)
        suffix = Path(filename).suffix.lower()
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                with self._lock:
                    raw = enc.encode(modality, [tmp.name])
            except CmcrError as e:
                raise InputDataError(f"{filename}: {e}") from e
        if not np.all(np.isfinite(raw)):
            raise InputDataError(f"{filename}: the encoder produced no valid embedding (empty or silent input?)")
        q = self.connector.project(s, raw, identity=enc.identity(), modality=modality)[0]
        return q, {"media": filename, "modality": modality, "side": s}

    def embed_key(self, gallery: str, key: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The projected row ``key`` of a gallery (query by example)."""
        g = self.gallery(gallery)
        row = g.row_of(key)
        if row is None:
            raise InputDataError(f"gallery {gallery} has no key {key!r}")
        return g.embedding_of(row), {"key": key, "gallery": gallery, "modality": g.modality, "side": g.side}

    def search(self, q: np.ndarray, gallery: str, k: int = 10) -> list[dict[str, Any]]:
        """Top-``k`` hits of ``gallery`` for a connected-space query row."""
        return self.gallery(gallery).search(q, k)

    # -------------------------------------------------------------------------- localisation
    def localizer(self) -> Any | None:
        """A :class:`cmcr.localize.Localizer` over this service's open_clip ViT image encoder (built once), or
        ``None`` when no query encoder is an open_clip ViT of a connector side's images."""
        if not hasattr(self, "_localizer"):
            from cmcr.localize import Localizer

            self._localizer = None
            for enc, sides in self.encoders:
                if "image" in sides and getattr(enc, "family", None) == "open_clip":
                    try:
                        self._localizer = Localizer(self.connector, enc, None)
                    except CmcrError as e:  # a ResNet tower: search works, localisation does not
                        log.info("no localisation: %s", e)
                    break
        return self._localizer

    def localize(self, data: bytes, filename: str, gallery: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """Where the uploaded sound's source is in the image ``key`` of ``gallery``: a PNG overlay (image +
        colour map + colour bar, :func:`cmcr.localize.overlay_png`) and the heatmap's summary.

        Raises:
            InputDataError: no localiser (no open_clip ViT image encoder), a gallery that is not of images,
                an unknown key or a row without a media file, or a query the other side cannot embed.
        """
        from cmcr.localize import overlay_png

        loc = self.localizer()
        if loc is None:
            raise InputDataError("localisation needs an open_clip ViT image encoder of a connector side "
                                 "(start cmcr serve with -e open_clip:ViT-...)")
        g = self.gallery(gallery)
        if g.modality != "image":
            raise InputDataError(f"gallery {gallery} holds {g.modality}, not images: nothing to localise in")
        path = g.media_path(key)
        if path is None:
            raise InputDataError(f"no media file for key {key!r} in gallery {gallery!r}")
        q, info = self.embed_media(data, filename, side="B" if loc.image_side == "A" else "A")
        if info["side"] == loc.image_side:
            raise InputDataError(f"{filename}: a query of the image side; localise a sound (the other side's media)")
        with self._lock:
            m = loc.localize(path, q)
            png = overlay_png(path, m.heatmap, title=f"{filename} in {key}", random_weights=bool(self.random_weights()))
        return png, {**m.summary(), "query": info, "key": key, "gallery": gallery}


def _safe_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "gallery"
    return out


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


def render_points_png(points: np.ndarray, size: int = 256, max_points: int = 4096, up_axis: str = "y") -> bytes:
    """A PNG preview of a point cloud: an orthographic view from 30° azimuth / 20° elevation, far points
    drawn first, coloured by the cloud's rgb or shaded by depth.

    Args:
        points: ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb in [0, 1], float; any scale (centred and scaled here).
        size: image width and height (pixels).
        max_points: draw at most this many points (an even subsample, deterministic).
        up_axis: ``y`` (ShapeNet/Objaverse/glTF convention) or ``z``.

    Returns:
        PNG file bytes.
    """
    import io

    from PIL import Image, ImageDraw

    pts = np.asarray(points, dtype=np.float32)
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    xyz = pts[:, :3] - pts[:, :3].mean(axis=0)
    xyz /= max(float(np.linalg.norm(xyz, axis=1).max()), 1e-9)
    if up_axis == "y":  # y-up (ShapeNet, Objaverse, glTF) -> z-up
        xyz = xyz[:, [0, 2, 1]] * np.array([1, -1, 1], np.float32)
    az, el = np.radians(30.0), np.radians(20.0)
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]], np.float32)
    rot_x = np.array([[1, 0, 0], [0, np.cos(el), -np.sin(el)], [0, np.sin(el), np.cos(el)]], np.float32)
    v = xyz @ rot_z.T @ rot_x.T  # x right, y depth, z up
    order = np.argsort(-v[:, 1])  # far first
    img = Image.new("RGB", (size, size), (233, 236, 243))
    draw = ImageDraw.Draw(img)
    half = size / 2
    depth = (v[:, 1] - v[:, 1].min()) / max(float(np.ptp(v[:, 1])), 1e-9)
    r = max(1.0, size / 160)
    for i in order:
        x, y = half + v[i, 0] * half * 0.9, half - v[i, 2] * half * 0.9
        if pts.shape[1] >= 6:
            c = tuple(int(255 * float(np.clip(ch, 0, 1))) for ch in pts[i, 3:6])
        else:
            shade = 1.0 - 0.6 * float(depth[i])
            c = (int(47 * shade), int(91 * shade), int(211 * shade))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
