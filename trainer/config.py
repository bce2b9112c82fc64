"""Training configuration of a connector (one dataclass, loadable from TOML, every value recorded).

Defaults and where they come from (method.md; Wang et al., "Connecting Multi-modal Contrastive
Representations", NeurIPS 2023, arXiv 2305.14381; the authors' released checkpoints):

=====================  ==========  ================================================================
field                  default     source
=====================  ==========  ================================================================
hidden_dim             1024        released audio-visual head: Linear(512->1024)
out_dim                512         released head: Linear(1024->512)
depth                  2           released audio-visual head: Linear-BN-ReLU-Linear-BN (3D: 1)
batchnorm              true        released heads (BatchNorm1d after every Linear)
activation             relu        released heads
final_activation       false       audio-visual head ends with BN; the released 3D head ends with ReLU
dropout                0.0         none in the released heads
temperature            0.01        tau_c of the inter-MCR InfoNCE (paper, section 3.3 / method.md 3)
memory_temperature     0.01        tau_m of the semantic completion (paper, section 3.1 / method.md 1)
noise_std              0.025       sigma of the Gaussian noise (paper sweep 0.02-0.06; method.md 1)
intra_weight           0.1         lambda of the intra-MCR term (method.md 3)
use_completion         true        semantic enhancement on (false = the paper's ablation)
completion             exact       exact online softmax over the whole memory (ours)
completion_topk        256         neighbours of the top-k completion (ours; agreement measured in
                                   benchmarks/bench_connect.py)
queue_capacity         65536       rows of the memory queue when completion = "queue" (ours)
centric                shared      sources of training pairs, comma-separated: ``shared`` (= the shared
                                   modality's name, e.g. ``text``: the caption-centric pairs of C-MCR)
                                   and/or a memory's modality (``audio``, ``image``; ``memory_a`` /
                                   ``memory_b`` name them by role): memory-centric pairs (Ex-MCR idea;
                                   method.md "Memory-centric pseudo pairs"; ours)
centric_weights        {}          loss weight per source (modality or role name -> float > 0;
                                   missing = 1.0)
epochs                 20          "tens of epochs" (method.md 3; unpublished by the authors)
batch_size             4096        method.md 3 (unpublished by the authors)
lr                     1e-3        method.md 3, AdamW (unpublished by the authors)
weight_decay           0.01        torch AdamW default
warmup_steps           0           ours (cosine decay from the first step)
min_lr_ratio           0.0         cosine decays to 0 (ours)
val_fraction           0.02        held-out shared pairs for model selection (method.md 3)
val_max                10000       cap on held-out pairs (ours)
seed                   0           recorded in the connector
device                 auto        CUDA when present, else CPU
keep_checkpoints       2           checkpoints kept on disk (ours)
name_a, name_b         A, B        MCR names written into the connector (e.g. clip, clap)
=====================  ==========  ================================================================

A TOML file may group the keys in tables (``[model]``, ``[loss]``, ``[completion]``,
``[optim]``, ``[run]``); table names are ignored, keys must be unique (see ``configs/default.toml``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from cmcr.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the tomli backport (declared in pyproject for python_version < 3.11)
    import tomli as tomllib

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu")
COMPLETIONS = ("exact", "topk", "queue")


@dataclass
class TrainConfig:
    """All settings of a ``cmcr connect`` run (see the module docstring for defaults and sources)."""

    # projector architecture
    hidden_dim: int = 1024
    out_dim: int = 512
    depth: int = 2
    batchnorm: bool = True
    activation: str = "relu"
    final_activation: bool = False
    dropout: float = 0.0
    # losses
    temperature: float = 0.01
    memory_temperature: float = 0.01
    noise_std: float = 0.025
    intra_weight: float = 0.1
    use_completion: bool = True
    # completion
    completion: str = "exact"
    completion_topk: int = 256
    queue_capacity: int = 65536
    # sources of pseudo pairs (method.md "Memory-centric pseudo pairs")
    centric: str = "shared"
    centric_weights: dict[str, float] = field(default_factory=dict)
    # optimisation
    epochs: int = 20
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # run
    val_fraction: float = 0.02
    val_max: int = 10000
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: int = 2
    name_a: str = "A"
    name_b: str = "B"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an out-of-range value (message names the field)."""
        checks = [
            (self.hidden_dim > 0, "hidden_dim", "> 0"), (self.out_dim > 0, "out_dim", "> 0"),
            (self.depth >= 1, "depth", ">= 1"), (0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            (self.temperature > 0, "temperature", "> 0"), (self.memory_temperature > 0, "memory_temperature", "> 0"),
            (self.noise_std >= 0, "noise_std", ">= 0"), (self.intra_weight >= 0, "intra_weight", ">= 0"),
            (self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}"),
            (self.completion in COMPLETIONS, "completion", f"one of {COMPLETIONS}"),
            (self.completion_topk >= 1, "completion_topk", ">= 1"),
            (self.queue_capacity >= 1, "queue_capacity", ">= 1"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2 (InfoNCE needs negatives)"),
            (self.lr > 0, "lr", "> 0"), (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]"),
            (0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)"), (self.val_max >= 0, "val_max", ">= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ConfigError(f"config value {name}={getattr(self, name)!r} is invalid: must be {want}")
        names = self.centric_names()
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"config value centric={self.centric!r} is invalid: give one or more distinct source "
                              f"names, comma-separated (e.g. text,audio,image; 'shared' = the shared modality)")
        for name, w in self.centric_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"config value centric_weights.{name}={w!r} is invalid: must be a number >= 0")

    def centric_names(self) -> list[str]:
        """The source names of ``centric`` as given (``"text, audio"`` -> ``["text", "audio"]``)."""
        return [n.strip() for n in str(self.centric).split(",") if n.strip()]

    def to_dict(self) -> dict[str, Any]:
        """All values as a JSON-able dict (recorded in checkpoints and the connector file)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (``None`` values are ignored; unknown names raise ConfigError)."""
        return from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    def training_fields(self) -> dict[str, Any]:
        """The values that must not change on ``--resume`` (all but epochs, device, keep_checkpoints)."""
        d = self.to_dict()
        for name in ("epochs", "device", "keep_checkpoints"):
            d.pop(name)
        return d


def from_dict(values: dict[str, Any], *, where: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a flat dict (types are coerced to the field types).

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {unknown}; known keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = known[name].default
        if name == "extra":
            kwargs[name] = dict(value)
            continue
        if name == "centric_weights":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: config key 'centric_weights' must be a table of source name -> weight "
                                  f"(e.g. centric_weights = {{ text = 1.0, audio = 0.5 }}), got {value!r}")
            kwargs[name] = {str(k): (float(v) if isinstance(v, int) and not isinstance(v, bool) else v)
                            for k, v in value.items()}
            continue
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError(f"expected true/false, got {value!r}")
                kwargs[name] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError(f"expected an integer, got {value!r}")
                kwargs[name] = int(value)
            elif isinstance(default, float):
                kwargs[name] = float(value)
            else:
                kwargs[name] = str(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: config key {name!r}: {e}") from e
    return TrainConfig(**kwargs)


def preset_names() -> list[str]:
    """Names of the bundled config presets (``trainer/configs/<name>.toml``: ``default``, ``3d``)."""
    return sorted(p.name[:-5] for p in resources.files("cmcr.trainer").joinpath("configs").iterdir()
                  if p.name.endswith(".toml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """An existing file as given, else the bundled preset of that name (``3d`` -> ``configs/3d.toml``).

    Raises:
        ConfigError: neither a file nor a preset name (lists the presets).
    """
    p = Path(path)
    if p.exists():
        return p
    name = str(path)[:-5] if str(path).endswith(".toml") else str(path)
    if name in preset_names():
        return Path(str(resources.files("cmcr.trainer").joinpath(f"configs/{name}.toml")))
    raise ConfigError(f"config {path}: no such file and not a preset name; presets: {preset_names()} "
                      f"(e.g. --config 3d for the released CLIP-ULIP 3D head)")


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Load a TOML config (tables are flattened) over the defaults, then apply ``overrides``
    (``None`` values are ignored: CLI flags that were not given). ``path`` is a TOML file or a bundled
    preset name (:func:`preset_names`: ``3d`` = the released CLIP-ULIP 3D head).

    Raises:
        ConfigError: unreadable TOML, a key given twice in different tables, an unknown key, a bad value.
    """
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = resolve_config_path(path)
        where = str(path)
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the TOML config ({e})") from e
        values = flatten_tables(doc, where=where)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(values, where=where)


def flatten_tables(doc: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Flatten ``{"model": {"depth": 2}, "seed": 0}`` to ``{"depth": 2, "seed": 0}`` (``extra`` stays a table)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        items = value.items() if isinstance(value, dict) and key not in ("extra", "centric_weights") else [(key, value)]
        for k, v in items:
            if k in out:
                raise ConfigError(f"{where}: key {k!r} is given twice; give each key once")
            out[k] = v
    return out


def default_config_text() -> str:
    """The bundled ``configs/default.toml`` (documented defaults)."""
    return resources.files("cmcr.trainer").joinpath("configs/default.toml").read_text()
