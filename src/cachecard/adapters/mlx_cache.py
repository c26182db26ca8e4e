"""mlx-lm prompt caches <-> canonical KV (spec/cachecard-1.md §4 canonical layout): ``KVCache`` and
``QuantizedKVCache`` layers from a card or canonical KV and back, for :mod:`cachecard.adapters.mlx`.

mlx-lm's llama-family models cache K after RoPE in rotate-half order (``nn.RoPE(traditional=False)``),
the canonical layout, so no permutation is needed. ``KVCache`` keeps a buffer grown in steps of 256 tokens:
only the first ``offset`` are KV.

A card whose K and V are ``cachecard.mlx_affine`` with the group size and bits asked for goes into
``QuantizedKVCache`` directly: the stored ``(packed, scales, biases)`` are handed over as they are
(``Card.read_encoded``), bit-identical to what ``mx.quantize`` made, with no dequantize/requantize.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import ConcatenateKVCache, KVCache, QuantizedKVCache
except ImportError as e:
    raise missing_extra("mlx", e) from e

from cachecard.adapters._common import check_restorable, open_if_location
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.codecs.mlx_affine import MLXAffineCodec
from cachecard.errors import KVShapeError, UnsupportedCodecError
from cachecard.kv import CanonicalKV

RUNTIME = f"mlx-lm {mlx_lm.__version__} (mlx {mx.__version__})"
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

PromptCache = list[Any]  # one KVCache or QuantizedKVCache per layer


def to_numpy(a: mx.array) -> np.ndarray:
    """An mlx array as numpy (bfloat16 through its bits, as ``ml_dtypes.bfloat16``)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def to_mlx(a: np.ndarray) -> mx.array:
    """A numpy array as mlx (``ml_dtypes.bfloat16`` through its bits)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)



def to_canonical(prompt_cache: Sequence[Any]) -> CanonicalKV:
    """One sequence (batch size 1) of an mlx-lm prompt cache as canonical KV.

    ``KVCache`` / ``ConcatenateKVCache`` give their first ``offset`` tokens; a ``QuantizedKVCache`` is
    dequantized with ``mx.dequantize`` (in its scales' type). Other cache kinds (rotating, batched, SSM)
    hold no plain token sequence and are refused.
    """
    if not prompt_cache:
        raise KVShapeError("the prompt cache has no layers")
    keys, values = [], []
    for i, c in enumerate(prompt_cache):
        if not isinstance(c, (KVCache, QuantizedKVCache, ConcatenateKVCache)):
            raise KVShapeError(f"layer {i} holds a {type(c).__name__}; only KVCache, QuantizedKVCache and "
                               "ConcatenateKVCache hold one plain token sequence")
        if c.keys is None:
            raise KVShapeError(f"layer {i} holds no KV yet; run the prompt through the model first")
        n = c.offset
        if isinstance(c, QuantizedKVCache):
            k, v = (mx.dequantize(*(x[..., :n, :] for x in t), group_size=c.group_size, bits=c.bits)
                    for t in (c.keys, c.values))
        else:
            k, v = c.keys[..., :n, :], c.values[..., :n, :]
        if k.shape[0] != 1:
            raise KVShapeError(f"to_canonical takes one sequence; layer {i} holds a batch of {k.shape[0]}")
        keys.append(k)
        values.append(v)
    mx.eval(keys, values)
    return CanonicalKV.from_layers([to_numpy(k) for k in keys], [to_numpy(v) for v in values])


def _quant_spec(quantized: tuple[int, int] | None) -> tuple[int, int] | None:
    if quantized is None:
        return None
    try:
        group_size, bits = (int(x) for x in quantized)
    except (TypeError, ValueError):
        raise TypeError(f"quantized must be None or (group_size, bits); got {quantized!r}") from None
    return group_size, bits


def from_canonical(kv: CanonicalKV, *, quantized: tuple[int, int] | None = None,
                   dtype: str | None = None) -> PromptCache:
    """An mlx-lm prompt cache (batch size 1) holding ``kv``: a ``KVCache`` per layer, or with
    ``quantized=(group_size, bits)`` a ``QuantizedKVCache`` made by ``mx.quantize`` (as
    ``KVCache.to_quantized`` does). ``dtype`` converts the KV first (default: keep the card's type)."""
    spec = _quant_spec(quantized)
    target = MX_DTYPES[dtype or kv.dtype]
    caches: PromptCache = []
    for i in range(kv.num_layers):
        k, v = (to_mlx(a[i][None]).astype(target) for a in (kv.k, kv.v))
        if spec is None:
            c = KVCache()
            c.keys, c.values, c.offset = k, v, kv.num_tokens
        else:
            group_size, bits = spec
            c = QuantizedKVCache(group_size=group_size, bits=bits)
            c.keys = tuple(mx.quantize(k, group_size=group_size, bits=bits))
            c.values = tuple(mx.quantize(v, group_size=group_size, bits=bits))
            c.offset = kv.num_tokens
        caches.append(c)
    mx.eval([c.state[:2] for c in caches])
    return caches


def _direct_codec(card: Card, spec: tuple[int, int]) -> bool:
    """True when K and V are stored as ``cachecard.mlx_affine`` with exactly these (group_size, bits)."""
    for which in ("k", "v"):
        try:
            codec = card.read_encoded(which, layers=range(0)).codec
        except UnsupportedCodecError:
            return False  # compressed or format 1.0 chunks: not payloads QuantizedKVCache can hold
        if not isinstance(codec, MLXAffineCodec) or (codec.group, codec.bits) != spec:
            return False
    return True


def _direct_quantized(card: Card, spec: tuple[int, int], tokens: int, dtype: str) -> PromptCache:
    """QuantizedKVCache layers straight from the stored mlx_affine payloads (no dequantize)."""
    group_size, bits = spec
    layers = card.manifest.model.num_layers
    parts: dict[str, list[list[tuple[np.ndarray, ...]]]] = {}
    for which in ("k", "v"):
        enc = card.read_encoded(which, tokens=tokens)
        per_layer: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(layers)]
        for ch in enc.chunks:
            packed, scales, biases = enc.codec.split(ch.payload, enc.chunk_shape)
            keep = min(ch.tokens, tokens - ch.token_start)  # drop the writer's padding and unasked tokens
            per_layer[ch.layer].append(tuple(x[:, :, :keep] for x in (packed, scales, biases)))
        parts[which] = per_layer
    target = MX_DTYPES[dtype]
    caches: PromptCache = []
    for layer in range(layers):
        k, v = (tuple(to_mlx(np.concatenate([p[i] for p in parts[w][layer]], axis=2)) for i in range(3))
                for w in ("k", "v"))
        # scales/biases are in the card's type; a model computing in another type gets them converted
        k, v = ((t[0], t[1].astype(target), t[2].astype(target)) for t in (k, v))
        c = QuantizedKVCache(group_size=group_size, bits=bits)
        c.keys, c.values, c.offset = k, v, tokens
        caches.append(c)
    mx.eval([c.state[:2] for c in caches])
    return caches


def _check_plain_sequence(card: Card) -> None:
    """A card restores into an mlx-lm cache only from position 0 with contiguous positions: the cache's
    ``offset`` is both its length and its next RoPE position."""
    check_restorable(card, runtime="mlx")
    if card.manifest.positions != "contiguous":
        raise KVShapeError(f"the card's positions are {card.manifest.positions!r} (a pruned card); an mlx-lm "
                           "cache's offset is both its length and its next RoPE position, so it holds only "
                           "contiguous positions", card=card.label)


def cache_from_card(card: Card | Location, *, quantized: tuple[int, int] | None = None,
                    tokens: int | None = None, dtype: str | None = None) -> PromptCache:
    """An mlx-lm prompt cache of the card's first ``tokens`` tokens (all by default) with no identity
    check (use :func:`restore` to restore into a model). ``quantized=(group_size, bits)`` gives
    ``QuantizedKVCache`` layers, straight from the stored bytes when the card is ``cachecard.mlx_affine`` with
    that group size and bits; otherwise the card is decoded (and quantized by ``mx.quantize`` if asked)."""
    card = open_if_location(card)
    _check_plain_sequence(card)
    count = card.manifest.tokens.count
    n = count if tokens is None else tokens
    if not 0 < n <= count:
        raise ValueError(f"tokens must be in [1, {count}] for this card; got {tokens}")
    spec = _quant_spec(quantized)
    dtype = dtype or card.manifest.model.kv_dtype
    if spec is not None and _direct_codec(card, spec):
        return _direct_quantized(card, spec, n, dtype)
    return from_canonical(card.read(tokens=n), quantized=spec, dtype=dtype)
