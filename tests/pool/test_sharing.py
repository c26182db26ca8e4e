"""Shared prefixes held once, copy on write, and eviction that leaves blocks others still use."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _tiny import ids, make_pool  # noqa: E402
from cachecard import Store  # noqa: E402
from cachecard.errors import PoolBudgetError  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402

CONTEXT = ids(100, 1)  # 6 full blocks of 16, and 4 tokens
SUFFIX = {f"s{i}": ids(8, 100 + i) for i in range(15)}


def generate(pool, model, agent, tokens, n=4):
    with PoolCache(pool, [agent], model) as c:
        return c.generate(model, [tokens], max_new_tokens=n)[0]


def fifteen(pool, model):
    pool.add("base")
    generate(pool, model, "base", CONTEXT, n=1)
    outs = {}
    for a, suffix in SUFFIX.items():
        pool.add(a)
        outs[a] = generate(pool, model, a, CONTEXT + suffix)
    return outs


def test_fifteen_agents_hold_a_shared_context_once(tiny):
    model, ident = tiny
    shared = make_pool(ident, "fp32")
    outs = fifteen(shared, model)
    s = shared.stats()
    # base: 6 full context blocks + 1; each agent: the 6 shared, plus one own block (context tail + suffix)
    assert s["blocks_used"] == 7 + 15 and s["blocks_shared"] == 6 and s["tokens_shared"] == 15 * 96
    assert shared.info("s3").blocks == 7 and shared.info("s3").bytes < 2 * shared.block_bytes  # 6/16 + 1 block
    alone = make_pool(ident, "fp32", share_prefixes=False)
    assert fifteen(alone, model) == outs  # sharing changes what is held, not what is computed
    assert alone.stats()["blocks_used"] == 16 * 7


def test_copy_on_write_at_the_first_diverging_token(tiny):
    model, ident = tiny
    pool = make_pool(ident, "fp32")
    pool.add("x")
    generate(pool, model, "x", CONTEXT[:40], n=1)  # 2 full blocks and a partial one
    pool.fork("x", "y")
    assert pool.stats()["blocks_used"] == 3 and pool.info("y").tokens == pool.info("x").tokens
    out_y = generate(pool, model, "y", ids(3, 7))
    out_x = generate(pool, model, "x", ids(3, 8))
    assert pool.stats()["blocks_used"] == 4 and pool.stats()["blocks_shared"] == 2  # y copied the partial block
    ref = make_pool(ident, "fp32", share_prefixes=False)
    for name, tail, out in (("x", ids(3, 8), out_x), ("y", ids(3, 7), out_y)):
        ref.add(name)
        generate(ref, model, name, CONTEXT[:40], n=1)
        assert generate(ref, model, name, tail) == out


def test_evicting_sharers_keeps_the_shared_blocks_and_reloads_only_their_own(tiny, tmp_path):
    model, ident = tiny
    pool = make_pool(ident, "q4", store=Store(tmp_path / "s"))
    fifteen(pool, model)
    before = pool.stats()["blocks_used"]
    for a in ("s0", "s1", "s2"):
        pool.evict(a)
    assert pool.stats()["blocks_used"] == before - 3  # only their own blocks went
    generate(pool, model, "s1", ids(3, 50))
    s = pool.stats()
    # the 96 shared tokens were found in the pool; only its 12 own tokens (4 + 8) came from the store
    assert s["reloads"] == 1 and s["tokens_reloaded"] == 4 + 8 + 3
    # every agent gone: registered blocks stay findable until their memory is needed
    for a in pool.agents():
        pool.evict(a)
    # (the 6 context blocks, and s1's second block, full since its reload and turn)
    assert pool.stats()["blocks_used"] == 0 and pool.stats()["blocks_cached"] == 7
    pool.add("late")
    generate(pool, model, "late", CONTEXT + ids(8, 200))
    assert pool.stats()["tokens_shared"] == 15 * 96 + 96 + 96


def test_a_batch_of_sharers_is_budgeted_with_its_shared_blocks_counted_once(tiny):
    model, ident = tiny
    for share in (True, False):
        pool = make_pool(ident, "q4", 40, share_prefixes=share)  # 15 sharers fit only if the context is held once
        pool.add("base")
        generate(pool, model, "base", CONTEXT, n=1)
        for a in SUFFIX:
            pool.add(a)
        with PoolCache(pool, list(SUFFIX), model) as c:
            if share:
                out = c.generate(model, [CONTEXT + s for s in SUFFIX.values()], max_new_tokens=4)
            else:
                with pytest.raises(PoolBudgetError, match="Run fewer agents at once"):
                    c.feed([CONTEXT + s for s in SUFFIX.values()], reserve=4)
    single = make_pool(ident, "q4")
    fifteen(single, model)
    assert out == [single.tokens(a).tolist()[-4:] for a in SUFFIX]  # batched sharers == one at a time
