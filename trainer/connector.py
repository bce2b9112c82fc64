"""Connector files: the two trained projectors plus everything needed to use them safely.

A connector is a folder::

    <connector>/connector.safetensors   weights: "A.<param>" and "B.<param>" (projectors f_A, f_B,
                                        BatchNorm running statistics included)
    <connector>/connector.json          format, per side (MCR name, encoder identity, modalities
                                        accepted, input dim), architecture, training config,
                                        fingerprints of the training stores, final metrics,
                                        sha256 of the weights file

(documented in ``docs/connector-format.md``). :meth:`Connector.load` validates both files;
:meth:`Connector.project` refuses embeddings of another encoder, modality or dim, and always runs
the projector in eval mode without gradients (method.md section 2).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from cmcr import __version__
from cmcr.errors import ConfigError, ConnectorError
from cmcr.stores.store import (
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    identity_fingerprint,
    same_encoder,
    sha256_file,
)
from cmcr.trainer.projector import Projector, make_projector

FORMAT_NAME = "cmcr-connector"
FORMAT_VERSION = 1
WEIGHTS_FILE = "connector.safetensors"
META_FILE = "connector.json"
SIDES = ("A", "B")
#: ``encoder.family`` of stores written by :func:`cmcr.trainer.evaluate.project_store`.
PROJECTED_FAMILY = "cmcr-connector"


@dataclass
class SideInfo:
    """One side of a connector (one MCR).

    Attributes:
        mcr: MCR name (``clip``, ``clap``, ``ulip``...).
        encoder: encoder identity of the stores this side was trained on.
        modalities: modalities it accepts (the shared one and the memory's).
        input_dim: embedding width it accepts.
        shared_modality: the modality both MCRs share (text for CLIP+CLAP, image for CLIP+ULIP).
    """

    mcr: str
    encoder: dict[str, Any]
    modalities: list[str]
    input_dim: int
    shared_modality: str

    def to_json(self) -> dict[str, Any]:
        return {"mcr": self.mcr, "encoder": self.encoder, "encoder_fingerprint": identity_fingerprint(self.encoder),
                "modalities": list(self.modalities), "input_dim": self.input_dim,
                "shared_modality": self.shared_modality}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SideInfo:
        return cls(mcr=str(d["mcr"]), encoder=dict(d["encoder"]), modalities=list(d["modalities"]),
                   input_dim=int(d["input_dim"]), shared_modality=str(d["shared_modality"]))


@dataclass
class Connector:
    """Two projectors (sides ``"A"`` and ``"B"``) and their metadata.

    Typical use::

        conn = Connector.load("runs/clip-clap")
        side = conn.side_for(store.encoder, store.modality)      # "A" or "B"
        z = conn.project(side, emb, identity=store.encoder, modality=store.modality)  # (N, out_dim)
    """

    sides: dict[str, SideInfo]
    projectors: dict[str, Projector]
    architecture: dict[str, dict[str, Any]]
    training: dict[str, Any] = field(default_factory=dict)
    stores: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    weights_sha256: str | None = None
    created_at: str = ""

    def __post_init__(self) -> None:
        for p in self.projectors.values():
            p.eval()

    # ----------------------------------------------------------------------------- identity
    @property
    def fingerprint(self) -> str:
        """16 hex chars naming this connector (sha256 of the weights file once saved/loaded)."""
        if not self.weights_sha256:
            self.weights_sha256 = hashlib.sha256(self._weights_bytes()).hexdigest()
        return self.weights_sha256[:16]

    def _weights_bytes(self) -> bytes:
        tensors = {f"{s}.{k}": v.detach().cpu().contiguous() for s in SIDES
                   for k, v in self.projectors[s].state_dict().items()}
        return safetensors_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})

    @property
    def out_dim(self) -> int:
        """Width of the connected space."""
        return int(self.architecture["A"]["out_dim"])

    def side_for(self, identity: Mapping[str, Any], modality: str) -> str:
        """The side (``"A"`` or ``"B"``) that accepts embeddings of this encoder identity and modality.

        Raises:
            ConnectorError: no side (or, for an ill-made connector, both sides) accepts them.
        """
        ident = canonical_json(dict(identity))
        matches = [s for s, info in self.sides.items()
                   if same_encoder(info.encoder, identity) and modality in info.modalities]
        if len(matches) == 1:
            return matches[0]
        accepted = "; ".join(f"side {s} ({i.mcr}): {i.modalities} of {canonical_json(i.encoder)}"
                             for s, i in self.sides.items())
        if not matches:
            raise ConnectorError(
                f"connector {self.path or self.fingerprint} has no side for {modality!r} embeddings of encoder "
                f"{ident}; it accepts {accepted}. Encode the input with one of those encoders"
            )
        raise ConnectorError(f"connector {self.path}: both sides accept {modality!r} of {ident}; the file is ambiguous")

    def check_input(self, side: str, identity: Mapping[str, Any] | None, modality: str | None, dim: int) -> None:
        """Raise :class:`ConnectorError` unless ``side`` accepts this encoder identity, modality and dim."""
        if side not in self.sides:
            raise ConnectorError(f"unknown connector side {side!r}; use one of {list(self.sides)}")
        info = self.sides[side]
        where = f"connector {self.path or self.fingerprint} side {side} ({info.mcr})"
        if identity is None or modality is None:
            raise ConnectorError(f"{where}: give the encoder identity and modality of the embeddings to project")
        if not same_encoder(identity, info.encoder):
            raise ConnectorError(
                f"{where} was trained on embeddings of encoder {canonical_json(info.encoder)}, got embeddings of "
                f"{canonical_json(dict(identity))}; another encoder's space cannot be projected by this side"
            )
        if modality not in info.modalities:
            raise ConnectorError(f"{where} accepts modalities {info.modalities}, got {modality!r}")
        if dim != info.input_dim:
            raise ConnectorError(f"{where} expects dim {info.input_dim}, got embeddings of dim {dim}")

    def project(self, side: str, embeddings: np.ndarray, *, identity: Mapping[str, Any] | None,
                modality: str | None, batch_rows: int = 65536, device: str | torch.device = "cpu") -> np.ndarray:
        """Map embeddings of one side's encoder into the connected space (eval mode, no gradient).

        Args:
            side: ``"A"`` or ``"B"`` (see :meth:`side_for`).
            embeddings: ``(N, D_in)`` (or ``(D_in,)``) float array of unit rows.
            identity, modality: what the embeddings are (checked against the side).
            batch_rows: rows per forward pass.

        Returns:
            ``(N, out_dim)`` float32 unit rows (``(out_dim,)`` for one row).

        Raises:
            ConnectorError: wrong encoder, modality or dim.
        """
        x = np.asarray(embeddings)
        single = x.ndim == 1
        x = np.atleast_2d(x)
        self.check_input(side, identity, modality, int(x.shape[1]))
        proj = self.projectors[side].to(device)
        proj.eval()
        out = np.empty((len(x), self.out_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(x), batch_rows):
                t = torch.from_numpy(np.array(x[start:start + batch_rows], dtype=np.float32)).to(device)
                out[start:start + len(t)] = proj(t).cpu().numpy()
        return out[0] if single else out

    def projected_identity(self, side: str, base: Mapping[str, Any]) -> dict[str, Any]:
        """Encoder identity of embeddings projected by ``side``: names the connector, the side and the base
        encoder, so a projected store can never be mistaken for a raw one."""
        return {"family": PROJECTED_FAMILY, "connector": self.fingerprint, "side": side,
                "mcr": self.sides[side].mcr, "base": dict(base), "dim": self.out_dim}

    # ----------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": {"tool": "cmcr", "version": __version__},
            "created_at": self.created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": self.fingerprint,
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256},
            "sides": {s: self.sides[s].to_json() for s in SIDES},
            "architecture": self.architecture,
            "training": self.training,
            "stores": self.stores,
            "data": self.data,
            "metrics": self.metrics,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``connector.safetensors`` then ``connector.json`` (each atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self._weights_bytes()
        atomic_write_bytes(folder / WEIGHTS_FILE, data)
        self.weights_sha256 = hashlib.sha256(data).hexdigest()
        self.path = folder
        atomic_write_json(folder / META_FILE, self.to_json())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Connector:
        """Load and validate a connector folder.

        Raises:
            ConnectorError: a missing file, another format or version, a weights file whose sha256
                differs from the recorded one, or weights that do not fit the recorded architecture.
        """
        folder = Path(folder)
        meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
        if not meta_path.exists() or not weights_path.exists():
            raise ConnectorError(
                f"{folder}: not a connector folder ({META_FILE} and {WEIGHTS_FILE} expected); train one with "
                f"`cmcr connect`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConnectorError(f"{meta_path}: unreadable connector metadata ({e})") from e
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise ConnectorError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, expected "
                f"{FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        for name in ("sides", "architecture", "weights"):
            if name not in meta:
                raise ConnectorError(f"{meta_path}: missing field {name!r}")
        digest = sha256_file(weights_path)
        if meta["weights"].get("sha256") and digest != meta["weights"]["sha256"]:
            raise ConnectorError(
                f"{weights_path}: sha256 {digest[:12]}… differs from the one recorded in {META_FILE} "
                f"({str(meta['weights']['sha256'])[:12]}…); the weights were changed or belong to another connector"
            )
        try:
            sides = {s: SideInfo.from_json(meta["sides"][s]) for s in SIDES}
            projectors = {s: make_projector(meta["architecture"][s]) for s in SIDES}
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConnectorError(f"{meta_path}: invalid sides/architecture ({e})") from e
        tensors = load_file(str(weights_path))
        for s in SIDES:
            state = {k[len(s) + 1:]: v for k, v in tensors.items() if k.startswith(f"{s}.")}
            try:
                projectors[s].load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ConnectorError(f"{weights_path}: weights of side {s} do not fit the recorded architecture: {e}") \
                    from e
            if sides[s].input_dim != projectors[s].in_dim:
                raise ConnectorError(f"{meta_path}: side {s} input_dim {sides[s].input_dim} != architecture in_dim")
        return cls(sides=sides, projectors=projectors, architecture=meta["architecture"],
                   training=meta.get("training", {}), stores=meta.get("stores", {}), metrics=meta.get("metrics", {}),
                   data=meta.get("data", {}), path=folder, weights_sha256=digest, created_at=meta.get("created_at", ""))


def is_projected(identity: Mapping[str, Any]) -> bool:
    """Whether an encoder identity names a connector space (a store written by ``cmcr project``)."""
    return identity.get("family") == PROJECTED_FAMILY


def same_space(identity_a: Mapping[str, Any], identity_b: Mapping[str, Any]) -> bool:
    """Whether embeddings with these encoder identities can be compared by cosine: both projected by
    the same connector (any side), or both raw from the same encoder."""
    if is_projected(identity_a) or is_projected(identity_b):
        return (is_projected(identity_a) and is_projected(identity_b)
                and identity_a.get("connector") == identity_b.get("connector"))
    return same_encoder(identity_a, identity_b)
