"""The randomized Hadamard transform shared by the rotation codecs (spec/codecs/turbo.md §Rotation).

``R x = H (s ⊙ x) / sqrt(D)``: seeded ±1 signs ``s``, then the fast Walsh-Hadamard butterfly, in float32 with
a fixed operation order so that every implementation (numpy here, torch on a device) gets the same bits.
Signs come from SHAKE-128 so any language can reproduce them without our PRNG.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@lru_cache(maxsize=64)
def signs(seed: int, dim: int) -> np.ndarray:
    """±1 (float32) for each of ``dim`` channels: bit i of SHAKE-128(seed as 8 little-endian bytes), LSB
    first; bit 1 means -1."""
    stream = hashlib.shake_128(int(seed).to_bytes(8, "little")).digest((dim + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, np.uint8), bitorder="little")[:dim]
    out = np.where(bits == 1, np.float32(-1), np.float32(1))
    out.flags.writeable = False
    return out


def _butterfly(x: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform along the last axis (length a power of two), float32.

    Stage h = 1, 2, 4, ...: for each pair (i, i + h) within blocks of 2h, (a, b) -> (a + b, a - b)."""
    n, d = x.shape
    h = 1
    while h < d:
        y = x.reshape(n, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        x = np.stack((a + b, a - b), axis=2).reshape(n, d)
        h *= 2
    return x


def forward(x: np.ndarray, seed: int) -> np.ndarray:
    """R x for rows x (N, D) float32."""
    d = x.shape[-1]
    return _butterfly(x * signs(seed, d)) * np.float32(1 / np.sqrt(d))


def inverse(y: np.ndarray, seed: int) -> np.ndarray:
    """R^T y (R is orthonormal and H symmetric): s ⊙ H y / sqrt(D)."""
    d = y.shape[-1]
    return (_butterfly(y) * np.float32(1 / np.sqrt(d))) * signs(seed, d)


def inverse_torch(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``inverse`` with torch ops on y's device; same operation order, so the same float32 bits."""
    import torch

    n, d = y.shape
    h = 1
    while h < d:
        z = y.reshape(n, d // (2 * h), 2, h)
        a, b = z[:, :, 0, :], z[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(n, d)
        h *= 2
    s = torch.from_numpy(signs(seed, d).copy()).to(y.device)
    return (y * torch.tensor(np.float32(1 / np.sqrt(d)), device=y.device)) * s
