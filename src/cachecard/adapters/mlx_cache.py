"""mlx-lm prompt caches <-> canonical KV (spec/cachecard-1.md §4 canonical layout): ``KVCache`` and
``QuantizedKVCache`` layers from a card or canonical KV and back, for :mod:`cachecard.adapters.mlx`.

mlx-lm's llama-family models cache K after RoPE in rotate-half order (``nn.RoPE(traditional=False)``),
the canonical layout, so no permutation is needed. ``KVCache`` keeps a buffer grown in steps of 256 tokens:
only the first ``offset`` are KV.

A restored layer's buffer has room for the next token (mlx-lm's own grows by copying the whole buffer), and
is filled from the card a few layers at a time with one copy into mlx. A card whose K and V are
``cachecard.mlx_affine`` with the group size and bits asked for goes into
``QuantizedKVCache`` directly: the stored ``(packed, scales, biases)`` are handed over as they are
(``Card.read_encoded``), bit-identical to what ``mx.quantize`` made, with no dequantize/requantize.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import ConcatenateKVCache, KVCache, QuantizedKVCache
except ImportError as e:
    raise missing_extra("mlx", e) from e

from cachecard.adapters._common import check_restorable, decoded_layers, open_if_location
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


def _capacity(tokens: int) -> int:
    """Tokens of buffer a restored layer gets: mlx-lm's steps of 256, with room for at least the next token,
    so the first generate step writes in place (mlx-lm grows a full buffer by copying all of it: ~0.1 s at 4K
    tokens of SmolLM2 on a 2-core CPU)."""
    return (tokens // KVCache.step + 1) * KVCache.step


def _padded(kv: CanonicalKV, capacity: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(layer, k, v)`` of ``kv``, each ``(heads, capacity, dim)`` with zero rows past its tokens, in two
    reused arrays (as :func:`cachecard.adapters._common.decoded_layers` gives a card's)."""
    shape = (kv.num_kv_heads, capacity, kv.head_dim)
    k, v = np.zeros(shape, kv.k.dtype), np.zeros(shape, kv.v.dtype)
    for i in range(kv.num_layers):
        k[:, :kv.num_tokens], v[:, :kv.num_tokens] = kv.k[i], kv.v[i]
        yield i, k, v


def _caches(layers: Iterable[tuple[int, np.ndarray, np.ndarray]], tokens: int, spec: tuple[int, int] | None,
            target: mx.Dtype) -> PromptCache:
    """A ``KVCache`` (or with ``spec`` a ``QuantizedKVCache`` made by ``mx.quantize``) per ``(layer, k, v)``,
    holding ``tokens`` tokens in the arrays' whole capacity. ``mx.array`` copies each array at once, so the
    arrays may be reused for the next layer; that copy is the only one (``astype`` to the same type is free)."""
    caches: PromptCache = []
    for _, k_np, v_np in layers:
        k, v = (to_mlx(a[None]).astype(target) for a in (k_np, v_np))
        if spec is None:
            c = KVCache()
            c.keys, c.values = k, v
        else:
            group_size, bits = spec
            c = QuantizedKVCache(group_size=group_size, bits=bits)
            c.keys = tuple(mx.quantize(k, group_size=group_size, bits=bits))
            c.values = tuple(mx.quantize(v, group_size=group_size, bits=bits))
        c.offset = tokens
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def from_canonical(kv: CanonicalKV, *, quantized: tuple[int, int] | None = None,
                   dtype: str | None = None) -> PromptCache:
    """An mlx-lm prompt cache (batch size 1) holding ``kv``: a ``KVCache`` per layer, or with
    ``quantized=(group_size, bits)`` a ``QuantizedKVCache`` made by ``mx.quantize`` (as
    ``KVCache.to_quantized`` does). ``dtype`` converts the KV first (default: keep the card's type). As after
    mlx-lm's own prefill, each layer's buffer is a multiple of 256 tokens (here with room for the next
    token); only the first ``offset`` are KV."""
    return _caches(_padded(kv, _capacity(kv.num_tokens)), kv.num_tokens, _quant_spec(quantized),
                   MX_DTYPES[dtype or kv.dtype])


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
    """QuantizedKVCache layers straight from the stored mlx_affine payloads (no dequantize), each chunk's
    ``(packed, scales, biases)`` copied into its place in arrays with room for the next token."""
    group_size, bits = spec
    layers, cap = card.manifest.model.num_layers, _capacity(tokens)
    parts: dict[str, list[np.ndarray]] = {}
    for which in ("k", "v"):
        enc = card.read_encoded(which, tokens=tokens)
        for ch in enc.chunks:
            split = enc.codec.split(ch.payload, enc.chunk_shape)  # each (1, heads, chunk tokens, columns)
            if which not in parts:
                parts[which] = [np.zeros((layers, x.shape[1], cap, x.shape[3]), x.dtype) for x in split]
            keep = min(ch.tokens, tokens - ch.token_start)  # drop the writer's padding and unasked tokens
            for whole, x in zip(parts[which], split):
                whole[ch.layer, :, ch.token_start:ch.token_start + keep] = x[0, :, :keep]
    target = MX_DTYPES[dtype]
    caches: PromptCache = []
    for layer in range(layers):
        k, v = (tuple(to_mlx(p[layer][None]) for p in parts[w]) for w in ("k", "v"))
        # scales/biases are in the card's type; a model computing in another type gets them converted
        c = QuantizedKVCache(group_size=group_size, bits=bits)
        c.keys, c.values = ((t[0], t[1].astype(target), t[2].astype(target)) for t in (k, v))
        c.offset = tokens
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
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
    return _caches(decoded_layers(card, n, capacity=_capacity(n)), n, spec, MX_DTYPES[dtype])
