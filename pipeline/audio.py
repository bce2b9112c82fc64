"""Audio decoding and preprocessing (CPU side, runs in DataLoader workers).

One documented path from file bytes to the fixed-length mono clip an audio encoder sees:

1. decode with soundfile (WAV, FLAC, OGG/Vorbis, MP3 as bundled by libsndfile) as float32 in
   [-1, 1] (soundfile scales integer PCM by its full-scale value); raw integer arrays handed to
   :func:`to_mono_float` are scaled the same way (int16 / 32768, int32 / 2**31, uint8 offset 128);
2. down-mix to mono by averaging channels; the channel axis of a 2-D array is the smaller one
   (``(T, C)`` as soundfile returns it, or ``(C, T)``);
3. refuse zero-length clips, clips shorter than :data:`MIN_CLIP_SECONDS`, 2-D arrays whose layout
   is ambiguous (the long axis is not at least :data:`MIN_SAMPLES_PER_CHANNEL` times the short one,
   e.g. ``(3, 4)``) and clips with NaN/Inf samples (:class:`SampleError`);
3b. range: float samples must lie in [-1, 1]. Peaks up to :data:`MAX_FLOAT_PEAK` (mild overs of
   float masters) are clipped as before; a float clip whose samples are all whole numbers within
   int16 range (unscaled int16 PCM written as float) is rescaled by 1/32768 and flagged
   ``rescaled_int16`` (a note in the row's ``meta_json``, logged); any other clip beyond
   :data:`MAX_FLOAT_PEAK` (e.g. 1e29) is a failure — clipping it would feed the model a square wave;
4. resample to the encoder's rate with soxr (``HQ`` quality; deterministic);
5. fixed length: clips longer than ``clip_seconds`` are cropped by a deterministic policy
   (``center`` by default, or ``head``); shorter ones are padded (``repeatpad``: repeated
   whole as often as it fits, then zero-padded — laion_clap's own policy — or ``zeropad``).
   No random crop, ever.
6. silent clips (peak below ``silence_threshold``) are flagged, not refused.

The policy is an :class:`AudioPolicy`; its :meth:`AudioPolicy.to_json` goes into the store manifest,
and per row the original duration, sample rate, channel count and silent/cropped flags go into
the metadata columns.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cmcr.errors import InputDataError
from cmcr.pipeline.stageclock import timed_decode

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "mp3")
#: Clips shorter than this (in seconds, before resampling) are failures: nothing to hear.
MIN_CLIP_SECONDS = 0.01
#: A 2-D array's long (time) axis must be at least this many times its short (channel) axis.
MIN_SAMPLES_PER_CHANNEL = 16
#: Float clips peaking above this are not clipped silently (see the module docstring, step 3b).
MAX_FLOAT_PEAK = 2.0
LONG_POLICIES = ("center", "head")
SHORT_POLICIES = ("repeatpad", "zeropad")


class SampleError(InputDataError):
    """One sample cannot be decoded or preprocessed; it goes to the store's failures table."""


@dataclass(frozen=True)
class AudioPolicy:
    """How a clip becomes the encoder's fixed-length input.

    Attributes:
        sample_rate: target rate in Hz (48 000 for CLAP).
        clip_seconds: fixed clip length in seconds (10.0 for CLAP).
        long_policy: ``center`` (the middle ``clip_seconds``) or ``head`` (the first ``clip_seconds``).
        short_policy: ``repeatpad`` (repeat the clip whole ``floor(L / T)`` times, then zero-pad) or
            ``zeropad``.
        silence_threshold: peak absolute amplitude below which a clip is flagged silent.
        int16_quantize: round-trip through int16 as laion_clap does before its encoder (its
            training data went through the same quantisation).
    """

    sample_rate: int = 48000
    clip_seconds: float = 10.0
    long_policy: str = "center"
    short_policy: str = "repeatpad"
    silence_threshold: float = 1e-4
    int16_quantize: bool = True

    def __post_init__(self) -> None:
        if self.long_policy not in LONG_POLICIES:
            raise ValueError(f"long_policy must be one of {LONG_POLICIES}, got {self.long_policy!r}")
        if self.short_policy not in SHORT_POLICIES:
            raise ValueError(f"short_policy must be one of {SHORT_POLICIES}, got {self.short_policy!r}")

    @property
    def clip_samples(self) -> int:
        """Fixed clip length in samples (``round(sample_rate * clip_seconds)``)."""
        return int(round(self.sample_rate * self.clip_seconds))

    def to_json(self) -> dict[str, Any]:
        """The policy as recorded in the store manifest (``preprocessing``)."""
        d = asdict(self)
        d["clip_samples"] = self.clip_samples
        d["resampler"] = "soxr HQ"
        d["downmix"] = "mean of channels"
        return d


