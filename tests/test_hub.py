"""The online path, tested offline: every hub file a default spec needs comes through
``cmcr.pipeline.hub`` from a local stand-in of the Hugging Face hub (tests/hubserver.py).

* the demo with no weight flags runs on "downloaded" weights of the real architectures (ViT-B-32
  ``openai`` in open_clip's hub form, HTSAT-tiny + RoBERTa-base CLAP in laion_clap's checkpoint
  form, a 50265-token roberta-base vocabulary): no random fallback, each file fetched once, and a
  second run works with the hub stopped (cache, no flag);
* a missing or broken file, or a corrupt cached copy: one clear error naming repo, file and the
  offline fix — and no fallback;
* an unreachable hub: the only case that falls back to random weights, and it says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cmcr.errors import HubFileError, HubUnreachableError
from tests.hubserver import StandInHub, free_port, write_roberta_like_vocab

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"
CLAP_REPO = "lukewys/laion_clap"
ROBERTA_REPO = "FacebookAI/roberta-base"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def online(monkeypatch, tmp_path):
    """In-process: huggingface_hub online (the suite runs with HF_HUB_OFFLINE=1), an empty cache."""
    import huggingface_hub.constants as hc

    from cmcr.pipeline import hub

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CMCR_CLAP_TOKENIZER", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.forget_reachability()
    yield tmp_path
    hub.forget_reachability()


def _small_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "630k-audioset-best.pt").write_bytes(os.urandom(300_000))
    (d / "630k-fusion-best.pt").write_bytes(os.urandom(200_000))
    return {"630k-audioset-best.pt": d / "630k-audioset-best.pt", "630k-fusion-best.pt": d / "630k-fusion-best.pt"}


# ------------------------------------------------------------------- fast, in-process
def test_fetch_downloads_once_then_serves_from_the_cache_with_the_hub_stopped(online, monkeypatch):
    from cmcr.pipeline import hub

    files = _small_files(online / "files")
    vocab = write_roberta_like_vocab(online / "roberta")
    with StandInHub({CLAP_REPO: files, ROBERTA_REPO: {"vocab.json": vocab / "vocab.json"}},
                    redirects={"roberta-base": ROBERTA_REPO}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        first = hub.fetch(CLAP_REPO, "630k-fusion-best.pt", what="CLAP checkpoint")
        again = hub.fetch(CLAP_REPO, "630k-fusion-best.pt", what="CLAP checkpoint")
        tok = hub.fetch("roberta-base", "vocab.json", what="tokenizer", also_cached_as=(ROBERTA_REPO,))
        assert first.downloaded and not again.downloaded and again.path == first.path
        assert first.path.read_bytes() == files["630k-fusion-best.pt"].read_bytes()
        import hashlib

        assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()  # LFS file: verified
        assert tok.sha256 is None and tok.path.read_bytes() == (vocab / "vocab.json").read_bytes()
        gets = {k: v for k, v in srv.counts.items() if k[0] == "GET"}
        assert gets == {("GET", CLAP_REPO, "630k-fusion-best.pt"): 1, ("GET", ROBERTA_REPO, "vocab.json"): 1}
    # the hub is gone: the cache answers, with no network access
    hub.forget_reachability()
    assert hub.fetch(CLAP_REPO, "630k-fusion-best.pt", what="CLAP checkpoint").path == first.path
    with pytest.raises(HubUnreachableError, match="630k-audioset-best.pt"):
        hub.fetch(CLAP_REPO, "630k-audioset-best.pt", what="CLAP checkpoint")


def test_missing_file_on_a_reachable_hub_names_repo_file_and_offline_fix(online, monkeypatch):
    from cmcr.pipeline.encoders import load_encoder

    with StandInHub({CLAP_REPO: {}}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(HubFileError) as e:
            load_encoder("clap:HTSAT-tiny", device="cpu")
    msg = str(e.value)
    assert CLAP_REPO in msg and "630k-audioset-best.pt" in msg
    assert f"hf download {CLAP_REPO} 630k-audioset-best.pt" in msg
    assert "clap:HTSAT-tiny@/path/to/630k-audioset-best.pt" in msg


def test_unknown_repo_and_broken_download_are_file_errors(online, monkeypatch):
    from cmcr.pipeline import hub

    files = _small_files(online / "files")
    with StandInHub({CLAP_REPO: files}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(HubFileError, match="no repo 'someone/else'"):
            hub.fetch("someone/else", "630k-audioset-best.pt", what="CLAP checkpoint")
        # the hub announces one sha256 but serves other bytes: refused, not used
        bad = online / "bad.pt"
        bad.write_bytes(os.urandom(300_000))
        srv._cdn[srv._meta[(CLAP_REPO, "630k-audioset-best.pt")]["lfs"]] = (CLAP_REPO, "bad.pt")
        srv.repos[CLAP_REPO]["bad.pt"] = bad
        with pytest.raises(HubFileError, match="served a broken copy of lukewys/laion_clap/630k-audioset-best.pt"):
            hub.fetch(CLAP_REPO, "630k-audioset-best.pt", what="CLAP checkpoint")
        with pytest.raises(HubFileError, match="broken copy"):  # not kept in the cache: fetched (and checked) again
            hub.fetch(CLAP_REPO, "630k-audioset-best.pt", what="CLAP checkpoint")


def test_corrupt_cached_file_is_a_clear_error(online, monkeypatch):
    from cmcr.pipeline import hub

    files = _small_files(online / "files")
    with StandInHub({CLAP_REPO: files}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        got = hub.fetch(CLAP_REPO, "630k-audioset-best.pt", what="CLAP checkpoint")
    blob = got.path.resolve()
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(HubFileError) as e:
        hub.fetch(CLAP_REPO, "630k-audioset-best.pt", what="CLAP checkpoint")
    msg = str(e.value)
    assert "corrupt" in msg and str(blob) in msg and "--force-download" in msg and CLAP_REPO in msg


def test_unreachable_hub_is_the_only_random_fallback_and_says_so(online, monkeypatch):
    from rich.console import Console

    from cmcr.demo import DemoOptions, load_demo_encoders

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # connection refused
    console = Console(record=True, width=200)
    clip, clap, notes, random_weights = load_demo_encoders(
        DemoOptions(fast=True, clap="clap:cmcr-tiny-clap", device="cpu"), console)
    assert random_weights and clap.identity()["weights"] == "random"
    assert any("unreachable" in n and "clap:cmcr-tiny-clap@random" in n for n in notes)
    assert "RANDOM WEIGHTS" in console.export_text()


def test_demo_does_not_fall_back_on_a_missing_hub_file_or_a_bad_local_checkpoint(online, monkeypatch, tmp_path):
    from rich.console import Console

    from cmcr.demo import DemoOptions, load_demo_encoders
    from cmcr.errors import EncoderError

    with StandInHub({CLAP_REPO: {}}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(HubFileError, match="630k-audioset-best.pt"):
            load_demo_encoders(DemoOptions(fast=True, clap="clap:cmcr-tiny-clap", device="cpu"), Console())
    with pytest.raises(EncoderError, match="does not exist"):
        load_demo_encoders(DemoOptions(fast=True, clip=f"open_clip:cmcr-tiny-clip@{tmp_path}/none.pt",
                                       device="cpu"), Console())


def test_open_clip_tag_names_the_repo_and_files_open_clip_uses(online, monkeypatch):
    from cmcr.pipeline.encoders import load_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as e:
        load_encoder("open_clip:ViT-B-32", device="cpu")
    msg = str(e.value)
    assert CLIP_REPO in msg and "open_clip_model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert "open_clip:ViT-B-32-quickgelu@/path/open_clip_model.safetensors" in msg


def test_encoders_get_their_files_through_the_hub_audio_needs_no_tokenizer(online, monkeypatch, tiny_clap):
    """Fast stand-in of the real-architecture test below: the tiny CLAP checkpoint served as the real
    file name, a tiny vocabulary as roberta-base; an open_clip tag registered for the tiny CLIP."""
    import torch
    from open_clip.pretrained import _PRETRAINED, _pcfg
    from safetensors.torch import save_file

    from cmcr.pipeline import hub
    from cmcr.pipeline.clap_encoder import save_test_checkpoint, write_byte_level_tokenizer
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.pipeline.openclip_encoder import _open_clip

    open_clip = _open_clip()  # with cmcr's tiny configs registered
    from tests.fixtures_encode import tone, write_wav

    d = online / "files"
    d.mkdir()
    save_test_checkpoint(tiny_clap, d / "630k-audioset-best.pt")
    tok = write_byte_level_tokenizer(d / "tok")
    torch.manual_seed(3)
    clip_model = open_clip.create_model("cmcr-tiny-clip", pretrained=None, force_quick_gelu=True)
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, d / "open_clip_model.safetensors")
    monkeypatch.setitem(_PRETRAINED, "cmcr-tiny-clip", {"test": _pcfg(hf_hub="cmcr-test/tiny-clip/", quick_gelu=True)})
    repos = {CLAP_REPO: {"630k-audioset-best.pt": d / "630k-audioset-best.pt"},
             ROBERTA_REPO: {"vocab.json": tok / "vocab.json", "merges.txt": tok / "merges.txt"},
             "cmcr-test/tiny-clip": {"open_clip_model.safetensors": d / "open_clip_model.safetensors"}}
    wav = write_wav(online / "a.wav", tone(1.0, 48000), 48000)
    with StandInHub(repos, redirects={"roberta-base": ROBERTA_REPO}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        clap = load_encoder("clap:cmcr-tiny-clap", device="cpu")  # default weights: 630k-audioset-best
        audio = clap.encode("audio", [wav])
        assert not any(k[1] == ROBERTA_REPO for k in srv.counts), "audio-only use fetched the tokenizer"
        text = clap.encode("text", ["a dog barking"])
        clip = load_encoder("open_clip:cmcr-tiny-clip@test", device="cpu")
        img = clip.encode("text", ["a dog"])
        gets = {k[1:]: v for k, v in srv.counts.items() if k[0] == "GET"}
    assert gets == {(CLAP_REPO, "630k-audioset-best.pt"): 1, (ROBERTA_REPO, "vocab.json"): 1,
                    (ROBERTA_REPO, "merges.txt"): 1, ("cmcr-test/tiny-clip", "open_clip_model.safetensors"): 1}
    np.testing.assert_allclose(audio, tiny_clap.encode("audio", [wav]), atol=1e-5)  # the served weights
    assert clip.model.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"  # the tag's setting
    assert clip.identity() == {"family": "open_clip", "architecture": "cmcr-tiny-clip", "weights": "test", "dim": 64}
    # the hub is gone: same encoders, same vectors, from the cache
    hub.forget_reachability()
    clap2 = load_encoder("clap:cmcr-tiny-clap", device="cpu")
    assert clap2.identity() == clap.identity()
    np.testing.assert_array_equal(clap2.encode("text", ["a dog barking"]), text)
    np.testing.assert_array_equal(load_encoder("open_clip:cmcr-tiny-clip@test", device="cpu").encode(
        "text", ["a dog"]), img)


# ------------------------------------------------ the demo on real architectures, via the stand-in hub
@pytest.fixture(scope="module")
def real_hub_files(tmp_path_factory):
    """Random weights of the real architectures, in the real repos' file forms (~1.3 GB, built once)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from cmcr.pipeline.clap_encoder import ClapEncoder
    from cmcr.pipeline.encoders import parse_spec

    root = tmp_path_factory.mktemp("standin-hub")
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "clip" / "open_clip_model.safetensors")
    (root / "clip" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config("ViT-B-32-quickgelu"), "preprocess_cfg": {}}))
    del clip
    clap = ClapEncoder(parse_spec("clap:HTSAT-tiny@random"), device="cpu")
    sd = dict(clap.model.state_dict())
    sd["text_branch.embeddings.position_ids"] = torch.arange(514)[None]  # official checkpoints carry it
    (root / "clap").mkdir()
    # laion_clap's training script form: {"epoch", "state_dict" (DDP "module." prefix), ...}
    torch.save({"epoch": 45, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               root / "clap" / "630k-audioset-best.pt")
    del clap, sd
    vocab = write_roberta_like_vocab(root / "roberta")
    return {
        CLIP_REPO: {"open_clip_model.safetensors": root / "clip" / "open_clip_model.safetensors",
                    "open_clip_config.json": root / "clip" / "open_clip_config.json"},
        CLAP_REPO: {"630k-audioset-best.pt": root / "clap" / "630k-audioset-best.pt"},
        ROBERTA_REPO: {"vocab.json": vocab / "vocab.json", "merges.txt": vocab / "merges.txt"},
    }


def _run_demo(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cmcr.cli", "demo", "--out", str(out), "--captions", "16", "--epochs", "1",
           "--no-synthetic", "--num-workers", "0", "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


@pytest.mark.slow  # ~1.3 GB of weights and two demo runs of the full-size models: minutes on 2 cores
def test_demo_runs_on_downloaded_real_weights_then_offline_from_the_cache(real_hub_files, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CMCR_CLAP_TOKENIZER", "CMCR_CLIP_ENCODER",
                        "CMCR_CLAP_ENCODER", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="200")
    hub = StandInHub(real_hub_files, redirects={"roberta-base": ROBERTA_REPO})
    env["HF_ENDPOINT"] = hub.start()
    try:
        t = time.perf_counter()
        first = _run_demo(tmp_path / "run1", env)
        first_s = time.perf_counter() - t
    finally:
        hub.stop()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "run1" / "demo.json").read_text())
    assert result["random_weights"] is False and result["weight_notes"] == []
    assert "RANDOM" not in first.stdout
    clip_id, clap_id = (json.loads(result["encoders"][k]) for k in ("clip", "clap"))
    assert clip_id == {"family": "open_clip", "architecture": "ViT-B-32", "weights": "openai", "dim": 512}
    import hashlib

    clap_sha = hashlib.sha256(real_hub_files[CLAP_REPO]["630k-audioset-best.pt"].read_bytes()).hexdigest()
    assert clap_id["weights"] == f"sha256:{clap_sha}" and clap_id["dim"] == 512
    text_pp = json.loads((tmp_path / "run1" / "stores" / "clap_text" / "manifest.json").read_text())["preprocessing"]
    assert text_pp["vocab"].startswith("roberta vocab 50265 sha256:")
    # each file the default specs need was downloaded exactly once (the config file was not needed)
    gets = {k[1:]: v for k, v in hub.counts.items() if k[0] == "GET"}
    assert gets == {(CLIP_REPO, "open_clip_model.safetensors"): 1, (CLAP_REPO, "630k-audioset-best.pt"): 1,
                    (ROBERTA_REPO, "vocab.json"): 1, (ROBERTA_REPO, "merges.txt"): 1}
    # second run: the hub is down, no flag: everything comes from the cache, same encoders
    t = time.perf_counter()
    second = _run_demo(tmp_path / "run2", env)
    second_s = time.perf_counter() - t
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((tmp_path / "run2" / "demo.json").read_text())
    assert again["random_weights"] is False and again["encoders"] == result["encoders"]
    print(f"demo via stand-in hub: first run {first_s:.1f} s, offline rerun {second_s:.1f} s")
