"""Small factories shared by the store tests: KV and token ids of a sequence, and its extension."""

from __future__ import annotations

import numpy as np

from cachecard import CanonicalKV, Store
from cachecard.testing import make_identity, make_kv

IDENT = make_identity()


def seq_kv(n: int, seed: int = 0) -> CanonicalKV:
    return make_kv(tokens=n, seed=seed)


def extend(kv: CanonicalKV, more: int, seed: int = 1) -> CanonicalKV:
    add = make_kv(tokens=more, seed=seed)
    return CanonicalKV(np.concatenate([kv.k, add.k], axis=2), np.concatenate([kv.v, add.v], axis=2))


def tokens(n: int, start: int = 1000) -> np.ndarray:
    return np.arange(start, start + n)


def card_bytes(store: Store) -> int:
    return sum(c.bytes for c in store.cards())
