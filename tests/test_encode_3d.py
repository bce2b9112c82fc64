"""The ``3d`` modality through ``cmcr shard`` and ``cmcr encode``: folders, lists, tars of 3D files,
per-sample failures with reasons, manifest records, resume; README files are not captions."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from cmcr.cli import main
from cmcr.pipeline.corpora import iter_tar_samples
from cmcr.pipeline.encode import encode_shards
from cmcr.pipeline.pointcloud import PointCloudDecoding, load_points, prepare_points
from cmcr.pipeline.shards import write_shards
from cmcr.stores.store import Store
from tests.fixtures_pointcloud import BAD_3D, GOOD_3D, TINY_POINTS_SPEC, TinyPointEncoder, sphere_points


def test_bundled_3d_folder_shards_as_3d_and_its_readme_is_not_a_caption(sample_data, tmp_path):
    rep = write_shards(sample_data / "3d", tmp_path / "shards")
    assert rep.counts == {"3d": 4}  # before: spot_README.txt became a caption and the mesh was skipped
    keys = [s["__key__"] for s in iter_tar_samples(rep.shards["3d"][0])]
    assert keys == ["bbq/BBQ_xyzrgb", "cow/spot_triangulated", "toilet/toilet_xyzrgb", "train/train_xyzrgb"]
    reasons = {s.source: s.reason for s in rep.skipped}
    assert "documentation file" in reasons["cow/spot_README.txt"]
    assert set(reasons) == {"cow/spot_README.txt", "README_cmcr_release.md", "pointclouds.json"}
    meta = [json.loads(s["json"]) for s in iter_tar_samples(rep.shards["3d"][0])]
    assert [m["label"] for m in meta] == ["bbq", "cow", "toilet", "train"]


def test_lists_and_tars_of_3d_files(sample_data, tmp_path):
    lst = tmp_path / "objects.txt"
    lst.write_text(f"{sample_data / '3d' / 'train' / 'train_xyzrgb.npy'}\na toy train\n")
    rep = write_shards(lst, tmp_path / "a")
    assert rep.counts == {"3d": 1, "text": 1}
    # a webdataset tar with a multi-part extension (key.xyz.npy) and a caption reshards as 3d
    tar = tmp_path / "in.tar"
    data = (sample_data / "3d" / "toilet" / "toilet_xyzrgb.npy").read_bytes()
    with tarfile.open(tar, "w") as tf:
        for name, body in (("obj1.xyz.npy", data), ("obj2.ply", b"ply\n"), ("obj3.txt", b"a caption")):
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    rep = write_shards(tar, tmp_path / "b")
    assert rep.counts == {"3d": 2, "text": 1}
    sample = next(iter_tar_samples(rep.shards["3d"][0]))
    assert sample["__key__"] == "obj1" and sample["xyz.npy"] == data


def _encode(enc, folder, tmp_path, **kw):
    shards = write_shards(folder, tmp_path / "shards", samples_per_shard=8).shards["3d"]
    return encode_shards(shards, enc, "3d", tmp_path / "store", batch_size=4, progress=False, **kw)


def test_messy_3d_files_become_rows_or_failures_with_reasons(tiny_points, messy_3d, tmp_path):
    rep = _encode(tiny_points, messy_3d, tmp_path, num_workers=2)
    assert rep.rows == len(GOOD_3D) and rep.failures == len(BAD_3D) and rep.shards_failed == 0
    store = Store.open(tmp_path / "store", modality="3d", encoder=tiny_points.identity(), validate="full")
    fails = {f["key"]: f for f in store.failures().to_pylist()}
    assert set(fails) == {n.rsplit(".", 1)[0] for n in BAD_3D}
    for name, reason in BAD_3D.items():
        f = fails[name.rsplit(".", 1)[0]]
        assert f["stage"] == "decode" and reason in f["error"], f
    meta = {r["source"]: r for r in store.metadata(["source", "format", "vertices", "faces", "has_color",
                                                    "radius"]).to_pylist()}
    assert meta["box.obj"]["faces"] == 12 and meta["box.obj"]["vertices"] == 8 and not meta["box.obj"]["has_color"]
    assert meta["cloud.ply"]["faces"] is None and meta["cloud.ply"]["vertices"] == 600
    assert meta["colored_box.ply"]["has_color"] and meta["box.glb"]["format"] == "glb"
    pre = store.manifest["preprocessing"]
    assert pre["n_points"] == 256 and pre["min_points"] == 32
    assert pre["decode"] == PointCloudDecoding().identity()
    x = store.embeddings(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)


def test_3d_rows_equal_the_contract_and_do_not_depend_on_workers(tiny_points, sample_data, tmp_path):
    a = _encode(tiny_points, sample_data / "3d", tmp_path / "a", num_workers=0)
    b = _encode(tiny_points, sample_data / "3d", tmp_path / "b", num_workers=2)
    assert a.rows == b.rows == 4 and a.failures == 0
    sa, sb = Store.open(tmp_path / "a" / "store"), Store.open(tmp_path / "b" / "store")
    assert sa.keys() == sb.keys()
    np.testing.assert_array_equal(sa.embeddings(np.float32), sb.embeddings(np.float32))
    # the row of the train cloud = the encoder on prepare_points(load_points(file)) (the documented contract)
    f = sample_data / "3d" / "train" / "train_xyzrgb.npy"
    item = prepare_points(load_points(f.read_bytes(), "npy"), 256, min_points=32)
    want = tiny_points.embed("3d", tiny_points.collate("3d", [__import__("torch").from_numpy(item)]))[0]
    got = sa.embeddings(np.float32)[sa.keys().index("train/train_xyzrgb")]
    np.testing.assert_allclose(got, want, atol=2e-3)  # float16 store
    # the same through Encoder.encode (the search query path)
    np.testing.assert_allclose(tiny_points.encode("3d", [str(f)])[0], want, atol=1e-6)


def test_other_decode_settings_are_another_store_and_limits_are_failures(tiny_points, messy_3d, tmp_path):
    from cmcr.errors import StoreMismatchError

    _encode(tiny_points, messy_3d, tmp_path, num_workers=0)
    with pytest.raises(StoreMismatchError):
        _encode(tiny_points, messy_3d, tmp_path, num_workers=0, pointcloud=PointCloudDecoding(mesh_samples=2000))
    rep = _encode(tiny_points, messy_3d, tmp_path / "small", num_workers=0,
                  pointcloud=PointCloudDecoding(max_bytes=2000))
    store = Store.open(tmp_path / "small" / "store")
    errors = {f["key"]: f["error"] for f in store.failures().to_pylist()}
    assert "size limit 2000" in errors["cloud"] and "size limit 2000" in errors["cloud_xyzrgb"]
    assert "box" not in errors
    assert rep.rows + rep.failures == len(GOOD_3D) + len(BAD_3D)


def test_cli_shard_and_encode_3d_resume(sample_data, messy_3d, tmp_path, monkeypatch, capsys):
    import cmcr.pipeline.encoders as encoders

    real = encoders.load_encoder
    monkeypatch.setattr(encoders, "load_encoder",
                        lambda spec, **kw: TinyPointEncoder() if spec == TINY_POINTS_SPEC else real(spec, **kw))
    monkeypatch.setitem(encoders.FAMILY_ALIASES, "test_points", "test_points")  # the spec is checked up front
    assert main(["shard", str(sample_data / "3d"), str(messy_3d), "--out", str(tmp_path / "sh"), "-n", "10"]) == 0
    argv = ["encode", str(tmp_path / "sh" / "3d"), "-e", TINY_POINTS_SPEC, "-m", "3d", "--store",
            str(tmp_path / "st"), "-b", "4", "-j", "1", "--no-progress", "--max-3d-points", "100000"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "rows written" in out.out and f"{len(BAD_3D)} failures recorded" in out.err
    store = Store.open(tmp_path / "st", validate="full")
    assert store.num_rows == 4 + len(GOOD_3D)
    assert main(argv) == 0  # a rerun skips every shard
    assert Store.open(tmp_path / "st").num_rows == 4 + len(GOOD_3D)


def test_query_file_through_encoder_encode_refuses_bad_files(tiny_points, tmp_path):
    from cmcr.pipeline.audio import SampleError

    p = tmp_path / "q.npy"
    np.save(p, np.full((100, 3), 1.0, np.float32))
    with pytest.raises(SampleError, match="q.npy.*same point"):
        tiny_points.encode("3d", [str(p)])
    np.save(p, sphere_points(400))
    assert tiny_points.encode("3d", [str(p)]).shape == (1, 16)
