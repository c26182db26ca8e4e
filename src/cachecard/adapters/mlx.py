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
from typing import AbstractSet, Any, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import (
        ConcatenateKVCache, KVCache, QuantizedKVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache,
    )
except ImportError as e:
    raise missing_extra("mlx", e) from e

from cachecard.adapters._common import (
    Identities, cached_ids, check_card_identity, check_gguf_shapes, check_restorable, is_store, open_if_location,
    save_kv, usable_prefix,
)
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.card.writer import write_card
from cachecard.codecs.mlx_affine import MLXAffineCodec
from cachecard.errors import KVShapeError, MissingIdentityError, UnsupportedCodecError
from cachecard.identity import check_identity, gguf_identity, tensors_hash, tokenizer_hash
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import CardManifest, LayerKind, ModelIdentity, Rope

RUNTIME = f"mlx-lm {mlx_lm.__version__} (mlx {mx.__version__})"
_IDENTITIES = Identities()

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


def model_identity(model: Any, *, tokenizer: Any = None, gguf: str | os.PathLike[str] | None = None,
                   name: str | None = None, kv_dtype: str | None = None) -> ModelIdentity:
    """The identity a card of this mlx-lm model binds to.

    Parameters
    ----------
    model
        An mlx-lm model (``mlx_lm.load(...)[0]`` or one built from ``ModelArgs``).
    tokenizer
        Needed without ``gguf``: see :func:`tokenizer_hash`. The weights are hashed by :func:`weights_hash`;
        such cards restore only into mlx-lm with these weights.
    gguf
        The GGUF file the model's weights came from: the identity is then
        :func:`cachecard.identity.gguf_identity` of that file, the same in every runtime, after checking that
        its layers, KV heads, head dim and RoPE theta are the model's.
    kv_dtype
        The element type of the KV (default: the model's, see :func:`model_dtype`).
    """
    fields = _shape_fields(model)
    dtype = kv_dtype or model_dtype(model)
    if gguf is not None:
        ident = gguf_identity(gguf, kv_dtype=dtype, name=name)
        check_gguf_shapes({"num_layers": fields["num_layers"], "num_kv_heads": fields["num_kv_heads"],
                           "head_dim": fields["head_dim"], "rope_theta": fields["rope"].theta}, ident, gguf)
        return ident
    if tokenizer is None:
        raise MissingIdentityError("model_identity needs tokenizer= (its hash is part of the identity), or gguf= "
                                   "for a model converted from a GGUF file")
    return ModelIdentity(name=name or getattr(model, "model_type", None), kv_dtype=dtype,
                         weights_hash=weights_hash(model), tokenizer_hash=tokenizer_hash(tokenizer), **fields)


def bind(model: Any, identity: ModelIdentity) -> ModelIdentity:
    """Remember ``identity`` as ``model``'s (e.g. its GGUF identity), so restores check cards against it."""
    return _IDENTITIES.put(model, identity)


def identity_of(model: Any, *, tokenizer: Any = None, gguf: str | os.PathLike[str] | None = None) -> ModelIdentity:
    """The identity remembered for ``model`` (:func:`bind`, or found before), else the one ``gguf`` or
    ``tokenizer`` gives, remembered. mlx-lm loads HF folders, not GGUF files, so an mlx model's cards travel
    to other runtimes only when ``gguf`` names the file its weights came from."""
    def derive() -> ModelIdentity | None:
        if gguf is not None:
            return model_identity(model, gguf=gguf)
        return model_identity(model, tokenizer=tokenizer) if tokenizer is not None else None

    return _IDENTITIES.of(model, derive, module="mlx")


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


def _runtime_identity(model: Any, card: Card, identity: ModelIdentity | None) -> tuple[ModelIdentity, set[str]]:
    """The identity to check a card against, and the fields not to check: ``identity``, the model's
    remembered one, or (nothing known) its weights, architecture and RoPE with the tokenizer unchecked."""
    known = identity or _IDENTITIES.get(model)
    if known is not None:
        return known, set()
    return ModelIdentity(kv_dtype=model_dtype(model), weights_hash=weights_hash(model),
                         tokenizer_hash=card.manifest.model.tokenizer_hash, **_shape_fields(model)), \
        {"tokenizer_hash"}


def restore(card: Card | Location, model: Any, *, input_ids: Any = None, tokens: int | None = None,
            identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(),
            quantized: tuple[int, int] | None = None) -> PromptCache:
    """A prompt cache for ``model`` from ``card``, ready for ``generate`` / ``stream_generate(...,
    prompt_cache=...)`` with the tokens that follow it (mlx-lm takes only the tokens after the cache).

    Parameters
    ----------
    input_ids
        The whole prompt (cached tokens first): the cache then holds the part of the card the prompt reuses,
        at least one prompt token short of it; pass ``input_ids[cache[0].offset:]`` to ``generate``.
        Without it, the cache holds the whole card.
    tokens
        Restore only the first ``tokens`` tokens.
    identity
        The model's identity (default: :func:`bind`'s or :func:`identity_of`'s; with ``gguf=`` for
        GGUF-sourced weights, so cards from other runtimes restore). The card must match it, except for the
        fields named in ``allow``. With no identity known, the card is checked against the model's weights,
        architecture and RoPE, and the tokenizer is not checked.
    quantized
        ``(group_size, bits)`` for ``QuantizedKVCache`` layers. A card stored as ``cachecard.mlx_affine`` with
        the same group size and bits goes in without dequantizing (bit-identical state); other cards are
        decoded and quantized by ``mx.quantize``.

    The KV takes the model's element type (``kv_dtype`` differences never block a restore).
    """
    card = open_if_location(card)
    runtime, unchecked = _runtime_identity(model, card, identity)
    check_card_identity(card, runtime, allow={*allow, *unchecked}, module="mlx")
    n = card.manifest.tokens.count if tokens is None else tokens
    if input_ids is not None:
        check_restorable(card, runtime="mlx")
        n = min(n, usable_prefix(card, input_ids))
    return cache_from_card(card, quantized=quantized, tokens=n, dtype=model_dtype(model))


