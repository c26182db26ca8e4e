"""Batched mlx-lm inference over a block pool (DESIGN.md §4 "Hot tier", §6 MLX).

mlx-lm attention layers ask their cache for ``offset`` (RoPE positions), ``make_mask``, and
``update_and_fetch(keys, values)``; a cache with ``bits`` and ``group_size`` makes them attend with
``quantized_scaled_dot_product_attention`` (``mx.quantized_matmul`` on packed codes, scales and biases: K/V
are never dequantized). :class:`MLXPoolCache` is such a cache for a batch of pool agents: new K/V are
quantized by ``mx.quantize`` into the agents' blocks (MLX affine rows are exactly what it returns), and each
layer gets the batch's ``(packed, scales, biases)`` gathered from the blocks in the batch layout of
``cachecard.pool.session`` (padding columns are zero codes, zero scales and a mask). The pool's resident codec
must be ``q4`` or ``mlx8`` with scales in the model's element type, as mlx-lm's ``QuantizedKVCache`` keeps
them.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from cachecard.adapters.mlx import to_mlx as _mx
from cachecard.adapters.mlx import to_numpy as _np
from cachecard.errors import PoolError
from cachecard.manifest import ModelIdentity
from cachecard.pool.codecs import AFFINE_GROUP
from cachecard.pool.pool import BlockPool
from cachecard.pool.session import Forward, Session


class _Layer:
    """One layer's cache as mlx-lm's attention sees it."""

    def __init__(self, parent: MLXPoolCache, index: int) -> None:
        self._parent = parent
        self._index = index
        self.bits = parent.pool.codec.bits
        self.group_size = AFFINE_GROUP

    @property
    def offset(self) -> mx.array:
        return self._parent._offsets

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_: Any) -> mx.array:
        if window_size is not None:
            raise PoolError("the pool batches full attention only (no sliding window)")
        return self._parent._mask(n)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        return self._parent._update(self._index, keys, values)

    @property
    def state(self) -> Any:
        raise PoolError("an MLXPoolCache layer has no state of its own: its KV lives in the pool")


class MLXPoolCache:
    """A batch of pool agents as an mlx-lm prompt cache: ``model(cache.feed(tokens), cache=cache)``.

    Parameters
    ----------
    pool
        A ``BlockPool`` with ``backend="numpy"``, codec ``q4`` or ``mlx8`` and ``scale_dtype`` the model's
        type.
    agents
        The agents of this batch, pinned until :meth:`close`.
    identity
        The model's identity (``cachecard.adapters.mlx.model_identity``); must be the pool's.
    """

    def __init__(self, pool: BlockPool, agents: Sequence[str], *, identity: ModelIdentity) -> None:
        from cachecard.identity import check_identity

        if pool.backend != "numpy" or pool.codec.kind != "affine":
            raise PoolError("MLXPoolCache needs a pool with backend='numpy' and an MLX affine codec ('q4' or "
                            f"'mlx8'); this one has backend {pool.backend!r} and codec {pool.codec.name!r}")
        if pool.codec.scale_dtype != identity.kv_dtype:
            raise PoolError(f"mlx-lm's quantized attention takes scales in the model's type ({identity.kv_dtype}); "
                            f"the pool keeps them in {pool.codec.scale_dtype}: make it with "
                            f"scale_dtype={identity.kv_dtype!r}")
        check_identity(identity, pool.identity, what="the model this batch runs on")
        self.pool = pool
        self.session = Session(pool, agents)
        self.layers = [_Layer(self, i) for i in range(pool.identity.num_layers)]
        self._offsets = mx.zeros((self.session.batch,), dtype=mx.int32)
        self._plan: Forward | None = None

    # -- a list of layer caches, as mlx-lm models take it ----------------------------------------------------
    def __getitem__(self, i: int) -> _Layer:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):  # noqa: ANN204
        return iter(self.layers)

    # -- driving it ------------------------------------------------------------------------------------------
    def feed(self, new_tokens: Sequence[Sequence[int]], *, reserve: int = 0) -> mx.array:
        """The next inputs ``(batch, Q)``: each agent's pending tokens then ``new_tokens[b]``, left-padded."""
        f = self.session.feed(new_tokens, reserve=reserve)
        q = f.input_ids.shape[1]
        self._offsets = mx.array([n - (q - k) for n, k in zip(f.lengths, f.inputs)], dtype=mx.int32)
        return mx.array(f.input_ids.astype(np.int32))

    def generate(self, model: Any, new_tokens: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each agent after ``new_tokens``; the last generated token stays pending."""
        x = self.feed(new_tokens, reserve=max_new_tokens)
        out: list[list[int]] = [[] for _ in range(self.session.batch)]
        for step in range(max_new_tokens):
            nxt = mx.argmax(model(x, cache=self)[:, -1, :], axis=-1)
            ids = np.array(nxt).tolist()
            for row, t in zip(out, ids):
                row.append(int(t))
            if step + 1 < max_new_tokens:
                x = self.feed([[t] for t in ids])
        self.session.hold([[row[-1]] for row in out])
        return out

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> MLXPoolCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the layers do ----------------------------------------------------------------------------------
    def _mask(self, n: int) -> mx.array:
        s = self.session
        keys = np.concatenate([s.colmask, s.upcoming(n)], axis=1)    # (B, W + n): real columns
        causal = np.arange(s.width + n)[None, :] <= (s.width + np.arange(n))[:, None]
        return mx.array(keys[:, None, None, :] & causal[None, None])  # (B, 1, n, W + n)

    def _update(self, layer: int, keys: mx.array, values: mx.array):  # noqa: ANN202
        s, pool = self.session, self.pool
        if layer == 0:
            self._plan = s.begin_forward(keys.shape[2])
        f = self._plan
        if f is None:
            raise PoolError(f"layer {layer} ran before layer 0 in this forward")
        codec = pool.codec
        out = []
        for which, states in ((0, keys), (1, values)):
            q = mx.quantize(states, group_size=AFFINE_GROUP, bits=codec.bits)
            mx.eval(q)
            rows = codec.rows_from_affine(*(_np(a) for a in q))        # (B, H, q, R)
            if len(f.new_b):
                pool.arena.write_np(layer, which, f.slot_blocks, f.slot_offsets,
                                    rows.transpose(1, 0, 2, 3)[:, f.new_b, f.new_t])
            g = pool.arena.gather(layer, which, f.all_blocks)[:, f.src]  # (H, tokens, R)
            ws = np.zeros((s.batch, g.shape[0], f.width, codec.row_bytes), dtype=np.uint8)
            ws.transpose(1, 0, 2, 3)[:, f.dst_b, f.dst_col] = g
            out.append(tuple(_mx(a) for a in codec.affine_from_rows(ws)))
        if s.end_layer():
            self._offsets = mx.array([len(a.ids) for a in s.agents], dtype=mx.int32)
        return out[0], out[1]


__all__ = ["MLXPoolCache"]
