"""HuggingFace transformers 5.x adapter (spec/cachecard-1.md §4 canonical layout, §6 identity and adapters):
:func:`save` / :func:`load` in one call each, restore into ``generate`` (one card, a store's prefix, a batch
of agents), DynamicCache <-> canonical KV, model identity (:mod:`cachecard.adapters.hf_identity`) and
per-layer calibration (:mod:`cachecard.adapters.hf_calibrate`), both re-exported here. The verbs are those of
every adapter (:class:`cachecard.adapters.protocol.RuntimeAdapter`).

HF caches K after RoPE in rotate-half order, which is the canonical layout, so no permutation is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import AbstractSet, Any, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import torch
    import transformers
    from transformers import DynamicCache, PreTrainedModel, StaticCache
    from transformers.cache_utils import DynamicLayer
except ImportError as e:
    raise missing_extra("hf", e) from e

from cachecard.adapters._common import (
    cached_ids, card_load_checks, check_card_identity, check_restorable, is_store, open_if_location, save_kv,
    usable_prefix,
)
from cachecard.adapters.hf_cache import Slot, restore_parts
from cachecard.adapters.hf_calibrate import calibrate
from cachecard.adapters.hf_identity import bind, identity_of, model_identity, source_gguf, weights_hash
from cachecard.adapters.torch_read import read_layers
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.errors import KVShapeError
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import ModelIdentity

RUNTIME = f"transformers {transformers.__version__}"


def to_canonical(cache: DynamicCache, *, row: int | None = None) -> CanonicalKV:
    """One sequence of a DynamicCache as canonical KV: the only one, or batch row ``row`` (a left-padded row
    keeps its padding columns: slice them off the result, ``CanonicalKV(kv.k[:, :, pad:], kv.v[:, :, pad:])``)."""
    layers = cache.layers
    if any(layer.keys is None or not getattr(layer, "is_initialized", True) for layer in layers):
        raise KVShapeError("the cache has layers that hold no KV yet; run a forward pass first")
    batch = layers[0].keys.shape[0]
    if row is None and batch != 1:
        raise KVShapeError(f"to_canonical takes one sequence; the cache holds a batch of {batch} (pass row=)")
    lengths = {layer.keys.shape[-2] for layer in layers}
    if len(lengths) != 1:
        raise KVShapeError(
            f"the cache's layers hold different numbers of tokens {sorted(lengths)}: sliding-window layers keep "
            "only their last window, and a card holds every token of every layer. Capture with a full cache: "
            "pass past_key_values=DynamicCache() (no config) to the forward pass; attention still uses the window.")
    r = row or 0
    return CanonicalKV.from_layers([layer.keys[r:r + 1] for layer in layers],
                                   [layer.values[r:r + 1] for layer in layers])


def from_canonical(kv: CanonicalKV, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   config: object | None = None) -> DynamicCache:
    """A DynamicCache (batch size 1) holding ``kv``, ready for ``model(..., past_key_values=...)``.

    With the model's ``config``, layers follow its layer types: sliding-window layers keep the last window
    of the card's tokens, as they would have after a prefill."""
    return _cache([(_tensor(kv.k[i], device, dtype), _tensor(kv.v[i], device, dtype))
                   for i in range(kv.num_layers)], config)


def _tensor(a: np.ndarray, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    bf16 = a.dtype == ml_dtypes.bfloat16
    t = torch.from_numpy(np.ascontiguousarray(a[None]).view(np.int16 if bf16 else a.dtype))
    if bf16:
        t = t.view(torch.bfloat16)
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config: object | None) -> DynamicCache:
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if config is not None and len(cache.layers) != len(layers):
        raise KVShapeError(f"the card holds {len(layers)} layers; the model has {len(cache.layers)}")
    for i, (k, v) in enumerate(layers):
        if i < len(cache.layers) and type(cache.layers[i]) is DynamicLayer:
            # Hand the tensors over: update() would concatenate them onto an empty tensor, one more full copy.
            layer = cache.layers[i]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, i)  # sliding-window layers keep their window; a config-less cache grows here
    return cache


def _check_identity(card: Card, model: PreTrainedModel, identity: ModelIdentity | None,
                    allow: AbstractSet[str]) -> ModelIdentity:
    ident = identity or identity_of(model)
    check_card_identity(card, ident, allow=allow, module="hf")
    return ident


