"""HuggingFace transformers 5.x adapter: DynamicCache <-> CanonicalKV, and model identity
(spec/cachecard-1.md §4 canonical layout, §6 identity).

HF caches K after RoPE in rotate-half order, which is the canonical layout, so no permutation is needed.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence


import ml_dtypes
import numpy as np
import torch
import transformers
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer

from cachecard.codecs.profiles import SensitivityProfile
from cachecard.adapters.hf_cache import Slot, dynamic_cache, room
from cachecard.adapters.torch_read import read_kv, read_layers
from cachecard.errors import IdentityMismatchError, KVShapeError
from cachecard.identity import check_identity, gguf_identity, tensors_hash, tokenizer_hash
from cachecard.kv import CanonicalKV, as_numpy
from cachecard.card.reader import Card
from cachecard.kvstore.store import Store
from cachecard.manifest import LayerKind, ModelIdentity, Rope

RUNTIME = f"transformers {transformers.__version__}"


def weights_hash(model: PreTrainedModel) -> str:
    """Scheme ``sha256`` (spec §6) over every parameter and buffer of the state_dict."""
    return tensors_hash((name, as_numpy(t)) for name, t in model.state_dict().items())


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(model: PreTrainedModel, tokenizer: object | None = None, *, gguf: str | os.PathLike[str] | None = None,
                   name: str | None = None, kv_dtype: str | None = None) -> ModelIdentity:
    """The identity a card of this model binds to (spec §6).

    With ``gguf`` (the file the model was loaded from), the identity is the file's
    (:func:`cachecard.identity.gguf_identity`), shared by every runtime that loads that file; its shapes are
    checked against the model. Otherwise weights and tokenizer are hashed here (scheme ``sha256``), which
    takes about a second per GB of weights.
    """
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = kv_dtype or str(model.dtype).removeprefix("torch.")
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    kinds = tuple(LayerKind(attention="sliding", window=window) if t == "sliding_attention" else LayerKind()
                  for t in layer_types)
    if gguf is not None:
        ident = gguf_identity(gguf, kv_dtype=dtype, name=name)
        ours = (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, kinds)
        theirs = (ident.architecture, ident.num_layers, ident.num_kv_heads, ident.head_dim, ident.layer_kinds)
        if ours != theirs:
            names = ("architecture", "num_layers", "num_kv_heads", "head_dim", "layer_kinds")
            diffs = [f"{n}: model has {a!r}, file has {b!r}" for n, a, b in zip(names, ours, theirs) if a != b]
            raise IdentityMismatchError(f"the model was not loaded from {gguf}: " + "; ".join(diffs))
        return ident
    if tokenizer is None:
        raise TypeError("model_identity needs the tokenizer (or gguf=, the file the model was loaded from)")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return ModelIdentity(
        name=name or getattr(cfg, "name_or_path", None) or None, architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        layer_kinds=kinds, rope=Rope(theta=theta, rotary_dim=int(head_dim * partial), scaling=scaling),
        kv_dtype=dtype, weights_hash=weights_hash(model), tokenizer_hash=tokenizer_hash(tokenizer),
    )


def bind(model: PreTrainedModel, identity: ModelIdentity) -> ModelIdentity:
    """Remember ``identity`` as ``model``'s, so :func:`restore` checks cards against it without rehashing."""
    _IDENTITIES[model] = identity
    return identity


def identity_of(model: PreTrainedModel) -> ModelIdentity:
    """The identity bound to ``model`` (:func:`bind`), or TypeError saying how to bind one."""
    try:
        return _IDENTITIES[model]
    except KeyError:
        raise TypeError("no identity is bound to this model: call hf.bind(model, hf.model_identity(model, "
                        "tokenizer)) once (or pass identity=)") from None


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


def restore(card: Card, model: PreTrainedModel, *, input_ids: torch.Tensor | Sequence[int] | None = None,
            tokens: int | None = None, identity: ModelIdentity | None = None, allow: frozenset[str] = frozenset(),
            device: str | torch.device | None = None, slot: Slot | None = None) -> DynamicCache | StaticCache:
    """Restore a card into a DynamicCache for ``model`` (checked against its identity, spec §6).

    With ``input_ids`` (the whole prompt: cached prefix + new suffix), the card's token ids must be a prefix
    of it and the cache holds ``min(card tokens, len(input_ids) - 1)`` tokens, so
    ``model.generate(input_ids=input_ids, past_key_values=cache)`` continues exactly where the cached
    prefix ends. Quantized cards are decoded on ``device`` (default: the model's). The cache keeps room for
    ``DEFAULT_HEADROOM`` new tokens, so the next steps do not copy it. With ``slot`` (a
    :class:`~cachecard.adapters.hf_cache.Slot` of this model), the card is written into the slot's static
    cache instead, which is returned (``slot.step`` runs the next step as a captured CUDA graph).
    """
    check_identity(card.manifest.model, identity or identity_of(model), what=f"card {card.label}", allow=allow)
    _check_whole(card)
    n = card.manifest.tokens.count if tokens is None else tokens
    if input_ids is not None:
        n = min(n, usable_prefix(card, input_ids))
    device = device or next(model.parameters()).device
    dtype = _kv_dtype(model)
    if card.manifest.positions == "explicit" and input_ids is not None:
        raise KVShapeError(f"card {card.label} is pruned (explicit positions); generate() assumes positions "
                           f"0..n-1. Restore it without input_ids and pass position_ids from "
                           f"card.next_position() ({card.next_position()}) yourself.")
    return _restore_parts([(card, n)], model, device, slot)


