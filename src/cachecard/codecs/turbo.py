"""``cachecard.turbo``: randomized Hadamard rotation + per-vector scale + Lloyd-Max codes (spec/codecs/turbo.md).

TurboQuant-MSE / PolyKV's value codec. Each vector is rotated (so its coordinates are close to Gaussian
whatever the channel outliers), normalised to unit RMS, and every coordinate is replaced by the nearest
Lloyd-Max centroid for N(0, 1). The stored scale is the least-squares gain of the centroid vector, so the
reconstruction is the projection of the rotated vector onto it: never worse than storing the norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from cachecard.codecs import _bitpack as bitpack, _hadamard as hadamard, _lloyd_max as lloyd_max
from cachecard.codecs.base import (
    ChunkContext, CodecConfig, KVCodec, as_rows, expect_size, num_elements, require_power_of_two,
)
from cachecard.errors import KVShapeError

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


class TurboConfig(CodecConfig):
    bits: int = Field(ge=1, le=4, description="bits per coordinate (Lloyd-Max table)")
    seed: int = Field(ge=0, lt=2**63, description="seeds the ±1 signs of the rotation")


class TurboCodec(KVCodec):
    codec_id = "cachecard.turbo"
    Config = TurboConfig
    config: TurboConfig

    def check_head_dim(self, head_dim: int) -> None:
        require_power_of_two(self, head_dim)

    def _sizes(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        d = shape[-1]
        n = num_elements(shape) // d
        return n, d, bitpack.packed_size(d, self.config.bits)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        rows, _ = as_rows(x)
        n, d = rows.shape
        bits = self.config.bits
        y = hadamard.forward(rows, self.config.seed)
        norm = np.sqrt(np.einsum("nd,nd->n", y, y, dtype=np.float32))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(norm[:, None] > 0, y * (np.float32(np.sqrt(d)) / norm[:, None]), np.float32(0))
        codes = np.searchsorted(lloyd_max.boundaries(bits), u, side="right").astype(np.uint8)
        c = lloyd_max.centroids(bits)[codes]
        gain = np.einsum("nd,nd->n", u, c, dtype=np.float32) / np.einsum("nd,nd->n", c, c, dtype=np.float32)
        scale = gain * norm / np.float32(np.sqrt(d))
        if np.any(np.abs(scale) > FP16_MAX):
            raise KVShapeError(f"{self.codec_id}: a vector's scale exceeds the float16 range (|scale| > 65504); "
                               "store this cache with a lossless preset")
        return scale.astype("<f2").tobytes() + bitpack.pack(codes, bits).tobytes()

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        n, d, row_bytes = self._sizes(shape)
        expect_size(self, data, n * (2 + row_bytes))
        scale = data[: 2 * n].copy().view("<f2").astype(np.float32)
        codes = bitpack.unpack(data[2 * n:].reshape(n, row_bytes), self.config.bits, d)
        y = lloyd_max.centroids(self.config.bits)[codes] * scale[:, None]
        return hadamard.inverse(y, self.config.seed).reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        n, d, row_bytes = self._sizes(shape)
        if data.numel() != n * (2 + row_bytes):
            raise self.payload_error(f"payload has {data.numel()} bytes, expected {n * (2 + row_bytes)}")
        scale = data[: 2 * n].clone().view(torch.float16).float()  # clone: a slice may sit at an odd offset
        codes = bitpack.unpack_torch(data[2 * n:].reshape(n, row_bytes), self.config.bits, d)
        table = torch.from_numpy(lloyd_max.centroids(self.config.bits).copy()).to(data.device)
        y = table[codes] * scale[:, None]
        return hadamard.inverse_torch(y, self.config.seed).reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        # The reconstruction is a projection of the rotated vector (plus float16 rounding of its gain), so
        # the error vector is never longer than the vector itself.
        rows, shape = as_rows(x)
        norm = np.sqrt(np.sum(rows.astype(np.float64) ** 2, axis=1, keepdims=True))
        return np.broadcast_to(norm * (1 + 2.0**-9) + 1e-30, rows.shape).reshape(shape).astype(np.float32)