def restore(card: Card | Location, model: PreTrainedModel, *, input_ids: object = None,
            tokens: int | None = None, identity: ModelIdentity | None = None,
            allow: AbstractSet[str] = frozenset(), device: str | torch.device | None = None,
            slot: Slot | None = None) -> DynamicCache | StaticCache:
    """Restore a card (a :class:`cachecard.Card` or its location) into a DynamicCache for ``model``,
    checked against its identity (:func:`identity_of`, or ``identity``; fields in ``allow`` are not checked).

    With ``input_ids`` (the whole prompt: cached prefix + new suffix; a list, array or ``(1, T)`` tensor),
    the card's token ids must start it and the cache holds ``min(card tokens, len(input_ids) - 1)`` tokens,
    so ``model.generate(input_ids=input_ids, past_key_values=cache)`` continues exactly where the cached
    prefix ends. Quantized cards are decoded on ``device`` (default: the model's). The cache keeps room for
    ``hf_cache.DEFAULT_HEADROOM`` new tokens, so the next steps do not copy it. With ``slot`` (an
    :class:`~cachecard.adapters.hf_cache.Slot` of this model) the card goes into the slot's static cache,
    which is returned (``slot.step`` then runs the next step as a captured CUDA graph).
    """
    card = open_if_location(card)
    _check_identity(card, model, identity, allow)
    check_restorable(card, runtime="hf")
    n = card.manifest.tokens.count if tokens is None else tokens
    if input_ids is not None:
        n = min(n, usable_prefix(card, input_ids))
    if card.manifest.positions == "explicit" and input_ids is not None:
        raise KVShapeError(f"card {card.label} is pruned (explicit positions); generate() assumes positions "
                           f"0..n-1. Restore it without input_ids and pass position_ids from "
                           f"card.next_position() ({card.next_position()}) yourself.")
    return restore_parts([(card, n)], model, device=device, dtype=_kv_dtype(model), slot=slot)


def restore_from_store(store: Store, model: PreTrainedModel, input_ids: object, *,
                       agent: str | None = None, identity: ModelIdentity | None = None,
                       allow: AbstractSet[str] = frozenset(), device: str | torch.device | None = None,
                       slot: Slot | None = None) -> tuple[DynamicCache | StaticCache | None, int]:
    """The longest cached prefix of a prompt from ``store`` (``agent``'s cards only, if given) as a
    DynamicCache (or in ``slot``'s static cache), and its length (``(None, 0)`` when nothing matches). At least
    one prompt token is left uncached, so ``model.generate(input_ids=input_ids, past_key_values=cache)`` works
    as it is."""
    ids = token_ids(input_ids)
    ident = identity or identity_of(model)
    match = store.match(ids[:-1], ident, agent=agent)
    if match is None or match.tokens == 0:
        return None, 0
    parts = store.parts(match)
    for card, _ in parts:
        check_card_identity(card, ident, allow=allow, module="hf")
    return restore_parts(parts, model, device=device, dtype=_kv_dtype(model), slot=slot), match.tokens


# -- one call each way ---------------------------------------------------------------------------------------
def capture(model: PreTrainedModel, cache: DynamicCache, input_ids: object) -> tuple[CanonicalKV, np.ndarray]:
    """The canonical KV of ``cache`` and the token ids it holds: ``input_ids``, or all of them but the last
    when the cache is one token short (as after ``generate``)."""
    kv = to_canonical(cache)
    layers = model.config.get_text_config().num_hidden_layers
    if kv.num_layers != layers:
        raise KVShapeError(f"the cache holds {kv.num_layers} layers; the model has {layers}: not this model's cache")
    return kv, cached_ids(token_ids(input_ids), kv.num_tokens)


def save(where: Store | Location, model: PreTrainedModel, cache: DynamicCache, input_ids: object, *,
         codec: str | tuple[str, str] = "lossless", agent: str | None = None,
         identity: ModelIdentity | None = None, tokenizer: object | None = None,
         gguf: str | os.PathLike[str] | None = None, **write_kwargs: Any) -> str:
    """Save ``cache`` (computed from ``input_ids``) as a card at ``where`` (a path, ``.zip`` or URL), or into
    a :class:`cachecard.Store` for ``agent``; return the card id.

    The card binds to ``identity``, else to :func:`identity_of` the model (the GGUF file's when the model was
    loaded from one: every runtime can restore the card). ``write_kwargs`` go to ``write_card`` /
    ``Store.put`` (``chunk_tokens``, ...).
    """
    kv, ids = capture(model, cache, input_ids)
    ident = identity or identity_of(model, tokenizer=tokenizer, gguf=gguf)
    return save_kv(where, kv, ids, ident.model_copy(update={"kv_dtype": kv.dtype}), agent=agent,
                   runtime=RUNTIME, codec=codec, **write_kwargs)


