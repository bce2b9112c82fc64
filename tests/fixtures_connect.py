"""Pytest fixtures for the connect tests (registered in tests/conftest.py).

``make_store`` writes an ordinary store from an array; ``tiny_synthetic`` builds the stores of a
tiny synthetic MCR pair (see :mod:`cmcr.trainer.synthetic`); ``tiny_trained`` is one connector
trained on them, shared by the session; ``one_torch_thread`` runs a test module's tiny models on
one torch thread (on a loaded 2-core machine, 2 threads make tiny batches 3-5x slower).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmcr.stores.store import Store

ENC_A = {"family": "test", "architecture": "mcr-a", "weights": "random", "dim": 16}
ENC_B = {"family": "test", "architecture": "mcr-b", "weights": "random", "dim": 16}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``(n, d)`` float32 random unit rows."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(path: Path, emb: np.ndarray, *, modality: str, encoder: dict[str, Any],
                keys: Sequence[str] | None = None, metadata: dict[str, Sequence[Any]] | None = None,
                dtype: str = "float32", parts: int = 1) -> Store:
    """Write ``emb`` ``(N, D)`` as a store at ``path`` (``parts`` parts, keys ``k000000``... by default)."""
    keys = list(keys) if keys is not None else [f"k{i:06d}" for i in range(len(emb))]
    store = Store.create(path, modality=modality, encoder=encoder, dim=emb.shape[1], dtype=dtype)
    bounds = np.linspace(0, len(emb), parts + 1).astype(int)
    for i in range(parts):
        s, e = bounds[i], bounds[i + 1]
        meta = {k: list(v)[s:e] for k, v in metadata.items()} if metadata else None
        store.append_part(keys[s:e], emb[s:e], metadata=meta, source=f"part{i}")
    return store


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Store]:
    """``make_store(name, emb, modality=..., encoder=..., keys=None, metadata=None, parts=1) -> Store``
    in ``tmp_path / name``."""

    def _make(name: str, emb: np.ndarray, **kwargs: Any) -> Store:
        return write_store(tmp_path / name, emb, **kwargs)

    return _make


TINY_SPEC = dict(dim=16, latent_dim=4, hidden=32, classes=5, cone=0.3, semantic=0.6, item=0.1, n_shared=240,
                 n_memory_a=300, n_memory_b=300, n_eval=60, seed=0)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of a tiny synthetic MCR pair's stores (see :func:`cmcr.trainer.synthetic.generate_synthetic_stores`);
    shared by the session: tests must not write into these stores."""
    from cmcr.trainer.synthetic import SyntheticSpec, generate_synthetic_stores

    return generate_synthetic_stores(tmp_path_factory.mktemp("tiny_synthetic"), SyntheticSpec(**TINY_SPEC))


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """Run the module's torch work on one intra-op thread (restored afterwards). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_trained(tiny_synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of one connector trained on :func:`tiny_synthetic` with ``tiny_config(epochs=6)`` (no loss
    curve); shared by the session: tests must not write into it (copy it first)."""
    import torch

    from cmcr.trainer.loop import train_connector

    out = tmp_path_factory.mktemp("tiny_trained") / "conn"
    p = tiny_synthetic
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_connector(p["text_a"], p["text_b"], p["image_a"], p["audio_b"], out, tiny_config(epochs=6), plot=False)
    finally:
        torch.set_num_threads(before)
    return out


def tiny_config(**changes: Any):  # noqa: ANN201
    """A training config that runs in well under a second on the tiny synthetic stores."""
    from cmcr.trainer.config import TrainConfig

    base = TrainConfig(hidden_dim=32, out_dim=16, epochs=2, batch_size=64, lr=2e-3, device="cpu",
                       val_fraction=0.1, name_a="mcr-a", name_b="mcr-b")
    return base.replace(**changes)
