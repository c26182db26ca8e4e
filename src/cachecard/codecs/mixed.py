"""``cachecard.mixed``: token-level mixed precision at a fixed rate (spec/codecs/mixed.md).

QKVShare / ZipCache style: each token of a chunk gets one of three rates, recorded in a per-token rate map —
8 bits (int8 codes of the rotated vector) for attention sinks and the recent window, ``salient_bits`` for
the most salient tokens by vector norm, ``base_bits`` for the rest (Lloyd-Max codes of ``cachecard.turbo``).
The rate is fixed per class, so a preset can meet a bits-per-element budget exactly (``plan_fraction``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from cachecard.codecs import _bitpack as bitpack, _hadamard as hadamard, _tokens as tokens
from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, require_power_of_two
from cachecard.codecs.turbo import TurboCodec

if TYPE_CHECKING:
    import torch

PROTECTED, SALIENT, BASE = 2, 1, 0


class MixedConfig(CodecConfig):
    base_bits: int = Field(ge=1, le=4)
    salient_bits: int = Field(ge=1, le=4)
    salient: float = Field(ge=0, le=1, description="fraction of non-protected tokens at salient_bits")
    sinks: int = Field(ge=0, le=1 << 20)
    recent: int = Field(ge=0, le=1 << 20)
    seed: int = Field(ge=0, lt=2**63)


def class_bytes(cls: int, d: int, cfg: MixedConfig) -> int:
    """Stored bytes of one vector of a class."""
    if cls == PROTECTED:
        return 2 + d
    return 2 + bitpack.packed_size(d, cfg.salient_bits if cls == SALIENT else cfg.base_bits)


def plan_fraction(budget_bits: float, d: int, tokens_: int, protected_tokens: int, cfg: MixedConfig) -> float:
    """The salient fraction whose expected rate meets ``budget_bits`` per element (clipped to [0, 1])."""
    rest = max(tokens_ - protected_tokens, 1)
    fixed = protected_tokens * class_bytes(PROTECTED, d, cfg) + rest * class_bytes(BASE, d, cfg)
    extra = rest * (class_bytes(SALIENT, d, cfg) - class_bytes(BASE, d, cfg))
    want = budget_bits / 8 * d * tokens_
    return float(np.clip((want - fixed) / extra, 0, 1)) if extra > 0 else 0.0


class MixedCodec(KVCodec):
    codec_id = "cachecard.mixed"
    Config = MixedConfig
    config: MixedConfig

    def check_head_dim(self, head_dim: int) -> None:
        require_power_of_two(self, head_dim)

    def _turbo(self, cls: int) -> TurboCodec:
        bits = self.config.salient_bits if cls == SALIENT else self.config.base_bits
        return TurboCodec(bits=bits, seed=self.config.seed)

    def _classes(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        cfg = self.config
        prot = tokens.protected(x, ctx, sinks=cfg.sinks, recent=cfg.recent, salient=0)
        sal = tokens.protected(np.where(prot[None, :, None], 0, x), ctx, sinks=0, recent=0, salient=cfg.salient)
        return np.where(prot, PROTECTED, np.where(sal & ~prot, SALIENT, BASE)).astype(np.uint8)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        *_, t, d = x.shape
        x = x.reshape(-1, t, d)
        cls = self._classes(x, ctx)
        parts = [bitpack.pack(cls[None, :], 2).tobytes()]
        for c in (PROTECTED, SALIENT, BASE):
            rows = x[:, cls == c].reshape(-1, d)
            if c == PROTECTED:
                parts.append(tokens.encode_protected(hadamard.forward(rows, self.config.seed)))
            elif rows.size:
                parts.append(self._turbo(c).encode_array(rows, ctx))
        return b"".join(parts)

    def _split(self, data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int, list[np.ndarray]]:
        *_, t, d = shape
        g = int(np.prod(shape[:-2], dtype=np.int64))
        head = bitpack.packed_size(t, 2)
        if data.size < head:
            raise self.payload_error(f"payload of {data.size} bytes is shorter than its rate map")
        cls = bitpack.unpack(data[None, :head], 2, t)[0]
        if np.any(cls > PROTECTED):
            raise self.payload_error("rate map holds an unknown class")
        pieces, pos = [], head
        for c in (PROTECTED, SALIENT, BASE):
            size = g * int(np.sum(cls == c)) * class_bytes(c, d, self.config)
            pieces.append(data[pos:pos + size])
            pos += size
        if pos != data.size:
            raise self.payload_error(f"payload has {data.size} bytes, the rate map implies {pos}")
        return cls, g, pieces

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        *_, t, d = shape
        cls, g, pieces = self._split(np.asarray(data, np.uint8), shape)
        out = np.zeros((g, t, d), np.float32)
        for c, piece in zip((PROTECTED, SALIENT, BASE), pieces):
            n = g * int(np.sum(cls == c))
            if not n:
                continue
            if c == PROTECTED:
                s = piece[: 2 * n].copy().view("<f2").astype(np.float32)
                q = piece[2 * n:].view(np.int8).reshape(n, d).astype(np.float32)
                rows = hadamard.inverse(q * s[:, None], self.config.seed)
            else:
                rows = self._turbo(c).decode_array(piece, (n, d))
            out[:, cls == c] = rows.reshape(g, -1, d)
        return out.reshape(shape)

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        *_, t, d = shape
        cls, g, pieces = self._split(data.cpu().numpy(), shape)  # the map and sizes are tiny; the data stays
        out = torch.zeros((g, t, d), dtype=torch.float32, device=data.device)
        pos = bitpack.packed_size(t, 2)
        for c, piece in zip((PROTECTED, SALIENT, BASE), pieces):
            n = g * int(np.sum(cls == c))
            chunk = data[pos:pos + piece.size]
            pos += piece.size
            if not n:
                continue
            if c == PROTECTED:
                s = chunk[: 2 * n].clone().view(torch.float16).float()  # the rate map may end at an odd offset
                q = chunk[2 * n:].contiguous().view(torch.int8).reshape(n, d).float()
                rows = hadamard.inverse_torch(q * s[:, None], self.config.seed)
            else:
                rows = self._turbo(c).decode_torch(chunk, (n, d))
            out[:, torch.from_numpy(cls == c).to(data.device)] = rows.reshape(g, -1, d)
        return out.reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        return TurboCodec(bits=1, seed=self.config.seed).error_bound(x)  # every class is a projection or finer
