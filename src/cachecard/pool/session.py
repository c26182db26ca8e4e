"""Agents stepping together over a block pool: the batch layout both runtimes use (DESIGN.md §4 "Hot tier").

A batch is a grid of columns. Its first columns hold each agent's past tokens, right-aligned (left padding);
then each forward appends as many columns as it has inputs, a row's inputs left-padded when agents feed
different numbers of tokens. A padding column holds no token: the attention mask hides it, nothing is stored
for it, and positions count only real tokens, so every agent attends to exactly its own sequence. Row ``b``'s
real columns are, in order, its agent's tokens; the K/V a layer attends to is built from the agent's blocks
into those columns (``cachecard.pool.hf``, ``cachecard.pool.mlx``).

A forward reserves pool slots for its real tokens at its first layer; if it never reaches its last layer (an
exception in the model), the next forward or ``close`` rolls the agents back to before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cachecard.errors import PoolError
from cachecard.pool.pool import UNKNOWN, BlockPool, _Agent


@dataclass(frozen=True)
class Feed:
    """Inputs of the next forward: ``input_ids`` ``(B, Q)`` (left-padded), ``attention_mask`` over every
    column so far plus these, and each real token's ``position_ids`` (its index in its agent's sequence)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    lengths: list[int]       # tokens each agent had before these
    inputs: list[int]        # real inputs per row (pending tokens + the new ones)


@dataclass(frozen=True)
class Forward:
    """One forward's plan, the same for every layer."""

    q: int                   # columns this forward adds
    width: int               # columns including them
    new_b: np.ndarray        # row of each real new token
    new_t: np.ndarray        # its column within this forward
    slot_blocks: np.ndarray  # its pool slot
    slot_offsets: np.ndarray
    all_blocks: np.ndarray   # every row's block table, concatenated
    src: np.ndarray          # index of each agent token in the decoded blocks (block-major, token order)
    dst_b: np.ndarray        # its row
    dst_col: np.ndarray      # its column
    before: list[int]        # tokens each agent had before this forward (for a roll back)
    width_before: int
    queued: tuple[np.ndarray, np.ndarray] | None  # the feed columns this forward consumed