def restore_from_store(store: Store, model: PreTrainedModel, input_ids: torch.Tensor | Sequence[int], *,
                       agent: str | None = None, identity: ModelIdentity | None = None,
                       allow: frozenset[str] = frozenset(),
                       device: str | torch.device | None = None,
                       slot: Slot | None = None) -> tuple[DynamicCache | StaticCache | None, int]:
    """The longest cached prefix of a prompt from ``store`` (``agent``'s cards only, if given) as a
    DynamicCache (or in ``slot``'s static cache), and its length (``(None, 0)`` when nothing matches). At least
    one prompt token is left uncached, so ``model.generate(input_ids=input_ids, past_key_values=cache)`` works
    as it is."""
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids).reshape(-1)
    ident = identity or identity_of(model)
    match = store.match(ids[:-1], ident, agent=agent)
    if match is None or match.tokens == 0:
        return None, 0
    parts = store.parts(match)
    for card, _ in parts:
        check_identity(card.manifest.model, ident, what=f"card {card.label}", allow=allow)
    return _restore_parts(parts, model, device, slot), match.tokens


def _restore_parts(parts: list[tuple[Card, int]], model: PreTrainedModel, device: str | torch.device | None,
                   slot: Slot | None) -> DynamicCache | StaticCache:
    """Cards (a parent chain, parents first, with how many of their tokens count) read one after the other
    into one cache's buffers."""
    total = sum(n for _, n in parts)
    if slot is not None:
        if slot.model is not model:
            raise ValueError("the slot belongs to another model")
        keys, values = slot.buffers()
        if total > keys.shape[2]:
            raise ValueError(f"the slot holds {keys.shape[2]} tokens; the restore needs {total}")
    else:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        k_room, v_room = room(model, total, device=device, dtype=_kv_dtype(model))
        keys, values = k_room[:, 0], v_room[:, 0]
    start = 0
    for card, n in parts:
        read_kv(card, n, device=keys.device, dtype=keys.dtype,
                into=(keys[:, :, start:], values[:, :, start:]))
        start += n
    if slot is not None:
        slot.set_length(total)
        return slot.cache
    return dynamic_cache(k_room, v_room, total, model.config)


def _check_whole(card: Card) -> None:
    """A card restored on its own must start at position 0: a store's child card holds only the tokens after
    its parent's."""
    if card.manifest.parent is not None or card.manifest.start_position:
        raise KVShapeError(f"card {card.label} continues card {card.manifest.parent.card_id if card.manifest.parent else '?'}"
                           f" from position {card.manifest.start_position}; restore it through its store "
                           "(hf.restore_from_store), which joins the chain")


def usable_prefix(card: Card, input_ids: torch.Tensor | Sequence[int]) -> int:
    """How many of the card's tokens a prompt can reuse: its common prefix with ``input_ids``, leaving at
    least one prompt token to compute (generation needs the last token's logits)."""
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids).reshape(-1)
    have = card.token_ids()
    m = min(len(have), len(ids) - 1)
    diff = np.flatnonzero(have[:m] != ids[:m])
    if len(diff) and diff[0] == 0:
        raise KVShapeError(f"card {card.label}'s tokens do not start the prompt (token 0: card {have[0]}, "
                           f"prompt {ids[0]}); it holds another text")
    return int(diff[0]) if len(diff) else max(m, 0)


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


