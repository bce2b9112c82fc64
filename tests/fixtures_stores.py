"""Pytest fixtures for the stores tests (registered in tests/conftest.py).

``store_factory`` (fixture) / :func:`build_test_store` (plain function) create a small store in a
temp folder with clustered, L2-normalised rows — structured like real embeddings, so approximate
indexes behave as they do on real data. Other areas may use them::

    def test_x(store_factory):
        store = store_factory(n=500, dim=32, modality="text")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmcr.stores.store import Store

TEST_ENCODER = {"family": "test", "architecture": "random", "weights": "none"}


def clustered_embeddings(n: int, dim: int, *, clusters: int = 16, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """``(n, dim) float32`` unit rows drawn around ``clusters`` random centres (deterministic)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_test_store(
    path: str | Path,
    *,
    n: int = 200,
    dim: int = 16,
    modality: str = "image",
    encoder: Mapping[str, Any] | None = None,
    parts: int = 1,
    dtype: str = "float16",
    metadata: bool = True,
    key_prefix: str | None = None,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
) -> Store:
    """Create a store at ``path`` with ``n`` rows split into ``parts`` parts.

    Keys are ``"{key_prefix or modality}-{i:06d}"``; metadata columns (when ``metadata``) are
    ``label`` (int64, ``i % 5``) and ``caption`` (str). ``embeddings`` overrides the random rows.
    """
    x = clustered_embeddings(n, dim, seed=seed) if embeddings is None else np.asarray(embeddings)
    store = Store.create(path, modality=modality, encoder=dict(encoder or TEST_ENCODER), dim=dim, dtype=dtype)
    prefix = key_prefix or modality
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p in range(parts):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        keys = [f"{prefix}-{i:06d}" for i in range(lo, hi)]
        meta = {"label": [i % 5 for i in range(lo, hi)], "caption": [f"item {i}" for i in range(lo, hi)]} \
            if metadata else None
        store.append_part(keys, x[lo:hi], metadata=meta, source=f"test-part-{p}")
    return store


@pytest.fixture
def store_factory(tmp_path: Path) -> Callable[..., Store]:
    """Factory fixture: ``store_factory(n=200, dim=16, modality="image", name=None, **kwargs)`` -> Store
    in ``tmp_path/<name or modality>`` (see :func:`build_test_store` for the keyword arguments)."""

    def factory(name: str | None = None, **kwargs: Any) -> Store:
        return build_test_store(tmp_path / (name or kwargs.get("modality", "image")), **kwargs)

    return factory
