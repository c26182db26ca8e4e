"""``cachecard.nf4``: bitsandbytes' NF4 blocks (spec/codecs/nf4.md).

Blocks of ``block_size`` consecutive channels: an fp32 ``absmax`` and one 4-bit code per element, the index of
the NF4 value nearest to ``x · (1 / absmax)`` (ties to the lower index, as bitsandbytes' ``argmin``). Codes are
packed two per byte, the first element in the high nibble (bitsandbytes' order). A chunk is all its codes
(C order of vector, channel), then all absmax values (float32, C order of vector, block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import field_validator

from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, expect_size, num_elements, require_multiple

if TYPE_CHECKING:
    import torch

# bitsandbytes functional.get_4bit_type("nf4"), as float32
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
_MID = (NF4[:-1] + NF4[1:]) / 2                                     # only to find the two candidates
_PAIRS = np.stack([NF4[np.arange(256) >> 4], NF4[np.arange(256) & 15]], axis=1)  # byte -> (first, second)
MAX_HALF_GAP = float(np.max(np.diff(NF4)) / 2)


class NF4Config(CodecConfig):
    block_size: int          # 32, 64, 128 or 256 channels per absmax

    @field_validator("block_size")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in (32, 64, 128, 256):
            raise ValueError("block_size must be 32, 64, 128 or 256")
        return v


def nf4_codes(s: np.ndarray) -> np.ndarray:
    """Index of the nearest NF4 value to each scaled element (float32 |s - c|, ties to the lower index)."""
    i = np.clip(np.searchsorted(_MID, s), 1, 14).astype(np.uint8)   # nearest is i - 1, i or i + 1
    lo, mid, hi = NF4[i - 1], NF4[i], NF4[i + 1]
    best = np.where(np.abs(s - lo) <= np.abs(s - mid), i - 1, i)
    best_d = np.abs(s - NF4[best])
    return np.where(np.abs(s - hi) < best_d, i + 1, best).astype(np.uint8)


class NF4Codec(KVCodec):
    codec_id = "cachecard.nf4"
    Config = NF4Config
    config: NF4Config

    @property
    def block(self) -> int:
        return self.config.block_size

    def check_head_dim(self, head_dim: int) -> None:
        require_multiple(self, head_dim, self.block)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        blocks = x.reshape(-1, self.block)
        absmax = np.abs(blocks).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(absmax == 0, np.float32(0), np.float32(1) / absmax)  # zero block -> code of 0.0
        q = nf4_codes(np.clip(blocks * inv, -1, 1)).reshape(-1, 2)
        return ((q[:, 0] << 4) | q[:, 1]).tobytes() + absmax.astype("<f4").tobytes()

    def _split(self, data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
        n = num_elements(shape)
        expect_size(self, data, n // 2 + n // self.block * 4)
        return data[: n // 2], data[n // 2:], n

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        codes, absmax, n = self._split(data, shape)
        scale = absmax.copy().view("<f4").reshape(-1, 1)
        out = np.take(_PAIRS, codes, axis=0).reshape(-1, self.block)  # np.take: far faster than [] here
        out *= scale
        return out.reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        n = num_elements(shape)
        expect_size(self, np.empty(data.numel(), np.uint8), n // 2 + n // self.block * 4)
        codes = data[: n // 2]
        scale = data[n // 2:].contiguous().view(torch.float32).reshape(-1, 1)
        q = torch.stack([codes >> 4, codes & 15], dim=1).long()
        out = torch.from_numpy(NF4).to(data.device)[q].reshape(-1, self.block)
        return (out * scale).reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        blocks = x.reshape(-1, self.block)
        absmax = np.abs(blocks).max(axis=1, keepdims=True)
        # half the widest gap of the table, plus float32 rounding of the scaling and the product
        bound = absmax * (MAX_HALF_GAP + 2.0**-20) + np.abs(blocks) * 2.0**-20
        return bound.reshape(x.shape).astype(np.float32)
