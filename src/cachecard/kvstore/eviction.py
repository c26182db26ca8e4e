"""Eviction to a byte budget (DESIGN.md §4): which card goes next, least recently used first.

Store-wide, whole cards go, least recently used *leaves* first (a card that other cards continue goes only
after them), whichever agents referenced them. For one agent, only that agent's references are dropped, LRU
first, until the cards it references total at most the budget; data goes only where nothing else uses it.
The policy is a pure function of an index listing; :func:`evict` applies it one card at a time, listing
again after each removal, so it stays right while other processes (or nodes) change the store.
"""

from __future__ import annotations

from typing import Callable

from cachecard.errors import CardNotFoundError
from cachecard.kvstore.index import CardEntry, Index


def next_victim(listing: list[CardEntry], max_bytes: int, *, per_agent: bool) -> str | None:
    """The card to drop next so that ``listing`` (the store's cards, or one agent's) fits ``max_bytes``, or
    None when it fits or nothing can go. Store-wide only leaves (cards nobody continues) are candidates."""
    if sum(e.record.bytes for e in listing) <= max_bytes:
        return None
    pool = listing if per_agent else [e for e in listing if not e.children]
    if not pool:
        return None
    return min(pool, key=lambda e: e.accessed).record.card_id


def evict(index: Index, delete: Callable[[str, str | None], list[str]], max_bytes: int,
          agent: str | None = None) -> list[str]:
    """Drop cards (or ``agent``'s references) chosen by :func:`next_victim` until the budget holds; ``delete``
    is the store's ``delete(card_id, agent)``. Returns the ids of cards whose data was removed."""
    freed: list[str] = []
    while True:
        victim = next_victim(index.listing(agent), max_bytes, per_agent=agent is not None)
        if victim is None:
            return freed
        try:
            freed += delete(victim, agent)
        except CardNotFoundError:
            continue  # removed concurrently


__all__ = ["evict", "next_victim"]
