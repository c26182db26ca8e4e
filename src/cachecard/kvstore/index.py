"""The store's index as an interface (spec/store-1.md §2, §3): typed transactions and the records they return.

An index is derived data: the cards and reference objects of a store are the source of truth, and
:func:`cachecard.kvstore.maintenance.reindex` rebuilds any index from them. :class:`Index` names every
transaction the :class:`~cachecard.kvstore.store.Store` facade needs; a backend implements each one atomically
(LMDB: one write transaction; a networked engine: one script or optimistic transaction), so card records,
block and tail entries, references, owners, children, pins and access times never disagree.

Backends: :mod:`cachecard.kvstore.lmdb_index` (embedded, local disk; the default) and
:mod:`cachecard.kvstore.redis_index` (shared by every node of a store). The byte layout of an index is its
backend's business: nothing outside a backend module sees a key or a value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from cachecard.errors import CardNotFoundError
from cachecard.kvstore.prefix import SequenceKeys, TailEntry, model_key
from cachecard.manifest import CardManifest

INDEX_VERSION = 1


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a token sequence: ``tokens`` tokens of card ``card_id``'s sequence."""

    card_id: str
    tokens: int


@dataclass(frozen=True)
class CardRecord:
    """What the index knows of one card (all of it derivable from the card's manifest and size)."""

    card_id: str
    model: str                 # model key (hex) of the card's identity
    start: int                 # tokens of the parent's sequence this card continues
    tokens: int                # tokens stored in this card
    parent: str | None
    bytes: int                 # bytes of the card's objects
    codecs: tuple[str, str]    # K and V codec presets
    created: float             # seconds since the epoch
    tail: TailEntry | None = None   # where the whole sequence's partial last block is filed

    @property
    def total(self) -> int:
        """Tokens of the card's whole sequence (its parent's prefix included)."""
        return self.start + self.tokens

    def to_json(self) -> bytes:
        """The record as compact JSON (the value every backend stores; the id is its key)."""
        doc: dict[str, Any] = {"model": self.model, "start": self.start, "tokens": self.tokens, "parent": self.parent,
                               "bytes": self.bytes, "codecs": list(self.codecs), "created": self.created}
        if self.tail is not None:
            doc["tail"] = [self.tail.key.hex(), self.tail.length, self.tail.hash.hex()]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, card: bytes, raw: bytes) -> CardRecord:
        """The record of card ``card`` (16 bytes) from :meth:`to_json`'s bytes."""
        d = json.loads(raw)
        tail = d.get("tail")
        return cls(card_id=card.hex(), model=d["model"], start=d["start"], tokens=d["tokens"], parent=d["parent"],
                   bytes=d["bytes"], codecs=(d["codecs"][0], d["codecs"][1]), created=d["created"],
                   tail=TailEntry(bytes.fromhex(tail[0]), tail[1], bytes.fromhex(tail[2])) if tail else None)

    @classmethod
    def of(cls, manifest: CardManifest, nbytes: int, tail: TailEntry | None) -> CardRecord:
        p = manifest.parent
        return cls(card_id=manifest.card_id, model=model_key(manifest.model).hex(), start=p.tokens if p else 0,
                   tokens=manifest.tokens.count, parent=p.card_id if p else None, bytes=nbytes,
                   codecs=(manifest.codecs.k, manifest.codecs.v), created=manifest.created.timestamp(), tail=tail)


@dataclass(frozen=True)
class IndexEntry:
    """A card as it is committed: its record, the block hashes of its whole sequence, its agents."""

    record: CardRecord
    hashes: tuple[bytes, ...]
    agents: tuple[str, ...] = ()
    atime: float | None = None     # last access (default: now)


@dataclass(frozen=True)
class PutPlan:
    """Where a put goes. ``existing``: the whole sequence is card ``card_id`` already (the agent only gains a
    reference). Otherwise ``card_id`` is a new id, registered as a put in progress, and ``parent`` (the
    longest cached prefix reused) is pinned so that nobody collects it before the new card commits."""

    card_id: str
    existing: bool
    parent: Match | None = None


@dataclass(frozen=True)
class PendingPut:
    """A put in progress (its lease): planned, not yet committed or abandoned."""

    card_id: str
    parent: str | None
    agent: str
    time: float                # when it was planned, on the index's clock


@dataclass(frozen=True)
class CardEntry:
    """One row of a listing: a card's record, the agents referencing it, its children, its last access."""

    record: CardRecord
    agents: tuple[str, ...]
    children: int
    accessed: float


@dataclass(frozen=True)
class IndexStats:
    cards: int
    blocks: int                # (block hash, card) entries
    tails: int
    refs: int
    pending: int               # puts in progress
    bytes: int                 # bytes of every indexed card
    tokens_stored: int
    tokens_represented: int
    location: str              # where the index lives (a path or a URL without credentials)
    used_bytes: int            # bytes the index occupies (Redis: the whole server's used memory)
    capacity_bytes: int        # its current ceiling (LMDB map size; 0 when the engine has none)
    details: tuple[tuple[str, str], ...] = field(default=())   # backend specific, for display


