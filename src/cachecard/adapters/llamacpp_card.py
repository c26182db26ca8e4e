"""A card as llama.cpp sequence-state bytes, built once in one buffer (spec/cachecard-1.md §4 canonical
layout; the byte layout is :mod:`cachecard.adapters.ggsq`'s, the conversions
:mod:`cachecard.adapters.llamacpp_kv`'s).

The state is laid out first (:func:`ggsq.allocate`); then each layer's K and V go straight into their place:

* a card whose codec is the cache's block type (``q8`` -> q8_0, ``q4_0``, ``q4_1``) restores V (and K of NEOX
  architectures) by copying its stored blocks (``Card.read_encoded``), never decoding them. K of NORM
  architectures must be re-blocked, because a block of 32 llama.cpp channels is not a block of 32 canonical
  channels;
* what is not copied is decoded a few layers at a time (:func:`cachecard.adapters._common.decoded_layers`) and
  cast, permuted and relaid into place while in cache. When only K is left, it is decoded chunk by chunk from
  its stored payloads, so V is not decoded for nothing.
"""

from __future__ import annotations

import numpy as np

from cachecard.adapters import ggsq
from cachecard.adapters._common import decoded_layers
from cachecard.adapters.ggsq import GGML_TYPES, TYPE_IDS, StreamState
from cachecard.adapters.llamacpp_kv import BLOCK_CODECS, CacheLayout, KOrder, put_k, put_v, skeleton
from cachecard.card.layout import STORAGE_DTYPES
from cachecard.card.reader import Card
from cachecard.codecs.base import KVCodec
from cachecard.errors import UnsupportedCodecError
from cachecard.kv import NUMPY_DTYPES


def card_state(card: Card, tokens: int, layout: CacheLayout, order: KOrder, *, seq_id: int | None) -> np.ndarray:
    """The ``llama_state_seq_set_data`` bytes (``seq_id`` is the header's; ``None``: none, as in a slot file) of
    the card's first ``tokens`` tokens for a cache of ``layout``, as one writable uint8 array."""
    m = card.manifest.model
    buf, state = ggsq.allocate(skeleton(tokens, m.num_layers, m.num_kv_heads * m.head_dim, layout,
                                        card.positions()[:tokens], seq_id))
    st = state.stream()
    left = [which for which in ("k", "v") if not _copy_blocks(card, which, st, layout, order, tokens)]
    if left == ["k"] and _decode_k_by_chunk(card, st, layout, order, tokens):
        return buf
    for layer, k, v in decoded_layers(card, tokens) if left else ():
        if "k" in left:
            put_k(st.k[layer].data, k, layout.k_type, order)
        if "v" in left:
            put_v(st.v[layer].data, v, layout.v_type, layout.v_trans)
    return buf


def _copy_blocks(card: Card, which: str, st: StreamState, layout: CacheLayout, order: KOrder, tokens: int) -> bool:
    """Copy K or V's stored blocks into the state's rows, where the card's chunks are exactly the cache's block
    type and need no re-ordering: V when it is not transposed, K of NEOX architectures. False when they
    cannot be copied (nothing was written)."""
    target = layout.k_type if which == "k" else layout.v_type
    if target not in BLOCK_CODECS or (which == "k" and order == "norm") or (which == "v" and layout.v_trans):
        return False
    try:
        enc = card.read_encoded(which, tokens=tokens)
    except UnsupportedCodecError:
        return False  # compressed chunks or a format 1.0 card: decode instead
    if type(enc.codec) is not BLOCK_CODECS[target]:
        return False
    t = GGML_TYPES[TYPE_IDS[target]]
    _, heads, c, dim = enc.chunk_shape
    per_token = dim // t.block * t.block_bytes
    rows = st.k if which == "k" else st.v
    for ch in enc.chunks:  # chunks hold blocks ordered (head, token, block); rows are (token, head, block)
        keep = min(ch.tokens, tokens - ch.token_start)  # the last chunk may run past the tokens asked for
        dst = rows[ch.layer].data[ch.token_start:ch.token_start + keep].reshape(keep, heads, per_token)
        dst[...] = ch.payload.reshape(heads, c, per_token)[:, :keep].transpose(1, 0, 2)
    return True


def _decode_k_by_chunk(card: Card, st: StreamState, layout: CacheLayout, order: KOrder, tokens: int) -> bool:
    """Decode K alone from its stored chunks into the state's rows, as ``Card.read`` decodes each chunk
    (``KVCodec.decode_chunk`` to the card's storage type). False, nothing written, when K's chunks are not a
    cachecard codec's (``Card.read`` then decodes them)."""
    try:
        enc = card.read_encoded("k", tokens=tokens)
    except UnsupportedCodecError:
        return False
    if not isinstance(enc.codec, KVCodec):
        return False
    kv_dtype = card.manifest.model.kv_dtype
    for ch in enc.chunks:
        keep = min(ch.tokens, tokens - ch.token_start)
        k = enc.codec.decode_chunk(ch.payload, enc.chunk_shape, STORAGE_DTYPES[kv_dtype]).view(NUMPY_DTYPES[kv_dtype])
        put_k(st.k[ch.layer].data[ch.token_start:ch.token_start + keep], k[0, :, :keep], layout.k_type, order)
    return True
