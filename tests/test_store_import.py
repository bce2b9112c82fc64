"""Tests of cmcr.stores.importing: .npy / Parquet imports, checks with clear errors, atomic publish, resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmcr.errors import InputDataError, StoreError, StoreValidationError
from cmcr.stores import importing
from cmcr.stores.importing import import_embeddings
from cmcr.stores.store import Store
from tests.fixtures_stores import clustered_embeddings

ULIP = {"family": "ulip2", "architecture": "PointBERT", "weights": "ULIP-2-PointBERT-10k.pt"}


def _raw(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Un-normalised float32 rows (like most exported embeddings)."""
    return (clustered_embeddings(n, d, seed=seed) * np.linspace(0.5, 3, n)[:, None]).astype(np.float32)


def test_npy_with_csv_keys_and_metadata(tmp_path):
    x = _raw(50, 8)
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "keys.csv").write_text("uid\n" + "".join(f"{i:05d}\n" for i in range(50)))
    (tmp_path / "meta.csv").write_text("uid,label,n_points\n" + "".join(f"{i:05d},cls{i % 3},{1000 + i}\n"
                                                                       for i in range(50)))
    store = import_embeddings(tmp_path / "emb.npy", tmp_path / "pc", modality="3d", encoder=ULIP, normalize=True,
                              keys=tmp_path / "keys.csv", key_column="uid", metadata=tmp_path / "meta.csv",
                              progress=False)
    assert store.path == tmp_path / "pc" and store.num_rows == 50 and store.dim == 8
    assert store.keys()[:2] == ["00000", "00001"]  # leading zeros kept: CSV keys are read as strings
    assert store.encoder == {**ULIP, "dim": 8}
    assert store.manifest["extra"]["import"]["normalized_on_import"] is True
    ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(store.embeddings(np.float32), ref, atol=2e-3)
    meta = store.metadata().to_pylist()
    assert meta[4] == {"key": "00004", "label": "cls1", "n_points": 1004}
    assert not (tmp_path / ".pc.importing").exists()
    assert store.validate()["ok"]


def test_unnormalised_rows_refused_without_normalize(tmp_path):
    np.save(tmp_path / "emb.npy", _raw(10, 4))
    with pytest.raises(StoreValidationError, match=r"emb\.npy: row 0 \(key 'emb/0'\) has L2 norm .*--normalize"):
        import_embeddings(tmp_path / "emb.npy", tmp_path / "s", modality="3d", encoder=ULIP, row_keys=True,
                          progress=False)
    assert not (tmp_path / "s").exists()
    # an inner-product store keeps the raw rows
    s = import_embeddings(tmp_path / "emb.npy", tmp_path / "ip", modality="3d", encoder=ULIP, row_keys=True,
                          metric="inner_product", dtype="float32", progress=False)
    np.testing.assert_array_equal(s.embeddings(), _raw(10, 4))
    assert not s.normalized


