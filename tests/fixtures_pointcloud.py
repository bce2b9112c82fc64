"""Pytest fixtures for the 3d modality (registered in tests/conftest.py).

* :class:`TinyPointEncoder` — a random-init, 3d-only test encoder (shared per-point MLP + max-pool,
  PointNet-style, 16-d) that follows the encode loop's contract of ``pipeline/pointcloud.py``: its
  ``preprocessor("3d")`` takes decoded points and runs ``prepare_points``. Not a product encoder
  (the ULIP-2 PointBERT encoder is ``ulip:...``); it exists so the 3d decode stage, failures and
  stores can be tested without ULIP.
* ``messy_3d`` — a folder of good and bad 3D files (names say what they hold).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmcr.pipeline.encoders import Encoder
from cmcr.pipeline.pointcloud import PointCloudPreprocessor

TINY_POINTS_SPEC = "test_points:tiny-pointnet@random"


class TinyPointEncoder(Encoder):
    """Random-init PointNet-style encoder for tests: ``(B, P, 3|6)`` -> ``(B, 16)``."""

    family = "test_points"
    modalities = ("3d",)
    dim = 16

    def __init__(self, n_points: int = 256, use_color: bool = False, min_points: int = 32, seed: int = 0,
                 device: str = "cpu"):
        import torch

        super().__init__(device=device)
        self._pre = PointCloudPreprocessor(n_points=n_points, use_color=use_color, min_points=min_points)
        g = torch.Generator().manual_seed(seed)
        c = 6 if use_color else 3
        self.w1 = torch.randn(c, 32, generator=g) / c**0.5
        self.w2 = torch.randn(32, self.dim, generator=g) / 32**0.5
        self.seed = seed

    def identity(self) -> dict[str, Any]:
        return {"family": self.family, "architecture": "tiny-pointnet", "weights": "random", "seed": self.seed,
                "dim": self.dim}

    def preprocessing(self, modality: str) -> dict[str, Any]:
        self.check_modality(modality)
        return self._pre.settings()

    def preprocessor(self, modality: str):
        self.check_modality(modality)
        return self._pre

    def forward(self, modality: str, batch: Any) -> Any:
        h = (batch @ self.w1).relu() @ self.w2  # (B, P, D): the same MLP on every point
        return h.max(dim=1).values


@pytest.fixture(scope="session")
def tiny_points() -> TinyPointEncoder:
    return TinyPointEncoder()


def sphere_points(n: int, seed: int = 0, color: bool = False) -> np.ndarray:
    """``n`` points on the unit sphere (float32), with random rgb in [0, 1] when ``color``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if color:
        x = np.concatenate([x, rng.random((n, 3))], axis=1)
    return x.astype(np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def mesh_bytes(mesh: Any, ext: str) -> bytes:
    out = mesh.export(file_type=ext)
    return out if isinstance(out, bytes) else out.encode()


#: File names in ``messy_3d`` that must encode, and those that must fail (with a word of the reason).
GOOD_3D = ("box.obj", "box.off", "box.stl", "box.glb", "colored_box.ply", "cloud.ply", "cloud_xyzrgb.npy",
           "cloud_uint8_rgb.npy", "nonmanifold.obj", "open_sheet.off")
BAD_3D = {
    "zero_bytes.ply": "zero-byte",
    "empty.obj": "no vertices",
    "all_same_points.npy": "same point",
    "zero_area.obj": "zero total surface area",
    "nan_points.npy": "NaN/Inf",
    "inf_vertex.obj": "NaN/Inf",
    "few_points.npy": "distinct points",
    "wrong_columns.npy": "expected an (N, 3)",
    "transposed.npy": "transposed",
    "garbage.ply": "cannot read",
    "claims_billion_vertices.ply": "above the limit",
}


@pytest.fixture
def messy_3d(tmp_path: Path) -> Path:
    """A folder with the files of :data:`GOOD_3D` and :data:`BAD_3D`."""
    import trimesh

    d = tmp_path / "messy3d"
    d.mkdir()
    box = trimesh.creation.box((1.0, 2.0, 3.0))
    for ext in ("obj", "off", "stl", "glb"):
        (d / f"box.{ext}").write_bytes(mesh_bytes(box, ext))
    colored = box.copy()
    colored.visual.vertex_colors = np.tile([255, 0, 0, 255], (len(box.vertices), 1)).astype(np.uint8)
    (d / "colored_box.ply").write_bytes(mesh_bytes(colored, "ply"))
    cloud = sphere_points(600, seed=1)
    (d / "cloud.ply").write_bytes(mesh_bytes(trimesh.PointCloud(cloud), "ply"))
    (d / "cloud_xyzrgb.npy").write_bytes(npy_bytes(sphere_points(700, seed=2, color=True)))
    u8 = np.concatenate([sphere_points(300, 3) * 100, np.full((300, 3), 255)], 1).astype(np.uint8)
    (d / "cloud_uint8_rgb.npy").write_bytes(npy_bytes(u8))
    # three triangles on one edge (non-manifold), and a single open square: both have area to sample
    (d / "nonmanifold.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 -1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 2 5\n")
    (d / "open_sheet.off").write_text("OFF\n4 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n3 0 2 3\n")
    # bad ones
    (d / "zero_bytes.ply").write_bytes(b"")
    (d / "empty.obj").write_text("# nothing here\n")
    (d / "all_same_points.npy").write_bytes(npy_bytes(np.ones((1000, 3), np.float32)))
    (d / "zero_area.obj").write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\nf 1 3 4\n")
    nan = sphere_points(1000)
    nan[17, 1] = np.nan
    (d / "nan_points.npy").write_bytes(npy_bytes(nan))
    (d / "inf_vertex.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 inf 0\nf 1 2 3\n")
    (d / "few_points.npy").write_bytes(npy_bytes(sphere_points(10)))
    (d / "wrong_columns.npy").write_bytes(npy_bytes(np.zeros((100, 4), np.float32)))
    (d / "transposed.npy").write_bytes(npy_bytes(sphere_points(500).T.copy()))
    (d / "garbage.ply").write_bytes(b"ply\nformat nonsense\n" + b"\x00\x01" * 100)
    header = (b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\nproperty float x\n"
              b"property float y\nproperty float z\nend_header\n")
    (d / "claims_billion_vertices.ply").write_bytes(header + b"\x00" * 120)
    return d
