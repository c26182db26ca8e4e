"""Whole-store maintenance (spec/store-1.md §1, §2): collect, gc, verify and reindex, as functions over a store's
objects and its index.

The objects are the source of truth and the index is derived, so these walk the objects rather than trust
the index: gc reconciles the two and removes what nothing uses, verify reads every indexed card against its
record, reindex rebuilds the index from the manifests and reference objects alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cachecard.card.reader import Card
from cachecard.errors import CacheCardError, CorruptCardError
from cachecard.kvstore.index import CardRecord, Index, IndexEntry, require, sequence_of
from cachecard.kvstore.names import Progress
from cachecard.kvstore.objects import StoreObjects
from cachecard.kvstore.prefix import keys_of, model_key

DEFAULT_GRACE_S = 3600.0     # gc leaves unindexed data younger than this alone: a put may still be writing it


@dataclass
class GcReport:
    orphans_deleted: list[str] = field(default_factory=list)   # unindexed, unreferenced cards removed
    partial_deleted: list[str] = field(default_factory=list)   # staging / trash / incomplete objects removed
    adopted: list[str] = field(default_factory=list)           # committed cards added back to the index
    freed: list[str] = field(default_factory=list)             # indexed cards nobody referenced, removed
    refs_fixed: int = 0
    lost: list[str] = field(default_factory=list)              # indexed cards whose data is gone
    bytes_freed: int = 0


@dataclass
class VerifyStoreReport:
    checked: int = 0
    ok: int = 0
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class ReindexReport:
    cards: int = 0
    refs: int = 0
    blocks: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def collect(objects: StoreObjects, index: Index, candidates: list[str]) -> list[str]:
    """Remove each candidate that no agent, no card and no put in progress uses (then its parent, and so on):
    index entry first, data after. Returns the ids removed."""
    freed = []
    todo = list(candidates)
    while todo:
        card_id = todo.pop()
        objects.card_path(card_id)  # refuses a card that is a symbolic link while it is still indexed
        rec = index.unindex_if_unused(card_id)
        if rec is None:
            continue
        objects.delete_card(card_id)
        freed.append(card_id)
        if rec.parent:
            todo.append(rec.parent)
    return freed


def entry_of(card: Card, sequence: np.ndarray, nbytes: int, block_tokens: int,
             agents: tuple[str, ...] = ()) -> IndexEntry:
    """The index entry of a stored card whose whole sequence is ``sequence``."""
    keys = keys_of(model_key(card.manifest.model), sequence, block_tokens)
    return IndexEntry(CardRecord.of(card.manifest, nbytes, keys.tail), keys.hashes, agents)


def adopt(objects: StoreObjects, index: Index, card_id: str, owners: tuple[str, ...], block_tokens: int) -> None:
    """Index a committed card that the index lacks (its parent must be indexed)."""
    card = objects.open_card(card_id)
    m = card.manifest
    prefix = np.zeros(0, "<i4")
    if m.parent is not None:
        if require(index, m.parent.card_id).model != model_key(m.model).hex():
            raise CorruptCardError("its parent was made by another model", card=card_id)
        prefix = sequence_of(index, objects.open_indexed, m.parent.card_id)[:m.parent.tokens]
    entry = entry_of(card, np.concatenate([prefix, card.token_ids()]), objects.card_bytes(card_id), block_tokens,
                     owners)
    index.commit([entry], only_new=True)


def gc(objects: StoreObjects, index: Index, *, block_tokens: int, grace_s: float = DEFAULT_GRACE_S,
       dry_run: bool = False, progress: Progress | None = None) -> GcReport:
    """Reconcile the store with the index and collect garbage; safe while other processes work.

    Removes: partial writes (staging, trash, incomplete cards) and unindexed cards no agent references,
    once older than ``grace_s`` (a put may still be writing younger ones) and not named by a live put in
    progress; indexed cards that no agent and no card references. Adopts committed cards that an agent's ref
    object names but the index lacks (a put that crashed after its ref), and completes interrupted reference
    changes. Puts in progress older than ``grace_s`` (on the index's clock) are dead: their pins end."""
    rep = GcReport()
    # The index first, the objects after: a reference the index holds had its object written before, so the
    # scan sees it and gc never drops a reference a concurrent put (on any node) just committed.
    indexed = {r.card_id for r in index.records()}
    pending = {p.card_id: p for p in index.pending()}
    irefs = index.refs()
    index_now = index.now()
    now = time.time()
    scan = objects.scan()
    stale = [c for c, p in pending.items() if index_now - p.time >= grace_s]
    live_pending = set(pending) - set(stale)
    for path, mtime in scan.junk:
        if now - mtime >= grace_s:
            rep.partial_deleted.append(path)
            if not dry_run:
                objects.remove_junk(path)
    total = len(scan.cards)
    for i, (card_id, info) in enumerate(sorted(scan.cards.items())):  # unindexed data in the store
        if progress:
            progress(i + 1, total)
        if card_id in indexed:
            continue
        old = now - info.mtime >= grace_s
        if not info.committed:
            if old:
                rep.partial_deleted.append(card_id)
                if not dry_run:
                    objects.delete_card(card_id)
            continue
        owners = tuple(sorted(a for a, c in scan.refs if c == card_id))
        if owners and (old or card_id not in live_pending):
            rep.adopted.append(card_id)
            if not dry_run:
                try:
                    adopt(objects, index, card_id, owners, block_tokens)
                except CacheCardError:
                    rep.adopted.pop()
            continue
        if not owners and old and card_id not in live_pending:
            rep.orphans_deleted.append(card_id)
            rep.bytes_freed += objects.card_bytes(card_id)
            if not dry_run:
                objects.delete_card(card_id)
    rep.lost = sorted(indexed - {c for c, i in scan.cards.items() if i.committed})  # indexed, data gone
    # interrupted reference changes: the ref objects are the truth
    add = {(a, c) for a, c in scan.refs if c in indexed and (a, c) not in irefs}
    drop = {(a, c) for a, c in irefs if (a, c) not in scan.refs}
    rep.refs_fixed = len(add) + len(drop)
    if not dry_run:
        for a, c in sorted(add):
            index.add_ref(a, c)
        index.remove_refs(drop)
        index.unpin(stale)  # pins of puts that never finished
    listing = index.listing()
    unused = [e.record.card_id for e in listing if not e.agents and not e.children]
    sizes = {e.record.card_id: e.record.bytes for e in listing}
    rep.freed = unused if dry_run else collect(objects, index, unused)
    rep.bytes_freed += sum(sizes.get(c, 0) for c in rep.freed)
    return rep


def verify(objects: StoreObjects, index: Index, *, progress: Progress | None = None) -> VerifyStoreReport:
    """Read every chunk of every indexed card and check it against the index (model, parent, tokens)."""
    rep = VerifyStoreReport()
    records = sorted(index.records(), key=lambda r: r.card_id)
    for i, rec in enumerate(records):
        rep.checked += 1
        try:
            objects.open_indexed(rec).verify()
            rep.ok += 1
        except CacheCardError as e:
            rep.failures[rec.card_id] = str(e)
        if progress:
            progress(i + 1, len(records))
    return rep


def whole_sequences(cards: dict[str, Card]) -> dict[str, np.ndarray | None]:
    """The whole token sequence of each card (parents first), None where a parent is missing, unreadable,
    of another model, shorter than claimed, or part of a cycle (hostile manifests). Iterative."""
    full: dict[str, np.ndarray | None] = {}
    for card_id in cards:
        stack = [card_id]
        while stack:
            c = stack[-1]
            card = cards.get(c)
            p = card.manifest.parent if card is not None else None
            if c in full:
                stack.pop()
            elif card is None:
                full[c] = None
            elif p is not None and p.card_id not in full:
                if p.card_id in stack:
                    full[c] = None
                else:
                    stack.append(p.card_id)
            elif p is None:
                full[c] = card.token_ids()
            else:
                pre = full[p.card_id]
                ok = pre is not None and len(pre) >= p.tokens and \
                    model_key(cards[p.card_id].manifest.model) == model_key(card.manifest.model)
                full[c] = np.concatenate([pre[:p.tokens], card.token_ids()]) if ok else None  # type: ignore[index]
    return full


def reindex(objects: StoreObjects, index: Index, *, block_tokens: int,
            progress: Progress | None = None) -> ReindexReport:
    """Rebuild the index from the cards' manifests and the agents' ref objects (last access times of cards
    still present are kept). Puts that commit while it runs are adopted by the next ``gc``."""
    rep = ReindexReport()
    scan = objects.scan()
    committed = sorted(c for c, i in scan.cards.items() if i.committed)
    cards: dict[str, Card] = {}
    for i, card_id in enumerate(committed):
        try:
            cards[card_id] = objects.open_card(card_id)
        except CacheCardError as e:
            rep.skipped[card_id] = str(e)
        if progress:
            progress(i + 1, 2 * len(committed))
    full = whole_sequences(cards)
    entries = []
    for i, (card_id, card) in enumerate(cards.items()):
        seq = full[card_id]
        if seq is None:
            rep.skipped[card_id] = "its parent is missing, unreadable, of another model or shorter than claimed"
            continue
        owners = tuple(sorted(a for a, c in scan.refs if c == card_id))
        entries.append(entry_of(card, seq, objects.card_bytes(card_id), block_tokens, owners))
        if progress:
            progress(len(committed) + i + 1, 2 * len(committed))
    good = {e.record.card_id for e in entries}
    entries = [e for e in entries if e.record.parent is None or e.record.parent in good]
    index.rebuild(entries)
    rep.cards = len(entries)
    rep.refs = sum(len(e.agents) for e in entries)
    rep.blocks = sum(len(e.hashes) for e in entries)
    return rep


__all__ = ["DEFAULT_GRACE_S", "GcReport", "ReindexReport", "VerifyStoreReport", "adopt", "collect", "gc", "reindex",
           "verify"]
