"""Metrics and annotation readers of the paper's other audio-visual tasks (issue 15, docs/tasks.md).

Pure numpy, no torch. Used by ``cmcr eval localization`` (sound-source localisation: cIoU and AUC
against box annotations) and ``cmcr eval counterfactual`` (matched vs mismatched (audio, image)
pairs: average precision and max-F1).

Localisation follows the public evaluation code of the literature:

* Senocak et al., "Learning to Localize Sound Source in Visual Scenes", CVPR 2018 (Flickr-SoundNet
  annotations, the consensus ground truth and the cIoU definition), and
* Chen et al., "Localizing Visual Sounds the Hard Way", CVPR 2021 (LVS; VGG-SS annotations) and its
  release ``hche11/Localizing-Visual-Sounds-the-Hard-Way`` (``utils.py``: ``Evaluator.cal_CIOU``,
  ``testset_gt``; ``test.py``), which EZ-VSL (Mo & Morgado, ECCV 2022, ``stoneMo/EZ-VSL``) and later
  work reuse unchanged.

Definitions (docs/tasks.md section "Metric definitions"):

* ground truth map ``g`` (H, W) in [0, 1]: each annotation box is rasterised to a 0/1 mask, the masks
  are summed, divided by the annotation's ``consensus`` and clipped at 1. Flickr-SoundNet (three
  annotators) uses consensus 2: a pixel counts fully when two annotators agree, half when only one
  does (LVS ``gt_map /= 2; gt_map[gt_map > 1] = 1``); VGG-SS (one annotator) uses consensus 1, the
  union of its boxes (``gt_map[gt_map > 0] = 1``).
* cIoU of one heatmap: the heatmap is min-max normalised to [0, 1]; ``A`` is the set of active
  pixels; ``cIoU = sum_{i in A} g_i / (sum_i g_i + |A \\ G|)`` with ``G = {i : g_i > 0}`` (LVS
  ``cal_CIOU``: ``sum(infer * gt) / (sum(gt) + sum(infer * (gt == 0)))``). ``A`` is either the pixels
  whose normalised value is >= a threshold tau (Senocak et al.'s ``A(tau)``, tau = 0.5 by default), or,
  with ``threshold="median"``, the pixels >= the median of the heatmap, i.e. the top half of the
  image (LVS / EZ-VSL ``test.py``; the protocol of the published VGG-SS and Flickr tables).
* reported "cIoU@0.5": the fraction of samples whose cIoU is >= 0.5 (what LVS prints as ``cIoU``
  and EZ-VSL calls ``AP50``); AUC: the area under that success rate as a function of the cIoU
  threshold t = 0, 0.05, ..., 1 (21 points, trapezoidal rule, as ``sklearn.metrics.auc`` in LVS).

Retrieval-style metrics (recall@k, mAP) and their chance levels live in :mod:`cmcr.trainer.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import InputDataError

log = logging.getLogger(__name__)

#: cIoU thresholds of the success curve integrated by :func:`localization_auc` (LVS: ``0.05 * i``, i < 21).
AUC_THRESHOLDS = tuple(0.05 * i for i in range(21))

#: The coordinate frame of the Flickr-SoundNet annotations: boxes are drawn on the frame resized to
#: 256 x 256 (LVS and EZ-VSL map them to their 224 input as ``int(224 * v / 256)``).
FLICKR_FRAME = (256.0, 256.0)

#: Flickr-SoundNet has three annotators per image; a pixel counts fully when two agree (Senocak et al. 2018).
FLICKR_CONSENSUS = 2


# --------------------------------------------------------------------------------------------- boxes


def _box_array(boxes: Any) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None, :]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) array of [x0, y0, x1, y1], got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes hold NaN or infinite coordinates")
    return b


def box_coverage(boxes: Any, height: int, width: int) -> np.ndarray:
    """How many of ``boxes`` cover each pixel.

    A pixel ``(row r, column c)`` is inside a box ``[x0, y0, x1, y1]`` when its centre
    ``(c + 0.5, r + 0.5)`` lies in ``[x0, x1) x [y0, y1)``; for integer coordinates this is exactly
    the slice ``[y0:y1, x0:x1]`` LVS and EZ-VSL fill. Boxes are clipped to the image.

    Args:
        boxes: ``(N, 4)`` float pixel ``[x0, y0, x1, y1]`` (``x`` to the right, ``y`` down), in the
            pixel coordinates of an ``height`` x ``width`` image.
        height, width: the image size in pixels.

    Returns:
        ``(height, width)`` int32 counts.

    Raises:
        ValueError: boxes not ``(N, 4)`` or not finite; non-positive image size.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    b = _box_array(boxes)
    out = np.zeros((height, width), dtype=np.int32)
    for x0, y0, x1, y1 in b:
        c0, c1 = (int(np.clip(math.ceil(v - 0.5), 0, width)) for v in (x0, x1))
        r0, r1 = (int(np.clip(math.ceil(v - 0.5), 0, height)) for v in (y0, y1))
        if c1 > c0 and r1 > r0:
            out[r0:r1, c0:c1] += 1
    return out


