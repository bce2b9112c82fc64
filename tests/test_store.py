"""Store core: round trips, validation on append and on open, key joins, resume safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmcr.errors import StoreError, StoreFormatError, StoreMismatchError, StoreValidationError
from cmcr.stores.store import Store, join_by_key

ENC = {"family": "test", "architecture": "unit", "weights": "random"}


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_store(path: Path, dim: int = 8, **kw) -> Store:
    return Store.create(path, modality=kw.pop("modality", "text"), encoder=kw.pop("encoder", ENC), dim=dim, **kw)


# ---------------------------------------------------------------- round trips
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    dim=st.integers(1, 12),
    dtype=st.sampled_from(["float16", "float32"]),
)
def test_round_trip_any_parts(tmp_path_factory, sizes, dim, dtype):
    path = tmp_path_factory.mktemp("s") / "store"
    store = new_store(path, dim=dim, dtype=dtype)
    all_rows, all_keys, labels = [], [], []
    for p, n in enumerate(sizes):
        rows = unit_rows(n, dim, seed=p)
        keys = [f"p{p}-r{i}" for i in range(n)]
        lab = [f"label{i % 3}" for i in range(n)]
        store.append_part(keys, rows, {"label": lab}, source=f"shard-{p}")
        all_rows.append(rows), all_keys.extend(keys), labels.extend(lab)
    reopened = Store.open(path, modality="text", encoder=ENC, dim=dim, validate="full")
    emb = reopened.embeddings()
    expected = np.concatenate(all_rows)
    assert emb.shape == (sum(sizes), dim) and emb.flags.c_contiguous
    assert emb.dtype == np.dtype(dtype)
    tol = 1e-3 if dtype == "float16" else 0
    np.testing.assert_allclose(emb.astype(np.float32), expected, atol=tol)
    assert reopened.keys() == all_keys
    assert reopened.metadata(["label"]).column("label").to_pylist() == labels
    assert reopened.done_sources() == {f"shard-{p}" for p in range(len(sizes))}
    # streaming gives the same rows in the same order, in float32 on request
    streamed = [b for b in reopened.iter_batches(batch_size=7, columns=["label"], dtype=np.float32)]
    assert sum(len(b.keys) for b in streamed) == sum(sizes)
    if streamed:
        np.testing.assert_array_equal(np.concatenate([b.embeddings for b in streamed]), emb.astype(np.float32))
        assert [k for b in streamed for k in b.keys] == all_keys


def test_float32_read_of_float16_store_matches(tmp_path):
    store = new_store(tmp_path / "s", dim=16)
    rows = unit_rows(50, 16)
    store.append_part([str(i) for i in range(50)], rows)
    as32 = store.embeddings(np.float32)
    assert as32.dtype == np.float32
    np.testing.assert_array_equal(as32, store.embeddings().astype(np.float32))


def test_rows_of_and_missing_key(tmp_path):
    store = new_store(tmp_path / "s")
    store.append_part(["a", "b", "c"], unit_rows(3, 8))
    assert store.rows_of(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(StoreValidationError, match="not in the store"):
        store.rows_of(["zz"])


# ---------------------------------------------------------------- validation on append
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x: x[:, :7], "do not fit"),
        (lambda x: np.where(np.arange(8) == 3, np.nan, x), "NaN or Inf"),
        (lambda x: np.where(np.arange(8) == 3, np.inf, x), "NaN or Inf"),
        (lambda x: x * 1.5, "L2 norm 1.5"),
    ],
)
def test_append_rejects_bad_rows(tmp_path, mutate, match):
    store = new_store(tmp_path / "s")
    with pytest.raises(StoreValidationError, match=match):
        store.append_part(["a", "b"], mutate(unit_rows(2, 8)))
    assert store.num_rows == 0 and not list((tmp_path / "s" / "parts").glob("part-*"))


def test_append_names_the_bad_row_and_key(tmp_path):
    store = new_store(tmp_path / "s")
    rows = unit_rows(5, 8)
    rows[3] *= 0.5
    with pytest.raises(StoreValidationError, match=r"row 3 \(key 'k3'\)"):
        store.append_part([f"k{i}" for i in range(5)], rows)


def test_append_rejects_duplicate_and_empty_keys(tmp_path):
    store = new_store(tmp_path / "s")
    with pytest.raises(StoreValidationError, match="appears twice"):
        store.append_part(["a", "a"], unit_rows(2, 8))
    with pytest.raises(StoreValidationError, match="empty key"):
        store.append_part(["a", ""], unit_rows(2, 8))
    store.append_part(["a", "b"], unit_rows(2, 8))
    with pytest.raises(StoreValidationError, match="'b'.*already in the store"):
        store.append_part(["c", "b"], unit_rows(2, 8))
    assert store.keys() == ["a", "b"]


def test_append_without_key_checks_keeps_the_key_cache_right(tmp_path):
    """``check_keys=False`` (store import, whose keys were checked beforehand) skips the key set; the
    cached set of store keys must then be rebuilt, so a later checked append still sees every key."""
    store = new_store(tmp_path / "s")
    store.append_part(["a", "b"], unit_rows(2, 8))
    store.append_part(["c", "d"], unit_rows(2, 8), check_keys=False)
    with pytest.raises(StoreValidationError, match="'d'.*already in the store"):
        store.append_part(["e", "d"], unit_rows(2, 8))
    assert store.keys() == ["a", "b", "c", "d"]


def test_npy_digest_handed_over_only_when_it_covers_the_rows(tmp_path):
    """A digest started by the caller (:class:`NpyDigest`) is used only for the very rows written;
    any other is cancelled and the part's sha256 computed from its own rows."""
    import hashlib

    from cmcr.stores.store import NpyDigest

    x = unit_rows(300, 8).astype(np.float16)
    other = NpyDigest(unit_rows(300, 8, seed=1).astype(np.float16))
    assert not other.covers(x) and not NpyDigest(x).covers(x.copy()) and NpyDigest(x).covers(x)
    store = new_store(tmp_path / "s")
    part = store.append_part([f"k{i}" for i in range(300)], x, digest=other)
    data = (tmp_path / "s" / part.embeddings_file).read_bytes()
    assert part.embeddings_sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(RuntimeError, match="cancelled"):
        other.wait()
    mine = NpyDigest(x[:100])
    part = store.append_part([f"m{i}" for i in range(100)], x[:100], digest=mine)
    assert part.embeddings_sha256 == mine.wait() == hashlib.sha256(
        (tmp_path / "s" / part.embeddings_file).read_bytes()).hexdigest()
    assert store.validate()["ok"]


