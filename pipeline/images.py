"""Image decoding (CPU side, runs in DataLoader workers).

One documented path from file bytes to an RGB PIL image, whatever the mode:

* the file is opened with PIL and fully loaded (``Image.load``): truncated files raise instead of
  returning a half-grey picture (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False); zero-byte files,
  non-images and decompression bombs (more than :func:`max_pixels` pixels: default
  :data:`MAX_PIXELS` = 89 478 485, PIL's own limit; set ``CMCR_MAX_IMAGE_PIXELS`` or
  ``cmcr encode --max-image-pixels`` to change it) raise
  :class:`~cmcr.pipeline.audio.SampleError` — they never hang a worker;
* EXIF orientation is applied (``ImageOps.exif_transpose``), as a viewer would show the image;
* the first frame of animated files is used;
* modes with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a ``transparency`` entry, ``RGBa``)
  are converted to ``RGBA`` and alpha-composited over a fixed background (white, ``BACKGROUND``);
* 16/32-bit greyscale (``I;16``, ``I``) is scaled to 8 bits by its nominal range (``I;16``: / 257,
  ``I``: clipped to 0..65535 then / 257), float (``F``) is clipped to 0..255;
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) goes through
  ``Image.convert("RGB")``.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.stageclock import timed_decode

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
BACKGROUND = (255, 255, 255)
#: Default pixel limit (width x height) of one image: PIL's own ``Image.MAX_IMAGE_PIXELS`` (about 89.5 MP,
#: a 1.0 GB decode budget at 3 bytes/pixel for 4 workers). Change it with ``CMCR_MAX_IMAGE_PIXELS``.
MAX_PIXELS = 89_478_485
MAX_PIXELS_ENV = "CMCR_MAX_IMAGE_PIXELS"


def max_pixels() -> int:
    """The image pixel limit in force: ``$CMCR_MAX_IMAGE_PIXELS`` if set (a positive integer), else
    :data:`MAX_PIXELS`. Read per call, so DataLoader workers see the value the CLI set.

    Raises:
        ConfigError: the variable is not a positive integer.
    """
    import os

    from cmcr.errors import ConfigError

    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels")
    return value
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert any PIL image to 8-bit ``RGB`` (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a, 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


@timed_decode
def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode image file bytes into an 8-bit RGB PIL image.

    Raises:
        SampleError: zero-byte, truncated, not an image, or too many pixels (names ``what``).
    """
    if not data:
        raise SampleError(f"{what}: zero-byte image file")
    limit = max_pixels()
    buf = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # cmcr's own limit replaces PIL's (which warns above 89.5 MP and refuses above 179 MP)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_unlimited(buf, limit)
            if img.width * img.height > limit:
                raise SampleError(f"{what}: {img.width}x{img.height} = {img.width * img.height} pixels is above the "
                                  f"limit {limit} (raise it with {MAX_PIXELS_ENV} or --max-image-pixels)")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except SampleError:
        raise
    except Image.DecompressionBombError as e:
        raise SampleError(f"{what}: {e} (above the limit {limit}; raise it with {MAX_PIXELS_ENV} or "
                          f"--max-image-pixels)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SampleError(f"{what}: cannot decode image ({type(e).__name__}: {_stable(str(e), buf, data)})") from e


def _open_unlimited(buf: io.BytesIO, limit: int) -> Image.Image:
    """``Image.open`` (header only). PIL refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` itself; a cmcr
    limit above that raises PIL's process-wide ``MAX_IMAGE_PIXELS`` to match (never lowers it)."""
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit // 2 + 1
    return Image.open(buf)


def _stable(message: str, buf: io.BytesIO, data: bytes) -> str:
    """PIL's message without object reprs (``<_io.BytesIO object at 0x7f..>`` differs per run and
    process): the buffer becomes ``(N bytes)``, any other address is dropped, so the same bad file
    always gives the same failure record."""
    message = message.replace(f" {buf!r}", f" ({len(data)} bytes)").replace(repr(buf), f"({len(data)} bytes)")
    return _ADDRESS.sub(">", message)

