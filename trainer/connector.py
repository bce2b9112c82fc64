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

Integrity (format version 2): the weights file is written canonically (:func:`canonical_safetensors`:
the same tensors always give the same bytes, in any process), and its header binds what routes
embeddings — both sides (MCR, encoder identity, accepted identities, modalities, input dim), both
architectures and the provenance. The fingerprint is the sha256 of that file, so it names weights
*and* binding; loading recomputes it (the check cannot be switched off by deleting the recorded
digest) and refuses a ``connector.json`` whose sides or architectures differ from the bound ones.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

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

log = logging.getLogger(__name__)

FORMAT_NAME = "cmcr-connector"
FORMAT_VERSION = 2
#: Versions :meth:`Connector.load` reads. Version 1 files (no binding in the weights header) still load,
#: with a warning: their sides cannot be checked against the weights.
READABLE_VERSIONS = (1, 2)
#: Key of the safetensors header metadata holding the binding (canonical JSON).
BINDING_KEY = "cmcr_binding"
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
        accepts: ``None`` (a trained connector): only embeddings whose identity equals ``encoder``
            exactly. Otherwise (an imported connector) a list of identity *patterns*: an identity is
            accepted when, for some pattern, every field of the pattern is present in it with an equal
            value (fields the pattern does not name are free). See :func:`identity_matches` and
            docs/connector-format.md, "Imported connectors".
    """

    mcr: str
    encoder: dict[str, Any]
    modalities: list[str]
    input_dim: int
    shared_modality: str
    accepts: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"mcr": self.mcr, "encoder": self.encoder, "encoder_fingerprint": identity_fingerprint(self.encoder),
             "modalities": list(self.modalities), "input_dim": self.input_dim,
             "shared_modality": self.shared_modality}
        if self.accepts is not None:
            d["accepts"] = [dict(p) for p in self.accepts]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SideInfo:
        accepts = d.get("accepts")
        return cls(mcr=str(d["mcr"]), encoder=dict(d["encoder"]), modalities=list(d["modalities"]),
                   input_dim=int(d["input_dim"]), shared_modality=str(d["shared_modality"]),
                   accepts=None if accepts is None else [dict(p) for p in accepts])

    def accepts_identity(self, identity: Mapping[str, Any]) -> bool:
        """Whether embeddings of this encoder identity may be projected by this side (modality aside)."""
        if self.accepts is None:
            return same_encoder(identity, self.encoder)
        return any(identity_matches(p, identity) for p in self.accepts)

    def describe_accepted(self) -> str:
        """The accepted identities as one line (for error messages)."""
        if self.accepts is None:
            return canonical_json(self.encoder)
        return " or ".join(canonical_json(p) for p in self.accepts)


def identity_matches(pattern: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """Whether ``identity`` has every field of ``pattern`` with an equal value (canonical JSON per value).

    Used by imported connectors (:attr:`SideInfo.accepts`): a pattern names the fields that decide the
    vectors (family, architecture, weights, fusion, dim...) and leaves the others free.
    """
    return all(k in identity and canonical_json(identity[k]) == canonical_json(v) for k, v in pattern.items())


#: safetensors dtype names of the torch dtypes a connector may hold.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise tensors as a safetensors file whose bytes depend on the content only.

    The ``safetensors`` writer stores ``metadata`` from a hash map whose order changes from call to
    call (issue 13, defect 2); this writer fixes every choice: tensors ordered by decreasing element
    size then name (so every tensor stays aligned), the header as canonical JSON (sorted keys, no
    spaces) padded with spaces to a multiple of 8 bytes, data little-endian. Any safetensors reader
    reads the result.

    Args:
        tensors: name -> CPU or device tensor (copied to CPU, contiguous).
        metadata: string -> string, stored under ``__metadata__``.

    Raises:
        ConnectorError: a dtype safetensors cannot store.
    """
    import sys

    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise ConnectorError("canonical_safetensors needs a little-endian machine")
    items = []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ConnectorError(f"tensor {name!r} has dtype {t.dtype}, which a connector file cannot store")
        items.append((name, t))
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, t in items:
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = canonical_json(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


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
    provenance: dict[str, Any] = field(default_factory=dict)
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

    def binding(self) -> dict[str, Any]:
        """What the weights file binds (and the fingerprint therefore names): format, both sides,
        both architectures and the provenance."""
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "sides": {s: self.sides[s].to_json() for s in SIDES},
                "architecture": {s: dict(self.architecture[s]) for s in SIDES},
                "provenance": dict(self.provenance)}

    def _weights_bytes(self) -> bytes:
        tensors = {f"{s}.{k}": v for s in SIDES for k, v in self.projectors[s].state_dict().items()}
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                    BINDING_KEY: canonical_json(self.binding())}
        return canonical_safetensors(tensors, metadata)

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
                   if info.accepts_identity(identity) and modality in info.modalities]
        if len(matches) == 1:
            return matches[0]
        accepted = "; ".join(f"side {s} ({i.mcr}): {i.modalities} of {i.describe_accepted()}"
                             for s, i in self.sides.items())
        if not matches and is_projected(identity):
            raise ConnectorError(
                f"these {modality!r} embeddings are already in a connected space (a store written by `cmcr project`, "
                f"encoder {ident}); project the raw store the connector was trained on instead, or use this one "
                f"as it is (search / eval take projected stores)")
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
        if not info.accepts_identity(identity):
            how = "was trained on" if info.accepts is None else "is bound to"
            raise ConnectorError(
                f"{where} {how} embeddings of encoder {info.describe_accepted()}, got embeddings of "
                f"{canonical_json(dict(identity))}; another encoder's space cannot be projected by this side"
                + ("" if info.accepts is None else _IMPORT_HINT)
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

    def describe(self) -> dict[str, Any]:
        """What ``cmcr connector info`` shows: fingerprint, sides (MCR, modalities, accepted identities),
        architectures (with parameter counts) and provenance (training stores, or the imported file)."""
        sides = {}
        for s in SIDES:
            info = self.sides[s]
            sides[s] = {"mcr": info.mcr, "modalities": list(info.modalities), "shared_modality": info.shared_modality,
                        "input_dim": info.input_dim, "encoder": info.encoder,
                        "accepts": info.accepts if info.accepts is not None else [info.encoder],
                        "match": "exact identity" if info.accepts is None else
                        "identity patterns (fields named must be equal; others are free)"}
        arch = {s: {**self.architecture[s],
                    "parameters": int(sum(p.numel() for p in self.projectors[s].parameters()))} for s in SIDES}
        provenance = dict(self.provenance) or {"kind": "trained", "stores": self.stores, "training": self.training}
        return {"path": str(self.path) if self.path else None, "fingerprint": self.fingerprint,
                "weights_sha256": self.weights_sha256, "created_at": self.created_at, "out_dim": self.out_dim,
                "sides": sides, "architecture": arch, "provenance": provenance, "metrics": self.metrics}

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
            "provenance": self.provenance,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``connector.safetensors`` then ``connector.json`` (each atomically) into ``folder``.

        Identical content gives identical bytes: the weights file is canonical
        (:func:`canonical_safetensors`), and re-saving a connector with the same fingerprint into a
        folder that already holds it keeps the recorded ``created_at`` (``connect --resume`` of a
        finished run rewrites nothing).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self._weights_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not self.created_at:
            try:
                previous = json.loads((folder / META_FILE).read_text())
                if previous.get("fingerprint") == digest[:16] and previous.get("created_at"):
                    self.created_at = str(previous["created_at"])
            except (OSError, ValueError, AttributeError):
                pass
        self.created_at = self.created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_bytes(folder / WEIGHTS_FILE, data)
        self.weights_sha256 = digest
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
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") not in READABLE_VERSIONS:
            raise ConnectorError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, expected "
                f"{FORMAT_NAME!r} version {FORMAT_VERSION} (or an older readable one: {list(READABLE_VERSIONS)})"
            )
        for name in ("sides", "architecture", "weights"):
            if name not in meta:
                raise ConnectorError(f"{meta_path}: missing field {name!r}")
        digest = _check_digest(meta, meta_path, weights_path)
        try:
            sides = {s: SideInfo.from_json(meta["sides"][s]) for s in SIDES}
            projectors = {s: make_projector(meta["architecture"][s]) for s in SIDES}
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConnectorError(f"{meta_path}: invalid sides/architecture ({e})") from e
        provenance = dict(meta.get("provenance") or {})
        if meta["format_version"] >= 2:
            _check_binding(meta, meta_path, weights_path)
        else:
            log.warning("%s: connector format version 1 does not bind its sides into the weights file; their "
                        "assignment cannot be verified. Re-save it with this version of cmcr to add the binding",
                        meta_path)
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a broken file
            raise ConnectorError(f"{weights_path}: unreadable weights file ({e})") from e
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
                   data=meta.get("data", {}), provenance=provenance, path=folder, weights_sha256=digest,
                   created_at=meta.get("created_at", ""))


