"""Audio-visual source localisation in the connected space (C-MCR paper, section 4.2, task 2).

An image's dense patch embeddings (CLIP joint space, one per ViT patch: MaskCLIP's value path, see
:func:`cmcr.pipeline.openclip_encoder.maskclip_patch_embeddings`) are projected by the connector's CLIP
side like any image embedding; each projected patch is scored against the projected audio by cosine
similarity; the ``(h, w)`` score grid is upsampled to the image's own size. The heatmap's maximum is
where the connected space puts the sound's source.

This module holds the maths on given arrays (no encoder is loaded): :func:`project_patches`,
:func:`patch_scores`, :func:`upsample_heatmap`, :func:`heatmap_summary`, and the evaluation against
box annotations :func:`evaluate_heatmaps` (metrics from :mod:`cmcr.trainer.tasks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cmcr.errors import InputDataError
from cmcr.trainer.connector import Connector


def project_patches(connector: Connector, side: str, patches: np.ndarray, *, identity: Mapping[str, Any],
                    modality: str = "image") -> np.ndarray:
    """Project dense patch embeddings with one connector side.

    Args:
        connector: the connector.
        side: its side holding the image encoder (``"A"`` or ``"B"``).
        patches: ``(B, h, w, D_in)`` or ``(h, w, D_in)`` float32, unit rows of the side's encoder.
        identity: encoder identity of the patches (checked against the side, as for any embedding).
        modality: ``"image"``.

    Returns:
        ``(B, h, w, D_out)`` (or ``(h, w, D_out)``) float32 unit rows in the connected space.

    Raises:
        ConnectorError: the side does not accept this encoder, modality or dim.
    """
    p = np.asarray(patches, np.float32)
    flat = p.reshape(-1, p.shape[-1])
    z = connector.project(side, flat, identity=identity, modality=modality)
    return z.reshape(*p.shape[:-1], z.shape[-1])


def patch_scores(patches: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of every patch with the query.

    Args:
        patches: ``(..., h, w, D)`` float array (any norms; rows are normalised here).
        query: ``(D,)`` float array (normalised here).

    Returns:
        ``(..., h, w)`` float32 cosine similarities in ``[-1, 1]``.

    Raises:
        InputDataError: the widths differ or the query is all zeros.
    """
    p = np.asarray(patches, np.float32)
    q = np.asarray(query, np.float32).reshape(-1)
    if p.shape[-1] != q.shape[0]:
        raise InputDataError(f"patch embeddings have width {p.shape[-1]}, the query {q.shape[0]}: they are not in "
                             f"the same space")
    qn = float(np.linalg.norm(q))
    if not np.isfinite(qn) or qn == 0.0:
        raise InputDataError("the query embedding is zero or not finite (empty or silent input?)")
    pn = np.linalg.norm(p, axis=-1).clip(min=1e-12)
    return ((p @ (q / qn)) / pn).astype(np.float32)


