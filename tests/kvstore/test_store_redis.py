"""The Redis index beyond the contract: a flushed or restarted server loses nothing, an index of another store
is refused, an unreachable server is a clear StoreError with nothing half committed, reindex swaps
generations while other nodes keep serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cachecard import Match, Store, StoreError
from cachecard.kvstore.redis_index import RedisIndex
from cachecard.testing.services import RedisServer, free_port, redis_missing
from store_helpers import IDENT, extend, seq_kv, tokens

pytestmark = pytest.mark.skipif(bool(redis_missing()), reason=redis_missing() or "")


@pytest.fixture
def redis(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


def snapshot(store: Store) -> list[tuple]:
    return [(c.card_id, c.agents, c.tokens, c.total, c.parent, c.bytes) for c in store.cards()]


def fill(store: Store) -> dict[str, np.ndarray]:
    kv = seq_kv(70)
    a = store.put(kv, tokens(70), IDENT, agent="ann")
    b = store.put(extend(kv, 30), tokens(100), IDENT, agent="bob")
    store.handoff(a, "cy")
    return {a: tokens(70), b: tokens(100)}


def test_flushall_loses_nothing_reindex_rebuilds_from_the_store(redis, tmp_path):
    with Store(tmp_path / "s", index=redis.url, block_tokens=16) as st:
        cards = fill(st)
        before = snapshot(st)
        __import__("redis").Redis.from_url(redis.url).flushall()
        with pytest.raises(StoreError, match="holds no index of this store.*reindex"):
            st.match(tokens(100), IDENT)
        with pytest.raises(StoreError, match="reindex"):
            st.put(seq_kv(5), tokens(5, start=9), IDENT, agent="dan")
        assert [p.name for p in (tmp_path / "s" / "cards").glob("*/*")] != []  # the objects are intact
        rep = st.reindex()
        assert rep.cards == 2 and rep.refs == 3 and not rep.skipped
        assert snapshot(st) == before
        for cid, toks in cards.items():
            assert st.match(np.concatenate([toks, [5]]), IDENT) == Match(cid, len(toks))
        assert st.verify().ok == 2 and not st.gc(grace_s=0).orphans_deleted


def test_restart_keeps_the_index(redis, tmp_path):
    with Store(tmp_path / "s", index=redis.url, block_tokens=16) as st:
        fill(st)
        before = snapshot(st)
        redis.restart()  # SIGTERM: the AOF is written; the client reconnects by itself
        assert snapshot(st) == before
        assert st.put(seq_kv(5), tokens(5, start=9), IDENT, agent="dan")


def test_an_index_of_another_store_is_refused(redis, tmp_path):
    Store(tmp_path / "one", index=redis.url).close()
    with pytest.raises(StoreError, match="belongs to another store"):
        Store(tmp_path / "two", index=redis.url)
    Store(tmp_path / "two", index=redis.url + "?namespace=two").close()  # its own namespace is fine
    with pytest.raises(StoreError, match="namespace"):
        Store(tmp_path / "two", index=redis.url + "?namespace=a b")


def test_a_store_made_before_store_ids_gets_one(redis, tmp_path):
    with Store(tmp_path / "old") as st:  # LMDB, then drop the id the way an older cachecard wrote the marker
        cid = st.put(seq_kv(20), tokens(20), IDENT, agent="a")
    marker = tmp_path / "old" / "cachecard-store.json"
    doc = json.loads(marker.read_text())
    del doc["store_id"]
    marker.write_text(json.dumps(doc))
    with Store(tmp_path / "old", index=redis.url) as st:
        assert st.store_id and json.loads(marker.read_text())["store_id"] == st.store_id
        st.reindex()
        assert st.match(tokens(20), IDENT, agent="a") == Match(cid, 20)
    with Store(tmp_path / "old", index=redis.url) as st:  # bound to that id from now on
        assert st.match(tokens(20), IDENT) == Match(cid, 20)


def test_unreachable_redis_is_a_clear_error(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match=r"Redis index at redis://127\.0\.0\.1:\d+/0.* unreachable.*retry"):
        Store(tmp_path / "s", index=url)


def test_redis_down_mid_run_commits_nothing_half(redis, tmp_path):
    with Store(tmp_path / "s", index=redis.url, block_tokens=16) as st:
        keep = st.put(seq_kv(20), tokens(20), IDENT, agent="a")
        redis.stop()
        with pytest.raises(StoreError, match="unreachable"):
            st.put(seq_kv(30, seed=2), tokens(30, start=500), IDENT, agent="a")
        with pytest.raises(StoreError, match="unreachable"):
            st.match(tokens(20), IDENT)
        assert sorted(p.name for p in (tmp_path / "s" / "cards").glob("*/*")) == [keep]  # nothing was written
        redis.start()
        assert [c.card_id for c in st.cards()] == [keep] and st.stats()["puts_in_progress"] == 0
        # the server dies between the card's write and its index commit: the card and its reference stay,
        # the put says so, and gc adopts the card once the server is back
        real = RedisIndex.commit

        def die_first(self, *args, **kwargs):
            redis.stop()
            return real(self, *args, **kwargs)

        RedisIndex.commit = die_first
        try:
            with pytest.raises(StoreError, match="stored, but the index could not be reached.*gc"):
                st.put(seq_kv(9, seed=3), tokens(9, start=900), IDENT, agent="b")
        finally:
            RedisIndex.commit = real
        redis.start()
        rep = st.gc(grace_s=0)
        assert len(rep.adopted) == 1 and st.match(tokens(9, start=900), IDENT, agent="b").tokens == 9
        assert st.verify().ok == 2


def test_reindex_switches_generations_under_other_nodes(redis, tmp_path):
    root = tmp_path / "s"
    with Store(root, index=redis.url, block_tokens=16) as one, Store(root, index=redis.url) as two:
        cards = fill(one)
        before = snapshot(two)
        r = __import__("redis").Redis.from_url(redis.url)
        keys_before = r.dbsize()
        one.reindex()
        assert snapshot(two) == before  # the other node sees the new generation at once
        assert r.dbsize() == keys_before  # and the old generation is gone
        assert all(k.split(b":")[2] in (b"meta", b"1") for k in r.scan_iter())
        for cid, toks in cards.items():
            assert two.load(cid).equal(seq_kv(70) if len(toks) == 70 else extend(seq_kv(70), 30))


def test_an_evicting_server_is_refused(redis, tmp_path):
    r = __import__("redis").Redis.from_url(redis.url)
    r.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(StoreError, match="maxmemory-policy"):
        Store(tmp_path / "s", index=redis.url)
    r.config_set("maxmemory-policy", "volatile-lru")  # only keys with a TTL: the index sets none
    Store(tmp_path / "s", index=redis.url).close()


def test_cli_takes_a_redis_index(redis, tmp_path):
    from typer.testing import CliRunner

    from cachecard.cli import app

    root = tmp_path / "s"
    with Store(root, index=redis.url) as st:
        a = st.put(seq_kv(20), tokens(20), IDENT, agent="alice")
    r = CliRunner().invoke(app, ["ls", str(root), "--index", redis.url, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["card_id"] == a
    __import__("redis").Redis.from_url(redis.url).flushall()
    r = CliRunner().invoke(app, ["reindex", str(root), "--index", redis.url])
    assert r.exit_code == 0 and "indexed 1 cards, 1 references" in r.output
    assert Path(root, "index").exists() is False  # no LMDB index was made beside the store


def test_eviction_and_handoff_span_nodes(redis, tmp_path):
    """Two nodes on one store: an access on one node counts for LRU eviction run on the other, and a handoff
    on one node is matchable on the other at once."""
    root = tmp_path / "s"
    with Store(root, index=redis.url, block_tokens=16) as a, Store(root, index=redis.url) as b:
        b.atime_resolution_s = 0.0
        ids = [a.put(seq_kv(40, seed=i), tokens(40, start=100 * i), IDENT, agent="ann") for i in range(3)]
        b.load(ids[0])  # node b reads the oldest card: it is now the most recently used, store-wide
        b.handoff(ids[2], "bob")
        assert a.match(tokens(40, start=200), IDENT, agent="bob") == Match(ids[2], 40)
        size = a.cards()[0].bytes
        assert a.evict(2 * size) == [ids[1]]
        assert sorted(c.card_id for c in b.cards()) == sorted([ids[0], ids[2]])
