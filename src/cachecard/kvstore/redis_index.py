"""The shared index backend: Redis (or Valkey), one index for every node of a store (spec/store-1.md §4; the
:class:`~cachecard.kvstore.index.Index` interface). The only module that knows its key layout, with the Lua
scripts of :mod:`cachecard.kvstore.redis_scripts`.

Configured by URL: ``redis://[user:password@]host:6379/0?namespace=NAME`` (also ``rediss://`` and
``unix://``); ``namespace`` (default ``cachecard``) lets several stores share one database. Each index
transaction is one Lua script (atomic; all keys of a namespace share the hash tag ``{NAME}``). Durability is
Redis's: run it with AOF (``appendonly yes``) if a restart must keep the index, or ``reindex`` after a loss —
the store's objects are the source of truth. Keys must never be evicted (``maxmemory-policy noeviction`` or a
``volatile-*`` policy): an ``allkeys-*`` policy is refused.
"""

from __future__ import annotations

import re
import struct
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cachecard.errors import StoreError
from cachecard.kvstore.index import (
    INDEX_VERSION, CardEntry, CardRecord, IndexEntry, IndexStats, Match, PendingPut, PutPlan, pick_tail,
)
from cachecard.kvstore.prefix import HASH_BYTES, SequenceKeys
from cachecard.kvstore.redis_scripts import PRELUDE, STANDALONE, WITH_PRELUDE

SCHEMES = ("redis", "rediss", "unix")
NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TAIL = struct.Struct("<16sI16s")
_BATCH = 500          # cards per commit script: bounds how long one script holds the server


def _id(card_id: str) -> bytes:
    return bytes.fromhex(card_id)