def test_append_rejects_second_part_of_same_source(tmp_path):
    store = new_store(tmp_path / "s")
    store.append_part(["a"], unit_rows(1, 8), source="shard-0")
    with pytest.raises(StoreValidationError, match="already has a part"):
        store.append_part(["b"], unit_rows(1, 8), source="shard-0")


def test_unnormalised_rows_allowed_in_inner_product_store(tmp_path):
    store = new_store(tmp_path / "s", normalized=False, metric="inner_product", dtype="float32")
    rows = unit_rows(3, 8) * 3
    store.append_part(["a", "b", "c"], rows)
    np.testing.assert_allclose(Store.open(tmp_path / "s", validate="full").embeddings(), rows, rtol=1e-6)


def test_cosine_store_must_be_normalised():
    with pytest.raises(StoreFormatError, match="normalised"):
        Store.create("/nonexistent-never-created", modality="text", encoder=ENC, dim=4, normalized=False)


def test_metadata_columns_fixed_by_first_part(tmp_path):
    store = new_store(tmp_path / "s")
    store.append_part(["a"], unit_rows(1, 8), {"label": ["x"], "duration_s": [1.5]})
    with pytest.raises(StoreFormatError, match="differ from the store's columns"):
        store.append_part(["b"], unit_rows(1, 8), {"label": ["y"]})
    # same names in another order, and ints castable to the established float column
    store.append_part(["b"], unit_rows(1, 8), {"duration_s": [2], "label": ["y"]})
    meta = store.metadata()
    assert meta.column("duration_s").to_pylist() == [1.5, 2.0]
    with pytest.raises(StoreFormatError, match="reserved"):
        store.append_part(["c"], unit_rows(1, 8), {"key": ["c"], "label": ["z"], "duration_s": [1.0]})


