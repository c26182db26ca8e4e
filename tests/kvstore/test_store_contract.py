"""Store contract, part 1 (runs on every index backend): put / match / load / share / handoff / delete / evict /
stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cachecard
from cachecard import CanonicalKV, CardNotFoundError
from store_helpers import IDENT, card_bytes, extend, seq_kv, tokens
from cachecard.testing import make_identity

def test_put_match_load_roundtrip(store):
    kv = seq_kv(50)
    cid = store.put(kv, tokens(50), IDENT, agent="alice", codec="lossless")
    assert store.load(cid).equal(kv)
    m = store.match(np.concatenate([tokens(50), [7, 8]]), IDENT)
    assert m == cachecard.Match(cid, 50)  # ends exactly where the card ends, not on a block boundary
    assert store.match(tokens(40), IDENT) == cachecard.Match(cid, 32)  # two 16-token blocks
    assert store.match(tokens(10), IDENT) is None
    assert store.match(tokens(50, start=5), IDENT) is None
    part = store.load(m, tokens=range(10, 30), layers=1)
    assert np.array_equal(part.k, kv.k[1:2, :, 10:30]) and np.array_equal(part.v, kv.v[1:2, :, 10:30])
    assert store.match(tokens(50), make_identity(weights_hash="sha256:" + "ee" * 32)) is None  # another model


def test_extending_a_sequence_writes_only_new_tokens(store):
    kv = seq_kv(100)
    a = store.put(kv, tokens(100), IDENT, agent="alice")
    size_a = card_bytes(store)
    kv2 = extend(kv, 20)
    b = store.put(kv2, tokens(120), IDENT, agent="alice")
    info = {c.card_id: c for c in store.cards()}
    assert info[b].parent == a and info[b].parent_tokens == 100 and info[b].tokens == 20
    assert card_bytes(store) - size_a < size_a / 2  # 20 new tokens (+ ~5 KB of card metadata), not 120
    assert store.load(b).equal(kv2)
    assert np.array_equal(store.tokens_of(b), tokens(120))
    m = store.match(tokens(130), IDENT, agent="alice")
    assert m == cachecard.Match(b, 120)
    # a third turn continues the second: a chain of three cards
    kv3 = extend(kv2, 40, seed=2)
    c = store.put(kv3, tokens(160), IDENT, agent="alice")
    assert store.load(c).equal(kv3)
    got = store.load(c, tokens=range(90, 130))
    assert np.array_equal(got.k, kv3.k[:, :, 90:130])


def test_agents_sharing_a_prefix_store_it_once(store):
    kv = seq_kv(200)
    first = store.put(kv, tokens(200), IDENT, agent="agent0")
    one = card_bytes(store)
    for i in range(1, 15):
        assert store.put(kv, tokens(200), IDENT, agent=f"agent{i}") == first
    assert card_bytes(store) == one
    assert store.cards()[0].agents == tuple(sorted(f"agent{i}" for i in range(15)))
    # each agent then adds its own turn: only the turns are new
    for i in range(15):
        store.put(extend(kv, 5, seed=10 + i), np.concatenate([tokens(200), [i] * 5]), IDENT, agent=f"agent{i}")
    kids = [c for c in store.cards() if c.card_id != first]
    assert len(kids) == 15 and all(c.parent == first and c.tokens == 5 for c in kids)  # only the turns are new
    for i in range(15):
        m = store.match(np.concatenate([tokens(200), [i] * 5, [99]]), IDENT, agent=f"agent{i}")
        assert m.tokens == 205
        assert store.load(m).equal(extend(kv, 5, seed=10 + i))


def test_prefix_of_a_card_is_an_empty_child(store):
    kv = seq_kv(60)
    a = store.put(kv, tokens(60), IDENT, agent="alice")
    sub = CanonicalKV(kv.k[:, :, :48], kv.v[:, :, :48])  # three whole blocks of 16
    b = store.put(sub, tokens(48), IDENT, agent="bob")
    assert b != a
    info = {c.card_id: c for c in store.cards()}
    assert info[b].tokens == 0 and info[b].parent == a
    assert store.load(b).equal(sub)


def test_codec_presets_are_not_mixed(store):
    kv = seq_kv(40)
    store.put(kv, tokens(40), IDENT, agent="a", codec="lossless")
    info = store.cards()[0]
    assert info.codecs == ("lossless", "lossless")


def test_handoff_shares_without_copying_and_moves(store):
    kv = seq_kv(30)
    a = store.put(kv, tokens(30), IDENT, agent="alice")
    before = card_bytes(store)
    store.handoff(a, "bob")
    assert card_bytes(store) == before and store.cards()[0].agents == ("alice", "bob")
    assert store.match(tokens(30), IDENT, agent="bob") == cachecard.Match(a, 30)
    store.handoff(a, "carol", from_agent="alice")
    assert store.cards()[0].agents == ("bob", "carol")
    assert store.match(tokens(30), IDENT, agent="alice") is None
    with pytest.raises(CardNotFoundError, match="holds no reference"):
        store.handoff(a, "dave", from_agent="alice")
    assert store.agents() == {"bob": 1, "carol": 1}


def test_delete_keeps_data_other_agents_or_children_use(store):
    kv = seq_kv(64)
    a = store.put(kv, tokens(64), IDENT, agent="alice")
    b = store.put(extend(kv, 16), tokens(80), IDENT, agent="bob")
    assert store.delete(a, agent="alice") == []  # bob's card continues it: data stays, without agents
    info = {c.card_id: c for c in store.cards()}
    assert info[a].agents == () and info[a].children == 1
    assert store.load(b).equal(extend(kv, 16))
    assert store.match(tokens(64), IDENT, agent="alice") is None
    assert store.drop_agent("bob") == [b, a]  # the child, then the parent nobody needs any more
    assert store.cards() == [] and not any((Path(store.objects.base) / "cards").rglob("zarr.json"))
    with pytest.raises(CardNotFoundError):
        store.load(a)


def test_evict_lru_store_wide_and_per_agent(store):
    ids = []
    for i in range(4):
        ids.append(store.put(seq_kv(40, seed=i), tokens(40, start=100 * i), IDENT, agent="alice"))
    store.handoff(ids[0], "bob")
    store.load(ids[0])  # most recently used now
    size = store.cards()[0].bytes
    # per agent: alice's footprint to two cards; bob keeps his reference to ids[0]
    freed = store.evict(2 * size, agent="alice")
    assert freed == [ids[1], ids[2]]
    assert {c.card_id for c in store.cards(agent="alice")} == {ids[0], ids[3]}
    # store-wide: whole cards, LRU first, never a parent before its children
    child = store.put(extend(seq_kv(40, seed=3), 8), np.concatenate([tokens(40, start=300), [1] * 8]), IDENT,
                      agent="carol")
    store.load(ids[0])
    freed = store.evict(size)
    assert freed[:1] == [child] and ids[3] in freed
    assert [c.card_id for c in store.cards()] == [ids[0]]
    assert store.evict(0) == [ids[0]] and store.cards() == []


def test_stats_and_listing(store):
    kv = seq_kv(64)
    store.put(kv, tokens(64), IDENT, agent="a")
    store.put(extend(kv, 16), tokens(80), IDENT, agent="b")
    st = store.stats()
    assert st["cards"] == 2 and st["agents"] == 2 and st["references"] == 2
    assert st["blocks"] == 4 + 5 and st["tokens_stored"] == 80 and st["tokens_represented"] == 144
    assert [c.total for c in store.cards(agent="b")] == [80]


def test_counts_return_to_zero_when_everything_is_deleted(store):
    """Empty child cards, cards shorter than a block and shared blocks all come and go without leaving a count
    (or an entry) behind."""
    kv = seq_kv(60)
    a = store.put(kv, tokens(60), IDENT, agent="alice")
    store.put(CanonicalKV(kv.k[:, :, :48], kv.v[:, :, :48]), tokens(48), IDENT, agent="bob")  # empty child
    store.put(seq_kv(5, seed=7), tokens(5, start=77), IDENT, agent="bob")  # no full block
    store.handoff(a, "cy")
    st = store.stats()
    assert (st["cards"], st["references"], st["blocks"], st["tails"]) == (3, 4, 3 + 3, 2)
    assert st["tokens_stored"] == 65 and st["tokens_represented"] == 60 + 48 + 5
    for agent in ("alice", "bob", "cy"):
        store.drop_agent(agent)
    st = store.stats()
    assert [st[k] for k in ("cards", "references", "blocks", "tails", "bytes", "tokens_stored",
                            "tokens_represented", "puts_in_progress", "agents")] == [0] * 9
    assert store.cards() == [] and store.agents() == {}
