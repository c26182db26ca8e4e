"""A forward that dies midway, or cannot get room, takes back exactly what it added: no tokens lost, no block
left past an agent's tokens (which a fork would share and both would then write), no needless evictions, and
a runtime batch that works again after the failure."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cachecard import LayerKind, ModelIdentity, Rope  # noqa: E402
from cachecard.errors import PoolBudgetError, PoolError  # noqa: E402
from cachecard.pool import BlockPool, Session  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402

LAYERS, HEADS, DIM, BT = 2, 2, 8, 4
IDENT = ModelIdentity(name="tiny", architecture="llama", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                      layer_kinds=(LayerKind(),) * LAYERS, rope=Rope(theta=10000.0, rotary_dim=DIM),
                      kv_dtype="float32", weights_hash="sha256:" + "ab" * 32, tokenizer_hash="sha256:" + "cd" * 32)
ROW = DIM * 4  # fp32


def pool_of(blocks: int, **kw) -> BlockPool:
    block_bytes = 2 * LAYERS * HEADS * BT * ROW
    return BlockPool(IDENT, budget_bytes=blocks * block_bytes, codec="fp32", block_tokens=BT, backend="numpy", **kw)


def forward(s: Session, q: int, value: int = 7, fail_at_layer: int | None = None):
    """What a runtime does for one forward of ``q`` columns: every layer writes its new rows."""
    f = s.begin_forward(q)
    for layer in range(LAYERS):
        if layer == fail_at_layer:
            raise RuntimeError("the model failed")
        for which in (0, 1):
            rows = np.full((HEADS, len(f.new_b), ROW), value, np.uint8)
            s.pool.arena.write(layer, which, f.slot_blocks, f.slot_offsets, rows)
        s.end_layer()
    return f


def turn(pool: BlockPool, agent: str, tokens: list[int], value: int = 7):
    with Session(pool, [agent]) as s:
        fed = s.feed([tokens])
        return forward(s, fed.input_ids.shape[1], value)


def test_agents_that_fit_together_are_not_evicted_for_a_spare_block():
    pool = pool_of(4)  # two agents of 6 tokens: 2 blocks each, exactly the budget
    for name, first in (("x", 1), ("y", 50)):
        pool.add(name)
        turn(pool, name, list(range(first, first + 6)))
    turn(pool, "x", [9])  # fits in x's own partial block
    assert sorted(pool.resident()) == ["x", "y"] and pool.stats()["evictions"] == 0


def test_an_agent_the_size_of_the_budget_fits_and_a_larger_one_is_refused_before_any_eviction():
    pool = pool_of(4)
    pool.add("other")
    turn(pool, "other", [1, 2, 3])
    pool.add("big")
    with Session(pool, ["big"]) as s:
        with pytest.raises(PoolBudgetError):
            s.feed([list(range(1, 18))])  # 17 tokens: 5 blocks of 4
    assert "other" in pool.resident() and pool.stats()["evictions"] == 0
    assert pool.info("big").pending == 0 and pool.info("big").tokens == 0
    turn(pool, "big", list(range(1, 17)))  # 16 tokens: the whole budget (the other agent makes way)
    assert pool.info("big").tokens == 16 and pool.resident() == ["big"]


def test_a_fork_after_a_failed_forward_never_shares_a_block_either_one_writes():
    pool = pool_of(20)
    pool.add("a")
    turn(pool, "a", list(range(1, 7)))  # 6 tokens: 2 blocks
    with pytest.raises(RuntimeError), Session(pool, ["a"]) as s:
        s.feed([list(range(10, 18))])
        forward(s, 8, fail_at_layer=1)  # 8 more tokens would need 2 more blocks: taken back
    assert pool.info("a").tokens == 6 and pool.info("a").blocks == 2
    pool.fork("a", "b")
    fa = turn(pool, "a", [], value=1)  # the 8 pending tokens, into a's blocks
    fb = turn(pool, "b", [20, 21], value=2)
    assert not set(fa.slot_blocks) & set(fb.slot_blocks)
    assert (pool.arena.read_np(0, 0, fa.slot_blocks, fa.slot_offsets) == 1).all()


def test_a_forward_that_cannot_get_room_loses_no_fed_tokens():
    pool = pool_of(6)
    pool.add("a")
    pool.add("b")
    s1 = Session(pool, ["a"])
    s1.feed([list(range(1, 9))])  # 8 tokens fed, room made for them
    s2 = Session(pool, ["b"])  # another batch, still open, takes the room meanwhile
    s2.feed([list(range(20, 42))])
    forward(s2, 22)
    with pytest.raises(PoolBudgetError):
        forward(s1, 8)
    s1.close()
    s2.close()
    info = pool.info("a")
    assert info.tokens + info.pending == 8 and not pool._agents["a"].busy  # noqa: SLF001
    turn(pool, "a", [])  # and they run once there is room
    assert pool.tokens("a").tolist() == list(range(1, 9))


def test_a_pool_cache_keeping_its_workspace_works_again_after_a_failed_forward():
    pool = BlockPool(IDENT, budget_bytes=1 << 20, codec="fp32", block_tokens=BT)
    pool.add("a")
    cache = PoolCache(pool, ["a"], identity=IDENT, workspace="batch")

    def run(q: int, fail_at_layer: int | None = None, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        outs = []
        for layer in range(LAYERS):
            if layer == fail_at_layer:
                raise RuntimeError("the model failed")
            k = torch.randn(1, HEADS, q, DIM, generator=g)
            outs.append(cache.update(k, k + 1, layer))
        return outs

    cache.feed([list(range(1, 6))])
    run(5)
    cache.feed([[7, 8]])
    with pytest.raises(RuntimeError):
        run(2, fail_at_layer=1, seed=1)
    keys, _ = run(2, seed=2)[0]  # the retry of the same two columns
    assert keys.shape[2] == 7 and pool.info("a").tokens == 7
    cache.close()


def test_forking_an_agent_whose_generated_ids_are_unknown_is_refused():
    pool = pool_of(20)
    pool.add("a")
    with Session(pool, ["a"]) as s:
        s.feed([[1, 2, 3]])
        forward(s, 3)
        forward(s, 1)  # a generated token: its id comes with record()
        with pytest.raises(PoolError, match="record"):
            pool.fork("a", "b")