def test_all_null_first_column_becomes_string(tmp_path):
    store = new_store(tmp_path / "s")
    store.append_part(["a"], unit_rows(1, 8), {"label": [None]})
    store.append_part(["b"], unit_rows(1, 8), {"label": ["dog"]})
    assert store.metadata().column("label").to_pylist() == [None, "dog"]


def test_failures_recorded_and_deduplicated(tmp_path):
    store = new_store(tmp_path / "s")
    fail = {"key": "x", "stage": "decode", "error": "truncated file"}
    store.append_part(["a"], unit_rows(1, 8), source="shard-0", failures=[fail])
    other = {"key": "y", "source": "shard-1", "stage": "decode", "error": "e"}
    store.add_failures([{**fail, "source": "shard-0"}, other])
    table = Store.open(tmp_path / "s").failures()
    assert sorted(zip(table.column("key").to_pylist(), table.column("source").to_pylist(), strict=True)) == [
        ("x", "shard-0"), ("y", "shard-1")]
    store.clear_failures_of_source("shard-1")
    assert store.failures().column("key").to_pylist() == ["x"]


# ---------------------------------------------------------------- validation on open
def test_open_checks_expected_modality_encoder_dim(tmp_path):
    new_store(tmp_path / "s", dim=8).append_part(["a"], unit_rows(1, 8))
    with pytest.raises(StoreMismatchError, match="must hold 'image'"):
        Store.open(tmp_path / "s", modality="image")
    with pytest.raises(StoreMismatchError, match="expected dim 16"):
        Store.open(tmp_path / "s", dim=16)
    # same dim, same modality, other model: refused
    with pytest.raises(StoreMismatchError, match="different encoders"):
        Store.open(tmp_path / "s", encoder={**ENC, "weights": "openai"}, dim=8)
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "missing")


def test_open_or_create_refuses_other_identity_unless_overwrite(tmp_path):
    s = Store.open_or_create(tmp_path / "s", modality="text", encoder=ENC, dim=8)
    s.append_part(["a"], unit_rows(1, 8))
    assert Store.open_or_create(tmp_path / "s", modality="text", encoder=ENC, dim=8).num_rows == 1
    other = {**ENC, "weights": "sha256:abc"}
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        Store.open_or_create(tmp_path / "s", modality="text", encoder=other, dim=8)
    fresh = Store.open_or_create(tmp_path / "s", modality="text", encoder=other, dim=8, overwrite=True)
    assert fresh.num_rows == 0 and fresh.encoder == other


