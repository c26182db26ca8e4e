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
from zarr.codecs import BloscCodec, BytesCodec

from cachecard.codecs import planning
from cachecard.codecs.pipelines import Pipeline, Planner
from cachecard.errors import UnsupportedCodecError

if TYPE_CHECKING:
    from cachecard.manifest import ModelIdentity


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


def _shuffle_zstd(a: np.ndarray, _m: ModelIdentity) -> Pipeline:
    # Blosc is a core Zarr v3 codec: byte shuffle (by element size) + zstd in one, readable by any zarr.
    return Pipeline(BytesCodec(endian="little"),
                    (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(a.dtype).itemsize),))


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    PRESETS[preset.name] = preset
    return preset


_raw = fixed(lambda: BytesCodec(endian="little"))
register(Preset("lossless", "raw fp32/fp16/bf16, bit-exact", _raw, _raw, lossy=False))
register(Preset("zstd", "byte shuffle + zstd-3, bit-exact", _shuffle_zstd, _shuffle_zstd, lossy=False))


def _codec(module: str, name: str, **config: int) -> Planner:
    """A fixed pipeline of one cachecard codec, imported when planned (the codec modules import this one)."""
    def make() -> ArrayBytesCodec:
        import importlib

        return getattr(importlib.import_module(f"cachecard.codecs.{module}"), name)(**config)

    return fixed(make)


_q8 = _codec("q8_0", "Q8_0Codec")
_q4_0 = _codec("q4_0", "Q4_0Codec")
_q4_1 = _codec("q4_1", "Q4_1Codec")
_mlx4 = _codec("mlx_affine", "MLXAffineCodec", bits=4, group_size=64)
_mlx8 = _codec("mlx_affine", "MLXAffineCodec", bits=8, group_size=64)
_nf4 = _codec("nf4", "NF4Codec", block_size=64)
register(Preset("q8", "ggml q8_0 blocks for K and V (8.5 bits), llama.cpp-compatible", _q8, _q8))
register(Preset("q4_0", "ggml q4_0 blocks for K and V (4.5 bits), llama.cpp-compatible", _q4_0, _q4_0))
register(Preset("q4_1", "ggml q4_1 blocks for K and V (5 bits), llama.cpp-compatible", _q4_1, _q4_1))
register(Preset("q4", "MLX affine 4-bit, group 64, for K and V (4.5 bits at 16-bit scales)", _mlx4, _mlx4))
register(Preset("mlx8", "MLX affine 8-bit, group 64 (mlx-lm QuantizedKVCache default)", _mlx8, _mlx8))
register(Preset("nf4", "bitsandbytes NF4, block 64, for K and V (4.5 bits)", _nf4, _nf4))


_kivi2_k = _codec("kivi", "KiviCodec", bits=2, group_size=32, axis="channel")
_kivi2_v = _codec("kivi", "KiviCodec", bits=2, group_size=32, axis="token")
_kivi4_k = _codec("kivi", "KiviCodec", bits=4, group_size=32, axis="channel")
_kivi4_v = _codec("kivi", "KiviCodec", bits=4, group_size=32, axis="token")
_turbo = {b: _codec("turbo", "TurboCodec", bits=b, seed=0x5EED) for b in (2, 3, 4)}
register(Preset("kivi2", "KIVI 2-bit: K per channel over 32 tokens, V per token over 32 channels", _kivi2_k, _kivi2_v))
register(Preset("kivi4", "KIVI 4-bit: K per channel over 32 tokens, V per token over 32 channels", _kivi4_k, _kivi4_v))
for _b in (2, 3, 4):
    register(Preset(f"turbo{_b}", f"randomized Hadamard + {_b}-bit Lloyd-Max + fp16 gain, K and V (TurboQuant-MSE)",
                    _turbo[_b], _turbo[_b]))
register(Preset("polykv", "PolyKV's pairing: K q8_0, V rotation + 3-bit Lloyd-Max", _q8, _turbo[3]))


def _planned(kind: str, bits: float, **kw: object) -> Planner:
    """A data-planned pipeline from cachecard.codecs.planning."""
    def plan(array: np.ndarray, model: ModelIdentity) -> Pipeline:
        return getattr(planning, f"{kind}_at")(bits, **kw)(array, model)

    return plan


# Keys are more sensitive than values (bench/results/codecs.json), so they get the larger share of the rate.
for _name, _kb, _vb in (("frontier3.2", 3.8, 2.6), ("frontier2.8", 3.4, 2.2), ("frontier2.5", 3.1, 1.9),
                        ("frontier2.2", 2.8, 1.6)):
    register(Preset(_name, f"frontier codec planned to ~{_kb} bits/element for K (centered), ~{_vb} for V",
                    _planned("frontier", _kb, center=True), _planned("frontier", _vb, center=False)))
for _bits in (3.0, 2.5):
    register(Preset(f"gpu{_bits:g}", f"GPU-decodable: rotation + fixed-rate integer levels, centered keys, sinks and last "
                    f"32 tokens 8-bit, per-layer K/V rates planned to {_bits:g} bits/element (all bytes counted)",
                    _planned("rotq", _bits, which="k"), _planned("rotq", _bits, which="v")))
register(Preset("mixed3", "token-level mixed precision at 3 bits/element: sinks and last 32 tokens 8-bit, "
                "salient tokens 4-bit, the rest 2-bit", _planned("mixed", 3.0), _planned("mixed", 3.0)))


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