def test_parquet_list_and_fixed_size_list(tmp_path):
    x = clustered_embeddings(30, 6)
    keys = [f"img{i}" for i in range(30)]
    pq.write_table(pa.table({"id": keys, "vec": pa.array(x.astype(np.float64).tolist()), "caption": ["c"] * 30}),
                   tmp_path / "a.parquet")
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 6)
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(30)], "vec": fsl, "caption": ["d"] * 30}),
                   tmp_path / "b.parquet", row_group_size=7)
    s = import_embeddings([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "s", modality="image",
                          encoder={"family": "imagebind", "architecture": "huge"}, key_column="id",
                          embedding_column="vec", part_rows=16, progress=False)
    assert s.num_rows == 60 and s.metadata_columns == ["caption"]
    assert len(s.parts) == 4  # 30 rows per file, 16 rows per part
    assert s.keys()[30] == "b0"
    np.testing.assert_allclose(s.embeddings(np.float32), np.concatenate([x, x]), atol=1e-3)


def test_parquet_errors_name_file_and_row(tmp_path):
    good = clustered_embeddings(4, 3).tolist()
    bad = [*good[:2], good[2][:2], good[3]]
    pq.write_table(pa.table({"key": list("abcd"), "embedding": bad}), tmp_path / "ragged.parquet")
    with pytest.raises(InputDataError, match=r"ragged\.parquet: row 2 \(key 'c'\) has 2 values, expected 3"):
        import_embeddings(tmp_path / "ragged.parquet", tmp_path / "s", modality="text", encoder={"family": "x"},
                          progress=False)
    pq.write_table(pa.table({"name": list("abcd"), "embedding": good}), tmp_path / "nokey.parquet")
    with pytest.raises(InputDataError, match=r"nokey\.parquet: no key column 'key'; columns are \['name'"):
        import_embeddings(tmp_path / "nokey.parquet", tmp_path / "s", modality="text", encoder={"family": "x"},
                          progress=False)
    with pytest.raises(InputDataError, match="no embedding column 'emb'"):
        import_embeddings(tmp_path / "nokey.parquet", tmp_path / "s", modality="text", encoder={"family": "x"},
                          key_column="name", embedding_column="emb", progress=False)
    pq.write_table(pa.table({"key": list("abca"), "embedding": good}), tmp_path / "dup.parquet")
    with pytest.raises(InputDataError, match="duplicate key 'a' at rows 0 and 3"):
        import_embeddings(tmp_path / "dup.parquet", tmp_path / "s", modality="text", encoder={"family": "x"},
                          progress=False)


def test_npy_input_errors(tmp_path):
    np.save(tmp_path / "a.npy", clustered_embeddings(5, 4))
    np.save(tmp_path / "b.npy", clustered_embeddings(5, 6))
    kw = {"modality": "3d", "encoder": ULIP, "progress": False}
    with pytest.raises(InputDataError, match=r"differ in width: a\.npy: 4, b\.npy: 6"):
        import_embeddings([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "s", row_keys=True, **kw)
    (tmp_path / "keys.txt").write_text("k1\nk2\nk3\n")
    with pytest.raises(InputDataError, match=r"keys\.txt: 3 keys, but the embeddings have 5 rows \(a\.npy \(5\)\)"):
        import_embeddings(tmp_path / "a.npy", tmp_path / "s", keys=tmp_path / "keys.txt", **kw)
    with pytest.raises(InputDataError, match="duplicate key 'x' at rows 1 and 4"):
        import_embeddings(tmp_path / "a.npy", tmp_path / "s", keys=["w", "x", "y", "z", "x"], **kw)
    with pytest.raises(InputDataError, match="no keys for the .npy rows"):
        import_embeddings(tmp_path / "a.npy", tmp_path / "s", **kw)
    (tmp_path / "meta.csv").write_text("key,label\nw,1\nx,2\n")
    with pytest.raises(InputDataError, match=r"meta\.csv: 2 rows, but the embeddings have 5 rows"):
        import_embeddings(tmp_path / "a.npy", tmp_path / "s", metadata=tmp_path / "meta.csv", **kw)
    with pytest.raises(InputDataError, match="encoder identity says dim 512"):
        import_embeddings(tmp_path / "a.npy", tmp_path / "s", row_keys=True, modality="3d",
                          encoder={**ULIP, "dim": 512}, progress=False)
    np.save(tmp_path / "c.npy", np.ones((2, 3, 4), np.float32))
    with pytest.raises(InputDataError, match=r"c\.npy: expected a 2-D \(N, D\) array"):
        import_embeddings(tmp_path / "c.npy", tmp_path / "s", row_keys=True, **kw)
    assert not (tmp_path / "s").exists()


def test_nan_rows_error_or_skip_to_failures(tmp_path):
    x = clustered_embeddings(20, 4)
    x[7, 1] = np.nan
    x[12] = 0
    np.save(tmp_path / "e.npy", x)
    keys = [f"k{i}" for i in range(20)]
    kw = {"modality": "audio", "encoder": {"family": "x"}, "keys": keys, "normalize": True, "progress": False}
    with pytest.raises(StoreValidationError, match=r"e\.npy: row 7 \(key 'k7'\) holds NaN or Inf \(2 bad row"):
        import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", skip_bad_rows=True, **kw)
    assert s.num_rows == 18 and "k7" not in s.keys() and "k12" not in s.keys()
    f = s.failures().to_pylist()
    assert [r["key"] for r in f] == ["k7", "k12"]
    assert "NaN" in f[0]["error"] and "all zeros" in f[1]["error"] and f[0]["stage"] == "import"


def test_existing_store_reused_refused_then_overwritten(tmp_path):
    np.save(tmp_path / "e.npy", clustered_embeddings(6, 4))
    kw = {"modality": "3d", "encoder": ULIP, "row_keys": True, "progress": False}
    first = import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    again = import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)  # the same import: reused as is
    assert again.fingerprint() == first.fingerprint() and again.manifest["updated_at"] == first.manifest["updated_at"]
    with pytest.raises(StoreError, match=r"holds a store made from other settings.*dtype: recorded 'float16', "
                                         r"now 'float32'.*--overwrite"):
        import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw, dtype="float32")
    np.save(tmp_path / "e.npy", clustered_embeddings(9, 4))
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", overwrite=True, **kw)
    assert s.num_rows == 9 and Store.open(tmp_path / "s").num_rows == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s"]


