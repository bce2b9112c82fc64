"""Fusion CLAP (``clap:HTSAT-tiny-fusion``): the torchaudio-free front end (pipeline/clap_fusion.py)
against independent computations, deterministic encoding, checkpoint/spec checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cmcr.errors import EncoderError
from cmcr.pipeline.clap_fusion import (
    FusionFrontEnd,
    crop_starts,
    fusion_input,
    log_mel,
    mel_filterbank,
    quantize_int16,
)
from cmcr.pipeline.encoders import load_encoder
from tests.fixtures_encode import write_tiny_bpe_tokenizer

TINY_FUSION = "clap:cmcr-tiny-clap-fusion@random"
FE = FusionFrontEnd()


def clip(seconds: float, seed: int = 0, sr: int = 48000) -> np.ndarray:
    """A chirp + noise clip whose content changes over time (so crops and shrink differ)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def wav_bytes(x: np.ndarray, sr: int = 48000) -> bytes:
    import soundfile as sf

    b = io.BytesIO()
    sf.write(b, x, sr, format="WAV", subtype="FLOAT")
    return b.getvalue()


def librosa_log_mel(x: np.ndarray) -> np.ndarray:
    """The same definition computed independently (librosa, float64): laion_clap's own comment in
    get_mel names these librosa settings as the equivalent of its torchaudio call."""
    import librosa

    s = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=48000, n_fft=1024, hop_length=480, win_length=1024,
                                       window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=64,
                                       fmin=50, fmax=14000, htk=True, norm=None)
    return (10.0 * np.log10(np.maximum(s, 1e-10))).T


# -- front end vs independent computations -----------------------------------------------------