def _s(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


class RedisIndex:
    """A store's index in Redis at ``url``, shared by every process and node that opens the same URL."""

    shared = True

    def __init__(self, url: str, *, socket_timeout: float = 10.0) -> None:
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError as e:  # pragma: no cover - the remote extra is missing
            raise StoreError("a Redis index needs the redis package: pip install 'cachecard[remote]'") from e
        self._redis = redis
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        ns = query.pop("namespace", "cachecard")
        if not NAMESPACE_RE.fullmatch(ns):
            raise StoreError(f"Redis index namespace {ns!r} must be 1-64 characters from [A-Za-z0-9._-]")
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        host = parts.hostname or parts.path
        self.location = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}" \
                        f"{parts.path if parts.hostname else ''}?namespace={ns}"
        self.base = f"cc:{{{ns}}}:".encode()
        self.meta = self.base + b"meta"
        self.store_id, self.block_tokens, self.label = "", 0, ""
        try:
            self.r = redis.Redis.from_url(clean, socket_timeout=socket_timeout, socket_connect_timeout=5.0,
                                          retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                                          retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        except ValueError as e:
            raise StoreError(f"{url!r} is not a Redis URL ({e}); use redis://host:6379/0") from e
        self._scripts = {name: self.r.register_script(PRELUDE + body) for name, body in WITH_PRELUDE.items()}
        self._scripts.update({name: self.r.register_script(body) for name, body in STANDALONE.items()})

    # -- calls -------------------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        redis = self._redis
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(f"the Redis index at {self.location} is unreachable while {what} ({e}). Each index "
                             "update is one atomic script, so none was half done; start or reach the server and "
                             "retry. If its data was lost, `cachecard reindex` rebuilds it from the store's "
                             "objects") from e
        except redis.ResponseError as e:
            msg = str(e)
            if "CCLOST" in msg:
                raise StoreError(f"the Redis index at {self.location} holds no index of this store (flushed, "
                                 "restarted without persistence, or taken by another store); nothing stored is "
                                 "lost: `Store.reindex()` or `cachecard reindex STORE --index URL` rebuilds it "
                                 "from the store's objects") from e
            if "CCSUPERSEDED" in msg:
                raise StoreError(f"another reindex of {self.location} started after this one; it wins (let it "
                                 "finish, then retry if needed)") from e
            raise StoreError(f"the Redis index at {self.location} refused {what} ({e})") from e
        except redis.RedisError as e:
            raise StoreError(f"the Redis index at {self.location} failed while {what} ({e}); retry") from e

    def _call(self, name: str, *args: Any, gen: bytes | str = b"", what: str | None = None) -> Any:
        with self._errors(what or name):
            return self._scripts[name](keys=[self.meta], args=[self.store_id, self.base, gen, *args])

    def _read(self, what: str, *args: Any) -> Any:
        return self._call("read", what, *args, what=f"reading {what}")

    def close(self) -> None:
        self.r.close()

    # -- binding -------------------------------------------------------------------------------------------
    def bind(self, store_id: str, block_tokens: int, label: str = "") -> None:
        if not store_id:
            raise StoreError("a shared index binds to the store's id; this store has none (made before store "
                             "ids): open it once with a shared index through Store, which gives it one")
        self.store_id, self.block_tokens, self.label = store_id, block_tokens, label
        with self._errors("binding the index to this store"):
            raw = self._scripts["bind"](keys=[self.meta], args=[store_id, block_tokens, INDEX_VERSION, label])
            policy = self._policy()
        doc = {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw), 2)}
        if doc.get("store_id") != store_id:
            raise StoreError(f"the Redis index at {self.location} belongs to another store (store id "
                             f"{doc.get('store_id')!r}, {doc.get('store')!r}), not this one ({store_id!r}, "
                             f"{label!r}); use another namespace (?namespace=NAME) or database, or delete that one")
        if doc.get("block_tokens") != str(block_tokens) or doc.get("version") != str(INDEX_VERSION):
            raise StoreError(f"the Redis index at {self.location} was built for block_tokens="
                             f"{doc.get('block_tokens')}, version {doc.get('version')}, not {block_tokens}, "
                             f"{INDEX_VERSION}; delete its namespace and run `cachecard reindex`")
        if policy.startswith("allkeys"):
            raise StoreError(f"the Redis server at {self.location} may evict any key (maxmemory-policy {policy}), "
                             "which would silently drop index entries; set maxmemory-policy noeviction")

    def _policy(self) -> str:
        try:
            return _s(self.r.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        except self._redis.ResponseError:  # CONFIG is often disabled on managed services
            return ""

    # -- puts ----------------------------------------------------------------------------------------------
    def plan_put(self, keys: SequenceKeys, codecs: tuple[str, str], agent: str, *, share: bool,
                 new_id: str) -> PutPlan:
        for _attempt in range(8):
            m = self.match(keys, codecs=codecs) if share else None
            if m is not None and m.tokens == keys.tokens:
                rec = self.record(m.card_id)
                if rec is not None and rec.total == keys.tokens:
                    return PutPlan(m.card_id, existing=True)
            parent = _id(m.card_id) if m else b""
            if self._call("plan", _id(new_id), parent, m.card_id if m else "", agent, what="planning a put"):
                return PutPlan(new_id, existing=False, parent=m)
        raise StoreError("could not pin a prefix to continue: other nodes kept deleting it; retry the put")

    def abandon_put(self, plan: PutPlan) -> None:
        self._call("abandon", _id(plan.card_id), _id(plan.parent.card_id) if plan.parent else b"")

    def commit(self, entries: Sequence[IndexEntry], *, only_new: bool = False, gen: bytes | str = b"",
               atimes: dict[bytes, float] | None = None) -> list[str]:
        done: list[str] = []
        for i in range(0, len(entries), _BATCH):
            args: list[Any] = [b"1" if only_new else b""]
            for e in entries[i:i + _BATCH]:
                r, c = e.record, _id(e.record.card_id)
                atime = (atimes or {}).get(c, e.atime)
                args += [c, r.to_json(), b"".join(e.hashes), r.tail.key if r.tail else b"",
                         _TAIL.pack(c, r.tail.length, r.tail.hash) if r.tail else b"",
                         _id(r.parent) if r.parent else b"", "/".join(e.agents), "" if atime is None else repr(atime),
                         r.bytes, r.tokens, r.total]
            done += [c.hex() for c in self._call("commit", *args, gen=gen, what="committing cards")]
        return done

    def add_ref(self, agent: str, card_id: str) -> bool:
        return bool(self._call("add_ref", agent, _id(card_id), what="adding a reference"))

    def remove_refs(self, pairs: Iterable[tuple[str, str]]) -> None:
        flat: list[Any] = [x for a, c in pairs for x in (a, _id(c))]
        for i in range(0, len(flat), 2 * _BATCH):
            self._call("remove_refs", *flat[i:i + 2 * _BATCH], what="removing references")

    def unindex_if_unused(self, card_id: str) -> CardRecord | None:
        raw = self._call("unindex", _id(card_id), what="unindexing a card")
        return None if raw is None else CardRecord.from_json(_id(card_id), raw)

    def unpin(self, card_ids: Iterable[str]) -> None:
        ids = [_id(c) for c in card_ids]
        if ids:
            self._call("unpin", *ids, what="ending stale puts")

    def rebuild(self, entries: Sequence[IndexEntry]) -> None:
        """Build a new generation of the index beside the live one, switch to it in one step, then remove the
        older generations (other nodes serve the old index meanwhile)."""
        with self._errors("starting a rebuild"):  # (claims the namespace again if it was flushed)
            new, _live = self._scripts["new_gen"](keys=[self.meta], args=[self.store_id, self.block_tokens,
                                                                         INDEX_VERSION, self.label])
        atimes = self._read("atimes")
        kept = {atimes[i]: float(atimes[i + 1]) for i in range(0, len(atimes), 2)}
        self.commit(entries, gen=str(new), atimes=kept)
        with self._errors("switching to the rebuilt index"):
            self._scripts["switch"](keys=[self.meta], args=[self.store_id, str(new)])
        self._drop_generations_before(int(new))

    def _drop_generations_before(self, gen: int) -> None:
        with self._errors("removing the old index"):
            batch = []
            for key in self.r.scan_iter(match=self.base + b"*", count=1000):
                head = key[len(self.base):].split(b":", 1)[0]
                if head.isdigit() and int(head) < gen:
                    batch.append(key)
                    if len(batch) >= 1000:
                        self.r.unlink(*batch)
                        batch = []
            if batch:
                self.r.unlink(*batch)

    # -- reads ---------------------------------------------------------------------------------------------
    def record(self, card_id: str) -> CardRecord | None:
        raw = self._read("record", _id(card_id))
        return None if raw is None else CardRecord.from_json(_id(card_id), raw)

    def _ids(self, agent: str | None) -> list[bytes]:
        return sorted(self._read("ids") if agent is None else self._read("agent_ids", agent))

    def records(self) -> list[CardRecord]:
        ids, out = self._ids(None), []
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            out += [CardRecord.from_json(c, raw) for c, raw in zip(chunk, self._read("records", *chunk)) if raw]
        return out

    def owners(self, card_id: str) -> tuple[str, ...]:
        return tuple(sorted(_s(a) for a in self._read("owners", _id(card_id))))

    def has_ref(self, agent: str, card_id: str) -> bool:
        return bool(self._read("has_ref", agent, _id(card_id)))

    def children(self, card_id: str) -> tuple[str, ...]:
        return tuple(sorted(c.hex() for c in self._read("children", _id(card_id))))

    def match(self, keys: SequenceKeys, *, agent: str | None = None,
              codecs: tuple[str, str] | None = None) -> Match | None:
        ck, cv = codecs or ("", "")
        lo, best, *tails = self._call("match", agent or "", ck, cv, keys.tokens, keys.block,
                                      keys.model_key[:HASH_BYTES], b"".join(keys.hashes), what="matching a prefix")
        return pick_tail(keys, int(lo), (_TAIL.unpack(t) for t in tails), best)

    def touch(self, card_id: str, resolution_s: float) -> None:
        self._call("touch", _id(card_id), repr(float(resolution_s)), what="recording an access")

    def listing(self, agent: str | None = None) -> list[CardEntry]:
        ids, out = self._ids(agent), []
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            for c, (raw, owners, children, atime) in zip(chunk, self._read("rows", *chunk)):
                if raw:
                    out.append(CardEntry(CardRecord.from_json(c, raw), tuple(sorted(_s(a) for a in owners)),
                                         int(children), float(atime)))
        return out

    def agents(self) -> dict[str, int]:
        flat = self._read("agents")
        return {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def refs(self) -> set[tuple[str, str]]:
        return {(_s(a), c.hex()) for a, cards in self._read("refs") for c in cards}

    def pending(self) -> list[PendingPut]:
        import json

        flat = self._read("pending")
        out = []
        for i in range(0, len(flat), 2):
            p = json.loads(flat[i + 1])
            out.append(PendingPut(flat[i].hex(), p.get("parent"), p["agent"], float(p["time"])))
        return out

    def now(self) -> float:
        return float(self._read("now"))

    def stats(self) -> IndexStats:
        flat = self._read("counters")
        n = {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        with self._errors("reading server statistics"):
            mem = self.r.info("memory")
        return IndexStats(cards=n.get("cards", 0), blocks=n.get("blocks", 0), tails=n.get("tails", 0),
                          refs=n.get("refs", 0), pending=len(self._read("pending")) // 2, bytes=n.get("bytes", 0),
                          tokens_stored=n.get("tokens", 0), tokens_represented=n.get("total", 0),
                          location=self.location, used_bytes=int(mem.get("used_memory", 0)),
                          capacity_bytes=int(mem.get("maxmemory", 0)),
                          details=(("server_used_memory", str(mem.get("used_memory_human", ""))),))


__all__ = ["RedisIndex", "SCHEMES"]
