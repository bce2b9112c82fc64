"""The encode loop: messy inputs end to end, resume after a kill, determinism, identity checks, CLI."""

from __future__ import annotations

import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import cmcr.pipeline.encode as encode_mod
from cmcr.cli import main
from cmcr.errors import StoreMismatchError
from cmcr.pipeline.encode import (
    AutoThreads,
    KeyClashError,
    Prepared,
    encode_shards,
    shard_identity,
    threads_for_decode_share,
)
from cmcr.pipeline.encoders import load_encoder
from cmcr.pipeline.shards import write_shards
from cmcr.stores.store import Store
from tests.fixtures_encode import TINY_CLIP


def _image_shards(messy_images, tmp_path, n=4):
    return write_shards(messy_images["rgb.jpg"].parent, tmp_path / "shards", samples_per_shard=n).shards["image"]


def test_messy_images_never_kill_a_shard(tiny_clip, messy_images, tmp_path):
    shards = _image_shards(messy_images, tmp_path)
    rep = encode_shards(shards, tiny_clip, "image", tmp_path / "store", batch_size=3, num_workers=2, progress=False)
    assert rep.rows == 9 and rep.failures == 4 and rep.shards_done == len(shards)
    # where the time went, per stage (worker CPU seconds come back with the batches)
    st = rep.stages
    assert set(st) == {"read", "decode", "preprocess", "collate", "forward", "write", "wait"}
    assert st["decode"] > 0 and st["preprocess"] > 0 and st["collate"] > 0 and st["forward"] > 0
    assert st["read"] > 0 and st["write"] > 0
    assert st["decode"] + st["preprocess"] == pytest.approx(rep.decode_s)
    assert rep.to_json()["stages"] == st
    store = Store.open(tmp_path / "store", modality="image", encoder=tiny_clip.identity(), validate="full")
    fails = store.failures().to_pylist()
    assert sorted(f["key"] for f in fails) == ["not_an_image", "truncated_jpg", "truncated_png", "zero"]
    assert all(f["stage"] == "decode" and f["source"].endswith(".tar") and f["error"] for f in fails)
    meta = store.metadata(["source", "width", "height", "label"]).to_pylist()
    assert {m["width"] for m in meta} == {60} and {m["source"] for m in meta} >= {"rgba.png", "cmyk.jpg"}
    assert store.manifest["preprocessing"]["background"] == [255, 255, 255]


def test_text_failures_truncation_and_batch_of_one(tiny_clip, tmp_path):
    lst = tmp_path / "caps.csv"
    lst.write_text("caption\na dog\n   \n" + "a very long caption " * 30 + "\n,\nbirds singing\n")
    sharded = write_shards(lst, tmp_path / "shards")
    shards = sharded.shards["text"]
    # an empty caption and a row with an extra field are skipped when sharding (with their row)
    assert [(s.source, s.reason[:32]) for s in sharded.skipped] == [
        ("caps.csv:2", "empty or whitespace-only caption"), ("caps.csv:4", "row 4 has 2 fields but the heade")]
    rep = encode_shards(shards, tiny_clip, "text", tmp_path / "store", batch_size=1, num_workers=0, progress=False)
    store = Store.open(tmp_path / "store")
    assert rep.rows == 3 and rep.failures == 0
    rows = store.metadata(["text", "truncated"]).to_pylist()
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert rows[0]["text"] == "a dog"
    assert store.keys() == ["caps/0000001", "caps/0000003", "caps/0000005"]  # keys keep the row numbers
    # the same text through encode() (query path) gives the stored row
    q = tiny_clip.encode("text", ["a dog"])
    np.testing.assert_allclose(store.embeddings(np.float32)[0], q[0], atol=2e-3)


