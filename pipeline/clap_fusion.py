"""laion_clap's *fusion* audio input, built without torchaudio (the paper's CLAP, ``630k-fusion-best.pt``).

laion_clap feeds a fusion model (``enable_fusion=True``, ``fusion_type='aff_2d'``) a dict
``{"mel_fusion": (B, 4, F, M), "longer": (B,) bool}`` made by
``laion_clap.training.data.get_audio_features(..., data_truncating="fusion",
data_filling="repeatpad")`` after ``hook.py`` has quantised the waveform through int16. That code
calls ``torchaudio.transforms.MelSpectrogram`` (torchaudio is unavailable here); this module
computes the same thing with torch only:

**Log-mel** (:func:`log_mel`, = laion_clap ``get_mel``): 48 kHz mono, STFT with ``n_fft`` 1024,
``win_length`` 1024, periodic Hann window, hop 480, ``center=True`` with *reflect* padding,
one-sided, power 2 (``|X|^2``); mel filterbank of 64 triangular bands on the **HTK** mel scale
(``2595 log10(1 + f/700)``) from ``f_min`` 50 Hz to ``f_max`` 14 000 Hz, no area normalisation
(torchaudio ``melscale_fbanks(norm=None, mel_scale="htk")`` = librosa ``filters.mel(htk=True,
norm=None)``); decibels ``10 log10(max(P, 1e-10))`` with reference 1 and no ``top_db`` clipping
(torchaudio ``AmplitudeToDB(stype="power", top_db=None)``). Output ``(frames, 64)`` float32 with
``frames = 1 + T // 480``. Long clips are transformed in blocks of frames (same result, bounded
memory).

**Fusion input** (:func:`fusion_input`), with ``L = 480 000`` samples (10 s) and
``C = L // 480 + 1 = 1001`` frames:

* ``T <= L`` (short or exactly 10 s): the clip is repeated whole ``floor(L / T)`` times and
  zero-padded to ``L`` (``repeatpad``); its mel (1001 frames) is stacked four times;
  ``longer = False``.
* ``T > L`` and the whole-clip mel still has ``C`` frames (``L < T < L + 480``): that mel four
  times, ``longer = False`` (laion_clap's corner case).
* otherwise ``longer = True`` and the four channels are: the whole clip's mel *shrunk* to ``C``
  frames (bilinear resize, ``align_corners=False``, with antialiasing — what
  ``torchvision.transforms.Resize(size=[C, 64])`` does to a tensor in the torchvision versions
  laion_clap requires), then three ``C``-frame crops of the mel whose start frames lie in the
  front, middle and back third of the possible starts ``0 .. frames - C``
  (``numpy.array_split`` into 3; an empty third uses 0).

**Deterministic crops** (the one departure from laion_clap, which draws each start at random with
``np.random.choice``): cmcr takes the *middle* start of each third (index ``len(third) // 2``), so
the same clip always gives the same input and the same embedding, whatever the batch, worker or
sample key. :func:`crop_starts` implements the rule.

The waveform itself is *not* passed to a fusion model (HTSAT's fusion branch reads only
``mel_fusion`` and ``longer``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cmcr.pipeline.audio import AudioPolicy, SampleError, decode_audio, resample, to_mono_float

CROP_RULE = "middle start of each third"


@dataclass(frozen=True)
class FusionFrontEnd:
    """Parameters of laion_clap's fusion front end (defaults: HTSAT-tiny's ``audio_cfg``).

    Attributes:
        sample_rate: Hz (48 000).
        n_fft: FFT size = window length in samples (``audio_cfg["window_size"]``, 1024).
        hop: hop length in samples (480 = 10 ms).
        mel_bins: mel bands (64).
        f_min, f_max: mel filterbank range in Hz (50, 14 000).
        clip_samples: the 10 s window ``L`` in samples (480 000).
        resize_antialias: antialias in the whole-clip shrink (torchvision >= 0.17 default for
            tensors, which laion_clap's ``Resize`` call gets).
    """

    sample_rate: int = 48000
    n_fft: int = 1024
    hop: int = 480
    mel_bins: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    clip_samples: int = 480000
    resize_antialias: bool = True

    @classmethod
    def from_audio_cfg(cls, cfg: dict[str, Any]) -> FusionFrontEnd:
        """From laion_clap's model ``audio_cfg`` (``sample_rate, window_size, hop_size, mel_bins, fmin,
        fmax, clip_samples``)."""
        return cls(sample_rate=int(cfg["sample_rate"]), n_fft=int(cfg["window_size"]), hop=int(cfg["hop_size"]),
                   mel_bins=int(cfg["mel_bins"]), f_min=float(cfg["fmin"]), f_max=float(cfg["fmax"]),
                   clip_samples=int(cfg["clip_samples"]))

    @property
    def chunk_frames(self) -> int:
        """Frames of a 10 s window: ``clip_samples // hop + 1`` (1001)."""
        return self.clip_samples // self.hop + 1

    def to_json(self) -> dict[str, Any]:
        """The front end as recorded in the store manifest (``preprocessing``)."""
        d = asdict(self)
        d.update(chunk_frames=self.chunk_frames, window="hann (periodic)", win_length=self.n_fft, center=True,
                 pad_mode="reflect", power=2.0, mel_scale="htk", mel_norm=None,
                 db="10*log10(max(power, 1e-10)), ref 1.0, no top_db",
                 shrink="bilinear resize of the whole-clip mel to chunk_frames (align_corners=False)",
                 crops=CROP_RULE, longer="clip longer than clip_samples with more than chunk_frames frames")
        return d


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(fe: FusionFrontEnd) -> np.ndarray:
    """Triangular HTK mel filterbank without normalisation.

    Returns:
        ``(n_fft // 2 + 1, mel_bins)`` float32 (frequency bins x mel bands), as torchaudio's
        ``melscale_fbanks(n_fft//2+1, f_min, f_max, mel_bins, sample_rate, norm=None, mel_scale="htk")``.
    """
    n_freqs = fe.n_fft // 2 + 1
    all_freqs = np.linspace(0.0, fe.sample_rate // 2, n_freqs)
    m_pts = np.linspace(_hz_to_mel(np.float64(fe.f_min)), _hz_to_mel(np.float64(fe.f_max)), fe.mel_bins + 2)
    f_pts = _mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, mel_bins + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


_FB_CACHE: dict[FusionFrontEnd, Any] = {}


def log_mel(x: np.ndarray, fe: FusionFrontEnd | None = None, block_frames: int = 4096) -> np.ndarray:
    """laion_clap's ``get_mel``: power mel spectrogram in dB (see the module docstring).

    Args:
        x: ``(T,)`` float32 mono samples at ``fe.sample_rate``; ``T > n_fft // 2`` (reflect padding).
        block_frames: frames per STFT block (bounds memory for long clips; does not change values).

    Returns:
        ``(1 + T // hop, mel_bins)`` float32.
    """
    import torch

    fe = fe or FusionFrontEnd()
    x = np.ascontiguousarray(x, dtype=np.float32)
    pad = fe.n_fft // 2
    if x.ndim != 1 or len(x) <= pad:
        raise ValueError(f"log_mel needs a 1-D clip longer than {pad} samples, got shape {x.shape}")
    if fe not in _FB_CACHE:
        _FB_CACHE[fe] = (torch.from_numpy(mel_filterbank(fe)), torch.hann_window(fe.n_fft, periodic=True))
    fb, window = _FB_CACHE[fe]
    xp = torch.nn.functional.pad(torch.from_numpy(x)[None, None], (pad, pad), mode="reflect")[0, 0]
    n_frames = 1 + (len(x) + 2 * pad - fe.n_fft) // fe.hop
    out = np.empty((n_frames, fe.mel_bins), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, n_frames, block_frames):
            e = min(n_frames, s + block_frames)
            seg = xp[s * fe.hop:(e - 1) * fe.hop + fe.n_fft]
            spec = torch.stft(seg, fe.n_fft, hop_length=fe.hop, win_length=fe.n_fft, window=window, center=False,
                              onesided=True, return_complex=True)  # (n_freqs, e - s)
            power = spec.abs().pow(2.0)
            mel = torch.matmul(power.transpose(0, 1), fb)  # (e - s, mel_bins)
            out[s:e] = (10.0 * torch.log10(torch.clamp(mel, min=1e-10))).numpy()
    return out


def crop_starts(total_frames: int, chunk_frames: int) -> tuple[int, int, int]:
    """Start frames of the front, middle and back crops (deterministic rule of the module docstring).

    The possible starts ``0 .. total_frames - chunk_frames`` are split into three with
    ``numpy.array_split`` (as laion_clap does); each crop starts at the middle element of its
    third (``third[len(third) // 2]``); an empty third uses 0 (laion_clap's fallback).
    """
    if total_frames <= chunk_frames:
        raise ValueError(f"crops need more than {chunk_frames} frames, got {total_frames}")
    thirds = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    front, middle, back = (int(t[len(t) // 2]) if len(t) else 0 for t in thirds)
    return front, middle, back


def shrink_mel(mel: np.ndarray, frames: int, antialias: bool = True) -> np.ndarray:
    """Resize a ``(T, M)`` mel to ``(frames, M)``: bilinear, ``align_corners=False`` (torchvision's
    tensor ``Resize``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))[None, None]
    with torch.no_grad():
        r = torch.nn.functional.interpolate(t, size=(frames, mel.shape[1]), mode="bilinear", align_corners=False,
                                            antialias=antialias)
    return r[0, 0].numpy()


def pad_clip(x: np.ndarray, n: int, short_policy: str = "repeatpad") -> np.ndarray:
    """Fill a clip of ``T <= n`` samples to ``n``: ``repeatpad`` (repeat whole ``floor(n / T)`` times, then
    zeros; laion_clap's filling) or ``zeropad``."""
    t = len(x)
    if t >= n:
        return np.ascontiguousarray(x[:n], dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    if short_policy == "repeatpad":
        reps = n // t
        out[:reps * t] = np.tile(x, reps)
    else:
        out[:t] = x
    return out


def fusion_input(x: np.ndarray, fe: FusionFrontEnd | None = None,
                 short_policy: str = "repeatpad") -> tuple[np.ndarray, bool]:
    """laion_clap's ``get_audio_features(..., data_truncating="fusion")`` with deterministic crops.

    Args:
        x: ``(T,)`` float32 mono clip at ``fe.sample_rate`` (already int16-quantised if wanted).

    Returns:
        ``(mel_fusion (4, chunk_frames, mel_bins) float32, longer)``.
    """
    fe = fe or FusionFrontEnd()
    n, c = fe.clip_samples, fe.chunk_frames
    if len(x) > n:
        mel = log_mel(x, fe)
        if mel.shape[0] == c:  # L < T < L + hop: the whole clip fits the window
            return np.stack([mel] * 4), False
        f, m, b = crop_starts(mel.shape[0], c)
        shrunk = shrink_mel(mel, c, fe.resize_antialias)
        return np.stack([shrunk, mel[f:f + c], mel[m:m + c], mel[b:b + c]]), True
    mel = log_mel(pad_clip(x, n, short_policy), fe)
    return np.stack([mel] * 4), False


def quantize_int16(x: np.ndarray) -> np.ndarray:
    """laion_clap's ``int16_to_float32(float32_to_int16(x))``: clip to [-1, 1], ``* 32767``, truncate to
    int16, ``/ 32767``."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / np.float32(32767.0)


class ClapFusionPreprocessor:
    """Picklable ``bytes -> ({"mel_fusion": (4, C, M) float32 tensor, "longer": bool tensor}, info)``.

    Decode, down-mix, resample as :mod:`cmcr.pipeline.audio` does (``policy``); the *whole* clip
    is quantised through int16 (``policy.int16_quantize``) and turned into the fusion input —
    nothing is cropped from the waveform. ``info["cropped"]`` is ``longer`` (crops + shrink were
    used), ``info["padded"]`` says the clip was shorter than 10 s.
    """

    def __init__(self, front_end: FusionFrontEnd, policy: AudioPolicy):
        if policy.sample_rate != front_end.sample_rate:
            raise ValueError(f"audio policy rate {policy.sample_rate} != front end rate {front_end.sample_rate}")
        self.front_end = front_end
        self.policy = policy

    def __call__(self, raw: bytes, what: str = "audio") -> tuple[Any, dict[str, Any]]:
        x, sr = decode_audio(raw, what)
        return self.from_waveform(x, sr, what)

    def from_waveform(self, x: np.ndarray, sr: int, what: str = "audio") -> tuple[Any, dict[str, Any]]:
        """Same as calling the preprocessor on file bytes, for samples already decoded."""
        import torch

        if sr <= 0:
            raise SampleError(f"{what}: invalid sample rate {sr}")
        mono, channels = to_mono_float(x, what)
        duration = len(mono) / float(sr)
        silent = bool(np.abs(mono).max() < self.policy.silence_threshold)
        mono = resample(mono, sr, self.front_end.sample_rate)
        if mono.size == 0:
            raise SampleError(f"{what}: clip too short to resample ({duration * 1000:.3f} ms)")
        if self.policy.int16_quantize:
            mono = quantize_int16(mono)
        mel, longer = fusion_input(mono, self.front_end, self.policy.short_policy)
        return ({"mel_fusion": torch.from_numpy(mel), "longer": torch.tensor(longer)},
                {"duration_s": duration, "sample_rate_in": int(sr), "channels": channels, "silent": silent,
                 "cropped": bool(longer), "padded": bool(len(mono) < self.front_end.clip_samples)})
