"""Hostile tars (issue 13 defect 5): duplicate members, missing listed shards, empty shards, link
members, size limits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cmcr.cli import main
from cmcr.errors import InputDataError
from cmcr.pipeline.corpora import TarLimits, iter_tar_samples
from cmcr.pipeline.encode import encode_shards, list_shards
from cmcr.pipeline.shards import write_shards
from cmcr.stores.store import Store


def _tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> Path:
    """Write a tar; each member ``(name, data, kind)`` with kind ``file`` / ``symlink`` / ``hardlink``."""
    with tarfile.open(path, "w") as tf:
        for name, data, kind in members:
            ti = tarfile.TarInfo(name)
            if kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(ti)
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, "a.txt"
                tf.addfile(ti)
            else:
                ti.size = len(data or b"")
                tf.addfile(ti, io.BytesIO(data or b""))
    return path


def _text(key: str, caption: str) -> list[tuple[str, bytes, str]]:
    return [(f"{key}.txt", caption.encode(), "file"), (f"{key}.json", json.dumps({"label": key}).encode(), "file")]


def test_duplicate_member_is_an_error_naming_tar_and_member(tmp_path: Path) -> None:
    p = _tar(tmp_path / "s.tar", [*_text("a", "a dog"), ("a.txt", b"another caption", "file"), *_text("b", "a cat")])
    samples = list(iter_tar_samples(p))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    assert "duplicate member a.txt" in samples[0]["__error__"] and "s.tar" in samples[0]["__error__"]
    assert "txt" not in samples[0] and samples[1]["txt"] == b"a cat"


def test_case_variants_of_one_extension_are_duplicates(tmp_path: Path) -> None:
    p = _tar(tmp_path / "s.tar", [("a.jpg", b"x", "file"), ("a.JPG", b"y", "file")])
    assert "duplicate member a.JPG" in next(iter_tar_samples(p))["__error__"]


def test_symlink_and_hardlink_members_are_reported(tmp_path: Path) -> None:
    p = _tar(tmp_path / "s.tar", [("a.txt", None, "symlink"), ("b.txt", None, "hardlink"), *_text("c", "ok")])
    a, b, c = iter_tar_samples(p)
    assert "a.txt is a symlink (to /etc/passwd)" in a["__error__"]
    assert "b.txt is a hard link" in b["__error__"]
    assert c["txt"] == b"ok"


def test_member_and_sample_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _tar(tmp_path / "s.tar", [("a.txt", b"x" * 100, "file"), ("b.txt", b"x" * 60, "file"),
                                  ("b.json", b"{" + b" " * 58 + b"}", "file"), ("c.txt", b"ok", "file")])
    a, b, c = iter_tar_samples(p, TarLimits(max_member_bytes=80, max_sample_bytes=100))
    assert "a.txt is 100 bytes, above the limit of 80 bytes per member" in a["__error__"]
    assert "sample 'b' is over 120 bytes" in b["__error__"] and "--max-sample-bytes" in b["__error__"]
    assert c["txt"] == b"ok"
    monkeypatch.setenv("CMCR_MAX_MEMBER_BYTES", "50")
    assert "__error__" in next(iter_tar_samples(p))
    monkeypatch.setenv("CMCR_MAX_MEMBER_BYTES", "lots")
    with pytest.raises(InputDataError, match="CMCR_MAX_MEMBER_BYTES"):
        list(iter_tar_samples(p))


def test_gzip_bomb_member_is_refused_without_reading_it(tmp_path: Path) -> None:
    p = tmp_path / "bomb.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        ti = tarfile.TarInfo("a.txt")
        ti.size = 64 << 20  # 64 MiB of zeros compresses to ~64 KiB
        tf.addfile(ti, io.BytesIO(bytes(ti.size)))
    assert p.stat().st_size < 1 << 20
    (s,) = iter_tar_samples(p, TarLimits(max_member_bytes=1 << 20))
    assert "above the limit" in s["__error__"] and "txt" not in s


def test_bad_samples_become_failures_and_the_run_goes_on(tiny_clip, tmp_path: Path) -> None:
    folder = tmp_path / "text"
    folder.mkdir()
    _tar(folder / "shard-000000.tar", [*_text("a", "a dog"), ("a.txt", b"dup", "file"), *_text("b", "a cat"),
                                       ("c.txt", None, "symlink")])
    _tar(folder / "shard-000001.tar", [])
    rep = encode_shards(folder, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    assert rep.rows == 1 and rep.failures == 2
    assert rep.empty_shards == [str(folder / "shard-000001.tar")]
    fails = {f["key"]: f for f in Store.open(tmp_path / "store").failures().to_pylist()}
    assert fails["a"]["stage"] == "read" and "duplicate member a.txt" in fails["a"]["error"]
    assert "symlink" in fails["c"]["error"]


def test_empty_shard_is_reported_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "text"
    folder.mkdir()
    _tar(folder / "shard-000000.tar", _text("a", "a dog"))
    _tar(folder / "shard-000001.tar", [])
    code = main(["encode", str(folder), "-e", "open_clip:cmcr-tiny-clip@random", "-m", "text", "-s",
                 str(tmp_path / "store"), "-j", "0", "--no-progress"])
    assert code == 0
    assert "empty shard (no samples)" in capsys.readouterr().err


def test_shard_listed_in_index_but_missing_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\nbirds\n")
    shards = write_shards(lst, tmp_path / "shards", samples_per_shard=1).shards["text"]
    shards[1].unlink()
    with pytest.raises(InputDataError, match=r"1 shard\(s\) listed in shards.json are missing \(shard-000001.tar\)"):
        list_shards(tmp_path / "shards" / "text")
    code = main(["encode", str(tmp_path / "shards" / "text"), "-e", "open_clip:cmcr-tiny-clip@random", "-m", "text",
                 "-s", str(tmp_path / "store"), "-j", "0", "--no-progress"])
    assert code != 0 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_resharding_reports_bad_samples_and_empty_tars(tmp_path: Path) -> None:
    src = _tar(tmp_path / "in.tar", [*_text("a", "a dog"), ("a.txt", b"dup", "file"), *_text("b", "a cat")])
    empty = _tar(tmp_path / "empty.tar", [])
    rep = write_shards([src, empty], tmp_path / "out")
    reasons = [s.reason for s in rep.skipped]
    assert any("duplicate member a.txt" in r for r in reasons)
    assert any(r == "empty tar: no samples" for r in reasons)
    assert rep.counts["text"] == 1