class Session:
    """Agents of one pool pinned together for batched forwards. Use as a context manager (``close``)."""

    def __init__(self, pool: BlockPool, agents: Sequence[str]) -> None:
        if not agents:
            raise PoolError("a batch needs at least one agent")
        self.pool = pool
        self.names = list(agents)
        self.agents: list[_Agent] = pool._pin(self.names)
        self.width = 0
        self.colmask = np.zeros((len(self.agents), 0), dtype=bool)
        self._queue: tuple[np.ndarray, np.ndarray] | None = None  # (mask, ids) of fed columns not yet run
        self._started = False
        self._forward: Forward | None = None
        self._layers_done = 0
        self.rollbacks = 0  # forwards taken back (a runtime's workspaces of this batch are stale after one)
        self.closed = False

    @property
    def batch(self) -> int:
        return len(self.agents)

    # -- feeding --------------------------------------------------------------------------------------------
    def feed(self, new_tokens: Sequence[Sequence[int]], *, reserve: int = 0) -> Feed:
        """Lay out the next inputs: each agent's pending tokens (the last generated one, or tokens to
        recompute after an eviction without a store) then ``new_tokens[b]``. ``reserve`` keeps room for that
        many more tokens per agent (e.g. ``max_new_tokens``), evicting other agents now rather than mid-way."""
        self._check_open()
        self._settle()
        if len(new_tokens) != self.batch:
            raise PoolError(f"need one token list per agent ({self.batch}); got {len(new_tokens)}")
        if self._queue is not None and self._queue[0].shape[1]:
            raise PoolError(f"{self._queue[0].shape[1]} columns of the previous feed were not run through the "
                            "model yet; run them before feeding more")
        new = [[int(t) for t in np.asarray(seq).reshape(-1)] for seq in new_tokens]
        if any(t < 0 for seq in new for t in seq):
            raise PoolError("token ids must be >= 0")
        # an evicted agent always has one (its last token is recomputed); a resident one needs one fed
        empty = [a.name for a, s in zip(self.agents, new) if not s and not a.pending and (a.resident or not a.ids)]
        if empty:
            raise PoolError(f"agents {empty} have no token to feed: a forward needs at least one per agent")
        self.pool._prepare(self.agents, new, reserve)
        with self.pool.lock:
            if not self._started:  # the past: each agent's tokens, right-aligned
                lens = [len(a.ids) for a in self.agents]
                p = max(lens)
                self.colmask = np.arange(p)[None, :] >= (p - np.asarray(lens))[:, None]
                self.width, self._started = p, True
            inputs = [a.pending for a in self.agents]
            lengths = [len(a.ids) for a in self.agents]
            for a in self.agents:
                a.pending = []
        q = max(len(x) for x in inputs)
        mask = np.zeros((self.batch, q), dtype=bool)
        ids = np.zeros((self.batch, q), dtype=np.int64)
        pos = np.zeros((self.batch, q), dtype=np.int64)
        for b, (x, n0) in enumerate(zip(inputs, lengths)):
            mask[b, q - len(x):] = True
            ids[b, q - len(x):] = x
            pos[b, q - len(x):] = np.arange(n0, n0 + len(x))
        self._queue = (mask, ids)
        full = np.concatenate([self.colmask, mask], axis=1).astype(np.int64)
        return Feed(ids, full, pos, lengths, [len(x) for x in inputs])

    # -- forwards --------------------------------------------------------------------------------------------
    def begin_forward(self, q: int) -> Forward:
        """Called at a forward's first layer with its number of columns: reserve slots for its real tokens
        (fed columns first; beyond them, one generated token per row and step, id unknown until ``record``)."""
        self._check_open()
        self._settle()
        if not self._started:
            raise PoolError("feed the batch (feed(...)) before running the model on it")
        queued = rest = None
        if self._queue is not None and self._queue[0].shape[1]:
            mask, ids = self._queue
            if q > mask.shape[1]:
                raise PoolError(f"the model ran {q} columns; {mask.shape[1]} were fed")
            queued = (mask[:, :q], ids[:, :q])
            rest = (mask[:, q:], ids[:, q:])  # the queue advances only once the slots are there
            mask, ids = queued
        else:
            mask = np.ones((self.batch, q), dtype=bool)
            ids = np.full((self.batch, q), UNKNOWN, dtype=np.int64)
        new_b, new_t = np.nonzero(mask)
        slot_b = np.empty(len(new_b), dtype=np.int64)
        slot_o = np.empty(len(new_b), dtype=np.int64)
        before = [len(a.ids) for a in self.agents]
        pool = self.pool
        with pool.lock:
            try:
                # room for every row first, so a full budget fails before any agent changed
                grow = sum(pool.blocks_for(len(a.ids) + int(mask[b].sum())) - len(a.blocks)
                           + pool._shared_in_write(a) for b, a in enumerate(self.agents))
                pool._make_room(grow, keep=self.agents)
                for b, a in enumerate(self.agents):
                    at = new_b == b
                    slot_b[at], slot_o[at] = pool._append(a, ids[b][mask[b]].tolist(), keep=self.agents)
                    a.busy = True
            except BaseException:
                self._take_back(before)  # agents appended to before the failure
                raise
            tables = [np.asarray(a.blocks, dtype=np.int64) for a in self.agents]
            lens = [len(a.ids) for a in self.agents]
        if rest is not None:
            self._queue = rest
        width_before = self.width
        self.colmask = np.concatenate([self.colmask, mask], axis=1)
        self.width += q
        bt = pool.block_tokens
        starts = np.cumsum([0] + [len(t) for t in tables[:-1]]) * bt
        src = np.concatenate([s + np.arange(n) for s, n in zip(starts, lens)])
        dst_b, dst_col = np.nonzero(self.colmask)
        self._forward = Forward(q, self.width, new_b, new_t, slot_b, slot_o, np.concatenate(tables), src, dst_b,
                                dst_col, before, width_before, queued)
        self._layers_done = 0
        return self._forward

    def end_layer(self) -> bool:
        """Count a finished layer; True when the forward is complete."""
        self._layers_done += 1
        if self._layers_done == self.pool.identity.num_layers:
            self._forward = None
            with self.pool.lock:
                for a in self.agents:
                    a.busy = False
            return True
        return False

    def _settle(self) -> None:
        """Roll back a forward that never finished its layers: its tokens' KV is incomplete."""
        f = self._forward
        if f is None:
            return
        self._take_back(f.before)
        self.rollbacks += 1
        self.colmask = self.colmask[:, :f.width_before]
        self.width = f.width_before
        if f.queued is not None and self._queue is not None:
            self._queue = tuple(np.concatenate([x, y], axis=1) for x, y in zip(f.queued, self._queue))
        self._forward = None

    def _take_back(self, before: Sequence[int]) -> None:
        """Agents back to ``before[b]`` tokens: their later ids and the blocks past their tokens go (a block
        left past an agent's tokens would be shared by a fork and then written by both)."""
        pool = self.pool
        with pool.lock:
            for a, n in zip(self.agents, before):
                del a.ids[n:]
                a.hashes = a.hashes[:n // pool.block_tokens]
                keep = pool.blocks_for(n) if a.resident else 0
                if len(a.blocks) > keep:
                    pool.alloc.decref(a.blocks[keep:])
                    del a.blocks[keep:]
                a.busy = False

    # -- after generation ------------------------------------------------------------------------------------
    def record(self, generated: Sequence[Sequence[int]]) -> None:
        """Tell the pool the ids ``generate`` produced, one list per row (all of them, in order): every one
        but the last has KV now; the last becomes pending, fed before the agent's next tokens."""
        self._check_open()
        if len(generated) != self.batch:
            raise PoolError(f"need one list of generated ids per agent ({self.batch}); got {len(generated)}")
        with self.pool.lock:
            for a, gen in zip(self.agents, generated):
                gen = [int(t) for t in np.asarray(gen).reshape(-1)]
                holes = len(a.ids) - next((i + 1 for i in range(len(a.ids) - 1, -1, -1) if a.ids[i] != UNKNOWN), 0)
                if not gen or holes != len(gen) - 1:
                    raise PoolError(f"agent {a.name!r} ran {holes} generation steps; {len(gen)} generated ids do "
                                    "not fit (pass every generated id of this batch's last generate call)")
                if holes:
                    a.ids[-holes:] = gen[:-1]
                a.pending = gen[-1:]

    def hold(self, tokens: Sequence[Sequence[int]]) -> None:
        """Add known tokens (e.g. the last one sampled) to each agent's pending tokens: they are fed first next
        time."""
        self._check_open()
        if len(tokens) != self.batch:
            raise PoolError(f"need one token list per agent ({self.batch}); got {len(tokens)}")
        with self.pool.lock:
            for a, t in zip(self.agents, tokens):
                a.pending += [int(x) for x in np.asarray(t).reshape(-1)]

    def upcoming(self, n: int) -> np.ndarray:
        """Which of the next forward's ``n`` columns hold a token, ``(batch, n)``: fed columns first, then one
        generated token per row and step."""
        if self._queue is not None and self._queue[0].shape[1]:
            return self._queue[0][:, :n]
        return np.ones((self.batch, n), dtype=bool)

    def close(self) -> None:
        """Unpin the agents; fed tokens the model did not run go back to pending."""
        if self.closed:
            return
        self._settle()
        with self.pool.lock:
            if self._queue is not None:
                for b, a in enumerate(self.agents):
                    mask, ids = self._queue
                    a.pending = ids[b][mask[b]].tolist() + a.pending
            self.pool._unpin(self.agents)
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise PoolError("this batch is closed; open a new one")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Feed", "Forward", "Session"]
