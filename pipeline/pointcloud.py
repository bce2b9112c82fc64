"""Point clouds and meshes (the ``3d`` modality): reading, checks and preprocessing (CPU side).

Two steps, one per side of the encode loop's contract with a 3D encoder (ULIP-2 PointBERT):

1. **Decode** (the encode loop's decode stage, :func:`decode_points` / :func:`load_points`): file
   bytes + extension -> a raw point array ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb, float32, every
   value finite, rgb in [0, 1], coordinates in the file's own units. Formats
   (:data:`POINTCLOUD_EXTENSIONS`):

   * ``.npy`` — a plain array ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb (any float/int dtype; rgb in
     0..1, or 0..255 when the array is uint8 or its colour columns exceed 1), read with
     ``np.load(allow_pickle=False)``; columns 4-6 that are unit vectors with negative entries are
     normals (ModelNet's ``*_normal_resampled``) and are dropped. The header's shape is checked
     against the limits before any data is read.
   * ``.npy`` holding a **pickled dict** (OpenShape's Objaverse form that the C-MCR authors ship:
     keys ``xyz``, ``rgb``, ``id``, ``text``, ...) is read **without executing the pickle**: a
     restricted unpickler admits only the globals numpy arrays, dtypes and scalars need
     (:data:`SAFE_PICKLE_GLOBALS`, an exact allowlist) and then dicts, lists, tuples, strings,
     bytes and numbers; anything else is refused with a conversion hint, and nothing of the file
     runs.
   * ``.ply`` (point cloud or mesh), ``.obj``, ``.off`` (ModelNet's format), ``.stl``, ``.glb`` —
     read with trimesh from memory (``process=False``; no resolver, so no file or URL a mesh
     names is ever opened). A mesh (faces present) is sampled **uniformly on its surface**
     (area-weighted, :func:`trimesh.sample.sample_surface` with a fixed seed) to
     ``mesh_samples`` points (10000, as the release clouds and ModelNet's resampled clouds);
     vertex / face colours (or a texture, converted to vertex colours) are interpolated onto the
     samples. A file with vertices but no faces is a point cloud. Scenes (``.glb``, multi-object
     ``.obj``) are flattened with their transforms. Non-manifold or open meshes are sampled like
     any other surface (sampling needs triangles with area, not a closed manifold).

   Limits (:class:`PointCloudDecoding`, configurable; ``cmcr encode --max-3d-mb/--max-3d-points``):
   file bytes, points/vertices and faces, checked from the header (npy, ply, off, stl, obj line
   counts) before decoding where the format allows, and again after.

2. **Prepare** (the encoder's ``preprocessor("3d")``, :func:`prepare_points`): raw points ->
   ``(n_points, 3)`` or ``(n_points, 6)`` float32, C-contiguous, deterministic:

   a. refuse arrays that are not ``(N, 3|6)``, hold NaN/Inf, whose points are all equal, or that
      have fewer than ``min_points`` **distinct** points (default 512, PointBERT's group count:
      it picks 512 group centres by farthest-point sampling);
   b. fixed point count: more than ``n_points`` points -> farthest-point sampling (FPS, exact,
      numpy; the first point is drawn with ``seed``; clouds above ``FPS_MAX_INPUT`` points are
      first subsampled uniformly with ``seed``); fewer -> every point once plus a seeded draw with
      replacement for the rest. ULIP's default is 8192 (its ModelNet40 test clouds are 8192 FPS
      points of 10000); the release clouds have 10000;
   c. centre on the mean and scale so the farthest point is at distance 1 (the unit sphere,
      ULIP / PointNet++'s ``pc_normalize``), after sampling as ULIP does;
   d. colour: ``use_color=False`` keeps xyz; ``use_color=True`` keeps rgb in [0, 1], or fills
      0.4 grey for clouds without colour (OpenShape's convention).

   :func:`prepare_settings` gives the dict an encoder records as its ``preprocessing("3d")``.

**Contract with the encoder.** The encode loop (``pipeline/encode.py``, both engines, and
:meth:`Encoder.encode <cmcr.pipeline.encoders.Encoder.encode>` for search queries) runs step 1 and
hands ``Encoder.preprocessor("3d")`` the **decoded array** (``np.ndarray (N, 3|6) float32``, not
bytes). The preprocessor runs step 2 with its own settings (``n_points``, ``use_color``,
``min_points`` = its group count, ``seed``) and returns a tensor of that array plus an info dict;
the loop adds the decode facts (``format``, ``vertices``, ``faces``, ``has_color``, ``radius``) to
the row's metadata and records :meth:`PointCloudDecoding.identity` under
``preprocessing["decode"]`` of the store manifest. Any bad input raises
:class:`~cmcr.pipeline.audio.SampleError` (one failure record, the run goes on).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.stageclock import timed_decode

log = logging.getLogger(__name__)

#: File extensions of the 3d modality (one list; see :mod:`cmcr.pipeline.media`).
POINTCLOUD_EXTENSIONS = ("npy", "ply", "obj", "off", "stl", "glb")
MESH_EXTENSIONS = ("ply", "obj", "off", "stl", "glb")
DEFAULT_N_POINTS = 8192
DEFAULT_MIN_POINTS = 512
DEFAULT_MESH_SAMPLES = 10_000
#: Grey of clouds without colour when the encoder uses colour (OpenShape's convention).
DEFAULT_GREY = 0.4
#: Clouds with more points are subsampled (uniformly, seeded) to this many before FPS (its cost is
#: points x n_points: ~0.5 s for 10000 -> 8192 on one core).
FPS_MAX_INPUT = 32_768
READER_VERSION = 1

_CONVERT_HINT = (
    "convert it once, in an environment where you trust the file, to a plain (N, 6) float32 array: "
    "python -c \"import numpy as np; d = np.load('IN.npy', allow_pickle=True).item(); "
    "np.save('OUT_xyzrgb.npy', np.concatenate([d['xyz'], d['rgb']], 1).astype('float32'))\""
)


@dataclass(frozen=True)
class PointCloudDecoding:
    """Decode-stage settings of the 3d modality (step 1 of the module docstring).

    Attributes:
        mesh_samples: points sampled on a mesh's surface (area-weighted, seeded).
        seed: seed of the surface sampling.
        max_bytes: largest file accepted, in bytes (default 256 MiB).
        max_points: most points (point clouds) or vertices (meshes) accepted (default 5 000 000).
        max_faces: most faces of a mesh accepted (default 10 000 000).
    """

    mesh_samples: int = DEFAULT_MESH_SAMPLES
    seed: int = 0
    max_bytes: int = 256 * 2**20
    max_points: int = 5_000_000
    max_faces: int = 10_000_000

    def __post_init__(self) -> None:
        for name in ("mesh_samples", "max_bytes", "max_points", "max_faces"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def identity(self) -> dict[str, Any]:
        """What changes the decoded points (recorded in the store manifest, ``preprocessing["decode"]``);
        the limits only decide which files fail, so they are not part of it."""
        return {"reader": f"cmcr.pointcloud/{READER_VERSION}", "mesh_samples": int(self.mesh_samples),
                "mesh_sampling": "uniform on the surface, area-weighted (trimesh.sample.sample_surface)",
                "seed": int(self.seed)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prepare_settings(n_points: int = DEFAULT_N_POINTS, use_color: bool = False, seed: int = 0,
                     min_points: int = DEFAULT_MIN_POINTS) -> dict[str, Any]:
    """The preprocessing dict an encoder records for :func:`prepare_points` with these arguments."""
    return {"n_points": int(n_points), "use_color": bool(use_color), "seed": int(seed),
            "min_points": int(min_points), "sampling": "farthest-point (exact; seeded start)",
            "fps_max_input": FPS_MAX_INPUT, "normalize": "centre on the mean, scale to the unit sphere",
            "grey_without_color": DEFAULT_GREY, "channels": 6 if use_color else 3}


# ----------------------------------------------------------------------------------- decode
def load_points(data: bytes, ext: str, decoding: PointCloudDecoding | None = None,
                what: str = "point cloud") -> np.ndarray:
    """Decode a 3D file's bytes to a raw point array (step 1 of the module docstring).

    Args:
        data: file bytes.
        ext: the file's extension (``npy``, ``ply``, ``obj``, ``off``, ``stl``, ``glb``; case and
            leading dot ignored; a webdataset extension such as ``xyz.npy`` uses its last part).
        decoding: limits and mesh sampling (defaults of :class:`PointCloudDecoding`).
        what: how messages name the input (a file or sample key).

    Returns:
        ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb float32; finite; rgb in [0, 1]; file units.

    Raises:
        SampleError: unknown extension, unreadable / empty / degenerate / too large input,
            NaN/Inf values, or a pickle that needs more than arrays, dicts, lists and strings.
    """
    return decode_points(data, ext, decoding, what)[0]


@timed_decode
def decode_points(data: bytes, ext: str, decoding: PointCloudDecoding | None = None,
                  what: str = "point cloud") -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`load_points` plus the per-row facts recorded in the store's metadata columns.

    Returns:
        ``(points, info)``; ``info``: ``format`` (extension), ``vertices`` (points of a cloud or
        vertices of a mesh), ``faces`` (``None`` for a point cloud), ``has_color`` (bool) and
        ``radius`` (distance of the farthest point from the centroid, in file units).
    """
    dec = decoding or PointCloudDecoding()
    ext = str(ext).lower().lstrip(".").rsplit(".", 1)[-1]
    if ext not in POINTCLOUD_EXTENSIONS:
        raise SampleError(f"{what}: unknown 3D format .{ext}; use one of {', '.join(POINTCLOUD_EXTENSIONS)}")
    if not data:
        raise SampleError(f"{what}: zero-byte .{ext} file")
    if len(data) > dec.max_bytes:
        raise SampleError(f"{what}: {len(data)} bytes is above the 3D file size limit {dec.max_bytes} "
                          f"(raise it with --max-3d-mb)")
    if ext == "npy":
        points, faces = _read_npy(data, dec, what), None
        vertices = len(points)
    else:
        points, vertices, faces = _read_mesh(data, ext, dec, what)
    _check_finite(points, what)
    if len(points) == 0:
        raise SampleError(f"{what}: no points (empty {'mesh' if faces else 'point cloud'})")
    xyz = points[:, :3].astype(np.float64)
    radius = float(np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1).max()))
    info = {"format": ext, "vertices": int(vertices), "faces": None if faces is None else int(faces),
            "has_color": points.shape[1] == 6, "radius": radius}
    return np.ascontiguousarray(points, dtype=np.float32), info


