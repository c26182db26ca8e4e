"""Test data for codecs: KV-like chunks with outlier channels, deterministic from a seed."""

from __future__ import annotations

import numpy as np

from cachecard.codecs.base import from_float32


def kv_like(shape: tuple[int, ...], seed: int, scale: float = 1.0, outliers: bool = True) -> np.ndarray:
    """float32 values shaped like real KV: Gaussian rows, a few channels 10x larger, a bias per channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * scale
    if outliers and shape[-1] >= 4:
        ch = rng.choice(shape[-1], size=max(1, shape[-1] // 16), replace=False)
        x[..., ch] *= 10
        x += rng.standard_normal(shape[-1]).astype(np.float32) * scale
    return x


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in a card's storage element type (bfloat16 as uint16 bits)."""
    return from_float32(x, {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}[dtype])
