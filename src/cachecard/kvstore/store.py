"""Agent memory over cards: the :class:`Store` facade (DESIGN.md §4, spec/store-1.md).

A store keeps cards and the agents' references to them as objects (:mod:`~cachecard.kvstore.objects`: a local
directory or an fsspec URL such as ``s3://bucket/prefix``), and a derived prefix index behind the
:class:`~cachecard.kvstore.index.Index` interface (embedded LMDB by default, or Redis shared by many nodes;
:mod:`~cachecard.kvstore.backends` opens one). Commit order of a put (:mod:`~cachecard.kvstore.puts`): card
data, card manifest (atomic), ref object, index entry. Deleting runs the other way: ref object, index entry,
card data. A crash in between leaves at most an orphan that ``gc`` collects (or adopts, when a ref object says
an agent owns it).

Sharing. ``put`` looks up the longest cached prefix of the new sequence (same model, same codec presets,
any agent) and writes only the tokens after it, as a card whose manifest ``parent`` points at that prefix.
So N agents that share a context store it once, and saving after every turn writes only the new turn.
Reference counts: a card's data is removed only when no agent references it and no other card continues it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cachecard.card import layout
from cachecard.card.reader import Card
from cachecard.card.shard_write import Payloads
from cachecard.card.writer import _check_kv_matches_model as check_kv_matches_model  # the writer's own rule
from cachecard.errors import (
    CardNotFoundError, CorruptCardError, IdentityMismatchError, IncompleteCardError, KVShapeError, StoreError,
)
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore import eviction, maintenance, puts
from cachecard.kvstore.backends import open_index
from cachecard.kvstore.card_cache import DEFAULT_CACHE_BYTES, CardCache
from cachecard.kvstore.index import CardRecord, Index, Match, Segment, require, segments, sequence_of
from cachecard.kvstore.maintenance import GcReport, ReindexReport, VerifyStoreReport
from cachecard.kvstore.names import _OPEN_CACHE, ATIME_RESOLUTION_S, STORE_FILE, Progress, check_agent, check_card_id
from cachecard.kvstore.objects import StoreObjects
from cachecard.kvstore.prefix import keys_of, model_key
from cachecard.manifest import ModelIdentity


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


class Store:
    """A store of cards for agents: put / match / load / handoff / delete / evict / gc / verify / reindex.

    Parameters
    ----------
    root
        A local directory or an fsspec URL (``s3://bucket/prefix``, ``memory://name``).
    index
        Where the index lives: a local directory for the embedded LMDB index, or a ``redis://host:6379/0``
        URL for an index shared by every node of the store (``?namespace=NAME`` to share one database between
        stores). Default: LMDB at ``<root>/index`` for a local store, and at
        ``$XDG_CACHE_HOME/cachecard/index/<sha256(url)[:16]>`` for a URL.
    create
        Create the store if it does not exist (else :class:`StoreError`).
    block_tokens
        Prefix-index granularity ``B`` for a new store (an existing store keeps its own).
    storage_options
        fsspec options for a URL (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3).
    map_size
        Initial LMDB map size; it doubles by itself whenever it fills.
    open_cache
        How many opened cards (metadata and token ids, not KV) to keep; 0 opens a card on every read.
    cache_dir, cache_bytes
        A local directory where a remote store's cards are kept after their first read (a bounded LRU of at
        most ``cache_bytes``), so a node restores a popular card from its own disk. Off by default.
    """

    def __init__(self, root: str | os.PathLike[str], *, index: str | os.PathLike[str] | None = None,
                 create: bool = True, block_tokens: int | None = None,
                 storage_options: dict[str, Any] | None = None, map_size: int | None = None,
                 open_cache: int = _OPEN_CACHE, cache_dir: str | os.PathLike[str] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root_label = str(root)
        cache = CardCache(cache_dir, cache_bytes) if cache_dir is not None else None
        self.objects = StoreObjects(root, storage_options, cache)
        info = self.objects.open_root(create, block_tokens)
        self.block_tokens = info.block_tokens
        self.index: Index = open_index(index, self.objects, map_size=map_size)
        self._cards: dict[str, Card] = {}
        self._open_cache = open_cache
        self.atime_resolution_s = ATIME_RESOLUTION_S
        try:
            self.store_id = info.store_id or (self.objects.give_store_id() if self.index.shared else "")
            self.index.bind(self.store_id, self.block_tokens, self.root_label)
        except BaseException:
            self.index.close()
            raise

    @property
    def remote(self) -> bool:
        return self.objects.remote

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._cards.clear()
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def card_location(self, card_id: str) -> str:
        """Where card ``card_id`` lives: a local path or a URL (readable with ``open_card``)."""
        return self.objects.card_location(card_id)

    # -- put ----------------------------------------------------------------------------------------------
    def put(self, kv: CanonicalKV, tokens: Sequence[int] | np.ndarray, model: ModelIdentity, *, agent: str,
            codec: str | tuple[str, str] = "lossless", chunk_tokens: int = layout.DEFAULT_CHUNK_TOKENS,
            share: bool = True, payloads: Payloads | None = None) -> str:
        """Save ``kv`` (all of ``tokens``, every layer) for ``agent``; return the card id that holds it.

        With ``share`` (the default) the longest cached prefix of ``tokens`` (same model and codec presets,
        any agent) is reused through a parent reference and only the tokens after it are written; if the
        whole sequence is already a card, no data is written and the agent just gains a reference to it.
        ``payloads`` (see ``write_card``) gives chunks already encoded; its token indices count from the start
        of ``tokens``, whatever prefix the store reuses.
        """
        check_agent(agent)
        ids = token_ids(tokens)  # also a (1, T) batch of one
        if ids.ndim != 1 or len(ids) != kv.num_tokens:
            raise KVShapeError(f"need one token id per cached token: KV holds {kv.num_tokens} tokens, got ids of "
                               f"shape {ids.shape}")
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > 2**31 - 1):
            raise KVShapeError("token ids must be integers in [0, 2**31-1]")
        ids = ids.astype("<i4")
        check_kv_matches_model(kv, model)  # also when the sequence is stored already: a wrong KV is an error
        keys = keys_of(model_key(model), ids, self.block_tokens)
        return puts.put(self.objects, self.index, kv, ids, keys, model, agent=agent, codec=codec,
                        chunk_tokens=chunk_tokens, share=share, payloads=payloads)

    # -- match --------------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int] | np.ndarray, model: ModelIdentity, agent: str | None = None) -> Match | None:
        """The longest cached prefix of ``tokens`` for ``model`` (only among ``agent``'s cards if given),
        or ``None``. Matches end on a block boundary (``block_tokens``) or exactly where a card ends."""
        if agent is not None:
            check_agent(agent)
        ids = token_ids(tokens)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() > 2**31 - 1)):
            raise KVShapeError("tokens must be a 1-d sequence of token ids in [0, 2**31-1]")
        return self.index.match(keys_of(model_key(model), ids, self.block_tokens), agent=agent)

    # -- load ---------------------------------------------------------------------------------------------
    def load(self, what: str | Match, *, tokens: int | slice | range | None = None,
             layers: range | slice | int | None = None, model: ModelIdentity | None = None) -> CanonicalKV:
        """Canonical KV of a card's sequence (its parents' prefix included): by default all of it, or the
        matched prefix of a :class:`Match`. ``tokens=n`` means the first n; only needed chunks are read,
        in parallel across the cards of the chain. With ``model``, a card of another model is refused."""
        card_id, default = (what.card_id, what.tokens) if isinstance(what, Match) else (what, None)
        rec = require(self.index, check_card_id(card_id))
        total = rec.total
        if model is not None and model_key(model).hex() != rec.model:
            diffs = self._open(rec).manifest.model.mismatches(model)
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
        segs = segments(self.index, card_id, rec, tokens.start, max(tokens.start, tokens.stop))
        for attempt in (0, 1):
            try:
                parts = self._read_segments(segs, layers)
                break
            except (CardNotFoundError, IncompleteCardError, CorruptCardError, OSError, StoreError) as e:
                if any(self.index.record(c) is None for c, _, _, _ in segs):
                    raise CardNotFoundError("the card was deleted while it was being read", card=card_id) from e
                if attempt or self.objects.cache is None:
                    raise
                for c, _, _, _ in segs:  # a cached copy removed by another process: read from the store again
                    self._cards.pop(c, None)
                    self.objects.forget_cached(c)
        self.index.touch(card_id, self.atime_resolution_s)
        if len(parts) == 1:
            return parts[0]
        return CanonicalKV(np.concatenate([p.k for p in parts], axis=2), np.concatenate([p.v for p in parts], axis=2))

    def _read_segments(self, segs: list[Segment], layers: range | slice | int | None) -> list[CanonicalKV]:
        """Read each piece of a sequence, in parallel across the cards of the chain."""
        cards = [self._open(r) for _, r, _, _ in segs]

        def read(i: int) -> CanonicalKV:
            _, _, a, b = segs[i]
            with self.objects.service(f"reading card {segs[i][0]}"):
                return cards[i].read(layers=layers, tokens=slice(a, b))

        if len(segs) == 1:
            return [read(0)]
        with ThreadPoolExecutor(min(8, len(segs))) as pool:
            return list(pool.map(read, range(len(segs))))

    def parts(self, what: str | Match, *, tokens: int | None = None) -> list[tuple[Card, int]]:
        """The opened cards that hold the first ``tokens`` tokens of a card's sequence (default: all of it, or
        the matched prefix of a :class:`Match`), parents first, each with how many of its own tokens count.
        For runtimes that read cards their own way (``cachecard.adapters.torch_read``); :meth:`load` is the
        plain path."""
        card_id, default = (what.card_id, what.tokens) if isinstance(what, Match) else (what, None)
        rec = require(self.index, check_card_id(card_id))
        n = tokens if tokens is not None else default if default is not None else rec.total
        if not 0 <= n <= rec.total:
            raise IndexError(f"card {card_id} holds {rec.total} tokens; cannot take {n}")
        out = [(self._open(r), b) for _, r, a, b in segments(self.index, card_id, rec, 0, n) if b > a]
        self.index.touch(card_id, self.atime_resolution_s)
        return out

    def tokens_of(self, card_id: str) -> np.ndarray:
        """The whole token sequence of a card (its parents' prefix included)."""
        return sequence_of(self.index, self._open, check_card_id(card_id))

    def _open(self, rec: CardRecord) -> Card:
        card = self._cards.get(rec.card_id)
        if card is None:
            card = self.objects.open_indexed(rec)
            if self._open_cache > 0:
                if len(self._cards) >= self._open_cache:
                    self._cards.pop(next(iter(self._cards)))
                self._cards[rec.card_id] = card
        return card

    # -- sharing and removal ------------------------------------------------------------------------------
    def handoff(self, card_id: str, to_agent: str, *, from_agent: str | None = None) -> None:
        """Give ``to_agent`` a reference to a card (no copy, no re-quantization). With ``from_agent``, the
        reference moves: ``from_agent`` loses its own (the data stays while anyone references it)."""
        check_card_id(card_id)
        check_agent(to_agent)
        if from_agent is not None:
            check_agent(from_agent)
            if not self.index.has_ref(from_agent, card_id):
                raise CardNotFoundError(f"agent {from_agent!r} holds no reference to this card", card=card_id)
        require(self.index, card_id)
        self.objects.write_ref(to_agent, card_id)
        if not self.index.add_ref(to_agent, card_id):
            self.objects.delete_ref(to_agent, card_id)
            raise CardNotFoundError("the card was deleted before the handoff committed", card=card_id)
        if from_agent is not None and from_agent != to_agent:
            self.delete(card_id, agent=from_agent)

    def delete(self, card_id: str, agent: str | None = None) -> list[str]:
        """Remove ``agent``'s reference to a card (every agent's with ``agent=None``); return the ids of
        cards whose data was removed because nothing references them any more (the card, then parents
        that only it continued). A card other cards continue stays as their parent, without agents."""
        self.objects.card_path(check_card_id(card_id))  # a card that is a symbolic link: refuse before any change
        if self.index.record(card_id) is None:
            raise CardNotFoundError("no such card in this store", card=card_id)
        agents = self.index.owners(card_id)
        if agent is not None:
            check_agent(agent)
            if agent not in agents:
                raise CardNotFoundError(f"agent {agent!r} holds no reference to this card", card=card_id)
            agents = (agent,)
        for a in agents:
            self.objects.delete_ref(a, card_id)
        self.index.remove_refs((a, card_id) for a in agents)
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
        freed = maintenance.collect(self.objects, self.index, candidates)
        for card_id in freed:
            self._cards.pop(card_id, None)
        return freed

    def evict(self, max_bytes: int, *, agent: str | None = None) -> list[str]:
        """Bring the store (or, with ``agent``, that agent's footprint) down to ``max_bytes``, least recently
        used first.

        Store-wide, whole cards are removed, least recently used leaves first (a card that other cards
        continue goes only after them), whichever agents referenced them. With ``agent``, only that agent's
        references are dropped, LRU first, until the cards it references total at most ``max_bytes``; data is
        removed only where no other agent or card still uses it. Returns the ids of cards removed."""
        if agent is not None:
            check_agent(agent)
        return eviction.evict(self.index, lambda c, a: self.delete(c, agent=a), max_bytes, agent)

    # -- listing and stats --------------------------------------------------------------------------------
    def cards(self, agent: str | None = None) -> list[CardInfo]:
        """Every indexed card (only ``agent``'s with ``agent``), oldest first."""
        if agent is not None:
            check_agent(agent)
        out = [CardInfo(card_id=r.card_id, agents=e.agents, tokens=r.tokens, total=r.total, parent=r.parent,
                        parent_tokens=r.start, children=e.children, bytes=r.bytes, codecs=r.codecs,
                        created=r.created, accessed=e.accessed, model=r.model[:16])
               for e in self.index.listing(agent) for r in (e.record,)]
        out.sort(key=lambda i: (i.created, i.card_id))
        return out

    def agents(self) -> dict[str, int]:
        """Each agent and how many cards it references."""
        return self.index.agents()

    def stats(self) -> dict[str, Any]:
        s = self.index.stats()
        return {
            "store": self.root_label, "index": s.location, "block_tokens": self.block_tokens,
            "cards": s.cards, "agents": len(self.index.agents()), "references": s.refs, "blocks": s.blocks,
            "tails": s.tails, "puts_in_progress": s.pending, "bytes": s.bytes,
            "tokens_stored": s.tokens_stored, "tokens_represented": s.tokens_represented,
            "sharing": s.tokens_represented / s.tokens_stored if s.tokens_stored else 1.0,
            "index_bytes": s.used_bytes, "index_map_size": s.capacity_bytes,
        }

    # -- maintenance (cachecard.kvstore.maintenance) ----------------------------------------------------------
    def gc(self, *, grace_s: float = maintenance.DEFAULT_GRACE_S, dry_run: bool = False,
           progress: Progress | None = None) -> GcReport:
        """Reconcile the store with the index and collect garbage; see :func:`maintenance.gc`."""
        rep = maintenance.gc(self.objects, self.index, block_tokens=self.block_tokens, grace_s=grace_s,
                             dry_run=dry_run, progress=progress)
        for card_id in rep.freed + rep.orphans_deleted:
            self._cards.pop(card_id, None)
        return rep

    def verify(self, *, progress: Progress | None = None) -> VerifyStoreReport:
        """Read every chunk of every indexed card and check it against the index; see :func:`maintenance.verify`."""
        return maintenance.verify(self.objects, self.index, progress=progress)

    def reindex(self, *, progress: Progress | None = None) -> ReindexReport:
        """Rebuild the index from the cards' manifests and the agents' ref objects; see
        :func:`maintenance.reindex`."""
        rep = maintenance.reindex(self.objects, self.index, block_tokens=self.block_tokens, progress=progress)
        self._cards.clear()
        return rep


def open_store(root: str | os.PathLike[str], **kwargs: Any) -> Store:
    """Open (or create) the store at ``root``; see :class:`Store`."""
    return Store(root, **kwargs)


__all__ = ["STORE_FILE", "CardInfo", "GcReport", "Match", "ReindexReport", "Store", "VerifyStoreReport", "check_agent",
           "open_store"]
