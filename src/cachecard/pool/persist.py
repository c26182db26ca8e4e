"""Pool <-> store (DESIGN.md §4 "Hot tier": eviction to the store, reload through the restore path).

Writing: an agent's whole token sequence goes to ``Store.put``, which reuses the longest prefix the store
already holds (the agent's previous card, or another agent's shared context) and writes only the tokens after
it as a child card. The chunks are the resident rows themselves, handed over as the preset's serializer
payloads (``put(payloads=...)``), so a quantized agent is written without being decoded or re-quantized.

Reading: ``Store.match`` + ``Store.parts`` give the cards that hold the agent's prefix; ``Card.read_encoded``
gives their chunks undecoded, and a chunk of the resident codec becomes rows by slicing bytes. A card of
another codec (saved by another runtime, say) is decoded and encoded with the resident codec instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from cachecard.errors import CardNotFoundError, IdentityMismatchError, UnknownAgentError
from cachecard.kv import CanonicalKV, NUMPY_DTYPES
from cachecard.kvstore import index as ix

if TYPE_CHECKING:
    from cachecard.kvstore.store import Store
    from cachecard.pool.pool import BlockPool, _Agent

Slots = Callable[[int, int], tuple[np.ndarray, np.ndarray]]  # (first token, count) -> (blocks, offsets)


def write_agent(pool: BlockPool, agent: _Agent) -> str:
    """Put the agent's sequence into the store (only what it lacks is written); return the card id."""
    store, codec, ident = pool.store, pool.codec, pool.card_identity
    n = len(agent.ids)
    ids = np.asarray(agent.ids, dtype=np.int64)
    m = ident
    # Shapes and dtype only: every chunk comes from `payloads`, so nothing here is encoded or read.
    zeros = np.broadcast_to(np.zeros((), NUMPY_DTYPES[codec.card_dtype]),
                            (m.num_layers, m.num_kv_heads, n, m.head_dim))
    zero_row = codec.zero_row()

    def payloads(which: str, layer: int, start: int, valid: int, chunk: int) -> bytes:
        rows = np.empty((m.num_kv_heads, chunk, codec.row_bytes), np.uint8)
        rows[:] = zero_row  # the writer's padding rows: the codec's encoding of zeros
        if valid:
            blocks, offsets = pool._slots(agent, start, valid)
            rows[:, :valid] = pool.arena.read_np(layer, 0 if which == "k" else 1, blocks, offsets)
        return codec.rows_to_payload(rows.reshape(-1, codec.row_bytes)).tobytes()

    card_id = store.put(CanonicalKV(zeros, zeros), ids, ident, agent=agent.name, codec=codec.card_preset,
                        payloads=payloads)
    if agent.card_id is not None and agent.card_id != card_id:
        try:  # the new card holds the whole sequence (through its parents): keep one reference per agent
            store.delete(agent.card_id, agent=agent.name)
        except CardNotFoundError:
            pass
    return card_id


def stored_prefix(pool: BlockPool, agent: _Agent) -> tuple[str, int] | None:
    """The agent's longest prefix in the store (its own cards only): (card id, tokens), or None."""
    if pool.store is None or not agent.ids:
        return None
    match = pool.store.match(np.asarray(agent.ids, dtype=np.int64), pool.card_identity, agent=agent.name)
    return (match.card_id, match.tokens) if match is not None and match.tokens else None


def read_into(pool: BlockPool, card_id: str, start: int, stop: int, slots: Slots) -> int:
    """Write tokens ``[start, stop)`` of card ``card_id``'s sequence into the pool slots ``slots`` gives;
    return how many of them came as stored bytes (the rest were decoded and re-encoded)."""
    codec = pool.codec
    exact = 0
    for card, own in pool.store.parts(card_id, tokens=stop):
        first = card.manifest.start_position
        a, b = max(start - first, 0), own
        if b <= a:
            continue
        if all(codec.matches_card(card.read_encoded(w, layers=range(0)).codec, card.manifest.model.kv_dtype)
               for w in ("k", "v")):
            exact += _copy_rows(pool, card, a, b, first, slots)
        else:  # another codec: decode, then encode with the resident codec
            kv = card.read(tokens=slice(a, b))
            blocks, offsets = slots(first + a, b - a)
            for layer in range(kv.num_layers):
                for which, arr in ((0, kv.k), (1, kv.v)):
                    pool.arena.write_np(layer, which, blocks, offsets, codec.encode_np(arr[layer]))
    return exact


def _copy_rows(pool: BlockPool, card, a: int, b: int, first: int, slots: Slots) -> int:  # noqa: ANN001
    codec, heads = pool.codec, pool.identity.num_kv_heads
    for which_i, which in enumerate(("k", "v")):
        enc = card.read_encoded(which, tokens=slice(a, b))
        c = enc.chunk_shape[2]
        for ch in enc.chunks:
            rows = codec.payload_to_rows(ch.payload, heads * c)
            lo, hi = max(a, ch.token_start), min(b, ch.token_start + ch.tokens)
            if rows is None:  # e.g. an affine chunk with another scale type: decode this one
                vals = codec.serializer.decode_array(np.asarray(ch.payload), (heads, c, codec.head_dim))
                rows = codec.encode_np(vals).reshape(heads * c, codec.row_bytes)
            sel = rows.reshape(heads, c, codec.row_bytes)[:, lo - ch.token_start:hi - ch.token_start]
            blocks, offsets = slots(first + lo, hi - lo)
            pool.arena.write_np(ch.layer, which_i, blocks, offsets, sel)
    return b - a


def latest_card(store: Store, agent: str, pool: BlockPool) -> str:
    """The agent's longest card of this pool's model (what :meth:`BlockPool.attach` restores)."""
    infos = store.cards(agent=agent)
    if not infos:
        raise UnknownAgentError(f"the store at {store.root_label!r} holds no cards for agent {agent!r}; add it "
                                "with pool.add() instead")
    want = ix.model_key(pool.card_identity).hex()[:16]
    mine = [i for i in infos if i.model == want]
    if not mine:
        raise IdentityMismatchError(
            f"agent {agent!r} has {len(infos)} card(s) in the store, none made by this pool's model and resident "
            f"codec ({pool.codec.name}, KV {pool.card_identity.kv_dtype}); open a pool of the model (and codec) "
            "that saved them")
    best = max(mine, key=lambda i: (i.total, i.created))
    return best.card_id


__all__ = ["latest_card", "read_into", "stored_prefix", "write_agent"]
