"""Tests of `cmcr store import/info/validate/index` through cmcr.cli.main (exit codes, output, files)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmcr.cli import main
from cmcr.cli_store import _parse_bytes
from cmcr.stores.index import open_index
from cmcr.stores.store import Store
from tests.fixtures_stores import clustered_embeddings


def _write_npy_inputs(tmp_path, n=40, d=8):
    x = clustered_embeddings(n, d) * 2.5  # exported embeddings are rarely unit length
    np.save(tmp_path / "pc.npy", x)
    (tmp_path / "uids.csv").write_text("uid\n" + "".join(f"obj{i:04d}\n" for i in range(n)))
    (tmp_path / "meta.csv").write_text("uid,category\n" + "".join(f"obj{i:04d},c{i % 4}\n" for i in range(n)))
    return x


def test_import_info_validate_index_roundtrip(tmp_path, capsys):
    x = _write_npy_inputs(tmp_path)
    out = tmp_path / "ulip2-3d"
    rc = main(["store", "import", str(tmp_path / "pc.npy"), "--out", str(out), "--modality", "3d",
               "--encoder-family", "ulip2", "--architecture", "PointBERT", "--weights", "ulip2-pointbert.pt",
               "--keys", str(tmp_path / "uids.csv"), "--key-column", "uid", "--metadata", str(tmp_path / "meta.csv"),
               "--normalize", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 40 and summary["modality"] == "3d" and summary["metadata_columns"] == ["category"]
    assert summary["encoder"] == {"family": "ulip2", "architecture": "PointBERT", "weights": "ulip2-pointbert.pt",
                                  "dim": 8}
    assert summary["extra"]["import"]["normalized_on_import"] is True
    assert "cmcr store import" in Store.open(out).manifest["created_by"]["command"]

    assert main(["store", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3d" in text and "40 x 8" in text and "none (build one" in text

    assert main(["store", "validate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "path": str(out), "rows": 40, "parts": 1,
                                                   "checks": "full"}

    assert main(["store", "index", str(out), "--plan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "flat"
    assert main(["store", "index", str(out), "--json", "--sample-queries", "20"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kind"] == "flat" and rec["recall_at_10"] == 1.0 and rec["recall_queries"] == 20
    hits = open_index(out).search(x[5], k=1)[0]
    assert hits[0].key == "obj0005" and hits[0].metadata == {"category": "c1"}
    # --plan shows the plan and, once built, the decision and its reasons
    assert main(["store", "index", str(out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "plan: flat" in text and "built: flat" in text and "exact search: recall 1.0" in text

    assert main(["store", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["kind"] == "flat" and info["index"]["stale"] is False


def test_import_errors_exit_with_clear_message(tmp_path, capsys):
    _write_npy_inputs(tmp_path)
    base = ["store", "import", str(tmp_path / "pc.npy"), "--out", str(tmp_path / "s"), "--modality", "3d"]
    assert main([*base, "--keys", str(tmp_path / "uids.csv"), "--key-column", "uid"]) == 2
    err = capsys.readouterr().err
    assert "family" in err  # no identity
    assert main([*base, "--encoder-family", "ulip2", "--keys", str(tmp_path / "uids.csv"), "--key-column", "uid"]) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "pc.npy: row 0" in err and "normalize" in err and "L2 norm" in err
    assert main([*base, "--encoder-family", "ulip2", "--keys", str(tmp_path / "meta.csv"), "--normalize"]) == 1
    assert "no key column 'key'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s").exists()


def test_import_parquet_with_encoder_json(tmp_path, capsys):
    x = clustered_embeddings(12, 4)
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(12)], "emb": x.tolist(), "path": ["p"] * 12}),
                   tmp_path / "ib.parquet")
    (tmp_path / "enc.json").write_text(json.dumps({"family": "imagebind", "architecture": "imagebind_huge"}))
    rc = main(["store", "import", str(tmp_path / "ib.parquet"), "-o", str(tmp_path / "ib"), "-m", "audio",
               "--encoder-json", str(tmp_path / "enc.json"), "--key-column", "id", "--embedding-column", "emb",
               "--dtype", "float32"])
    assert rc == 0
    s = Store.open(tmp_path / "ib")
    assert s.dtype == "float32" and s.encoder["family"] == "imagebind" and s.metadata_columns == ["path"]


def test_validate_reports_corruption_and_stale_index(tmp_path, capsys, store_factory):
    store = store_factory(n=50, dim=8)
    assert main(["store", "index", str(store.path), "--sample-queries", "10"]) == 0
    assert "recall@10 1.000" in capsys.readouterr().out
    store.append_part(["late"], clustered_embeddings(1, 8, seed=3), metadata={"label": [0], "caption": ["z"]},
                      source="late")
    assert main(["store", "info", str(store.path)]) == 0
    assert "STALE" in capsys.readouterr().out
    part = store.path / store.parts[0].embeddings_file  # the rows: only a full validation reads them
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["store", "validate", str(store.path), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False and "part-000000.npy" in rep["error"]
    assert main(["store", "validate", str(store.path), "--fast"]) == 0
    assert main(["store", "info", str(tmp_path / "nowhere")]) == 1


def test_parse_bytes():
    assert _parse_bytes("2GiB") == 2 * 1024**3
    assert _parse_bytes("512MB") == 512 * 1000**2
    assert _parse_bytes("1.5G") == int(1.5 * 1024**3)
    assert _parse_bytes("1000") == 1000


def test_index_plan_runs_the_probe_and_says_why(tmp_path, capsys, monkeypatch):
    # issue 11: `cmcr store index --plan` says why a big store would get an exact index
    import cmcr.stores.index as ix
    from cmcr.stores.store import Store

    monkeypatch.setattr(ix, "PROBE_MIN_ROWS", 2000)
    monkeypatch.setattr(ix, "PROBE_ROWS", 2000)
    x = np.random.default_rng(1).standard_normal((2500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = Store.create(tmp_path / "u", modality="image", encoder={"family": "t"}, dim=16)
    store.append_part([f"u{i}" for i in range(len(x))], x)
    # a 100 KB budget rules out flat and HNSW: the plan is IVF64,SQ8
    args = ["store", "index", str(store.path), "--plan", "--memory-budget", "100KB", "--sample-queries", "50"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "plan: ivf IVF64,SQ8" in text and "probe: probe of IVF64,SQ8" in text and "on 2,000 sampled rows" in text
    assert "built: none yet" in text and not (store.path / "index").exists()