def restore_batch(cards: Sequence[Card | None], model: PreTrainedModel, prompts: Sequence[Sequence[int]], *,
                  pad_token_id: int, identity: ModelIdentity | None = None, allow: frozenset[str] = frozenset(),
                  device: str | torch.device | None = None) -> BatchRestore:
    """Several agents' cards (``None``: nothing cached) and full prompts into one left-padded batch.

    A shared cache has one length ``C`` for every row, and every row's uncached tokens must lie after it;
    with rows of ``n_i`` prompt tokens of which ``p_i`` are cached, padding to ``N = max n_i`` gives
    ``C = N - max(n_i - p_i)``. A row whose suffix is shorter than the longest recomputes the difference.
    Positions come from the attention mask (generate's own rule for left padding), so each row continues at
    its own length.
    """
    if len(cards) != len(prompts) or not prompts:
        raise ValueError(f"need one card (or None) per prompt; got {len(cards)} cards and {len(prompts)} prompts")
    ident = identity or identity_of(model)
    for card in cards:
        if card is not None:
            check_identity(card.manifest.model, ident, what=f"card {card.label}", allow=allow)
            _check_whole(card)
            if card.manifest.positions == "explicit":
                raise KVShapeError(f"card {card.label} is pruned; batched restore needs cards with implicit positions")
    device = device or next(model.parameters()).device
    dtype = _kv_dtype(model)
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
        ids[row, pad:] = torch.as_tensor(list(prompt), dtype=torch.long)
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


def calibrate(model: PreTrainedModel, tokenizer: object, texts: list[str], *, windows: int = 4, prefix: int = 512,
              continuation: int = 128, k_step: float = 0.6, v_step: float = 1.0,
              progress: Callable[[int, int], None] | None = None) -> SensitivityProfile:
    """Measure a model's per-layer sensitivity profile (cachecard.codecs.profiles): the mean KL of the next-token
    distributions over ``continuation`` tokens when one layer's K (then V) of a ``prefix``-token cache goes
    through ``cachecard.frontier`` at a reference step and everything else is exact. 2·L + 1 forward passes
    of ``windows`` windows; use text the model will not be evaluated on."""
    from cachecard.codecs.base import ChunkContext
    from cachecard.codecs.frontier import FrontierCodec

    ids = np.concatenate([np.asarray(tokenizer(t).input_ids) for t in texts])
    span = prefix + continuation
    if len(ids) < windows * span:
        raise ValueError(f"calibration needs {windows * span} tokens of text; got {len(ids)}")
    batch = torch.from_numpy(np.stack([ids[i * span:(i + 1) * span] for i in range(windows)]))
    device = next(model.parameters()).device
    with torch.no_grad():
        cache = model(batch[:, :prefix].to(device), use_cache=True).past_key_values
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        cont = batch[:, prefix:].to(device)

        def logprobs(ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
            c = DynamicCache()
            for i, (k, v) in enumerate(zip(ks, vs)):
                c.update(k.clone(), v.clone(), i)
            return torch.log_softmax(model(cont, past_key_values=c, use_cache=True).logits[:, :-1].float(), -1)

        exact = logprobs(keys, values)
        costs: dict[str, list[float]] = {"k": [], "v": []}
        steps = 2 * len(keys)
        for which, tensors, codec in (
                ("k", keys, FrontierCodec(step=k_step, center=True, sinks=4, recent=32, salient=0.0, seed=1)),
                ("v", values, FrontierCodec(step=v_step, center=False, sinks=4, recent=32, salient=0.0, seed=1))):
            for layer, t in enumerate(tensors):
                x = as_numpy(t).astype(np.float32)  # (B, H, T, D)
                out = np.empty_like(x)
                for b in range(x.shape[0]):
                    for s in range(0, prefix, 256):
                        chunk = x[b:b + 1, :, s:s + 256]
                        n = chunk.shape[2]
                        ctx = ChunkContext(layer=layer, token_start=s, valid_tokens=n, card_tokens=prefix,
                                           positions=np.arange(s, s + n))
                        data = np.frombuffer(codec.encode_array(chunk, ctx), np.uint8)
                        out[b:b + 1, :, s:s + 256] = codec.decode_array(data, chunk.shape)
                swapped = list(tensors)
                swapped[layer] = torch.from_numpy(out).to(device=t.device, dtype=t.dtype)
                lq = logprobs(swapped, values) if which == "k" else logprobs(keys, swapped)
                kl = float((exact.exp() * (exact - lq)).sum(-1).mean())
                costs[which].append(max(kl, 0.0))  # a KL is >= 0; float noise is not information
                if progress:
                    progress(len(costs["k"]) + len(costs["v"]), steps)
    reference = (f"KL of {windows} windows x {continuation} tokens after a {prefix}-token prefix; one layer through "
                 f"cachecard.frontier (K step {k_step} centered, V step {v_step}; sinks 4, recent 32)")
    return SensitivityProfile(weights_hash=weights_hash(model), model=getattr(model.config, "name_or_path", None),
                              k=costs["k"], v=costs["v"], reference=reference)
