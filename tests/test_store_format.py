"""Store format 2 (a .npy per part), old format-1 stores, metadata schemas (issue 13 defect 9) and
integrity checks on open/read (issue 13 defect 4)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cmcr.errors import StoreError, StoreFormatError, StoreValidationError
from cmcr.stores.importing import import_embeddings
from cmcr.stores.store import FORMAT_VERSION, Store
from tests.fixtures_stores import build_test_store, clustered_embeddings

FIXTURES = Path(__file__).parent / "fixtures"
ENC = {"family": "test", "architecture": "unit", "weights": "random"}


def _v1_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "v1"
    shutil.copytree(FIXTURES / "store_v1", dst)
    return dst


# ---------------------------------------------------------------- old stores
def test_format1_store_written_by_the_old_writer_still_reads(tmp_path):
    path = _v1_copy(tmp_path)
    store = Store.open(path, modality="image", validate="full")
    assert store.version == 1 and FORMAT_VERSION == 2
    want = np.load(FIXTURES / "store_v1_embeddings.npy")
    np.testing.assert_array_equal(store.embeddings(), want)
    np.testing.assert_allclose(store.embeddings(np.float32), want.astype(np.float32))
    assert store.keys() == [f"k{p}-{i}" for p in range(2) for i in range(3)]
    meta = store.metadata()
    assert meta.column("label").to_pylist() == [0, 1, 0] * 2 and meta.column("caption").type == pa.string()
    batches = list(store.iter_batches(4, columns=["caption"]))
    assert [len(b.keys) for b in batches] == [3, 3]
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), want)
    assert store.failures().num_rows == 1
    # the fingerprint of an old store does not change (indexes and connectors recorded it)
    manifest = json.loads((FIXTURES / "store_v1" / "manifest.json").read_text())
    from cmcr.stores.store import identity_fingerprint
    body = {k: manifest[k] for k in ("modality", "encoder", "preprocessing", "dim", "metric")}
    body["parts"] = [p["sha256"] for p in manifest["parts"]]
    assert store.fingerprint() == identity_fingerprint(body)


@pytest.mark.parametrize("version", [1, 2])
def test_embeddings_of_some_rows_reads_only_their_parts(tmp_path, version, monkeypatch):
    if version == 1:
        store = Store.open(_v1_copy(tmp_path))
    else:
        store = build_test_store(tmp_path / "s", n=90, dim=8, parts=3)
    full = store.embeddings(np.float32)
    rows = [store.num_rows - 1, 0, 3, 3]
    np.testing.assert_array_equal(store.embeddings_of(rows, np.float32), full[rows])
    np.testing.assert_array_equal(store.embeddings_of([], np.float32), full[:0])
    read = []
    real = Store.iter_part_embeddings

    def spy(self, index, *a, **k):
        read.append(index)
        return real(self, index, *a, **k)

    monkeypatch.setattr(Store, "iter_part_embeddings", spy)
    store.embeddings_of([1], np.float32)
    assert read == [0]  # one row: its part only
    with pytest.raises(StoreValidationError, match="row numbers"):
        store.embeddings_of([store.num_rows])


def test_format1_store_appends_in_its_own_layout(tmp_path):
    store = Store.open(_v1_copy(tmp_path))
    x = clustered_embeddings(4, 8, seed=3)
    store.append_part([f"new-{i}" for i in range(4)], x, metadata={"label": [1] * 4, "caption": ["c"] * 4})
    again = Store.open(store.path, validate="full")
    assert again.version == 1 and again.num_rows == 10
    assert not list((store.path / "parts").glob("*.npy"))
    np.testing.assert_allclose(again.embeddings(np.float32)[6:], x, atol=2e-3)


def test_format1_store_with_struct_column_opens(tmp_path):
    """Format-1 manifests printed column types; a struct type could not be parsed back (defect 9).
    The reader now takes such a type from the part's own Parquet schema."""
    s = Store.create(tmp_path / "s", modality="text", encoder=ENC, dim=4, format_version=1)
    s.append_part(["a", "b"], np.eye(4, dtype=np.float32)[:2],
                  metadata=pa.table({"st": pa.array([{"x": 1}, {"x": 2}])}))
    m = json.loads((s.path / "manifest.json").read_text())
    assert m["columns"] == [{"name": "st", "type": "struct<x: int64>"}] and "metadata_schema" not in m
    assert Store.open(s.path).metadata().column("st").to_pylist() == [{"x": 1}, {"x": 2}]


def test_unknown_version_refused(tmp_path):
    s = build_test_store(tmp_path / "s", n=5)
    m = json.loads((s.path / "manifest.json").read_text())
    m["format_version"] = 3
    (s.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="format_version 3 is not supported"):
        Store.open(s.path)