def _write_foreign_part(store: Store, table: pa.Table, rows: int) -> None:
    """Simulate another tool writing a part + manifest entry by hand (in the store's format:
    format 2 takes the ``embedding`` column out into a ``.npy``)."""
    from cmcr.stores.store import sha256_file

    path = store.path / "parts" / "part-000099.parquet"
    entry = {"file": "parts/part-000099.parquet", "rows": rows, "source": None}
    if store.version >= 2:
        col = table.column("embedding").combine_chunks()
        emb = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        np.save(store.path / "parts" / "part-000099.npy", emb)
        table = table.drop_columns(["embedding"])
        npy = store.path / "parts" / "part-000099.npy"
        entry.update(embeddings_file="parts/part-000099.npy", embeddings_sha256=sha256_file(npy))
    pq.write_table(table, path)
    entry["sha256"] = sha256_file(path)
    m = json.loads((store.path / "manifest.json").read_text())
    m["parts"].append(entry)
    m["num_rows"] += rows
    (store.path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("version", [1, 2])
def test_open_rejects_part_with_other_dim_or_dtype_or_columns(tmp_path, version):
    for name, emb_type, extra in [
        ("dim", pa.list_(pa.float16(), 4), {"label": pa.array(["x"])}),
        ("dtype", pa.list_(pa.float32(), 8), {"label": pa.array(["x"])}),
        ("columns", pa.list_(pa.float16(), 8), {"other": pa.array(["x"])}),
    ]:
        store = new_store(tmp_path / name, format_version=version)
        store.append_part(["a"], unit_rows(1, 8), {"label": ["x"]})
        dim = emb_type.list_size
        values = pa.array(unit_rows(1, dim).reshape(-1).astype(
            np.float16 if emb_type.value_type == pa.float16() else np.float32))
        table = pa.table({"key": ["b"], "embedding": pa.FixedSizeListArray.from_arrays(values, dim), **extra})
        _write_foreign_part(store, table, 1)
        with pytest.raises(StoreFormatError, match="part-000099") as info:
            Store.open(tmp_path / name)
        want = {1: {"dim": "dim is 8", "dtype": "dtype is float16", "columns": "metadata columns"},
                2: {"dim": "the manifest says (1, 8) float16", "dtype": "the manifest says (1, 8) float16",
                    "columns": "metadata columns"}}[version][name]
        assert want in str(info.value)


@pytest.mark.parametrize("version", [1, 2])
def test_full_validation_finds_duplicate_keys_across_parts_and_tampering(tmp_path, version):
    store = new_store(tmp_path / "s", format_version=version)
    store.append_part(["a", "b"], unit_rows(2, 8))
    table = pa.table({"key": ["b"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(unit_rows(1, 8).reshape(-1).astype(np.float16)), 8)})
    _write_foreign_part(store, table, 1)
    Store.open(tmp_path / "s")  # fast validation does not read rows
    with pytest.raises(StoreValidationError, match="duplicate key 'b'"):
        Store.open(tmp_path / "s", validate="full")

    store2 = new_store(tmp_path / "t", format_version=version)
    store2.append_part(["a"], unit_rows(1, 8))
    part = tmp_path / "t" / "parts" / "part-000000.parquet"
    t = pq.read_table(part)
    pq.write_table(t.set_column(0, "key", pa.array(["z"])), part)
    with pytest.raises(StoreError, match="sha256|bytes, the manifest says"):  # format 2: the size already differs
        Store.open(tmp_path / "t", validate="full")


def test_open_reports_missing_part_and_row_count_mismatch(tmp_path):
    store = new_store(tmp_path / "s")
    store.append_part(["a"], unit_rows(1, 8))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["num_rows"] = 5
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="num_rows is 5"):
        Store.open(tmp_path / "s")
    m["num_rows"] = 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "s" / "parts" / "part-000000.parquet").unlink()
    with pytest.raises(StoreFormatError, match="part-000000.parquet: part listed in the manifest is missing"):
        Store.open(tmp_path / "s")


# ---------------------------------------------------------------- joins
@settings(max_examples=30, deadline=None)
@given(
    left=st.lists(st.text("abcdef", min_size=1, max_size=3), unique=True, max_size=20),
    right=st.lists(st.text("abcdef", min_size=1, max_size=3), unique=True, max_size=20),
)
def test_join_by_key_matches_set_semantics(tmp_path_factory, left, right):
    base = tmp_path_factory.mktemp("j")
    a, b = new_store(base / "a", dim=4), new_store(base / "b", dim=4, encoder={"family": "other"})
    ea, eb = unit_rows(len(left), 4, 1), unit_rows(len(right), 4, 2)
    if left:
        a.append_part(left, ea)
    if right:
        b.append_part(right, eb)
    j = join_by_key(a, b)
    assert j.keys == [k for k in left if k in set(right)]
    assert j.only_left == [k for k in left if k not in set(right)]
    assert j.only_right == [k for k in right if k not in set(left)]
    # rows point at the same keys on both sides, whatever the row order
    assert [left[i] for i in j.rows_left] == j.keys == [right[i] for i in j.rows_right]
    np.testing.assert_allclose(a.embeddings(np.float32)[j.rows_left], ea[j.rows_left], atol=1e-3)


