"""``cachecard.q4_1``: ggml's Q4_1 blocks, bit-exact (spec/codecs/q4_1.md).

Blocks of 32 consecutive channels: fp16 ``d = (max - min) / 15``, fp16 ``m = min`` and 32 4-bit codes
``min(15, trunc((x - min) / d + 0.5))``, nibbles ordered as in Q4_0 (element ``j`` low, ``j + 16`` high). A
chunk is its blocks in C order, 20 bytes each: the bytes llama.cpp keeps in a q4_1 KV cache row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, expect_size, num_elements, require_multiple

if TYPE_CHECKING:
    import torch

BLOCK = 32
BLOCK_BYTES = 4 + BLOCK // 2


class Q4_1Config(CodecConfig):
    """No parameters: the block size (32) and scale types (fp16) are fixed by ggml."""


class Q4_1Codec(KVCodec):
    codec_id = "cachecard.q4_1"
    Config = Q4_1Config

    def check_head_dim(self, head_dim: int) -> None:
        require_multiple(self, head_dim, BLOCK)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        blocks = x.reshape(-1, BLOCK)
        hi = blocks.max(axis=1, keepdims=True)
        lo = blocks.min(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.minimum(np.trunc((blocks - lo) * inv + np.float32(0.5)), 15).astype(np.uint8)
        out = np.empty((blocks.shape[0], BLOCK_BYTES), np.uint8)
        out[:, :2] = d.astype("<f2").view(np.uint8)
        out[:, 2:4] = lo.astype("<f2").view(np.uint8)
        out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
        return out.tobytes()

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        n = num_elements(shape)
        expect_size(self, data, n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        dm = blocks[:, :4].copy().view("<f2").astype(np.float32)[:, :, None]
        qs = blocks[:, 4:]
        out = np.empty((blocks.shape[0], 2, 16), np.float32)
        np.bitwise_and(qs, 15, out=out[:, 0], casting="unsafe")     # elements 0..15
        np.right_shift(qs, 4, out=out[:, 1], casting="unsafe")      # elements 16..31
        out *= dm[:, :1]                             # d·q, then + m: two roundings, as ggml (no fma)
        out += dm[:, 1:]
        return out.reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        n = num_elements(shape)
        expect_size(self, np.empty(data.numel(), np.uint8), n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        dm = blocks[:, :4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=1).float()
        return (q * dm[:, :1] + dm[:, 1:]).reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        blocks = x.reshape(-1, BLOCK)
        lo = blocks.min(axis=1, keepdims=True)
        d = (blocks.max(axis=1, keepdims=True) - lo) / 15
        # half a step; fp16 d (15 steps) and m; float32 rounding
        bound = (d / 2 + 16 * np.maximum(d * 2.0**-11, 2.0**-25) + np.maximum(np.abs(lo) * 2.0**-11, 2.0**-25)
                 + (np.abs(blocks) + d) * 2.0**-20)
        return bound.reshape(x.shape).astype(np.float32)
