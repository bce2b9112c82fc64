"""Pytest fixtures for the encode tests (registered in tests/conftest.py).

Everything is generated in ``tmp_path`` / a session temp folder: messy audio and image files, a
byte-level BPE tokenizer for CLAP, random-init tiny encoders (built once per session).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

TINY_CLIP = "open_clip:cmcr-tiny-clip@random"
TINY_CLAP = "clap:cmcr-tiny-clap@random"


def write_wav(path: Path, x: np.ndarray, sr: int, subtype: str | None = None, fmt: str | None = None) -> Path:
    """Write samples ``(T,)`` / ``(T, C)`` with soundfile (format from the suffix unless ``fmt``)."""
    import soundfile as sf

    sf.write(str(path), x, sr, subtype=subtype, format=fmt)
    return path


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """A sine tone ``(round(seconds * sr),)`` float32."""
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def image_bytes(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def messy_images(tmp_path: Path) -> dict[str, Path]:
    """One file per PIL mode plus broken files: name -> path (names say what they hold)."""
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")
    files: dict[str, Path] = {}

    def save(name: str, img, fmt: str = "PNG", **kw) -> None:
        p = d / name
        img.save(p, format=fmt, **kw)
        files[name] = p

    save("rgb.jpg", rgb, "JPEG")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> must become the white background
    save("rgba.png", rgba)
    save("la.png", rgb.convert("LA"))
    pal = rgb.convert("P")
    save("palette_transparent.png", pal, transparency=0)
    save("palette.gif", pal, "GIF")
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("grey.png", rgb.convert("L"))
    g16 = Image.fromarray(np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27)
    save("grey16.png", g16)
    save("bilevel.png", rgb.convert("1"))
    full = image_bytes(rgb, "JPEG")
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    files["truncated.jpg"] = d / "truncated.jpg"
    png = image_bytes(rgb, "PNG")
    (d / "truncated.png").write_bytes(png[: len(png) - 30])
    files["truncated.png"] = d / "truncated.png"
    (d / "zero.png").write_bytes(b"")
    files["zero.png"] = d / "zero.png"
    (d / "not_an_image.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 10)
    files["not_an_image.jpg"] = d / "not_an_image.jpg"
    return files


@pytest.fixture
def messy_audio(tmp_path: Path) -> dict[str, Path]:
    """Audio files of every kind the encode stage must handle: name -> path."""
    d = tmp_path / "audio"
    d.mkdir()
    files: dict[str, Path] = {}

    def add(name: str, x: np.ndarray, sr: int, subtype: str | None = None, fmt: str | None = None) -> None:
        files[name] = write_wav(d / name, x, sr, subtype=subtype, fmt=fmt)

    add("mono_48k.wav", tone(1.0, 48000), 48000, "FLOAT")
    st = np.stack([tone(1.0, 44100), tone(1.0, 44100, 660.0)], axis=1) * 0.5
    add("stereo_44k_pcm16.wav", st, 44100, "PCM_16")
    six = np.stack([tone(0.5, 16000, 300 + 50 * c) for c in range(6)], axis=1)
    add("six_channel_16k.flac", six, 16000, "PCM_24")
    add("mono_22k.ogg", tone(2.0, 22050), 22050, fmt="OGG")
    add("long_13s_8k.wav", np.linspace(-0.5, 0.5, 13 * 8000, dtype=np.float32), 8000, "FLOAT")
    add("silent.wav", np.zeros(4800, np.float32), 48000, "FLOAT")
    bad = tone(0.2, 48000)
    bad[100] = np.nan
    add("nan.wav", bad, 48000, "FLOAT")
    inf = tone(0.2, 48000)
    inf[5] = np.inf
    add("inf.wav", inf, 48000, "FLOAT")
    add("zero_length.wav", np.zeros(0, np.float32), 48000, "FLOAT")
    (d / "zero_bytes.wav").write_bytes(b"")
    files["zero_bytes.wav"] = d / "zero_bytes.wav"
    (d / "garbage.flac").write_bytes(b"fLaC" + b"\x00garbage" * 50)
    files["garbage.flac"] = d / "garbage.flac"
    return files


def write_tiny_bpe_tokenizer(d: Path) -> Path:
    """RoBERTa-style byte-level BPE files (261 tokens, no merges) in ``d`` (dependencies.md §4)."""
    from cmcr.pipeline.clap_encoder import write_byte_level_tokenizer

    return write_byte_level_tokenizer(d)


@pytest.fixture(scope="session")
def tiny_clip():
    """Random-init tiny open_clip encoder (``cmcr-tiny-clip``, 64-d), CPU, built once."""
    from cmcr.pipeline.encoders import load_encoder

    return load_encoder(TINY_CLIP, device="cpu")


@pytest.fixture(scope="session")
def tiny_clap():
    """Random-init tiny CLAP encoder (shrunk HTSAT + 1-layer RoBERTa, 64-d), CPU, built once;
    ``import laion_clap`` happens here, once per session."""
    from cmcr.pipeline.encoders import load_encoder

    return load_encoder(TINY_CLAP, device="cpu")
