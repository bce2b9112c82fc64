"""Encoder adapters: the common interface, spec parsing and :func:`load_encoder`.

Spec syntax (``FAMILY:ARCHITECTURE[@WEIGHTS]``)::

    open_clip:ViT-B-32                      pretrained tag "openai" (the default tag; HF cache, else downloaded once)
    open_clip:ViT-B-32@laion2b_s34b_b79k    another pretrained tag (files: see cmcr.pipeline.hub)
    open_clip:ViT-B-32@/path/ckpt.pt        a local checkpoint file (identity records its sha256)
    open_clip:ViT-B-32@random               random init, seed 0 (``@random:7`` for seed 7)
    open_clip:cmcr-tiny-clip@random         the tiny test configuration shipped in pipeline/model_configs
    clap:HTSAT-tiny                         lukewys/laion_clap 630k-audioset-best.pt (HF cache, else downloaded once)
    clap:HTSAT-tiny@/path/630k-audioset-best.pt   laion_clap checkpoint (non-fusion)
    clap:HTSAT-tiny-fusion@/path/630k-fusion-best.pt   laion_clap fusion model (the paper's; clap_fusion.py)
    clap:HTSAT-tiny@random                  random init (tokenizer: see clap_encoder)
    clap:cmcr-tiny-clap@random              the tiny CLAP test configuration
    ulip:PointBERT@/path/pointbert_ULIP-2.pt   ULIP-2 PointBERT checkpoint (3d, image, text; see ulip_encoder)
    ulip:PointBERT@random                   full-size ULIP-2 PointBERT, random init
    ulip:cmcr-tiny-ulip@random              the tiny ULIP test configuration

An :class:`Encoder` splits its work the way the encode loop needs it (docs/encode.md):
:meth:`Encoder.preprocessor` returns a small picklable CPU-side callable used inside DataLoader
workers, :meth:`Encoder.collate` stacks preprocessed items, :meth:`Encoder.embed` runs the model on
the device and returns L2-normalised float32 rows. :meth:`Encoder.encode` chains them for small
query batches (search).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import ConfigError, EncoderError, EncoderSpecError
from cmcr.pipeline.audio import SampleError
from cmcr.stores.files import resolve_device  # noqa: F401 - the one device helper, re-exported

log = logging.getLogger(__name__)

FAMILY_ALIASES = {"open_clip": "open_clip", "openclip": "open_clip", "clip": "open_clip",
                  "clap": "clap", "laion_clap": "clap", "ulip": "ulip", "ulip2": "ulip"}
PRECISIONS = ("fp32", "bf16", "fp16")
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_SPEC_RE = re.compile(r"^(?P<family>[A-Za-z_]+):(?P<arch>[^@]+?)(?:@(?P<weights>.+))?$")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec.

    Attributes:
        family: ``open_clip``, ``clap`` or ``ulip``.
        architecture: model config name (``ViT-B-32``, ``HTSAT-tiny``, ``cmcr-tiny-clip``...).
        weights: a pretrained tag, an existing local file path, or ``random``; ``None`` = family default.
        seed: seed of a random init (``random:SEED``; 0 by default).
    """

    family: str
    architecture: str
    weights: str | None
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.weights == "random"

    @property
    def checkpoint(self) -> Path | None:
        """The local checkpoint file, when ``weights`` names one."""
        if self.weights is None or self.is_random:
            return None
        p = Path(os.path.expanduser(self.weights))
        suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
        if p.is_file() or "/" in self.weights or self.weights.endswith(suffixes):
            return p
        return None


