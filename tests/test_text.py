"""Caption decoding and the open_clip text path (truncation flag, empty captions, batch of one)."""

from __future__ import annotations

import numpy as np
import pytest

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.text import decode_text


def test_decode_cleans_whitespace_and_bom():
    assert decode_text("\ufeff  a   dog\n barking ".encode()) == "a dog barking"


@pytest.mark.parametrize("raw", ["", "   ", "\n\t ", b"", b"\xff\xfe\x00"])
def test_empty_or_undecodable_captions_are_refused(raw):
    with pytest.raises(SampleError):
        decode_text(raw)


def test_long_captions_are_truncated_with_a_flag(tiny_clip):
    pre = tiny_clip.preprocessor("text")
    ids, info = pre("a dog " * 100)
    assert info["truncated"] is True and ids.shape == (tiny_clip.context_length,)
    _, info = pre("a dog")
    assert info["truncated"] is False


def test_batch_of_one_and_normalised_rows(tiny_clip):
    one = tiny_clip.encode("text", ["a cat"])
    assert one.shape == (1, tiny_clip.dim) and one.dtype == np.float32
    assert abs(float(np.linalg.norm(one)) - 1) < 1e-5
    two = tiny_clip.encode("text", ["a cat", "a dog"])
    np.testing.assert_allclose(two[0], one[0], atol=1e-5)