def test_killed_import_resumes(tmp_path, monkeypatch):
    np.save(tmp_path / "e.npy", clustered_embeddings(40, 4))
    kw = {"modality": "3d", "encoder": ULIP, "row_keys": True, "part_rows": 10, "progress": False}
    real = Store.append_part
    calls = {"n": 0}

    def dying(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(Store, "append_part", dying)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()
    assert Store.open(tmp_path / ".s.importing").num_rows == 20  # two finished parts kept
    monkeypatch.setattr(Store, "append_part", real)
    written = []
    monkeypatch.setattr(importing, "_clean_rows", lambda chunk, **k: (written.append(chunk.start),
                                                                      importing_clean(chunk, **k))[1])
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    assert written == [20, 30]  # parts 0-20 were not redone
    assert s.num_rows == 40 and s.keys() == [f"e/{i}" for i in range(40)]


importing_clean = importing._clean_rows


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), d=st.integers(1, 9), part_rows=st.integers(1, 50), parquet=st.booleans())
def test_import_round_trip_property(tmp_path_factory, n, d, part_rows, parquet):
    """Whatever the sizes and part split, an import reads back the same keys and (normalised) rows in order."""
    tmp = tmp_path_factory.mktemp("rt")
    x = np.random.default_rng(n * 100 + d).standard_normal((n, d)).astype(np.float32) + 0.1
    keys = [f"k{(i * 7919) % 100003}" for i in range(n)]  # unique, not sorted
    if parquet:
        pq.write_table(pa.table({"key": keys, "embedding": x.tolist()}), tmp / "in.parquet")
        src, kw = tmp / "in.parquet", {}
    else:
        np.save(tmp / "in.npy", x)
        src, kw = tmp / "in.npy", {"keys": keys}
    s = import_embeddings(src, tmp / "s", modality="text", encoder={"family": "p"}, normalize=True,
                          dtype="float32", part_rows=part_rows, progress=False, **kw)
    assert s.keys() == keys
    assert len(s.parts) == -(-n // part_rows)
    np.testing.assert_allclose(s.embeddings(), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)


def test_embeddings_are_a_plain_npy_and_keys_plain_encoded(tmp_path):
    """Format 2: a part's embeddings are a plain .npy (what numpy.load reads); keys and metadata
    stay in Parquet with statistics, keys without a dictionary (they are unique)."""
    x = clustered_embeddings(3000, 64)
    np.save(tmp_path / "e.npy", x)
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", modality="image", encoder={"family": "x"},
                          row_keys=True, progress=False)
    assert s.version == 2
    emb = np.load(tmp_path / "s" / s.parts[0].embeddings_file)
    np.testing.assert_array_equal(emb, x.astype(np.float16))
    meta = pq.ParquetFile(tmp_path / "s" / s.parts[0].file).metadata
    assert meta.schema.names == ["key"]
    key = meta.row_group(0).column(0)
    assert "RLE_DICTIONARY" not in key.encodings and "PLAIN" in key.encodings and key.is_stats_set


