"""A node's read-through cache of hot cards on local disk (spec/store-1.md §4): bounded, least recently used out.

Cards are immutable and never reuse an id, so a cached copy is never stale: the index decides whether a card
exists, the cache only saves the trip to the object store. A copy is fetched under a hidden staging name and
renamed into place, so several processes of one node can share one cache directory; a copy removed by another
process while being read shows up as a read error, and the store then reads from the object store again.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from cachecard.errors import StoreError
from cachecard.kvstore.names import CARD_ID_RE

DEFAULT_CACHE_BYTES = 8 << 30


class CardCache:
    """Whole cards under ``root/<id[:2]>/<id>``, at most ``max_bytes`` in all (the card just added excepted)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise StoreError(f"cache_bytes must be a non-negative integer; got {max_bytes!r}")
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the card cache at {str(self.root)!r} ({e}); pick another cache_dir") from e

    def _dir(self, card_id: str) -> Path:
        return self.root / card_id[:2] / card_id

    def get(self, card_id: str, fetch: Callable[[Path], None]) -> Path:
        """The local copy of ``card_id``; on a miss ``fetch(staging_dir)`` copies the card's objects there."""
        dest = self._dir(card_id)
        if dest.is_dir() and not dest.is_symlink():
            self.hits += 1
            try:
                os.utime(dest)  # last use, for LRU across the processes sharing this cache
            except FileNotFoundError:
                pass
            else:
                return dest
        self.misses += 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = dest.parent / f".{card_id}.partial-{uuid.uuid4().hex}"
        try:
            fetch(stage)
            try:
                os.rename(stage, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                # another process of this node placed the same card first: use its copy
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.shrink(keep=card_id)
        return dest

    def drop(self, card_id: str) -> None:
        """Forget a copy (it failed to read): the next :meth:`get` fetches it again."""
        self._remove(self._dir(card_id))

    def _remove(self, path: Path) -> None:
        trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every cached card."""
        out = []
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                if not (CARD_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
                    continue
                try:
                    size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(e.path) for f in fs)
                    out.append((e.stat(follow_symlinks=False).st_mtime, size, Path(e.path)))
                except FileNotFoundError:
                    continue  # removed meanwhile
        return out

    def shrink(self, keep: str | None = None) -> list[str]:
        """Remove least recently used copies until the cache fits ``max_bytes``; return their ids."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path.name == keep:
                continue
            self._remove(path)
            total -= size
            removed.append(path.name)
        return removed

    def bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())


__all__ = ["DEFAULT_CACHE_BYTES", "CardCache"]