def load(where: Store | Card | Location, model: PreTrainedModel, input_ids: object = None, *,
         agent: str | None = None, identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(),
         tokenizer: object | None = None, gguf: str | os.PathLike[str] | None = None,
         device: str | torch.device | None = None) -> DynamicCache:
    """A DynamicCache for ``model`` ready for ``model.generate(input_ids=input_ids, past_key_values=cache)``.

    From a card (a :class:`cachecard.Card` or its location): the whole card, or with ``input_ids`` (the
    whole prompt, cached tokens first) the part of it the prompt reuses. From a :class:`cachecard.Store`:
    the longest cached prefix of ``input_ids`` (``agent``'s cards only, if given); an empty cache when
    nothing matches, so ``generate`` prefills as usual. ``cache.get_seq_length()`` tells how many tokens
    came from the card or store.
    """
    ident = identity or identity_of(model, tokenizer=tokenizer, gguf=gguf)
    if is_store(where):
        if input_ids is None:
            raise TypeError("loading from a store matches a prompt: pass input_ids (the whole prompt)")
        cache, _ = restore_from_store(where, model, input_ids, agent=agent, identity=ident, allow=allow,
                                      device=device)
        return cache if cache is not None else DynamicCache(config=model.config)
    card_load_checks(agent)
    return restore(where, model, input_ids=input_ids, identity=ident, allow=allow, device=device)


@dataclass
class BatchRestore:
    """Inputs for ``model.generate(**batch, ...)``: several agents' prompts left-padded into one batch, with
    as much of each one's cached prefix as the batch allows already in ``past_key_values``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    past_key_values: DynamicCache
    cached: list[int]          # tokens each row took from its card
    padding: list[int]         # left padding of each row

    def keys(self) -> list[str]:  # so that model.generate(**batch) works
        return ["input_ids", "attention_mask", "past_key_values"]

    def __getitem__(self, key: str) -> object:
        return getattr(self, key)


def restore_batch(cards: Sequence[Card | Location | None], model: PreTrainedModel, prompts: Sequence[object], *,
                  pad_token_id: int, identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(),
                  device: str | torch.device | None = None) -> BatchRestore:
    """Several agents' cards (``None``: nothing cached) and full prompts into one left-padded batch.

    A shared cache has one length ``C`` for every row, and every row's uncached tokens must lie after it;
    with rows of ``n_i`` prompt tokens of which ``p_i`` are cached, padding to ``N = max n_i`` gives
    ``C = N - max(n_i - p_i)``. A row whose suffix is shorter than the longest recomputes the difference.
    Positions come from the attention mask (generate's own rule for left padding), so each row continues at
    its own length.
    """
    cards = [open_if_location(c) if c is not None else None for c in cards]
    if len(cards) != len(prompts) or not prompts:
        raise ValueError(f"need one card (or None) per prompt; got {len(cards)} cards and {len(prompts)} prompts")
    ident = identity or identity_of(model)
    for card in cards:
        if card is not None:
            check_card_identity(card, ident, allow=allow, module="hf")
            check_restorable(card, runtime="hf")
            if card.manifest.positions == "explicit":
                raise KVShapeError(f"card {card.label} is pruned; batched restore needs cards with implicit positions")
    device = device or next(model.parameters()).device
    dtype = _kv_dtype(model)
    prompts = [token_ids(p) for p in prompts]
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    cached = [usable_prefix(c, p) if c is not None else 0 for c, p in zip(cards, prompts)]
    width = max(lengths)
    shared = width - max(n - p for n, p in zip(lengths, cached))
    padding = [width - n for n in lengths]
    take = [max(0, shared - pad) for pad in padding]
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, pad) in enumerate(zip(prompts, padding)):
        ids[row, pad:] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, pad:] = 1
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (len(prompts), cfg.num_key_value_heads, shared, head_dim)
    layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(cfg.num_hidden_layers)]
    for row, (card, n) in enumerate(zip(cards, take)):
        if card is None or n == 0:
            continue
        for (k, v), (ck, cv) in zip(layers, read_layers(card, n, device=device, dtype=dtype)):
            k[row, :, shared - n:] = ck[0]
            v[row, :, shared - n:] = cv[0]
    return BatchRestore(ids.to(device), mask.to(device), _cache(layers, model.config), take, padding)


def _kv_dtype(model: PreTrainedModel) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


__all__ = [
    "RUNTIME", "BatchRestore", "bind", "calibrate", "capture", "from_canonical", "identity_of", "load",
    "model_identity", "restore", "restore_batch", "restore_from_store", "save", "source_gguf", "to_canonical",
    "weights_hash",
]
