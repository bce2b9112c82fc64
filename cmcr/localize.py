"""`cmcr localize`: where in an image does a sound come from (C-MCR section 4.2, source localisation).

Glue of the three rooms: the connector (:mod:`cmcr.trainer.connector`), the image side's open_clip ViT
(dense patches: :func:`cmcr.pipeline.openclip_encoder.dense_patch_embeddings`), the query side's encoder
(CLAP audio), and the maths in :mod:`cmcr.trainer.localization`. Library use::

    loc = Localizer.load("runs/clip-clap", image_encoder="open_clip:ViT-B-16", query_encoder="clap:HTSAT-tiny")
    q = loc.embed_query("dog.wav")                       # (D,) in the connected space
    m = loc.localize("park.jpg", q)                      # m.heatmap: (H, W) cosine, m.grid: (h, w)
    write_overlay(m, "park.heat.png", title="dog.wav")   # image + colour map + colour bar
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, ConnectorError, EncoderError, InputDataError

log = logging.getLogger(__name__)

#: The note printed on every picture / report computed with random-init encoder weights.
RANDOM_NOTE = "RANDOM WEIGHTS: NOT MEANINGFUL"
COLORMAP = "jet"


def spec_of_identity(identity: dict[str, Any]) -> str | None:
    """The encoder spec that rebuilds an encoder identity, when the identity alone names its weights (a
    pretrained tag or ``random`` with its seed); ``None`` for a checkpoint file (``sha256:...``: the user must
    give the file)."""
    family, arch, weights = identity.get("family"), identity.get("architecture"), str(identity.get("weights", ""))
    if not family or not arch or weights.startswith("sha256:") or not weights:
        return None
    if weights.startswith("random"):
        seed = int(identity.get("seed") or 0)
        return f"{family}:{arch}@random" + (f":{seed}" if seed else "")
    return f"{family}:{arch}@{weights}"


@dataclass
class LocalizationMap:
    """One image's localisation.

    Attributes:
        image: the image file.
        grid: ``(h, w)`` float32 cosine similarity of each projected patch with the projected query.
        heatmap: ``(H, W)`` float32, ``grid`` upsampled bilinearly to the image's own size.
        image_score: cosine of the image's ordinary (pooled) projected embedding with the query: how much the
            image as a whole matches the sound (ranks the images of a folder).
    """

    image: Path
    grid: np.ndarray
    heatmap: np.ndarray
    image_score: float
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        from cmcr.trainer.localization import heatmap_summary

        return {"image": str(self.image), "image_score": self.image_score, **heatmap_summary(self.heatmap, self.grid),
                **self.info}


class Localizer:
    """A connector whose one side is an open_clip ViT, with the encoders of both sides, loaded once.

    Args:
        connector: a loaded :class:`~cmcr.trainer.connector.Connector`.
        image_encoder: the image side's :class:`~cmcr.pipeline.openclip_encoder.OpenClipEncoder` (a ViT).
        query_encoder: the other side's encoder (e.g. CLAP for audio), or ``None`` (queries given as
            connected-space rows only).
        size: dense input size in pixels (a multiple of the patch size; ``None``: the model's own, e.g. 224;
            larger gives a finer grid).
        path: ``"value"`` or ``"value+residual"``
            (:func:`~cmcr.pipeline.openclip_encoder.maskclip_patch_embeddings`).

    Raises:
        EncoderError: the image encoder is not an open_clip ViT.
        ConnectorError: an encoder is not the encoder of a connector side.
    """

    def __init__(self, connector: Any, image_encoder: Any, query_encoder: Any | None = None, *,
                 size: int | None = None, path: str = "value"):
        self.connector = connector
        if getattr(image_encoder, "family", None) != "open_clip" or not hasattr(image_encoder, "dense_embed"):
            raise EncoderError(
                f"localisation needs the connector's image side to be an open_clip ViT; the image encoder given is "
                f"{getattr(image_encoder, 'family', type(image_encoder).__name__)}:"
                f"{image_encoder.identity().get('architecture') if hasattr(image_encoder, 'identity') else '?'}")
        image_encoder.check_dense()
        from cmcr.pipeline.openclip_encoder import DENSE_PATHS

        if path not in DENSE_PATHS:
            raise ConfigError(f"unknown dense path {path!r}; use one of {', '.join(DENSE_PATHS)}")
        self.image_encoder = image_encoder
        self.image_side = connector.side_for(image_encoder.identity(), "image")
        self.pre = image_encoder.dense_preprocessor(size)
        self.size = self.pre.size
        self.path = path
        self.query_encoder = query_encoder
        self.query_side: str | None = None
        self.query_modalities: list[str] = []
        if query_encoder is not None:
            for mod in query_encoder.modalities:
                try:
                    side = connector.side_for(query_encoder.identity(), mod)
                except ConnectorError:
                    continue
                if side != self.image_side:
                    self.query_side = side
                    self.query_modalities.append(mod)
            if self.query_side is None:
                raise ConnectorError(
                    f"query encoder {query_encoder.identity().get('family')}:"
                    f"{query_encoder.identity().get('architecture')} is not the encoder of the connector's other "
                    f"side ({connector.sides['B' if self.image_side == 'A' else 'A'].mcr}); give that side's encoder")

    @classmethod
    def load(cls, connector: str | os.PathLike, *, image_encoder: str | None = None, query_encoder: str | None = None,
             device: str = "auto", size: int | None = None, path: str = "value",
             clap_tokenizer: str | None = None) -> Localizer:
        """Load a connector and its encoders. A spec left out is rebuilt from the connector side's identity when
        that names its weights (a pretrained tag or ``random``); a side trained on a checkpoint file needs the
        spec (``open_clip:ViT-B-16@/path/ckpt.pt``).

        Raises:
            ConnectorError: no side of the connector is an open_clip image encoder; an encoder fits no side.
            EncoderError: the image side is not a ViT; a spec cannot be rebuilt (names the flag to give).
        """
        from cmcr.pipeline.encoders import load_encoder
        from cmcr.trainer.connector import Connector

        conn = Connector.load(connector)
        clip_sides = [s for s, i in conn.sides.items()
                      if "image" in i.modalities and str(i.encoder.get("family")) == "open_clip"]
        if image_encoder is None:
            if not clip_sides:
                sides = ", ".join(f"{s}: {i.mcr} ({i.encoder.get('family')})" for s, i in conn.sides.items())
                raise ConnectorError(f"connector {connector} has no open_clip image side ({sides}); localisation "
                                     f"needs CLIP (an open_clip ViT) on one side")
            image_encoder = _spec_or_error(conn.sides[clip_sides[0]].encoder, "--image-encoder")
        img = load_encoder(image_encoder, device=device)
        side = conn.side_for(img.identity(), "image")
        other = "B" if side == "A" else "A"
        if query_encoder is None:
            query_encoder = _spec_or_error(conn.sides[other].encoder, "--audio-encoder")
        q = load_encoder(query_encoder, device=device, clap_tokenizer=clap_tokenizer)
        return cls(conn, img, q, size=size, path=path)

    # ------------------------------------------------------------------------------- queries
    def random_weights(self) -> list[dict[str, Any]]:
        from cmcr.trainer.evaluate import random_weight_identities

        encs = [self.image_encoder.identity()] + ([self.query_encoder.identity()] if self.query_encoder else [])
        return random_weight_identities(self.connector, *encs)

    def embed_query(self, path: str | os.PathLike, modality: str | None = None) -> np.ndarray:
        """A query file (audio) -> ``(D,)`` float32 unit row in the connected space.

        Raises:
            InputDataError: unreadable file, no encoder for its modality, or an embedding that is not finite.
        """
        from cmcr.service import modality_of_filename

        if self.query_encoder is None:
            raise InputDataError("this localiser has no query encoder; give the query as a connected-space row")
        mod = modality or modality_of_filename(str(path), hint="Pass --modality")
        if mod not in self.query_modalities:
            raise InputDataError(f"{path}: a {mod!r} query, but the query side embeds {self.query_modalities}")
        raw = self.query_encoder.encode(mod, [str(path)])
        if not np.all(np.isfinite(raw)):
            raise InputDataError(f"{path}: the encoder produced no valid embedding (empty or silent input?)")
        return self.connector.project(self.query_side, raw, identity=self.query_encoder.identity(), modality=mod)[0]

    def localize(self, image: str | os.PathLike, query: np.ndarray) -> LocalizationMap:
        """Heatmap of ``query`` (a connected-space row) over one image file.

        Raises:
            InputDataError / SampleError: the image cannot be read or decoded (names it).
        """
        return self.localize_many([image], query)[0]

    def localize_many(self, images: Sequence[str | os.PathLike], query: np.ndarray,
                      batch_size: int = 16) -> list[LocalizationMap]:
        """:meth:`localize` for several images, batched through the image tower (all must be readable)."""
        from cmcr.pipeline.encoders import collate_items
        from cmcr.trainer.localization import patch_scores, project_patches, upsample_heatmap

        enc = self.image_encoder
        ident = enc.identity()
        out: list[LocalizationMap] = []
        pooled_pre = enc.preprocessor("image")
        for start in range(0, len(images), batch_size):
            chunk = [Path(p) for p in images[start:start + batch_size]]
            items, infos, pooled = [], [], []
            for p in chunk:
                raw = _read_bytes(p)
                try:
                    x, info = self.pre(raw)
                    pooled.append(pooled_pre(raw)[0])
                except Exception as e:  # decoder errors of any kind name the file
                    raise InputDataError(f"image {p}: cannot be decoded ({e})") from e
                items.append(x)
                infos.append(info)
            dense = enc.dense_embed(collate_items(items), path=self.path)  # (B, h, w, D)
            z = project_patches(self.connector, self.image_side, dense, identity=ident)
            glob = self.connector.project(self.image_side, enc.embed("image", collate_items(pooled)),
                                          identity=ident, modality="image")
            for p, info, zp, g in zip(chunk, infos, z, glob, strict=True):
                grid = patch_scores(zp, query)
                heat = upsample_heatmap(grid, info["height"], info["width"])
                out.append(LocalizationMap(image=p, grid=grid, heatmap=heat, image_score=float(g @ query)))
        return out


def _spec_or_error(identity: dict[str, Any], flag: str) -> str:
    spec = spec_of_identity(identity)
    if spec is None:
        raise EncoderError(f"the connector side was trained on {identity.get('family')}:{identity.get('architecture')} "
                           f"weights from a checkpoint file ({identity.get('weights')}); give {flag} "
                           f"{identity.get('family')}:{identity.get('architecture')}@/path/to/that/file")
    return spec


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputDataError(f"image {path}: cannot be read ({e.strerror or e})") from e


# ---------------------------------------------------------------------------------- pictures
def overlay_png(image: str | os.PathLike, heatmap: np.ndarray, *, title: str = "", random_weights: bool = False,
                alpha: float = 0.5, max_side: int = 640) -> bytes:
    """A PNG: the original image, the heatmap over it in a colour map, and a colour bar (the legend) labelled
    with the score; a red banner when the weights were random.

    Args:
        image: the image file the heatmap belongs to (same size).
        heatmap: ``(H, W)`` float scores (cosine similarity).
        title: line above the picture (e.g. the query file).
        random_weights: print :data:`RANDOM_NOTE` on the picture.
        alpha: opacity of the colour map.
        max_side: the picture is drawn at most this many pixels on its long side.

    Returns:
        PNG bytes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from cmcr.pipeline.images import decode_image

    img = decode_image(Path(image).read_bytes())
    h = np.asarray(heatmap, np.float32)
    if h.shape != (img.height, img.width):
        raise InputDataError(f"heatmap {h.shape} does not match image {image} ({img.height}, {img.width})")
    scale = min(1.0, max_side / max(img.width, img.height))
    if scale < 1.0:
        from PIL import Image

        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC)
        h = np.asarray(Image.fromarray(h, mode="F").resize(size, Image.BILINEAR), np.float32)
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    dpi = 100
    fig = Figure(figsize=(img.width / dpi + 1.4, img.height / dpi + 0.5), dpi=dpi)
    ax = fig.add_subplot()
    ax.imshow(np.asarray(img))
    im = ax.imshow(h, cmap=COLORMAP, alpha=alpha, vmin=float(h.min()), vmax=float(h.max()) + 1e-6)
    ax.set_axis_off()
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    ax.plot([x], [y], marker="+", color="white", markersize=14, markeredgewidth=2)
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)  # as tall as the image
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label("cosine similarity to the query (connected space)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if random_weights:
        ax.text(0.5, 0.98, RANDOM_NOTE, transform=ax.transAxes, ha="center", va="top", color="red",
                fontsize=9, fontweight="bold",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "red"})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def output_name(image: Path, root: Path | None) -> str:
    """File-name stem of an image's outputs: its path under ``root`` with ``/`` as ``__`` (unique within a
    folder), else its stem."""
    if root is not None:
        try:
            rel = image.resolve().relative_to(root.resolve())
            return str(rel.with_suffix("")).replace(os.sep, "__")
        except ValueError:
            pass
    return image.stem


