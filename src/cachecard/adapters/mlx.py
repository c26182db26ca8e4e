"""MLX (mlx-lm) adapter: ``KVCache`` / ``QuantizedKVCache`` <-> CanonicalKV, restore for generation, model
identity, and mlx-lm ``save_prompt_cache`` files (spec/cachecard-1.md §4 canonical layout, §6 identity).

mlx-lm's llama-family models cache K after RoPE in rotate-half order (``nn.RoPE(traditional=False)``),
the canonical layout, so no permutation is needed; models with ``rope_traditional`` (interleaved pairs)
are refused. ``KVCache`` keeps a buffer grown in steps of 256 tokens: only the first ``offset`` are KV.

A card whose K and V are ``cachecard.mlx_affine`` with the group size and bits asked for goes into
``QuantizedKVCache`` directly: the stored ``(packed, scales, biases)`` are handed over as they are
(``Card.read_encoded``), bit-identical to what ``mx.quantize`` made, with no dequantize/requantize.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_dtypes
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ConcatenateKVCache, KVCache, QuantizedKVCache, load_prompt_cache, save_prompt_cache

from cachecard.codecs.mlx_affine import MLXAffineCodec
from cachecard.errors import IdentityMismatchError, KVShapeError, UnsupportedCodecError
from cachecard.identity import check_identity, gguf_identity, tensors_hash, tokenizer_hash
from cachecard.kv import CanonicalKV
from cachecard.card.reader import Card, open_card
from cachecard.card.locations import Location
from cachecard.card.writer import write_card
from cachecard.manifest import CardManifest, LayerKind, ModelIdentity, Rope

RUNTIME = f"mlx-lm {mlx_lm.__version__} (mlx {mx.__version__})"

# keys this adapter adds to a prompt-cache file's metadata (mlx-lm metadata is str -> str, and a "." in a key
# nests it on load: mlx's tree_unflatten splits there)
META_IDENTITY = "cachecard_identity"   # the card's ModelIdentity as JSON
META_TOKENS = "cachecard_tokens"       # the token ids as a JSON list (mlx-lm files do not record them)
META_CARD_ID = "cachecard_card_id"
_OWN_KEYS = (META_IDENTITY, META_TOKENS, META_CARD_ID)

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

PromptCache = list[Any]  # one KVCache or QuantizedKVCache per layer


# -- arrays ---------------------------------------------------------------------------------------------------
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


def model_dtype(model: Any) -> str:
    """The element type the model computes (and caches KV) in: that of its first floating parameter
    (the embedding, or a quantized embedding's scales)."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    raise KVShapeError("the model has no floating-point parameters, so its KV type is unknown; pass kv_dtype=")


# -- identity -------------------------------------------------------------------------------------------------
def weights_hash(model: Any) -> str:
    """Scheme ``sha256`` (spec §6, the transformers adapter's) over mlx-lm's parameter tree (a quantized mlx
    model hashes its packed weights and scales)."""
    return tensors_hash((name, to_numpy(p)) for name, p in tree_flatten(model.parameters()))


def _shape_fields(model: Any) -> dict[str, Any]:
    """Architecture, layout and RoPE of an mlx-lm model, from its ``args``."""
    args = model.args
    if getattr(args, "rope_traditional", False):
        raise KVShapeError("the model uses traditional (interleaved) RoPE; cards hold K in rotate-half order "
                           "and this adapter does not permute it. Use a model with rope_traditional=False")
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    layers = args.num_hidden_layers
    types = getattr(args, "layer_types", None) or ["full_attention"] * layers
    window = getattr(args, "sliding_window", None)
    kinds = tuple(LayerKind(attention="sliding", window=window) if t == "sliding_attention" and window
                  else LayerKind() for t in types)
    scaling = getattr(args, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return dict(architecture=args.model_type, num_layers=layers,
                num_kv_heads=getattr(args, "num_key_value_heads", None) or heads, head_dim=head_dim,
                layer_kinds=kinds, rope=Rope(theta=float(getattr(args, "rope_theta", 10000.0)),
                                             rotary_dim=head_dim, scaling=dict(scaling) if scaling else None))


def model_identity(model: Any, *, gguf: str | os.PathLike[str] | None = None, tokenizer: Any = None,
                   kv_dtype: str | None = None, name: str | None = None) -> ModelIdentity:
    """The identity a card of this mlx-lm model binds to.

    Parameters
    ----------
    model
        An mlx-lm model (``mlx_lm.load(...)[0]`` or one built from ``ModelArgs``).
    gguf
        The GGUF file the model's weights came from: the identity is then
        :func:`cachecard.identity.gguf_identity` of that file, the same in every runtime, after checking that
        its layers, KV heads, head dim and RoPE theta are the model's.
    tokenizer
        Needed without ``gguf``: see :func:`tokenizer_hash`. The weights are hashed by :func:`weights_hash`.
    kv_dtype
        The element type of the KV (default: the model's, see :func:`model_dtype`).
    """
    fields = _shape_fields(model)
    dtype = kv_dtype or model_dtype(model)
    if gguf is not None:
        ident = gguf_identity(gguf, kv_dtype=dtype, name=name)
        ours = (fields["num_layers"], fields["num_kv_heads"], fields["head_dim"], fields["rope"].theta)
        theirs = (ident.num_layers, ident.num_kv_heads, ident.head_dim, ident.rope.theta)
        if ours != theirs:
            raise IdentityMismatchError(
                f"the GGUF {os.fspath(gguf)!r} describes (layers, kv_heads, head_dim, rope_theta) = {theirs}, but "
                f"the model has {ours}; pass the GGUF this model was converted from")
        return ident
    if tokenizer is None:
        raise TypeError("model_identity needs tokenizer= (its hash is part of the identity), or gguf= for a "
                        "model converted from a GGUF file")
    return ModelIdentity(name=name or getattr(model, "model_type", None), kv_dtype=dtype,
                         weights_hash=weights_hash(model), tokenizer_hash=tokenizer_hash(tokenizer), **fields)


# -- caches <-> canonical ---------------------------------------------------------------------------------------
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
    target = _MX_DTYPES[dtype or kv.dtype]
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
    target = _MX_DTYPES[dtype]
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


def _open(card: Card | Location) -> Card:
    return card if isinstance(card, Card) else open_card(card)


def _check_plain_sequence(card: Card) -> None:
    m = card.manifest
    if m.parent is not None or m.positions != "contiguous" or m.start_position != 0:
        raise KVShapeError(
            f"card {card.label!r} does not start at position 0 with contiguous positions (parent "
            f"{m.parent.card_id if m.parent else None}, positions {m.positions!r}, start {m.start_position}); an "
            "mlx-lm cache's offset is both its length and its next RoPE position. Restore the whole chain "
            "(e.g. through cachecard.Store) into canonical KV and use from_canonical")


def cache_from_card(card: Card | Location, *, quantized: tuple[int, int] | None = None,
                    tokens: int | None = None, dtype: str | None = None) -> PromptCache:
    """An mlx-lm prompt cache of the card's first ``tokens`` tokens (all by default) with no identity
    check (use :func:`restore` to restore into a model). ``quantized=(group_size, bits)`` gives
    ``QuantizedKVCache`` layers, straight from the stored bytes when the card is ``cachecard.mlx_affine`` with
    that group size and bits; otherwise the card is decoded (and quantized by ``mx.quantize`` if asked)."""
    card = _open(card)
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


def restore(card: Card | Location, model: Any, *, identity: ModelIdentity | None = None,
            quantized: tuple[int, int] | None = None, tokens: int | None = None) -> PromptCache:
    """A prompt cache for ``model`` from ``card``, ready for ``generate`` / ``stream_generate(...,
    prompt_cache=...)`` with the tokens that follow.

    Parameters
    ----------
    identity
        The model's identity (:func:`model_identity`; with ``gguf=`` for GGUF-sourced weights, so cards from
        other runtimes restore). The card must match it (:func:`cachecard.identity.check_identity`). Without
        it the identity is computed from the model's weights, architecture and RoPE, and the tokenizer is
        not checked.
    quantized
        ``(group_size, bits)`` for ``QuantizedKVCache`` layers. A card stored as ``cachecard.mlx_affine`` with
        the same group size and bits goes in without dequantizing (bit-identical state); other cards are
        decoded and quantized by ``mx.quantize``.
    tokens
        Restore only the first ``tokens`` tokens.

    The KV takes the model's element type (``kv_dtype`` differences never block a restore).
    """
    card = _open(card)
    runtime = identity
    allow: set[str] = set()
    if runtime is None:  # no tokenizer to hash: check everything else
        runtime = ModelIdentity(kv_dtype=model_dtype(model), weights_hash=weights_hash(model),
                                tokenizer_hash=card.manifest.model.tokenizer_hash, **_shape_fields(model))
        allow = {"tokenizer_hash"}
    check_identity(card.manifest.model, runtime, what=f"card {card.label!r}", allow=allow)
    return cache_from_card(card, quantized=quantized, tokens=tokens, dtype=model_dtype(model))


def save(location: Location, prompt_cache: Sequence[Any], tokens: Sequence[int] | np.ndarray,
         identity: ModelIdentity, **write_kwargs: Any) -> CardManifest:
    """Write a prompt cache as a card (``cachecard.write_card`` with ``runtime=RUNTIME``); ``identity`` is
    the model's, its ``kv_dtype`` set to the cache's element type."""
    kv = to_canonical(prompt_cache)
    write_kwargs.setdefault("runtime", RUNTIME)
    return write_card(location, kv, tokens, identity.model_copy(update={"kv_dtype": kv.dtype}), **write_kwargs)


# -- mlx-lm prompt-cache files ----------------------------------------------------------------------------------
def _safetensors_path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not p.endswith(".safetensors"):  # mx.save_safetensors would append the suffix and write elsewhere
        raise ValueError(f"mlx-lm prompt-cache files end in .safetensors; got {p!r}")
    return p


def export_prompt_cache(card: Card | Location, path: str | os.PathLike[str], *,
                        metadata: dict[str, str] | None = None, quantized: tuple[int, int] | None = None) -> None:
    """Write the card as an mlx-lm prompt-cache file (``mlx_lm.models.cache.save_prompt_cache``), loadable
    with ``load_prompt_cache``. ``metadata`` (str to str, e.g. mlx-lm's ``model`` and ``chat_template``) is
    written as given, plus the card's identity, token ids and id under ``cachecard_*`` keys so the file can
    come back as a card. ``quantized=(group_size, bits)`` writes ``QuantizedKVCache`` state (directly from
    ``cachecard.mlx_affine`` cards of that configuration)."""
    card = _open(card)
    meta = dict(metadata or {})
    bad = {k: v for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"prompt-cache metadata maps str to str; got {bad!r}")
    dotted = sorted(k for k in meta if "." in k)
    if dotted:
        raise ValueError(f"metadata keys {dotted} hold a '.', which mlx-lm's load_prompt_cache turns into nested "
                         "dicts; use keys without dots")
    clash = sorted(set(meta) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"metadata keys {clash} are written by export_prompt_cache itself; remove them")
    meta[META_IDENTITY] = card.manifest.model.model_dump_json()
    meta[META_TOKENS] = json.dumps(card.token_ids().tolist())
    meta[META_CARD_ID] = card.manifest.card_id
    save_prompt_cache(_safetensors_path(path), cache_from_card(card, quantized=quantized), meta)


def import_prompt_cache(path: str | os.PathLike[str], location: Location, identity: ModelIdentity, *,
                        tokens: Sequence[int] | np.ndarray | None = None,
                        **write_kwargs: Any) -> tuple[CardManifest, dict[str, str]]:
    """Write an mlx-lm prompt-cache file as a card; returns the card's manifest and the file's metadata
    (without this adapter's ``cachecard_*`` keys).

    ``identity`` is the model's (:func:`model_identity`); when the file was exported from a card, the
    identity recorded in it must match. mlx-lm's own files do not record token ids: pass ``tokens`` then.
    A ``QuantizedKVCache`` file is dequantized (the card holds float KV; write it with a codec preset, e.g.
    ``codec="q4"``, to store it quantized again). ``write_kwargs`` go to ``cachecard.write_card``.
    """
    cache, metadata = load_prompt_cache(_safetensors_path(path), return_metadata=True)
    metadata = dict(metadata)
    if META_IDENTITY in metadata:
        recorded = ModelIdentity.model_validate_json(metadata[META_IDENTITY])
        check_identity(recorded, identity, what=f"prompt-cache file {os.fspath(path)!r}")
    if tokens is None:
        if META_TOKENS not in metadata:
            raise ValueError(f"{os.fspath(path)!r} does not record its token ids (mlx-lm files do not); pass "
                             "tokens= with the ids the cache was computed from")
        tokens = json.loads(metadata[META_TOKENS])
    manifest = save(location, cache, np.asarray(tokens), identity, **write_kwargs)
    return manifest, {k: v for k, v in metadata.items() if k not in _OWN_KEYS}


__all__ = [
    "RUNTIME", "cache_from_card", "export_prompt_cache", "from_canonical", "import_prompt_cache", "model_dtype",
    "model_identity", "restore", "save", "to_canonical", "to_mlx", "to_numpy", "tokenizer_hash", "weights_hash",
]