def test_format1_embedding_column_is_plain_encoded(tmp_path):
    """Regression (format 1 writer, still used to append to format-1 stores): float16 embeddings were
    dictionary-encoded (float16 has at most 65536 values, so Parquet never fell back to PLAIN),
    making 1M x 512 reads ~3x and writes ~4x slower."""
    s = Store.create(tmp_path / "s", modality="image", encoder={"family": "x"}, dim=64, format_version=1)
    s.append_part([f"k{i}" for i in range(3000)], clustered_embeddings(3000, 64))
    meta = pq.ParquetFile(tmp_path / "s" / s.parts[0].file).metadata
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
            for i in range(meta.row_group(0).num_columns)}
    emb = cols["embedding.list.element"]
    assert "RLE_DICTIONARY" not in emb.encodings and "PLAIN" in emb.encodings
    assert not emb.is_stats_set
    assert "RLE_DICTIONARY" in cols["key"].encodings  # keys keep dictionary + statistics


def test_resume_after_keys_file_changed_starts_over(tmp_path, monkeypatch):
    """Issue 13 defect 3: a killed import resumed after its keys file was rewritten in place (same path,
    size and mtime) mixed old and new keys; the resume state is now keyed on content."""
    import os

    np.save(tmp_path / "e.npy", clustered_embeddings(40, 4))
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"old-{i:03d}\n" for i in range(40)))
    kw = {"modality": "text", "encoder": {"family": "x"}, "keys": keys, "part_rows": 10, "progress": False}
    real = Store.append_part
    calls = {"n": 0}

    def dying(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(Store, "append_part", dying)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    monkeypatch.setattr(Store, "append_part", real)
    st = keys.stat()
    keys.write_text("".join(f"new-{i:03d}\n" for i in range(40)))  # same size
    os.utime(keys, ns=(st.st_atime_ns, st.st_mtime_ns))              # same mtime
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", **kw)
    assert s.keys() == [f"new-{i:03d}" for i in range(40)]
    assert s.manifest["extra"]["import"]["keys_sha256"].startswith("sha256:")
    s.validate()


def test_float16_npy_rows_hashed_once_beside_the_screen(tmp_path, monkeypatch):
    """A float16 .npy of unit rows is written as it is: one sha256 per part, started before the row
    screen and handed to append_part (it used to hash after the screen, serially); a float32 input
    (cast for the store) is hashed by append_part from the cast rows. Either way the recorded digests
    are those of the written files."""
    from cmcr.stores import store as store_module

    started = []

    class Counting(store_module.NpyDigest):
        def __init__(self, emb):  # noqa: ANN001
            started.append(len(emb))
            super().__init__(emb)

    monkeypatch.setattr(store_module, "NpyDigest", Counting)
    monkeypatch.setattr(importing, "NpyDigest", Counting)
    x = clustered_embeddings(250, 16)
    np.save(tmp_path / "h.npy", x.astype(np.float16))
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    kw = {"modality": "image", "encoder": {"family": "x"}, "row_keys": True, "part_rows": 100, "progress": False}
    s = import_embeddings(tmp_path / "h.npy", tmp_path / "h", **kw)
    assert started == [100, 100, 50] and s.validate()["ok"]
    started.clear()
    s = import_embeddings(tmp_path / "f.npy", tmp_path / "f", **kw)
    assert started == [100, 100, 50] and s.validate()["ok"]
    np.testing.assert_array_equal(s.embeddings(), x.astype(np.float16))


def test_keys_digest_is_the_sha256_of_the_keys_lines():
    """The keys digest recorded by earlier imports (resume and reuse compare it) is unchanged: the sha256
    of the keys joined by newlines, newline-terminated, whatever the block size used to hash them."""
    import hashlib

    for n in (0, 1, 65537, (1 << 20) + 3):
        keys = [f"k{i}" for i in range(n)]
        want = hashlib.sha256("".join(k + "\n" for k in keys).encode()).hexdigest()
        assert importing._keys_digest(keys) == "sha256:" + want