def write_outputs(m: LocalizationMap, out: Path, name: str, *, title: str = "",
                  random_weights: bool = False) -> dict[str, str]:
    """Write ``<name>.png`` (overlay) and ``<name>.npy`` (the ``(H, W)`` float32 heatmap) atomically; returns
    their paths."""
    from cmcr.stores.files import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    npy = out / f"{name}.npy"
    atomic_write_bytes(png, overlay_png(m.image, m.heatmap, title=title, random_weights=random_weights))
    buf = io.BytesIO()
    np.save(buf, m.heatmap.astype(np.float32), allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    return {"png": str(png), "npy": str(npy)}


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; extensions of :data:`cmcr.pipeline.images.IMAGE_EXTENSIONS`).

    Raises:
        InputDataError: not a folder, or no image in it.
    """
    from cmcr.pipeline.images import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise InputDataError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise InputDataError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def localize_images(loc: Localizer, images: Sequence[Path], query: np.ndarray, batch_size: int = 16,
                    ) -> tuple[list[LocalizationMap], list[dict[str, str]]]:
    """:meth:`Localizer.localize_many` where one bad image never stops the run: a failing batch is retried
    image by image, and the images that still fail are returned as ``{"image", "error"}`` rows."""
    maps: list[LocalizationMap] = []
    failures: list[dict[str, str]] = []
    from cmcr.errors import CmcrError

    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        try:
            maps += loc.localize_many(chunk, query, batch_size=batch_size)
            continue
        except CmcrError:
            pass
        for p in chunk:
            try:
                maps.append(loc.localize(p, query))
            except CmcrError as e:
                log.warning("skipping %s: %s", p, e)
                failures.append({"image": str(p), "error": str(e)})
    return maps, failures
