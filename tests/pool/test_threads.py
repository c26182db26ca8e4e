"""One pool used from several threads at once: each thread's agents get exactly what they get alone."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from _tiny import ids, make_pool, run_turns  # noqa: E402
from cachecard import Store  # noqa: E402
from cachecard.errors import PoolError  # noqa: E402

WORKERS = ["w0", "w1", "w2", "w3"]
IDLE = ["i0", "i1", "i2", "i3"]
TURNS = [{a: ids(30 + 5 * i, 300 + i) for i, a in enumerate(WORKERS + IDLE)}] + \
        [{a: ids(6, 400 + 10 * t + i) for i, a in enumerate(WORKERS)} for t in range(2)]


def test_threads_share_one_pool_safely(tiny, tmp_path):
    model, ident = tiny
    want = {}
    for a in WORKERS:
        ref = make_pool(ident, "q4")
        ref.add(a)
        want[a] = run_turns(ref, model, [a], TURNS)
    pool = make_pool(ident, "q4", 26, store=Store(tmp_path / "s"))  # the workers at their largest, not the idle too
    for a in WORKERS + IDLE:
        pool.add(a)
    run_turns(pool, model, IDLE, TURNS[:1])
    got, errors = {}, []

    def work(agent: str) -> None:
        try:
            got[agent] = run_turns(pool, model, [agent], TURNS)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a,)) for a in WORKERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want
    assert pool.stats()["evictions"] >= 2 and pool.stats()["evict_failures"] == 0  # idle agents made room
    assert all(not pool.info(a).pinned for a in WORKERS)


def test_an_agent_in_use_cannot_join_another_batch_or_be_evicted_or_dropped(tiny):
    model, ident = tiny
    pool = make_pool(ident, "q4")
    pool.add("a")
    from cachecard.pool.hf import PoolCache

    with PoolCache(pool, ["a"], model):
        with pytest.raises(PoolError, match="in use by another batch"):
            PoolCache(pool, ["a"], model)
        with pytest.raises(PoolError, match="in use by a batch"):
            pool.evict("a")
        with pytest.raises(PoolError, match="in use by a batch"):
            pool.drop("a")
    pool.drop("a")
    assert pool.agents() == []


def test_an_agent_mid_forward_is_not_persisted_or_forked(tiny, tmp_path):
    """What another thread would see while a batch writes the agent's KV layer by layer."""
    model, ident = tiny
    pool = make_pool(ident, "q4", store=Store(tmp_path / "s"))
    pool.add("w0")
    seen = []

    def meddle(*_):
        for call in (lambda: pool.persist("w0"), lambda: pool.fork("w0", "b")):
            try:
                call()
            except PoolError as e:
                seen.append(str(e))

    handle = model.model.layers[1].register_forward_pre_hook(meddle)
    try:
        run_turns(pool, model, ["w0"], TURNS[:1], max_new_tokens=2)
    finally:
        handle.remove()
    assert seen and all("in the middle of a forward" in m for m in seen)
    pool.persist("w0")  # between forwards: fine
    pool.fork("w0", "b")