def test_identical_stores_for_any_worker_count(tiny_clip, messy_images, tmp_path):
    shards = _image_shards(messy_images, tmp_path, n=5)
    a = encode_shards(shards, tiny_clip, "image", tmp_path / "a", batch_size=2, num_workers=0, progress=False)
    b = encode_shards(shards, tiny_clip, "image", tmp_path / "b", batch_size=2, num_workers=2, progress=False)
    assert a.rows == b.rows == 9
    sa, sb = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    assert sa.keys() == sb.keys()
    assert a.torch_threads == b.torch_threads == 1  # never above the caller's setting (conftest: 1)
    np.testing.assert_array_equal(sa.embeddings(), sb.embeddings())
    assert sa.metadata().equals(sb.metadata())
    # failure records are the same text in any process (no PIL object addresses in the messages)
    fa, fb = sa.failures().drop_columns(["time"]), sb.failures().drop_columns(["time"])
    assert fa.num_rows == 4 and fa.sort_by("key").equals(fb.sort_by("key"))
    assert not any("0x" in e for e in fa.column("error").to_pylist())


def test_resume_after_kill_matches_a_clean_run(tiny_clip, messy_images, tmp_path, monkeypatch):
    shards = _image_shards(messy_images, tmp_path, n=3)  # 5 shards
    assert len(shards) == 5
    clean = encode_shards(shards, tiny_clip, "image", tmp_path / "clean", batch_size=2, num_workers=2,
                          progress=False)
    real_write = encode_mod.write_part
    calls = {"n": 0}

    def dying_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the third part is being written
        return real_write(*args, **kwargs)

    monkeypatch.setattr(encode_mod, "write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        encode_shards(shards, tiny_clip, "image", tmp_path / "resumed", batch_size=2, num_workers=2, progress=False)
    monkeypatch.setattr(encode_mod, "write_part", real_write)
    assert len(Store.open(tmp_path / "resumed").parts) == 2
    rerun = encode_shards(shards, tiny_clip, "image", tmp_path / "resumed", batch_size=2, num_workers=2,
                          progress=False)
    assert rerun.shards_skipped == 2 and rerun.shards_done == 3
    sc, sr = Store.open(tmp_path / "clean"), Store.open(tmp_path / "resumed", validate="full")
    assert sc.keys() == sr.keys() and sr.num_rows == clean.rows
    np.testing.assert_array_equal(sc.embeddings(), sr.embeddings())
    assert sorted(sc.failures().column("key").to_pylist()) == sorted(sr.failures().column("key").to_pylist())
    again = encode_shards(shards, tiny_clip, "image", tmp_path / "resumed", progress=False)
    assert again.shards_skipped == 5 and again.rows == 0


def test_other_identity_is_refused_unless_overwrite(tiny_clip, messy_images, tmp_path):
    shards = _image_shards(messy_images, tmp_path, n=20)
    encode_shards(shards, tiny_clip, "image", tmp_path / "store", num_workers=0, progress=False)
    other = load_encoder("open_clip:cmcr-tiny-clip@random:1", device="cpu")
    assert other.identity() != tiny_clip.identity()
    with pytest.raises(StoreMismatchError, match="overwrite"):
        encode_shards(shards, other, "image", tmp_path / "store", num_workers=0, progress=False)
    rep = encode_shards(shards, other, "image", tmp_path / "store", num_workers=0, progress=False, overwrite=True)
    assert rep.rows == 9 and Store.open(tmp_path / "store").encoder == other.identity()


def test_corrupt_shard_is_reported_and_retried(tiny_clip, messy_images, tmp_path):
    shards = _image_shards(messy_images, tmp_path, n=7)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated tar
    with pytest.raises(tarfile.TarError):
        list(tarfile.open(shards[0]))
    rep = encode_shards(shards, tiny_clip, "image", tmp_path / "store", num_workers=2, progress=False)
    assert rep.shards_failed == 1 and rep.shards_done == 1
    store = Store.open(tmp_path / "store")
    assert len(store.parts) == 1
    assert "read" in store.failures().column("stage").to_pylist()


def test_cli_end_to_end_on_real_samples(sample_data, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    for label in ("dog", "cat"):
        shutil.copytree(sample_data / "images" / label, imgs / label)
    caps = sample_data / "text" / "coco_captions_included_images.csv"
    assert main(["shard", str(imgs), str(caps), "--out", str(tmp_path / "shards"), "-n", "4"]) == 0
    for mod in ("image", "text"):
        argv = ["encode", str(tmp_path / "shards" / mod), "--encoder", TINY_CLIP, "-m", mod,
                "--store", str(tmp_path / mod), "-b", "3", "-j", "1", "--no-progress"]
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rows written" in out and "model forward" in out
    si, st = Store.open(tmp_path / "image", validate="full"), Store.open(tmp_path / "text", validate="full")
    assert si.num_rows == 8 and si.failures().num_rows == 0
    assert st.num_rows == 70
    assert si.encoder == st.encoder  # one model identity for both modalities
    assert si.preprocessing != st.preprocessing
    assert set(si.metadata(["label"]).column("label").to_pylist()) == {"dog", "cat"}
    x = si.embeddings(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)
    # a rerun skips everything
    assert main(["encode", str(tmp_path / "shards" / "image"), "-e", TINY_CLIP, "-m", "image",
                 "--store", str(tmp_path / "image"), "--no-progress"]) == 0
    assert Store.open(tmp_path / "image").num_rows == 8
    assert main(["encode", str(tmp_path / "nothing"), "-e", TINY_CLIP, "-m", "image",
                 "--store", str(tmp_path / "x"), "--no-progress"]) == 1


def test_messy_audio_end_to_end_with_clap(tiny_clap, messy_audio, sample_data, tmp_path):
    for f in sorted((sample_data / "audio" / "dog").glob("*.ogg"))[:2]:  # two real clips too
        shutil.copy(f, messy_audio["mono_48k.wav"].parent / f.name)
    shards = write_shards(messy_audio["mono_48k.wav"].parent, tmp_path / "shards", 5).shards["audio"]
    rep = encode_shards(shards, tiny_clap, "audio", tmp_path / "store", batch_size=4, num_workers=2, progress=False)
    store = Store.open(tmp_path / "store", modality="audio", encoder=tiny_clap.identity(), validate="full")
    bad = {"nan", "inf", "zero_length", "zero_bytes", "garbage"}
    assert rep.rows == 8 and sorted(store.failures().column("key").to_pylist()) == sorted(bad)
    rows = {r["key"]: r for r in store.metadata(["duration_s", "silent", "channels", "cropped"]).to_pylist()}
    assert rows["silent"]["silent"] is True and rows["mono_48k"]["silent"] is False
    assert rows["six_channel_16k"]["channels"] == 6 and rows["long_13s_8k"]["cropped"] is True
    assert rows["long_13s_8k"]["duration_s"] == pytest.approx(13.0)
    assert store.preprocessing["sample_rate"] == 48000 and store.preprocessing["clip_seconds"] == 10.0
    again = encode_shards(shards, tiny_clap, "audio", tmp_path / "again", batch_size=4, num_workers=0,
                          progress=False)
    assert again.rows == 8
    np.testing.assert_array_equal(store.embeddings(), Store.open(tmp_path / "again").embeddings())


def test_moved_shard_folder_resumes_and_same_names_elsewhere_do_not_match(tiny_clip, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"caption number {i}\n" for i in range(6)))
    shards = write_shards(caps, tmp_path / "a", 2).shards["text"]  # 3 shards
    first = encode_shards(shards, tiny_clip, "text", tmp_path / "store", batch_size=4, num_workers=0, progress=False)
    assert first.shards_done == 3
    store = Store.open(tmp_path / "store")
    assert store.done_sources() == {shard_identity(p) for p in shards}
    assert all(s.startswith("shard-") and "#" in s for s in store.done_sources())
    # moved (another mount, another machine): every shard is recognised, nothing is re-encoded
    shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    again = encode_shards(tmp_path / "moved" / "text", tiny_clip, "text", tmp_path / "store", num_workers=0,
                          progress=False)
    assert (again.shards_skipped, again.shards_done, again.rows, again.failures) == (3, 0, 0, 0)
    # another folder with the same file names: all its shards are encoded into the same store
    other_caps = tmp_path / "other.txt"
    other_caps.write_text("".join(f"another caption {i}\n" for i in range(6)))
    other = write_shards(other_caps, tmp_path / "b", 2).shards["text"]
    assert [p.name for p in other] == [p.name for p in shards]  # same file names, other content
    rep = encode_shards(other, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    assert (rep.shards_skipped, rep.shards_done, rep.rows) == (0, 3, 6)
    assert Store.open(tmp_path / "store", validate="full").num_rows == 12
    # a shard rewritten after its shards.json index: the file is hashed, the stale digest is not used
    moved0 = tmp_path / "moved" / "text" / "shard-000000.tar"
    moved0.write_bytes(other[1].read_bytes())
    assert shard_identity(moved0) == "shard-000000.tar#" + shard_identity(other[1]).split("#")[1]
    assert shard_identity(moved0) not in Store.open(tmp_path / "store").done_sources()


def test_auto_threads_start_with_the_cpus_torch_may_use(monkeypatch):
    import torch

    monkeypatch.setattr(encode_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # torch's default on an 8-core box, the process pinned to 4 CPUs
        assert AutoThreads().threads == 4 and AutoThreads().cpus == 4
        torch.set_num_threads(2)  # a lower setting made by the caller is kept
        assert AutoThreads().threads == 2
    finally:
        torch.set_num_threads(before)


def test_threads_for_decode_share_gives_the_forward_the_cores_decoding_leaves():
    # 2 cores: both threads while decoding costs at most a third of the forward pass (share <= 25 %)
    assert threads_for_decode_share(2, 2, 0.0, 10.0) == 2
    assert threads_for_decode_share(2, 2, 1.5, 13.6) == 2  # ViT-B-32 on 640x480 JPEGs (~10 %)
    assert threads_for_decode_share(2, 2, 1.0, 3.0) == 2  # share 25 %: 1.5 cores, halves round up
    assert threads_for_decode_share(2, 2, 1.0, 2.0) == 1  # share 33 %
    assert threads_for_decode_share(2, 2, 9.0, 1.0) == 1  # decode-bound: still at least one
    # more cores: the cores the decode does not need, never above the cap (torch's setting)
    assert threads_for_decode_share(8, 8, 1.0, 1.0) == 4
    assert threads_for_decode_share(8, 8, 1.0, 7.0) == 7
    assert threads_for_decode_share(8, 4, 0.1, 10.0) == 4
    assert threads_for_decode_share(2, 1, 0.0, 10.0) == 1
    assert threads_for_decode_share(4, 8, 0.0, 1.0) == 4  # a cap above the CPUs: the CPUs
    # nothing measured yet: the most allowed
    assert threads_for_decode_share(2, 2, 0.0, 0.0) == 2
    # other processes' load takes cores first (a busy core on a 2-core box: one thread)
    assert threads_for_decode_share(2, 2, 0.1, 10.0, others=0.3) == 2
    assert threads_for_decode_share(2, 2, 0.1, 10.0, others=0.6) == 1
    assert threads_for_decode_share(2, 2, 0.1, 10.0, others=1.0) == 1
    assert threads_for_decode_share(2, 2, 0.0, 0.0, others=7.0) == 1
    assert threads_for_decode_share(8, 8, 0.0, 1.0, others=4.0) == 4
    assert threads_for_decode_share(8, 8, 1.0, 1.0, others=2.0) == 3


def _batch_from(worker, cpu_s, samples, n=4):
    return Prepared(keys=[str(i) for i in range(n)], items=[0] * n, worker=worker, worker_cpu_s=cpu_s,
                    worker_samples=samples)


def test_auto_threads_follow_the_measured_decode_load():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        auto = AutoThreads(cap=2, cpus=2)
        auto._clock0 = (0.0, 100.0, 10.0)  # (wall, machine busy, own CPU seconds): an idle machine
        auto._clock = lambda: (2.0, 101.0, 11.0)
        assert auto.others() == 0.0
        assert auto.threads == 2 and auto.decode_share is None  # start: all it may use
        # cheap decode (0.025 s per sample against a forward pass of 25 core-s per sample): both cores
        assert auto.observe(_batch_from(0, 0.1, 4), forward_s=50.0) == 2
        assert torch.get_num_threads() == 2
        # the first forward pass (one-off set-up costs) is dropped once a second one is in
        assert auto.observe(_batch_from(1, 0.2, 4), forward_s=4.0) == 2
        assert auto.decode_share == pytest.approx(0.3 / 8 / (0.3 / 8 + 4.0 * 2 / 4))
        # decoding turns expensive (e.g. larger images): the workers get a core back
        assert auto.observe(_batch_from(0, 40.0, 8), forward_s=1.0) == 1
        assert torch.get_num_threads() == 1
        assert auto.history == [(0, 2), (3, 1)]
        # a batch whose samples all failed has no forward pass to measure
        assert auto.observe(Prepared(worker=1, worker_cpu_s=0.3, worker_samples=6), forward_s=0.0) == 1
        assert auto.history == [(0, 2), (3, 1)]
        # another process holds a core (3 s busy, 1 s of it ours, in 2 s): one thread even for cheap decode
        auto = AutoThreads(cap=2, cpus=2)
        auto._clock0, auto._clock = (0.0, 100.0, 10.0), lambda: (2.0, 103.0, 11.0)
        assert auto.others() == pytest.approx(1.0)
        assert auto.observe(_batch_from(0, 0.1, 4), forward_s=50.0) == 1
        assert auto.history == [(0, 2), (1, 1)] and auto.last_others == pytest.approx(1.0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_own_cpu_seconds_count_live_child_processes():
    import subprocess
    import sys
    import threading

    started, done = [], threading.Event()

    def spawn():  # a child of another thread than the main one (a DataLoader run in a server thread)
        started.append(subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass\nprint('busy', flush=True)\n"
             "time.sleep(60)"], stdout=subprocess.PIPE, text=True))
        done.wait(60)

    t = threading.Thread(target=spawn)
    t.start()
    while not started:
        time.sleep(0.01)
    child = started[0]
    try:
        assert child.stdout.readline().strip() == "busy"  # the child has burnt 0.5 s of CPU and now sleeps
        own = encode_mod._own_cpu_seconds()
        assert own is not None and own >= time.process_time() + 0.45
        assert encode_mod._busy_cpu_seconds({0}) > 0
    finally:
        done.set()
        t.join()
        child.kill()
        child.wait()


def test_encode_sizes_threads_from_worker_load_unless_set(tiny_clip, messy_images, tmp_path, monkeypatch):
    import torch

    shards = _image_shards(messy_images, tmp_path)
    monkeypatch.setattr(encode_mod, "usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    seen = []
    real = AutoThreads.observe

    def spy(self, prepared, forward_s):
        seen.append((prepared.worker, prepared.worker_samples, prepared.worker_cpu_s))
        return real(self, prepared, forward_s)

    monkeypatch.setattr(AutoThreads, "observe", spy)
    try:
        torch.set_num_threads(2)
        rep = encode_shards(shards, tiny_clip, "image", tmp_path / "a", batch_size=2, num_workers=2, progress=False)
        assert rep.thread_changes[0] == [0, 2]  # all it may use until the first batch is measured
        assert rep.torch_threads == rep.thread_changes[-1][1] and 1 <= rep.torch_threads <= 2
        assert rep.decode_share is not None and 0 < rep.decode_share < 1
        assert rep.other_load is not None and rep.other_load >= 0  # Linux: /proc tells
        assert {w for w, _, _ in seen} == {0, 1}  # every batch says which worker made it, and its load
        assert all(n > 0 and cpu > 0 for _, n, cpu in seen)
        assert torch.get_num_threads() == 2  # restored
        # an explicit setting is used as is; without workers torch's setting (no measuring)
        fixed = encode_shards(shards, tiny_clip, "image", tmp_path / "b", batch_size=2, num_workers=2,
                              progress=False, torch_threads=2)
        assert (fixed.torch_threads, fixed.thread_changes, fixed.decode_share, fixed.other_load) == (2, [], None, None)
        inline = encode_shards(shards, tiny_clip, "image", tmp_path / "c", batch_size=2, num_workers=0,
                               progress=False)
        assert (inline.torch_threads, inline.thread_changes) == (2, [])
        assert inline.to_json()["decode_share"] is None
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(Store.open(tmp_path / "a").embeddings(np.float32),
                               Store.open(tmp_path / "c").embeddings(np.float32), atol=2e-3)


def _encode_argv(shards, store, modality="text", *extra):
    return ["encode", str(shards), "-e", TINY_CLIP, "-m", modality, "-s", str(store), "-j", "0", "--no-progress",
            *extra]


def test_resharded_changed_content_is_refused_before_encoding(tiny_clip, tmp_path, capsys):
    csv = tmp_path / "stale.csv"
    csv.write_text("caption\na dog\na cat\n")
    assert main(["shard", str(csv), "--out", str(tmp_path / "sh")]) == 0
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st")) == 0
    old_digest = shard_identity(tmp_path / "sh" / "text" / "shard-000000.tar").split("#")[1]
    before = Store.open(tmp_path / "st").embeddings()
    csv.write_text("caption\nan airplane\na car\na truck\n")
    assert main(["shard", str(csv), "--out", str(tmp_path / "sh")]) == 0
    new_digest = shard_identity(tmp_path / "sh" / "text" / "shard-000000.tar").split("#")[1]
    capsys.readouterr()
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st")) == 1
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines anywhere
    assert "shard-000000.tarchangedsinceitwasencoded" in err
    assert old_digest in err and new_digest in err and "--overwrite" in err and "newstore" in err
    store = Store.open(tmp_path / "st", validate="full")  # untouched
    assert store.num_rows == 2 and len(store.parts) == 1
    np.testing.assert_array_equal(store.embeddings(), before)
    # --overwrite starts the store over (same encoder identity; the library's overwrite=True is the same):
    # the new captions under their keys
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st", "text", "--overwrite")) == 0
    store = Store.open(tmp_path / "st", validate="full")
    assert store.metadata(["text"]).column("text").to_pylist() == ["an airplane", "a car", "a truck"]
    np.testing.assert_allclose(store.embeddings(np.float32)[0], tiny_clip.encode("text", ["an airplane"])[0],
                               atol=2e-3)


def test_keys_already_in_the_store_from_another_shard_stop_the_run(tiny_clip, tmp_path):
    for name, caps in (("a", "a dog\na cat\n"), ("b", "a car\na bus\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "caps.txt").write_text(caps)  # same list name -> same keys caps/0000001, ...
        write_shards(tmp_path / name / "caps.txt", tmp_path / f"sh-{name}", 1)
    clash = tmp_path / "sh-a" / "text" / "other-000000.tar"  # another file name: not a changed shard
    shutil.copy(tmp_path / "sh-b" / "text" / "shard-000001.tar", clash)
    with pytest.raises(KeyClashError) as e:
        encode_shards(tmp_path / "sh-a" / "text", tiny_clip, "text", tmp_path / "st", num_workers=0, progress=False)
    msg = str(e.value)  # other-000000 (b's caps/0000002) sorts first; a's shard-000001 then clashes
    assert "'caps/0000002'" in msg and "shard-000001.tar" in msg and str(tmp_path / "st") in msg
    store = Store.open(tmp_path / "st", validate="full")  # parts before the clash are kept, nothing dropped
    assert store.keys() == ["caps/0000002", "caps/0000001"]
    assert store.metadata(["text"]).column("text").to_pylist() == ["a bus", "a dog"]
    assert store.failures().num_rows == 0


def test_wrong_modality_for_the_shards_is_refused(tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("a dog\na cat\n")
    write_shards(tmp_path / "caps.txt", tmp_path / "sh")
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st", "image")) == 1
    err = "".join(capsys.readouterr().err.split())
    assert "holdtextsamples" in err and "-mtext" in err
    assert not (tmp_path / "st").exists()  # no empty store left behind
    # without shards.json: every sample fails -> non-zero exit with a summary that says so
    (tmp_path / "sh" / "text" / "shards.json").unlink()
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st", "image")) == 1
    err = "".join(capsys.readouterr().err.split())
    assert "everysamplefailed:2failure(s),norowwritten" in err


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["-b", "-5"], ["-j", "-3"], ["--threads", "0"]])
def test_cli_rejects_bad_loop_settings(tmp_path, bad, capsys):
    (tmp_path / "caps.txt").write_text("a dog\n")
    write_shards(tmp_path / "caps.txt", tmp_path / "sh")
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st", "text", *bad)) == 2
    assert "Invalid value" in capsys.readouterr().err and not (tmp_path / "st").exists()


def test_library_rejects_bad_loop_settings(tiny_clip, tmp_path):
    from cmcr.errors import ConfigError

    with pytest.raises(ConfigError, match="batch size"):
        encode_shards(tmp_path, tiny_clip, "text", tmp_path / "st", batch_size=0)


def test_ctrl_c_says_what_the_store_holds(tmp_path, monkeypatch, capsys):
    (tmp_path / "caps.txt").write_text("".join(f"caption {i}\n" for i in range(3)))
    write_shards(tmp_path / "caps.txt", tmp_path / "sh", 1)  # 3 shards
    real_write = encode_mod.write_part
    calls = {"n": 0}

    def interrupted_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(encode_mod, "write_part", interrupted_write)
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st")) == 130
    err = "".join(capsys.readouterr().err.split())
    assert "interrupted—thestoreholds2completeparts;rerunthesamecommandtoresume" in err
    monkeypatch.setattr(encode_mod, "write_part", real_write)
    assert main(_encode_argv(tmp_path / "sh" / "text", tmp_path / "st")) == 0
    assert Store.open(tmp_path / "st", validate="full").num_rows == 3


def test_open_clip_root_logger_messages_go_to_debug(caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        load_encoder(TINY_CLIP, device="cpu")
    assert not [r for r in caplog.records if r.name == "root" and r.levelno >= logging.WARNING]
    assert any(r.levelno == logging.DEBUG and "No pretrained weights" in r.getMessage() for r in caplog.records)


def test_fail_fast_stops_at_the_first_failed_shard_and_a_rerun_resumes(tiny_clip, messy_images, tmp_path, capsys):
    """The failure policy is a handler (issue 13): record-and-continue by default, ``--fail-fast`` stops
    after the first shard with a failure -- its failures recorded, its good rows written, nothing lost."""
    from cmcr.errors import InputDataError
    from cmcr.pipeline.encode import fail_fast

    shards = _image_shards(messy_images, tmp_path)
    with pytest.raises(InputDataError, match=r"failed at stage (decode|read).*--fail-fast.*rerun") as e:
        encode_shards(shards, tiny_clip, "image", tmp_path / "store", num_workers=0, progress=False,
                      handler=fail_fast)
    assert any(p.name in str(e.value) for p in shards)  # names the shard holding the failed sample
    stopped = Store.open(tmp_path / "store")
    assert 1 <= len(stopped.parts) < len(shards)  # stopped early, the failing shard's part written
    assert stopped.failures().num_rows >= 1
    rerun = encode_shards(shards, tiny_clip, "image", tmp_path / "store", num_workers=0, progress=False)
    assert rerun.shards_skipped == len(stopped.parts)
    full = encode_shards(shards, tiny_clip, "image", tmp_path / "clean", num_workers=0, progress=False)
    s, c = Store.open(tmp_path / "store", validate="full"), Store.open(tmp_path / "clean")
    assert s.keys() == c.keys() and s.num_rows == full.rows == 9
    assert sorted(s.failures().column("key").to_pylist()) == sorted(c.failures().column("key").to_pylist())
    # the CLI flag: exit 1 with the one-paragraph message
    argv = ["encode", str(shards[0].parent), "--encoder", TINY_CLIP, "-m", "image", "--store", str(tmp_path / "cli"),
            "-j", "0", "--no-progress", "--fail-fast"]
    assert main(argv) == 1
    assert "--fail-fast" in capsys.readouterr().err
