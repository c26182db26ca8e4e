"""Agent memory over cards: a store of cards with an LMDB prefix index (DESIGN.md §4).

A store is a directory or an fsspec URL (``s3://bucket/prefix``, ``memory://…``) laid out as::

    cachecard-store.json            {"cachecard_store": 1, "block_tokens": B, ...}: written once, at creation
    cards/<id[:2]>/<id>/            one card (spec/cachecard-1.md), immutable, named by its card_id
    refs/<agent>/<id>               an agent's reference to a card (tiny JSON object; its existence counts)
    index/                          the LMDB index (local stores only; elsewhere a local path, see Store)

The cards and refs objects are the source of truth; the index is derived and ``reindex`` rebuilds it.
Commit order of a put: card data, card manifest (``write_card``: atomic), ref object, index entry. Deleting
runs the other way: ref object, index entry, card data. A crash in between leaves at most an orphan that
``gc`` collects (or adopts, when a ref object says an agent owns it).

Sharing. ``put`` looks up the longest cached prefix of the new sequence (same model, same codec presets,
any agent) and writes only the tokens after it, as a card whose manifest ``parent`` points at that prefix.
So N agents that share a context store it once, and saving after every turn writes only the new turn.
Reference counts: a card's data is removed only when no agent references it and no other card continues it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import fsspec
import numpy as np

from cachecard.errors import (
    CacheCardError, CardNotFoundError, CorruptCardError, IdentityMismatchError, IncompleteCardError, KVShapeError,
    StoreError,
)
from cachecard.kv import CanonicalKV
from cachecard.kvstore import index as ix
from cachecard.card import layout
from cachecard.card.reader import Card, open_card
from cachecard.kvstore.names import (
    _OPEN_CACHE, ATIME_RESOLUTION_S, DEFAULT_BLOCK_TOKENS, STORE_FILE, STORE_VERSION, check_agent, check_card_id,
)
from cachecard.kvstore.scans import GcReport, ReindexReport, StoreScans, VerifyStoreReport
from cachecard.card.writer import write_card
from cachecard.manifest import CardManifest, ModelIdentity, ParentRef


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a token sequence: ``tokens`` tokens of card ``card_id``'s sequence."""

    card_id: str
    tokens: int


@dataclass(frozen=True)
class CardInfo:
    card_id: str
    agents: tuple[str, ...]
    tokens: int            # tokens stored in this card
    total: int             # tokens of the whole sequence (parent prefix included)
    parent: str | None
    parent_tokens: int
    children: int
    bytes: int
    codecs: tuple[str, str]
    created: float
    accessed: float
    model: str             # model key (hex) prefix