@runtime_checkable
class Index(Protocol):
    """The typed transactions of a store's index. Every method is atomic on its own."""

    location: str
    shared: bool   # several machines use it at once (a shared index binds to the store's id, never empty)

    def bind(self, store_id: str, block_tokens: int, label: str = "") -> None:
        """Claim an empty index for the store with id ``store_id`` (``label`` names it in messages), or refuse
        (:class:`StoreError`) one built for another store or another block size."""

    def close(self) -> None: ...

    # -- puts ----------------------------------------------------------------------------------------------
    def plan_put(self, keys: SequenceKeys, codecs: tuple[str, str], agent: str, *, share: bool,
                 new_id: str) -> PutPlan:
        """With ``share``, find the longest visible prefix of ``keys`` among cards of the same ``codecs``
        (any agent); a whole-sequence card is returned as ``existing``. Else register ``new_id`` as pending
        and pin the prefix reused."""

    def abandon_put(self, plan: PutPlan) -> None:
        """Drop a pending put and its parent pin (the put failed before its commit)."""

    def commit(self, entries: Sequence[IndexEntry], *, only_new: bool = False) -> list[str]:
        """Index cards: records, block and tail entries, child links, references and owners, access times;
        their pending puts end. Each card is committed whole or not at all (a backend may commit a long list
        in several steps). With ``only_new``, cards indexed already are left as they are. Returns the ids
        committed."""

    def add_ref(self, agent: str, card_id: str) -> bool:
        """Give ``agent`` a reference to an indexed card (and count it an access); False if not indexed."""

    def remove_refs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop the (agent, card id) references."""

    def unindex_if_unused(self, card_id: str) -> CardRecord | None:
        """Remove a card no agent references and no card continues (nor any put pins) from the index;
        return its record, or None when it is in use or not indexed."""

    def unpin(self, card_ids: Iterable[str]) -> None:
        """End the pending puts of these cards that never committed (and their parent pins)."""

    def rebuild(self, entries: Sequence[IndexEntry]) -> None:
        """Replace the whole index by ``entries`` in one step (``reindex``); access times of cards still
        present are kept."""

    # -- reads ---------------------------------------------------------------------------------------------
    def record(self, card_id: str) -> CardRecord | None: ...

    def records(self) -> list[CardRecord]: ...

    def owners(self, card_id: str) -> tuple[str, ...]:
        """Agents referencing the card, sorted."""

    def has_ref(self, agent: str, card_id: str) -> bool: ...

    def children(self, card_id: str) -> tuple[str, ...]:
        """Cards continuing this one (committed, or pinned by a put in progress)."""

    def match(self, keys: SequenceKeys, *, agent: str | None = None,
              codecs: tuple[str, str] | None = None) -> Match | None:
        """The longest prefix of ``keys`` that a card holds: it ends on a block boundary or exactly where a
        card ends; only cards ``agent`` references (with ``agent``) and of these ``codecs`` (with ``codecs``)."""

    def touch(self, card_id: str, resolution_s: float) -> None:
        """Record an access (LRU), unless one was recorded less than ``resolution_s`` ago."""

    def listing(self, agent: str | None = None) -> list[CardEntry]:
        """Every indexed card (only those ``agent`` references, with ``agent``)."""

    def agents(self) -> dict[str, int]:
        """Each agent and how many cards it references."""

    def refs(self) -> set[tuple[str, str]]:
        """Every (agent, card id) reference."""

    def pending(self) -> list[PendingPut]: ...

    def now(self) -> float:
        """The index's clock (seconds since the epoch): the clock pending puts are timed by."""

    def stats(self) -> IndexStats: ...


def pick_tail(keys: SequenceKeys, blocks: int, tails: Iterable[tuple[bytes, int, bytes]], best: bytes | None,
              visible: Callable[[bytes], bool] = lambda c: True) -> Match | None:
    """Finish a longest-prefix match: ``blocks`` full blocks of ``keys`` matched (by card ``best``, or None),
    and ``tails`` are the (card, length, hash) entries filed under the last matched block; a visible card
    whose tail hash equals the query's over the same length extends the match to where that card ends."""
    matched = blocks * keys.block
    seen: dict[int, bytes] = {}
    best_tail = 0
    for c, t, h in tails:
        if t <= best_tail or matched + t > keys.tokens:
            continue
        if t not in seen:
            seen[t] = keys.tail_hash_at(blocks, t)
        if seen[t] == h and visible(c):
            best_tail, best = t, c
    return None if best is None else Match(best.hex(), matched + best_tail)


Segment = tuple[str, CardRecord, int, int]


def require(index: Index, card_id: str) -> CardRecord:
    """The record of an indexed card, or :class:`CardNotFoundError` saying what to do."""
    rec = index.record(card_id)
    if rec is None:
        raise CardNotFoundError("no such card in this store (deleted, never stored, or the index is stale: "
                                "run `cachecard reindex`)", card=card_id)
    return rec


def segments(index: Index, card_id: str, rec: CardRecord, a: int, b: int) -> list[Segment]:
    """(card id, record, own start, own stop) pieces that make tokens [a, b) of ``card_id``'s sequence, parents
    first."""
    out = []
    while True:
        s = rec.start
        if b > s:
            out.append((card_id, rec, max(a, s) - s, b - s))
        if a >= s or rec.parent is None:
            break
        b = min(b, s)
        card_id = rec.parent
        rec = require(index, card_id)
    out.reverse()
    return out or [(card_id, rec, 0, 0)]


class _HasTokens(Protocol):
    def token_ids(self) -> np.ndarray: ...


def sequence_of(index: Index, open_: Callable[[CardRecord], _HasTokens], card_id: str) -> np.ndarray:
    """The whole token sequence of an indexed card (its parents' prefix included); ``open_`` opens a card."""
    rec = require(index, card_id)
    parts = [open_(r).token_ids()[a:b] for _, r, a, b in segments(index, card_id, rec, 0, rec.total)]
    return np.concatenate(parts) if parts else np.zeros(0, "<i4")


__all__ = ["CardEntry", "CardRecord", "INDEX_VERSION", "Index", "IndexEntry", "IndexStats", "Match", "PendingPut",
           "PutPlan", "pick_tail", "require", "segments", "sequence_of"]
