"""`cmcr demo --release`: the C-MCR authors' own demo, reproduced with cmcr.

The authors' ``inference.py`` (MCR-PEFT/C-MCR) encodes three items — a toilet, a BBQ, a train:
an image, a caption ("a toilet", "BBQ", "a train"), a 10 s 32 kHz audio clip and a point cloud
each — projects them with their two released connectors and prints ``softmax(10 · cos)`` between
modalities (rows and columns in the order toilet, BBQ, train). This module does the same with
cmcr's encoders and the imported connectors (:mod:`cmcr.trainer.release`), and prints each matrix
next to the authors' numbers (:data:`AUTHORS`).

Structure: :func:`release_matrix` computes one matrix given the connector and the encoders, so
each matrix is one call; a matrix whose encoder is missing (e.g. the ``ulip`` family in a build
without it) is reported as not available with the reason, the others still run.

Weights: pretrained where they can be had (``--clip``/``--clap``/``--ulip`` specs, caches, downloads);
otherwise random-init encoders of the same architectures, with the random-weights banner. The
ULIP-CLIP connector is the released file shipped in ``cmcr/data/release``; the CLAP-CLIP one
(8.45 MB, not shipped) is read from ``--clap-clip FILE``, or replaced by a random stand-in of the
same layout (flagged not meaningful). The connectors' sides are bound to the encoders the demo
loaded; a note says when those are not the weights the heads were trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel

from cmcr.errors import CmcrError
from cmcr.stores.files import atomic_write_json

log = logging.getLogger(__name__)

RELEASE_DATA = Path(__file__).resolve().parent / "data" / "release"
ITEMS = ("toilet", "BBQ", "train")
TEXTS = ("a toilet", "BBQ", "a train")
#: Encoder specs: the weights the released heads were trained on, and the fast (tiny, random, 512-d) ones.
DEFAULT_SPECS = {"clip": "open_clip:ViT-B-32", "clap": "clap:HTSAT-tiny-fusion", "ulip": "ulip:PointBERT"}
FAST_SPECS = {"clip": "open_clip:cmcr-tiny-clip-512@random", "clap": "clap:cmcr-tiny-clap-512@random",
              "ulip": "ulip:cmcr-tiny-ulip-512@random"}
MODALITY_NAMES = {"image": "Vision", "text": "Text", "audio": "Audio", "3d": "3D"}
#: (connector, rows (mcr, modality), columns (mcr, modality)) in the authors' order.
MATRICES = (
    ("CLAP_CLIP", ("clip", "image"), ("clip", "text")),
    ("CLAP_CLIP", ("clap", "audio"), ("clip", "text")),
    ("CLAP_CLIP", ("clap", "audio"), ("clip", "image")),
    ("ULIP_CLIP", ("clip", "image"), ("clip", "text")),
    ("ULIP_CLIP", ("ulip", "3d"), ("clip", "image")),
    ("ULIP_CLIP", ("ulip", "3d"), ("clip", "text")),
)
#: The authors' printed output (their README / inference.py), rows and columns toilet, BBQ, train.
AUTHORS = {
    ("CLAP_CLIP", "Vision x Text"): [[0.9681, 0.0219, 0.0100], [0.0403, 0.9398, 0.0199], [0.0045, 0.0044, 0.9910]],
    ("CLAP_CLIP", "Audio x Text"): [[0.9937, 0.0028, 0.0035], [0.0337, 0.9434, 0.0229], [0.0813, 0.0253, 0.8934]],
    ("CLAP_CLIP", "Audio x Vision"): [[0.9712, 0.0079, 0.0208], [0.0628, 0.8966, 0.0406], [0.0322, 0.0062, 0.9616]],
    ("ULIP_CLIP", "Vision x Text"): [[0.7340, 0.1593, 0.1067], [0.2001, 0.5995, 0.2005], [0.1622, 0.1835, 0.6542]],
    ("ULIP_CLIP", "3D x Vision"): [[0.6783, 0.1781, 0.1436], [0.1193, 0.7866, 0.0941], [0.1319, 0.2170, 0.6512]],
    ("ULIP_CLIP", "3D x Text"): [[0.7448, 0.1236, 0.1316], [0.2459, 0.5625, 0.1916], [0.2007, 0.2648, 0.5346]],
}
RELEASED_DIM = 512
PRESET_OF = {"CLAP_CLIP": ("clap_clip", "clap"), "ULIP_CLIP": ("ulip_clip", "ulip")}


@dataclass
class ReleaseDemoOptions:
    """Options of :func:`run_release_demo` (flags of ``cmcr demo --release``).

    Attributes:
        out: output folder; the demo owns ``<out>/release`` (imported connectors, ``release.json``).
        fast: tiny random-init 512-d encoders (seconds; for tests).
        clip, clap, ulip: encoder specs (``None``: :data:`DEFAULT_SPECS`, or :data:`FAST_SPECS` with ``fast``).
        clap_tokenizer: RoBERTa tokenizer folder for a real CLAP checkpoint.
        clap_clip: the released ``clap_clip.pt`` (``None``: a random stand-in, flagged).
        ulip_clip: the released ``ulip_clip.pt`` (``None``: the copy shipped in ``cmcr/data/release``).
        device: ``auto``, ``cpu``, ``cuda``...
    """

    out: Path = Path("demo-out")
    fast: bool = False
    clip: str | None = None
    clap: str | None = None
    ulip: str | None = None
    clap_tokenizer: str | None = None
    clap_clip: Path | None = None
    ulip_clip: Path | None = None
    device: str = "auto"


def release_inputs(modality: str, data: Path = RELEASE_DATA) -> list[str]:
    """The three demo inputs of one modality, in the order toilet, BBQ, train: file paths (image: JPEG,
    audio: 32 kHz WAV, 3d: the release clouds bundled with the sample data, ``(10000, 6)`` float32 ``.npy``
    xyz + rgb — ULIP-2 reads the xyz) or the captions (text)."""
    if modality == "text":
        return list(TEXTS)
    if modality == "3d":
        from cmcr.demo import SAMPLE_DATA

        return [str(SAMPLE_DATA / "3d" / item.lower() / f"{item}_xyzrgb.npy") for item in ITEMS]
    suffix = {"image": ".jpeg", "audio": ".wav"}[modality]
    return [str(data / "assets" / f"{item}{suffix}") for item in ITEMS]


def softmax_matrix(rows: np.ndarray, cols: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """``softmax(scale · rows @ colsᵀ)`` over columns, as the authors print it.

    Args:
        rows, cols: ``(3, D)`` unit rows (projected embeddings).

    Returns:
        ``(3, 3)`` float64, each row summing to 1.
    """
    logits = scale * np.asarray(rows, np.float64) @ np.asarray(cols, np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def project_items(connector, encoder, modality: str, inputs: list[str]) -> np.ndarray:  # noqa: ANN001
    """Encode the inputs with ``encoder`` and project them by the connector side that accepts the encoder.

    Returns:
        ``(len(inputs), out_dim)`` float32 unit rows.

    Raises:
        CmcrError: an input cannot be read, or no side of the connector accepts the encoder.
    """
    raw = encoder.encode(modality, inputs)
    identity = encoder.identity()
    side = connector.side_for(identity, modality)
    return connector.project(side, raw, identity=identity, modality=modality)


def matrix_title(rows: tuple[str, str], cols: tuple[str, str]) -> str:
    """``"Audio x Text"`` for rows audio, columns text."""
    return f"{MODALITY_NAMES[rows[1]]} x {MODALITY_NAMES[cols[1]]}"


def release_matrix(connector, encoders: Mapping[str, Any], rows: tuple[str, str], cols: tuple[str, str],  # noqa: ANN001
                   data: Path = RELEASE_DATA) -> np.ndarray:
    """One of the authors' matrices: rows and columns are ``(mcr, modality)`` pairs, e.g.
    ``("clap", "audio")`` x ``("clip", "text")``; ``encoders`` maps MCR names to loaded encoders.

    Returns:
        ``(3, 3)`` ``softmax(10 · cos)`` (rows and columns toilet, BBQ, train).

    Raises:
        KeyError: an encoder for ``rows`` or ``cols`` is missing from ``encoders``.
        CmcrError: encoding or projection failed.
    """
    z_rows = project_items(connector, encoders[rows[0]], rows[1], release_inputs(rows[1], data))
    z_cols = project_items(connector, encoders[cols[0]], cols[1], release_inputs(cols[1], data))
    return softmax_matrix(z_rows, z_cols)


def load_release_encoders(opts: ReleaseDemoOptions, notes: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Load the CLIP, CLAP and ULIP encoders; a missing pretrained model falls back to random init (noted),
    a family this build does not have is left out (``unavailable[mcr]`` says why).

    Returns:
        ``(encoders by MCR name, unavailable: MCR name -> reason)``.
    """
    from cmcr.demo import _first_line, load_or_random
    from cmcr.pipeline.encoders import parse_spec

    given = {"clip": opts.clip, "clap": opts.clap, "ulip": opts.ulip}
    specs = {m: given[m] or (FAST_SPECS if opts.fast else DEFAULT_SPECS)[m] for m in given}
    encoders: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for mcr, spec in specs.items():
        try:
            parse_spec(spec)
        except CmcrError as e:  # e.g. a family this build does not have
            unavailable[mcr] = f"encoder {spec!r} not available ({_first_line(e)})"
            continue
        try:
            encoders[mcr] = load_or_random(mcr, spec, notes, device=opts.device, clap_tokenizer=opts.clap_tokenizer,
                                           no_hub_fallback=mcr == "ulip")
        except CmcrError as e:
            unavailable[mcr] = f"encoder {spec!r} cannot be loaded ({_first_line(e)})"
        if mcr in encoders and encoders[mcr].dim != RELEASED_DIM:
            unavailable[mcr] = (f"encoder {spec!r} embeds {encoders.pop(mcr).dim}-d rows; the released heads take "
                                f"{RELEASED_DIM}-d")
    return encoders, unavailable


