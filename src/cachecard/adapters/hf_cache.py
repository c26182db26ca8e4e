"""Preallocated transformers caches for restores: no whole-cache copy in the step after a restore (spec §10).

transformers' ``DynamicCache`` concatenates every new token onto the whole cache (``torch.cat``): after a
restore of N tokens, the first step copies all N tokens of every layer. Two ways around it:

- :func:`dynamic_cache` builds a ``DynamicCache`` whose full-attention layers are :class:`HeadroomLayer`s:
  the restored KV sits in buffers with room for ``headroom`` more tokens, and new tokens are written in place
  while the room lasts (then it falls back to concatenation). Nothing changes for the user.
- :class:`Slot` is a ``StaticCache`` of a fixed length, allocated once per model and reused by every restore
  (restores write into its buffers), with an optional ``torch.compile(mode="reduce-overhead")`` step, so on a
  GPU the step after a restore replays a CUDA graph captured once per process and length, not per restore.
  ``slot.cache`` feeds ``model.generate`` like any static cache.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from cachecard.adapters.torch_read import read_kv
from cachecard.card.reader import Card

DEFAULT_HEADROOM = 256  # tokens of room after a restore (mlx-lm grows its cache in steps of 256 too)


class HeadroomLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of larger buffers: ``update`` writes new tokens into the
    room left (no copy of the cache) and concatenates, as ``DynamicLayer`` does, once the room is used up or
    the tensors were replaced (crop, reorder, batch selection)."""

    def __init__(self, k_room: torch.Tensor, v_room: torch.Tensor, tokens: int) -> None:
        super().__init__()
        self._k_room, self._v_room = k_room, v_room
        self.lazy_initialization(k_room[:, :, :tokens], v_room[:, :, :tokens])
        self.keys, self.values = k_room[:, :, :tokens], v_room[:, :, :tokens]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.keys.shape[-2], key_states.shape[-2]
        fits = (self._k_room is not None and n + m <= self._k_room.shape[-2]
                and self.keys.data_ptr() == self._k_room.data_ptr()
                and self.values.data_ptr() == self._v_room.data_ptr()
                and key_states.shape[0] == self.keys.shape[0])
        if not fits:
            self._k_room = self._v_room = None  # the tensors were replaced or the room is full
            return super().update(key_states, value_states, *args, **kwargs)
        self._k_room[:, :, n:n + m] = key_states
        self._v_room[:, :, n:n + m] = value_states
        self.keys, self.values = self._k_room[:, :, :n + m], self._v_room[:, :, :n + m]
        return self.keys, self.values


def room(model: Any, tokens: int, *, headroom: int = DEFAULT_HEADROOM, device: torch.device,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers ``[layers, 1, heads, tokens + headroom, head_dim]`` for K and V."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, tokens + headroom, head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def dynamic_cache(k_room: torch.Tensor, v_room: torch.Tensor, tokens: int, config: Any) -> DynamicCache:
    """A DynamicCache over restored buffers: full-attention layers keep the room, sliding-window layers
    (which keep only their window) take the tokens through their own ``update``."""
    cache = DynamicCache(config=config)
    for i in range(len(cache.layers)):
        if type(cache.layers[i]) is DynamicLayer:
            cache.layers[i] = HeadroomLayer(k_room[i], v_room[i], tokens)
        else:
            cache.update(k_room[i, :, :, :tokens], v_room[i, :, :, :tokens], i)
    return cache


class Slot:
    """A static cache of ``max_cache_len`` tokens for one model, reused by every restore into it.

    Parameters
    ----------
    model
        A transformers causal LM whose layers are all full attention (sliding-window models: use the
        dynamic restore).
    max_cache_len
        Tokens the slot holds: the longest restored prefix plus the tokens generated after it.
    compile
        Wrap the step in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Default: on CUDA devices.
        The first step of each slot compiles (tens of seconds); later ones replay.
    """

    def __init__(self, model: Any, max_cache_len: int, *, compile: bool | None = None) -> None:
        cfg = model.config.get_text_config()
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise ValueError("Slot needs a model whose layers are all full attention; restore sliding-window "
                             "models with hf.restore (a dynamic cache)")
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.model, self.max_cache_len = model, max_cache_len
        self.device, self.dtype = param.device, param.dtype
        self.keys, self.values = room(model, max_cache_len, headroom=0, device=self.device, dtype=self.dtype)
        # Attention reads every position and masks the unwritten ones: 0 * NaN from uninitialised memory
        # would still poison the output, so the slot starts finite (once, at construction).
        self.keys.zero_()
        self.values.zero_()
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        for i, layer in enumerate(self.cache.layers):
            _adopt(layer, self.keys[i], self.values[i])
        self.tokens = 0
        use_compile = self.device.type == "cuda" if compile is None else compile
        self._forward: Callable[..., Any] = (
            torch.compile(model.forward, mode="reduce-overhead", fullgraph=False, dynamic=False)
            if use_compile else model.forward)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V buffers ``[layers, heads, max_cache_len, head_dim]`` (what restores write into)."""
        return self.keys[:, 0], self.values[:, 0]

    def set_length(self, tokens: int) -> None:
        """Declare the first ``tokens`` tokens of the buffers valid (after a restore wrote them)."""
        if not 0 <= tokens <= self.max_cache_len:
            raise ValueError(f"the slot holds {self.max_cache_len} tokens; cannot hold {tokens}")
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(tokens)
        self.tokens = tokens

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position after feeding ``input_ids`` (``[1, m]``) on top of the cache."""
        m = input_ids.shape[-1]
        if self.tokens + m > self.max_cache_len:
            raise ValueError(f"the slot holds {self.max_cache_len} tokens; {self.tokens} + {m} do not fit")
        out = self._forward(input_ids=input_ids.to(self.device), past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1)
        self.tokens += m
        return out.logits[:, -1]


def restore_parts(parts: list[tuple[Card, int]], model: Any, *, device: str | torch.device | None,
                  dtype: torch.dtype, slot: Slot | None = None) -> DynamicCache | StaticCache:
    """Cards (a parent chain, parents first, each with how many of its tokens count) read one after the other
    into one cache's buffers: a headroom DynamicCache, or ``slot``'s static cache."""
    total = sum(n for _, n in parts)
    if slot is not None:
        if slot.model is not model:
            raise ValueError("the slot belongs to another model")
        keys, values = slot.buffers()
        if total > keys.shape[2]:
            raise ValueError(f"the slot holds {keys.shape[2]} tokens; the restore needs {total}")
    else:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        k_room, v_room = room(model, total, device=device, dtype=dtype)
        keys, values = k_room[:, 0], v_room[:, 0]
    start = 0
    for card, n in parts:
        read_kv(card, n, device=keys.device, dtype=keys.dtype, into=(keys[:, :, start:], values[:, :, start:]))
        start += n
    if slot is not None:
        slot.set_length(total)
        return slot.cache
    return dynamic_cache(k_room, v_room, total, model.config)


def _adopt(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a transformers ``StaticLayer`` our buffers (what its ``lazy_initialization`` would allocate)."""
    layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])  # sets dtype, device, heads, cumulative length
    layer.keys, layer.values = keys, values
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)


__all__ = ["DEFAULT_HEADROOM", "HeadroomLayer", "Slot", "dynamic_cache", "restore_parts", "room"]
