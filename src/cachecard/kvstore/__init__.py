"""Agent memory over cards (spec/store-1.md). The card format itself lives in ``cachecard.card``.

Layout (data flows store -> index / objects; nothing below imports ``store``):

- ``store``: the :class:`Store` facade (put / match / load / handoff / delete / evict / gc / verify / reindex);
- ``index``: the index interface (:class:`Index`, a Protocol) and its typed records; ``backends`` opens one;
- ``lmdb_index``: the embedded LMDB backend (the only module that knows its byte layout);
- ``prefix``: the prefix-hash scheme every backend files sequences under (spec/store-1.md §3);
- ``objects``: the store's objects (cards, references, the store marker) on a directory or an fsspec URL;
- ``maintenance``: collect, gc, verify and reindex as functions over (objects, index);
- ``eviction``: the LRU policy that brings a store or an agent down to a byte budget;
- ``names``: agent and card id rules, store constants.
"""

import warnings as _warnings

from cachecard.kvstore.index import CardEntry, CardRecord, Index, IndexEntry, IndexStats, Match, PendingPut, PutPlan
from cachecard.kvstore.prefix import SequenceKeys, TailEntry, keys_of, model_key
from cachecard.kvstore.store import CardInfo, Store, open_store

__all__ = ["CardEntry", "CardInfo", "CardRecord", "Index", "IndexEntry", "IndexStats", "Match", "PendingPut", "PutPlan",
           "SequenceKeys", "Store", "TailEntry", "keys_of", "model_key", "open_store"]

# Deprecated in 0.2 (the card format moved to cachecard.card); removed in 0.3.
_MOVED = {"Card", "VerifyReport", "open_card", "read_card", "verify_card", "write_card"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        _warnings.warn(f"cachecard.kvstore.{name} moved to cachecard.card.{name} (also cachecard.{name}); the old "
                       "name goes away in 0.3", DeprecationWarning, stacklevel=2)
        import cachecard.card

        return getattr(cachecard.card, name)
    raise AttributeError(f"module 'cachecard.kvstore' has no attribute {name!r}")
