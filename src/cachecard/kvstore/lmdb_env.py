"""An LMDB environment for the store's index (DESIGN.md §4): one per path per process, short transactions, a
map that grows by itself. Knows nothing of what the index stores (that is :mod:`cachecard.kvstore.lmdb_index`)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterator, TypeVar

import lmdb

from cachecard.errors import StoreError, StoreFullError
from cachecard.kvstore.names import os_error

T = TypeVar("T")


class _Shared:
    """The process's one handle on an environment (LMDB forbids opening one twice in a process)."""

    def __init__(self, path: Path, map_size: int, names: Collection[str], dupsort: Collection[str]) -> None:
        self.lock = threading.RLock()  # guards resizing against transactions of other threads
        self.users = 0
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(names) + 2, subdir=True, lock=True,
                                 sync=True, metasync=True, readahead=False, max_readers=254)
        except lmdb.Error as e:
            raise StoreError(f"cannot open the index at {str(path)!r} ({e}); check the path and permissions, "
                             "or delete the index directory and run `cachecard reindex`") from e
        except OSError as e:
            raise os_error(e, f"cannot create the index at {str(path)!r}") from e
        self.dbs = {}
        with self.env.begin(write=True) as txn:
            for name in names:
                self.dbs[name] = self.env.open_db(name.encode(), txn=txn, dupsort=name in dupsort,
                                                  dupfixed=name in dupsort)


_SHARED: dict[str, _Shared] = {}
_SHARED_LOCK = threading.Lock()


class LmdbEnv:
    """Named sub-databases ``names`` (``dupsort`` ones hold sorted fixed-size duplicates) at ``path``."""

    def __init__(self, path: str | os.PathLike[str], map_size: int, names: Collection[str],
                 dupsort: Collection[str] = ()) -> None:
        self.path = Path(path).absolute()
        key = os.path.realpath(self.path)
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is None:
                shared = _SHARED[key] = _Shared(self.path, map_size, names, dupsort)
            shared.users += 1
        self._key = key
        self._s: _Shared | None = shared
        self.dbs = shared.dbs
        self.grows = 0

    @property
    def env(self) -> lmdb.Environment:
        if self._s is None:
            raise StoreError(f"the index at {str(self.path)!r} is closed")
        return self._s.env

    def close(self) -> None:
        with _SHARED_LOCK:
            if self._s is None:
                return
            self._s.users -= 1
            if self._s.users == 0:
                self._s.env.close()
                _SHARED.pop(self._key, None)
            self._s = None

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        env = self.env
        with self._s.lock:  # type: ignore[union-attr]
            while True:
                try:
                    txn = env.begin(write=False)
                    break
                except lmdb.MapResizedError:
                    env.set_mapsize(0)  # another process grew the map: adopt its size
            try:
                yield txn
            finally:
                txn.abort()

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction and commit; on a full map, grow it and run ``fn`` again."""
        env = self.env
        while True:
            with self._s.lock:  # type: ignore[union-attr]
                try:
                    with env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    env.set_mapsize(0)
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
                    self.grows += 1
                except lmdb.Error as e:
                    if "No space left" in str(e) or "Disk quota" in str(e):
                        raise StoreFullError(f"the index at {str(self.path)!r} cannot grow: the disk is full "
                                             f"({e}). Free space or evict cards; nothing committed before was "
                                             "lost") from e
                    raise

    def used_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    def map_size(self) -> int:
        return self.env.info()["map_size"]


__all__ = ["LmdbEnv"]
