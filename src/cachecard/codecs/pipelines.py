"""A chunk pipeline of a card array, and the planner type that makes one (spec/codecs/README.md "Presets").

Both ``presets`` (named pipelines) and ``planning`` (pipelines planned from the data) build on this module,
so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
from zarr.codecs import Crc32cCodec

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


__all__ = ["Pipeline", "Planner"]
