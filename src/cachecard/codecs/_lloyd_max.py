"""Lloyd-Max (MSE-optimal fixed-rate) quantizers for N(0, 1), spec/codecs/turbo.md §Tables.

Centroids of the positive half (Max 1960; PolyKV and TurboQuant use the same); the negative half mirrors
them. Decision boundaries are the midpoints of adjacent centroids (the Lloyd condition).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

POSITIVE = {
    1: (0.7979,),
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326),
}
MSE = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009497}  # per element, N(0, 1) source


@lru_cache(maxsize=8)
def centroids(bits: int) -> np.ndarray:
    """All 2^bits centroids, ascending, float32; code i decodes to centroids[i]."""
    pos = np.asarray(POSITIVE[bits], dtype=np.float32)
    out = np.concatenate([-pos[::-1], pos])
    out.flags.writeable = False
    return out


@lru_cache(maxsize=8)
def boundaries(bits: int) -> np.ndarray:
    """The 2^bits - 1 decision thresholds, float32: code = number of thresholds <= u."""
    c = centroids(bits)
    out = ((c[1:] + c[:-1]) * np.float32(0.5)).astype(np.float32)
    out.flags.writeable = False
    return out
