"""The embedded index backend: LMDB on local disk (spec/store-1.md §3; the :class:`~cachecard.kvstore.index.Index`
interface). The only module that knows the LMDB key and value layout.

One LMDB environment per path per process, short transactions, the map grows by itself when full.
Named sub-databases (values are small fixed binary structs or JSON; never pickle):

============ ============================================ =====================================================
db           key                                          value
============ ============================================ =====================================================
``meta``     ``store`` / ``store_id``                     JSON (version, block size) / the store's id (ASCII)
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

import json
import os
import struct
import time
from typing import Iterable, Iterator, Sequence

import lmdb

from cachecard.errors import StoreError
from cachecard.kvstore.index import (
    INDEX_VERSION, CardEntry, CardRecord, IndexEntry, IndexStats, Match, PendingPut, PutPlan, pick_tail,
)
from cachecard.kvstore.lmdb_env import LmdbEnv
from cachecard.kvstore.prefix import HASH_BYTES, SequenceKeys

DEFAULT_MAP_SIZE = 64 << 20
DBS = ("meta", "cards", "cblocks", "blocks", "tails", "refs", "owners", "children", "pending", "atime")
_DUP = {"blocks", "tails"}
_TAIL = struct.Struct("<16sI16s")
_F64 = struct.Struct("<d")
_ID = 16   # bytes of a card id

Txn = lmdb.Transaction


def _cid(card_id: str) -> bytes:
    return bytes.fromhex(card_id)


def _ref_key(agent: str, card: bytes) -> bytes:
    return agent.encode() + b"\x00" + card


def _f64(x: float) -> bytes:
    return _F64.pack(x)


def _unf64(b: bytes | None) -> float:
    return _F64.unpack(b)[0] if b else 0.0


class LmdbIndex:
    """A store's index in an LMDB environment at ``path`` (local disk)."""

    shared = False

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self._env = LmdbEnv(path, map_size, DBS, dupsort=_DUP)
        self.path = self._env.path
        self.location = str(self.path)
        self.dbs = self._env.dbs
        self._read = self._env.read
        self._write = self._env.write

    @property
    def env(self) -> lmdb.Environment:
        return self._env.env

    @property
    def grows(self) -> int:
        return self._env.grows

    def close(self) -> None:
        self._env.close()

    def _prefixed(self, txn: Txn, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=self.dbs[db])
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                return
            yield k, v

    def _dups(self, txn: Txn, db: str, key: bytes) -> Iterator[bytes]:
        cur = txn.cursor(db=self.dbs[db])
        if cur.set_key(key):
            yield from cur.iternext_dup(keys=False, values=True)

    def _has(self, txn: Txn, db: str, prefix: bytes) -> bool:
        return any(True for _ in self._prefixed(txn, db, prefix))

    def _rec(self, txn: Txn, c: bytes) -> CardRecord | None:
        raw = txn.get(c, db=self.dbs["cards"])
        return None if raw is None else CardRecord.from_json(c, raw)

    def _owners(self, txn: Txn, c: bytes) -> tuple[str, ...]:
        return tuple(k[_ID:].decode() for k, _ in self._prefixed(txn, "owners", c))

    # -- binding -------------------------------------------------------------------------------------------
    def bind(self, store_id: str, block_tokens: int, label: str = "") -> None:
        want = {"version": INDEX_VERSION, "block_tokens": block_tokens}

        def check(txn: Txn) -> None:
            raw = txn.get(b"store", db=self.dbs["meta"])
            got = None if raw is None else json.loads(raw)
            if got is None:
                txn.put(b"store", json.dumps(want, separators=(",", ":")).encode(), db=self.dbs["meta"])
            elif got != want:
                raise StoreError(f"the index at {self.location!r} was built for {got}, not {want}; delete it and "
                                 "run `cachecard reindex`")
            owner = txn.get(b"store_id", db=self.dbs["meta"])
            if owner is not None and store_id and owner.decode() != store_id:
                raise StoreError(f"the index at {self.location!r} belongs to another store (store id "
                                 f"{owner.decode()!r}), not {label or 'this one'} ({store_id!r}); pass another "
                                 "index directory, or delete this one and run `cachecard reindex`")
            if owner is None and store_id:
                txn.put(b"store_id", store_id.encode(), db=self.dbs["meta"])

        self._write(check)

    # -- puts ----------------------------------------------------------------------------------------------
    def plan_put(self, keys: SequenceKeys, codecs: tuple[str, str], agent: str, *, share: bool,
                 new_id: str) -> PutPlan:
        def plan(txn: Txn) -> PutPlan:
            m = self._match(txn, keys, agent=None, codecs=codecs) if share else None
            if m is not None and m.tokens == keys.tokens:
                rec = self._rec(txn, _cid(m.card_id))
                if rec is not None and rec.total == keys.tokens:
                    return PutPlan(m.card_id, existing=True)
            c = _cid(new_id)
            if m is not None:  # pin the parent: nobody may collect it while this card is written
                txn.put(_cid(m.card_id) + c, b"", db=self.dbs["children"])
            doc = {"parent": m.card_id if m else None, "agent": agent, "time": time.time()}
            txn.put(c, json.dumps(doc, separators=(",", ":")).encode(), db=self.dbs["pending"])
            return PutPlan(new_id, existing=False, parent=m)

        return self._write(plan)

    def abandon_put(self, plan: PutPlan) -> None:
        def undo(txn: Txn) -> None:
            c = _cid(plan.card_id)
            txn.delete(c, db=self.dbs["pending"])
            if plan.parent is not None:
                txn.delete(_cid(plan.parent.card_id) + c, db=self.dbs["children"])

        self._write(undo)

    def _commit_one(self, txn: Txn, e: IndexEntry, now: float) -> None:
        d, rec = self.dbs, e.record
        c = _cid(rec.card_id)
        if rec.tail is not None:
            txn.put(rec.tail.key, _TAIL.pack(c, rec.tail.length, rec.tail.hash), db=d["tails"], dupdata=True)
        txn.put(c, rec.to_json(), db=d["cards"])
        txn.put(c, b"".join(e.hashes), db=d["cblocks"])
        for h in e.hashes:
            txn.put(h, c, db=d["blocks"], dupdata=True)
        if rec.parent:
            txn.put(_cid(rec.parent) + c, b"", db=d["children"])
        for a in e.agents:
            txn.put(_ref_key(a, c), _f64(now), db=d["refs"])
            txn.put(c + a.encode(), b"", db=d["owners"])
        txn.put(c, _f64(e.atime if e.atime is not None else now), db=d["atime"])
        txn.delete(c, db=d["pending"])

    def commit(self, entries: Sequence[IndexEntry], *, only_new: bool = False) -> list[str]:
        def run(txn: Txn) -> list[str]:
            now, done = time.time(), []
            for e in entries:
                if only_new and txn.get(_cid(e.record.card_id), db=self.dbs["cards"]) is not None:
                    continue
                self._commit_one(txn, e, now)
                done.append(e.record.card_id)
            return done

        return self._write(run)

    def add_ref(self, agent: str, card_id: str) -> bool:
        c = _cid(card_id)

        def add(txn: Txn) -> bool:
            if txn.get(c, db=self.dbs["cards"]) is None:
                return False
            now = _f64(time.time())
            txn.put(_ref_key(agent, c), now, db=self.dbs["refs"])
            txn.put(c + agent.encode(), b"", db=self.dbs["owners"])
            txn.put(c, now, db=self.dbs["atime"])
            return True

        return self._write(add)

    def remove_refs(self, pairs: Iterable[tuple[str, str]]) -> None:
        pairs = list(pairs)

        def unref(txn: Txn) -> None:
            for a, card_id in pairs:
                c = _cid(card_id)
                txn.delete(_ref_key(a, c), db=self.dbs["refs"])
                txn.delete(c + a.encode(), db=self.dbs["owners"])

        if pairs:
            self._write(unref)

    def _unindex(self, txn: Txn, c: bytes, rec: CardRecord) -> None:
        d = self.dbs
        hashes = txn.get(c, db=d["cblocks"]) or b""
        for i in range(0, len(hashes), HASH_BYTES):
            txn.delete(hashes[i:i + HASH_BYTES], c, db=d["blocks"])
        if rec.tail is not None:
            txn.delete(rec.tail.key, _TAIL.pack(c, rec.tail.length, rec.tail.hash), db=d["tails"])
        for k, _ in list(self._prefixed(txn, "owners", c)):
            txn.delete(_ref_key(k[_ID:].decode(), c), db=d["refs"])
            txn.delete(k, db=d["owners"])
        if rec.parent:
            txn.delete(_cid(rec.parent) + c, db=d["children"])
        for name in ("cards", "cblocks", "atime", "pending"):
            txn.delete(c, db=d[name])

    def unindex_if_unused(self, card_id: str) -> CardRecord | None:
        c = _cid(card_id)

        def run(txn: Txn) -> CardRecord | None:
            rec = self._rec(txn, c)
            if rec is None or self._has(txn, "owners", c) or self._has(txn, "children", c):
                return None
            self._unindex(txn, c, rec)
            return rec

        return self._write(run)

    def unpin(self, card_ids: Iterable[str]) -> None:
        ids = list(card_ids)

        def run(txn: Txn) -> None:
            for card_id in ids:
                c = _cid(card_id)
                raw = txn.get(c, db=self.dbs["pending"])
                if raw is None or txn.get(c, db=self.dbs["cards"]) is not None:
                    continue
                txn.delete(c, db=self.dbs["pending"])
                parent = json.loads(raw)["parent"]
                if parent:
                    txn.delete(_cid(parent) + c, db=self.dbs["children"])

        if ids:
            self._write(run)

    def rebuild(self, entries: Sequence[IndexEntry]) -> None:
        def run(txn: Txn) -> None:
            atimes = {k: v for k, v in txn.cursor(db=self.dbs["atime"])}
            for name in DBS:
                if name != "meta":
                    txn.drop(self.dbs[name], delete=False)
            now = time.time()
            for e in entries:
                a = atimes.get(_cid(e.record.card_id))
                self._commit_one(txn, IndexEntry(e.record, e.hashes, e.agents, _unf64(a) if a else e.atime), now)

        self._write(run)

    # -- reads ---------------------------------------------------------------------------------------------
    def record(self, card_id: str) -> CardRecord | None:
        with self._read() as txn:
            return self._rec(txn, _cid(card_id))

    def records(self) -> list[CardRecord]:
        with self._read() as txn:
            return [CardRecord.from_json(k, v) for k, v in txn.cursor(db=self.dbs["cards"])]

    def owners(self, card_id: str) -> tuple[str, ...]:
        with self._read() as txn:
            return self._owners(txn, _cid(card_id))

    def has_ref(self, agent: str, card_id: str) -> bool:
        with self._read() as txn:
            return txn.get(_ref_key(agent, _cid(card_id)), db=self.dbs["refs"]) is not None

    def children(self, card_id: str) -> tuple[str, ...]:
        with self._read() as txn:
            return tuple(k[_ID:].hex() for k, _ in self._prefixed(txn, "children", _cid(card_id)))

    def match(self, keys: SequenceKeys, *, agent: str | None = None,
              codecs: tuple[str, str] | None = None) -> Match | None:
        with self._read() as txn:
            return self._match(txn, keys, agent=agent, codecs=codecs)

    def _match(self, txn: Txn, keys: SequenceKeys, *, agent: str | None,
               codecs: tuple[str, str] | None) -> Match | None:
        d = self.dbs
        hashes = keys.hashes

        def visible(c: bytes) -> bool:
            if agent is not None and txn.get(_ref_key(agent, c), db=d["refs"]) is None:
                return False
            if codecs is not None:
                rec = self._rec(txn, c)
                if rec is None or rec.codecs != codecs:
                    return False
            return True

        def holder(i: int) -> bytes | None:  # a visible card holding block i-1 (i >= 1)
            for c in self._dups(txn, "blocks", hashes[i - 1]):
                if visible(c):
                    return c
            return None

        lo, hi, best = 0, len(hashes), None  # the number of matched blocks is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            c = holder(mid)
            if c is not None:
                lo, best = mid, c
            else:
                hi = mid - 1
        key = hashes[lo - 1] if lo else keys.model_key[:HASH_BYTES]  # a card that ends inside the next block
        tails = (_TAIL.unpack(v) for v in self._dups(txn, "tails", key))
        return pick_tail(keys, lo, tails, best, visible)

    def touch(self, card_id: str, resolution_s: float) -> None:
        c = _cid(card_id)
        with self._read() as txn:
            last = txn.get(c, db=self.dbs["atime"])
        if last is not None and time.time() - _unf64(last) < resolution_s:
            return

        def touch(txn: Txn) -> None:
            if txn.get(c, db=self.dbs["cards"]) is not None:
                txn.put(c, _f64(time.time()), db=self.dbs["atime"])

        self._write(touch)

    def listing(self, agent: str | None = None) -> list[CardEntry]:
        out = []
        with self._read() as txn:
            d = self.dbs
            if agent is not None:
                ids = [k[len(agent.encode()) + 1:] for k, _ in self._prefixed(txn, "refs", agent.encode() + b"\x00")]
            else:
                ids = [k for k, _ in txn.cursor(db=d["cards"])]
            for c in ids:
                rec = self._rec(txn, c)
                if rec is not None:
                    out.append(CardEntry(rec, self._owners(txn, c), sum(1 for _ in self._prefixed(txn, "children", c)),
                                         _unf64(txn.get(c, db=d["atime"]))))
        return out

    def agents(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._read() as txn:
            for k, _ in txn.cursor(db=self.dbs["refs"]):
                a = k[:-_ID - 1].decode()
                counts[a] = counts.get(a, 0) + 1
        return counts

    def refs(self) -> set[tuple[str, str]]:
        with self._read() as txn:
            return {(k[:-_ID - 1].decode(), k[-_ID:].hex()) for k, _ in txn.cursor(db=self.dbs["refs"])}

    def pending(self) -> list[PendingPut]:
        with self._read() as txn:
            out = []
            for k, v in txn.cursor(db=self.dbs["pending"]):
                p = json.loads(v)
                out.append(PendingPut(k.hex(), p["parent"], p["agent"], p["time"]))
            return out

    def now(self) -> float:
        return time.time()

    def stats(self) -> IndexStats:
        with self._read() as txn:
            recs = [CardRecord.from_json(k, v) for k, v in txn.cursor(db=self.dbs["cards"])]
            n = {name: txn.stat(self.dbs[name])["entries"] for name in ("blocks", "tails", "refs", "pending")}
        return IndexStats(cards=len(recs), blocks=n["blocks"], tails=n["tails"], refs=n["refs"], pending=n["pending"],
                          bytes=sum(r.bytes for r in recs), tokens_stored=sum(r.tokens for r in recs),
                          tokens_represented=sum(r.total for r in recs), location=self.location,
                          used_bytes=self._env.used_bytes(), capacity_bytes=self._env.map_size())


__all__ = ["DEFAULT_MAP_SIZE", "LmdbIndex"]
