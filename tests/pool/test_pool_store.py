"""Eviction to the store and reload: exact bytes, only new tokens written, restarts, and failures that lose
nothing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _tiny import ids, make_pool, run_turns  # noqa: E402
from cachecard import Store  # noqa: E402
from cachecard.errors import IdentityMismatchError, PoolBudgetError, PoolError, StoreFullError  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402

AGENTS = ["a", "b", "c", "d"]
TURNS = [{a: ids(40 + 9 * i, 10 + i) for i, a in enumerate(AGENTS)}] + \
        [{a: ids(9, 20 + 10 * t + i) for i, a in enumerate(AGENTS)} for t in range(2)]


def pool_of(ident, codec, blocks, store=None, **kw):
    pool = make_pool(ident, codec, blocks, store=store, **kw)
    for a in AGENTS:
        pool.add(a)
    return pool


def resident_rows(pool, agent):
    """Every K/V row of a resident agent, (layers, 2, heads, tokens, row_bytes)."""
    a = pool._agents[agent]
    blocks, offsets = pool._slots(a, 0, len(a.ids))
    return np.stack([np.stack([pool.arena.read_np(layer, w, blocks, offsets) for w in (0, 1)])
                     for layer in range(pool.identity.num_layers)])


@pytest.mark.parametrize("codec", ["fp16", "q4"])
def test_evicting_to_the_store_and_reloading_changes_nothing(tiny, tmp_path, codec):
    model, ident = tiny
    ample = run_turns(pool_of(ident, codec, 400), model, AGENTS, TURNS)
    store = Store(tmp_path / "s")
    tight = pool_of(ident, codec, 12, store=store)  # room for two of the four agents
    assert run_turns(tight, model, AGENTS, TURNS) == ample
    s = tight.stats()
    assert s["evictions"] >= 8 and s["reloads"] >= 6 and s["reprefills"] == 0 and s["evict_failures"] == 0
    # each token went to the store once: incremental child cards, no repeated prefix
    tokens = {a: len(tight.tokens(a)) - 1 for a in AGENTS}  # the last generated id is pending, without KV
    assert store.stats()["tokens_stored"] <= sum(tokens.values())
    assert {c.codecs for c in store.cards()} == {(tight.codec.card_preset,) * 2}


@pytest.mark.parametrize("codec", ["q4", "q8_0", "q4_0", "turbo4"])
def test_a_reloaded_agent_holds_the_very_bytes_it_was_evicted_with(tiny, tmp_path, codec):
    model, ident = tiny
    pool = pool_of(ident, codec, 400, store=Store(tmp_path / "s"), share_prefixes=False)
    run_turns(pool, model, ["a"], TURNS[:2])
    before = resident_rows(pool, "a")
    pool.evict("a")
    assert pool.stats()["blocks_used"] == 0 and not pool.info("a").resident
    with PoolCache(pool, ["a"], model) as c:
        c.feed([[]])  # makes it resident (the pending token is the input)
    assert np.array_equal(resident_rows(pool, "a"), before)  # no dequantize/requantize anywhere


def test_without_a_store_evicted_agents_are_recomputed(tiny):
    model, ident = tiny
    ample = run_turns(pool_of(ident, "fp32", 400), model, AGENTS, TURNS)
    tight = pool_of(ident, "fp32", 12)
    assert run_turns(tight, model, AGENTS, TURNS) == ample
    assert tight.stats()["reprefills"] >= 6 and tight.stats()["reloads"] == 0


def test_an_agent_survives_a_restart_through_the_store(tiny, tmp_path):
    model, ident = tiny
    ref = pool_of(ident, "q4", 400)
    want = run_turns(ref, model, ["a"], TURNS)
    first = pool_of(ident, "q4", 400, store=Store(tmp_path / "s"))
    got = run_turns(first, model, ["a"], TURNS[:2])
    card = first.persist("a")
    pending = first.tokens("a")[-1:]
    first.store.close()
    del first  # "the process ends"
    again = make_pool(ident, "q4", 400, store=Store(tmp_path / "s"))
    info = again.attach("a")
    assert info.card_id == card and not info.resident and info.tokens == len(again.tokens("a"))
    with PoolCache(again, ["a"], model) as c:  # the generated id that had no KV yet comes first
        got.append(c.generate(model, [list(pending) + TURNS[2]["a"]], max_new_tokens=6))
    assert got == want
    assert again.stats()["reloads"] == 1


def test_attaching_cards_of_another_model_or_codec_is_refused(tiny, tmp_path):
    model, ident = tiny
    pool = pool_of(ident, "q4", 400, store=Store(tmp_path / "s"))
    run_turns(pool, model, ["a"], TURNS[:1])
    pool.persist("a")
    with pytest.raises(PoolError, match="no tokens with KV yet"):
        pool.persist("b")
    other = make_pool(ident, "q8_0", 400, store=pool.store)
    with pytest.raises(IdentityMismatchError, match="none made by this pool's model and resident codec"):
        other.attach("a")
    with pytest.raises(PoolError, match="no cards for agent 'zed'"):
        other.attach("zed")


def test_a_budget_smaller_than_one_agent_is_refused_before_anything_is_evicted(tiny, tmp_path):
    model, ident = tiny
    pool = pool_of(ident, "q4", 8, store=Store(tmp_path / "s"))
    run_turns(pool, model, ["a", "b"], [{"a": ids(40, 1), "b": ids(40, 2)}], max_new_tokens=2)
    resident = pool.resident()
    with PoolCache(pool, ["c"], model) as c, pytest.raises(PoolBudgetError, match="agent 'c' needs 300 tokens"):
        c.feed([ids(300, 3)])
    assert pool.resident() == resident and pool.stats()["evictions"] == 0
    with PoolCache(pool, ["c", "d"], model) as c, pytest.raises(PoolBudgetError, match="Run fewer agents at once"):
        c.feed([ids(100, i) for i in range(2)])
    assert pool.resident() == resident
    with pytest.raises(PoolBudgetError, match="holds no block"):
        make_pool(ident, "q4", 0)


def test_an_eviction_that_cannot_be_written_keeps_the_agent_and_says_so(tiny, tmp_path, monkeypatch):
    model, ident = tiny
    store = Store(tmp_path / "s")
    pool = pool_of(ident, "q8_0", 6, store=store)  # "a" and "b" cannot both be resident
    want = run_turns(pool_of(ident, "q8_0", 400), model, ["a", "b"], TURNS[:2])
    got = run_turns(pool, model, ["a"], TURNS[:1])
    before = resident_rows(pool, "a")

    def full(*args, **kwargs):
        raise StoreFullError("no space left on device (test)")

    monkeypatch.setattr(store, "put", full)
    with PoolCache(pool, ["b"], model) as c, pytest.raises(PoolBudgetError) as err:
        c.generate(model, [TURNS[0]["b"]], max_new_tokens=6)
    assert "a: StoreFullError: no space left on device" in str(err.value)
    assert pool.info("a").resident and np.array_equal(resident_rows(pool, "a"), before)  # nothing lost
    assert [e.kind for e in pool.events][-1] == "evict_failed" and pool.stats()["evict_failures"] == 1
    with pytest.raises(PoolError, match="stays resident"):
        pool.evict("a")
    monkeypatch.undo()  # the disk has room again: the same work now succeeds
    got[0] += run_turns(pool, model, ["b"], TURNS[:1])[0]
    got += run_turns(pool, model, ["a", "b"], TURNS[1:2])
    assert got == want
