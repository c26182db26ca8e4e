"""A card's stored blocks as llama.cpp cache rows, copied without decoding (spec/cachecard-1.md §4 canonical
layout; the cache layout is :mod:`cachecard.adapters.ggsq`'s).

A card whose codec is the cache's block type (``q8`` -> q8_0, ``q4_0``, ``q4_1``) restores V (and K of NEOX
architectures) by copying its stored blocks; K of NORM architectures must be re-blocked, because a block of 32
llama.cpp channels is not a block of 32 canonical channels.
"""

from __future__ import annotations

import numpy as np

from cachecard.adapters import ggsq
from cachecard.adapters.ggsq import GGML_TYPES, TYPE_IDS
from cachecard.adapters.llamacpp_kv import BLOCK_CODECS, CacheLayout, KOrder
from cachecard.card.reader import Card, EncodedKV
from cachecard.errors import UnsupportedCodecError


def stored_blocks(card: Card, layout: CacheLayout, order: KOrder, tokens: int) -> dict[str, np.ndarray] | None:
    """Rows of llama.cpp blocks taken straight from the card's stored chunks (``Card.read_encoded``), for K
    and/or V, where the card's chunks are exactly the cache's block type: V when it is not transposed, K when
    it needs no re-ordering (NEOX architectures). ``None`` when nothing can be copied."""
    out: dict[str, np.ndarray] = {}
    for which, target in (("k", layout.k_type), ("v", layout.v_type)):
        if target not in BLOCK_CODECS or (which == "k" and order == "norm") or (which == "v" and layout.v_trans):
            continue
        try:
            enc = card.read_encoded(which, tokens=tokens)
        except UnsupportedCodecError:
            continue  # compressed chunks or a format 1.0 card: decode instead
        if type(enc.codec) is not BLOCK_CODECS[target]:
            continue
        out[which] = block_rows(enc, tokens, GGML_TYPES[TYPE_IDS[target]])
    return out or None


def block_rows(enc: EncodedKV, tokens: int, t: ggsq.GGMLType) -> np.ndarray:
    """``(layers, tokens, row_bytes)`` llama.cpp rows from chunks of blocks ordered (head, token, block)."""
    _, heads, c, dim = enc.chunk_shape
    per_token = dim // t.block * t.block_bytes
    layers = 1 + max(ch.layer for ch in enc.chunks)
    out = np.empty((layers, tokens, heads * per_token), np.uint8)
    for ch in enc.chunks:
        keep = min(ch.tokens, tokens - ch.token_start)  # the last chunk may run past the tokens asked for
        blocks = ch.payload.reshape(heads, c, per_token)[:, :keep]
        out[ch.layer, ch.token_start: ch.token_start + keep] = blocks.transpose(1, 0, 2).reshape(keep, -1)
    return out
