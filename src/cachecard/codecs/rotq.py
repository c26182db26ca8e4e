"""``cachecard.rotq``: rotated fixed-rate integer quantization, decodable by whole-tensor ops on a GPU
(spec/codecs/rotq.md).

What storage alone allows (the frontier codec's per-channel key centering, randomized Hadamard rotation,
8-bit protected sinks and recent window, per-layer rates), at a fixed rate per layer so every vector's record
sits at an offset computed from four header fields: thousands of GPU threads index a chunk without a prefix
sum or an entropy decoder. Every rotated coordinate is a small integer level (a Lloyd-Max table scaled to
integers, or int8 for protected vectors), so the inverse Walsh-Hadamard transform of a record is an integer
vector that float32 computes exactly in any summation order (a ±1 matrix product on tensor cores included);
one float32 multiply by the vector's scale, one float32 add of the channel mean and one rounding cast follow.
numpy, torch and a fused kernel therefore agree to the bit.

Each vector's scale is the *unbiased* gain ``<u, u> / <u, c>`` (``u`` the rotated vector, ``c`` its levels)
rather than the least-squares one: the least-squares (projection) gain shrinks every vector by the
quantization error's share of its energy, which shrinks every attention logit and every value by the same
factor in every layer. Removing that bias halved the KL of 3-bit keys / 2-bit values on SmolLM2
(notes/codec.md).
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec
from cachecard.errors import KVShapeError, UnsupportedCodecError

if TYPE_CHECKING:
    import torch

VERSION = 1
HEADER = struct.Struct("<BBBBIIIfI")  # version, flags, bits, reserved, sink_end, recent_start, recent_end, ref, 0
MIN_DIM, MAX_DIM = 8, 1024

# Integer level tables (positive half; the negative half mirrors it): Lloyd-Max centroids for N(0, 1) times
# SCALE[b], rounded. Their distortion is within 0.3% of the real-valued tables'.
POSITIVE = {1: (1,), 2: (3, 10), 3: (4, 12, 22, 35), 4: (2, 6, 10, 15, 20, 25, 32, 43)}
SCALE = {1: 1.2533, 2: 6.62, 3: 16.3, 4: 15.58}  # level units per standard deviation (the encoder's start)
GAIN_ITERATIONS = 8
MAX_GAIN_RATIO = 2.0  # unbiased gain at most this times the least-squares gain (bounds the error)
MIN_REF = 2.0**-110  # below this a chunk is stored as zeros: no scale is ever subnormal

# log-coded scales (as cachecard.frontier): code 0 = zero vector, else fl(ref · FRAC[j]) · 2^k where
# code - 255 = 16 k + j, j in 0..15, k in -16..0
SCALE_STEPS = 16
FRAC = np.asarray([2 ** (j / SCALE_STEPS) for j in range(SCALE_STEPS)], dtype=np.float32)
_E = np.arange(256) - 255
_J = _E % SCALE_STEPS
_POW2 = np.ldexp(np.float32(1), _E // SCALE_STEPS).astype(np.float32)


class RotqConfig(CodecConfig):
    bits: int = Field(ge=1, le=4, description="bits per rotated coordinate of unprotected vectors")
    layer_bits: list[int] | None = Field(default=None, description="bits per layer (indexed by the chunk's layer)")
    center: bool = Field(description="subtract a per-channel mean over the chunk's unprotected tokens (keys)")
    sinks: int = Field(ge=0, le=1 << 20, description="leading tokens at positions < sinks are protected")
    recent: int = Field(ge=0, le=1 << 20, description="the card's last `recent` tokens are protected")
    seed: int = Field(ge=0, lt=2**63, description="seeds the ±1 signs of the rotation")


@lru_cache(maxsize=8)
def levels(bits: int) -> np.ndarray:
    """The 2^bits integer levels, ascending (int8); code i decodes to levels(bits)[i]."""
    pos = np.asarray(POSITIVE[bits], dtype=np.int8)
    out = np.concatenate([-pos[::-1], pos])
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def sylvester(dim: int) -> np.ndarray:
    """The Sylvester-Hadamard matrix of order ``dim`` (entries ±1, symmetric), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def scale_table(ref: np.float32) -> np.ndarray:
    """The 256 decoded scales of a chunk (float32): 0 for code 0, else fl(ref · FRAC[j]) · POW2[k]; the
    second product is exact, so any implementation gets the same bits."""
    out = (np.float32(ref) * FRAC)[_J]
    out *= _POW2
    out[0] = 0
    return out


