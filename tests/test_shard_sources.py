"""`cmcr shard` inputs beyond local files (issue 13): image+caption tars in img2dataset's layout
keep their captions (paired image and text shards), and shards are read from URLs (``pipe:``,
http on a local stand-in server, s3 documented) with every failing URL one recorded failure."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cmcr.cli import main
from cmcr.errors import RemoteReadError
from cmcr.pipeline.corpora import iter_tar_samples
from cmcr.pipeline.openers import expand_url, is_url, open_url
from cmcr.pipeline.shards import write_shards
from cmcr.stores.files import sha256_file
from tests.shardserver import StandInShardServer


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def img2dataset_tar(path: Path, captions: dict[str, str], start: int = 0) -> Path:
    """A tar as img2dataset writes it: ``KEY.jpg``, ``KEY.txt`` (the caption), ``KEY.json``."""
    with tarfile.open(path, "w") as tf:
        for i, (key, caption) in enumerate(captions.items()):
            meta = {"key": key, "caption": caption, "url": f"https://example.org/{key}.jpg", "status": "success",
                    "width": 8, "height": 8}
            for ext, data in (("jpg", _jpeg((10 * (i + start), 20, 30))), ("txt", caption.encode()),
                              ("json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


CAPTIONS = {"000000000": "a dog on a beach", "000000001": "two cats on a sofa", "000000002": "a red bus"}


def _samples(shards: list[Path]) -> list[dict]:
    return [s for p in shards for s in iter_tar_samples(p)]


# ----------------------------------------------------------------------------------- img2dataset captions
def test_img2dataset_captions_become_text_shards_paired_by_key(tmp_path: Path) -> None:
    src = img2dataset_tar(tmp_path / "00000.tar", CAPTIONS)
    rep = write_shards(src, tmp_path / "out", samples_per_shard=2)
    assert rep.counts == {"image": 3, "text": 3} and not rep.skipped and not rep.failed
    images, texts = _samples(rep.shards["image"]), _samples(rep.shards["text"])
    assert [s["__key__"] for s in images] == [s["__key__"] for s in texts] == list(CAPTIONS)
    assert [s["txt"].decode() for s in texts] == list(CAPTIONS.values())
    assert all("txt" not in s and s["jpg"][:2] == b"\xff\xd8" for s in images)
    for s in images + texts:
        meta = json.loads(s["json"])
        assert meta["caption"] == CAPTIONS[s["__key__"]] and meta["url"].endswith(f"{s['__key__']}.jpg")
        assert meta["modality"] == ("image" if "jpg" in s else "text")  # the writer's, not img2dataset's json
        assert meta["source"] == f"00000.tar:{s['__key__']}"


def test_caption_kept_in_image_metadata_when_json_lacks_it(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("k1.jpg", _jpeg((1, 2, 3))), ("k1.txt", b"a lighthouse at dusk")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    rep = write_shards(path, tmp_path / "out")
    (image,) = _samples(rep.shards["image"])
    assert json.loads(image["json"])["caption"] == "a lighthouse at dusk"


def test_blank_and_non_utf8_captions_are_reported_and_the_image_kept(tmp_path: Path) -> None:
    src = img2dataset_tar(tmp_path / "s.tar", {"a": "a dog", "b": "   ", "c": "x"})
    # replace c's caption by bytes that are not UTF-8
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(src, "w") as tf:
        for m, data in members:
            data = b"\xff\xfe\xfa" if m.name == "c.txt" else data
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    rep = write_shards(src, tmp_path / "out")
    assert rep.counts == {"image": 3, "text": 1}
    reasons = {s.source: s.reason for s in rep.skipped}
    assert "empty or whitespace-only caption b.txt" in reasons["s.tar:b"]
    assert "caption c.txt is not UTF-8" in reasons["s.tar:c"]


def test_encode_gives_paired_image_and_text_stores(tmp_path: Path) -> None:
    from cmcr.stores.store import Store

    img2dataset_tar(tmp_path / "00000.tar", CAPTIONS)
    assert main(["shard", str(tmp_path / "00000.tar"), "--out", str(tmp_path / "shards"), "-q"]) == 0
    for modality in ("image", "text"):
        assert main(["encode", str(tmp_path / "shards" / modality), "-e", "open_clip:cmcr-tiny-clip@random",
                     "-m", modality, "-s", str(tmp_path / modality), "-j", "0", "--no-progress", "-q"]) == 0
    image, text = Store.open(tmp_path / "image"), Store.open(tmp_path / "text")
    assert list(image.keys()) == list(text.keys()) == list(CAPTIONS)
    assert text.metadata().column("text").to_pylist() == list(CAPTIONS.values())


# ----------------------------------------------------------------------------------- URLs
def test_url_detection_and_brace_expansion() -> None:
    assert is_url("pipe:cat a.tar") and is_url("https://h/a.tar") and is_url("s3://b/a.tar")
    assert not is_url("shards/a.tar") and not is_url("C:/data/a.tar") and not is_url("/abs/a.tar")
    assert expand_url("https://h/s-{000..002}.tar") == [f"https://h/s-{i:03d}.tar" for i in range(3)]


def test_pipe_url_gives_the_same_shards_as_the_local_tar(tmp_path: Path) -> None:
    src = img2dataset_tar(tmp_path / "00000.tar", CAPTIONS)
    local = write_shards(src, tmp_path / "local")
    piped = write_shards(f"pipe:cat {src}", tmp_path / "piped")
    assert piped.counts == local.counts and not piped.failed
    for modality in ("image", "text"):
        assert ([json.loads(s["json"])["key"] for s in _samples(piped.shards[modality])]
                == list(CAPTIONS))
        assert [s["jpg" if modality == "image" else "txt"] for s in _samples(piped.shards[modality])] == \
            [s["jpg" if modality == "image" else "txt"] for s in _samples(local.shards[modality])]


def test_failing_pipe_is_a_recorded_failure_naming_the_command(tmp_path: Path) -> None:
    ok = img2dataset_tar(tmp_path / "ok.tar", CAPTIONS)
    rep = write_shards([ok, f"pipe:cat {tmp_path}/missing.tar"], tmp_path / "out")
    assert rep.counts == {"image": 3, "text": 3}
    (failed,) = rep.failed
    assert failed.source == f"pipe:cat {tmp_path}/missing.tar"
    assert "exited with status 1" in failed.reason and f"cat {tmp_path}/missing.tar | tar t" in failed.reason
    index = json.loads((tmp_path / "out" / "image" / "shards.json").read_text())
    assert index["failed_inputs"] == [{"input": failed.source, "error": failed.reason}]


@pytest.fixture
def shard_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    for i in range(2):
        img2dataset_tar(root / f"{i:05d}.tar", {f"{i:05d}{k:04d}": f"caption {i} {k}" for k in range(3)}, start=3 * i)
    img2dataset_tar(root / "cut.tar", {f"cut{k:04d}": f"caption {k}" for k in range(40)})
    server = StandInShardServer(root, truncate={"cut.tar"}).start()
    yield server
    server.stop()


def test_http_shards_with_a_brace_range(tmp_path: Path, shard_server: StandInShardServer) -> None:
    rep = write_shards(f"{shard_server.url}/{{00000..00001}}.tar", tmp_path / "out")
    assert rep.counts == {"image": 6, "text": 6} and not rep.failed
    assert shard_server.counts == {"00000.tar": 1, "00001.tar": 1}
    local = write_shards(sorted((tmp_path / "www").glob("0000*.tar")), tmp_path / "local")
    assert [s["txt"] for s in _samples(rep.shards["text"])] == [s["txt"] for s in _samples(local.shards["text"])]
    first = json.loads(_samples(rep.shards["image"])[0]["json"])
    assert first["source"] == f"{shard_server.url}/00000.tar:000000000"  # the URL, where the sample came from
    again = write_shards(f"{shard_server.url}/{{00000..00001}}.tar", tmp_path / "again")
    assert [sha256_file(p) for p in again.shards["image"]] == [sha256_file(p) for p in rep.shards["image"]]
    index = json.loads((tmp_path / "out" / "text" / "shards.json").read_text())
    assert index["inputs"] == [f"{shard_server.url}/0000{i}.tar" for i in range(2)]


def test_http_404_is_one_recorded_failure_and_the_cli_exits_1(tmp_path: Path, shard_server: StandInShardServer,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"{shard_server.url}/nope.tar"
    rep = write_shards([f"{shard_server.url}/00000.tar", missing], tmp_path / "out")
    assert rep.counts == {"image": 3, "text": 3}
    (failed,) = rep.failed
    assert failed.source == missing and "curl exited with status 22" in failed.reason and "404" in failed.reason
    code = main(["shard", f"{shard_server.url}/00000.tar", missing, "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 1 and missing in err.replace("\n", "") and "1 input(s) could not be read" in err
    assert (tmp_path / "cli" / "image" / "shards.json").is_file()  # the readable input was sharded


def test_truncated_and_refused_downloads_are_failures(tmp_path: Path, shard_server: StandInShardServer) -> None:
    cut = f"{shard_server.url}/cut.tar"
    with pytest.raises(RemoteReadError, match="cut.tar"):
        list(iter_tar_samples(cut))
    rep = write_shards([cut, f"{shard_server.url}/00001.tar"], tmp_path / "out")
    assert [f.source for f in rep.failed] == [cut] and rep.counts["image"] >= 3
    url = shard_server.url
    shard_server.stop()
    with pytest.raises(RemoteReadError, match=r"curl exited with status 7: could not connect"):
        list(iter_tar_samples(f"{url}/00000.tar"))


def test_s3_without_s3fs_names_the_package_and_the_pipe_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def missing(protocol: str):  # noqa: ANN202 - what fsspec raises when s3fs is not installed
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(RemoteReadError, match=r"s3://bucket/cc3m/00000.tar: reading s3:// needs s3fs \(pip install "
                                               r"s3fs\), or pass the shard as 'pipe:aws s3 cp s3://bucket/cc3m/"
                                               r"00000.tar -'"):
        open_url("s3://bucket/cc3m/00000.tar")


def test_unknown_scheme_is_a_clear_error(tmp_path: Path) -> None:
    rep_error = pytest.raises(RemoteReadError, match=r"no opener for nosuch://")
    with rep_error:
        open_url("nosuch://host/a.tar")


# ----------------------------------------------------------------------------------- encode from URLs
def test_encode_reads_url_shards_once_each_and_resumes(tmp_path: Path, shard_server: StandInShardServer,
                                                       tiny_clip) -> None:  # noqa: ANN001
    from cmcr.pipeline.encode import encode_shards
    from cmcr.stores.store import Store

    enc = tiny_clip
    write_shards(sorted((tmp_path / "www").glob("0000*.tar")), tmp_path / "www" / "resharded", samples_per_shard=2)
    urls = f"{shard_server.url}/resharded/text/shard-{{000000..000002}}.tar"
    rep = encode_shards(urls, enc, "text", tmp_path / "remote", batch_size=1, num_workers=2, progress=False)
    assert rep.rows == 6 and rep.failures == 0 and rep.shards_done == 3
    assert {k: v for k, v in shard_server.counts.items() if k.startswith("resharded")} == {
        f"resharded/text/shard-00000{i}.tar": 1 for i in range(3)}  # one download per shard with 2 workers
    local = encode_shards(tmp_path / "www" / "resharded" / "text", enc, "text", tmp_path / "local", batch_size=1,
                          num_workers=0, progress=False)
    assert local.rows == 6
    remote, here = Store.open(tmp_path / "remote"), Store.open(tmp_path / "local")
    assert list(remote.keys()) == list(here.keys())
    assert (remote.embeddings() == here.embeddings()).all()
    again = encode_shards(urls, enc, "text", tmp_path / "remote", num_workers=0, progress=False)
    assert again.shards_skipped == 3 and again.rows == 0  # a URL already encoded is skipped


def test_encode_records_a_failing_url_as_one_read_failure(tmp_path: Path, shard_server: StandInShardServer,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cmcr.stores.store import Store

    write_shards(tmp_path / "www" / "00000.tar", tmp_path / "www" / "sh")
    ok, missing = f"{shard_server.url}/sh/text/shard-000000.tar", f"{shard_server.url}/sh/text/shard-000009.tar"
    code = main(["encode", ok, missing, "-e", "open_clip:cmcr-tiny-clip@random", "-m", "text",
                 "-s", str(tmp_path / "store"), "-j", "0", "--no-progress", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 3 and report["shards_failed"] == 1
    (failure,) = Store.open(tmp_path / "store").failures().to_pylist()
    assert failure["stage"] == "read" and failure["source"] == missing
    assert "curl exited with status 22" in failure["error"] and missing in failure["error"]


def test_an_img2dataset_output_folder_is_read_whole(tmp_path: Path) -> None:
    folder = tmp_path / "cc3m"
    folder.mkdir()
    img2dataset_tar(folder / "00000.tar", dict(list(CAPTIONS.items())[:2]))
    img2dataset_tar(folder / "00001.tar", dict(list(CAPTIONS.items())[2:]))
    for stem in ("00000", "00001"):  # img2dataset's sidecars: not inputs, not reported
        (folder / f"{stem}.parquet").write_bytes(b"PAR1")
        (folder / f"{stem}_stats.json").write_text("{}")
    (folder / "notes.md").write_text("x")
    rep = write_shards(folder, tmp_path / "out")
    assert rep.counts == {"image": 3, "text": 3}
    assert [s.source for s in rep.skipped] == ["notes.md"]
    assert [s["__key__"] for s in _samples(rep.shards["text"])] == list(CAPTIONS)