class Store(StoreScans):
    """A store of cards for agents: put / match / load / handoff / delete / evict / gc / verify / reindex.

    Parameters
    ----------
    root
        A local directory or an fsspec URL (``s3://bucket/prefix``, ``memory://name``).
    index
        Where the LMDB index lives (always on local disk). Default: ``<root>/index`` for a local store, and
        ``$XDG_CACHE_HOME/cachecard/index/<sha256(url)[:16]>`` for a URL.
    create
        Create the store if it does not exist (else :class:`StoreError`).
    block_tokens
        Prefix-index granularity ``B`` for a new store (an existing store keeps its own).
    storage_options
        fsspec options for a URL (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3).
    map_size
        Initial LMDB map size; it doubles by itself whenever it fills.
    """

    def __init__(self, root: str | os.PathLike[str], *, index: str | os.PathLike[str] | None = None,
                 create: bool = True, block_tokens: int | None = None,
                 storage_options: dict[str, Any] | None = None, map_size: int = ix.DEFAULT_MAP_SIZE) -> None:
        self.root_label = str(root)
        self._opts = dict(storage_options or {})
        url = str(root)
        self.remote = "://" in url and not url.startswith("file://")
        if self.remote:
            self.fs, self._base = fsspec.core.url_to_fs(url, **self._opts)
            self._base = self._base.rstrip("/")
        else:
            self.fs = fsspec.filesystem("file")
            self._base = str(Path(url.removeprefix("file://")).absolute())
        self.block_tokens = self._open_root(create, block_tokens)
        if index is None:
            if self.remote:
                import hashlib

                cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                index = cache / "cachecard" / "index" / hashlib.sha256(url.encode()).hexdigest()[:16]
            else:
                index = Path(self._base) / "index"
        try:
            self.index = ix.Index(index, map_size=map_size)
        except OSError as e:
            raise ix._os_error(e, "cannot create the index") from e
        self._cards: dict[str, Card] = {}
        self.atime_resolution_s = ATIME_RESOLUTION_S
        self._check_meta()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._cards.clear()
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_root(self, create: bool, block_tokens: int | None) -> int:
        marker = f"{self._base}/{STORE_FILE}"
        try:
            doc = json.loads(self.fs.cat_file(marker))
        except FileNotFoundError:
            doc = None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{marker!r} is not valid JSON ({e}); this is not a cachecard store") from e
        if doc is None:
            if not create:
                raise StoreError(f"no cachecard store at {self.root_label!r} (no {STORE_FILE}); create it with "
                                 "Store(..., create=True)")
            b = DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens
            if not isinstance(b, int) or not 1 <= b <= 1 << 16:
                raise StoreError(f"block_tokens must be an integer in [1, 65536]; got {b!r}")
            doc = {"cachecard_store": STORE_VERSION, "block_tokens": b,
                   "layout": "cards/<id[:2]>/<id>, refs/<agent>/<id>", "hash": "blake2b-128 chained, int32 LE"}
            self._write_small(marker, json.dumps(doc, indent=1).encode())
        if not isinstance(doc, dict) or doc.get("cachecard_store") != STORE_VERSION:
            raise StoreError(f"{marker!r} is not a version {STORE_VERSION} cachecard store "
                             f"(cachecard_store={doc.get('cachecard_store') if isinstance(doc, dict) else doc!r}); "
                             "upgrade cachecard")
        b = doc.get("block_tokens")
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 1 << 16:
            raise StoreError(f"{marker!r} has an invalid block_tokens {b!r}")
        if block_tokens is not None and block_tokens != b:
            raise StoreError(f"the store at {self.root_label!r} uses block_tokens={b}, not {block_tokens}; "
                             "leave block_tokens unset to use the store's")
        return b

    def _check_meta(self) -> None:
        def check(txn: Any) -> None:
            got = self.index.get_json(txn, "meta", b"store")
            want = {"version": ix.INDEX_VERSION, "block_tokens": self.block_tokens}
            if got is None:
                self.index.put_json(txn, "meta", b"store", want)
            elif got != want:
                raise StoreError(f"the index at {str(self.index.path)!r} was built for {got}, not {want}; "
                                 "delete it and run `cachecard reindex`")

        self.index.write(check)

    # -- locations ----------------------------------------------------------------------------------------
    def _rel_card(self, card_id: str) -> str:
        return f"cards/{card_id[:2]}/{card_id}"

    def card_location(self, card_id: str) -> str:
        """Where card ``card_id`` lives: a local path or a URL (readable with ``open_card``)."""
        path = f"{self._base}/{self._rel_card(check_card_id(card_id))}"
        return self.fs.unstrip_protocol(path) if self.remote else path

    def _write_small(self, path: str, data: bytes) -> None:
        try:
            if not self.remote:
                p = Path(path)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            else:
                self.fs.pipe_file(path, data)
        except OSError as e:
            raise ix._os_error(e, f"cannot write {path!r}") from e

    def _ref_path(self, agent: str, card_id: str) -> str:
        return f"{self._base}/refs/{agent}/{card_id}"

    def _write_ref(self, agent: str, card_id: str) -> None:
        self._write_small(self._ref_path(agent, card_id),
                          json.dumps({"agent": agent, "card_id": card_id, "time": time.time()}).encode())

    def _delete_ref(self, agent: str, card_id: str) -> None:
        try:
            self.fs.rm_file(self._ref_path(agent, card_id))
        except FileNotFoundError:
            pass

    # -- put ----------------------------------------------------------------------------------------------
    def put(self, kv: CanonicalKV, tokens: Sequence[int] | np.ndarray, model: ModelIdentity, *, agent: str,
            codec: str | tuple[str, str] = "lossless", chunk_tokens: int = layout.DEFAULT_CHUNK_TOKENS,
            share: bool = True, payloads: Any = None) -> str:
        """Save ``kv`` (all of ``tokens``, every layer) for ``agent``; return the card id that holds it.

        With ``share`` (the default) the longest cached prefix of ``tokens`` (same model and codec presets,
        any agent) is reused through a parent reference and only the tokens after it are written; if the
        whole sequence is already a card, no data is written and the agent just gains a reference to it.
        ``payloads`` (see ``write_card``) gives chunks already encoded; its token indices count from the start
        of ``tokens``, whatever prefix the store reuses.
        """
        check_agent(agent)
        ids = np.asarray(tokens)
        if ids.ndim != 1 or len(ids) != kv.num_tokens:
            raise KVShapeError(f"need one token id per cached token: KV holds {kv.num_tokens} tokens, got ids of "
                               f"shape {ids.shape}")
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > 2**31 - 1):
            raise KVShapeError("token ids must be integers in [0, 2**31-1]")
        ids = ids.astype("<i4")
        codecs = (codec, codec) if isinstance(codec, str) else tuple(codec)
        mkey = ix.model_key(model)
        raw = ix.token_bytes(ids)
        hashes = ix.chain(mkey, raw, self.block_tokens)
        n = len(ids)
        for _attempt in range(8):
            plan = self.index.write(lambda txn: self._plan_put(txn, mkey, ids, raw, hashes, codecs, agent, share))
            if plan[0] == "existing":
                card_id = plan[1]
                self._write_ref(agent, card_id)
                if self.index.write(lambda txn: self._add_ref_txn(txn, agent, card_id)):
                    return card_id
                self._delete_ref(agent, card_id)  # the card went away in between: plan again
                continue
            _, card_id, parent = plan
            break
        else:  # pragma: no cover - needs 8 lost races in a row
            raise StoreError("could not place the card: other processes kept deleting its prefix; try again")
        p = parent.tokens if parent else 0
        try:
            sub = CanonicalKV(kv.k[:, :, p:], kv.v[:, :, p:])
            shifted = None if payloads is None else (
                lambda which, layer, start, valid, c: payloads(which, layer, p + start, valid, c))
            manifest = write_card(self.card_location(card_id), sub, ids[p:], model, codec=codec,
                                  chunk_tokens=chunk_tokens, parent=parent, card_id=card_id,
                                  storage_options=self._opts or None, payloads=shifted)
            nbytes = self._card_bytes(card_id)
            self._write_ref(agent, card_id)
        except BaseException as e:
            self._abandon(card_id, parent, agent)
            if isinstance(e, OSError) and not isinstance(e, CacheCardError):
                raise ix._os_error(e, f"cannot write card {card_id}") from e
            raise
        tail = None
        t = n - len(hashes) * self.block_tokens
        if t:
            tail = (ix.tail_key(mkey, hashes), t, ix.tail_hash(mkey, hashes, raw[4 * (n - t):]))
        record = self._record(manifest, mkey, nbytes, total=n)
        self.index.write(lambda txn: self._commit_txn(txn, card_id, record, hashes, tail, agent))
        return card_id

    def _plan_put(self, txn: Any, mkey: bytes, ids: np.ndarray, raw: bytes, hashes: list[bytes],
                  codecs: tuple[str, ...], agent: str, share: bool) -> tuple[Any, ...]:
        m = self._match_txn(txn, mkey, raw, hashes, agent=None, codecs=codecs) if share else None
        if m is not None and m.tokens == len(ids):
            rec = self.index.get_json(txn, "cards", ix.cid(m.card_id))
            if rec["start"] + rec["tokens"] == len(ids):
                return ("existing", m.card_id)
        card_id = uuid.uuid4().hex
        parent = ParentRef(card_id=m.card_id, tokens=m.tokens) if m is not None else None
        if parent is not None:  # pin the parent: nobody may collect it while this card is written
            txn.put(ix.cid(m.card_id) + ix.cid(card_id), b"", db=self.index.dbs["children"])
        self.index.put_json(txn, "pending", ix.cid(card_id), {"parent": m.card_id if m else None, "agent": agent,
                                                              "time": time.time()})
        return ("new", card_id, parent)

    def _abandon(self, card_id: str, parent: ParentRef | None, agent: str) -> None:
        """Undo a put that failed before its index commit (best effort; gc finishes the job otherwise)."""
        try:
            self._delete_ref(agent, card_id)
            self._delete_card_data(card_id)
        except Exception:  # noqa: BLE001 - the original error matters more; gc collects what is left
            pass

        def undo(txn: Any) -> None:
            txn.delete(ix.cid(card_id), db=self.index.dbs["pending"])
            if parent is not None:
                txn.delete(ix.cid(parent.card_id) + ix.cid(card_id), db=self.index.dbs["children"])

        try:
            self.index.write(undo)
        except Exception:  # noqa: BLE001
            pass

    def _record(self, manifest: CardManifest, mkey: bytes, nbytes: int, *, total: int) -> dict[str, Any]:
        p = manifest.parent
        return {"model": mkey.hex(), "start": p.tokens if p else 0, "tokens": manifest.tokens.count,
                "parent": p.card_id if p else None, "bytes": nbytes,
                "codecs": [manifest.codecs.k, manifest.codecs.v], "created": manifest.created.timestamp()}

    def _commit_txn(self, txn: Any, card_id: str, record: dict[str, Any], hashes: list[bytes],
                    tail: tuple[bytes, int, bytes] | None, agent: str | None, agents: Iterable[str] = (),
                    atime: float | None = None) -> None:
        d = self.index.dbs
        c = ix.cid(card_id)
        if tail is not None:
            record["tail"] = [tail[0].hex(), tail[1], tail[2].hex()]
            txn.put(tail[0], ix.pack_tail(c, tail[1], tail[2]), db=d["tails"], dupdata=True)
        self.index.put_json(txn, "cards", c, record)
        txn.put(c, b"".join(hashes), db=d["cblocks"])
        for h in hashes:
            txn.put(h, c, db=d["blocks"], dupdata=True)
        if record["parent"]:
            txn.put(ix.cid(record["parent"]) + c, b"", db=d["children"])
        now = time.time()
        for a in ([agent] if agent else []) + list(agents):
            txn.put(ix.ref_key(a, c), ix.f64(now), db=d["refs"])
            txn.put(c + a.encode(), b"", db=d["owners"])
        txn.put(c, ix.f64(atime if atime is not None else now), db=d["atime"])
        txn.delete(c, db=d["pending"])

    def _add_ref_txn(self, txn: Any, agent: str, card_id: str) -> bool:
        c = ix.cid(card_id)
        if txn.get(c, db=self.index.dbs["cards"]) is None:
            return False
        txn.put(ix.ref_key(agent, c), ix.f64(time.time()), db=self.index.dbs["refs"])
        txn.put(c + agent.encode(), b"", db=self.index.dbs["owners"])
        txn.put(c, ix.f64(time.time()), db=self.index.dbs["atime"])
        return True

    def _card_bytes(self, card_id: str) -> int:
        path = f"{self._base}/{self._rel_card(card_id)}"
        if not self.remote:
            return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return sum(info["size"] for info in self.fs.find(path, detail=True).values())

    # -- match --------------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int] | np.ndarray, model: ModelIdentity, agent: str | None = None) -> Match | None:
        """The longest cached prefix of ``tokens`` for ``model`` (only among ``agent``'s cards if given),
        or ``None``. Matches end on a block boundary (``block_tokens``) or exactly where a card ends."""
        if agent is not None:
            check_agent(agent)
        ids = np.asarray(tokens)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() > 2**31 - 1)):
            raise KVShapeError("tokens must be a 1-d sequence of token ids in [0, 2**31-1]")
        mkey = ix.model_key(model)
        raw = ix.token_bytes(ids)
        hashes = ix.chain(mkey, raw, self.block_tokens)
        with self.index.read() as txn:
            return self._match_txn(txn, mkey, raw, hashes, agent=agent, codecs=None)

    def _match_txn(self, txn: Any, mkey: bytes, raw: bytes, hashes: list[bytes], *, agent: str | None,
                   codecs: tuple[str, ...] | None) -> Match | None:
        d = self.index.dbs

        def visible(c: bytes) -> bool:
            if agent is not None and txn.get(ix.ref_key(agent, c), db=d["refs"]) is None:
                return False
            if codecs is not None:
                rec = self.index.get_json(txn, "cards", c)
                if rec is None or tuple(rec["codecs"]) != codecs:
                    return False
            return True

        def holder(i: int) -> bytes | None:  # a visible card holding block i-1 (i >= 1)
            for c in self.index.dups(txn, "blocks", hashes[i - 1]):
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
        B = self.block_tokens
        n_tok = len(raw) // 4
        matched = lo * B
        # a card that ends inside the next block
        key = hashes[lo - 1] if lo else mkey[:ix.HASH_BYTES]
        prev = hashes[lo - 1] if lo else mkey
        seen: dict[int, bytes] = {}
        best_tail = 0
        for value in self.index.dups(txn, "tails", key):
            c, t, h = ix.unpack_tail(value)
            if t <= best_tail or matched + t > n_tok:
                continue
            if t not in seen:
                seen[t] = ix._h(prev, raw[4 * matched:4 * (matched + t)])
            if seen[t] == h and visible(c):
                best_tail, best = t, c
        if best is None:
            return None
        return Match(best.hex(), matched + best_tail)

    # -- load ---------------------------------------------------------------------------------------------
    def load(self, what: str | Match, *, tokens: int | slice | range | None = None,
             layers: range | slice | int | None = None, model: ModelIdentity | None = None) -> CanonicalKV:
        """Canonical KV of a card's sequence (its parents' prefix included): by default all of it, or the
        matched prefix of a :class:`Match`. ``tokens=n`` means the first n; only needed chunks are read,
        in parallel across the cards of the chain. With ``model``, a card of another model is refused."""
        card_id, default = (what.card_id, what.tokens) if isinstance(what, Match) else (what, None)
        check_card_id(card_id)
        rec = self._rec(card_id)
        total = rec["start"] + rec["tokens"]
        if model is not None and ix.model_key(model).hex() != rec["model"]:
            card = self._open(card_id, rec)
            diffs = card.manifest.model.mismatches(model)
            raise IdentityMismatchError("the card was made by another model: " + "; ".join(diffs or ["model key"]),
                                        card=card_id)
        if tokens is None:
            tokens = default if default is not None else total
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            if not 0 <= tokens <= total:
                raise IndexError(f"card {card_id} holds {total} tokens; cannot load {tokens}")
            tokens = range(0, tokens)
        elif isinstance(tokens, slice):
            tokens = range(*tokens.indices(total))
        if not isinstance(tokens, range) or tokens.step != 1 or tokens.start < 0 or tokens.stop > total:
            raise ValueError(f"tokens must be an int, or a contiguous range within [0, {total}); got {tokens!r}")
        segs = self._segments(card_id, rec, tokens.start, max(tokens.start, tokens.stop))
        try:
            cards = [self._open(c, r) for c, r, _, _ in segs]

            def read(i: int) -> CanonicalKV:
                _, _, a, b = segs[i]
                return cards[i].read(layers=layers, tokens=slice(a, b))

            if len(segs) == 1:
                parts = [read(0)]
            else:
                with ThreadPoolExecutor(min(8, len(segs))) as pool:
                    parts = list(pool.map(read, range(len(segs))))
        except (CardNotFoundError, IncompleteCardError, CorruptCardError, OSError) as e:
            if any(self._rec(c, missing_ok=True) is None for c, _, _, _ in segs):
                raise CardNotFoundError("the card was deleted while it was being read", card=card_id) from e
            raise
        self._touch(card_id)
        if len(parts) == 1:
            return parts[0]
        return CanonicalKV(np.concatenate([p.k for p in parts], axis=2), np.concatenate([p.v for p in parts], axis=2))

    def parts(self, what: str | Match, *, tokens: int | None = None) -> list[tuple[Card, int]]:
        """The opened cards that hold the first ``tokens`` tokens of a card's sequence (default: all of it, or
        the matched prefix of a :class:`Match`), parents first, each with how many of its own tokens count.
        For runtimes that read cards their own way (``cachecard.adapters.torch_read``); :meth:`load` is the
        plain path."""
        card_id, default = (what.card_id, what.tokens) if isinstance(what, Match) else (what, None)
        check_card_id(card_id)
        rec = self._rec(card_id)
        total = rec["start"] + rec["tokens"]
        n = tokens if tokens is not None else default if default is not None else total
        if not 0 <= n <= total:
            raise IndexError(f"card {card_id} holds {total} tokens; cannot take {n}")
        segs = self._segments(card_id, rec, 0, n)
        out = [(self._open(c, r), b) for c, r, a, b in segs if b > a]
        self._touch(card_id)
        return out

    def tokens_of(self, card_id: str) -> np.ndarray:
        """The whole token sequence of a card (its parents' prefix included)."""
        rec = self._rec(check_card_id(card_id))
        segs = self._segments(card_id, rec, 0, rec["start"] + rec["tokens"])
        parts = [self._open(c, r).token_ids()[a:b] for c, r, a, b in segs]
        return np.concatenate(parts) if parts else np.zeros(0, "<i4")

    def _segments(self, card_id: str, rec: dict[str, Any], a: int, b: int) -> list[tuple[str, dict[str, Any], int, int]]:
        """(card, record, own start, own stop) pieces that make tokens [a, b) of ``card_id``'s sequence."""
        out = []
        while True:
            s = rec["start"]
            if b > s:
                out.append((card_id, rec, max(a, s) - s, b - s))
            if a >= s or rec["parent"] is None:
                break
            b = min(b, s)
            card_id = rec["parent"]
            rec = self._rec(card_id)
        out.reverse()
        return out or [(card_id, rec, 0, 0)]

    def _rec(self, card_id: str, missing_ok: bool = False) -> dict[str, Any] | None:
        with self.index.read() as txn:
            rec = self.index.get_json(txn, "cards", ix.cid(card_id))
        if rec is None and not missing_ok:
            raise CardNotFoundError("no such card in this store (deleted, never stored, or the index is stale: "
                                    "run `cachecard reindex`)", card=card_id)
        return rec

    def _open(self, card_id: str, rec: dict[str, Any]) -> Card:
        card = self._cards.get(card_id)
        if card is None:
            card = open_card(self.card_location(card_id), storage_options=self._opts or None)
            m = card.manifest
            problems = []
            if m.card_id != card_id:
                problems.append(f"its manifest says card_id {m.card_id}")
            if ix.model_key(m.model).hex() != rec["model"]:
                problems.append("its model identity differs from the one indexed")
            if (m.parent.card_id if m.parent else None) != rec["parent"] or m.start_position != rec["start"] \
                    or m.tokens.count != rec["tokens"]:
                problems.append("its parent or token count differs from the index")
            if problems:
                raise CorruptCardError("the card stored under this id does not match the index (" + "; ".join(problems)
                                       + "); run `cachecard verify` and `cachecard reindex`", card=card_id)
            if len(self._cards) >= _OPEN_CACHE:
                self._cards.pop(next(iter(self._cards)))
            self._cards[card_id] = card
        return card

    def _touch(self, card_id: str) -> None:
        """Record an access for LRU eviction; at most one index commit per card per ATIME_RESOLUTION_S
        (like relatime; ``atime_resolution_s``), so frequent loads do not each pay an fsync."""
        c = ix.cid(card_id)
        with self.index.read() as txn:
            last = txn.get(c, db=self.index.dbs["atime"])
        if last is not None and time.time() - ix.unf64(last) < self.atime_resolution_s:
            return

        def touch(txn: Any) -> None:
            if txn.get(c, db=self.index.dbs["cards"]) is not None:
                txn.put(c, ix.f64(time.time()), db=self.index.dbs["atime"])

        self.index.write(touch)

    # -- sharing and removal ------------------------------------------------------------------------------
    def handoff(self, card_id: str, to_agent: str, *, from_agent: str | None = None) -> None:
        """Give ``to_agent`` a reference to a card (no copy, no re-quantization). With ``from_agent``, the
        reference moves: ``from_agent`` loses its own (the data stays while anyone references it)."""
        check_card_id(card_id)
        check_agent(to_agent)
        if from_agent is not None:
            check_agent(from_agent)
            with self.index.read() as txn:
                if txn.get(ix.ref_key(from_agent, ix.cid(card_id)), db=self.index.dbs["refs"]) is None:
                    raise CardNotFoundError(f"agent {from_agent!r} holds no reference to this card", card=card_id)
        self._rec(card_id)
        self._write_ref(to_agent, card_id)
        if not self.index.write(lambda txn: self._add_ref_txn(txn, to_agent, card_id)):
            self._delete_ref(to_agent, card_id)
            raise CardNotFoundError("the card was deleted before the handoff committed", card=card_id)
        if from_agent is not None and from_agent != to_agent:
            self.delete(card_id, agent=from_agent)

    def delete(self, card_id: str, agent: str | None = None) -> list[str]:
        """Remove ``agent``'s reference to a card (every agent's with ``agent=None``); return the ids of
        cards whose data was removed because nothing references them any more (the card, then parents
        that only it continued). A card other cards continue stays as their parent, without agents."""
        check_card_id(card_id)
        c = ix.cid(card_id)
        with self.index.read() as txn:
            if txn.get(c, db=self.index.dbs["cards"]) is None:
                raise CardNotFoundError("no such card in this store", card=card_id)
            agents = [k[16:].decode() for k, _ in self.index.prefixed(txn, "owners", c)]
        if agent is not None:
            check_agent(agent)
            if agent not in agents:
                raise CardNotFoundError(f"agent {agent!r} holds no reference to this card", card=card_id)
            agents = [agent]
        for a in agents:
            self._delete_ref(a, card_id)

        def unref(txn: Any) -> None:
            for a in agents:
                txn.delete(ix.ref_key(a, c), db=self.index.dbs["refs"])
                txn.delete(c + a.encode(), db=self.index.dbs["owners"])

        self.index.write(unref)
        return self._collect([card_id])

    def drop_agent(self, agent: str) -> list[str]:
        """Remove every reference ``agent`` holds; return the ids of cards whose data was removed."""
        freed = []
        for info in self.cards(agent=check_agent(agent)):
            try:
                freed += self.delete(info.card_id, agent=agent)
            except CardNotFoundError:
                pass  # removed concurrently
        return freed

    def _collect(self, candidates: list[str]) -> list[str]:
        """Remove each candidate that no agent and no child references (then its parent, and so on)."""
        freed = []
        todo = list(candidates)
        while todo:
            card_id = todo.pop()
            rec = self.index.write(lambda txn: self._unindex_if_unused(txn, card_id))
            if rec is None:
                continue
            self._delete_card_data(card_id)
            self._cards.pop(card_id, None)
            freed.append(card_id)
            if rec["parent"]:
                todo.append(rec["parent"])
        return freed

    def _unindex_if_unused(self, txn: Any, card_id: str) -> dict[str, Any] | None:
        c = ix.cid(card_id)
        rec = self.index.get_json(txn, "cards", c)
        if rec is None or any(True for _ in self.index.prefixed(txn, "owners", c)) \
                or any(True for _ in self.index.prefixed(txn, "children", c)):
            return None
        self._unindex_txn(txn, card_id, rec)
        return rec

    def _unindex_txn(self, txn: Any, card_id: str, rec: dict[str, Any]) -> None:
        d = self.index.dbs
        c = ix.cid(card_id)
        hashes = txn.get(c, db=d["cblocks"]) or b""
        for i in range(0, len(hashes), ix.HASH_BYTES):
            txn.delete(hashes[i:i + ix.HASH_BYTES], c, db=d["blocks"])
        if rec.get("tail"):
            k, t, h = rec["tail"]
            txn.delete(bytes.fromhex(k), ix.pack_tail(c, t, bytes.fromhex(h)), db=d["tails"])
        for k, _ in list(self.index.prefixed(txn, "owners", c)):
            txn.delete(ix.ref_key(k[16:].decode(), c), db=d["refs"])
            txn.delete(k, db=d["owners"])
        if rec["parent"]:
            txn.delete(ix.cid(rec["parent"]) + c, db=d["children"])
        for name in ("cards", "cblocks", "atime", "pending"):
            txn.delete(c, db=d[name])

    def _delete_card_data(self, card_id: str) -> None:
        path = f"{self._base}/{self._rel_card(card_id)}"
        if not self.remote:
            p = Path(path)
            if not p.exists():
                return
            trash = p.parent / f".{card_id}.trash-{uuid.uuid4().hex}"
            os.rename(p, trash)  # the card disappears at once; a crash leaves trash that gc removes
            shutil.rmtree(trash, ignore_errors=True)
            return
        try:
            self.fs.rm_file(f"{path}/zarr.json")  # un-commit first: readers see an incomplete card
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def evict(self, max_bytes: int, *, agent: str | None = None) -> list[str]:
        """Bring the store (or, with ``agent``, that agent's footprint) down to ``max_bytes``, least recently
        used first.

        Store-wide, whole cards are removed, least recently used leaves first (a card that other cards
        continue goes only after them), whichever agents referenced them. With ``agent``, only that agent's
        references are dropped, LRU first, until the cards it references total at most ``max_bytes``; data is
        removed only where no other agent or card still uses it. Returns the ids of cards removed."""
        if agent is not None:
            check_agent(agent)
        freed: list[str] = []
        while True:
            with self.index.read() as txn:
                d = self.index.dbs
                if agent is None:
                    total = sum(json.loads(v)["bytes"] for _, v in txn.cursor(db=d["cards"]))
                    pool = [k for k, _ in txn.cursor(db=d["cards"])
                            if not any(True for _ in self.index.prefixed(txn, "children", k))]
                else:
                    mine = [k[len(agent) + 1:] for k, _ in self.index.prefixed(txn, "refs", agent.encode() + b"\x00")]
                    total = sum(self.index.get_json(txn, "cards", c)["bytes"] for c in mine)
                    pool = mine
                if total <= max_bytes or not pool:
                    return freed
                victim = min(pool, key=lambda c: ix.unf64(txn.get(c, db=d["atime"]) or ix.f64(0.0))).hex()
            try:
                freed += self.delete(victim, agent=agent)
            except CardNotFoundError:
                continue

    # -- listing and stats --------------------------------------------------------------------------------
    def cards(self, agent: str | None = None) -> list[CardInfo]:
        """Every indexed card (only ``agent``'s with ``agent``), oldest first."""
        out = []
        with self.index.read() as txn:
            d = self.index.dbs
            if agent is not None:
                keys = [k[len(check_agent(agent)) + 1:]
                        for k, _ in self.index.prefixed(txn, "refs", agent.encode() + b"\x00")]
            else:
                keys = [k for k, _ in txn.cursor(db=d["cards"])]
            for c in keys:
                rec = self.index.get_json(txn, "cards", c)
                if rec is None:
                    continue
                out.append(CardInfo(
                    card_id=c.hex(), agents=tuple(k[16:].decode() for k, _ in self.index.prefixed(txn, "owners", c)),
                    tokens=rec["tokens"], total=rec["start"] + rec["tokens"], parent=rec["parent"],
                    parent_tokens=rec["start"], children=sum(1 for _ in self.index.prefixed(txn, "children", c)),
                    bytes=rec["bytes"], codecs=tuple(rec["codecs"]), created=rec["created"],  # type: ignore[arg-type]
                    accessed=ix.unf64(txn.get(c, db=d["atime"]) or ix.f64(0.0)), model=rec["model"][:16]))
        out.sort(key=lambda i: (i.created, i.card_id))
        return out

    def agents(self) -> dict[str, int]:
        """Each agent and how many cards it references."""
        counts: dict[str, int] = {}
        with self.index.read() as txn:
            for k, _ in txn.cursor(db=self.index.dbs["refs"]):
                a = k[:-17].decode()
                counts[a] = counts.get(a, 0) + 1
        return counts

    def stats(self) -> dict[str, Any]:
        with self.index.read() as txn:
            d = self.index.dbs
            recs = [json.loads(v) for _, v in txn.cursor(db=d["cards"])]
            n = {name: self.index.count(txn, name) for name in ("blocks", "tails", "refs", "pending")}
        stored = sum(r["tokens"] for r in recs)
        represented = sum(r["start"] + r["tokens"] for r in recs)
        return {
            "store": self.root_label, "index": str(self.index.path), "block_tokens": self.block_tokens,
            "cards": len(recs), "agents": len(self.agents()), "references": n["refs"], "blocks": n["blocks"],
            "tails": n["tails"], "puts_in_progress": n["pending"], "bytes": sum(r["bytes"] for r in recs),
            "tokens_stored": stored, "tokens_represented": represented,
            "sharing": represented / stored if stored else 1.0,
            "index_bytes": self.index.used_bytes(), "index_map_size": self.index.env.info()["map_size"],
        }


def open_store(root: str | os.PathLike[str], **kwargs: Any) -> Store:
    """Open (or create) the store at ``root``; see :class:`Store`."""
    return Store(root, **kwargs)


__all__ = ["CardInfo", "GcReport", "Match", "ReindexReport", "Store", "VerifyStoreReport", "check_agent", "open_store"]