def boxes_to_mask(boxes: Any, height: int, width: int) -> np.ndarray:
    """The union of ``boxes`` as a ``(height, width)`` bool mask (pixel rule of :func:`box_coverage`).

    Args:
        boxes: ``(N, 4)`` float pixel ``[x0, y0, x1, y1]`` in the image's own pixel coordinates.

    Raises:
        ValueError: see :func:`box_coverage`.
    """
    return box_coverage(boxes, height, width) > 0


def consensus_map(boxes: Any, height: int, width: int, consensus: int = 1) -> np.ndarray:
    """The ground-truth map of several annotators' boxes: ``min(1, coverage / consensus)``.

    ``consensus=2`` is the Flickr-SoundNet rule (Senocak et al. 2018; LVS ``testset_gt``: three
    annotators, full weight where two agree, 0.5 where only one marked the pixel); ``consensus=1`` is
    the union (VGG-SS, one annotator).

    Returns:
        ``(height, width)`` float32 in [0, 1].
    """
    if consensus < 1:
        raise ValueError(f"consensus must be >= 1, got {consensus}")
    cov = box_coverage(boxes, height, width).astype(np.float32)
    return np.minimum(cov / float(consensus), 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------- localisation


def normalize_heatmap(heatmap: Any) -> np.ndarray:
    """Min-max normalise a heatmap to [0, 1] (LVS ``normalize_img``); a constant map becomes all zeros.

    Returns:
        float64 array of the input's shape.

    Raises:
        ValueError: NaN or infinite values.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    if not np.isfinite(h).all():
        raise ValueError("heatmap holds NaN or infinite values")
    lo, hi = float(h.min()), float(h.max())
    if hi - lo <= 0:
        return np.zeros_like(h)
    return (h - lo) / (hi - lo)


def active_pixels(heatmap: Any, threshold: float | str = 0.5) -> np.ndarray:
    """The set ``A`` of :func:`ciou`: bool ``(H, W)`` mask of the pixels a heatmap marks as the source.

    Args:
        heatmap: ``(H, W)`` float scores (any scale; min-max normalised here).
        threshold: a float tau in [0, 1] (pixels whose normalised value is >= tau; Senocak et al.
            2018), or ``"median"`` (pixels >= the value at sorted position ``floor(H * W / 2)``: the
            top half of the image, LVS / EZ-VSL ``test.py``).

    Raises:
        ValueError: ``threshold`` is neither a number in [0, 1] nor ``"median"``.
    """
    h = normalize_heatmap(heatmap)
    if isinstance(threshold, str):
        if threshold != "median":
            raise ValueError(f"threshold must be a number in [0, 1] or 'median', got {threshold!r}")
        flat = np.sort(h, axis=None)
        return h >= flat[int(flat.size * 0.5)]
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return h >= float(threshold)


def ciou(heatmap: Any, gt_mask: Any, threshold: float | str = 0.5) -> float:
    """Consensus intersection over union of one heatmap (Senocak et al., CVPR 2018, eq. 6; LVS
    ``Evaluator.cal_CIOU``).

    ``cIoU = sum_{i in A} g_i / (sum_i g_i + |{i in A : g_i = 0}|)``, where ``A`` is
    :func:`active_pixels` of the min-max normalised heatmap and ``g`` the ground-truth map.

    Args:
        heatmap: ``(H, W)`` float scores, higher = more likely the sound's source (any scale).
        gt_mask: ``(H, W)`` bool mask, or float consensus map in [0, 1]
            (:meth:`BoxAnnotation.gt_map`, :func:`consensus_map`).
        threshold: tau in [0, 1] on the normalised heatmap (default 0.5), or ``"median"`` (top half
            of the pixels; the protocol behind the published LVS / EZ-VSL numbers).

    Returns:
        cIoU in [0, 1]: 1 when ``A`` is exactly the annotated region of a 0/1 ground truth, 0 when
        ``A`` misses it entirely.

    Raises:
        ValueError: shapes differ or are not 2-D, values outside [0, 1] in ``gt_mask``, or the ground
            truth is empty (nothing annotated: cIoU is undefined).
    """
    h = np.asarray(heatmap)
    g = np.asarray(gt_mask, dtype=np.float64)
    if h.ndim != 2 or h.shape != g.shape:
        raise ValueError(f"heatmap {h.shape} and ground truth {g.shape} must be 2-D arrays of one shape")
    if not np.isfinite(g).all() or g.min(initial=0.0) < 0 or g.max(initial=0.0) > 1:
        raise ValueError("ground truth values must lie in [0, 1]")
    total = float(g.sum())
    if total <= 0:
        raise ValueError("the ground truth is empty (no annotated pixel): cIoU is undefined")
    a = active_pixels(h, threshold)
    return float(g[a].sum() / (total + np.count_nonzero(a & (g == 0))))


def _cious(cious: Sequence[float]) -> np.ndarray:
    c = np.asarray(cious, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("no cIoU values")
    if not np.isfinite(c).all():
        raise ValueError("cIoU values hold NaN or infinite entries")
    return c


def success_rate(cious: Sequence[float], at: float = 0.5) -> float:
    """Fraction of samples with cIoU >= ``at`` (the "cIoU@0.5" of LVS / EZ-VSL tables; EZ-VSL ``AP50``).

    Raises:
        ValueError: no values, or non-finite values.
    """
    return float(np.mean(_cious(cious) >= at))


def localization_auc(cious: Sequence[float]) -> float:
    """Area under the success-rate curve over cIoU thresholds ``t = 0, 0.05, ..., 1`` (LVS ``test.py``).

    ``success(t) = mean(ciou >= t)``, integrated by the trapezoidal rule over the 21 thresholds
    (``sklearn.metrics.auc`` in LVS); the t axis spans 1, so the AUC lies in [0, 1].

    Args:
        cious: one cIoU per sample.

    Returns:
        AUC in [0, 1].

    Raises:
        ValueError: no values, or non-finite values.
    """
    c = _cious(cious)
    t = np.asarray(AUC_THRESHOLDS)
    s = (c[None, :] >= t[:, None] - 1e-12).mean(axis=1)
    return float(np.sum((t[1:] - t[:-1]) * (s[1:] + s[:-1]) / 2.0))


def centre_prior(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """The chance-level heatmap: a centred Gaussian, knowing nothing of the sound or the image.

    ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` with ``dx = (c + 0.5) / width - 0.5`` and
    ``dy = (r + 0.5) / height - 0.5`` (offsets from the centre as fractions of the image's sides, so
    the prior is an ellipse of the image's aspect). Scored like any heatmap (:func:`ciou`), it is the
    baseline a localiser must beat: sources are usually near the centre of a frame. With
    ``threshold=0.5`` its active set is the central ellipse ``dx^2 + dy^2 <= 2 ln 2 sigma^2`` (about
    27 % of the image for sigma 0.25); with ``"median"`` the central half of the image.

    Returns:
        ``(height, width)`` float32, 1 at the centre.

    Raises:
        ValueError: non-positive size or sigma.
    """
    if height < 1 or width < 1 or sigma <= 0:
        raise ValueError(f"need height, width >= 1 and sigma > 0, got {height}, {width}, {sigma}")
    dy = (np.arange(height) + 0.5) / height - 0.5
    dx = (np.arange(width) + 0.5) / width - 0.5
    d2 = dy[:, None] ** 2 + dx[None, :] ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


# ------------------------------------------------------------------------------ binary scoring


def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if s.size == 0:
        raise ValueError("no scores")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1 (or bool)")
        y = y.astype(bool)
    if not y.any():
        raise ValueError("no positive label: average precision and F1 are undefined")
    return s, y


def _operating_points(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True / false positive counts when predicting ``score >= t`` for each distinct score t (descending)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last row of each run of tied scores
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1) - tp
    return tp, fp, s[last]


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision of ranking by ``scores``: ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct
    score thresholds, highest first (precision and recall when predicting ``score >= t``; tied scores
    enter together). The same definition as ``sklearn.metrics.average_precision_score``, no
    interpolation.

    Args:
        scores: ``(N,)`` float, higher = more likely positive (e.g. cosine of a pair).
        labels: ``(N,)`` 0/1 or bool, 1 = positive (a matched pair).

    Returns:
        AP in (0, 1]. Its chance level (random scores) is about the positive rate; the exact
        expectation for a random ranking is :func:`cmcr.trainer.metrics.chance_ap`.

    Raises:
        ValueError: lengths differ, empty input, non-finite scores, labels not 0/1, or no positive.
    """
    s, y = _binary(scores, labels)
    tp, fp, _ = _operating_points(s, y)
    precision = tp / (tp + fp)
    recall = tp / float(y.sum())
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def max_f1(scores: Any, labels: Any) -> tuple[float, float]:
    """The best F1 over all decision thresholds (predict positive when ``score >= threshold``).

    ``F1 = 2 TP / (2 TP + FP + FN)``, evaluated at every distinct score.

    Args:
        scores: ``(N,)`` float, higher = more likely positive.
        labels: ``(N,)`` 0/1 or bool.

    Returns:
        ``(f1, threshold)``: the maximum F1 in (0, 1] and the highest score threshold reaching it.
        Every scorer reaches at least ``2p / (1 + p)`` (p the positive rate) by calling everything
        positive, so that is the chance floor of max-F1 (:func:`max_f1_floor`).

    Raises:
        ValueError: see :func:`average_precision`.
    """
    s, y = _binary(scores, labels)
    tp, fp, thresholds = _operating_points(s, y)
    f1 = 2 * tp / (tp + fp + float(y.sum()))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def max_f1_floor(positive_rate: float) -> float:
    """``2p / (1 + p)``: the F1 of calling every pair positive, which max-F1 never falls below."""
    p = float(positive_rate)
    return 2 * p / (1 + p) if p > 0 else 0.0


def heatmap_confidence(heatmap: Any, top_fraction: float = 0.25) -> float:
    """How sure a heatmap is that the sound's source is in the image: the mean of its top
    ``top_fraction`` of pixel scores (SLAVC ``test.py``: the top quarter).

    The scores are taken as they are (e.g. patch cosines), *not* min-max normalised per image: SLAVC
    normalises by one fixed range for every image (``[-1/tau, 1/tau]``), which keeps the absolute level
    that tells a mismatched pair from a matched one.

    Args:
        heatmap: ``(H, W)`` float scores.
        top_fraction: share of the pixels averaged, in (0, 1].

    Raises:
        ValueError: empty or non-finite heatmap, or ``top_fraction`` outside (0, 1].
    """
    h = np.asarray(heatmap, dtype=np.float64).ravel()
    if h.size == 0 or not np.isfinite(h).all():
        raise ValueError("heatmap must be non-empty and finite")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    k = max(1, int(h.size * top_fraction))
    return float(np.sort(h)[-k:].mean())


def source_detection_metrics(confidences: Any, cious: Any, has_source: Any, *,
                             ciou_threshold: float = 0.5) -> dict[str, float]:
    """Localisation-aware AP and max-F1 of the *extended* benchmarks (Mo & Morgado, "A Closer Look at
    Weakly-Supervised Audio-Visual Source Localization", NeurIPS 2022 -- SLAVC, ``stoneMo/SLAVC``
    ``utils.EvaluatorFull``): Extended Flickr-SoundNet / Extended VGG-SS add pairs whose sound has no
    visible source (silent or off-screen objects, mismatched audio), and the C-MCR paper reports its
    counterfactual AP / max-F1 on them.

    At a confidence threshold t, a pair is a true positive when ``confidence >= t``, it has a visible
    source and its cIoU >= ``ciou_threshold``; a false positive when ``confidence >= t`` and it has no
    source or is mislocalised; a false negative when it has a source and ``confidence < t`` (SLAVC's
    counting: a mislocalised detection is a false positive, not also a false negative). Precision is 1
    where nothing is detected, recall 1 where nothing is to be found.

    Differences from SLAVC's code, all towards the exact curve: every distinct confidence is a
    threshold (SLAVC subsamples to about 200 for AP and 10 for F1), and AP is the all-point
    interpolated area ``sum_k (r_k - r_{k-1}) max_{j >= k} p_j`` from recall 0 (SLAVC starts at its
    second-highest confidence).

    Args:
        confidences: ``(N,)`` float, e.g. :func:`heatmap_confidence` of each pair's heatmap.
        cious: ``(N,)`` float cIoU of each pair (ignored where ``has_source`` is False).
        has_source: ``(N,)`` bool/0-1, False for pairs with no visible source (no boxes).

    Returns:
        ``{"AP", "max_F1", "threshold", "pairs", "with_source"}``.

    Raises:
        ValueError: lengths differ, empty or non-finite input, or no pair with a source.
    """
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    c = np.asarray(cious, dtype=np.float64).ravel()
    has = np.asarray(has_source).ravel().astype(bool)
    if not (conf.shape == c.shape == has.shape) or conf.size == 0:
        raise ValueError(f"need equally long non-empty inputs, got {conf.size}, {c.size}, {has.size}")
    if not np.isfinite(conf).all() or not np.isfinite(c[has]).all():
        raise ValueError("confidences / cIoUs hold NaN or infinite values")
    if not has.any():
        raise ValueError("no pair has a visible source: AP and F1 are undefined")
    good = has & (np.where(has, c, 0.0) >= ciou_threshold)
    order = np.argsort(-conf, kind="mergesort")
    conf_s, good_s, has_s = conf[order], good[order], has[order]
    last = np.r_[np.flatnonzero(np.diff(conf_s)), conf_s.size - 1]
    detected = (last + 1).astype(np.float64)
    tp = np.cumsum(good_s)[last].astype(np.float64)
    fp = detected - tp
    fn = float(has.sum()) - np.cumsum(has_s)[last]
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 1.0)
    interp = np.maximum.accumulate(precision[::-1])[::-1]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * interp))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return {"AP": ap, "max_F1": float(f1[best]), "threshold": float(conf_s[last][best]), "pairs": int(conf.size),
            "with_source": int(has.sum())}


# --------------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class BoxAnnotation:
    """The source boxes of one image.

    Attributes:
        boxes: ``(N, 4)`` float64 ``[x0, y0, x1, y1]`` in the coordinate ``frame``; every box counts as
            one annotator's vote (Flickr-SoundNet: one box per annotator, three annotators).
        frame: ``(width, height)`` of the frame the coordinates refer to: ``(1.0, 1.0)`` for fractions
            of the image's sides (VGG-SS), ``(256.0, 256.0)`` for Flickr-SoundNet, the image's size
            when the file gives it, or ``None`` when the coordinates are the image's own pixels (cmcr
            CSV without width/height).
        consensus: votes a pixel needs for full weight in the ground truth (:func:`consensus_map`).
        label: the class name when the file gives one (VGG-SS ``class``), else ``None``.
        source: file (and entry) it was read from, for messages.
    """

    boxes: np.ndarray
    frame: tuple[float, float] | None = None
    consensus: int = 1
    label: str | None = None
    source: str = ""

    def pixel_boxes(self, height: int, width: int) -> np.ndarray:
        """The boxes in the pixel coordinates of an ``height`` x ``width`` image: ``(N, 4)`` float64.

        Raises:
            InputDataError: the coordinates are the image's own pixels (``frame is None``) and a box
                lies wholly outside the image (a wrong image or a wrong annotation file).
        """
        b = self.boxes.copy()
        if self.frame is not None:
            fw, fh = self.frame
            b[:, [0, 2]] *= width / fw
            b[:, [1, 3]] *= height / fh
        elif len(b) and ((b[:, 0] >= width) | (b[:, 1] >= height)).all():
            raise InputDataError(f"{self.source}: every box starts outside the {width}x{height} image (boxes in "
                                 f"pixels of another image size? give width/height columns for their frame)")
        return b

    def gt_map(self, height: int, width: int) -> np.ndarray:
        """The ground-truth map on an ``height`` x ``width`` image: ``(H, W)`` float32 in [0, 1]
        (:func:`consensus_map` of :meth:`pixel_boxes`)."""
        return consensus_map(self.pixel_boxes(height, width), height, width, self.consensus)


def _number(value: Any, where: str, field: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputDataError(f"{where}: {field} is {value!r}, expected a number") from None
    if not math.isfinite(v):
        raise InputDataError(f"{where}: {field} is {value!r}, expected a finite number")
    return v


def _check_box(box: Sequence[float], where: str) -> list[float]:
    if len(box) != 4:
        raise InputDataError(f"{where}: a box needs 4 numbers [x0, y0, x1, y1], got {list(box)!r}")
    x0, y0, x1, y1 = (_number(v, where, f"coordinate {i}") for i, v in enumerate(box))
    if not (x1 > x0 and y1 > y0):
        raise InputDataError(f"{where}: box {[x0, y0, x1, y1]} is empty or inverted (need x0 < x1 and y0 < y1, "
                             f"order [x0, y0, x1, y1])")
    return [x0, y0, x1, y1]


class _Collector:
    """Adds entries to the result; in non-strict mode logs and skips a malformed one."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.out: dict[str, BoxAnnotation] = {}
        self.skipped = 0

    def add(self, key: str, ann: BoxAnnotation) -> None:
        if key in self.out:
            raise InputDataError(f"{ann.source}: key {key!r} appears twice (first at {self.out[key].source})")
        self.out[key] = ann

    def fail(self, err: InputDataError) -> None:
        if self.strict:
            raise err
        self.skipped += 1
        log.warning("skipped an annotation: %s", err)


def _read_json(path: Path, col: _Collector) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    try:
        if path.suffix.lower() == ".jsonl":
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputDataError(f"{path}: invalid JSON ({e}); expected the VGG-SS layout, a list of "
                             f'{{"file": ..., "bbox": [[x0, y0, x1, y1], ...]}}') from e
    if isinstance(doc, dict):  # {key: [[x0, y0, x1, y1], ...]} (fractions)
        doc = [{"file": k, "bbox": v} for k, v in doc.items()]
    if not isinstance(doc, list):
        raise InputDataError(f"{path}: expected a JSON list of entries (VGG-SS layout) or an object mapping keys "
                             f"to box lists, found {type(doc).__name__}")
    for i, entry in enumerate(doc):
        where = f"{path} entry {i}"
        try:
            if not isinstance(entry, dict):
                raise InputDataError(f"{where}: expected an object with 'file' and 'bbox', found {entry!r:.80}")
            key = entry.get("file", entry.get("key"))
            boxes = entry.get("bbox", entry.get("boxes"))
            if key is None or boxes is None:
                raise InputDataError(f"{where}: needs 'file' (or 'key') and 'bbox' (or 'boxes'); has "
                                     f"{sorted(entry)}")
            if not isinstance(boxes, list):
                raise InputDataError(f"{where}: 'bbox' must be a list of [x0, y0, x1, y1], found {boxes!r:.80}")
            if boxes and not isinstance(boxes[0], list):
                boxes = [boxes]  # one box given flat
            b = np.array([_check_box(bx if isinstance(bx, list) else [bx], f"{where} box {j}")
                          for j, bx in enumerate(boxes)], dtype=np.float64).reshape(-1, 4)
            if "width" in entry or "height" in entry:
                frame = (_number(entry.get("width"), where, "width"), _number(entry.get("height"), where, "height"))
                if min(frame) <= 0:
                    raise InputDataError(f"{where}: width/height must be positive, got {frame}")
            else:
                if len(b) and b.max() > 1.5:  # a little beyond 1 is VGG-SS's own slack (clipped below)
                    raise InputDataError(f"{where}: coordinates above 1 ({b.max():g}) but no width/height: VGG-SS "
                                         f"boxes are fractions of the image's sides; give 'width' and 'height' for "
                                         f"pixel boxes")
                frame = (1.0, 1.0)
                b = np.clip(b, 0.0, 1.0)  # VGG-SS has slightly negative corners (LVS: max(x, 0))
            if not len(b):
                raise InputDataError(f"{where}: no box")
            label = entry.get("class", entry.get("label"))
            consensus = int(_number(entry.get("consensus", 1), where, "consensus"))
            col.add(str(key), BoxAnnotation(b, frame, max(consensus, 1), None if label is None else str(label), where))
        except InputDataError as e:
            col.fail(e)


_COORD_NAMES = (("xmin", "ymin", "xmax", "ymax"), ("x0", "y0", "x1", "y1"))


def _read_xml(path: Path, col: _Collector) -> None:
    """One Flickr-SoundNet (or PASCAL VOC) XML file: key = file stem."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputDataError(f"{path}: not a readable XML annotation ({e})") from e
    frame: tuple[float, float] | None = None
    consensus = FLICKR_CONSENSUS
    size = root.find(".//size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        frame = (_number(size.findtext("width"), str(path), "size/width"),
                 _number(size.findtext("height"), str(path), "size/height"))
        consensus = 1  # PASCAL VOC layout: pixel boxes of one annotator
    boxes = []
    for j, el in enumerate(e for e in root.iter() if e.tag.lower() in ("bbox", "bndbox")):
        where = f"{path} box {j}"
        named = {c.tag.lower(): c.text for c in el}
        for names in _COORD_NAMES:
            if all(n in named for n in names):
                values = [named[n] for n in names]
                break
        else:
            # Flickr-SoundNet: <bbox> holds an id and then xmin, ymin, xmax, ymax (LVS skips the first child)
            values = [c.text for c in el]
            values = values[1:] if len(values) == 5 else values
        boxes.append(_check_box(values, where))
    if not boxes:
        raise InputDataError(f"{path}: no <bbox> (or <bndbox>) element")
    col.add(path.stem, BoxAnnotation(np.array(boxes, dtype=np.float64), frame or FLICKR_FRAME, consensus, None,
                                     str(path)))


def _read_csv(path: Path, col: _Collector) -> None:
    """The cmcr CSV (docs/tasks.md): one box per row, ``key,x0,y0,x1,y1`` [+ ``width,height,label,consensus``]."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputDataError(f"{path}: cannot be read ({e})") from e
    with f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        reader.fieldnames = fields
        key_col = next((c for c in ("key", "file", "image") if c in fields), None)
        coords = next((names for names in _COORD_NAMES if all(n in fields for n in names)), None)
        if key_col is None or coords is None:
            raise InputDataError(f"{path}: a box CSV needs a header with key,x0,y0,x1,y1 (or file/image and "
                                 f"xmin,ymin,xmax,ymax); found {fields}")
        rows: dict[str, list[tuple[list[float], tuple[float, float] | None, str | None, int, str]]] = {}
        bad_keys: set[str] = set()
        try:
            for n, row in enumerate(reader, start=2):
                where = f"{path} row {n}"
                key = (row.get(key_col) or "").strip()
                try:
                    if not key:
                        raise InputDataError(f"{where}: empty {key_col}")
                    box = _check_box([row.get(c) for c in coords], where)
                    w, h = (row.get("width") or "").strip(), (row.get("height") or "").strip()
                    frame = None
                    if w or h:
                        frame = (_number(w, where, "width"), _number(h, where, "height"))
                        if min(frame) <= 0:
                            raise InputDataError(f"{where}: width/height must be positive, got {frame}")
                    label = (row.get("label") or "").strip() or None
                    cons = (row.get("consensus") or "").strip()
                    consensus = int(_number(cons, where, "consensus")) if cons else 1
                    if consensus < 1:
                        raise InputDataError(f"{where}: consensus must be >= 1, got {consensus}")
                    prev = rows.get(key)
                    if prev and (prev[0][1] != frame or prev[0][3] != consensus):
                        raise InputDataError(f"{where}: width/height/consensus differ from the first row of key "
                                             f"{key!r} ({prev[0][4]})")
                    rows.setdefault(key, []).append((box, frame, label, consensus, where))
                except InputDataError as e:
                    bad_keys.add(key)
                    col.fail(e)
        except csv.Error as e:
            raise InputDataError(f"{path}: malformed CSV ({e})") from e
    for key, entries in rows.items():
        if key in bad_keys:  # non-strict: a key with a bad row is dropped whole (a partial ground truth is wrong)
            continue
        _, frame, label, consensus, where = entries[0]
        col.add(key, BoxAnnotation(np.array([e[0] for e in entries], dtype=np.float64), frame, consensus,
                                   next((e[2] for e in entries if e[2]), label), where))


def read_box_annotations(path: str | os.PathLike, *, strict: bool = True) -> dict[str, BoxAnnotation]:
    """Read source-box annotations, keyed by sample key / image file stem.

    Accepted layouts (docs/tasks.md, "Annotation formats"):

    * **VGG-SS JSON** (``metadata/vggss.json`` of the LVS release): a list of
      ``{"file": key, "class": name, "bbox": [[x0, y0, x1, y1], ...]}``, coordinates as fractions of
      the image's sides (clipped to [0, 1] as LVS does), union of the boxes. Also ``.jsonl`` (one
      entry per line), ``key``/``boxes``/``label`` as synonyms, an object ``{key: [[...], ...]}``, and
      per-entry ``width``/``height`` for pixel coordinates in that frame.
    * **Flickr-SoundNet XML**: a folder of ``<stem>.xml`` files (or one file), every ``<bbox>`` one
      annotator's box as ``xmin, ymin, xmax, ymax`` (named children, or an id child followed by four
      numbers as in Senocak et al.'s release) in the 256 x 256 frame, consensus 2 (two of three
      annotators). A file with ``<size><width>/<height>`` (PASCAL VOC) is read in that pixel frame
      with consensus 1.
    * **cmcr CSV**: header ``key,x0,y0,x1,y1`` (``file``/``image`` and ``xmin,ymin,xmax,ymax``
      accepted), one box per row, several rows per key; optional ``width,height`` (the frame of the
      coordinates; ``1,1`` = fractions; absent = the image's own pixels), ``label``, ``consensus``.

    Args:
        path: a ``.json``/``.jsonl`` file, a ``.csv`` file, an ``.xml`` file or a folder of ``.xml`` files.
        strict: raise on the first malformed entry (default); if False, log a warning per malformed entry
            and skip it (a CSV key with one bad row is dropped whole).

    Returns:
        ``{key: BoxAnnotation}``; convert to an image's pixels with :meth:`BoxAnnotation.pixel_boxes` and
        build the ground truth with :meth:`BoxAnnotation.gt_map`.

    Raises:
        InputDataError: the path is missing or of an unknown layout, or (strict) an entry is malformed;
            the message names the file and the entry / row / box, and what was expected.
    """
    p = Path(path)
    col = _Collector(strict)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".xml")
        if not files:
            raise InputDataError(f"{p}: folder holds no .xml annotation file (Flickr-SoundNet layout: one "
                                 f"<stem>.xml per image)")
        for f in files:
            try:
                _read_xml(f, col)
            except InputDataError as e:
                col.fail(e)
    elif not p.exists():
        raise InputDataError(f"{p}: annotation file not found")
    else:
        suffix = p.suffix.lower()
        if suffix in (".json", ".jsonl"):
            _read_json(p, col)
        elif suffix == ".csv":
            _read_csv(p, col)
        elif suffix == ".xml":
            _read_xml(p, col)
        else:
            raise InputDataError(f"{p}: unknown annotation layout {suffix!r}; give a VGG-SS .json, a cmcr .csv, or "
                                 f"a Flickr-SoundNet .xml file or folder (docs/tasks.md)")
    if not col.out:
        raise InputDataError(f"{p}: no usable annotation" + (f" ({col.skipped} malformed entries skipped)"
                                                             if col.skipped else ""))
    if col.skipped:
        log.warning("%s: %d malformed annotation entries skipped", p, col.skipped)
    return col.out
