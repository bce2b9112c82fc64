"""Import the C-MCR authors' released connectors (``clap_clip.pt``, ``ulip_clip.pt``) as ordinary connectors.

The authors (MCR-PEFT/C-MCR, commit 038dec1, CC BY 4.0) released two plain PyTorch state dicts,
one per connected pair of MCRs, each with two heads ``Head_A`` and ``Head_B``:

=============  ==========================  ==========================  ===============================
file           ``Head_A``                  ``Head_B``                  head architecture
=============  ==========================  ==========================  ===============================
clap_clip.pt   CLAP (audio)                CLIP (images, text)         Linear(512→1024)-BN-ReLU-
                                                                       Linear(1024→512)-BN
                                                                       (keys ``net1.{0,1}``, ``net2.{0,1}``)
ulip_clip.pt   CLIP (images, text)         ULIP-2 (3D)                 Linear(512→512)-BN-ReLU
                                                                       (keys ``net.{0,1}``)
=============  ==========================  ==========================  ===============================

Note the swap: ``Head_A`` is CLAP in one file and CLIP in the other. An imported connector always
has CLIP on side ``A`` and the other MCR on side ``B`` (the provenance records which released head
became which side). Inputs of both heads are L2-normalised embeddings, outputs are L2-normalised
after the head, in eval mode (BatchNorm running statistics), exactly as
:class:`~cmcr.trainer.projector.Projector` does; the heads map onto its variants (``depth``,
``batchnorm``, ``final_activation``) so an imported connector is a normal one (``project``, ``search``,
``eval`` work on it).

Identity binding (docs/connector-format.md, "Imported connectors"). A side of a trained connector
accepts exactly the encoder identity of its training stores. A released head was trained on one
model's embeddings, so the imported side is bound to that model by *identity patterns*: the fields
that decide the vectors (family, architecture, fusion, dim and the weights) and nothing else. The
weights are identified as cmcr's encoders record them: by name for weights cmcr fetches by name
(open_clip's ``openai`` tag), by ``sha256:<hex>`` for a checkpoint file. The official files'
sha256 are not known offline (except OpenAI's ViT-B/32 file, whose digest OpenAI publishes in its
download URL), so cmcr never guesses that a local file is the official one: the user binds a file
once, at import (``--side-b ulip:PointBERT@/path/pointbert_ULIP-2.pt`` records that file's identity),
and every later store is then checked exactly against it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmcr.errors import ConnectorError
from cmcr.stores.files import claim_output, locks_output
from cmcr.stores.store import canonical_json, sha256_file
from cmcr.trainer.connector import META_FILE, SIDES, Connector, SideInfo
from cmcr.trainer.projector import make_projector

#: Where the released files come from (recorded in every imported connector).
RELEASE_ORIGIN = {"repository": "MCR-PEFT/C-MCR", "commit": "038dec1", "licence": "CC BY 4.0",
                  "authors": "Zehan Wang et al., Connecting Multi-modal Contrastive Representations, NeurIPS 2023"}

#: OpenAI CLIP ViT-B/32, as cmcr's open_clip encoder records ``open_clip:ViT-B-32`` (default tag ``openai``).
CLIP_VITB32_OPENAI = {"family": "open_clip", "architecture": "ViT-B-32", "weights": "openai", "dim": 512}
#: sha256 of OpenAI's ``ViT-B-32.pt`` (OpenAI publishes it in the download URL and its loader checks it;
#: also in open_clip's ``pretrained.py``): a store encoded from that very file is accepted too.
CLIP_VITB32_OPENAI_FILE_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
#: LAION-CLAP HTSAT-tiny fusion, 630k checkpoint (``clap:HTSAT-tiny-fusion``, weights ``630k-fusion-best.pt``).
CLAP_FUSION_630K = {"family": "clap", "architecture": "HTSAT-tiny-fusion", "fusion": True,
                    "weights_file": "630k-fusion-best.pt", "dim": 512}
#: ULIP-2 PointBERT (``ulip:PointBERT``, weights ``pointbert_ULIP-2.pt``).
ULIP2_POINTBERT = {"family": "ulip", "architecture": "PointBERT", "weights_file": "pointbert_ULIP-2.pt", "dim": 512}


@dataclass(frozen=True)
class ReleaseSide:
    """One side of a released connector as cmcr imports it.

    Attributes:
        head: name of the released head (``Head_A`` / ``Head_B``) that becomes this side.
        mcr: MCR name (``clip``, ``clap``, ``ulip``).
        model: human-readable name of the model the head was trained on.
        modalities: modalities the side accepts (the shared one first).
        accepts: default identity patterns (see :attr:`cmcr.trainer.connector.SideInfo.accepts`).
    """

    head: str
    mcr: str
    model: str
    modalities: tuple[str, ...]
    accepts: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class ReleasePreset:
    """How one released file maps onto a cmcr connector.

    Attributes:
        name: ``clap_clip`` or ``ulip_clip`` (also the released file's stem).
        shared_modality: the modality both MCRs share (``text`` for CLAP-CLIP, ``image`` for ULIP-CLIP).
        sides: side ``A`` (always CLIP) and side ``B``.
        architecture: the cmcr projector architecture of both heads.
        key_map: ``(released prefix, projector prefix)`` pairs, e.g. ``("net2.0.", "net.3.")``.
    """

    name: str
    shared_modality: str
    sides: Mapping[str, ReleaseSide]
    architecture: Mapping[str, Any]
    key_map: tuple[tuple[str, str], ...]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Released key (``Head_X.…``) -> shape, for both heads."""
        proj = make_projector(dict(self.architecture)).state_dict()
        out = {}
        for side in self.sides.values():
            for src, dst in self.key_map:
                for k, v in proj.items():
                    if k.startswith(dst):
                        out[f"{side.head}.{src}{k[len(dst):]}"] = tuple(v.shape)
        return out


_CLIP_ACCEPTS = (CLIP_VITB32_OPENAI, {**CLIP_VITB32_OPENAI, "weights": "sha256:" + CLIP_VITB32_OPENAI_FILE_SHA256})

PRESETS: dict[str, ReleasePreset] = {
    "clap_clip": ReleasePreset(
        name="clap_clip", shared_modality="text",
        sides={"A": ReleaseSide("Head_B", "clip", "OpenAI CLIP ViT-B/32", ("text", "image"), _CLIP_ACCEPTS),
               "B": ReleaseSide("Head_A", "clap", "LAION-CLAP HTSAT-tiny fusion (630k-fusion-best.pt)",
                                ("text", "audio"), (CLAP_FUSION_630K,))},
        architecture={"in_dim": 512, "hidden_dim": 1024, "out_dim": 512, "depth": 2, "batchnorm": True,
                      "activation": "relu", "final_activation": False, "dropout": 0.0},
        key_map=(("net1.0.", "net.0."), ("net1.1.", "net.1."), ("net2.0.", "net.3."), ("net2.1.", "net.4.")),
    ),
    "ulip_clip": ReleasePreset(
        name="ulip_clip", shared_modality="image",
        sides={"A": ReleaseSide("Head_A", "clip", "OpenAI CLIP ViT-B/32", ("image", "text"), _CLIP_ACCEPTS),
               "B": ReleaseSide("Head_B", "ulip", "ULIP-2 PointBERT (pointbert_ULIP-2.pt)", ("image", "3d"),
                                (ULIP2_POINTBERT,))},
        architecture={"in_dim": 512, "hidden_dim": 512, "out_dim": 512, "depth": 1, "batchnorm": True,
                      "activation": "relu", "final_activation": True, "dropout": 0.0},
        key_map=(("net.0.", "net.0."), ("net.1.", "net.1.")),
    ),
}


def load_release_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a released connector file: a plain state dict, loaded without running code.

    Read with :func:`cmcr.safeload.load_torch_file` (``weights_only=True``: tensors and plain containers only;
    a file that holds anything else is refused, never unpickled).

    Returns:
        ``{key: tensor}`` (a ``{"state_dict": {...}}`` wrapper and a ``module.`` prefix are removed).

    Raises:
        ConnectorError: the file is missing, not a PyTorch file, holds other objects, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConnectorError(f"{path}: no such file; pass the released clap_clip.pt or ulip_clip.pt")
    from cmcr.errors import CorruptFileError, UnsafeFileError
    from cmcr.safeload import load_torch_file

    try:
        obj = load_torch_file(path, what="released connector")
    except (CorruptFileError, UnsafeFileError) as e:
        raise ConnectorError(f"{e} (expected a plain PyTorch state dict: clap_clip.pt or ulip_clip.pt; cmcr never "
                             f"unpickles arbitrary objects from a file it is handed)") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConnectorError(f"{path}: expected a state dict of tensors (Head_A.*, Head_B.*), found "
                             f"{type(obj).__name__}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def guess_preset(state: Mapping[str, torch.Tensor]) -> str | None:
    """The preset whose key names and shapes ``state`` has exactly (``None``: neither)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, preset in PRESETS.items():
        if shapes == preset.expected_shapes():
            return name
    return None


def convert_heads(state: Mapping[str, torch.Tensor], preset: ReleasePreset, source: str = "the file") \
        -> dict[str, dict[str, torch.Tensor]]:
    """Released heads -> :class:`~cmcr.trainer.projector.Projector` state dicts, per cmcr side.

    Args:
        state: the released state dict (see :func:`load_release_state_dict`).
        preset: the file's preset.
        source: file name for messages.

    Returns:
        ``{"A": {projector key: tensor}, "B": {...}}`` (float tensors as float32; the BatchNorm
        ``num_batches_tracked`` counters as int64).

    Raises:
        ConnectorError: missing, extra or mis-shaped keys (names the likely preset), or non-finite values.
    """
    expected = preset.expected_shapes()
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        other = guess_preset(state)
        hint = (f"; it looks like a {other}.pt file: pass --preset {other}" if other and other != preset.name else
                "; pass the released file that matches the preset")
        details = "; ".join(part for part in (
            f"missing {missing[:4]}" if missing else "", f"unexpected {extra[:4]}" if extra else "",
            "shapes differ for " + ", ".join(f"{k} {found[k]} (expected {expected[k]})" for k in shaped[:3])
            if shaped else "") if part)
        raise ConnectorError(f"{source} does not hold the {preset.name} heads: {details}{hint}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for side, info in preset.sides.items():
        converted = {}
        for src, dst in preset.key_map:
            prefix = f"{info.head}.{src}"
            for k, v in state.items():
                if not k.startswith(prefix):
                    continue
                name = dst + k[len(prefix):]
                if v.is_floating_point():
                    if not torch.isfinite(v).all():
                        raise ConnectorError(f"{source}: {k} holds NaN or Inf values")
                    v = v.to(torch.float32)
                else:
                    v = v.to(torch.int64)
                converted[name] = v.clone()
        out[side] = converted
    return out


def side_binding(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Identity patterns from a ``--side-a/--side-b`` override: one identity (or pattern) dict, or a list.

    Raises:
        ConnectorError: not a dict / list of dicts, no ``family``, or a ``dim`` other than 512.
    """
    patterns = [spec] if isinstance(spec, Mapping) else list(spec)
    if not patterns or not all(isinstance(p, Mapping) for p in patterns):
        raise ConnectorError(f"a side binding is an identity object or a list of them, got {spec!r}")
    out = []
    for p in patterns:
        if "family" not in p:
            raise ConnectorError(f"side binding {canonical_json(dict(p))} names no encoder family; give at least "
                                 f"family, architecture and weights (e.g. the identity `cmcr store info` shows)")
        if "dim" in p and int(p["dim"]) != 512:
            raise ConnectorError(f"side binding {canonical_json(dict(p))}: the released heads take 512-d "
                                 f"embeddings, not {p['dim']}")
        out.append(dict(p))
    return out


@locks_output("out")
def import_release(
    path: str | os.PathLike,
    preset: str,
    out: str | os.PathLike,
    *,
    sides: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
    bound_by: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Connector:
    """Turn a released ``clap_clip.pt`` / ``ulip_clip.pt`` into a connector folder ``out``.

    Args:
        path: the released file.
        preset: ``clap_clip`` or ``ulip_clip`` (see :data:`PRESETS`).
        out: output connector folder.
        sides: per side (``"A"`` = CLIP, ``"B"``), identity patterns replacing the preset's default
            binding (see :func:`side_binding`).
        bound_by: per side, how the override was given (recorded in the provenance, e.g. the spec).
        overwrite: start over: replace the connector in ``out``, whatever it is (the one meaning of
            ``--overwrite``); without it the same import is a no-op and another connector is refused.

    Returns:
        The saved :class:`Connector` (rerunning with the same inputs rewrites nothing).

    Raises:
        ConnectorError: unknown preset, a file that does not hold that preset's heads, a bad binding,
            or ``out`` holding another connector without ``overwrite``.
    """
    if preset not in PRESETS:
        raise ConnectorError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    path = Path(path)
    state = load_release_state_dict(path)
    weights = convert_heads(state, p, source=str(path))
    sides = dict(sides or {})
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise ConnectorError(f"unknown side(s) {sorted(unknown)} in the binding; use A (CLIP) and B")
    side_infos, projectors, provenance_sides = {}, {}, {}
    for s in SIDES:
        info = p.sides[s]
        accepts = side_binding(sides[s]) if s in sides else [dict(a) for a in info.accepts]
        side_infos[s] = SideInfo(mcr=info.mcr, encoder=dict(accepts[0]), modalities=list(info.modalities),
                                 input_dim=int(p.architecture["in_dim"]), shared_modality=p.shared_modality,
                                 accepts=accepts)
        proj = make_projector(dict(p.architecture))
        proj.load_state_dict(weights[s], strict=True)
        projectors[s] = proj.eval()
        provenance_sides[s] = {"released_head": info.head, "model": info.model,
                               "bound_by": (bound_by or {}).get(s, "given" if s in sides else "preset default")}
    provenance = {"kind": "import", "preset": p.name, "source_file": path.name,
                  "source_sha256": sha256_file(path), "origin": dict(RELEASE_ORIGIN), "sides": provenance_sides}
    conn = Connector(sides=side_infos, projectors=projectors,
                     architecture={s: dict(p.architecture) for s in SIDES}, provenance=provenance)
    out = Path(out)
    with claim_output(out, kind="connector", provenance=_release_provenance(conn), overwrite=overwrite,
                      recorded=_recorded_release, error=ConnectorError, foreign=()) as claim:
        if claim.reuse:  # the same import: nothing to rewrite
            return Connector.load(out)
        conn.save(out)
    return conn


def _release_provenance(conn: Connector) -> dict[str, Any]:
    """What an imported connector is derived from: the released file (digest), its preset, and the result
    (fingerprint: weights, sides and bindings)."""
    return {"fingerprint": conn.fingerprint, "preset": conn.provenance.get("preset"),
            "source_sha256": conn.provenance.get("source_sha256")}


def _recorded_release(out: Path) -> dict[str, Any] | None:
    """The provenance of the connector in ``out`` (``None``: none there; an unreadable one differs)."""
    if not (out / META_FILE).exists():
        return None
    try:
        return _release_provenance(Connector.load(out))
    except ConnectorError as e:
        return {"unreadable connector": str(e)}


def write_standin(path: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """Write a random stand-in of a released file (same key names, shapes and dtypes; BatchNorm statistics
    plausible, ``num_batches_tracked`` set) — for demos and tests where the real file is absent. Its
    projections are not meaningful.

    Raises:
        ConnectorError: unknown preset.
    """
    if preset not in PRESETS:
        raise ConnectorError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in sorted(PRESETS[preset].expected_shapes().items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = 0.01 + 0.05 * torch.rand(shape, generator=g)
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BatchNorm weight
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