# ---------------------------------------------------------------- resume safety
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import cmcr.stores.store as S
    path, where = sys.argv[1], sys.argv[2]
    store = S.Store.open(path)
    if where == "manifest":      # part file renamed into place, manifest not yet updated
        S.atomic_write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    elif where == "parquet":     # killed while the part's temp file is half written
        real = S.atomic_write_parquet
        def half(p, table, **kw):
            tmp = os.path.join(os.path.dirname(p), ".tmp-" + os.path.basename(p) + "-1")
            open(tmp, "wb").write(b"PAR1 half written")
            os.kill(os.getpid(), signal.SIGKILL)
        S.atomic_write_parquet = half
    x = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store.append_part([f"late{i}" for i in range(4)], x, source="shard-late")
    """
)


@pytest.mark.parametrize("where", ["manifest", "parquet"])
def test_killed_append_leaves_store_readable(tmp_path, where):
    store = new_store(tmp_path / "s")
    rows = unit_rows(6, 8)
    store.append_part([f"k{i}" for i in range(6)], rows, source="shard-0")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "s"), where], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = [p.name for p in (tmp_path / "s" / "parts").iterdir()]
    # the earlier part (.parquet + .npy) and the orphan / temp files of the killed one
    assert len(leftovers) == {"manifest": 4, "parquet": 3}[where], leftovers
    reopened = Store.open(tmp_path / "s", validate="full")
    assert reopened.keys() == [f"k{i}" for i in range(6)]
    np.testing.assert_allclose(reopened.embeddings(np.float32), rows, atol=1e-3)
    assert reopened.done_sources() == {"shard-0"}  # the killed source is not marked done: a rerun redoes it
    reopened.append_part([f"late{i}" for i in range(4)], unit_rows(4, 8, 5), source="shard-late")
    names = sorted(p.name for p in (tmp_path / "s" / "parts").iterdir())
    assert names == ["part-000000.npy", "part-000000.parquet", "part-000001.npy", "part-000001.parquet"]
    assert Store.open(tmp_path / "s", validate="full").num_rows == 10


def test_kill_at_random_points_never_corrupts(tmp_path):
    """A writer appending in a loop is SIGKILLed at arbitrary moments; every listed part stays valid."""
    store = new_store(tmp_path / "s", dim=64)
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from cmcr.stores.store import Store
        import pyarrow as pa
        s = Store.open(sys.argv[1])
        rng = np.random.default_rng(int(sys.argv[2]))
        pa.array(["warm up"])  # pyarrow imports pandas on first use: not part of the timing
        print("go", flush=True)
        i = 0
        while True:
            x = rng.standard_normal((2000, 64)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            s.append_part([f"{sys.argv[2]}-{i}-{j}" for j in range(2000)], x, source=f"{sys.argv[2]}-{i}")
            i += 1
        """
    )
    for attempt, delay in enumerate((0.4, 0.9, 1.5)):  # seconds after the writer's start-up
        proc = subprocess.Popen([sys.executable, "-c", script, str(store.path), str(attempt)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reopened = Store.open(store.path, validate="full")
        assert reopened.num_rows == 2000 * len(reopened.parts)
    assert reopened.num_rows > 0


def test_concurrent_writers_do_not_lose_parts(tmp_path):
    new_store(tmp_path / "s", dim=8)
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from cmcr.stores.store import Store
        s = Store.open(sys.argv[1])
        for i in range(5):
            x = np.eye(8, dtype=np.float32)[:3]
            s.append_part([f"{sys.argv[2]}-{i}-{j}" for j in range(3)], x, source=f"{sys.argv[2]}-{i}")
        """
    )
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s"), w], env=env) for w in "ab"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    store = Store.open(tmp_path / "s", validate="full")
    assert store.num_rows == 30 and len(store.done_sources()) == 10


def test_key_check_sees_rows_appended_by_another_writer(tmp_path):
    first = new_store(tmp_path / "s")
    second = Store.open(tmp_path / "s")
    first.append_part(["a"], unit_rows(1, 8))  # first caches its key set here
    second.append_part(["b"], unit_rows(1, 8))
    assert first.keys_present(["a", "b", "c"]) == ["a", "b"]
    with pytest.raises(StoreValidationError, match="'b'.*already in the store"):
        first.append_part(["b"], unit_rows(1, 8))
    assert Store.open(tmp_path / "s", validate="full").keys() == ["a", "b"]
