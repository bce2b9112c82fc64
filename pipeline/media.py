"""The one list of media file extensions per modality, used by ``cmcr shard`` (which files become
samples of which modality), ``cmcr encode`` (which member of a shard sample holds the payload) and
``cmcr search --media`` (the modality of a query file).

The extensions themselves live beside their decoders (``images.IMAGE_EXTENSIONS``,
``audio.AUDIO_EXTENSIONS``, ``text.TEXT_EXTENSIONS``, ``pointcloud.POINTCLOUD_EXTENSIONS``); this
module joins them and answers "which modality is this file". Extensions are compared lower-case
without the dot; a webdataset member extension with several parts (``xyz.npy``, ``seg.png``)
counts by its last part.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cmcr.pipeline.audio import AUDIO_EXTENSIONS
from cmcr.pipeline.images import IMAGE_EXTENSIONS
from cmcr.pipeline.pointcloud import POINTCLOUD_EXTENSIONS
from cmcr.pipeline.text import TEXT_EXTENSIONS

#: modality -> its file extensions, in order of preference when a sample has several members.
MEDIA_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
    "text": TEXT_EXTENSIONS,
    "3d": POINTCLOUD_EXTENSIONS,
}
#: extension -> modality (every extension belongs to exactly one modality).
MODALITY_OF_EXTENSION: dict[str, str] = {e: m for m, exts in MEDIA_EXTENSIONS.items() for e in exts}
assert len(MODALITY_OF_EXTENSION) == sum(map(len, MEDIA_EXTENSIONS.values())), "an extension in two modalities"

#: Names of documentation files that sit beside media (README, LICENSE, spot_README.txt...): in a
#: media folder they are not captions.
_DOC_NAME = re.compile(r"(?:^|[_\-. ])(read[_\-. ]?me|licen[cs]es?|copying|credits|authors|changelog|"
                       r"attributions?|citation)(?:$|[_\-. ])", re.IGNORECASE)


def normalize_extension(ext: str) -> str:
    """``".PLY"`` -> ``"ply"``; ``"xyz.npy"`` (a webdataset member extension) -> ``"npy"``."""
    return str(ext).lower().lstrip(".").rsplit(".", 1)[-1]


def extension_of(path: str | os.PathLike) -> str:
    """The lower-case extension of a file name, without the dot (``""`` when it has none)."""
    return Path(path).suffix.lower().lstrip(".")


def modality_of_extension(ext: str) -> str | None:
    """The modality of an extension (``None`` when no modality claims it)."""
    return MODALITY_OF_EXTENSION.get(normalize_extension(ext))


def modality_of(path: str | os.PathLike) -> str | None:
    """The modality of a file from its extension (``None`` when unknown)."""
    return MODALITY_OF_EXTENSION.get(extension_of(path))


def is_documentation(path: str | os.PathLike) -> bool:
    """True for README / LICENSE / CREDITS-like file names (``spot_README.txt``, ``LICENSE.txt``...)."""
    return bool(_DOC_NAME.search(Path(path).stem))


def media_member(sample: dict, modality: str) -> str | None:
    """The member name (extension) of a shard sample that holds its ``modality`` payload, or ``None``.

    Exact extensions first, in :data:`MEDIA_EXTENSIONS` order, then multi-part ones (``xyz.npy``).
    """
    exts = MEDIA_EXTENSIONS[modality]
    for ext in exts:
        if ext in sample:
            return ext
    for name in sorted(k for k in sample if isinstance(k, str) and not k.startswith("__") and "." in k):
        if normalize_extension(name) in exts:
            return name
    return None


def describe() -> str:
    """One line per modality with its extensions (for help texts and errors)."""
    return "; ".join(f"{m}: {', '.join(exts)}" for m, exts in MEDIA_EXTENSIONS.items())
