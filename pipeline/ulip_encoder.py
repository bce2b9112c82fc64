"""ULIP-2 adapter: 3D (point clouds), image and text embeddings from the PointBERT ULIP model.

Specs (see :mod:`cmcr.pipeline.encoders`)::

    ulip:PointBERT@/path/pointbert_ULIP-2.pt   the released ULIP-2 checkpoint (the one C-MCR uses)
    ulip:PointBERT@random                      full-size model, random init (seed 0; @random:7)
    ulip:cmcr-tiny-ulip@random                 tiny test configuration (64-d, 16 groups of 8 points)

There is no default download: ULIP weights are not on a model hub, a checkpoint file must be given.
The model and the checkpoint form are in :mod:`cmcr.pipeline.ulip_model`.

Per modality (what ULIP-2 / C-MCR do, read from the vendored reference code):

* ``3d`` — the preprocessor receives the decoded array ``(N, 3)`` xyz or ``(N, 6)`` xyz+rgb (the
  encode loop and ``Encoder.encode`` decode files with :func:`cmcr.pipeline.pointcloud.load_points`;
  arrays may be given directly) and prepares it with :func:`cmcr.pipeline.pointcloud.prepare_points`:
  float32 ``(P, 3)``, P = ``n_points`` (8192, ULIP's ``npoints``), centred on its mean and scaled
  into the unit sphere (ULIP's ``pc_normalize``). **ULIP-2 PointBERT uses xyz only**: its group encoder
  takes 3 input channels and C-MCR's ``trunks.py`` feeds ``obj["xyz"]`` only; colour columns are
  dropped (recorded in the manifest as ``use_color: false``). A cloud with fewer points than the
  group count (512; the tiny config 16), or with NaN/Inf coordinates, or all points equal, is a
  per-sample failure (:class:`~cmcr.pipeline.audio.SampleError`) that names the reason.
* ``image`` — SLIP/ULIP eval transform: decode (:func:`cmcr.pipeline.images.decode_image`), resize the
  shorter side to 224 (bilinear), centre crop 224, ImageNet mean/std normalisation.
* ``text`` — CLIP BPE (open_clip's ``SimpleTokenizer``, the same vocabulary as ULIP's), context 77;
  longer captions are truncated (end-of-text kept) and flagged per row; pooled at the end-of-text token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmcr.errors import EncoderError
from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.encoders import Encoder, EncoderSpec

log = logging.getLogger(__name__)

DEFAULT_N_POINTS = 8192
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_points(raw: Any, what: str = "point cloud") -> np.ndarray:
    """Raw 3D input -> ``(N, C)`` array: an array as is (the encode loop's contract); ``(bytes, ext)``
    decoded by :func:`cmcr.pipeline.pointcloud.load_points` (never unpickled).

    Raises:
        SampleError: undecodable input (names ``what``).
    """
    from cmcr.pipeline.pointcloud import load_points

    if isinstance(raw, np.ndarray):
        return raw
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], (bytes, bytearray, memoryview)):
        return load_points(bytes(raw[0]), str(raw[1]), what=what)
    raise SampleError(f"{what}: expected an (N, 3|6) array or (file bytes, extension), got {type(raw).__name__}")


def prepare_cloud(points: np.ndarray, n_points: int, min_points: int, what: str = "point cloud") -> np.ndarray:
    """``(N, 3|6)`` -> float32 ``(n_points, 3)`` xyz (ULIP-2 PointBERT takes no colour), prepared by
    :func:`cmcr.pipeline.pointcloud.prepare_points`: farthest-point sampling to ``n_points``, centred,
    scaled into the unit sphere.

    Raises:
        SampleError: not ``(N, >=3)``, fewer than ``min_points`` points, NaN/Inf, or all points equal.
    """
    from cmcr.pipeline.pointcloud import prepare_points

    return np.ascontiguousarray(prepare_points(np.asarray(points), n_points=n_points, use_color=False, seed=0,
                                               min_points=min_points, what=what)[:, :3], dtype=np.float32)


class PointCloudPreprocessor:
    """Picklable ``(N, 3|6) array -> ((n_points, 3) float32 tensor, {})`` (module docstring, ``3d``); the
    decode facts of a row (format, vertices, ...) are added by the encode loop."""

    def __init__(self, n_points: int, min_points: int):
        self.n_points = n_points
        self.min_points = min_points

    def __call__(self, raw: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        return torch.from_numpy(prepare_cloud(decode_points(raw), self.n_points, self.min_points)), {}


class UlipEncoder(Encoder):
    """ULIP-2 PointBERT adapter (modalities ``3d``, ``image`` and ``text``)."""

    family = "ulip"
    modalities = ("3d", "image", "text")

    def __init__(self, spec: EncoderSpec, device: str = "cpu", precision: str = "fp32",
                 n_points: int = DEFAULT_N_POINTS):
        super().__init__(device=device, precision=precision)
        from cmcr.pipeline.ulip_model import CONFIGS, build_model, load_ulip_state_dict

        self.spec = spec
        arch = spec.architecture
        if arch not in CONFIGS:
            raise EncoderError(f"unknown ULIP architecture {arch!r}; known: {sorted(CONFIGS)} "
                               f"(e.g. ulip:PointBERT@/path/pointbert_ULIP-2.pt)")
        ckpt = spec.checkpoint
        if not spec.is_random and ckpt is None:
            raise EncoderError(f"ulip:{arch} needs a checkpoint file or @random (ULIP weights are not on a hub): "
                               f"ulip:{arch}@/path/pointbert_ULIP-2.pt")
        cfg = CONFIGS[arch]
        if n_points < max(cfg.num_group, cfg.group_size):
            raise EncoderError(f"n_points={n_points} is below the {cfg.num_group} groups of ulip:{arch}")
        self._weights_file: str | None = None
        if spec.is_random:
            model = build_model(arch, device="cpu", seed=spec.seed)
            self._weights_id = "random"
        else:
            model = build_model(arch, device="meta")
            from cmcr.stores.store import sha256_file

            load_ulip_state_dict(model, ckpt, arch)
            self._weights_id = "sha256:" + sha256_file(ckpt)
            self._weights_file = Path(ckpt).name  # bound by imported connectors, not compared (stores.store)
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.architecture = arch
        self.dim = cfg.embed_dim
        self.n_points = n_points
        from open_clip.tokenizer import SimpleTokenizer

        self._tokenizer = SimpleTokenizer(context_length=cfg.context_length)
        self.context_length = cfg.context_length

    # -- identity / manifest -----------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return self._identity(self.architecture)

    def preprocessing(self, modality: str) -> dict[str, Any]:
        self.check_modality(modality)
        c = self.cfg
        if modality == "3d":
            min_points = max(c.num_group, c.group_size)
            from cmcr.pipeline.pointcloud import prepare_settings

            base = prepare_settings(self.n_points, use_color=False, seed=0, min_points=min_points)
            return {**base, "groups": c.num_group, "group_size": c.group_size,
                    "grouping": "farthest-point sampling from point 0 + kNN (deterministic)"}
        if modality == "image":
            return {"decode": "PIL, exif_transpose, first frame; alpha composited over background",
                    "transform": f"resize shorter side {c.image_size} (bilinear), centre crop {c.image_size}, "
                                 f"ImageNet normalisation (SLIP/ULIP eval)",
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": c.image_size}
        return {"tokenizer": "open_clip SimpleTokenizer (CLIP BPE)", "context_length": self.context_length,
                "clean": "NFC, whitespace collapsed", "truncation": "tokenizer truncates; flagged per row",
                "pool": "end-of-text token"}

    # -- CPU side ----------------------------------------------------------------------------
    def preprocessor(self, modality: str):
        self.check_modality(modality)
        if modality == "3d":
            return PointCloudPreprocessor(self.n_points, max(self.cfg.num_group, self.cfg.group_size))
        if modality == "image":
            from torchvision import transforms

            from cmcr.pipeline.openclip_encoder import ImagePreprocessor

            s = self.cfg.image_size
            return ImagePreprocessor(transforms.Compose([
                transforms.Resize(s, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(s), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
        from cmcr.pipeline.openclip_encoder import OpenClipTextPreprocessor

        return OpenClipTextPreprocessor(self._tokenizer, self.context_length)

    def encode(self, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        """As :meth:`Encoder.encode` (file paths, captions); for ``3d`` the inputs may also all be
        ``(N, 3|6)`` arrays (already decoded point clouds).

        Raises:
            SampleError: an input cannot be read or preprocessed (names it).
        """
        if modality != "3d" or not inputs or not all(isinstance(x, np.ndarray) for x in inputs):
            return super().encode(modality, inputs)
        pre = self.preprocessor(modality)
        items = []
        for i, x in enumerate(inputs):
            try:
                items.append(pre(x)[0])
            except SampleError as e:
                raise SampleError(f"point cloud #{i}: {e}") from e
        return self.embed(modality, self.collate(modality, items))

    # -- device side -------------------------------------------------------------------------
    def forward(self, modality: str, batch: Any) -> Any:
        if modality == "3d":
            return self.model.encode_pc(batch)
        if modality == "image":
            return self.model.encode_image(batch)
        return self.model.encode_text(batch)

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))