def import_release_connectors(opts: ReleaseDemoOptions, encoders: Mapping[str, Any], folder: Path,
                              notes: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Import both released connectors into ``folder``, their sides bound to the loaded encoders.

    Returns:
        ``(connectors by name, names of connectors that are random stand-ins)``.
    """
    from cmcr.trainer.connector import SIDES, identity_matches
    from cmcr.trainer.release import PRESETS, import_release, write_standin

    connectors: dict[str, Any] = {}
    standins: set[str] = set()
    for name, (preset, other) in PRESET_OF.items():
        source = opts.clap_clip if preset == "clap_clip" else (opts.ulip_clip or RELEASE_DATA / "ulip_clip.pt")
        if source is None:
            source = write_standin(folder / "standin" / f"{preset}.pt", preset)
            standins.add(name)
            notes.append(f"{name}: the released {preset}.pt is not shipped (8.45 MB); a random stand-in with its "
                         f"layout is used (not meaningful). Pass --clap-clip /path/to/{preset}.pt (from "
                         f"MCR-PEFT/C-MCR, checkpoints/) to use the real one")
        p = PRESETS[preset]
        sides, bound_by = {}, {}
        for s, mcr in zip(SIDES, ("clip", other), strict=True):
            if mcr not in encoders:
                continue
            identity = encoders[mcr].identity()
            sides[s], bound_by[s] = identity, "cmcr demo --release (the encoder it loaded)"
            if not _is_random(encoders[mcr]) and not any(identity_matches(pat, identity)
                                                         for pat in p.sides[s].accepts):
                notes.append(f"{name} side {s} ({mcr}) is bound to the loaded encoder "
                             f"{identity.get('architecture')} @{identity.get('weights')}, not the weights its head "
                             f"was trained on ({p.sides[s].model}): its matrices cannot match the authors'")
        try:
            connectors[name] = import_release(source, preset, folder / preset, sides=sides, bound_by=bound_by,
                                              overwrite=True)
        except CmcrError as e:  # e.g. an encoder of another width than the released heads
            notes.append(f"{name}: cannot import {source} ({e})")
    return connectors, standins


def _is_random(encoder) -> bool:  # noqa: ANN001
    from cmcr.trainer.evaluate import random_weight_identities

    return bool(random_weight_identities(encoder.identity()))


def run_release_demo(opts: ReleaseDemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Encode the three demo items, project them with both released connectors and print the authors'
    six matrices next to theirs; writes ``<out>/release/release.json``.

    Returns:
        ``{"matrices": [{"connector", "title", "cmcr" (3x3 or None), "authors", "available", "reason",
        "random", "max_abs_diff"}], "encoders", "random_weights", "notes", "items", "texts"}``.
    """
    console = console or Console(width=None if Console().is_terminal else 130)
    folder = Path(opts.out) / "release"
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    console.rule("[bold]the C-MCR authors' demo (cmcr demo --release)")
    encoders, unavailable = load_release_encoders(opts, notes)
    connectors, standins = import_release_connectors(opts, encoders, folder / "connectors", notes)
    random_encoders = {m for m, e in encoders.items() if _is_random(e)}
    random_weights = bool(random_encoders or standins)
    if random_weights:
        console.print(Panel.fit(
            "[bold]No pretrained weights in use[/] for: "
            + ", ".join(sorted(random_encoders) + [f"{n} connector" for n in sorted(standins)])
            + ".\nEvery matrix marked below is [bold red]random weights: not meaningful[/]; the authors' numbers "
              "need OpenAI CLIP ViT-B/32, LAION-CLAP 630k-fusion-best.pt, ULIP-2 PointBERT and both released "
              "connectors.\n" + "\n".join(f"• {n}" for n in notes),
            title="[bold red]RANDOM WEIGHTS", border_style="red"))
    elif notes:
        for n in notes:
            console.print(f"note: {n}", highlight=False, soft_wrap=True)
    results = []
    for name, rows, cols in MATRICES:
        title = matrix_title(rows, cols)
        entry: dict[str, Any] = {"connector": name, "title": title, "rows": list(rows), "cols": list(cols),
                                 "authors": AUTHORS[(name, title)], "cmcr": None, "available": False,
                                 "reason": None, "random": False, "max_abs_diff": None}
        missing = [m for m in {rows[0], cols[0]} if m not in encoders]
        if name not in connectors:
            entry["reason"] = f"connector {name} not available (see the notes)"
        elif missing:
            entry["reason"] = "; ".join(unavailable.get(m, f"no {m} encoder") for m in sorted(missing))
        else:
            try:
                m = release_matrix(connectors[name], encoders, rows, cols)
                entry.update(cmcr=np.round(m, 6).tolist(), available=True,
                             random=bool(name in standins or {rows[0], cols[0]} & random_encoders),
                             max_abs_diff=float(np.abs(m - np.asarray(entry["authors"])).max()))
            except CmcrError as e:
                entry["reason"] = str(e).splitlines()[0]
        results.append(entry)
    _print_matrices(console, results)
    result = {"items": list(ITEMS), "texts": list(TEXTS), "random_weights": random_weights, "notes": notes,
              "encoders": {m: e.identity() for m, e in encoders.items()},
              "connectors": {n: {"path": str(c.path), "fingerprint": c.fingerprint, "stand_in": n in standins}
                             for n, c in connectors.items()},
              "matrices": results}
    atomic_write_json(folder / "release.json", result)
    console.print(f"\nwritten: {folder / 'release.json'}", highlight=False, soft_wrap=True)
    return result


def _fmt_matrix(m: list[list[float]]) -> str:
    return "[" + " ".join("[" + " ".join(f"{v:.4f}" for v in row) + "]" for row in m) + "]"


def _print_matrices(console: Console, results: list[dict[str, Any]]) -> None:
    """The authors' layout: connector, title, then cmcr's matrix above theirs (rows/cols toilet, BBQ, train)."""
    console.print("softmax(10·cos), rows and columns: toilet, BBQ, train (texts: "
                  + ", ".join(repr(t) for t in TEXTS) + ")", highlight=False, soft_wrap=True)
    last = None
    for r in results:
        head = r["connector"] if r["connector"] != last else ""
        last = r["connector"]
        if r["available"]:
            flag = "  [red](random weights: not meaningful)[/]" if r["random"] else \
                f"  (max |diff| {r['max_abs_diff']:.4f})"
            console.print(f"{head:<10} {r['title']:<15} cmcr    {_fmt_matrix(r['cmcr'])}{flag}", highlight=False,
                          soft_wrap=True)
        else:
            console.print(f"{head:<10} {r['title']:<15} cmcr    not available: {r['reason']}", highlight=False,
                          soft_wrap=True, markup=False)
        console.print(f"{'':<10} {'':<15} authors {_fmt_matrix(r['authors'])}", highlight=False, soft_wrap=True)
