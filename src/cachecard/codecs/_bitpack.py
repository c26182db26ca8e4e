"""Packing b-bit codes into bytes as a little-endian bit stream (code i occupies bits [i*b, (i+1)*b), least
significant bit first), the layout of spec/codecs/turbo.md and kivi.md. numpy and torch versions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of codes (N, M) in [0, 2^bits) -> (N, ceil(M*bits/8)) uint8."""
    n, m = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 4 and m % 2 == 0:
        c = codes.astype(np.uint8)
        return c[:, 0::2] | (c[:, 1::2] << 4)
    if m % 8 == 0:  # 8 codes fill exactly `bits` bytes: pack them through one uint64 per group
        v = (codes.reshape(n, m // 8, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(
            axis=2, dtype=np.uint64)
        out = (v[..., None] >> (np.arange(bits, dtype=np.uint64) * np.uint64(8))) & np.uint64(0xFF)
        return out.astype(np.uint8).reshape(n, m * bits // 8)
    planes = (codes.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(n, m * bits), axis=1, bitorder="little")


def unpack(data: np.ndarray, bits: int, m: int) -> np.ndarray:
    """(N, ceil(M*bits/8)) uint8 -> (N, M) uint8 codes."""
    n = data.shape[0]
    if bits == 8:
        return data[:, :m]
    if bits == 4 and m % 2 == 0:
        out = np.empty((n, m), np.uint8)
        out[:, 0::2] = data & 0x0F
        out[:, 1::2] = data >> 4
        return out
    if m % 8 == 0:
        g = data.reshape(n, m // 8, bits).astype(np.uint64)
        v = (g << (np.arange(bits, dtype=np.uint64) * np.uint64(8))).sum(axis=2, dtype=np.uint64)
        codes = (v[..., None] >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
        return codes.astype(np.uint8).reshape(n, m)
    planes = np.unpackbits(data, axis=1, bitorder="little", count=m * bits).reshape(n, m, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)


def unpack_torch(data: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """``unpack`` on data's device; returns int64 codes."""
    import torch

    n = data.shape[0]
    if bits == 8:
        return data[:, :m].long()
    if 8 % bits == 0:  # whole codes per byte, low bits first: a shift per code slot (6x the bit-by-bit path)
        mask = (1 << bits) - 1
        parts = [(data >> (k * bits)) & mask for k in range(8 // bits)]
        return torch.stack(parts, dim=-1).reshape(n, -1)[:, :m].long()
    shifts = torch.arange(8, device=data.device, dtype=torch.uint8)
    stream = ((data[..., None] >> shifts) & 1).reshape(n, -1)[:, : m * bits].reshape(n, m, bits).long()
    weights = (1 << torch.arange(bits, device=data.device)).long()
    return (stream * weights).sum(-1)