_IMPORT_HINT = (". This side was imported (`cmcr connector import`): a model loaded from a checkpoint file is "
                "identified by the file's sha256, which cmcr cannot check against the official file offline; if "
                "your file is the official checkpoint, re-import binding it with --side-a/--side-b "
                "FAMILY:ARCH@/path/to/checkpoint (see `cmcr connector info`)")


def _check_digest(meta: Mapping[str, Any], meta_path: Path, weights_path: Path) -> str:
    """sha256 of the weights file, checked against the recorded digest and fingerprint (both required)."""
    digest = sha256_file(weights_path)
    recorded = (meta.get("weights") or {}).get("sha256") if isinstance(meta.get("weights"), Mapping) else None
    if not recorded:
        raise ConnectorError(
            f"{meta_path}: no weights sha256 recorded (field weights.sha256); the weights cannot be verified, so the "
            f"connector is refused. Restore the original {META_FILE} (or re-save the connector with `cmcr`)"
        )
    if digest != recorded:
        raise ConnectorError(
            f"{weights_path}: sha256 {digest[:12]}… differs from the one recorded in {META_FILE} "
            f"({str(recorded)[:12]}…); the weights were changed or belong to another connector"
        )
    if meta.get("fingerprint") != digest[:16]:
        raise ConnectorError(
            f"{meta_path}: fingerprint {meta.get('fingerprint')!r} is not the first 16 hex chars of the weights "
            f"sha256 ({digest[:16]}); {META_FILE} was edited"
        )
    return digest


