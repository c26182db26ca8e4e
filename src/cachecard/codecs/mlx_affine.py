"""``cachecard.mlx_affine``: MLX affine quantization, bit-exact with ``mx.quantize`` (spec/codecs/mlx_affine.md).

Groups of ``group_size`` channels get a scale and a bias in the chunk's element type and ``bits``-bit codes
packed into uint32 words as a little-endian bit stream. Payload: a 4-byte header (element type of the scales,
bits, group size), then every packed word, every scale, every bias, each in C order of (vector, word or group):
exactly the ``(packed, scales, biases)`` triple mlx-lm's ``QuantizedKVCache`` holds, so an MLX adapter hands
the three views over without requantizing. Decoding reproduces ``mx.dequantize`` (its two roundings to the
element type included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from pydantic import field_validator

from cachecard.codecs.base import (NO_CONTEXT, ChunkContext, CodecConfig, KVCodec, expect_size, num_elements,
                                   require_multiple, to_float32)
from cachecard.errors import KVShapeError

if TYPE_CHECKING:
    import torch

# scale/bias element types, by the header's first byte
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2
SCALE_TYPES = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2"), BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
HEADER = 4
EPS = np.float32(1e-7)  # MLX's floor on the scale

# byte -> the codes it holds, as float32 (2- and 4-bit codes never straddle bytes)
_BYTE_CODES = {b: ((np.arange(256)[:, None] >> np.arange(0, 8, b)) & ((1 << b) - 1)).astype(np.float32)
               for b in (2, 4)}


class MLXAffineConfig(CodecConfig):
    bits: int                # 2, 3, 4, 5, 6 or 8 (mx.quantize's affine bits)
    group_size: int          # 32, 64 or 128

    @field_validator("bits", "group_size")
    @classmethod
    def _supported(cls, v: int, info) -> int:  # type: ignore[no-untyped-def]
        allowed = (2, 3, 4, 5, 6, 8) if info.field_name == "bits" else (32, 64, 128)
        if v not in allowed:
            raise ValueError(f"MLX supports {allowed}")
        return v


def scale_type_of(storage: np.dtype) -> int:
    """The header code of a chunk's element type (bfloat16 is stored as uint16 bits)."""
    dt = np.dtype(storage).newbyteorder("<") if np.dtype(storage).byteorder == ">" else np.dtype(storage)
    if dt in (np.dtype("<u2"), np.dtype(ml_dtypes.bfloat16)):
        return BFLOAT16
    if dt == np.dtype("<f2"):
        return FLOAT16
    if dt == np.dtype("<f4"):
        return FLOAT32
    raise KVShapeError(f"cachecard.mlx_affine stores float32, float16 or bfloat16 chunks; got {storage}")


def affine_params(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's float32 scale and bias of each group (rows of ``groups``), before rounding to the element type."""
    n_bins = np.float32((1 << bits) - 1)
    w_max = groups.max(axis=-1, keepdims=True)
    w_min = groups.min(axis=-1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, EPS)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nz = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nz, edge / q0, scale)   # the edge lands exactly on code q0: zero is representable
    return scale, np.where(nz, edge, np.float32(0))


def round_bf16(x: np.ndarray) -> None:
    """Round float32 ``x`` in place to bfloat16 precision (nearest even; on the bit pattern, as ml_dtypes)."""
    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    u += r
    u &= 0xFFFF0000


def round_f16(x: np.ndarray) -> None:
    """Round float32 ``x`` in place to float16 precision (nearest even), for |x| <= 65504. numpy's float16
    cast is slow, so: add and subtract 1.5 · 2^(e + 13) (at least 0.75, the subnormal step 2^-24), where the
    float32 spacing is the float16 spacing of ``x``; then restore the sign of a zero."""
    magic = (x.view(np.uint32) & 0x7F800000).view(np.float32)    # 2^e
    magic *= np.float32(1.5 * 2**13)
    np.maximum(magic, np.float32(0.75), out=magic)
    y = x + magic
    y -= magic
    np.copysign(y, x, out=x)


