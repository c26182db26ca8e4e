"""Whole-store scans: gc, verify and reindex (spec/store-1.md §1, §2: objects are the truth, the index derived).

They walk the store's objects rather than the index, because the objects are the source of truth: a
:class:`~cachecard.kvstore.store.Store` inherits them from :class:`StoreScans`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cachecard.errors import CacheCardError, CorruptCardError
from cachecard.kvstore import index as ix
from cachecard.kvstore.names import AGENT_RE, CARD_ID_RE, Progress, unlink_quietly
from cachecard.card.reader import Card, open_card

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


class StoreScans:
    """gc, verify and reindex of a :class:`~cachecard.kvstore.store.Store` (a mixin: it uses the store's index,
    filesystem and card helpers)."""

    def _scan(self) -> tuple[dict[str, dict[str, Any]], list[tuple[str, float]], set[tuple[str, str]]]:
        """The store's cards ({id: {committed, mtime, bytes}}), junk paths with their age, and refs."""
        cards: dict[str, dict[str, Any]] = {}
        junk: list[tuple[str, float]] = []
        refs: set[tuple[str, str]] = set()
        base = self._base
        if not self.remote:
            root = Path(base) / "cards"
            if root.is_dir():
                for sub in os.scandir(root):
                    if not sub.is_dir(follow_symlinks=False):
                        continue
                    for e in os.scandir(sub.path):
                        st = e.stat(follow_symlinks=False)
                        if CARD_ID_RE.match(e.name) and e.is_dir(follow_symlinks=False):
                            committed = os.path.exists(os.path.join(e.path, "zarr.json"))
                            cards[e.name] = {"committed": committed, "mtime": st.st_mtime}
                        elif e.name.startswith("."):
                            junk.append((e.path, st.st_mtime))
            rroot = Path(base) / "refs"
            if rroot.is_dir():
                for a in os.scandir(rroot):
                    if a.is_dir(follow_symlinks=False) and AGENT_RE.match(a.name):
                        for r in os.scandir(a.path):
                            if CARD_ID_RE.match(r.name):
                                refs.add((a.name, r.name))
                            elif r.name.startswith("."):
                                junk.append((r.path, r.stat(follow_symlinks=False).st_mtime))
            return cards, junk, refs
        for path, info in self.fs.find(f"{base}/cards", detail=True).items():
            parts = path[len(base) + 1:].split("/")
            if len(parts) < 4 or not CARD_ID_RE.match(parts[2]):
                continue
            c = cards.setdefault(parts[2], {"committed": False, "mtime": 0.0})
            if parts[3:] == ["zarr.json"]:
                c["committed"] = True
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            c["mtime"] = max(c["mtime"], float(mtime or 0.0))
        for path in self.fs.find(f"{base}/refs"):
            parts = path[len(base) + 1:].split("/")
            if len(parts) == 3 and AGENT_RE.match(parts[1]) and CARD_ID_RE.match(parts[2]):
                refs.add((parts[1], parts[2]))
        return cards, junk, refs

    def gc(self, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
           progress: Progress | None = None) -> GcReport:
        """Reconcile the store with the index and collect garbage; safe while other processes work.

        Removes: partial writes (staging, trash, incomplete cards) and unindexed cards no agent references,
        once older than ``grace_s`` (a put may still be writing younger ones); indexed cards that no agent and
        no card references. Adopts committed cards that an agent's ref object names but the index lacks (a
        put that crashed after its ref), and completes interrupted reference changes."""
        rep = GcReport()
        now = time.time()
        cards, junk, refs = self._scan()
        d = self.index.dbs
        with self.index.read() as txn:
            indexed = {k.hex() for k, _ in txn.cursor(db=d["cards"])}
            pending = {k.hex(): json.loads(v) for k, v in txn.cursor(db=d["pending"])}
            irefs = {(k[:-17].decode(), k[-16:].hex()) for k, _ in txn.cursor(db=d["refs"])}
        # pins of puts older than the grace period are dead puts: their cards are collectable in this pass
        stale = [c for c, p in pending.items() if now - p["time"] >= grace_s]
        live_pending = set(pending) - set(stale)
        for path, mtime in junk:
            if now - mtime >= grace_s:
                rep.partial_deleted.append(path)
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else unlink_quietly(path)
        total = len(cards)
        # unindexed data in the store
        for i, (card_id, info) in enumerate(sorted(cards.items())):
            if progress:
                progress(i + 1, total)
            if card_id in indexed:
                continue
            old = now - info["mtime"] >= grace_s
            if not info["committed"]:
                if old:
                    rep.partial_deleted.append(card_id)
                    if not dry_run:
                        self._delete_card_data(card_id)
                continue
            owners = sorted(a for a, c in refs if c == card_id)
            if owners and (old or card_id not in live_pending):
                rep.adopted.append(card_id)
                if not dry_run:
                    try:
                        self._adopt(card_id, owners)
                    except CacheCardError:
                        rep.adopted.pop()
                continue
            if not owners and old and card_id not in live_pending:
                rep.orphans_deleted.append(card_id)
                rep.bytes_freed += self._card_bytes(card_id)
                if not dry_run:
                    self._delete_card_data(card_id)
        # indexed cards whose data is gone
        for card_id in sorted(indexed - {c for c, i in cards.items() if i["committed"]}):
            rep.lost.append(card_id)
        # interrupted reference changes: the ref objects are the truth
        add = {(a, c) for a, c in refs if c in indexed and (a, c) not in irefs}
        drop = {(a, c) for a, c in irefs if (a, c) not in refs}
        rep.refs_fixed = len(add) + len(drop)
        if not dry_run and (add or drop):
            def fix(txn: Any) -> None:
                for a, c in add:
                    self._add_ref_txn(txn, a, c)
                for a, c in drop:
                    txn.delete(ix.ref_key(a, ix.cid(c)), db=d["refs"])
                    txn.delete(ix.cid(c) + a.encode(), db=d["owners"])
            self.index.write(fix)
        # stale pins of puts that never finished
        if not dry_run and stale:
            def unpin(txn: Any) -> None:
                for c in stale:
                    if txn.get(ix.cid(c), db=d["cards"]) is None:
                        p = pending[c]
                        txn.delete(ix.cid(c), db=d["pending"])
                        if p["parent"]:
                            txn.delete(ix.cid(p["parent"]) + ix.cid(c), db=d["children"])
            self.index.write(unpin)
        # indexed cards nobody references
        with self.index.read() as txn:
            unused = [k.hex() for k, _ in txn.cursor(db=d["cards"])
                      if not any(True for _ in self.index.prefixed(txn, "owners", k))
                      and not any(True for _ in self.index.prefixed(txn, "children", k))]
            sizes = {c: self.index.get_json(txn, "cards", ix.cid(c))["bytes"] for c in unused}
        if dry_run:
            rep.freed = unused
            rep.bytes_freed += sum(sizes.values())
        else:
            with self.index.read() as txn:
                before = {k.hex(): json.loads(v)["bytes"] for k, v in txn.cursor(db=d["cards"])}
            rep.freed = self._collect(unused)
            rep.bytes_freed += sum(before.get(c, 0) for c in rep.freed)
        return rep

    def _adopt(self, card_id: str, owners: list[str]) -> None:
        """Index a committed card that the index lacks (its parent must be indexed)."""
        card = open_card(self.card_location(card_id), storage_options=self._opts or None)
        m = card.manifest
        if m.card_id != card_id:
            raise CorruptCardError(f"its manifest says card_id {m.card_id}", card=card_id)
        mkey = ix.model_key(m.model)
        prefix = np.zeros(0, "<i4")
        if m.parent is not None:
            prec = self._rec(m.parent.card_id)
            if prec["model"] != mkey.hex():
                raise CorruptCardError("its parent was made by another model", card=card_id)
            prefix = self.tokens_of(m.parent.card_id)[:m.parent.tokens]
        full = np.concatenate([prefix, card.token_ids()])
        raw = ix.token_bytes(full)
        hashes = ix.chain(mkey, raw, self.block_tokens)
        t = len(full) - len(hashes) * self.block_tokens
        tail = (ix.tail_key(mkey, hashes), t, ix.tail_hash(mkey, hashes, raw[4 * (len(full) - t):])) if t else None
        record = self._record(m, mkey, self._card_bytes(card_id), total=len(full))

        def commit(txn: Any) -> None:
            if txn.get(ix.cid(card_id), db=self.index.dbs["cards"]) is None:
                self._commit_txn(txn, card_id, record, hashes, tail, None, agents=owners)

        self.index.write(commit)

    def verify(self, *, progress: Progress | None = None) -> VerifyStoreReport:
        """Read every chunk of every indexed card and check it against the index (model, parent, tokens)."""
        rep = VerifyStoreReport()
        with self.index.read() as txn:
            recs = {k.hex(): json.loads(v) for k, v in txn.cursor(db=self.index.dbs["cards"])}
        for i, (card_id, rec) in enumerate(sorted(recs.items())):
            rep.checked += 1
            try:
                self._cards.pop(card_id, None)
                self._open(card_id, rec).verify()
                rep.ok += 1
            except CacheCardError as e:
                rep.failures[card_id] = str(e)
            if progress:
                progress(i + 1, len(recs))
        return rep

    def reindex(self, *, progress: Progress | None = None) -> ReindexReport:
        """Rebuild the index from the cards' manifests and the agents' ref objects (last access times of
        cards still present are kept). Puts that commit while it runs are adopted by the next ``gc``."""
        rep = ReindexReport()
        cards, _, refs = self._scan()
        committed = sorted(c for c, i in cards.items() if i["committed"])
        manifests: dict[str, Card] = {}
        for i, card_id in enumerate(committed):
            try:
                card = open_card(self.card_location(card_id), storage_options=self._opts or None)
                if card.manifest.card_id != card_id:
                    raise CorruptCardError(f"its manifest says card_id {card.manifest.card_id}", card=card_id)
                manifests[card_id] = card
            except CacheCardError as e:
                rep.skipped[card_id] = str(e)
            if progress:
                progress(i + 1, 2 * len(committed))
        full: dict[str, np.ndarray | None] = {}

        def sequence(card_id: str) -> np.ndarray | None:  # whole token sequence, parents first (iterative)
            stack = [card_id]
            while stack:
                c = stack[-1]
                if c in full:
                    stack.pop()
                    continue
                card = manifests.get(c)
                if card is None:
                    full[c] = None
                    stack.pop()
                    continue
                p = card.manifest.parent
                if p is not None and p.card_id not in full:
                    if p.card_id in stack:  # a cycle: hostile manifests
                        full[c] = None
                        stack.pop()
                        continue
                    stack.append(p.card_id)
                    continue
                stack.pop()
                if p is None:
                    full[c] = card.token_ids()
                    continue
                pre = full[p.card_id]
                if pre is None or len(pre) < p.tokens or \
                        ix.model_key(manifests[p.card_id].manifest.model) != ix.model_key(card.manifest.model):
                    full[c] = None
                    continue
                full[c] = np.concatenate([pre[:p.tokens], card.token_ids()])
            return full[card_id]

        entries = []
        for i, (card_id, card) in enumerate(manifests.items()):
            seq = sequence(card_id)
            if seq is None:
                rep.skipped[card_id] = "its parent is missing, unreadable, of another model or shorter than claimed"
                continue
            m = card.manifest
            mkey = ix.model_key(m.model)
            raw = ix.token_bytes(seq)
            hashes = ix.chain(mkey, raw, self.block_tokens)
            t = len(seq) - len(hashes) * self.block_tokens
            tail = (ix.tail_key(mkey, hashes), t, ix.tail_hash(mkey, hashes, raw[4 * (len(seq) - t):])) if t else None
            owners = sorted(a for a, c in refs if c == card_id)
            entries.append((card_id, self._record(m, mkey, self._card_bytes(card_id), total=len(seq)), hashes, tail,
                            owners))
            if progress:
                progress(len(committed) + i + 1, 2 * len(committed))
        good = {e[0] for e in entries}
        entries = [e for e in entries if e[1]["parent"] is None or e[1]["parent"] in good]
        d = self.index.dbs

        def rebuild(txn: Any) -> None:
            atimes = {k: v for k, v in txn.cursor(db=d["atime"])}
            for name in ix.DBS:
                if name != "meta":
                    txn.drop(d[name], delete=False)
            for card_id, record, hashes, tail, owners in entries:
                a = atimes.get(ix.cid(card_id))
                self._commit_txn(txn, card_id, dict(record), hashes, tail, None, agents=owners,
                                 atime=ix.unf64(a) if a else None)

        self.index.write(rebuild)
        self._cards.clear()
        rep.cards = len(entries)
        rep.refs = sum(len(e[4]) for e in entries)
        rep.blocks = sum(len(e[2]) for e in entries)
        return rep
