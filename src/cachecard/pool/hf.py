"""Batched transformers inference over a block pool (DESIGN.md §4 "Hot tier", §6 transformers 5.x).

:class:`PoolCache` is a ``transformers`` ``Cache``: attention layers call ``update(key_states, value_states,
layer_idx)`` with the new tokens' K/V (after RoPE) and attend to what it returns. Here ``update`` encodes the
new K/V with the pool's resident codec into the agents' blocks, then decodes the batch's blocks of that layer
into a transient workspace ``(batch, kv_heads, columns, head_dim)`` in the batch layout of
``cachecard.pool.session`` and returns it. With ``workspace="layer"`` (the default) a workspace lives for one
layer of one forward: the pool never holds a full-precision copy of any agent. ``workspace="batch"`` keeps
each layer's workspace for the batch's lifetime and appends the new columns (a full-precision copy of the
batch's agents only, while it runs: decode steps then skip re-decoding the whole context); both give the
same values, since new tokens are stored before they are attended to.

It works with ``model(**cache.feed(tokens))`` and ``model.generate(**cache.feed(tokens), ...)`` (then
``cache.record(generated)``), or ``cache.generate(model, tokens, ...)`` which does both.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from cachecard.errors import PoolError
from cachecard.identity import check_identity
from cachecard.manifest import ModelIdentity
from cachecard.pool.pool import BlockPool
from cachecard.pool.session import Forward, Session


class _PoolLayer(CacheLayerMixin):
    """What generate and the mask builders ask one layer: lengths, from the cache's batch layout."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, cache: PoolCache) -> None:
        super().__init__()
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):  # noqa: ANN201
        raise PoolError("PoolCache layers are updated through PoolCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1


class PoolCache(Cache):
    """A batch of pool agents as a transformers cache (one row per agent, in ``agents`` order).

    Parameters
    ----------
    pool
        A ``BlockPool`` with the torch backend on the model's device.
    agents
        The agents of this batch; they are pinned (never evicted) until :meth:`close`.
    model
        The model it will run with: its identity (bound with ``cachecard.adapters.hf.bind``, or ``identity``)
        must be the pool's.
    workspace
        ``"layer"`` or ``"batch"`` (see the module documentation).
    exact_fresh
        A forward's own new tokens attend to each other with their computed K/V, before quantization (what
        ``transformers``' ``QuantizedCache`` does for its recent tokens; KIVI's "residual"); they are stored
        quantized, and later forwards see the stored values. False: they are quantized first, as mlx-lm's
        ``QuantizedKVCache`` does (and ``cachecard.pool.mlx``).
    """

    def __init__(self, pool: BlockPool, agents: Sequence[str], model: Any = None, *,
                 identity: ModelIdentity | None = None, workspace: str = "layer", exact_fresh: bool = True) -> None:
        if pool.backend != "torch":
            raise PoolError("PoolCache needs a pool with the torch backend")
        if workspace not in ("layer", "batch"):
            raise PoolError(f"workspace must be 'layer' or 'batch'; got {workspace!r}")
        if identity is None:
            if model is None:
                raise TypeError("PoolCache needs the model (with a bound identity) or identity=")
            from cachecard.adapters.hf import identity_of

            identity = identity_of(model)
        check_identity(identity, pool.identity, what="the model this batch runs on")
        self.pool = pool
        self.session = Session(pool, agents)
        self.workspace = workspace
        super().__init__(layers=[_PoolLayer(self) for _ in range(pool.identity.num_layers)])
        self.exact_fresh = exact_fresh
        self._kept: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * pool.identity.num_layers
        self._fresh: list[tuple | None] = [None] * pool.identity.num_layers  # last forward's rows, batch mode
        self._plan: Forward | None = None
        self._rollbacks_seen = 0

    # -- driving it ------------------------------------------------------------------------------------------
    def feed(self, new_tokens: Sequence[Sequence[int]], *, reserve: int = 0) -> dict[str, Any]:
        """Inputs for ``model(**inputs)`` or ``model.generate(**inputs, ...)``: each agent's pending tokens
        then ``new_tokens[b]``, left-padded, with the attention mask over every column and the positions."""
        f = self.session.feed(new_tokens, reserve=reserve)
        device = self.pool.arena.device
        return {"input_ids": torch.from_numpy(f.input_ids).to(device),
                "attention_mask": torch.from_numpy(f.attention_mask).to(device),
                "position_ids": torch.from_numpy(f.position_ids).to(device), "past_key_values": self}

    def record(self, generated: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """After ``model.generate``: the generated ids, ``(batch, new tokens)`` (``sequences[:, Q:]``)."""
        rows = generated.tolist() if isinstance(generated, torch.Tensor) else generated
        self.session.record(rows)

    def hold(self, tokens: Sequence[Sequence[int]]) -> None:
        """After a ``model(...)`` loop: known ids without KV yet (the last one sampled), one list per agent;
        they are fed first next time."""
        self.session.hold(tokens)

    @torch.no_grad()
    def generate(self, model: Any, new_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
                 **kwargs: Any) -> list[list[int]]:
        """Feed ``new_tokens`` and generate (greedy unless ``kwargs`` say otherwise); returns each agent's
        generated ids. Stopping tokens are not special: a row that stops early is padded by generate, and
        those pads are part of its agent's sequence."""
        inputs = self.feed(new_tokens, reserve=max_new_tokens)
        kwargs.setdefault("do_sample", False)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        gen = seqs[:, inputs["input_ids"].shape[1]:]
        self.record(gen)
        return gen.tolist()

    def close(self) -> None:
        """Unpin the agents and drop the workspaces."""
        self._kept = [None] * len(self._kept)
        self._fresh = [None] * len(self._fresh)
        self.session.close()

    def __enter__(self) -> PoolCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the transformers Cache interface --------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.session.width + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != self.session.batch:
            raise PoolError(f"the model ran {key_states.shape[0]} rows; this PoolCache holds {self.session.batch} "
                            "agents, one row each (beam search and num_return_sequences > 1 are not supported)")
        if layer_idx == 0:
            self._plan = self.session.begin_forward(key_states.shape[2])
            if self.session.rollbacks != self._rollbacks_seen:  # a forward died midway: rebuild from the pool
                self._rollbacks_seen = self.session.rollbacks
                self._kept = [None] * len(self._kept)
                self._fresh = [None] * len(self._fresh)
        f = self._plan
        if f is None:
            raise PoolError(f"layer {layer_idx} ran before layer 0 in this forward")
        codec, arena = self.pool.codec, self.pool.arena
        dev = key_states.device
        nb, nt = (torch.as_tensor(x, device=dev) for x in (f.new_b, f.new_t))
        fresh = []
        for which, states in ((0, key_states), (1, value_states)):
            rows = codec.encode_torch(states.transpose(0, 1)[:, nb, nt])  # (heads, n, row_bytes)
            if len(f.new_b):
                arena.write(layer_idx, which, f.slot_blocks, f.slot_offsets, rows)
            fresh.append(rows)
        kept = self._kept[layer_idx]
        if self.workspace == "batch" and kept is not None:
            out = tuple(self._append_columns(layer_idx, w, buf, rows, f)
                        for w, (buf, rows) in enumerate(zip(kept, fresh)))
            self._fresh[layer_idx] = None
            self._kept[layer_idx] = out
        else:
            spare = max(64, f.width // 4) if self.workspace == "batch" else 0
            out = tuple(self._gather(layer_idx, which, f, key_states.dtype, spare) for which in (0, 1))
            if self.workspace == "batch":
                self._kept[layer_idx] = out
        if self.exact_fresh and len(f.new_b):  # this forward's own tokens attend to each other unquantized
            start = f.width - f.q
            for buf, states in zip(out, (key_states, value_states)):
                buf[:, :, start:f.width].transpose(0, 1)[:, nb, nt] = states.transpose(0, 1)[:, nb, nt].to(buf.dtype)
            if self.workspace == "batch":
                self._fresh[layer_idx] = (fresh, nb, nt, start)
        self.session.end_layer()
        return tuple(buf[:, :, :f.width] for buf in out)

    def _gather(self, layer: int, which: int, f: Forward, dtype: torch.dtype, spare: int) -> torch.Tensor:
        """Every agent's tokens of one layer's K or V, decoded into their columns of a zeroed workspace
        ``(batch, heads, width + spare, head_dim)``."""
        arena, codec = self.pool.arena, self.pool.codec
        g = arena.gather(layer, which, f.all_blocks)  # (heads, blocks * block_tokens, row_bytes)
        dev = g.device
        dec = codec.decode_torch(g.index_select(1, torch.as_tensor(f.src, device=dev)), dtype)  # (heads, T, D)
        ws = torch.zeros((self.session.batch, g.shape[0], f.width + spare, codec.head_dim), dtype=dtype, device=dev)
        db, dc = (torch.as_tensor(x, device=dev) for x in (f.dst_b, f.dst_col))
        ws.transpose(0, 1)[:, db, dc] = dec
        return ws

    def _append_columns(self, layer: int, which: int, buf: torch.Tensor, rows: torch.Tensor,
                        f: Forward) -> torch.Tensor:
        """A kept workspace with this forward's columns decoded from their freshly stored rows (grown when
        full); the previous forward's columns, held unquantized for it, become their stored values again."""
        codec = self.pool.codec
        start = f.width - f.q
        if self._fresh[layer] is not None:
            old, onb, ont, ostart = self._fresh[layer]
            cols = buf[:, :, ostart:start]
            cols.transpose(0, 1)[:, onb, ont] = codec.decode_torch(old[which], buf.dtype)
        if f.width > buf.shape[2]:
            grown = torch.zeros((*buf.shape[:2], f.width + max(64, f.width // 4), buf.shape[3]), dtype=buf.dtype,
                                device=buf.device)
            grown[:, :, :start] = buf[:, :, :start]
            buf = grown
        cols = buf[:, :, start:f.width]
        cols.zero_()
        nb, nt = (torch.as_tensor(x, device=buf.device) for x in (f.new_b, f.new_t))
        cols.transpose(0, 1)[:, nb, nt] = codec.decode_torch(rows, buf.dtype)
        return buf

    # -- what a pool batch does not support ------------------------------------------------------------------
    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise PoolError("PoolCache rows are agents: beam search, assisted decoding and cropping are not "
                        "supported (use greedy decoding or sampling, one sequence per agent)")

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported


__all__ = ["PoolCache"]
