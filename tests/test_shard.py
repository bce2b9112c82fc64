"""`cmcr shard` / write_shards: inputs of every kind, stable safe keys, same input -> same shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cmcr.cli import main
from cmcr.errors import InputDataError
from cmcr.pipeline.corpora import iter_tar_samples, safe_key
from cmcr.pipeline.shards import write_shards
from tests.fixtures_encode import tone, write_wav


def _corpus(root: Path) -> Path:
    from PIL import Image

    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    img.save(root / "dog" / "a.jpg")
    img.save(root / "dog" / "a.png")  # same stem, other extension
    img.save(root / "cat" / "my cat (1).jpg")  # unsafe characters
    write_wav(root / "dog" / "bark.wav", tone(0.1, 16000), 16000)
    (root / "cat" / "caption.txt").write_text("a cat on a mat\n")
    (root / "notes.md").write_text("not a sample")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"")
    return root


def _keys(shards: list[Path]) -> list[str]:
    return [s["__key__"] for p in shards for s in iter_tar_samples(p)]


def test_folder_modalities_keys_and_metadata(tmp_path):
    root = _corpus(tmp_path / "corpus")
    rep = write_shards(root, tmp_path / "out", samples_per_shard=2)
    assert rep.counts == {"image": 3, "audio": 1, "text": 1}
    assert [s.source for s in rep.skipped] == ["notes.md"]
    keys = _keys(rep.shards["image"])
    assert keys[:2] == ["cat/my_cat__1_-" + hashlib.sha1(b"cat/my cat (1)").hexdigest()[:8], "dog/a_jpg"]
    assert keys[2] == "dog/a_png"
    assert len(rep.shards["image"]) == 2  # 3 samples, 2 per shard
    sample = next(iter_tar_samples(rep.shards["audio"][0]))
    meta = json.loads(sample["json"])
    assert meta == {"key": "dog/bark", "modality": "audio", "source": "dog/bark.wav", "label": "dog"}
    assert sample["wav"] == (root / "dog" / "bark.wav").read_bytes()  # original bytes, never re-encoded
    index = json.loads((tmp_path / "out" / "image" / "shards.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 1]


def test_same_input_same_shards(tmp_path):
    root = _corpus(tmp_path / "corpus")
    a = write_shards(root, tmp_path / "a", samples_per_shard=2)
    b = write_shards(root, tmp_path / "b", samples_per_shard=2)
    for mod in a.shards:
        for pa_, pb in zip(a.shards[mod], b.shards[mod], strict=True):
            assert pa_.read_bytes() == pb.read_bytes()


def test_rerun_with_bigger_shards_removes_stale_ones(tmp_path):
    root = _corpus(tmp_path / "corpus")
    write_shards(root, tmp_path / "out", samples_per_shard=1)
    rep = write_shards(root, tmp_path / "out", samples_per_shard=10)
    assert sorted(p.name for p in (tmp_path / "out" / "image").glob("*.tar")) == ["shard-000000.tar"]
    assert len(rep.shards["image"]) == 1


def test_safe_key_properties():
    assert safe_key("dog/img_01") == "dog/img_01"
    assert safe_key("../x/./y") == "x/y"
    k1, k2 = safe_key("猫"), safe_key("犬")
    assert k1 != k2 and all(c.isascii() for c in k1 + k2)
    assert "." not in safe_key("a.b.c")


def test_caption_and_path_list(tmp_path):
    write_wav(tmp_path / "clip.flac", tone(0.1, 16000), 16000)
    lst = tmp_path / "inputs.txt"
    lst.write_text("a dog barking\n\nclip.flac\nmissing.wav\n  two   spaces  \n")
    rep = write_shards(lst, tmp_path / "out", samples_per_shard=10)
    assert rep.counts == {"audio": 1, "text": 2}
    assert [s.source for s in rep.skipped] == ["inputs.txt:4"]
    texts = [s["txt"].decode() for s in iter_tar_samples(rep.shards["text"][0])]
    assert texts == ["a dog barking", "two   spaces"]
    assert _keys(rep.shards["text"]) == ["inputs/0000001", "inputs/0000005"]


def test_csv_and_jsonl_tables(tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.1, 16000), 16000)
    csv = tmp_path / "caps.csv"
    csv.write_text("id,caption,label,extra\nx1,a dog,dog,7\nx2,,cat,8\nx1,dup,dog,9\n")
    rep = write_shards(csv, tmp_path / "out", key_column="id")
    assert rep.counts == {"text": 1}  # the empty caption is skipped with its row, the duplicate key too
    assert len(rep.duplicates) == 0
    assert [(s.source, s.reason[:13]) for s in rep.skipped] == [("caps.csv:2", "empty or whit"),
                                                                 ("caps.csv:3", "duplicate key")]
    first = next(iter_tar_samples(rep.shards["text"][0]))
    assert json.loads(first["json"]) == {"key": "x1", "modality": "text", "source": "caps.csv:1", "label": "dog",
                                         "extra": "7"}
    jl = tmp_path / "files.jsonl"
    jl.write_text(json.dumps({"path": "a.wav", "label": "tone"}) + "\n" + json.dumps({"path": "nope.wav"}) + "\n")
    rep = write_shards(jl, tmp_path / "out2")
    assert rep.counts == {"audio": 1} and _keys(rep.shards["audio"]) == ["a"]
    assert "file not found" in rep.skipped[0].reason
    with pytest.raises(InputDataError, match="no text column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("foo,bar\n1,2\n")
        write_shards(bad, tmp_path / "out3")


def test_reshard_existing_tars(tmp_path):
    root = _corpus(tmp_path / "corpus")
    first = write_shards(root, tmp_path / "small", samples_per_shard=1, modality="image")
    assert first.counts == {"image": 3}
    assert any("not the requested image" in s.reason for s in first.skipped)
    again = write_shards(first.shards["image"], tmp_path / "big", samples_per_shard=100)
    assert again.counts == {"image": 3}
    assert _keys(again.shards["image"]) == _keys(first.shards["image"])
    s = next(iter_tar_samples(again.shards["image"][0]))
    assert json.loads(s["json"])["label"] == "cat"


def test_cli_shard(tmp_path, capsys):
    root = _corpus(tmp_path / "corpus")
    assert main(["shard", str(root), "--out", str(tmp_path / "out"), "-n", "5"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 entries" in err and "notes.md" in err
    assert main(["shard", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert sorted(p.parent.name for p in (tmp_path / "out").glob("*/shard-000000.tar")) == ["audio", "image", "text"]


@pytest.mark.parametrize("kind", ["emptydir", "empty.csv", "header_only.csv", "blank.jsonl"])
def test_no_samples_is_an_error(tmp_path, kind, capsys):
    src = tmp_path / kind
    if kind == "emptydir":
        src.mkdir()
    else:
        src.write_text({"empty.csv": "", "header_only.csv": "caption\n", "blank.jsonl": "\n\n"}[kind])
    with pytest.raises(InputDataError, match="no samples found in"):
        write_shards(src, tmp_path / "out")
    assert main(["shard", str(src), "--out", str(tmp_path / "out")]) == 1
    assert "nosamplesfoundin" in "".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_csv_extra_fields_and_empty_captions_are_skipped_with_their_row(tmp_path):
    csv = tmp_path / "caps.csv"
    csv.write_text('caption,label\na dog,pet\na cat, with a hat,pet\n"  ",x\n"a, quoted",y\n,z\n')
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"text": "a bird"}\n{"text": " \\t"}\n{"other": 1}\n')
    rep = write_shards([csv, jsonl], tmp_path / "out")
    reasons = {s.source: s.reason for s in rep.skipped}
    assert reasons["caps.csv:2"].startswith("row 2 has 3 fields but the header has 2 (extra: ['pet'])")
    assert reasons["caps.csv:3"] == reasons["caps.csv:5"] == reasons["more.jsonl:2"] == \
        "empty or whitespace-only caption"
    assert reasons["more.jsonl:3"] == "no 'text' value"
    samples = list(iter_tar_samples(rep.shards["text"][0]))
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [
        ("caps/0000001", "a dog"), ("caps/0000004", "a, quoted"), ("more/0000001", "a bird")]


def test_resharding_other_content_into_the_same_folder_warns(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("a dog\na cat\n")
    assert write_shards(caps, tmp_path / "out").replaced == []
    assert write_shards(caps, tmp_path / "out").replaced == []  # same content: nothing to say
    caps.write_text("an airplane\na car\n")
    capsys.readouterr()
    assert main(["shard", str(caps), "--out", str(tmp_path / "out")]) == 0
    err = "".join(capsys.readouterr().err.split())
    assert "heldshardsofdifferentcontentbefore" in err and "--overwrite" in err


def test_cli_rejects_samples_per_shard_below_one(tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("a dog\n")
    assert main(["shard", str(tmp_path / "caps.txt"), "--out", str(tmp_path / "out"), "-n", "0"]) == 2
    assert "Invalid value" in capsys.readouterr().err