def capture(model: Any, cache: Sequence[Any], input_ids: Any) -> tuple[CanonicalKV, np.ndarray]:
    """The canonical KV of a prompt cache and the token ids it holds (``input_ids``, or all but the last
    when the cache is one token short)."""
    kv = to_canonical(cache)
    if kv.num_layers != _shape_fields(model)["num_layers"]:
        raise KVShapeError(f"the cache holds {kv.num_layers} layers; the model has "
                           f"{_shape_fields(model)['num_layers']}: not this model's cache")
    return kv, cached_ids(token_ids(input_ids), kv.num_tokens)


def save(where: Store | Location, model: Any, cache: Any, input_ids: Any = None, *args: Any,
         codec: str | tuple[str, str] = "lossless", agent: str | None = None,
         identity: ModelIdentity | None = None, tokenizer: Any = None,
         gguf: str | os.PathLike[str] | None = None, **write_kwargs: Any) -> str | CardManifest:
    """Save an mlx-lm prompt cache (computed from ``input_ids``) as a card at ``where`` (a path, ``.zip`` or
    URL), or into a :class:`cachecard.Store` for ``agent``; return the card id.

    The card binds to ``identity``, else :func:`identity_of` the model (``gguf=`` for cards every runtime
    restores; ``tokenizer=`` for cards bound to these weights). ``write_kwargs`` go to ``write_card`` /
    ``Store.put``.

    Before 0.2 this was ``save(location, prompt_cache, tokens, identity, **write_kwargs)`` returning the
    manifest; that form still works until 0.3, with a DeprecationWarning.
    """
    if isinstance(model, (list, tuple)):  # save(location, prompt_cache, tokens, identity, ...) before 0.2
        import warnings

        warnings.warn("mlx.save(location, prompt_cache, tokens, identity) is deprecated and stops working in 0.3; "
                      "use mlx.save(location, model, prompt_cache, tokens, identity=identity)",
                      DeprecationWarning, stacklevel=2)
        old_identity = input_ids if input_ids is not None else args[0]
        write_kwargs.setdefault("runtime", RUNTIME)
        kv = to_canonical(model)
        return write_card(where, kv, cache, old_identity.model_copy(update={"kv_dtype": kv.dtype}),
                          codec=codec, **write_kwargs)
    if input_ids is None:
        raise TypeError("save needs the token ids the cache was computed from: save(where, model, cache, input_ids)")
    kv, ids = capture(model, cache, input_ids)
    ident = identity or identity_of(model, tokenizer=tokenizer, gguf=gguf)
    return save_kv(where, kv, ids, ident.model_copy(update={"kv_dtype": kv.dtype}), agent=agent,
                   runtime=RUNTIME, codec=codec, **write_kwargs)


def load(where: Store | Card | Location, model: Any, input_ids: Any = None, *, agent: str | None = None,
         identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(), tokenizer: Any = None,
         gguf: str | os.PathLike[str] | None = None, quantized: tuple[int, int] | None = None) -> PromptCache:
    """A prompt cache for ``model``, ready for ``generate(model, tokenizer, new_tokens, prompt_cache=cache)``.

    From a card (a :class:`cachecard.Card` or its location): the whole card, so that, as with mlx-lm's
    ``load_prompt_cache``, only the new tokens go to ``generate``; with ``input_ids`` (the whole prompt) the
    part of the card the prompt reuses. From a :class:`cachecard.Store`: the longest cached prefix of
    ``input_ids`` (``agent``'s cards only, if given), or an empty cache when nothing matches. Either way
    ``cache[0].offset`` tokens are cached: pass ``input_ids[cache[0].offset:]`` to ``generate``.
    """
    if identity is None and (tokenizer is not None or gguf is not None or _IDENTITIES.get(model) is not None):
        identity = identity_of(model, tokenizer=tokenizer, gguf=gguf)
    if not is_store(where):
        if agent is not None:
            raise TypeError("agent= selects an agent's cards in a store; a card location has no agents")
        return restore(where, model, input_ids=input_ids, identity=identity, allow=allow, quantized=quantized)
    if input_ids is None:
        raise TypeError("loading from a store matches a prompt: pass input_ids (the whole prompt)")
    ident = identity or identity_of(model)
    ids = token_ids(input_ids)
    match = where.match(ids[:-1], ident, agent=agent)
    if match is None or match.tokens == 0:
        return make_prompt_cache(model)
    for card, _ in where.parts(match):
        check_card_identity(card, ident, allow=allow, module="mlx")
    return from_canonical(where.load(match), quantized=quantized, dtype=model_dtype(model))


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
    card = open_if_location(card)
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
    kv = to_canonical(cache)
    write_kwargs.setdefault("runtime", RUNTIME)
    manifest = write_card(location, kv, token_ids(tokens), identity.model_copy(update={"kv_dtype": kv.dtype}),
                          **write_kwargs)
    return manifest, {k: v for k, v in metadata.items() if k not in _OWN_KEYS}


__all__ = [
    "RUNTIME", "bind", "cache_from_card", "capture", "export_prompt_cache", "from_canonical", "identity_of",
    "import_prompt_cache", "load", "model_dtype", "model_identity", "restore", "save", "to_canonical", "to_mlx",
    "to_numpy", "tokenizer_hash", "weights_hash",
]