def _check_finite(points: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise SampleError(f"{what}: {len(rows)} point(s) with NaN/Inf values (first at row {int(rows[0])}); "
                          f"remove or fix them")


def _check_count(n: int, limit: int, noun: str, what: str) -> None:
    if n > limit:
        raise SampleError(f"{what}: {n} {noun} is above the limit {limit} (raise it with --max-3d-points "
                          f"or split the object)")


def _columns(arr: np.ndarray, what: str, integer_rgb: bool = False) -> np.ndarray:
    """A ``(N, 3|6)`` array -> float32 xyz [+ rgb in 0..1] (normals dropped)."""
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        hint = ""
        if arr.ndim == 2 and arr.shape[0] in (3, 6) and arr.shape[1] not in (3, 6):
            hint = f"; it looks transposed: save arr.T, shape ({arr.shape[1]}, {arr.shape[0]})"
        raise SampleError(f"{what}: expected an (N, 3) xyz or (N, 6) xyz+rgb array, got shape {arr.shape}{hint}")
    if arr.dtype.kind not in "fiu":
        raise SampleError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    if out.shape[1] == 6:
        extra = out[:, 3:]
        finite = np.isfinite(extra).all()
        if finite and (extra < 0).any():
            norms = np.linalg.norm(extra.astype(np.float64), axis=1)
            if np.allclose(norms, 1.0, atol=1e-2):
                return np.ascontiguousarray(out[:, :3])  # xyz + normals: the normals are not used
            raise SampleError(f"{what}: columns 4-6 hold negative values, so they are neither rgb (0..1 or 0..255) "
                              f"nor unit normals; save xyz only, shape (N, 3)")
        if finite and (integer_rgb or extra.max(initial=0.0) > 1.0):
            if extra.max(initial=0.0) > 255.0:
                raise SampleError(f"{what}: colour values up to {extra.max():g}; expected rgb in 0..1 or 0..255")
            out[:, 3:] = extra / 255.0
    return out


# --- npy
def _npy_header(buf: io.BytesIO, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(buf)
        if version == (1, 0):
            return npf.read_array_header_1_0(buf)
        if version == (2, 0):
            return npf.read_array_header_2_0(buf)
        return npf._read_array_header(buf, version)  # (3, 0): same layout, utf-8 header
    except Exception as e:  # ValueError on a bad magic/header
        raise SampleError(f"{what}: not a valid .npy file ({type(e).__name__}: {e})") from e


def _read_npy(data: bytes, dec: PointCloudDecoding, what: str) -> np.ndarray:
    buf = io.BytesIO(data)
    shape, fortran, dtype = _npy_header(buf, what)
    if dtype.hasobject:
        return _read_pickled_npy(buf.read(), dec, what)
    if len(shape) == 2 and shape[1] in (3, 6):
        _check_count(int(shape[0]), dec.max_points, "points", what)
    elif int(np.prod(shape, dtype=np.int64)) > 6 * dec.max_points:
        _check_count(int(np.prod(shape, dtype=np.int64)) // 3, dec.max_points, "points", what)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise SampleError(f"{what}: cannot read .npy ({type(e).__name__}: {e})") from e
    return _columns(arr, what, integer_rgb=arr.dtype == np.uint8)


# --- the restricted unpickler for pickled .npy (OpenShape / Objaverse dicts)
class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a restricted pickle: usable only as the class argument
    of ``_reconstruct``; calling it (``ndarray(huge_shape)``) is refused."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("numpy.ndarray may only be rebuilt through _reconstruct")


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as its pickles call it: an empty ndarray that ``__setstate__`` then
    fills (numpy checks the data length there). Any other class or shape is refused (no allocation
    from a size the file claims)."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("_reconstruct is only allowed as _reconstruct(numpy.ndarray, (0,), ...)")
    return np.ndarray((0,), dtype="b")


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar with a non-dtype argument")
    if dtype.hasobject:
        return data
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("numpy scalar with invalid data")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``latin1`` only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _dtype(*args: Any) -> np.dtype:
    if not args or not isinstance(args[0], str):
        raise pickle.UnpicklingError("numpy.dtype may only be built from a type string")
    return np.dtype(args[0])


#: ``(module, name)`` -> what a restricted pickle gets for that global: exactly what numpy arrays,
#: dtypes and scalars need (numpy 1.x and 2.x module names) and protocol-2 bytes. Nothing else.
SAFE_PICKLE_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _latin1_encode,
}
_SAFE_LEAVES = (str, bytes, int, float, bool, complex, type(None), np.generic)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = SAFE_PICKLE_GLOBALS.get((module, name))
        if found is None:  # (protocol 0-2 pickles spell builtins "__builtin__")
            raise _Refused(f"{'builtins' if module == '__builtin__' else module}.{name}")
        return found


class _Refused(pickle.UnpicklingError):
    """A pickle names a global outside :data:`SAFE_PICKLE_GLOBALS`."""


def restricted_unpickle(data: bytes, what: str = "pickle") -> Any:
    """Read a pickle that may hold only numpy arrays/dtypes/scalars, dicts, lists, tuples, strings,
    bytes and numbers, without running any code it names.

    Arrays are rebuilt by numpy's own ``__setstate__`` (data sizes checked by numpy); every other
    global is refused before it is imported.

    Raises:
        SampleError: the pickle names any other global, or is malformed (names ``what`` and the fix).
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise SampleError(f"{what}: refused to unpickle: it references {e}, which could run code; cmcr reads "
                          f"only numpy arrays, dicts, lists and strings from pickled files. To use it, "
                          f"{_CONVERT_HINT}") from None
    except RecursionError:
        raise SampleError(f"{what}: pickle nested too deeply") from None
    except Exception as e:  # malformed stream, bad array state...
        raise SampleError(f"{what}: unreadable pickle ({type(e).__name__}: {e}); {_CONVERT_HINT}") from None
    _check_tree(obj, what, 0)
    return obj


def _check_tree(obj: Any, what: str, depth: int) -> None:
    if depth > 64:
        raise SampleError(f"{what}: pickle nested too deeply")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(k, what, depth + 1)
            _check_tree(v, what, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_tree(v, what, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for v in obj.flat:
                _check_tree(v, what, depth + 1)
    elif not isinstance(obj, _SAFE_LEAVES):
        raise SampleError(f"{what}: pickle holds a {type(obj).__name__}, not arrays, dicts, lists or strings")


def _read_pickled_npy(body: bytes, dec: PointCloudDecoding, what: str) -> np.ndarray:
    obj = restricted_unpickle(body, what)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.size == 1:
        obj = obj.reshape(()).item()
    if not isinstance(obj, dict) or "xyz" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise SampleError(f"{what}: a pickled .npy must hold a dict with an 'xyz' array (OpenShape's form); "
                          f"found {found}. Save a plain (N, 3) or (N, 6) float32 array instead")
    xyz = np.asarray(obj["xyz"])
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.dtype.kind not in "fiu":
        raise SampleError(f"{what}: 'xyz' must be an (N, 3) numeric array, got {xyz.dtype} {xyz.shape}")
    _check_count(len(xyz), dec.max_points, "points", what)
    rgb = obj.get("rgb")
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != xyz.shape or rgb.dtype.kind not in "fiu":
            log.warning("%s: ignoring 'rgb' of shape %s (xyz has %s)", what, rgb.shape, xyz.shape)
            rgb = None
    arr = xyz if rgb is None else np.concatenate([xyz.astype(np.float32), rgb.astype(np.float32)], axis=1)
    return _columns(arr, what, integer_rgb=rgb is not None and rgb.dtype == np.uint8)


# --- meshes and .ply
_PLY_ELEMENT = re.compile(rb"^element\s+(\w+)\s+(\d+)", re.M)


def _header_counts(data: bytes, ext: str) -> tuple[int | None, int | None]:
    """(vertices, faces) as the file's header declares them, where that is cheap (else ``None``)."""
    if ext == "ply":
        end = data.find(b"end_header", 0, 1 << 16)
        head = data[: end if end > 0 else 1 << 16]
        counts = {m.group(1).decode(): int(m.group(2)) for m in _PLY_ELEMENT.finditer(head)}
        return counts.get("vertex"), counts.get("face")
    if ext == "off":  # "[C|N|ST]OFF" then "vertices faces edges", possibly on the same line; "#" comments
        tokens: list[bytes] = []
        for line in data[: 1 << 16].splitlines():
            tokens += line.split(b"#", 1)[0].split()
            if len(tokens) >= 4:
                break
        if tokens and tokens[0].upper().endswith(b"OFF"):
            tokens = tokens[1:]
        try:
            return int(tokens[0]), int(tokens[1])
        except (IndexError, ValueError):
            return None, None
    if ext == "stl":
        if len(data) >= 84 and not data[:5].lower() == b"solid":
            n = int(np.frombuffer(data[80:84], "<u4")[0])
            return 3 * n, n
        return None, data.count(b"facet")
    if ext == "obj":
        return (data.count(b"\nv ") + data.startswith(b"v "), data.count(b"\nf ") + data.startswith(b"f "))
    return None, None


def _read_mesh(data: bytes, ext: str, dec: PointCloudDecoding, what: str) -> tuple[np.ndarray, int, int | None]:
    """Mesh / ply bytes -> (points (N, 3|6), vertices, faces or None)."""
    v, f = _header_counts(data, ext)
    if v is not None:
        _check_count(v, dec.max_points, "vertices", what)
    if f is not None and f > dec.max_faces:
        raise SampleError(f"{what}: {f} faces is above the limit {dec.max_faces} (raise the limit or simplify "
                          f"the mesh)")
    import trimesh

    try:
        loaded = trimesh.load(io.BytesIO(data), file_type=ext, process=False, resolver=None)
    except Exception as e:  # trimesh raises many kinds on bad input
        raise SampleError(f"{what}: cannot read .{ext} ({type(e).__name__}: {e})") from e
    try:
        geoms = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    except Exception as e:  # a scene whose nodes or transforms are broken
        raise SampleError(f"{what}: cannot read the scene of .{ext} ({type(e).__name__}: {e})") from e
    meshes = [g for g in geoms if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    clouds = [g for g in geoms if isinstance(g, (trimesh.PointCloud, trimesh.Trimesh)) and g not in meshes]
    n_vertices = sum(len(g.vertices) for g in meshes + clouds)
    _check_count(n_vertices, dec.max_points, "vertices", what)
    if meshes:
        faces = sum(len(m.faces) for m in meshes)
        if faces > dec.max_faces:
            raise SampleError(f"{what}: {faces} faces is above the limit {dec.max_faces}")
        mesh = meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
        return _sample_surface(mesh, dec, ext, what), n_vertices, faces
    if not clouds or n_vertices == 0:
        raise SampleError(f"{what}: no vertices (empty .{ext})")
    parts = [_cloud_points(g) for g in clouds]
    if len({p.shape[1] for p in parts}) > 1:
        parts = [p[:, :3] for p in parts]
    return np.concatenate(parts), n_vertices, None


def _rgb01(colors: Any) -> np.ndarray:
    c = np.asarray(colors)
    rgb = c[:, :3].astype(np.float32)
    return rgb / 255.0 if c.dtype == np.uint8 or rgb.max(initial=0.0) > 1.0 else rgb


def _cloud_points(g: Any) -> np.ndarray:
    xyz = np.asarray(g.vertices, dtype=np.float64)
    colors = None
    if hasattr(g, "colors") and getattr(g, "colors", None) is not None and len(g.colors) == len(xyz):
        colors = g.colors
    elif getattr(getattr(g, "visual", None), "kind", None) == "vertex":
        colors = g.visual.vertex_colors
    if colors is not None and len(colors) == len(xyz) and _has_real_colors(g):
        return np.concatenate([xyz.astype(np.float32), _rgb01(colors)], axis=1)
    return xyz.astype(np.float32)


def _has_real_colors(g: Any) -> bool:
    """True when the file gave colours (trimesh invents a default grey otherwise)."""
    meta = getattr(g, "metadata", {}) or {}
    ply = meta.get("_ply_raw", {}) if isinstance(meta, dict) else {}
    if ply:
        props = ply.get("vertex", {}).get("properties", {})
        return any(k in props for k in ("red", "r", "diffuse_red"))
    visual = getattr(g, "visual", None)
    return getattr(visual, "kind", None) in ("vertex", "face") if visual is not None else True


def _sample_surface(mesh: Any, dec: PointCloudDecoding, ext: str, what: str) -> np.ndarray:
    import trimesh

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if not np.isfinite(vertices).all():
        bad = np.flatnonzero(~np.isfinite(vertices).all(axis=1))
        raise SampleError(f"{what}: {len(bad)} vertices with NaN/Inf coordinates (first: vertex {int(bad[0])}); "
                          f"fix the mesh")
    faces = np.asarray(mesh.faces)
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise SampleError(f"{what}: faces index vertices that do not exist ({len(vertices)} vertices)")
    area = float(mesh.area)
    if not np.isfinite(area) or area <= 0.0:
        raise SampleError(f"{what}: degenerate mesh: {len(faces)} faces with zero total surface area "
                          f"(all vertices equal or collinear); nothing to sample")
    samples, face_index, bary = trimesh.sample.sample_surface(mesh, int(dec.mesh_samples), seed=int(dec.seed),
                                                              return_barycentric=True)
    xyz = np.asarray(samples, dtype=np.float32)
    rgb = _surface_colors(mesh, face_index, bary, textures=ext == "glb")
    return xyz if rgb is None else np.concatenate([xyz, rgb], axis=1)


def _surface_colors(mesh: Any, face_index: np.ndarray, bary: np.ndarray, textures: bool) -> np.ndarray | None:
    """Colours at the sampled points: vertex colours interpolated, face colours as they are, a
    texture converted to vertex colours first (``textures``: only where the file embeds them,
    i.e. ``.glb``; an ``.obj``'s texture lives in files cmcr never opens, and trimesh's stand-in
    is a flat grey); ``None`` when the mesh has none."""
    visual = mesh.visual
    kind = getattr(visual, "kind", None)
    try:
        if kind == "texture" and textures:
            visual = visual.to_color()
            kind = getattr(visual, "kind", None)
        if kind == "vertex":
            vc = _rgb01(visual.vertex_colors).astype(np.float64)
            tri = vc[np.asarray(mesh.faces)[face_index]]  # (S, 3 corners, 3 channels)
            return np.clip((tri * bary[:, :, None]).sum(axis=1), 0.0, 1.0).astype(np.float32)
        if kind == "face":
            return _rgb01(visual.face_colors)[face_index]
    except Exception as e:  # a broken texture or material must not fail the geometry
        log.debug("mesh colours unusable (%s); using xyz only", e)
    return None


# ----------------------------------------------------------------------------------- prepare
def farthest_point_sample(xyz: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Exact farthest-point sampling.

    Args:
        xyz: ``(N, 3)`` coordinates; n: points to pick (``<= N``); start: index of the first pick.

    Returns:
        ``(n,)`` int64 indices in pick order (each the point farthest from those picked before;
        ties go to the lowest index).
    """
    pts = np.asarray(xyz, dtype=np.float32)
    m = len(pts)
    idx = np.empty(n, np.int64)
    mind = np.full(m, np.inf, np.float32)
    x, y, z = (np.ascontiguousarray(pts[:, i]) for i in range(3))
    d = np.empty(m, np.float32)
    t = np.empty(m, np.float32)
    far = int(start)
    for i in range(n):
        idx[i] = far
        np.subtract(x, x[far], out=d)
        np.multiply(d, d, out=d)
        np.subtract(y, y[far], out=t)
        np.multiply(t, t, out=t)
        d += t
        np.subtract(z, z[far], out=t)
        np.multiply(t, t, out=t)
        d += t
        np.minimum(mind, d, out=mind)
        far = int(mind.argmax())
    return idx


def prepare_points(points: np.ndarray, n_points: int = DEFAULT_N_POINTS, use_color: bool = False, seed: int = 0,
                   *, min_points: int = DEFAULT_MIN_POINTS, what: str = "point cloud") -> np.ndarray:
    """Raw points -> the encoder's fixed-size, normalised input (step 2 of the module docstring).

    Args:
        points: ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb in [0, 1] (as :func:`load_points` returns).
        n_points: P, the output point count (ULIP: 8192).
        use_color: output rgb columns (``(P, 6)``) or xyz only (``(P, 3)``).
        seed: seeds the FPS start point, the pre-FPS subsample and the upsampling draw.
        min_points: fewest distinct points accepted (PointBERT: its group count, 512).
        what: how messages name the input.

    Returns:
        ``(n_points, 3 | 6)`` float32, C-contiguous: xyz centred on their mean with the farthest
        point at distance 1; rgb (if asked) in [0, 1]. Same input and arguments, same output.

    Raises:
        SampleError: wrong shape, NaN/Inf, all points equal, or fewer than ``min_points`` distinct points.
        ValueError: ``n_points < 1``.
    """
    if int(n_points) < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise SampleError(f"{what}: expected (N, 3) or (N, 6) points, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    _check_finite(arr, what)
    n = len(arr)
    distinct = len(np.unique(arr[:, :3], axis=0)) if n else 0
    if n == 0:
        raise SampleError(f"{what}: no points")
    if distinct == 1:
        raise SampleError(f"{what}: degenerate: all {n} points are the same point (no extent to normalise)")
    if distinct < min_points:
        raise SampleError(f"{what}: only {distinct} distinct points; at least {min_points} are needed (min_points: "
                          f"the encoder groups its input around {min_points} centres); use a denser cloud or mesh")
    rng = np.random.default_rng(int(seed))
    if n > n_points:
        pool = np.arange(n)
        if n > FPS_MAX_INPUT:
            pool = np.sort(rng.choice(n, FPS_MAX_INPUT, replace=False))
        start = int(rng.integers(len(pool)))
        idx = pool[farthest_point_sample(arr[pool, :3], int(n_points), start)]
    elif n < n_points:
        idx = np.concatenate([np.arange(n), rng.choice(n, int(n_points) - n, replace=True)])
    else:
        idx = np.arange(n)
    sel = arr[idx]
    xyz = sel[:, :3].astype(np.float64)
    xyz -= xyz.mean(axis=0)
    radius = float(np.sqrt((xyz**2).sum(axis=1).max()))
    if not np.isfinite(radius) or radius <= 1e-30:
        raise SampleError(f"{what}: degenerate: the sampled points have no extent")
    xyz /= radius
    if not use_color:
        return np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = (np.clip(sel[:, 3:6], 0.0, 1.0) if sel.shape[1] == 6
           else np.full((len(sel), 3), DEFAULT_GREY, np.float32))
    return np.ascontiguousarray(np.concatenate([xyz.astype(np.float32), rgb.astype(np.float32)], axis=1))


class PointCloudPreprocessor:
    """The ``Encoder.preprocessor("3d")`` a point encoder can use as is (picklable, for DataLoader
    workers): decoded points (the contract of this module) -> ``(torch.Tensor (P, 3|6) float32, {})``
    through :func:`prepare_points`. :meth:`settings` is what the encoder records as its
    ``preprocessing("3d")``.
    """

    def __init__(self, n_points: int = DEFAULT_N_POINTS, use_color: bool = False, seed: int = 0,
                 min_points: int = DEFAULT_MIN_POINTS):
        self.n_points = int(n_points)
        self.use_color = bool(use_color)
        self.seed = int(seed)
        self.min_points = int(min_points)

    def settings(self) -> dict[str, Any]:
        return prepare_settings(self.n_points, self.use_color, self.seed, self.min_points)

    def __call__(self, points: np.ndarray) -> tuple[Any, dict[str, Any]]:
        import torch

        if not isinstance(points, np.ndarray):
            raise TypeError(f"the 3d preprocessor takes decoded points (np.ndarray (N, 3|6)), got "
                            f"{type(points).__name__}: decode files with cmcr.pipeline.pointcloud.load_points first")
        arr = prepare_points(points, self.n_points, self.use_color, self.seed, min_points=self.min_points)
        return torch.from_numpy(arr), {}
