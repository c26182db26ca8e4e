"""Making an agent resident (DESIGN.md §4 "Hot tier": shared prefix blocks, reload through the restore path).

An agent without blocks (new, or evicted) gets them in this order: full blocks of its sequence that the pool
already holds (registered by another agent with the same model, codec and tokens: referenced, not copied);
then what its cards in the store hold (read as stored bytes, ``persist.read_into``); whatever is left is
pending and the next forward computes it. At least one token of the sequence always stays pending, so the
forward that follows has a last token to produce logits from.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cachecard.pool import persist
from cachecard.pool.blocks import chain

if TYPE_CHECKING:
    from cachecard.pool.pool import BlockPool, _Agent


def shared_prefix(pool: BlockPool, seq: list[int]) -> tuple[list[int], list[bytes]]:
    """The registered blocks (and their hashes) that hold the longest block-aligned prefix of ``seq``."""
    bt = pool.block_tokens
    blocks: list[int] = []
    hashes: list[bytes] = []
    if not pool.share_prefixes:
        return blocks, hashes
    h = pool._root
    for i in range(len(seq) // bt):
        h = chain(h, np.asarray(seq[i * bt:(i + 1) * bt]))
        b = pool.alloc.lookup(h)
        if b is None:
            break
        blocks.append(b)
        hashes.append(h)
    return blocks, hashes


def make_resident(pool: BlockPool, a: _Agent, keep: Sequence[_Agent]) -> None:
    """Give an agent without blocks its blocks back: shared ones, then its cards; the rest becomes pending.
    On failure (budget, store) the agent is left as it was, without blocks."""
    from cachecard.pool.pool import PoolEvent

    t0 = time.perf_counter()
    bt = pool.block_tokens
    seq, had = a.ids + a.pending, len(a.ids)
    shared, hashes = shared_prefix(pool, seq[:len(seq) - 1])
    pool.alloc.incref(shared)  # first: a cached block must not be reclaimed by the allocations below
    have = len(shared) * bt
    stored = persist.stored_prefix(pool, a) if had > have else None
    n = stored[1] if stored is not None and stored[1] > have else have
    n = max(0, min(n, len(seq) - 1))
    blocks = list(shared)
    try:
        if n > have:
            pool._make_room(pool.blocks_for(n) - len(shared), keep=keep)
            blocks += pool.alloc.allocate(pool.blocks_for(n) - len(shared))
            a.blocks = blocks  # the slots below are this agent's
            persist.read_into(pool, stored[0], have, n, lambda s, c: pool._slots(a, s, c))
    except BaseException:
        pool.alloc.decref(blocks)
        a.blocks = []
        raise
    a.blocks, a.resident = blocks, True
    a.ids, a.pending, a.hashes = seq[:n], seq[n:], hashes
    if n > have:
        a.card_id, a.stored = stored[0], n
    a.stored = min(a.stored, n)
    pool.counts["tokens_shared"] += have
    if n > have:
        pool.counts["reloads"] += 1
        pool.counts["tokens_reloaded"] += n - have
        pool.events.append(PoolEvent("reload", a.name, n - have, time.perf_counter() - t0,
                                     f"{have} tokens shared in the pool"))
    if had > n:
        pool.counts["reprefills"] += 1
        pool.counts["tokens_recomputed"] += had - n
        pool.events.append(PoolEvent("reprefill", a.name, had - n, 0.0,
                                     f"{have} tokens shared, {n - have} read from the store"))
