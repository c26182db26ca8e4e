"""How a put commits (spec/store-1.md §2, §4): plan (pin the prefix reused, register the put), card, reference
object, index entry; and how a put that fails on the way is undone. Used by the ``Store`` facade."""

from __future__ import annotations

import uuid

import numpy as np

from cachecard.card import layout
from cachecard.errors import CacheCardError, StoreError
from cachecard.kv import CanonicalKV
from cachecard.kvstore.index import CardRecord, Index, IndexEntry, PutPlan
from cachecard.kvstore.names import os_error
from cachecard.kvstore.objects import StoreObjects
from cachecard.card.shard_write import Payloads
from cachecard.kvstore.prefix import SequenceKeys
from cachecard.manifest import ModelIdentity, ParentRef


def put(objects: StoreObjects, index: Index, kv: CanonicalKV, ids: np.ndarray, keys: SequenceKeys,
        model: ModelIdentity, *, agent: str, codec: str | tuple[str, str],
        chunk_tokens: int = layout.DEFAULT_CHUNK_TOKENS, share: bool = True, payloads: Payloads | None = None) -> str:
    """Store ``kv`` of the whole sequence ``ids`` (checked already) for ``agent``; return the card id. With
    ``share``, the longest cached prefix of the same codecs is reused and a sequence stored already only gains
    the agent's reference. ``payloads`` (encoded chunks, see ``write_card``) speaks in indices of ``ids``."""
    codecs = (codec, codec) if isinstance(codec, str) else (codec[0], codec[1])
    for _attempt in range(8):
        plan = index.plan_put(keys, codecs, agent, share=share, new_id=uuid.uuid4().hex)
        if not plan.existing:
            break
        objects.write_ref(agent, plan.card_id)
        if index.add_ref(agent, plan.card_id):
            return plan.card_id
        objects.delete_ref(agent, plan.card_id)  # the card went away in between: plan again
    else:  # pragma: no cover - needs 8 lost races in a row
        raise StoreError("could not place the card: other processes kept deleting its prefix; try again")
    card_id, parent = plan.card_id, plan.parent
    p = parent.tokens if parent else 0
    shifted = None if payloads is None else (  # the card starts after the reused prefix
        lambda which, layer, start, valid, c: payloads(which, layer, p + start, valid, c))
    try:
        manifest = objects.write_card(
            card_id, CanonicalKV(kv.k[:, :, p:], kv.v[:, :, p:]), ids[p:], model, codec=codec,
            chunk_tokens=chunk_tokens, parent=ParentRef(card_id=parent.card_id, tokens=p) if parent else None,
            payloads=shifted)
        nbytes = objects.card_bytes(card_id)
        objects.write_ref(agent, card_id)
    except BaseException as e:
        abandon(objects, index, plan, agent)
        if isinstance(e, OSError) and not isinstance(e, CacheCardError):
            raise os_error(e, f"cannot write card {card_id}") from e
        raise
    record = CardRecord.of(manifest, nbytes, keys.tail)
    try:
        index.commit([IndexEntry(record, keys.hashes, (agent,))])
    except StoreError as e:  # a shared index that could not be reached: did the commit land?
        try:
            landed = index.record(card_id) is not None
        except StoreError:
            raise StoreError("the card and its reference are stored, but the index could not be reached to "
                             f"commit it ({e}); the next `gc` adopts it once the index is back, and retrying "
                             "the put is safe", card=card_id) from e
        if not landed:
            abandon(objects, index, plan, agent)
            raise
    return card_id


def abandon(objects: StoreObjects, index: Index, plan: PutPlan, agent: str) -> None:
    """Undo a put that failed before its index commit (best effort; gc finishes the job otherwise)."""
    try:
        objects.delete_ref(agent, plan.card_id)
        objects.delete_card(plan.card_id)
    except Exception:  # noqa: BLE001 - the original error matters more; gc collects what is left
        pass
    try:
        index.abandon_put(plan)
    except Exception:  # noqa: BLE001
        pass


__all__ = ["abandon", "put"]
