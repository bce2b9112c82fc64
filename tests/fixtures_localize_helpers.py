"""Helpers of the localisation tests: a connector over the tiny random-init CLIP / CLAP encoders."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CLIP = "open_clip:cmcr-tiny-clip@random"
TINY_CLAP = "clap:cmcr-tiny-clap@random"


def linear_connector(folder: Path, clip_identity: dict, clap_identity: dict, *, dim: int = 64,
                     weight_a: torch.Tensor | None = None, weight_b: torch.Tensor | None = None, seed: int = 0) -> Path:
    """Save a connector with one Linear (no BatchNorm) per side: CLIP (image, text) on side A, CLAP (audio, text)
    on side B. ``weight_*``: ``(dim, dim)`` Linear weights (default: random)."""
    from cmcr.trainer.connector import Connector, SideInfo
    from cmcr.trainer.projector import make_projector

    arch = {"in_dim": dim, "hidden_dim": dim, "out_dim": dim, "depth": 1, "batchnorm": False, "activation": "relu",
            "final_activation": False, "dropout": 0.0}
    torch.manual_seed(seed)
    projs = {s: make_projector(arch) for s in "AB"}
    for side, w in (("A", weight_a), ("B", weight_b)):
        if w is not None:
            lin = next(m for m in projs[side].modules() if isinstance(m, torch.nn.Linear))
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.zero_()
    sides = {"A": SideInfo("clip", dict(clip_identity), ["text", "image"], dim, "text"),
             "B": SideInfo("clap", dict(clap_identity), ["text", "audio"], dim, "text")}
    return Connector(sides=sides, projectors=projs, architecture={"A": arch, "B": arch}).save(folder)