def scale_codes(sigma: np.ndarray, ref: np.float32, *, up: bool) -> np.ndarray:
    """Log codes of scales ``sigma`` (float64) against ``ref``: the nearest, 0 (a zero vector) below the code
    range; or (``up``) the smallest whose scale is not below ``sigma``; 0 where ``sigma`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.log2(sigma / np.float64(ref)) * SCALE_STEPS
    e = np.ceil(e - 1e-9) if up else np.rint(e)
    code = np.where(np.isfinite(e), e + 255, 0)
    code = np.where(code < 1, int(up), np.minimum(code, 255))  # up: code 1 is still >= sigma
    code = np.where(sigma > 0, code, 0).astype(np.uint8)
    if up:  # float rounding of the table may still leave a scale a hair below sigma: take the next code
        table = scale_table(ref).astype(np.float64)
        low = (code > 0) & (code < 255) & (table[code] < sigma)
        code[low] += 1
    return code


def record_bytes(dim: int, bits: int) -> int:
    return dim * bits // 8


def protected_ranges(t: int, ctx: ChunkContext, sinks: int, recent: int) -> tuple[int, int, int]:
    """(sink_end, recent_start, recent_end): tokens [0, sink_end) and [recent_start, recent_end) are protected.

    Sinks are the chunk's leading run of tokens whose RoPE position is ``< sinks``; the recent window is the
    card's last ``recent`` real tokens that fall in the chunk. Without context nothing is protected."""
    valid = t if ctx.valid_tokens is None else min(t, ctx.valid_tokens)
    if not ctx.known:
        return 0, valid, valid
    a = 0
    if sinks and ctx.positions is not None:
        below = np.asarray(ctx.positions[:valid]) < sinks
        a = valid if below.all() else int(np.argmin(below))
    r0 = r1 = valid
    if recent and ctx.card_tokens is not None:
        r0 = min(max(ctx.card_tokens - recent - ctx.token_start, a), valid)
        r1 = min(max(ctx.card_tokens - ctx.token_start, r0), valid)
    return a, r0, r1


