"""Image decode on generated files of every PIL mode, and broken files (pipeline/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.images import decode_image, to_rgb

GOOD = ["rgb.jpg", "rgba.png", "la.png", "palette_transparent.png", "palette.gif", "cmyk.jpg",
        "grey.png", "grey16.png", "bilevel.png"]
BAD = ["truncated.jpg", "truncated.png", "zero.png", "not_an_image.jpg"]


@pytest.mark.parametrize("name", GOOD)
def test_every_mode_becomes_rgb(messy_images, name):
    img = decode_image(messy_images[name].read_bytes(), name)
    assert img.mode == "RGB" and img.size == (60, 40)


@pytest.mark.parametrize("name", BAD)
def test_broken_files_raise_sample_error(messy_images, name):
    with pytest.raises(SampleError) as e:
        decode_image(messy_images[name].read_bytes(), name)
    assert name in str(e.value)
    with pytest.raises(SampleError) as again:  # same file, same message (no object address in it)
        decode_image(messy_images[name].read_bytes(), name)
    assert str(again.value) == str(e.value) and " at 0x" not in str(e.value)


def test_transparent_pixels_become_the_white_background(messy_images):
    img = decode_image(messy_images["rgba.png"].read_bytes())
    assert np.asarray(img).min() == 255  # alpha 0 everywhere


def test_half_transparent_alpha_is_composited():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    px = np.asarray(to_rgb(rgba))
    assert np.all(np.abs(px.astype(int) - 127) <= 1)


def test_16_bit_grey_is_scaled_not_clipped():
    g = Image.fromarray(np.array([[0, 65535, 32896]], np.uint16))
    assert np.asarray(to_rgb(g))[0, :, 0].tolist() == [0, 255, 128]