def test_filterbank_and_log_mel_match_librosa():
    import librosa

    fb = librosa.filters.mel(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, htk=True, norm=None)
    np.testing.assert_allclose(mel_filterbank(FE), fb.T, atol=1e-6)
    for x in (clip(3.0), quantize_int16(clip(12.3, seed=1)), np.zeros(48000, np.float32)):
        ours = log_mel(x, FE, block_frames=257)  # blocks do not change the values
        ref = librosa_log_mel(x)
        assert ours.shape == ref.shape == (1 + len(x) // 480, 64) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=2e-3)  # dB; float32 vs float64 STFT
    assert log_mel(np.zeros(48000, np.float32), FE).max() == pytest.approx(-100.0)  # 1e-10 floor, no top_db


def test_crop_rule_is_the_middle_of_each_third():
    assert crop_starts(2501, 1001) == (250, 751, 1251)  # 25 s: starts 0..1500 in thirds of 501/500/500
    assert crop_starts(1002, 1001) == (0, 1, 0)  # one third empty -> 0, as laion_clap
    with pytest.raises(ValueError):
        crop_starts(1001, 1001)


@pytest.fixture(scope="module")
def laion_data():
    """laion_clap.training.data (imported offline by cmcr's importer) and HTSAT-tiny's audio_cfg."""
    from cmcr.pipeline.clap_encoder import import_laion_clap

    import_laion_clap()
    import clap_module.factory as cf
    import laion_clap.training.data as data

    return data, cf._MODEL_CONFIGS["HTSAT-tiny"]["audio_cfg"]


@pytest.mark.parametrize("samples", [2 * 48000, 480000, 480000 + 100, 25 * 48000, 480000 + 480 * 7 + 3])
def test_fusion_input_equals_laion_clap_get_audio_features(laion_data, monkeypatch, samples):
    """laion_clap's own get_audio_features (fusion, repeatpad; torchvision Resize for the shrink) with
    only its torchaudio mel swapped for librosa and its random crop choice fixed to our rule."""
    data, audio_cfg = laion_data
    monkeypatch.setattr(data, "get_mel", lambda a, cfg: torch.from_numpy(librosa_log_mel(a.numpy()).astype(np.float32)))
    monkeypatch.setattr(data.np.random, "choice", lambda r: r[len(r) // 2])
    x = quantize_int16(clip(samples / 48000, seed=samples))
    ref = data.get_audio_features({}, torch.from_numpy(x), 480000, data_truncating="fusion",
                                  data_filling="repeatpad", audio_cfg=audio_cfg)
    ours, longer = fusion_input(x, FusionFrontEnd.from_audio_cfg(audio_cfg))
    assert ours.shape == tuple(ref["mel_fusion"].shape) == (4, 1001, 64)
    assert longer == bool(ref["longer"].item()) == (samples >= 480000 + 480)
    np.testing.assert_allclose(ours, ref["mel_fusion"].numpy(), atol=5e-3)


def test_int16_round_trip_is_laion_clap_s(laion_data):
    data, _ = laion_data
    x = clip(1.0) * 4  # beyond [-1, 1]: clipped
    np.testing.assert_array_equal(quantize_int16(x), data.int16_to_float32(data.float32_to_int16(x)))


# -- the fusion model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fusion():
    return load_encoder(TINY_FUSION, device="cpu")


def test_fusion_encoder_identity_and_preprocessing(tiny_fusion):
    ident = tiny_fusion.identity()
    assert ident["fusion"] is True and ident["fusion_type"] == "aff_2d" and ident["dim"] == 64
    assert ident["architecture"] == "cmcr-tiny-clap-fusion"
    pp = tiny_fusion.preprocessing("audio")
    assert pp["fusion"]["n_fft"] == 1024 and pp["fusion"]["hop"] == 480 and pp["fusion"]["mel_bins"] == 64
    assert pp["fusion"]["f_min"] == 50 and pp["fusion"]["f_max"] == 14000 and pp["fusion"]["mel_scale"] == "htk"
    assert pp["fusion"]["crops"] == "middle start of each third" and pp["short_policy"] == "repeatpad"
    assert "long_policy" not in pp  # nothing is cropped from the waveform


def test_fusion_encodes_2_10_25_s_clips_deterministically(tiny_fusion):
    pre = tiny_fusion.preprocessor("audio")
    raws = [wav_bytes(clip(s, seed=i)) for i, s in enumerate((2.0, 10.0, 25.0))]
    items = [pre(r) for r in raws]
    assert [bool(it["longer"]) for it, _ in items] == [False, False, True]
    assert [info["padded"] for _, info in items] == [True, False, False]
    first = tiny_fusion.embed("audio", tiny_fusion.collate("audio", [it for it, _ in items]))
    again = tiny_fusion.embed("audio", tiny_fusion.collate("audio", [pre(r)[0] for r in raws]))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (3, 64) and np.isfinite(first).all()
    assert np.abs(first[2] - first[1]).max() > 1e-3  # different clips, different rows
    for i, r in enumerate(raws):  # a row does not depend on the rest of its batch
        np.testing.assert_allclose(tiny_fusion.embed("audio", tiny_fusion.collate("audio", [pre(r)[0]]))[0],
                                   first[i], atol=1e-5)


def test_fusion_store_reencode_is_identical(tiny_fusion, tmp_path):
    from cmcr.pipeline.encode import encode_shards
    from cmcr.pipeline.shards import write_shards
    from cmcr.stores.store import Store

    media = tmp_path / "media"
    media.mkdir()
    for i, s in enumerate((2.0, 10.0, 25.0)):
        (media / f"c{i}.wav").write_bytes(wav_bytes(clip(s, seed=10 + i)))
    rep = write_shards([media], tmp_path / "shards", samples_per_shard=2)
    for name in ("a", "b"):
        encode_shards(rep.shards["audio"], tiny_fusion, "audio", tmp_path / name, batch_size=2, num_workers=0,
                      progress=False, dtype="float32")
    a, b = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    assert a.keys() == b.keys() and a.num_rows == 3
    np.testing.assert_array_equal(a.embeddings(), b.embeddings())
    assert a.encoder["fusion"] is True and a.preprocessing["fusion"]["chunk_frames"] == 1001
    assert a.metadata(["cropped"]).column("cropped").to_pylist() == [False, False, True]


def test_fusion_and_non_fusion_checkpoints_need_the_matching_spec(tiny_fusion, tiny_clap, tmp_path):
    from cmcr.pipeline.clap_encoder import save_test_checkpoint

    tok = str(write_tiny_bpe_tokenizer(tmp_path / "tok"))
    fus = save_test_checkpoint(tiny_fusion, tmp_path / "fusion.pt")
    plain = save_test_checkpoint(tiny_clap, tmp_path / "plain.pt")
    with pytest.raises(EncoderError, match=rf"is a fusion CLAP checkpoint.*use clap:cmcr-tiny-clap-fusion@{fus}"):
        load_encoder(f"clap:cmcr-tiny-clap@{fus}", device="cpu", clap_tokenizer=tok)
    with pytest.raises(EncoderError, match=rf"is a non-fusion CLAP checkpoint.*use clap:cmcr-tiny-clap@{plain}"):
        load_encoder(f"clap:cmcr-tiny-clap-fusion@{plain}", device="cpu", clap_tokenizer=tok)
    loaded = load_encoder(f"clap:cmcr-tiny-clap-fusion@{fus}", device="cpu", clap_tokenizer=tok)
    assert loaded.identity()["weights"].startswith("sha256:") and loaded.identity()["fusion"] is True
    raws = [wav_bytes(clip(25.0, seed=3)), wav_bytes(clip(4.0, seed=4))]
    pre = loaded.preprocessor("audio")
    batch = loaded.collate("audio", [pre(r)[0] for r in raws])
    np.testing.assert_allclose(loaded.embed("audio", batch), tiny_fusion.embed("audio", batch), atol=1e-5)


@pytest.mark.slow
def test_real_fusion_architecture_random_init(tmp_path):
    """HTSAT-tiny + fusion (aff_2d) at full size: the parameter names of the released fusion
    checkpoints, and deterministic embeddings for 2, 10 and 25 s clips."""
    enc = load_encoder("clap:HTSAT-tiny-fusion@random", device="cpu")
    keys = set(enc.model.state_dict())
    for k in ("audio_branch.patch_embed.mel_conv2d.weight", "audio_branch.patch_embed.fusion_model.local_att.0.weight",
              "audio_branch.patch_embed.fusion_model.global_att.1.weight"):
        assert k in keys
    assert enc.dim == 512 and enc.identity()["architecture"] == "HTSAT-tiny-fusion"
    pre = enc.preprocessor("audio")
    raws = [wav_bytes(clip(s, seed=i)) for i, s in enumerate((2.0, 10.0, 25.0))]
    a = enc.embed("audio", enc.collate("audio", [pre(r)[0] for r in raws]))
    b = enc.embed("audio", enc.collate("audio", [pre(r)[0] for r in raws]))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 512) and np.isfinite(a).all()


def test_fusion_under_bf16_autocast(tiny_fusion):
    """laion_clap's fusion patch embedding breaks under autocast (dtype mismatch in an index put);
    cmcr runs that layer in float32."""
    half = load_encoder(TINY_FUSION, device="cpu", precision="bf16")
    pre = tiny_fusion.preprocessor("audio")
    batch = tiny_fusion.collate("audio", [pre(wav_bytes(clip(s, seed=20 + i)))[0] for i, s in enumerate((3.0, 25.0))])
    cos = (tiny_fusion.embed("audio", batch) * half.embed("audio", batch)).sum(axis=1)
    assert (cos > 0.999).all(), cos
