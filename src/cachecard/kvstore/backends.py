"""Opening a store's index from where it is said to live: a ``redis://`` URL (the shared Redis backend), a
path (LMDB), or nothing (LMDB next to a local store, or in a per-URL cache directory for a remote one).
Adding a backend touches this module and its own, never the ``Store`` facade."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cachecard.kvstore.index import Index
from cachecard.kvstore.names import os_error

if TYPE_CHECKING:
    from cachecard.kvstore.objects import StoreObjects


def default_index_path(objects: StoreObjects) -> Path:
    """``<root>/index`` for a local store; ``$XDG_CACHE_HOME/cachecard/index/<sha256(url)[:16]>`` for a URL."""
    if not objects.remote:
        return Path(objects.path_of("index"))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "cachecard" / "index" / hashlib.sha256(objects.label.encode()).hexdigest()[:16]


def open_index(where: str | os.PathLike[str] | None, objects: StoreObjects, *, map_size: int | None = None) -> Index:
    """The index at ``where``: a Redis URL, a local directory (LMDB), or None for the store's default one."""
    if isinstance(where, str) and urlsplit(where).scheme in ("redis", "rediss", "unix"):
        from cachecard.kvstore.redis_index import RedisIndex

        return RedisIndex(where)
    from cachecard.kvstore.lmdb_index import DEFAULT_MAP_SIZE, LmdbIndex

    path = default_index_path(objects) if where is None else Path(where)
    try:
        return LmdbIndex(path, map_size=map_size or DEFAULT_MAP_SIZE)
    except OSError as e:
        raise os_error(e, "cannot create the index") from e


__all__ = ["default_index_path", "open_index"]