@dataclass
class AudioInfo:
    """Per-row facts about a clip (go into the store's metadata columns)."""

    duration_s: float
    sample_rate_in: int
    channels: int
    silent: bool
    cropped: bool
    padded: bool
    rescaled_int16: bool = False


@timed_decode
def decode_audio(data: bytes, what: str = "audio") -> tuple[np.ndarray, int]:
    """Decode audio file bytes with soundfile.

    Returns:
        ``(samples, sample_rate)``: samples ``(T, C)`` float32 in [-1, 1] (``C`` = channels), rate in Hz.

    Raises:
        SampleError: empty or undecodable bytes (message names ``what``).
    """
    import soundfile as sf

    if not data:
        raise SampleError(f"{what}: zero-byte audio file")
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise SampleError(f"{what}: cannot decode audio ({type(e).__name__}: {e})") from e
    return x, int(sr)


def to_mono_float(x: np.ndarray, what: str = "audio") -> tuple[np.ndarray, int]:
    """Down-mix any 1-D / 2-D sample array to mono float32 in [-1, 1].

    Args:
        x: ``(T,)``, ``(T, C)`` or ``(C, T)``; the channel axis is the smaller one (a clip has
            more samples than channels). Integer PCM is scaled to [-1, 1]: signed by
            ``2**(bits-1)``, unsigned 8-bit as ``(x - 128) / 128``.

    Returns:
        ``(mono (T,) float32, channels)``.

    Raises:
        SampleError: zero length, more than 2 dimensions, an ambiguous 2-D layout, NaN or Inf
            values, float samples far outside [-1, 1] (see :func:`check_range`).
    """
    mono, channels, _ = _to_mono(x, what)
    return mono, channels


def _to_mono(x: np.ndarray, what: str) -> tuple[np.ndarray, int, bool]:
    """:func:`to_mono_float` plus whether unscaled int16 values were rescaled."""
    x = np.asarray(x)
    was_float = x.dtype.kind == "f"
    if x.dtype.kind == "i":
        scale = float(2 ** (8 * x.dtype.itemsize - 1))
        x = x.astype(np.float32) / scale
    elif x.dtype.kind == "u":
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        x = (x.astype(np.float32) - half) / half
    elif x.dtype.kind != "f":
        raise SampleError(f"{what}: unsupported sample dtype {x.dtype}")
    if x.ndim == 1:
        channels = 1
        mono = x
    elif x.ndim == 2:
        short, long_ = sorted(x.shape)
        if short > 1 and long_ < MIN_SAMPLES_PER_CHANNEL * short:
            raise SampleError(f"{what}: ambiguous sample array of shape {tuple(x.shape)}: cannot tell the channel "
                              f"axis from the time axis (a clip has far more samples than channels); pass (T,) "
                              f"or (T, C) with T >= {MIN_SAMPLES_PER_CHANNEL}·C")
        axis = 0 if x.shape[0] < x.shape[1] else 1  # channels are the short axis
        channels = int(x.shape[axis])
        mono = x.mean(axis=axis) if channels else np.zeros(0, np.float32)
    else:
        raise SampleError(f"{what}: expected a (T,), (T, C) or (C, T) array, got shape {x.shape}")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise SampleError(f"{what}: zero-length audio (no samples)")
    if not np.isfinite(mono).all():
        raise SampleError(f"{what}: audio contains NaN or Inf samples; re-export the file")
    rescaled = False
    if was_float:
        mono, rescaled = check_range(mono, what)
    return mono, channels, rescaled


