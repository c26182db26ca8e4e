"""``cachecard.kivi``: asymmetric (min/max) integer quantization in groups along tokens or channels
(spec/codecs/kivi.md).

KIVI's insight: keys have outlier *channels*, so quantize keys per channel over a group of tokens, and values
per token over a group of channels. Each group stores an fp16 step and an fp16 minimum; codes are
``round((x - min) / step)`` with round-half-to-even, clamped to ``[0, 2^bits - 1]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from cachecard.codecs import _bitpack as bitpack
from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, expect_size, num_elements, require_multiple
from cachecard.errors import KVShapeError, UnsupportedCodecError

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


class KiviConfig(CodecConfig):
    bits: int = Field(ge=1, le=8)
    group_size: int = Field(ge=1, le=4096)
    axis: Literal["token", "channel"] = Field(description="token: groups of channels of one vector; "
                                                          "channel: groups of tokens of one channel")


def _groups(x: np.ndarray, cfg: KiviConfig) -> np.ndarray:
    """View a (…, T, D) chunk as (groups, group_size) with ragged token groups padded by edge values."""
    *lead, t, d = x.shape
    x = x.reshape(-1, t, d)
    g = cfg.group_size
    if cfg.axis == "token":
        return x.reshape(-1, d // g, g).reshape(-1, g)
    pad = -t % g
    if pad:
        x = np.concatenate([x, np.repeat(x[:, -1:], pad, axis=1)], axis=1)
    # (n, T', D) -> (n, T'/g, g, D) -> (n, T'/g, D, g)
    return x.reshape(x.shape[0], -1, g, d).transpose(0, 1, 3, 2).reshape(-1, g)


def _ungroup(q: np.ndarray, shape: tuple[int, ...], cfg: KiviConfig) -> np.ndarray:
    *lead, t, d = shape
    g = cfg.group_size
    if cfg.axis == "token":
        return q.reshape(shape)
    n = num_elements(shape) // (t * d)
    tp = t + (-t % g)
    return q.reshape(n, tp // g, d, g).transpose(0, 1, 3, 2).reshape(n, tp, d)[:, :t].reshape(shape)


class KiviCodec(KVCodec):
    codec_id = "cachecard.kivi"
    Config = KiviConfig
    config: KiviConfig

    def check_config(self) -> None:
        if self.config.bits not in (1, 2, 3, 4, 8):
            raise UnsupportedCodecError(f"{self.codec_id}: bits must be 1, 2, 3, 4 or 8; got {self.config.bits}")

    def check_head_dim(self, head_dim: int) -> None:
        if self.config.axis == "token":
            require_multiple(self, head_dim, self.config.group_size)

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(number of groups, payload bytes)."""
        *_, t, d = shape
        n = num_elements(shape) // max(1, t * d) if t * d else 0
        g = self.config.group_size
        groups = n * t * (d // g) if self.config.axis == "token" else n * d * -(-t // g)
        return groups, 4 * groups + bitpack.packed_size(num_elements(shape), self.config.bits)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        cfg = self.config
        groups = _groups(x, cfg)
        levels = np.float32(2**cfg.bits - 1)
        lo, hi = groups.min(axis=1), groups.max(axis=1)
        step = (hi - lo) / levels
        if np.any(step > FP16_MAX) or np.any(np.abs(lo) > FP16_MAX):
            raise KVShapeError(f"{self.codec_id}: values exceed the float16 range of its scales; use a lossless preset")
        s16, m16 = step.astype("<f2"), lo.astype("<f2")
        s, m = s16.astype(np.float32)[:, None], m16.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint((groups - m) / s), 0)
        q = np.clip(q, 0, levels).astype(np.uint8)
        codes = _ungroup(q, x.shape, cfg).reshape(1, -1)
        return s16.tobytes() + m16.tobytes() + bitpack.pack(codes, cfg.bits).tobytes()

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        ngroups, size = self._layout(shape)
        expect_size(self, data, size)
        s = data[: 2 * ngroups].copy().view("<f2").astype(np.float32)
        m = data[2 * ngroups: 4 * ngroups].copy().view("<f2").astype(np.float32)
        codes = bitpack.unpack(data[4 * ngroups:].reshape(1, -1), self.config.bits, num_elements(shape))
        q = _groups(codes.reshape(shape).astype(np.float32), self.config)
        return _ungroup(q * s[:, None] + m[:, None], shape, self.config)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        ngroups, size = self._layout(shape)
        if data.numel() != size:
            raise self.payload_error(f"payload has {data.numel()} bytes, expected {size}")
        s = data[: 2 * ngroups].contiguous().view(torch.float16).float()
        m = data[2 * ngroups: 4 * ngroups].contiguous().view(torch.float16).float()
        q = bitpack.unpack_torch(data[4 * ngroups:].reshape(1, -1), self.config.bits, num_elements(shape)).float()
        *_, t, d = shape
        g = self.config.group_size
        if self.config.axis == "token":
            return (q.reshape(-1, g) * s[:, None] + m[:, None]).reshape(shape)
        n = num_elements(shape) // (t * d)
        tp = t + (-t % g)
        q = q.reshape(n, t, d)
        if tp != t:
            q = torch.cat([q, q[:, -1:].expand(n, tp - t, d)], 1)
        q = q.reshape(n, tp // g, g, d).permute(0, 1, 3, 2).reshape(-1, g)
        out = (q * s[:, None] + m[:, None]).reshape(n, tp // g, d, g).permute(0, 1, 3, 2).reshape(n, tp, d)
        return out[:, :t].reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        groups = _groups(x.astype(np.float64), self.config)
        levels = 2**self.config.bits - 1
        lo, hi = groups.min(axis=1), groups.max(axis=1)
        step = (hi - lo) / levels
        r16 = lambda v: np.maximum(np.abs(v) * 2.0**-11, 2.0**-25)  # noqa: E731 - float16 rounding error
        b = step / 2 + r16(step) * (levels + 1) + r16(lo) + 2.0**-21 * (np.abs(lo) + levels * step)
        return _ungroup(np.broadcast_to(b[:, None], groups.shape), x.shape, self.config).astype(np.float32)
