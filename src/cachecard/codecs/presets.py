"""Named codec presets (spec/cachecard-1.md §5.5)."""

from __future__ import annotations

from dataclasses import dataclass

from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
from zarr.codecs import BytesCodec, Crc32cCodec

from cachecard.errors import UnsupportedCodecError


@dataclass(frozen=True)
class Pipeline:
    """The codecs of one inner chunk: a serializer, then byte-to-byte codecs ending in crc32c."""

    serializer: ArrayBytesCodec
    compressors: tuple[BytesBytesCodec, ...]


def _lossless() -> Pipeline:
    return Pipeline(BytesCodec(endian="little"), (Crc32cCodec(),))


PRESETS = {"lossless": _lossless}


def pipeline(name: str) -> Pipeline:
    """The pipeline of a preset, or UnsupportedCodecError naming the presets that exist."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise UnsupportedCodecError(f"unknown codec preset {name!r}; known presets: {sorted(PRESETS)}") from None
