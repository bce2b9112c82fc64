"""3D inputs: readers of every format, the restricted unpickler, deterministic preprocessing, limits."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.pointcloud import (
    SAFE_PICKLE_GLOBALS,
    PointCloudDecoding,
    PointCloudPreprocessor,
    decode_points,
    farthest_point_sample,
    load_points,
    prepare_points,
    restricted_unpickle,
)
from tests.fixtures_pointcloud import BAD_3D, GOOD_3D, mesh_bytes, npy_bytes, sphere_points

RELEASE = Path(__file__).resolve().parent / "fixtures" / "cmcr-release"


def _read(p: Path) -> np.ndarray:
    return load_points(p.read_bytes(), p.suffix)


# ----------------------------------------------------------------------------------- readers
def test_openshape_dict_is_read_without_unpickling_and_equals_the_converted_release(sample_data):
    pts, info = decode_points((RELEASE / "BBQ_openshape.npy").read_bytes(), "npy")
    assert pts.shape == (10000, 6) and pts.dtype == np.float32 and info["has_color"]
    converted = np.load(sample_data / "3d" / "bbq" / "BBQ_xyzrgb.npy", allow_pickle=False)
    np.testing.assert_array_equal(pts, converted)
    assert 0.0 <= pts[:, 3:].min() and pts[:, 3:].max() <= 1.0


class _Payload:
    """Unpickling this runs ``open(marker, 'w')`` through ``builtins.exec`` (or any other global)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _object_npy(obj, protocol: int = 3) -> bytes:
    """A .npy of a 0-d object array holding ``obj``, as ``np.save(allow_pickle=True)`` writes it
    (with the given pickle protocol; OpenShape's files use 2)."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    pickle.dump(arr, buf, protocol=protocol)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
def test_planted_payload_in_a_pickled_npy_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = {"xyz": sphere_points(600), "rgb": np.zeros((600, 3), np.float32),
            "note": _Payload(f"open({str(marker)!r}, 'w').write('ran')")}
    data = _object_npy(evil, protocol)
    with pytest.raises(SampleError, match=r"refused to unpickle: it references builtins\.exec.*np\.load\("):
        load_points(data, "npy", what="evil.npy")
    assert not marker.exists()
    np.load(io.BytesIO(data), allow_pickle=True)  # the payload is live: full unpickling runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    # the same dict without the payload reads fine
    del evil["note"]
    assert load_points(_object_npy(evil), "npy").shape == (600, 6)


def test_allowlisted_globals_cannot_be_abused():
    assert set(SAFE_PICKLE_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}
    import codecs

    class Call:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    # numpy.ndarray((10**12,)) called directly: an allocation sized by the file; _reconstruct with a
    # claimed shape; _codecs.encode with another codec than latin1
    for fn, args in ((np.ndarray, ((10**12,),)), (np.core.multiarray._reconstruct, (np.ndarray, (10**8,), b"b")),
                     (codecs.encode, ("x", "zlib"))):
        with pytest.raises(SampleError, match="unreadable pickle"):
            restricted_unpickle(pickle.dumps(Call(fn, args), protocol=2))
    with pytest.raises(SampleError, match=r"references os\.system"):
        restricted_unpickle(b"cos\nsystem\n(S'true'\ntR.")
    # plain data passes
    assert restricted_unpickle(pickle.dumps({"a": [1, 2.5, "x", None, (b"y",)]}, protocol=2)) == \
        {"a": [1, 2.5, "x", None, (b"y",)]}


def test_pickled_npy_without_xyz_is_refused_with_a_hint():
    with pytest.raises(SampleError, match=r"dict with an 'xyz' array.*found \['points'\]"):
        load_points(_object_npy({"points": [1, 2, 3]}), "npy")


def test_every_mesh_format_samples_the_same_surface():
    import trimesh

    box = trimesh.creation.box((1.0, 2.0, 3.0))
    clouds = {ext: load_points(mesh_bytes(box, ext), ext) for ext in ("obj", "off", "ply", "glb", "stl")}
    for ext, pts in clouds.items():
        assert pts.shape == (10000, 3), ext
        np.testing.assert_allclose(np.abs(pts).max(axis=0), [0.5, 1.0, 1.5], atol=1e-6)
    np.testing.assert_allclose(clouds["obj"], clouds["off"], atol=1e-6)
    np.testing.assert_allclose(clouds["obj"], clouds["ply"], atol=1e-6)
    # uniform on the surface: the share of points on the x faces is their share of the area (2*2*3 / 2*11)
    on_x = np.isclose(np.abs(clouds["obj"][:, 0]), 0.5, atol=1e-6).mean()
    assert abs(on_x - 12 / 22) < 0.02
    # same bytes, same samples (seeded); another seed, other samples
    np.testing.assert_array_equal(clouds["obj"], load_points(mesh_bytes(box, "obj"), "obj"))
    other = load_points(mesh_bytes(box, "obj"), "obj", PointCloudDecoding(seed=1))
    assert not np.allclose(other, clouds["obj"])


def test_colours_of_vertex_coloured_meshes_and_clouds(messy_3d):
    pts = _read(messy_3d / "colored_box.ply")
    assert pts.shape == (10000, 6)
    np.testing.assert_allclose(pts[:, 3:], np.tile([1.0, 0.0, 0.0], (10000, 1)), atol=1e-6)
    assert _read(messy_3d / "cloud.ply").shape == (600, 3)
    u8 = _read(messy_3d / "cloud_uint8_rgb.npy")
    assert u8.shape == (300, 6) and np.allclose(u8[:, 3:], 1.0)
    # the bundled cow: an OBJ whose texture lives in files never opened -> xyz only, 10000 samples
    _, info = decode_points((Path(__file__).parent.parent / "cmcr/data/sample/3d/cow/spot_triangulated.obj")
                            .read_bytes(), "obj")
    assert info == {"format": "obj", "vertices": 3225, "faces": 5856, "has_color": False,
                    "radius": pytest.approx(1.068, abs=1e-3)}


def test_normals_are_dropped_and_bad_colour_columns_refused():
    xyz = sphere_points(100)
    assert load_points(npy_bytes(np.concatenate([xyz, xyz], 1)), "npy").shape == (100, 3)  # unit normals
    with pytest.raises(SampleError, match="neither rgb"):
        load_points(npy_bytes(np.concatenate([xyz, -2 * np.abs(xyz)], 1)), "npy")


@pytest.mark.parametrize("name", sorted(BAD_3D))
def test_bad_3d_files_raise_a_clear_sample_error(messy_3d, name):
    p = messy_3d / name
    with pytest.raises(SampleError, match=re.escape(BAD_3D[name])):
        prepare_points(load_points(p.read_bytes(), p.suffix, what=name), 256, min_points=32, what=name)


@pytest.mark.parametrize("name", GOOD_3D)
def test_good_3d_files_prepare(messy_3d, name):
    p = messy_3d / name
    out = prepare_points(_read(p), 256, use_color=True, min_points=32)
    assert out.shape == (256, 6) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]


def test_size_and_count_limits_are_configurable():
    data = npy_bytes(sphere_points(2000))
    with pytest.raises(SampleError, match="size limit 1000"):
        load_points(data, "npy", PointCloudDecoding(max_bytes=1000))
    with pytest.raises(SampleError, match="2000 points is above the limit 1500"):
        load_points(data, "npy", PointCloudDecoding(max_points=1500))
    off = b"OFF\n4 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n3 0 2 3\n"
    with pytest.raises(SampleError, match="2 faces is above the limit 1"):
        load_points(off, "off", PointCloudDecoding(max_faces=1))
    assert load_points(off, "off", PointCloudDecoding(mesh_samples=50)).shape == (50, 3)
    # counts a header declares are refused before anything is decoded (blank lines and comments allowed)
    with pytest.raises(SampleError, match="900000000 vertices is above the limit"):
        load_points(b"\nOFF\n# made by hand\n900000000 1 0\n0 0 0\n", "off")
    stl = b"\0" * 80 + np.array([400_000_000], "<u4").tobytes() + b"\0" * 50
    with pytest.raises(SampleError, match="400000000 faces is above the limit"):
        load_points(stl, "stl", PointCloudDecoding(max_points=2_000_000_000))
    with pytest.raises(SampleError, match="unknown 3D format .xyz"):
        load_points(data, "xyz")


# ----------------------------------------------------------------------------------- prepare
def test_prepare_points_is_deterministic_centred_and_on_the_unit_sphere(sample_data):
    raw = np.load(sample_data / "3d" / "train" / "train_xyzrgb.npy", allow_pickle=False) * [3, 3, 3, 1, 1, 1] + \
        [5, -2, 1, 0, 0, 0]
    a = prepare_points(raw, 1024, use_color=True, seed=0, min_points=512)
    b = prepare_points(raw.copy(), 1024, use_color=True, seed=0, min_points=512)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1024, 6) and a.dtype == np.float32
    np.testing.assert_allclose(a[:, :3].mean(axis=0), 0, atol=1e-6)
    assert np.linalg.norm(a[:, :3], axis=1).max() == pytest.approx(1.0, abs=1e-6)
    assert not np.array_equal(a, prepare_points(raw, 1024, use_color=True, seed=1, min_points=512))
    xyz_only = prepare_points(raw, 1024, seed=0)
    np.testing.assert_array_equal(xyz_only, a[:, :3])
    grey = prepare_points(raw[:, :3], 1024, use_color=True)
    assert np.all(grey[:, 3:] == np.float32(0.4))


def test_fewer_points_than_asked_are_all_kept_then_repeated():
    raw = sphere_points(700)
    out = prepare_points(raw, 1000, min_points=512)
    assert out.shape == (1000, 3)
    # every input point is kept once, the rest repeats some of them
    assert len(np.unique(out, axis=0)) == 700


def test_farthest_point_sampling_matches_brute_force():
    pts = np.random.default_rng(3).random((200, 3)).astype(np.float32)
    idx = farthest_point_sample(pts, 20, start=5)
    picked = [5]
    for _ in range(19):
        d = np.min(((pts[:, None, :] - pts[picked][None]) ** 2).sum(-1), axis=1)
        picked.append(int(d.argmax()))
    assert idx.tolist() == picked


def test_min_points_counts_distinct_points_and_degenerate_clouds_fail():
    dup = np.repeat(sphere_points(100), 20, axis=0)  # 2000 rows, 100 distinct points
    with pytest.raises(SampleError, match="only 100 distinct points; at least 512"):
        prepare_points(dup)
    assert prepare_points(dup, 64, min_points=100).shape == (64, 3)
    with pytest.raises(SampleError, match="all 50 points are the same point"):
        prepare_points(np.full((50, 3), 7.0), 64, min_points=1)
    with pytest.raises(SampleError, match=r"expected \(N, 3\) or \(N, 6\)"):
        prepare_points(np.zeros((10, 4)))


def test_preprocessor_contract_takes_decoded_points():
    pre = PointCloudPreprocessor(n_points=128, use_color=True, min_points=32)
    item, info = pre(sphere_points(300, color=True))
    assert tuple(item.shape) == (128, 6) and str(item.dtype) == "torch.float32" and info == {}
    assert pre.settings()["n_points"] == 128 and pre.settings()["channels"] == 6
    with pytest.raises(TypeError, match="load_points"):
        pre(b"raw bytes")
    pickle.loads(pickle.dumps(pre))  # DataLoader workers get it pickled
