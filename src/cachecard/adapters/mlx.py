"""MLX (mlx-lm) adapter: ``KVCache`` / ``QuantizedKVCache`` <-> CanonicalKV, restore for generation, model
identity, and mlx-lm ``save_prompt_cache`` files (spec/cachecard-1.md §4 canonical layout, §6 identity).

Models with ``rope_traditional`` (interleaved pairs) are refused: cards hold K in rotate-half order, the order
mlx-lm's llama-family models cache it in. The conversions (and the direct ``cachecard.mlx_affine`` ->
``QuantizedKVCache`` path) live in :mod:`cachecard.adapters.mlx_cache`, the prompt-cache files in
:mod:`cachecard.adapters.mlx_files`; both are re-exported here.
"""

from __future__ import annotations

import os
from typing import AbstractSet, Any, Sequence

import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import mlx.core as mx
    import mlx_lm  # noqa: F401 - imported by name, so a missing mlx-lm is reported here
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache
except ImportError as e:
    raise missing_extra("mlx", e) from e

from cachecard.adapters._common import (
    Identities, cached_ids, card_load_checks, check_card_identity, check_gguf_shapes, check_restorable,
    is_store, open_if_location, save_kv, store_prompt, usable_prefix,
)
from cachecard.adapters.mlx_cache import (  # noqa: F401 - MLXAffineCodec: a name this module had
    RUNTIME, MLXAffineCodec, PromptCache, cache_from_card, from_canonical, to_canonical, to_mlx,
    to_numpy,
)
from cachecard.adapters.mlx_files import META_CARD_ID, META_IDENTITY, META_TOKENS, export_prompt_cache, \
    import_prompt_cache
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.card.writer import write_card
from cachecard.errors import KVShapeError, MissingIdentityError
from cachecard.identity import gguf_identity, tensors_hash, tokenizer_hash
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import CardManifest, LayerKind, ModelIdentity, Rope

_IDENTITIES = Identities()

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
        card_load_checks(agent)
        return restore(where, model, input_ids=input_ids, identity=identity, allow=allow, quantized=quantized)
    ident = identity or identity_of(model)
    ids, match = store_prompt(where, ident, agent, input_ids)
    if match is None or match.tokens == 0:
        return make_prompt_cache(model)
    for card, _ in where.parts(match):
        check_card_identity(card, ident, allow=allow, module="mlx")
    return from_canonical(where.load(match), quantized=quantized, dtype=model_dtype(model))


__all__ = [
    "META_CARD_ID", "META_IDENTITY", "META_TOKENS", "RUNTIME", "PromptCache", "bind", "cache_from_card", "capture",
    "export_prompt_cache", "from_canonical", "identity_of", "import_prompt_cache", "load", "model_dtype",
    "model_identity", "restore", "save", "to_canonical", "to_mlx", "to_numpy", "tokenizer_hash", "weights_hash",
]
