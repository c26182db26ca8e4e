"""Store contract, part 2 (runs on every index backend): reindex, gc, verify, and hostile input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

import cachecard
from cachecard import CorruptCardError, StoreFullError
from cachecard.kvstore.objects import StoreObjects
from store_helpers import IDENT, extend, seq_kv, tokens

def test_reindex_rebuilds_the_same_index(store):
    kv = seq_kv(70)
    a = store.put(kv, tokens(70), IDENT, agent="a")
    b = store.put(extend(kv, 30), tokens(100), IDENT, agent="b")
    store.handoff(a, "c")
    before = [(c.card_id, c.agents, c.tokens, c.total, c.parent, c.bytes) for c in store.cards()]
    st = store.stats()
    rep = store.reindex()
    assert rep.cards == 2 and rep.refs == 3 and not rep.skipped
    assert [(c.card_id, c.agents, c.tokens, c.total, c.parent, c.bytes) for c in store.cards()] == before
    assert store.stats()["blocks"] == st["blocks"] and store.match(tokens(100), IDENT) == cachecard.Match(b, 100)


def test_reindex_into_an_empty_index(make_store, tmp_path):
    root = tmp_path / "s"
    with make_store(root) as s:
        cid = s.put(seq_kv(20), tokens(20), IDENT, agent="a")
    with make_store(root, tag="fresh") as s:
        assert s.cards() == []
        s.reindex()
        assert s.match(tokens(20), IDENT, agent="a") == cachecard.Match(cid, 20)


def test_gc_collects_orphans_and_partial_writes_and_adopts(store, tmp_path):
    root = Path(store.objects.base)
    kv = seq_kv(20)
    keep = store.put(kv, tokens(20), IDENT, agent="a")
    # an orphan: a committed card that no agent references and the index lacks (a crash before its ref)
    orphan = "ab" * 16
    cachecard.write_card(root / "cards" / orphan[:2] / orphan, kv, tokens(20), IDENT, card_id=orphan)
    # a put that crashed after its ref object: gc adopts it
    adopt = "cd" * 16
    cachecard.write_card(root / "cards" / adopt[:2] / adopt, seq_kv(5), tokens(5, start=9), IDENT, card_id=adopt)
    store.objects.write_ref("z", adopt)
    # partial writes: a staging directory and an incomplete card
    (root / "cards" / "ef" / f".{'ef' * 16}.partial-{'0' * 32}").mkdir(parents=True)
    incomplete = root / "cards" / "12" / ("12" * 16) / "k"
    incomplete.mkdir(parents=True)
    (incomplete / "zarr.json").write_text("{}")
    rep = store.gc()  # younger than the grace period: a put may still be writing them, except the adopted one
    assert rep.orphans_deleted == [] and rep.partial_deleted == [] and rep.adopted == [adopt]
    rep = store.gc(grace_s=0)
    assert rep.orphans_deleted == [orphan] and len(rep.partial_deleted) == 2
    assert {c.card_id for c in store.cards()} == {keep, adopt}
    assert store.match(tokens(5, start=9), IDENT, agent="z") == cachecard.Match(adopt, 5)
    assert sorted(p.name for p in (root / "cards").glob("*/*")) == sorted([keep, adopt])


def test_verify_finds_a_corrupt_card_and_a_swapped_card(store):
    a = store.put(seq_kv(20), tokens(20), IDENT, agent="a")
    b = store.put(seq_kv(30, seed=3), tokens(30, start=5000), IDENT, agent="a")
    assert store.verify().ok == 2
    shard = Path(store.card_location(a)) / "k" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    rep = store.verify()
    assert rep.ok == 1 and "crc32c" in rep.failures[a]
    with pytest.raises(CorruptCardError, match="layer 0"):
        store.load(a)
    # a card copied in under another card's name is refused, not served as the other one's KV
    store._cards.clear()
    shutil.rmtree(store.card_location(a))
    shutil.copytree(store.card_location(b), store.card_location(a))
    with pytest.raises(CorruptCardError, match="does not match the index"):
        store.load(a)


def test_full_disk_is_a_clear_error_and_loses_nothing(store, monkeypatch):
    from zarr.storage import LocalStore

    kv = seq_kv(40)
    keep = store.put(kv, tokens(40), IDENT, agent="a")
    real_set = LocalStore.set
    calls = {"n": 0}

    async def full(self, key, value):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(StoreFullError, match="disk is full") as e:
        store.put(seq_kv(50, seed=5), tokens(50, start=7000), IDENT, agent="a")
    assert isinstance(e.value, OSError)
    monkeypatch.setattr(LocalStore, "set", real_set)
    assert [c.card_id for c in store.cards()] == [keep] and store.stats()["puts_in_progress"] == 0
    assert store.load(keep).equal(kv)
    assert sorted(p.name for p in Path(store.objects.base, "cards").glob("*/*")) == [keep]  # no partial write left
    # and the ref object write failing (disk full after the card) also loses nothing
    monkeypatch.setattr(StoreObjects, "write_small", lambda self, p, d, **kw: (_ for _ in ()).throw(
        StoreFullError("disk is full")))
    with pytest.raises(StoreFullError):
        store.put(extend(kv, 10), tokens(50), IDENT, agent="a")
    monkeypatch.undo()
    assert [c.card_id for c in store.cards()] == [keep] and store.stats()["puts_in_progress"] == 0
    assert store.gc(grace_s=0).orphans_deleted == []


def test_manifest_that_does_not_match_its_arrays_is_refused(store):
    a = store.put(seq_kv(10), tokens(10), IDENT, agent="a")
    meta = Path(store.card_location(a)) / "k" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"][2] = 1 << 30  # a huge declared shape
    doc["codecs"][0]["configuration"]["chunk_shape"][2] = 1 << 30
    doc["chunk_grid"]["configuration"]["chunk_shape"][2] = 1 << 30
    meta.write_text(json.dumps(doc))
    store._cards.clear()
    with pytest.raises(cachecard.CacheCardError):
        store.load(a)
    rep = store.reindex()
    assert a in rep.skipped and rep.cards == 0