# ---------------------------------------------------------------- format 2
def test_new_stores_are_format2_with_an_npy_per_part(tmp_path):
    s = build_test_store(tmp_path / "s", n=30, dim=8, parts=3)
    assert s.version == 2
    names = sorted(p.name for p in (s.path / "parts").iterdir())
    assert names == [f"part-00000{i}.{ext}" for i in range(3) for ext in ("npy", "parquet")]
    joined = np.concatenate([np.load(s.path / p.embeddings_file) for p in s.parts])
    np.testing.assert_array_equal(joined, Store.open(s.path).embeddings())


def test_streaming_read_is_bounded_by_the_batch(tmp_path):
    x = clustered_embeddings(1000, 8)
    s = build_test_store(tmp_path / "s", n=1000, dim=8, parts=3, embeddings=x)
    sizes, rows, keys = [], [], []
    for b in Store.open(s.path).iter_batches(128, columns=["label"], dtype=np.float32):
        sizes.append(len(b.keys))
        assert b.embeddings.shape == (len(b.keys), 8) and b.embeddings.dtype == np.float32
        assert b.metadata.num_rows == len(b.keys)
        rows.append(b.embeddings)
        keys += b.keys
    assert max(sizes) <= 128 and sum(sizes) == 1000
    assert keys == s.keys()
    np.testing.assert_allclose(np.concatenate(rows), x, atol=2e-3)
    blocks = list(s.iter_part_embeddings(1, 100))
    assert [len(b) for b in blocks] == [100, 100, 100, 33]


# ---------------------------------------------------------------- defect 9: metadata schemas
def test_struct_list_and_categorical_columns_keep_their_types(tmp_path):
    df = pd.DataFrame({"cat": pd.Categorical(["a", "b", "a"]), "n": [1, 2, 3]})
    meta = pa.Table.from_pandas(df, preserve_index=False)
    meta = meta.append_column("st", pa.array([{"x": 1, "y": "u"}, {"x": 2, "y": "v"}, {"x": 3, "y": "w"}]))
    meta = meta.append_column("l", pa.array([[1, 2], [3], []]))
    s = Store.create(tmp_path / "s", modality="text", encoder=ENC, dim=4)
    s.append_part(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3], metadata=meta)
    s.append_part(["d"], np.eye(4, dtype=np.float32)[3:], metadata=pa.table({
        "cat": pa.array(["z"]).dictionary_encode(), "n": [4], "st": [{"x": 9, "y": "q"}], "l": [[5]]}))
    got = Store.open(tmp_path / "s", validate="full").metadata()
    assert pa.types.is_dictionary(got.schema.field("cat").type)
    assert pa.types.is_struct(got.schema.field("st").type) and pa.types.is_list(got.schema.field("l").type)
    assert got.column("cat").to_pylist() == ["a", "b", "a", "z"]
    assert got.column("st").to_pylist()[3] == {"x": 9, "y": "q"}
    assert got.column("l").to_pylist() == [[1, 2], [3], [], [5]]
    assert got.to_pandas()["cat"].dtype == "category"


def test_import_with_categorical_metadata_opens(tmp_path):
    """Defect 9 through `store import`: a pandas categorical metadata column was published, then the
    store could not be opened."""
    x = clustered_embeddings(6, 4)
    np.save(tmp_path / "e.npy", x)
    pd.DataFrame({"key": [f"k{i}" for i in range(6)], "cls": pd.Categorical(["a", "b"] * 3),
                  "box": [{"w": i, "h": 2 * i} for i in range(6)]}).to_parquet(tmp_path / "m.parquet")
    s = import_embeddings(tmp_path / "e.npy", tmp_path / "s", modality="image", encoder={"family": "x"},
                          metadata=tmp_path / "m.parquet", progress=False)
    got = Store.open(s.path).metadata()
    assert got.column("cls").to_pylist() == ["a", "b"] * 3
    assert got.column("box").to_pylist()[2] == {"w": 2, "h": 4}


def test_unwritable_metadata_type_is_a_clear_error_and_the_store_is_unchanged(tmp_path):
    s = Store.create(tmp_path / "s", modality="text", encoder=ENC, dim=4)
    bad = pa.table({"iv": pa.array([pa.MonthDayNano([1, 2, 3])] * 2, pa.month_day_nano_interval())})
    with pytest.raises(StoreFormatError, match="cannot be written to Parquet"):
        s.append_part(["x", "y"], np.eye(4, dtype=np.float32)[:2], metadata=bad)
    again = Store.open(s.path, validate="full")
    assert again.num_rows == 0 and again.manifest["columns"] is None
    assert [p.name for p in (s.path / "parts").iterdir() if not p.name.startswith(".tmp-")] == []