def _check_binding(meta: Mapping[str, Any], meta_path: Path, weights_path: Path) -> None:
    """Refuse a ``connector.json`` whose sides, architectures or provenance differ from the binding in the
    (already digest-checked) weights file header."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = f.metadata() or {}
        bound = json.loads(header[BINDING_KEY])
    except Exception as e:  # noqa: BLE001 - a missing key, bad JSON or an unreadable header
        raise ConnectorError(f"{weights_path}: the weights file carries no readable side binding ({e}); the file "
                             f"was not written by cmcr's connector writer") from e
    for s in SIDES:
        given = meta["sides"].get(s)
        if canonical_json(given) != canonical_json(bound["sides"][s]):
            bound_side = bound["sides"][s]
            other = "B" if s == "A" else "A"
            swapped = canonical_json(given) == canonical_json(bound["sides"][other])
            raise ConnectorError(
                f"{meta_path}: side {s} ({(given or {}).get('mcr')!r}) differs from the side {s} bound into the "
                f"weights file ({bound_side.get('mcr')!r}, encoder {canonical_json(bound_side.get('encoder'))})"
                + ("; the sides were swapped" if swapped else "")
                + f". {META_FILE} was edited: embeddings would reach the wrong projector. Restore the original file"
            )
        if canonical_json(meta["architecture"].get(s)) != canonical_json(bound["architecture"][s]):
            raise ConnectorError(f"{meta_path}: architecture of side {s} differs from the one bound into the weights "
                                 f"file; {META_FILE} was edited. Restore the original file")
    if canonical_json(meta.get("provenance") or {}) != canonical_json(bound.get("provenance") or {}):
        raise ConnectorError(f"{meta_path}: provenance differs from the one bound into the weights file; "
                             f"{META_FILE} was edited. Restore the original file")


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
