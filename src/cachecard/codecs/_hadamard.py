"""The randomized Hadamard transform shared by the rotation codecs (spec/codecs/turbo.md §Rotation).

``R x = H (s ⊙ x) / sqrt(D)``: seeded ±1 signs ``s``, then the Walsh-Hadamard transform. The ±1 sums are
taken in float64 (a BLAS matrix product: far faster in numpy than a butterfly), multiplied by the float64
c_D = 1 / sqrt(D) and rounded to float32, so implementations agree to the bit whenever the float64 sums are
exact, as they are for KV values (always when decoding: turbo.md "Exactness").
Signs come from SHAKE-128 so any language can reproduce them without our PRNG.

Sign of zero (turbo.md "Rotation"): an exactly zero sum is +0 whatever the signs of its zero terms. BLAS
kernels differ on this (a sum of -0 terms may come out -0 or +0), so the sums get ``+ 0.0`` (which turns
-0 into +0 and changes nothing else) before the scaling; a negative value that underflows float32 on the
final rounding still comes out -0, as IEEE 754 rounding gives.
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


@lru_cache(maxsize=64)
def _matrix(seed: int, dim: int) -> np.ndarray:
    """diag(s) · H as float64 (entries ±1), H the Sylvester Hadamard matrix of order ``dim``."""
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    out = signs(seed, dim).astype(np.float64)[:, None] * h
    out.flags.writeable = False
    return out


def scale(dim: int) -> float:
    """The float64 constant c_D = 1 / float64(sqrt(D)) (one below float64(1/sqrt(D)) for odd log2 D; the
    spec names this exact value)."""
    return float(1 / np.sqrt(dim))


def forward(x: np.ndarray, seed: int) -> np.ndarray:
    """R x for rows x (N, D) float32: the ±1 sums in float64 (exact for KV value ranges), a zero sum as +0,
    then one multiplication by c_D in float64 and one rounding to float32."""
    d = x.shape[-1]
    s = x.astype(np.float64) @ _matrix(seed, d)
    s += 0.0
    return (s * scale(d)).astype(np.float32)


def inverse(y: np.ndarray, seed: int) -> np.ndarray:
    """R^T y = s ⊙ (H y) / sqrt(D), computed like ``forward``."""
    d = y.shape[-1]
    s = y.astype(np.float64) @ _matrix(seed, d).T
    s += 0.0
    return (s * scale(d)).astype(np.float32)


def inverse_torch(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``inverse`` with torch ops on y's device (float64 sums and the same sign of zero as numpy)."""
    import torch

    d = y.shape[-1]
    m = torch.from_numpy(np.ascontiguousarray(_matrix(seed, d).T)).to(y.device)
    return (((y.double() @ m) + 0.0) * scale(d)).float()
