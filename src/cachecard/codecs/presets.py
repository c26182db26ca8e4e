"""Named codec presets (spec/cachecard-1.md §5.5, spec/codecs/README.md "Presets").

A preset turns one word into the zarr codec pipelines of a card's K and V arrays. The name is recorded in the
manifest; the pipelines are recorded in each array's zarr.json and are what a reader decodes with. Every
pipeline ends in crc32c, so each stored chunk is checksummed. Some presets plan their configuration from the
data (a rate target, say); they receive the array and the model identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from cachecard.errors import UnsupportedCodecError

if TYPE_CHECKING:
    from cachecard.manifest import ModelIdentity


@dataclass(frozen=True)
class Pipeline:
    """The codecs of one inner chunk: a serializer, then byte-to-byte codecs ending in crc32c."""

    serializer: ArrayBytesCodec
    compressors: tuple[BytesBytesCodec, ...] = ()

    def __post_init__(self) -> None:
        if not self.compressors or not isinstance(self.compressors[-1], Crc32cCodec):
            object.__setattr__(self, "compressors", (*self.compressors, Crc32cCodec()))


Planner = Callable[[np.ndarray, "ModelIdentity"], Pipeline]


@dataclass(frozen=True)
class Preset:
    """K and V pipelines under one name. ``k`` and ``v`` get the array (storage dtype) and the identity."""

    name: str
    summary: str
    k: Planner
    v: Planner
    lossy: bool = True


def fixed(serializer: Callable[[], ArrayBytesCodec], *compressors: Callable[[], BytesBytesCodec]) -> Planner:
    """A planner that ignores the data."""
    return lambda _a, _m: Pipeline(serializer(), tuple(c() for c in compressors))


def _shuffle_zstd(_a: np.ndarray, _m: ModelIdentity) -> Pipeline:
    from numcodecs.zarr3 import Shuffle  # numcodecs' zarr 3 wrappers; numcodecs is a dependency already

    return Pipeline(BytesCodec(endian="little"), (Shuffle(), ZstdCodec(level=3, checksum=False)))


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    PRESETS[preset.name] = preset
    return preset


_raw = fixed(lambda: BytesCodec(endian="little"))
register(Preset("lossless", "raw fp32/fp16/bf16, bit-exact", _raw, _raw, lossy=False))
register(Preset("zstd", "byte shuffle + zstd-3, bit-exact", _shuffle_zstd, _shuffle_zstd, lossy=False))


def preset(name: str) -> Preset:
    """The preset of this name, or UnsupportedCodecError naming the presets that exist."""
    from cachecard import codecs  # noqa: F401 - importing the package registers every preset

    try:
        return PRESETS[name]
    except KeyError:
        raise UnsupportedCodecError(f"unknown codec preset {name!r}; known presets: {sorted(PRESETS)}") from None


def pipeline(name: str, which: str, array: np.ndarray, model: ModelIdentity) -> Pipeline:
    """The pipeline preset ``name`` plans for the ``which`` ('k' or 'v') array."""
    p = preset(name)
    return (p.k if which == "k" else p.v)(array, model)
