"""KV codecs (spec/codecs/): zarr v3 array-to-bytes codecs for card chunks, and named presets.

Importing this package registers every codec with zarr (``zarr.registry.register_codec``); the same codecs
are also declared as ``zarr.codecs`` entry points, so zarr finds them without this import.
"""

from zarr.registry import register_codec

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec
from cachecard.codecs.frontier import FrontierCodec
from cachecard.codecs.kivi import KiviCodec
from cachecard.codecs.mixed import MixedCodec
from cachecard.codecs.mlx_affine import MLXAffineCodec
from cachecard.codecs.nf4 import NF4Codec
from cachecard.codecs.presets import PRESETS, Pipeline, Preset, pipeline, preset
from cachecard.codecs.q4_0 import Q4_0Codec
from cachecard.codecs.q4_1 import Q4_1Codec
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.codecs.rotq import RotqCodec
from cachecard.codecs.turbo import TurboCodec

CODECS: dict[str, type[KVCodec]] = {}


def _register(*classes: type[KVCodec]) -> None:
    for cls in classes:
        CODECS[cls.codec_id] = cls
        register_codec(cls.codec_id, cls)


# compatibility codecs (bit-exact with a runtime), then ours
_register(Q8_0Codec, Q4_0Codec, Q4_1Codec, MLXAffineCodec, NF4Codec)
_register(KiviCodec, TurboCodec, MixedCodec, FrontierCodec, RotqCodec)

__all__ = ["CODECS", "ChunkContext", "CodecConfig", "KVCodec", "PRESETS", "Pipeline", "Preset", "pipeline", "preset"]
