"""Agent memory over cards (spec/store-1.md): the Store facade, its prefix index, objects, maintenance and
eviction. The card format itself lives in ``cachecard.card``."""

import warnings as _warnings

from cachecard.kvstore.store import Match, Store, open_store

__all__ = ["Match", "Store", "open_store"]

# Deprecated in 0.2 (the card format moved to cachecard.card); removed in 0.3.
_MOVED = {"Card", "VerifyReport", "open_card", "read_card", "verify_card", "write_card"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        _warnings.warn(f"cachecard.kvstore.{name} moved to cachecard.card.{name} (also cachecard.{name}); the old "
                       "name goes away in 0.3", DeprecationWarning, stacklevel=2)
        import cachecard.card

        return getattr(cachecard.card, name)
    raise AttributeError(f"module 'cachecard.kvstore' has no attribute {name!r}")