def test_part_that_does_not_read_back_is_not_published(tmp_path, monkeypatch):
    """What is written is read back before the manifest lists it."""
    import pyarrow.parquet as pq

    s = build_test_store(tmp_path / "s", n=4, dim=4)
    real = pq.read_table

    def lossy(*a, **k):  # noqa: ANN002, ANN003
        t = real(*a, **k)
        return t.set_column(t.column_names.index("caption"), "caption", pa.array(["?"] * t.num_rows))

    monkeypatch.setattr(pq, "read_table", lossy)
    with pytest.raises(StoreFormatError, match="'caption' .* does not read back as written"):
        s.append_part(["x"], np.eye(4, dtype=np.float32)[:1], metadata={"label": [1], "caption": ["c"]})
    monkeypatch.setattr(pq, "read_table", real)
    assert Store.open(s.path).num_rows == 4
    assert sorted(p.name for p in (s.path / "parts").iterdir()) == ["part-000000.npy", "part-000000.parquet"]


# ---------------------------------------------------------------- defect 4: integrity on open / read
def _two_part_store(tmp_path: Path) -> Store:
    return build_test_store(tmp_path / "s", n=40, dim=8, parts=2)


def test_swapped_embedding_files_are_refused_on_read(tmp_path):
    s = _two_part_store(tmp_path)
    a, b = (s.path / p.embeddings_file for p in s.parts)
    tmp = a.with_name("swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    store = Store.open(s.path)  # same sizes and shapes: open cannot tell
    with pytest.raises(StoreValidationError, match=r"part-000000\.npy: sha256 .* restore it"):
        store.embeddings()
    with pytest.raises(StoreValidationError, match=r"part-00000[01]\.npy: sha256"):
        list(store.iter_batches(7))


def test_swapped_key_files_are_refused_on_read(tmp_path):
    s = _two_part_store(tmp_path)
    a, b = (s.path / p.file for p in s.parts)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(StoreError, match=r"part-000000\.parquet"):
        Store.open(s.path).keys()


def test_tampered_cosine_rows_are_refused_even_with_the_file_time_restored(tmp_path):
    """A cosine store whose rows were scaled returned scores of 50; sampled norms catch it on read,
    even when the verification cache is fooled (size, inode and mtime unchanged)."""
    s = _two_part_store(tmp_path)
    Store.open(s.path).embeddings()  # verified and cached
    npy = s.path / s.parts[1].embeddings_file
    st = npy.stat()
    arr = np.load(npy, mmap_mode="r+")
    arr[:] = arr * 7
    arr.flush()
    del arr
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreValidationError, match=r"part-000001\.npy: row \d+ has L2 norm 7"):
        Store.open(s.path).embeddings()
    with pytest.raises(StoreValidationError, match="sha256"):
        Store.open(s.path, validate="full")


def test_truncated_or_replaced_npy_is_refused_on_open(tmp_path):
    s = _two_part_store(tmp_path)
    npy = s.path / s.parts[0].embeddings_file
    data = npy.read_bytes()
    npy.write_bytes(data[:-16])
    with pytest.raises(StoreFormatError, match=r"part-000000\.npy: .*bytes"):
        Store.open(s.path)
    np.save(npy, np.zeros((5, 8), np.float16))
    with pytest.raises(StoreFormatError, match=r"part-000000\.npy: holds a float16 array of shape \(5, 8\)"):
        Store.open(s.path)


def test_verification_is_cached_by_file_identity(tmp_path, monkeypatch):
    """Reads after the first do not hash again (that is what keeps reads at numpy.load speed)."""
    import cmcr.stores.store as S

    s = _two_part_store(tmp_path)
    (s.path / ".verified.json").unlink()  # as if copied from elsewhere
    hashed = []
    real = S.Store._check_digest
    monkeypatch.setattr(S.Store, "_check_digest", lambda self, rel, *a: (hashed.append(rel), real(self, rel, *a)))
    Store.open(s.path).embeddings()
    assert len(hashed) == 2
    Store.open(s.path).embeddings()
    assert len(hashed) == 2


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fast_row_screen_never_passes_what_the_exact_check_refuses(dtype):
    """The fast screen (float16: from the bits) may only pass rows the exact check passes."""
    from cmcr.stores.store import NORM_TOLERANCE, _check_rows, _screen_rows

    rng = np.random.default_rng(1)
    base = clustered_embeddings(2048, 32).astype(dtype)
    keys = [str(i) for i in range(len(base))]
    tol = NORM_TOLERANCE["float16"]
    cases = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("zero row", 0.0), ("scaled", 1.01),
             ("subnormal", 1e-7), ("big", 60000.0), ("fine", None)]
    for name, value in cases:
        x = base.copy()
        row = int(rng.integers(0, len(x)))
        if name in ("zero row", "scaled"):
            x[row] = 0 if value == 0 else x[row] * dtype(value)
        elif value is not None:
            x[row, int(rng.integers(0, 32))] = value
        for normalized in (True, False):
            try:
                _check_rows(x, keys, normalized, tol, "t")
                exact_ok = True
            except StoreValidationError:
                exact_ok = False
            if _screen_rows(x, normalized, tol):
                assert exact_ok, (name, normalized)
            if name == "fine":
                assert _screen_rows(x, normalized, tol), "clean rows must pass the screen"