def parse_spec(spec: str) -> EncoderSpec:
    """Parse ``FAMILY:ARCHITECTURE[@WEIGHTS]`` (see the module docstring).

    Raises:
        EncoderSpecError: malformed spec or unknown family (an :class:`EncoderError` and a usage error).
    """
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise EncoderSpecError(
            f"invalid encoder spec {spec!r}: expected FAMILY:ARCHITECTURE[@WEIGHTS], e.g. "
            f"'open_clip:ViT-B-32', 'open_clip:ViT-B-32@/path/ckpt.pt', 'clap:HTSAT-tiny@random'"
        )
    family = FAMILY_ALIASES.get(m["family"].lower())
    if family is None:
        raise EncoderSpecError(f"unknown encoder family {m['family']!r} in {spec!r}: use open_clip, clap or ulip")
    weights = m["weights"]
    seed = 0
    if weights is not None and (weights == "random" or weights.startswith("random:")):
        _, _, s = weights.partition(":")
        try:
            seed = int(s) if s else 0
        except ValueError as e:
            raise EncoderSpecError(f"invalid random seed in {spec!r}: use @random or @random:SEED") from e
        weights = "random"
    return EncoderSpec(family=family, architecture=m["arch"].strip(), weights=weights, seed=seed)


def collate_items(items: Sequence[Any]) -> Any:
    """Stack preprocessed items: tensors -> ``(B, ...)``; dicts of tensors -> dict of ``(B, ...)``."""
    import torch

    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return torch.stack(list(items))


