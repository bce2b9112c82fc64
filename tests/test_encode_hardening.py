"""Encode hardening (issue 13 defect 6): bad model outputs, out-of-range audio, ambiguous arrays,
blank captions, the image pixel limit, compute precision."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cmcr.errors import StoreMismatchError
from cmcr.pipeline import images
from cmcr.pipeline.audio import AudioPolicy, SampleError, load_audio_bytes, preprocess_waveform, to_mono_float
from cmcr.pipeline.encode import embed_items, encode_shards
from cmcr.pipeline.shards import write_shards
from cmcr.pipeline.text import decode_text
from cmcr.stores.store import Store
from tests.fixtures_encode import tone, write_wav

POLICY = AudioPolicy(sample_rate=8000, clip_seconds=1.0)


# ------------------------------------------------------------------------------ model outputs
def test_all_zero_model_output_is_one_failure_not_an_abort(tiny_clip, tmp_path, monkeypatch):
    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\nbirds singing\n")
    shards = write_shards(lst, tmp_path / "shards").shards["text"]
    real = tiny_clip.forward

    def forward(modality, batch):  # the second sample of every batch comes out as zeros
        out = real(modality, batch)
        if len(out) > 1:
            out[1] = 0
        return out

    monkeypatch.setattr(tiny_clip, "forward", forward)
    rep = encode_shards(shards, tiny_clip, "text", tmp_path / "store", batch_size=3, num_workers=0, progress=False)
    assert rep.rows == 2 and rep.failures == 1
    fail = Store.open(tmp_path / "store").failures().to_pylist()[0]
    assert fail["stage"] == "embed" and "all-zero" in fail["error"]


def test_embed_items_names_nan_and_zero_rows(tiny_clip, monkeypatch):
    def embed(modality, batch):
        e = np.zeros((3, tiny_clip.dim), np.float32)
        e[0, 0] = 1.0
        e[1] = np.nan
        return e

    monkeypatch.setattr(tiny_clip, "embed", embed)
    emb, ok, failures = embed_items(tiny_clip, "text", ["a", "b", "c"], [0, 1, 2], "s", batch=object())
    assert ok.tolist() == [True, False, False] and emb.shape == (1, tiny_clip.dim)
    assert [("NaN" in f["error"], "all-zero" in f["error"]) for f in failures] == [(True, False), (False, True)]


# ------------------------------------------------------------------------------ audio range / shapes
def test_float_audio_far_out_of_range_is_a_failure(tmp_path):
    x = tone(0.5, 8000)
    x[100] = 1e29
    data = write_wav(tmp_path / "loud.wav", x, 8000, subtype="FLOAT").read_bytes()
    with pytest.raises(SampleError, match=r"reach 1e\+29.*square wave"):
        load_audio_bytes(data, POLICY, "loud.wav")


def test_unscaled_int16_in_a_float_file_is_rescaled_and_noted(tmp_path):
    x = np.round(tone(0.5, 8000) * 20000).astype(np.float32)  # int16 values written as float
    data = write_wav(tmp_path / "pcm.wav", x, 8000, subtype="FLOAT").read_bytes()
    clip, info = load_audio_bytes(data, POLICY, "pcm.wav")
    assert info.rescaled_int16 and 0.28 < np.abs(clip).max() < 0.33  # not a clipped square wave
    ref, ref_info = load_audio_bytes(write_wav(tmp_path / "ok.wav", x / 32768, 8000, subtype="FLOAT").read_bytes(),
                                     POLICY)
    assert not ref_info.rescaled_int16
    np.testing.assert_allclose(clip, ref, atol=1e-4)


def test_mild_float_overs_are_still_clipped():
    clip, info = preprocess_waveform(tone(0.5, 8000, amp=1.3), 8000, POLICY)
    assert np.abs(clip).max() <= 1.0 and not info.rescaled_int16


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (8, 20)])
def test_ambiguous_two_d_arrays_are_refused(shape):
    with pytest.raises(SampleError, match="ambiguous"):
        to_mono_float(np.zeros(shape, np.float32))


def test_one_sample_clip_is_refused():
    with pytest.raises(SampleError, match="too short: 1 sample"):
        preprocess_waveform(np.array([0.5], np.float32), 8000, POLICY)


def test_two_channel_clips_still_work():
    mono, channels = to_mono_float(np.zeros((2, 1000), np.float32))
    assert channels == 2 and mono.shape == (1000,)


def test_rescaled_note_reaches_meta_json(tiny_clap, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    write_wav(folder / "pcm.wav", np.round(tone(0.5, 48000) * 20000).astype(np.float32), 48000, subtype="FLOAT")
    write_wav(folder / "huge.wav", tone(0.5, 48000, amp=1e6) + 0.5, 48000, subtype="FLOAT")
    shards = write_shards(folder, tmp_path / "shards").shards["audio"]
    rep = encode_shards(shards, tiny_clap, "audio", tmp_path / "store", batch_size=2, num_workers=0, progress=False)
    assert rep.rows == 1 and rep.failures == 1
    store = Store.open(tmp_path / "store")
    assert json.loads(store.metadata(["meta_json"]).column("meta_json")[0].as_py())["rescaled_int16"] is True
    assert "far outside [-1, 1]" in store.failures().to_pylist()[0]["error"]


# ------------------------------------------------------------------------------ captions
@pytest.mark.parametrize("caption", [None, "", "   ", 3])
def test_blank_none_or_non_text_caption_is_a_clear_sample_error(caption):
    with pytest.raises(SampleError, match="caption"):
        decode_text(caption)


def test_encode_query_names_the_bad_caption(tiny_clip):
    with pytest.raises(SampleError, match=r"text input 1: .*missing caption"):
        tiny_clip.encode("text", ["a dog", None])


# ------------------------------------------------------------------------------ image pixel limit
def test_pixel_limit_is_the_documented_setting(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (100, 50)).save(buf, "PNG")
    data = buf.getvalue()
    assert images.max_pixels() == images.MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's own limit, ~89.5 MP
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "4999")
    with pytest.raises(SampleError, match=r"5000 pixels is above the limit 4999.*CMCR_MAX_IMAGE_PIXELS"):
        images.decode_image(data, "big.png")
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "5000")
    assert images.decode_image(data).size == (100, 50)


def test_pixel_limit_above_pil_default_is_honoured(monkeypatch):
    """An image between PIL's warning limit (89.5 MP) and a raised cmcr limit decodes (header-only check):
    the limit really is the setting, not PIL's hidden one."""
    class Fake:
        width, height = 10_000, 10_000  # 100 MP > 89.5 MP
        n_frames = 1

        def load(self):
            pass

    monkeypatch.setattr(images, "_open_unlimited", lambda buf, limit: Fake())
    monkeypatch.setattr(images, "to_rgb", lambda img: img)
    monkeypatch.setattr(images.ImageOps, "exif_transpose", lambda img: img)
    with pytest.raises(SampleError, match="above the limit 89478485"):
        images.decode_image(b"x")
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "200000000")
    assert images.decode_image(b"x").width == 10_000


# ------------------------------------------------------------------------------ compute precision
def test_precision_is_recorded_and_mixing_is_refused(tiny_clip, tmp_path, monkeypatch):
    lst = tmp_path / "caps.txt"
    lst.write_text("a dog\na cat\n")
    shards = write_shards(lst, tmp_path / "shards").shards["text"]
    encode_shards(shards, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    assert Store.open(tmp_path / "store").manifest["extra"]["compute_precision"] == "fp32"
    monkeypatch.setattr(tiny_clip, "precision", "bf16")
    with pytest.raises(StoreMismatchError, match=r"compute_precision: recorded .fp32., now .bf16.*--precision fp32"):
        encode_shards(shards, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False)
    rep = encode_shards(shards, tiny_clip, "text", tmp_path / "store", num_workers=0, progress=False, overwrite=True)
    assert rep.rows == 2 and Store.open(tmp_path / "store").manifest["extra"]["compute_precision"] == "bf16"
