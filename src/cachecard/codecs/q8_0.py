"""``cachecard.q8_0``: ggml's Q8_0 blocks, bit-exact (spec/codecs/q8_0.md).

Blocks of 32 consecutive channels: an fp16 scale ``d = amax / 127`` and 32 int8 codes ``round(x / d)``
(rounding half away from zero, as ggml's ``roundf``). A chunk is its blocks in C order, 34 bytes each: the
very bytes llama.cpp keeps in a q8_0 KV cache row, so its adapter can copy them without requantizing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, expect_size, num_elements, require_multiple

if TYPE_CHECKING:
    import torch

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf`` as ggml's Python reference (gguf.quants.np_roundf) computes it, bit for bit."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


class Q8_0Config(CodecConfig):
    """No parameters: the block size (32) and scale type (fp16) are fixed by ggml."""


class Q8_0Codec(KVCodec):
    codec_id = "cachecard.q8_0"
    Config = Q8_0Config

    def check_head_dim(self, head_dim: int) -> None:
        require_multiple(self, head_dim, BLOCK)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        blocks = x.reshape(-1, BLOCK)
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = round_half_away(blocks * inv).astype(np.int8)
        out = np.empty((blocks.shape[0], BLOCK_BYTES), np.uint8)
        out[:, :2] = d.astype("<f2").view(np.uint8)
        out[:, 2:] = q.view(np.uint8)
        return out.tobytes()

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        n = num_elements(shape)
        expect_size(self, data, n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        n = num_elements(shape)
        expect_size(self, np.empty(data.numel(), np.uint8), n // BLOCK * BLOCK_BYTES)
        blocks = data.reshape(-1, BLOCK_BYTES)
        import torch

        d = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        blocks = x.reshape(-1, BLOCK)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d / 2 + 127 * np.maximum(d * 2.0**-11, 2.0**-25) + np.abs(blocks) * 2.0**-20
        return np.broadcast_to(bound, blocks.shape).reshape(x.shape).astype(np.float32)
