"""The store's LMDB index: prefix blocks, card records, agent references (derived data; ``reindex`` rebuilds it).

Keys are **chained block hashes**, the same in every process and on every machine (never Python ``hash()``):

    h_-1 = model_key                                   (32 bytes: SHA-256 of the model identity, see below)
    h_i  = BLAKE2b-128(h_{i-1} || tokens[iB:(i+1)B])   (tokens as little-endian int32, key ``person`` below)

``model_key`` is the SHA-256 of the RFC 8785 JSON of the card manifest's ``ModelIdentity`` without ``name``,
so two processes agree on it exactly when the identity check of spec §6 would. A card indexes every full
block of its *whole* sequence (its parent's prefix included), so the set of indexed blocks is prefix-closed
and the longest cached prefix is found by binary search over the query's chain. A card whose length is not a
multiple of ``B`` also indexes its tail: under the key of its last full block (or ``model_key[:16]``), the value
``card_id || u32 tail_len || H(h_last, tail tokens)``, so a match can end exactly where a card ends.

Named sub-databases (values are small fixed binary structs or JSON; never pickle):

============ ============================================ =====================================================
db           key                                          value
============ ============================================ =====================================================
``meta``     ASCII name                                   JSON
``cards``    card id (16 bytes)                           JSON record (model, start, tokens, parent, bytes, …)
``cblocks``  card id                                      the card's block hashes, concatenated (16 bytes each)
``blocks``   block hash (16, dupsort, dupfixed)           card id (16)
``tails``    last full block hash (16, dupsort, dupfixed) card id (16) || u32 tail length || tail hash (16)
``refs``     agent (UTF-8) || 0x00 || card id             f64 time the reference was added
``owners``   card id || agent                             empty
``children`` parent card id || child card id              empty (a child, committed or being written)
``pending``  card id                                      JSON (parent, agent, time) of a put in progress
``atime``    card id                                      f64 last access time (LRU)
============ ============================================ =====================================================
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lmdb
import numpy as np
import rfc8785

from cachecard.errors import StoreError, StoreFullError
from cachecard.manifest import ModelIdentity

PERSON = b"cachecard.blk.v1"   # BLAKE2b personalization: block hashes of this scheme, version 1
HASH_BYTES = 16
INDEX_VERSION = 1
DEFAULT_MAP_SIZE = 64 << 20
DBS = ("meta", "cards", "cblocks", "blocks", "tails", "refs", "owners", "children", "pending", "atime")
_DUP = {"blocks", "tails"}
_TAIL = struct.Struct("<16sI16s")
_F64 = struct.Struct("<d")

T = TypeVar("T")


# -- hashing -------------------------------------------------------------------------------------------------
_MODEL_KEYS: dict[int, tuple[ModelIdentity, bytes]] = {}


def model_key(model: ModelIdentity) -> bytes:
    """SHA-256 of the identity's RFC 8785 JSON without ``name`` (32 bytes). Cached per (frozen) identity
    object: serializing it costs more than a whole prefix lookup."""
    hit = _MODEL_KEYS.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    key = hashlib.sha256(rfc8785.dumps(model.model_dump(mode="json", exclude={"name"}))).digest()
    if len(_MODEL_KEYS) > 256:
        _MODEL_KEYS.clear()
    _MODEL_KEYS[id(model)] = (model, key)
    return key


def _h(prev: bytes, raw: bytes) -> bytes:
    return hashlib.blake2b(prev + raw, digest_size=HASH_BYTES, person=PERSON).digest()


def token_bytes(tokens: np.ndarray) -> bytes:
    return np.ascontiguousarray(tokens, dtype="<i4").tobytes()


def chain(mkey: bytes, raw: bytes, block: int) -> list[bytes]:
    """h_0 … h_{n-1} of the full blocks of ``raw`` (int32 LE token bytes)."""
    out = []
    h = mkey
    step = 4 * block
    for i in range(len(raw) // step):
        h = _h(h, raw[i * step:(i + 1) * step])
        out.append(h)
    return out


def tail_key(mkey: bytes, hashes: list[bytes]) -> bytes:
    return hashes[-1] if hashes else mkey[:HASH_BYTES]


def tail_hash(mkey: bytes, hashes: list[bytes], raw_tail: bytes) -> bytes:
    return _h(hashes[-1] if hashes else mkey, raw_tail)


# -- keys and values -------------------------------------------------------------------------------------
def cid(card_id: str) -> bytes:
    return bytes.fromhex(card_id)


def ref_key(agent: str, card: bytes) -> bytes:
    return agent.encode() + b"\x00" + card


def pack_tail(card: bytes, length: int, h: bytes) -> bytes:
    return _TAIL.pack(card, length, h)


def unpack_tail(value: bytes) -> tuple[bytes, int, bytes]:
    return _TAIL.unpack(value)


def f64(x: float) -> bytes:
    return _F64.pack(x)


def unf64(b: bytes) -> float:
    return _F64.unpack(b)[0]


# -- the environment ---------------------------------------------------------------------------------------
class _Env:
    """One LMDB environment per index path per process (LMDB forbids opening one twice in a process)."""

    def __init__(self, path: Path, map_size: int) -> None:
        self.path = path
        self.lock = threading.RLock()  # guards resizing against transactions of other threads
        self.users = 0
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DBS) + 2, subdir=True, lock=True,
                                 sync=True, metasync=True, readahead=False, max_readers=254)
        except lmdb.Error as e:
            raise StoreError(f"cannot open the index at {str(path)!r} ({e}); check the path and permissions, "
                             "or delete the index directory and run `cachecard reindex`") from e
        except OSError as e:
            raise _os_error(e, f"cannot create the index at {str(path)!r}") from e
        self.dbs = {}
        with self.env.begin(write=True) as txn:
            for name in DBS:
                self.dbs[name] = self.env.open_db(name.encode(), txn=txn, dupsort=name in _DUP,
                                                  dupfixed=name in _DUP)


_ENVS: dict[str, _Env] = {}
_ENVS_LOCK = threading.Lock()


def _os_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(f"{what}: the disk is full ({e.strerror}). Free space, or evict cards "
                              "(`Store.evict`, `cachecard gc`); nothing committed before was lost")
    return e


class Index:
    """Short transactions on the index environment; the map grows by itself when full."""

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path).absolute()
        key = os.path.realpath(self.path)
        with _ENVS_LOCK:
            env = _ENVS.get(key)
            if env is None:
                env = _ENVS[key] = _Env(self.path, map_size)
            env.users += 1
        self._key = key
        self._e = env
        self.dbs = env.dbs
        self.grows = 0

    @property
    def env(self) -> lmdb.Environment:
        return self._e.env

    def close(self) -> None:
        with _ENVS_LOCK:
            if self._e is None:
                return
            self._e.users -= 1
            if self._e.users == 0:
                self._e.env.close()
                _ENVS.pop(self._key, None)
            self._e = None  # type: ignore[assignment]

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self._e.lock:
            while True:
                try:
                    txn = self.env.begin(write=False)
                    break
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew the map: adopt its size
            try:
                yield txn
            finally:
                txn.abort()

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction and commit; on a full map, grow it and run ``fn`` again."""
        while True:
            with self._e.lock:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)
                except lmdb.MapFullError:
                    size = self.env.info()["map_size"]
                    self.env.set_mapsize(size * 2)
                    self.grows += 1
                except lmdb.Error as e:
                    if "No space left" in str(e) or "Disk quota" in str(e):
                        raise StoreFullError(f"the index at {str(self.path)!r} cannot grow: the disk is full "
                                             f"({e}). Free space or evict cards; nothing committed before was "
                                             "lost") from e
                    raise

    # -- small helpers used inside transactions ------------------------------------------------------------
    def get_json(self, txn: lmdb.Transaction, db: str, key: bytes) -> Any:
        raw = txn.get(key, db=self.dbs[db])
        return None if raw is None else json.loads(raw)

    def put_json(self, txn: lmdb.Transaction, db: str, key: bytes, value: Any) -> None:
        txn.put(key, json.dumps(value, separators=(",", ":")).encode(), db=self.dbs[db])

    def prefixed(self, txn: lmdb.Transaction, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=self.dbs[db])
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                return
            yield k, v

    def dups(self, txn: lmdb.Transaction, db: str, key: bytes) -> Iterator[bytes]:
        cur = txn.cursor(db=self.dbs[db])
        if cur.set_key(key):
            yield from cur.iternext_dup(keys=False, values=True)

    def count(self, txn: lmdb.Transaction, db: str) -> int:
        return txn.stat(self.dbs[db])["entries"]

    def used_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]


__all__ = ["Index", "model_key", "chain", "tail_key", "tail_hash", "token_bytes", "PERSON", "INDEX_VERSION"]
