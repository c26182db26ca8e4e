"""``cachecard.q4_0``: ggml's Q4_0 blocks, bit-exact (spec/codecs/q4_0.md).

Blocks of 32 consecutive channels: an fp16 scale ``d = m / -8`` (``m`` the element of largest magnitude, sign
kept) and 32 4-bit codes ``min(15, trunc(x / d + 8.5))``; byte ``j`` holds element ``j`` in its low nibble and
element ``j + 16`` in its high nibble. A chunk is its blocks in C order, 18 bytes each: the bytes llama.cpp
keeps in a q4_0 KV cache row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, expect_size, num_elements, require_multiple

if TYPE_CHECKING:
    import torch

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2


class Q4_0Config(CodecConfig):
    """No parameters: the block size (32) and scale type (fp16) are fixed by ggml."""


class Q4_0Codec(KVCodec):
    codec_id = "cachecard.q4_0"
    Config = Q4_0Config

    def check_head_dim(self, head_dim: int) -> None:
        require_multiple(self, head_dim, BLOCK)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        blocks = x.reshape(-1, BLOCK)
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # first max wins, as ggml
        d = m / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)
        out = np.empty((blocks.shape[0], BLOCK_BYTES), np.uint8)
        out[:, :2] = d.astype("<f2").view(np.uint8)
        out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
        return out.tobytes()

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        n = num_elements(shape)
        expect_size(self, data, n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        qs = blocks[:, 2:]
        out = np.empty((blocks.shape[0], 2, 16), np.float32)
        np.bitwise_and(qs, 15, out=out[:, 0], casting="unsafe")     # elements 0..15
        np.right_shift(qs, 4, out=out[:, 1], casting="unsafe")      # elements 16..31
        out -= 8
        out *= d[:, :, None]
        return out.reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        n = num_elements(shape)
        expect_size(self, np.empty(data.numel(), np.uint8), n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        qs = blocks[:, 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=1).float() - 8
        return (q * d).reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        blocks = x.reshape(-1, BLOCK)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 8
        # a full step where the code clips at 15 (x = -m), half a step elsewhere; fp16 d; float32 rounding
        bound = d + 8 * np.maximum(d * 2.0**-11, 2.0**-25) + np.abs(blocks) * 2.0**-20
        return np.broadcast_to(bound, blocks.shape).reshape(x.shape).astype(np.float32)
