"""Token pruning: an explicit, irreversible, lossy tier (spec/codecs/pruning.md). Never a default.

Quantized Cache-to-Cache's cache-length reduction: keep a fraction of the tokens — the front of the sequence,
its back, or the tokens with the largest value norms — and record which (their positions) and of what (the
source sequence's length and digest), so a restore places the next token at the right position and a store
never mistakes the pruned card for the full prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from cachecard.errors import KVShapeError
from cachecard.kv import CanonicalKV, token_ids
from cachecard.manifest import Pruning, token_digest

Method = Literal["value_norm", "front", "back"]


@dataclass(frozen=True)
class Pruned:
    """What ``write_card(location, p.kv, p.tokens, model, positions=p.positions, pruning=p.record)`` takes."""

    kv: CanonicalKV
    tokens: np.ndarray      # ids of the kept tokens
    positions: np.ndarray   # their positions in the source sequence, increasing
    record: Pruning


def kept_count(total: int, keep: float) -> int:
    """ceil(keep · total), at least one token of a non-empty sequence."""
    return min(total, max(1, math.ceil(keep * total))) if total else 0


def select(kv: CanonicalKV, keep: float, method: Method) -> np.ndarray:
    """Indices (ascending) of the tokens a pruning keeps."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1]; got {keep}")
    t = kv.num_tokens
    n = kept_count(t, keep)
    if method == "front":
        return np.arange(n)
    if method == "back":
        return np.arange(t - n, t)
    if method == "value_norm":
        v = kv.v.astype(np.float32)
        score = np.sqrt(np.einsum("lhtd,lhtd->lht", v, v)).sum(axis=(0, 1))  # L2 norm per head, summed
        return np.sort(np.argsort(-score, kind="stable")[:n])  # ties keep the earlier token
    raise ValueError(f"unknown pruning method {method!r}; use 'value_norm', 'front' or 'back'")


def prune(kv: CanonicalKV, tokens: Sequence[int] | np.ndarray, keep: float, method: Method = "value_norm") -> Pruned:
    """Keep ``keep`` of the tokens of ``kv``, the KV of the whole sequence ``tokens`` (positions from 0)."""
    ids = token_ids(tokens)  # also a (1, T) batch of one
    if ids.shape != (kv.num_tokens,):
        raise KVShapeError(f"need one token id per cached token: KV holds {kv.num_tokens}, got {ids.shape}")
    if not kv.num_tokens:
        raise KVShapeError("nothing to prune: the cache holds no tokens")
    idx = select(kv, keep, method)
    record = Pruning(method=method, keep=keep, source_tokens=kv.num_tokens,
                     source_sha256=token_digest(ids))
    return Pruned(CanonicalKV(np.ascontiguousarray(kv.k[:, :, idx]), np.ascontiguousarray(kv.v[:, :, idx])),
                  ids[idx], idx, record)

__all__ = ["Method", "Pruned", "kept_count", "prune", "select"]