class RotqCodec(KVCodec):
    codec_id = "cachecard.rotq"
    Config = RotqConfig
    config: RotqConfig

    def check_config(self) -> None:
        bits = self.config.layer_bits
        if bits is not None and (not bits or any(b not in POSITIVE for b in bits)):
            raise UnsupportedCodecError(f"{self.codec_id}: layer_bits must be non-empty, each in 1..4; got {bits}")

    def check_head_dim(self, head_dim: int) -> None:
        if not MIN_DIM <= head_dim <= MAX_DIM or head_dim & (head_dim - 1):
            raise KVShapeError(f"codec {self.codec_id!r} rotates each vector with a Hadamard transform and packs "
                               f"whole bytes per vector, so head_dim must be a power of two in [{MIN_DIM}, {MAX_DIM}]; "
                               f"got {head_dim}. Use another preset for this model.")

    def bits_of(self, layer: int) -> int:
        bits = self.config.layer_bits
        if bits is None:
            return self.config.bits
        if layer >= len(bits):
            raise KVShapeError(f"{self.codec_id}: layer_bits has {len(bits)} entries; no rate for layer {layer}")
        return bits[layer]

    def payload_size(self, shape: tuple[int, ...], bits: int, protected: int, centered: bool) -> int:
        *_, t, d = shape
        g = math.prod(shape[:-2])
        return (HEADER.size + (2 * g * d if centered else 0) + g * protected * d
                + g * (t - protected) * record_bytes(d, bits) + g * t)

    # -- encode ---------------------------------------------------------------------------------------------
    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        from cachecard.codecs import _rotq_encode as enc

        cfg = self.config
        *_, t, d = x.shape
        x = x.reshape(-1, t, d)
        a, r0, r1 = protected_ranges(t, ctx, cfg.sinks, cfg.recent)
        bits = self.bits_of(ctx.layer if ctx.known else 0)
        valid = t if ctx.valid_tokens is None else min(t, ctx.valid_tokens)
        return enc.encode(x, bits=bits, ranges=(a, r0, r1), valid=valid, center=cfg.center, seed=cfg.seed)

    # -- decode ---------------------------------------------------------------------------------------------
    def _layout(self, head: bytes, size: int, shape: tuple[int, ...]) -> tuple[int, int, int, int, bool, float]:
        """Validated (bits, sink_end, recent_start, recent_end, centered, ref) of a chunk header."""
        if size < HEADER.size:
            raise self.payload_error(f"payload of {size} bytes is shorter than the {HEADER.size}-byte header")
        version, flags, bits, reserved, a, r0, r1, ref, zero = HEADER.unpack(head)
        t = shape[-2]
        if version != VERSION or flags & ~1 or reserved or zero or bits not in POSITIVE:
            raise self.payload_error(f"unknown chunk version {version}, flags {flags} or bits {bits}")
        if not a <= r0 <= r1 <= t or not np.isfinite(ref) or ref < 0:
            raise self.payload_error(f"protected ranges [0, {a}) and [{r0}, {r1}) or scale {ref} do not fit "
                                     f"a chunk of {t} tokens")
        want = self.payload_size(shape, bits, a + r1 - r0, bool(flags & 1))
        if size != want:
            raise self.payload_error(f"payload has {size} bytes, its header implies {want}")
        return bits, a, r0, r1, bool(flags & 1), ref

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return self._decode_host(data, shape, None)

    def decode_chunk(self, data: np.ndarray, shape: tuple[int, ...], storage: np.dtype) -> np.ndarray:
        """As the base class (decode, then round to the storage type), with the cast fused into the decode."""
        return self._decode_host(data, tuple(shape), np.dtype(storage))

    def _decode_host(self, data: np.ndarray, shape: tuple[int, ...], storage: np.dtype | None) -> np.ndarray:
        from cachecard.codecs import _rotq_decode as dec

        data = np.ascontiguousarray(data, np.uint8)  # the 3-bit unpacking reads it as a strided buffer
        self.check_head_dim(shape[-1])
        layout = self._layout(data[:HEADER.size].tobytes(), data.size, shape)
        return dec.decode_numpy(data, shape, layout, self.config.seed, storage)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Whole-tensor torch ops on ``data.device`` (only the 24-byte header is read on the host): bit-identical
        to :meth:`decode_array`."""
        from cachecard.codecs import _rotq_decode as dec

        self.check_head_dim(shape[-1])
        layout = self._layout(data[:HEADER.size].cpu().numpy().tobytes(), data.numel(), shape)
        return dec.decode_torch(data, shape, layout, self.config.seed)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        # Per vector: ||x̂ - x|| <= (1 + MAX_GAIN_RATIO · 2^(1/32)) ||z|| for unprotected vectors (levels no
        # longer than the projection, a gain at most MAX_GAIN_RATIO times it, a log-coded scale) and less for
        # protected ones; z = x minus the chunk's channel mean, ||mean|| <= the chunk's largest vector norm.
        *_, t, d = x.shape
        v = x.reshape(-1, t, d).astype(np.float64)
        norms = np.sqrt((v**2).sum(-1, keepdims=True))
        m = norms.max(axis=(0, 1), keepdims=True) if self.config.center else 0
        factor = 1 + MAX_GAIN_RATIO * 2 ** (1 / 32)
        bound = (norms + m) * (1 + 2.0**-9) * factor * (1 + 1e-5) + 1e-30
        return np.broadcast_to(bound, v.shape).reshape(x.shape).astype(np.float32)
