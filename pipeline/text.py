"""Caption decoding and checks (CPU side). Tokenisation and the truncation flag belong to the
encoder's text preprocessor (it knows its tokenizer and context length)."""

from __future__ import annotations

import unicodedata

from cmcr.pipeline.audio import SampleError
from cmcr.pipeline.stageclock import timed_decode

TEXT_EXTENSIONS = ("txt", "text", "caption")


@timed_decode
def decode_text(data: bytes | str, what: str = "text") -> str:
    """Bytes (UTF-8, BOM tolerated) or str -> a cleaned caption.

    Cleaning: Unicode NFC, surrounding whitespace stripped, inner runs of whitespace (incl.
    newlines) collapsed to one space.

    Raises:
        SampleError: missing (``None``), not text, not UTF-8, or empty / whitespace-only after cleaning.
    """
    if data is None:
        raise SampleError(f"{what}: missing caption (None); give every sample a non-empty caption")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, (bytes, str)):
        raise SampleError(f"{what}: a caption must be text, got {type(data).__name__} ({data!r:.60})")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SampleError(f"{what}: caption is not valid UTF-8 ({e})") from e
    text = " ".join(unicodedata.normalize("NFC", data).split())
    if not text:
        raise SampleError(f"{what}: empty or whitespace-only caption")
    return text