def _round_f16_by_cast(x: np.ndarray) -> None:
    x[...] = x.astype(np.float16)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (multiple of 8 per row) -> little-endian bit stream: each 8 codes fill ``bits`` bytes."""
    eights = codes.reshape(-1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    return np.bitwise_or.reduce(eights, axis=1).view(np.uint8).reshape(-1, 8)[:, :bits]


def unpack_codes(data: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`, flat, as float32."""
    if bits == 8:
        return data.astype(np.float32)
    if bits in _BYTE_CODES:
        return np.take(_BYTE_CODES[bits], data, axis=0).reshape(-1)
    padded = np.zeros((data.size // bits, 8), np.uint8)
    padded[:, :bits] = data.reshape(-1, bits)
    words = padded.view("<u8")                                  # (M, 1)
    codes = (words >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return codes.astype(np.float32).reshape(-1)


class MLXAffineCodec(KVCodec):
    codec_id = "cachecard.mlx_affine"
    Config = MLXAffineConfig
    config: MLXAffineConfig

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def group(self) -> int:
        return self.config.group_size

    def check_head_dim(self, head_dim: int) -> None:
        require_multiple(self, head_dim, self.group)

    def encode_chunk(self, x: np.ndarray, ctx: ChunkContext = NO_CONTEXT) -> bytes:
        # scales and biases take the chunk's element type, as mx.quantize gives them
        self.check_head_dim(x.shape[-1])
        return self.encode_array(to_float32(x), ctx, scale_type=scale_type_of(x.dtype))

    def encode_array(self, x: np.ndarray, ctx: ChunkContext, scale_type: int = FLOAT32) -> bytes:
        bits, dtype = self.bits, SCALE_TYPES[scale_type]
        groups = x.reshape(-1, x.shape[-1] // self.group, self.group)
        scale, bias = affine_params(groups, bits)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((groups - bias) / scale), 0, (1 << bits) - 1).astype(np.uint8)
        header = np.array([scale_type, bits], np.uint8).tobytes() + np.array([self.group], "<u2").tobytes()
        return (header + pack_codes(q, bits).tobytes() + scale.astype(dtype).tobytes()
                + bias.astype(dtype).tobytes())

    def _layout(self, head: bytes, size: int, shape: tuple[int, ...]) -> tuple[np.dtype, int, int]:
        """Element type of the scales, bytes of codes, groups; checks header and payload size."""
        n = num_elements(shape)
        if size < HEADER:
            raise self.payload_error(f"payload has {size} bytes, shorter than its header")
        bits, group = head[1], int.from_bytes(head[2:4], "little")
        if head[0] not in SCALE_TYPES or (bits, group) != (self.bits, self.group):
            raise self.payload_error(f"header {head[:HEADER].hex()} does not match bits={self.bits}, "
                                     f"group_size={self.group}")
        dtype, groups = SCALE_TYPES[head[0]], n // self.group
        code_bytes = n * bits // 8
        expect_size(self, np.empty(size, np.uint8), HEADER + code_bytes + 2 * groups * dtype.itemsize)
        return dtype, code_bytes, groups

    def split(self, data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A chunk payload (uint8) of ``shape`` (..., D) as the ``(packed, scales, biases)`` views mlx-lm's
        ``QuantizedKVCache`` holds: uint32 ``(..., D·bits/32)`` and ``(..., D/group_size)`` of the element type
        (bfloat16 as ``ml_dtypes.bfloat16``). Checks the header and the size, as decoding does."""
        dtype, code_bytes, groups = self._layout(bytes(data[:HEADER]), data.size, shape)
        lead = tuple(shape[:-1])
        body = data[HEADER:].copy()  # one aligned copy; the three arrays are views of it
        packed = body[:code_bytes].view("<u4").reshape(*lead, -1)
        sb = body[code_bytes:].view(dtype).reshape(2, *lead, -1)
        return packed, sb[0], sb[1]

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        dtype, code_bytes, groups = self._layout(bytes(data[:HEADER]), data.size, shape)
        end = HEADER + code_bytes
        sb = data[end:].copy().view(dtype).astype(np.float32).reshape(2, groups, 1)
        out = unpack_codes(data[HEADER:end], self.bits).reshape(groups, self.group)
        out *= sb[0]
        if dtype.itemsize == 4:
            out += sb[1]
        else:  # mx.dequantize in a 16-bit type rounds s·q, then s·q + b, to that type
            rnd = round_f16 if dtype == np.dtype("<f2") else round_bf16
            if dtype == np.dtype("<f2") and np.any(np.abs(sb[0]) * ((1 << self.bits) - 1) + np.abs(sb[1]) > 65504):
                rnd = _round_f16_by_cast                        # results may overflow float16: cast instead
            rnd(out)
            out += sb[1]
            rnd(out)
        return out.reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        dtype, code_bytes, groups = self._layout(data[:HEADER].cpu().numpy().tobytes(), data.numel(), shape)
        tdtype = {4: torch.float32, 2: torch.float16 if dtype == np.dtype("<f2") else torch.bfloat16}[dtype.itemsize]
        bits, end = self.bits, HEADER + code_bytes
        packs = data[HEADER:end].reshape(-1, bits).long()         # each `bits` bytes hold 8 codes
        words = (packs << (torch.arange(bits, device=data.device) * 8)).sum(dim=1, keepdim=True)
        codes = (words >> (torch.arange(8, device=data.device) * bits)) & ((1 << bits) - 1)
        sb = data[end:].contiguous().view(tdtype).reshape(2, groups, 1)
        out = codes.reshape(groups, self.group).to(tdtype) * sb[0]   # rounds s·q to the element type
        return (out + sb[1]).float().reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        groups = x.reshape(-1, x.shape[-1] // self.group, self.group)
        scale, bias = affine_params(groups, self.bits)
        s, b, u = np.abs(scale), np.abs(bias), 2.0**-8   # u: bfloat16's unit roundoff, the coarsest type
        # one step (clipping at the far end when the scale shrank to put the edge on a code); the scale, bias
        # and the two decode results rounded to the element type; fp16 subnormals
        bound = s + 4 * u * (np.abs(groups) + b + 2 * s) + 2.0**-22
        return bound.reshape(x.shape).astype(np.float32)