def check_range(mono: np.ndarray, what: str = "audio") -> tuple[np.ndarray, bool]:
    """Float samples must be in [-1, 1] (see the module docstring, step 3b).

    Returns:
        ``(samples, rescaled)``: ``rescaled`` is True when whole-number samples within int16 range
        (unscaled int16 PCM stored as float) were divided by 32768.

    Raises:
        SampleError: peak above :data:`MAX_FLOAT_PEAK` that is not unscaled int16 (names the peak).
    """
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if peak <= MAX_FLOAT_PEAK:
        return mono, False
    if peak <= 32768.0 and np.array_equal(mono, np.round(mono)):
        return (mono / np.float32(32768.0)).astype(np.float32), True
    raise SampleError(f"{what}: float samples reach {peak:.6g}, far outside [-1, 1] (clipping would turn the "
                      f"clip into a square wave); re-export the file as normalised float or integer PCM")


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample mono float32 ``(T,)`` from ``sr_in`` to ``sr_out`` Hz with soxr (deterministic)."""
    if sr_in == sr_out:
        return x
    import soxr

    return np.ascontiguousarray(soxr.resample(x, sr_in, sr_out, quality="HQ"), dtype=np.float32)


def fix_length(x: np.ndarray, policy: AudioPolicy) -> tuple[np.ndarray, bool, bool]:
    """Crop or pad mono ``(T,)`` to ``policy.clip_samples``, deterministically.

    Returns:
        ``(clip (L,) float32, cropped, padded)``.
    """
    n = policy.clip_samples
    t = len(x)
    if t > n:
        start = (t - n) // 2 if policy.long_policy == "center" else 0
        return np.ascontiguousarray(x[start:start + n]), True, False
    if t == n:
        return x, False, False
    out = np.zeros(n, dtype=np.float32)
    if policy.short_policy == "repeatpad":
        reps = n // t
        out[: reps * t] = np.tile(x, reps)
    else:
        out[:t] = x
    return out, False, True


def preprocess_waveform(
    x: np.ndarray, sr: int, policy: AudioPolicy, what: str = "audio"
) -> tuple[np.ndarray, AudioInfo]:
    """Samples at any rate/layout -> the encoder's fixed-length mono clip.

    Args:
        x: ``(T,)``, ``(T, C)`` or ``(C, T)`` samples (float in [-1, 1] or integer PCM).
        sr: sample rate of ``x`` in Hz.

    Returns:
        ``(clip (policy.clip_samples,) float32, AudioInfo)``.

    Raises:
        SampleError: zero length, NaN/Inf, bad rate.
    """
    if sr <= 0:
        raise SampleError(f"{what}: invalid sample rate {sr}")
    mono, channels, rescaled = _to_mono(x, what)
    duration = len(mono) / float(sr)
    if duration < MIN_CLIP_SECONDS:
        raise SampleError(f"{what}: clip too short: {len(mono)} sample(s) at {sr} Hz = {duration * 1000:.3g} ms "
                          f"(at least {MIN_CLIP_SECONDS * 1000:g} ms)")
    silent = bool(np.abs(mono).max() < policy.silence_threshold)
    mono = resample(mono, sr, policy.sample_rate)
    if mono.size == 0:
        raise SampleError(f"{what}: clip too short to resample ({duration * 1000:.3f} ms)")
    clip, cropped, padded = fix_length(mono, policy)
    if policy.int16_quantize:
        clip = (np.clip(clip, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0
    return clip, AudioInfo(duration_s=duration, sample_rate_in=int(sr), channels=channels,
                           silent=silent, cropped=cropped, padded=padded, rescaled_int16=rescaled)


def load_audio_bytes(data: bytes, policy: AudioPolicy, what: str = "audio") -> tuple[np.ndarray, AudioInfo]:
    """Decode file bytes and preprocess them (see the module docstring)."""
    x, sr = decode_audio(data, what)
    return preprocess_waveform(x, sr, policy, what)
