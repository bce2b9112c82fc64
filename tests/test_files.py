"""The file primitives and the output-folder writer lock (cmcr.stores.files), issue 13 defects 1 and 10a."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cmcr.cli import main
from cmcr.errors import ConfigError, OutputLockedError
from cmcr.stores.files import (
    OUTPUT_LOCK,
    atomic_write_json,
    canonical_json,
    output_lock,
    resolve_device,
    sha256_file,
)

HOLDER = """
import sys
from cmcr.stores.files import output_lock
with output_lock(sys.argv[1], "cmcr connect (the first run)", beside=sys.argv[2] == "1"):
    print("locked", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another process holding the writer lock of ``folder`` until closed."""

    def __init__(self, folder: Path, beside: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "1" if beside else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_primitives_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert not list(tmp_path.glob(".tmp-*"))
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert sha256_file(p) == __import__("hashlib").sha256(p.read_bytes()).hexdigest()


def test_store_module_reexports_the_same_primitives() -> None:
    from cmcr.stores import files, store

    assert store.atomic_write_bytes is files.atomic_write_bytes
    assert store.canonical_json is files.canonical_json
    assert store.sha256_file is files.sha256_file


def test_second_process_is_refused_with_holder_pid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Holder(out) as h:
        with pytest.raises(OutputLockedError, match=rf"pid {h.proc.pid}.*cmcr connect \(the first run\)"):
            with output_lock(out):
                pass
    # released (and its file removed) when the holder ends: the next writer gets it
    with output_lock(out):
        assert (out / OUTPUT_LOCK).exists()
    assert not (out / OUTPUT_LOCK).exists()


def test_lock_is_reentrant_in_one_process_and_released_after_kill(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with output_lock(out), output_lock(out):
        pass
    h = Holder(out)
    h.proc.kill()  # kill -9: the kernel drops the flock; the stale file does not block the next run
    h.proc.wait(timeout=30)
    with output_lock(out):
        pass


def test_failed_run_leaves_no_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), output_lock(tmp_path / "new"):
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_two_connect_runs_into_one_out_second_is_refused(tiny_synthetic: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_synthetic
    out = tmp_path / "conn"
    args = ["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
            str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(out), "--epochs", "1"]
    with Holder(out) as h:
        assert main(args) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"pid {h.proc.pid}" in err and "another cmcr process" in err
        assert not (out / "connector.json").exists()


def test_every_writer_takes_the_lock(tiny_synthetic: dict[str, Path], tmp_path: Path) -> None:
    """Shard, connect, project, import, index, synthetic and demo all refuse a locked output."""
    from cmcr.demo import DemoOptions, run_demo
    from cmcr.pipeline.shards import write_shards
    from cmcr.stores.importing import import_embeddings
    from cmcr.stores.index import build_index
    from cmcr.trainer.evaluate import project_store
    from cmcr.trainer.loop import train_connector
    from cmcr.trainer.synthetic import run_synthetic_check

    out = tmp_path / "busy"
    calls = {
        "shard": lambda: write_shards([str(tmp_path)], out),
        "connect": lambda: train_connector(*(tiny_synthetic[k] for k in ("text_a", "text_b", "image_a", "audio_b")),
                                           out, None),
        "project": lambda: project_store(tmp_path, tiny_synthetic["text_a"], out),
        "index": lambda: build_index(out),
        "synthetic": lambda: run_synthetic_check(out),
        "demo": lambda: run_demo(DemoOptions(out=out)),
    }
    with Holder(out):
        for name, call in calls.items():
            with pytest.raises(OutputLockedError):
                call()
            print(name, "refused")
    with Holder(out, beside=True):
        with pytest.raises(OutputLockedError):
            import_embeddings([tmp_path / "x.npy"], out, modality="text", encoder={"family": "x"})


def test_resolve_device_is_one_helper_with_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cmcr.pipeline import encoders
    from cmcr.stores import memory

    assert encoders.resolve_device is resolve_device and memory.resolve_device is resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")


def test_connect_device_cuda_without_cuda_is_a_clear_error(tiny_synthetic: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = tiny_synthetic
    code = main(["connect", "--shared-a", str(p["text_a"]), "--shared-b", str(p["text_b"]), "--memory-a",
                 str(p["image_a"]), "--memory-b", str(p["audio_b"]), "--out", str(tmp_path / "c"), "--epochs", "1",
                 "--device", "cuda"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_an_output_path_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    """A file where an output folder belongs (or in its path) is a usage error naming it, not a traceback."""
    f = tmp_path / "notes.txt"
    f.write_text("x")
    for folder in (f, f / "sub"):
        with pytest.raises(ConfigError, match="notes.txt"):
            with output_lock(folder):
                pass
    assert f.read_text() == "x"  # untouched
    from PIL import Image

    from cmcr.pipeline.shards import write_shards

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    shards = write_shards(tmp_path / "imgs", tmp_path / "shards").shards["image"]
    code = main(["encode", str(shards[0]), "-e", "open_clip:cmcr-tiny-clip@random", "-m", "image", "-s", str(f),
                 "-j", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err and "Traceback" not in err


def test_localize_size_is_bounded_before_anything_loads(capsys) -> None:
    """--size 100000 once exhausted a 24 GiB machine: it is refused as a usage error up front."""
    assert main(["localize", "-c", "nowhere", "--audio", "a.wav", "--image", "i.jpg", "--out", "o",
                 "--size", "100000"]) == 2
    assert "--size" in capsys.readouterr().err
