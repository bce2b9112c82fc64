"""C-MCR projectors: small MLPs mapping one MCR's embeddings into the connected space.

Reference audio-visual head (released checkpoints; method.md section 2)::

    Linear(512 -> 1024) - BatchNorm1d - ReLU - Linear(1024 -> 512) - BatchNorm1d,  then L2-normalise

``depth`` counts the Linear layers; every Linear is followed by BatchNorm (when ``batchnorm``),
every block but the last by the activation (the last one too when ``final_activation``: the
released 3D head is one Linear-BN-ReLU block). Xavier-uniform weights, zero biases.
"""

from __future__ import annotations

import torch
from torch import nn

from cmcr.errors import ConfigError

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class Projector(nn.Module):
    """One side of a connector: ``(B, in_dim) float32 -> (B, out_dim) float32``, unit rows.

    Args:
        in_dim: input embedding width (the MCR's dim, 512 for CLIP ViT-B/32 and CLAP).
        hidden_dim: width of the hidden layers (used when ``depth >= 2``).
        out_dim: width of the connected space.
        depth: number of Linear layers (>= 1).
        batchnorm: BatchNorm1d after every Linear.
        activation: ``relu``, ``gelu``, ``silu``, ``tanh`` or ``leaky_relu``.
        final_activation: also apply the activation after the last block.
        dropout: dropout probability after each hidden activation.

    A batch of one row in training mode uses the BatchNorm running statistics (BatchNorm cannot
    estimate a variance from one row); the trainer never builds such batches anyway.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 512, *, depth: int = 2,
                 batchnorm: bool = True, activation: str = "relu", final_activation: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}")
        if depth < 1:
            raise ConfigError(f"projector depth must be >= 1, got {depth}")
        self.in_dim, self.hidden_dim, self.out_dim, self.depth = int(in_dim), int(hidden_dim), int(out_dim), int(depth)
        layers: list[nn.Module] = []
        widths = [self.in_dim] + [self.hidden_dim] * (depth - 1) + [self.out_dim]
        for i in range(depth):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if batchnorm:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            last = i == depth - 1
            if not last or final_activation:
                layers.append(_ACTIVATIONS[activation]())
            if not last and dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform Linear weights, zero biases, fresh BatchNorm statistics."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` -> ``(B, out_dim)`` L2-normalised rows."""
        if self.training and x.shape[0] == 1:
            was = [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)]
            for m in was:
                m.eval()
            try:
                y = self.net(x)
            finally:
                for m in was:
                    m.train()
        else:
            y = self.net(x)
        return nn.functional.normalize(y, dim=-1)


def build_projector(in_dim: int, cfg) -> Projector:  # noqa: ANN001
    """A :class:`Projector` from a :class:`cmcr.trainer.config.TrainConfig` (``cfg``)."""
    arch = projector_architecture(in_dim, cfg)
    return make_projector(arch)


def projector_architecture(in_dim: int, cfg) -> dict:  # noqa: ANN001
    """The architecture dict recorded in the connector (``in_dim`` plus the model fields of ``cfg``)."""
    return {"in_dim": int(in_dim), "hidden_dim": cfg.hidden_dim, "out_dim": cfg.out_dim, "depth": cfg.depth,
            "batchnorm": cfg.batchnorm, "activation": cfg.activation, "final_activation": cfg.final_activation,
            "dropout": cfg.dropout}


def make_projector(arch: dict) -> Projector:
    """Build a :class:`Projector` from an architecture dict (see :func:`projector_architecture`).

    Raises:
        ConfigError: a missing or unknown field.
    """
    want = {"in_dim", "hidden_dim", "out_dim", "depth", "batchnorm", "activation", "final_activation", "dropout"}
    if set(arch) != want:
        raise ConfigError(f"projector architecture fields {sorted(arch)} differ from the expected {sorted(want)}")
    a = dict(arch)
    return Projector(a.pop("in_dim"), a.pop("hidden_dim"), a.pop("out_dim"), **a)