class Encoder:
    """Base class of encoder adapters (see the module docstring for the division of work).

    Attributes:
        family: ``open_clip`` / ``clap``.
        modalities: modalities this model embeds, e.g. ``("image", "text")``.
        dim: embedding width D.
        device: torch device string the model lives on.
        precision: ``fp32`` or an autocast dtype (``bf16``, ``fp16``) used in :meth:`embed`.
    """

    family: str = ""
    modalities: tuple[str, ...] = ()
    dim: int = 0
    #: ``None``, or ``"int8"`` after :meth:`quantize_text`: text rows are then approximate, for queries only
    text_quantization: str | None = None

    def __init__(self, device: str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = device
        self.precision = precision

    # -- identity ---------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Model identity (same for every modality of the model), recorded in store manifests."""
        raise NotImplementedError

    def _identity(self, architecture: str, **fields: Any) -> dict[str, Any]:
        """The identity every adapter records: ``family``, ``architecture``, the model-specific ``fields``,
        ``weights`` (tag, ``sha256:<file digest>`` or ``random``), ``weights_file`` (a checkpoint's file name,
        when loaded from one; not compared between stores: :func:`cmcr.stores.store.same_encoder`),
        ``dim``, and the ``seed`` of a random init. Adapters set ``spec``, ``_weights_id`` and
        ``_weights_file``."""
        ident: dict[str, Any] = {"family": self.family, "architecture": architecture, **fields,
                                 "weights": self._weights_id, "dim": self.dim}
        if getattr(self, "_weights_file", None):
            ident["weights_file"] = self._weights_file
        if self.spec.is_random:
            ident["seed"] = self.spec.seed
        return ident

    def preprocessing(self, modality: str) -> dict[str, Any]:
        """Modality-specific preprocessing parameters, recorded in the store manifest."""
        raise NotImplementedError

    def check_modality(self, modality: str) -> None:
        """Raise :class:`EncoderSpecError` (an :class:`EncoderError`) if this encoder cannot embed ``modality``."""
        if modality not in self.modalities:
            raise EncoderSpecError(
                f"encoder {self.identity().get('architecture')} ({self.family}) embeds {self.modalities}, "
                f"not {modality!r}; pick another --modality or encoder"
            )

    def quantize_text(self, mode: str = "int8") -> None:
        """Embed text queries with a quantised text tower (serving only; see the open_clip adapter).

        Raises:
            EncoderError: this encoder has no quantised text path.
        """
        raise EncoderError(f"{self.family} encoders have no quantised text path (only open_clip CLIP-style "
                           f"text towers do); serve without text quantisation")

    # -- CPU side ---------------------------------------------------------------------------
    def preprocessor(self, modality: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
        """A picklable callable ``raw -> (item, info)`` run in DataLoader workers.

        ``raw`` is file bytes (image/audio) or a caption (str/bytes). ``item`` is what
        :meth:`collate` stacks; ``info`` holds per-row metadata (e.g. ``duration_s``, ``truncated``).
        Raises :class:`~cmcr.pipeline.audio.SampleError` for a bad sample.
        """
        raise NotImplementedError

    def collate(self, modality: str, items: Sequence[Any]) -> Any:
        """Stack preprocessed items into one model input batch (CPU tensors)."""
        return collate_items(items)

    # -- device side ------------------------------------------------------------------------
    def forward(self, modality: str, batch: Any) -> Any:
        """Model forward on a collated batch already on the device; returns ``(B, D)`` features."""
        raise NotImplementedError

    def to_device(self, batch: Any) -> Any:
        """Move a collated batch (tensor or dict of tensors) to :attr:`device`."""
        if isinstance(batch, dict):
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch.to(self.device, non_blocking=True)

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def embed(self, modality: str, batch: Any) -> np.ndarray:
        """Embed a collated batch.

        Returns:
            ``(B, D)`` float32, rows L2-normalised in float32 (a row of non-finite values stays
            non-finite so the caller can send it to failures).
        """
        import torch

        with torch.inference_mode(), self._autocast():
            feats = self.forward(modality, self.to_device(batch))
        x = feats.float()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        """Convenience for queries: file paths (image/audio/3d) or strings (text) -> ``(N, D)`` float32.

        A 3d file is decoded as the encode loop does (:func:`cmcr.pipeline.pointcloud.load_points`,
        default limits and mesh sampling) before the preprocessor sees it.

        Raises:
            SampleError: an input cannot be read or preprocessed (names it).
        """

        self.check_modality(modality)
        pre = self.preprocessor(modality)
        items = []
        for i, x in enumerate(inputs):
            if modality == "text":
                raw = x
            else:
                with open(x, "rb") as f:
                    raw = f.read()
                if modality == "3d":
                    from cmcr.pipeline.pointcloud import load_points

                    raw = load_points(raw, Path(x).suffix, what=str(x))
            try:
                items.append(pre(raw)[0])
            except SampleError as e:
                where = f"{modality} input {i}" + (f" ({x})" if modality != "text" else "")
                raise SampleError(f"{where}: {e}") from e
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(modality, self.collate(modality, items))


def load_encoder(spec: str, *, device: str = "auto", precision: str = "fp32",
                 clap_tokenizer: str | None = None) -> Encoder:
    """Build an encoder from a spec string (see the module docstring).

    Args:
        spec: ``FAMILY:ARCHITECTURE[@WEIGHTS]``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast in the forward pass; rows are
            always L2-normalised in float32.
        clap_tokenizer: folder with RoBERTa ``vocab.json`` + ``merges.txt`` for CLAP text (else
            ``$CMCR_CLAP_TOKENIZER``, else the Hugging Face cache, else downloaded once for real
            weights); only read when text is embedded.

    Raises:
        EncoderError: bad spec, unknown architecture, missing checkpoint or tokenizer files.
        HubUnreachableError: a file the spec needs is not cached and the hub cannot be reached.
        HubFileError: the hub lacks the file or served a broken one, or the cached copy is corrupt.
    """
    parsed = parse_spec(spec)
    dev = str(resolve_device(device))  # the one device helper (cmcr.stores.files); a clear ConfigError
    if parsed.family == "open_clip":
        from cmcr.pipeline.openclip_encoder import OpenClipEncoder

        return OpenClipEncoder(parsed, device=dev, precision=precision)
    if parsed.family == "ulip":
        from cmcr.pipeline.ulip_encoder import UlipEncoder

        return UlipEncoder(parsed, device=dev, precision=precision)
    from cmcr.pipeline.clap_encoder import ClapEncoder

    return ClapEncoder(parsed, device=dev, precision=precision, tokenizer_dir=clap_tokenizer)
