"""Audio decode + preprocess on generated messy files (pipeline/audio.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cmcr.pipeline.audio import (
    AudioPolicy,
    SampleError,
    fix_length,
    load_audio_bytes,
    preprocess_waveform,
    to_mono_float,
)
from tests.fixtures_encode import tone

POLICY = AudioPolicy(sample_rate=48000, clip_seconds=1.0)


def test_every_good_file_becomes_a_fixed_clip(messy_audio):
    expect = {  # name -> (duration_s, rate_in, channels, cropped, padded)
        "mono_48k.wav": (1.0, 48000, 1, False, False),
        "stereo_44k_pcm16.wav": (1.0, 44100, 2, False, False),
        "six_channel_16k.flac": (0.5, 16000, 6, False, True),
        "mono_22k.ogg": (2.0, 22050, 1, True, False),
        "long_13s_8k.wav": (13.0, 8000, 1, True, False),
        "silent.wav": (0.1, 48000, 1, False, True),
    }
    for name, (dur, sr, ch, cropped, padded) in expect.items():
        clip, info = load_audio_bytes(messy_audio[name].read_bytes(), POLICY, name)
        assert clip.shape == (48000,) and clip.dtype == np.float32, name
        assert np.isfinite(clip).all() and np.abs(clip).max() <= 1.0
        assert info.duration_s == pytest.approx(dur, abs=1e-3), name
        assert (info.sample_rate_in, info.channels, info.cropped, info.padded) == (sr, ch, cropped, padded), name
        assert info.silent == (name == "silent.wav")


@pytest.mark.parametrize("name", ["nan.wav", "inf.wav", "zero_length.wav", "zero_bytes.wav", "garbage.flac"])
def test_bad_files_are_refused_with_a_reason(messy_audio, name):
    with pytest.raises(SampleError) as e:
        load_audio_bytes(messy_audio[name].read_bytes(), POLICY, name)
    assert name in str(e.value)


def test_stereo_downmix_detects_the_channel_axis():
    left, right = tone(0.1, 48000, 200), tone(0.1, 48000, 300)
    tc = np.stack([left, right], axis=1)  # (T, C)
    ct = tc.T.copy()  # (C, T)
    a, ca = to_mono_float(tc)
    b, cb = to_mono_float(ct)
    assert ca == cb == 2
    np.testing.assert_allclose(a, (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(a, b)


def test_integer_pcm_is_scaled_to_unit_range():
    x16 = np.array([-32768, 0, 16384, 32767], np.int16)
    np.testing.assert_allclose(to_mono_float(x16)[0], [-1.0, 0.0, 0.5, 32767 / 32768])
    x32 = np.array([-(2**31), 2**30], np.int32)
    np.testing.assert_allclose(to_mono_float(x32)[0], [-1.0, 0.5])
    u8 = np.array([0, 128, 192], np.uint8)
    np.testing.assert_allclose(to_mono_float(u8)[0], [-1.0, 0.0, 0.5])


def test_resampling_keeps_the_tone_frequency():
    clip, _ = preprocess_waveform(tone(1.0, 16000, 1000.0), 16000, POLICY)
    spectrum = np.abs(np.fft.rfft(clip))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 Hz bins for 48000 samples at 48 kHz


def test_long_clip_policies_are_deterministic():
    x = np.arange(10, dtype=np.float32)
    p = AudioPolicy(sample_rate=4, clip_seconds=1.0)  # 4 samples
    assert fix_length(x, p)[0].tolist() == [3, 4, 5, 6]  # centre crop
    assert fix_length(x, AudioPolicy(sample_rate=4, clip_seconds=1.0, long_policy="head"))[0].tolist() == [0, 1, 2, 3]


def test_short_clip_padding_policies():
    x = np.array([1, 2, 3], np.float32)
    rep = fix_length(x, AudioPolicy(sample_rate=8, clip_seconds=1.0))[0]
    assert rep.tolist() == [1, 2, 3, 1, 2, 3, 0, 0]
    zp = fix_length(x, AudioPolicy(sample_rate=8, clip_seconds=1.0, short_policy="zeropad"))[0]
    assert zp.tolist() == [1, 2, 3, 0, 0, 0, 0, 0]


def test_policy_is_recorded_for_the_manifest():
    d = AudioPolicy().to_json()
    assert d["sample_rate"] == 48000 and d["clip_samples"] == 480000
    assert d["long_policy"] == "center" and d["short_policy"] == "repeatpad"
    with pytest.raises(ValueError):
        AudioPolicy(long_policy="random")
