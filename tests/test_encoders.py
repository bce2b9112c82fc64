"""Encoder adapters: spec parsing, identities, checkpoints, tokenizer checks, lazy laion_clap import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cmcr.errors import EncoderError
from cmcr.pipeline.encoders import load_encoder, parse_spec
from tests.fixtures_encode import TINY_CLAP, tone, write_tiny_bpe_tokenizer, write_wav


def test_parse_spec():
    s = parse_spec("open_clip:ViT-B-32")
    assert (s.family, s.architecture, s.weights) == ("open_clip", "ViT-B-32", None)
    assert parse_spec("open_clip:ViT-B-32@laion2b_s34b_b79k").weights == "laion2b_s34b_b79k"
    assert parse_spec("open_clip:ViT-B-32@/x/ckpt.pt").checkpoint.as_posix() == "/x/ckpt.pt"
    r = parse_spec("clap:HTSAT-tiny@random:7")
    assert (r.family, r.is_random, r.seed, r.checkpoint) == ("clap", True, 7, None)
    assert parse_spec("open_clip:ViT-B-32@laion2b_s34b_b79k").checkpoint is None
    for bad in ("ViT-B-32", "foo:bar", "open_clip:ViT-B-32@random:x"):
        with pytest.raises(EncoderError):
            parse_spec(bad)


def test_open_clip_identity_is_shared_by_modalities(tiny_clip):
    ident = tiny_clip.identity()
    assert ident == {"family": "open_clip", "architecture": "cmcr-tiny-clip", "weights": "random", "dim": 64,
                     "seed": 0}
    assert tiny_clip.preprocessing("image")["size"] == [32, 32]
    assert tiny_clip.preprocessing("text")["context_length"] == 32
    with pytest.raises(EncoderError, match="audio"):
        tiny_clip.preprocessing("audio")


def test_open_clip_checkpoint_file_round_trip(tmp_path):
    from cmcr.pipeline.openclip_encoder import save_random_checkpoint

    ckpt = tmp_path / "tiny.pt"
    save_random_checkpoint("cmcr-tiny-clip", str(ckpt), seed=3)
    a = load_encoder(f"open_clip:cmcr-tiny-clip@{ckpt}", device="cpu")
    b = load_encoder("open_clip:cmcr-tiny-clip@random:3", device="cpu")
    assert a.identity()["weights"].startswith("sha256:") and len(a.identity()["weights"]) == 7 + 64
    np.testing.assert_allclose(a.encode("text", ["a dog"]), b.encode("text", ["a dog"]), atol=1e-6)
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(f"open_clip:cmcr-tiny-clip@{tmp_path / 'missing.pt'}", device="cpu")
    with pytest.raises(EncoderError, match="unknown open_clip architecture"):
        load_encoder("open_clip:No-Such-Net@random", device="cpu")


def test_laion_clap_is_not_imported_for_open_clip():
    code = (
        "import sys\n"
        "from cmcr.cli import app\n"
        "from cmcr.pipeline.encode import encode_shards\n"
        "from cmcr.pipeline.shards import write_shards\n"
        "import cmcr.pipeline.clap_encoder, cmcr.pipeline.openclip_encoder\n"
        "from cmcr.pipeline.encoders import parse_spec\n"
        f"parse_spec('{TINY_CLAP}')\n"
        "assert 'laion_clap' not in sys.modules and 'clap_module' not in sys.modules, 'laion_clap imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_clap_identity_and_audio_policy(tiny_clap):
    ident = tiny_clap.identity()
    assert ident["family"] == "clap" and ident["fusion"] is False and ident["dim"] == 64
    assert "tokenizer" not in ident and ident["weights"] == "random"  # the vocabulary is text preprocessing
    assert tiny_clap.preprocessing("text")["vocab"] == "byte-level-fallback"
    pp = tiny_clap.preprocessing("audio")
    assert (pp["sample_rate"], pp["clip_seconds"], pp["long_policy"], pp["short_policy"]) == (
        48000, 10.0, "center", "repeatpad")
    assert tiny_clap.preprocessing("text")["context_length"] == 77


def test_clap_long_clips_are_cropped_deterministically(tiny_clap, tmp_path):
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(15 * 48000)).astype(np.float32)
    long = write_wav(tmp_path / "long.wav", x, 48000, "FLOAT")
    mid = write_wav(tmp_path / "mid.wav", x[int(2.5 * 48000): int(12.5 * 48000)], 48000, "FLOAT")
    a = tiny_clap.encode("audio", [long, long])
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_allclose(a[0], tiny_clap.encode("audio", [mid])[0], atol=1e-5)  # the centre 10 s


def test_clap_text_and_batch_of_one(tiny_clap):
    one = tiny_clap.encode("text", ["a dog barking"])
    assert one.shape == (1, 64) and abs(np.linalg.norm(one) - 1) < 1e-5
    _, info = tiny_clap.preprocessor("text")("word " * 100)
    assert info["truncated"] is True


def test_clap_checkpoint_round_trip_and_tokenizer_checks(tiny_clap, tmp_path):
    from cmcr.pipeline.clap_encoder import save_test_checkpoint

    ckpt = save_test_checkpoint(tiny_clap, tmp_path / "tiny-clap.pt")
    wav = write_wav(tmp_path / "a.wav", tone(1.0, 44100), 44100)
    # audio-only use needs no tokenizer files; text with real weights never uses the fallback
    audio_only = load_encoder(f"clap:cmcr-tiny-clap@{ckpt}", device="cpu")
    np.testing.assert_allclose(audio_only.encode("audio", [wav]), tiny_clap.encode("audio", [wav]), atol=1e-5)
    with pytest.raises(EncoderError, match="clap-tokenizer"):
        audio_only.encode("text", ["a cat"])
    tok = write_tiny_bpe_tokenizer(tmp_path / "tok")
    loaded = load_encoder(f"clap:cmcr-tiny-clap@{ckpt}", device="cpu", clap_tokenizer=str(tok))
    assert loaded.identity() == audio_only.identity() and loaded.identity()["weights"].startswith("sha256:")
    assert loaded.preprocessing("text")["vocab"].startswith("roberta")
    np.testing.assert_allclose(loaded.encode("audio", [wav]), tiny_clap.encode("audio", [wav]), atol=1e-5)
    np.testing.assert_allclose(loaded.encode("text", ["a cat"]), tiny_clap.encode("text", ["a cat"]), atol=1e-5)


def test_clap_real_weights_need_real_tokenizer_files(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from cmcr.pipeline.clap_encoder import resolve_tokenizer

    monkeypatch.delenv("CMCR_CLAP_TOKENIZER", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(EncoderError, match="vocab.json"):  # offline here: not cached, no fallback
        resolve_tokenizer(None, allow_fallback=False)
    small = write_tiny_bpe_tokenizer(tmp_path / "tok")
    with pytest.raises(EncoderError, match="only 261 tokens"):
        resolve_tokenizer(str(small), allow_fallback=False)
    monkeypatch.setenv("CMCR_CLAP_TOKENIZER", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="lacks"):
        resolve_tokenizer(None, allow_fallback=False)


def test_unknown_clap_architecture_is_refused():  # fusion models: tests/test_clap_fusion.py
    with pytest.raises(EncoderError, match="unknown CLAP architecture.*HTSAT-tiny-fusion"):
        load_encoder("clap:PANN-14@random", device="cpu")
    with pytest.raises(EncoderError, match="unknown CLAP architecture"):
        load_encoder("clap:PANN-14-fusion@random", device="cpu")


def test_tiny_clap_spec_constant():
    assert parse_spec(TINY_CLAP).architecture == "cmcr-tiny-clap"