def upsample_heatmap(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a patch-score grid to the image size.

    The grid covers the whole image (the dense preprocessing resizes the image without cropping), so patch
    ``(i, j)`` has its centre at pixel ``((j + 0.5) * width / w, (i + 0.5) * height / h)`` (half-pixel
    centres, ``align_corners=False``); beyond the outer centres values are held constant.

    Args:
        grid: ``(h, w)`` float scores.
        height, width: the image size in pixels.

    Returns:
        ``(height, width)`` float32.
    """
    import torch
    import torch.nn.functional as F

    g = np.asarray(grid, np.float32)
    if g.ndim != 2:
        raise InputDataError(f"a score grid is (h, w), got shape {g.shape}")
    if height < 1 or width < 1:
        raise InputDataError(f"image size must be positive, got {width}x{height}")
    t = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    return F.interpolate(t, size=(int(height), int(width)), mode="bilinear",
                         align_corners=False)[0, 0].numpy().astype(np.float32)


def heatmap_summary(heatmap: np.ndarray, grid: np.ndarray | None = None) -> dict[str, Any]:
    """JSON-ready facts of one heatmap: size, min/max/mean score, peak pixel ``(x, y)``, and the peak patch
    ``(row, col)`` of the grid when given."""
    h = np.asarray(heatmap, np.float32)
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    out: dict[str, Any] = {"height": int(h.shape[0]), "width": int(h.shape[1]), "min": float(h.min()),
                           "max": float(h.max()), "mean": float(h.mean()), "peak_xy": [int(x), int(y)]}
    if grid is not None:
        g = np.asarray(grid)
        r, c = np.unravel_index(int(np.argmax(g)), g.shape)
        out["grid"] = [int(g.shape[0]), int(g.shape[1])]
        out["peak_patch"] = [int(r), int(c)]
    return out


def evaluate_heatmaps(heatmaps: Mapping[str, np.ndarray], annotations: Mapping[str, Any], *,
                      threshold: float | str = 0.5) -> dict[str, Any]:
    """Score heatmaps against box annotations: cIoU per sample, cIoU@0.5 (success rate), AUC, with the
    centre prior scored the same way as the chance level (metrics: :mod:`cmcr.trainer.tasks`).

    Args:
        heatmaps: ``{key: (H, W) float heatmap}`` at each image's own size.
        annotations: ``{key: BoxAnnotation}`` (:func:`cmcr.trainer.tasks.read_box_annotations`).
        threshold: tau of the active set (0.5, Senocak et al.) or ``"median"`` (LVS / EZ-VSL protocol).

    Returns:
        ``{"pairs", "pool", "threshold", "cIoU@0.5", "mean_cIoU", "AUC", "chance": {same three for the
        centre prior}, "per_sample": [...], "per_class": [...] (when labels exist), "not_annotated":
        [keys], "annotated_without_heatmap": count}``. ``pool`` is the number of scored (image, audio)
        pairs; each sample's ground truth is its own boxes.

    Raises:
        InputDataError: no heatmap has an annotation (keys differ: names a few of each).
    """
    from cmcr.trainer.tasks import centre_prior, ciou, localization_auc, success_rate

    keys = [k for k in heatmaps if k in annotations]
    if not keys:
        raise InputDataError(
            f"no heatmap key matches an annotation key (heatmaps: {', '.join(list(heatmaps)[:3]) or 'none'}...; "
            f"annotations: {', '.join(list(annotations)[:3])}...); keys are image file stems / sample keys")
    rows = []
    for k in keys:
        h = np.asarray(heatmaps[k], np.float32)
        ann = annotations[k]
        H, W = h.shape
        gt = ann.gt_map(H, W)
        rows.append({"key": k, "label": ann.label, "cIoU": ciou(h, gt, threshold),
                     "centre_cIoU": ciou(centre_prior(H, W), gt, threshold), "height": H, "width": W})

    def block(vals: list[float]) -> dict[str, float]:
        return {"cIoU@0.5": success_rate(vals, 0.5), "mean_cIoU": float(np.mean(vals)), "AUC": localization_auc(vals)}

    ours = block([r["cIoU"] for r in rows])
    report: dict[str, Any] = {"pairs": len(rows), "pool": len(rows), "threshold": threshold, **ours,
                              "chance": block([r["centre_cIoU"] for r in rows]),
                              "chance_method": "centre prior (centred Gaussian, sigma 0.25 of the sides)"}
    labels = sorted({r["label"] for r in rows if r["label"]})
    if labels:
        report["per_class"] = [{"label": lab, "pairs": len(sel), **block([r["cIoU"] for r in sel]),
                                "chance_cIoU@0.5": block([r["centre_cIoU"] for r in sel])["cIoU@0.5"]}
                               for lab in labels for sel in [[r for r in rows if r["label"] == lab]]]
    report["per_sample"] = rows
    report["not_annotated"] = [k for k in heatmaps if k not in annotations]
    report["annotated_without_heatmap"] = sum(1 for k in annotations if k not in heatmaps)
    return report
