"""A store on a real S3-compatible server (moto in server mode on loopback) through s3fs: the index local or
on Redis, create-only writes, an unreachable service, and a node's read-through cache of cards."""

from __future__ import annotations

import numpy as np
import pytest

from cachecard import CardExistsError, Match, Store, StoreError
from cachecard.testing import make_identity, make_kv
from cachecard.testing.services import MotoS3, RedisServer, free_port, redis_missing

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
IDENT = make_identity()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port with bucket ``cards``; stopped after the module."""
    with MotoS3("cards") as server:
        yield server


def test_remote_store_put_match_load_share_delete_and_reindex(s3, tmp_path):
    url = "s3://cards/memory"
    kv = make_kv(tokens=120)
    ids = np.arange(2000, 2120)
    with Store(url, index=tmp_path / "index", storage_options=s3.options, block_tokens=32) as st:
        a = st.put(kv, ids, IDENT, agent="alice")
        more = make_kv(tokens=30, seed=3)
        kv2 = type(kv)(np.concatenate([kv.k, more.k], axis=2), np.concatenate([kv.v, more.v], axis=2))
        b = st.put(kv2, np.arange(2000, 2150), IDENT, agent="bob")
        assert st.load(b).equal(kv2)  # two cards, read in parallel over S3
        assert st.match(np.arange(2000, 2200), IDENT) == Match(b, 150)
        part = st.load(st.match(np.arange(2000, 2100), IDENT), layers=0)
        assert np.array_equal(part.k, kv.k[:1, :, :96])
        st.handoff(a, "carol")
        assert st.verify().ok == 2
        before = [(c.card_id, c.agents, c.total) for c in st.cards()]
    fs = __import__("s3fs").S3FileSystem(**s3.options)
    assert fs.exists(f"cards/memory/cards/{a[:2]}/{a}/zarr.json")
    assert fs.exists(f"cards/memory/refs/carol/{a}")
    # another machine: an empty index, rebuilt from the remote manifests and refs
    with Store(url, index=tmp_path / "other-index", storage_options=s3.options) as st:
        assert st.cards() == []
        rep = st.reindex()
        assert rep.cards == 2 and not rep.skipped
        assert [(c.card_id, c.agents, c.total) for c in st.cards()] == before
        assert st.load(st.match(np.arange(2000, 2150), IDENT, agent="bob")).equal(kv2)
        assert st.drop_agent("bob") == [b]
        assert st.drop_agent("alice") == [] and st.drop_agent("carol") == [a]
        assert st.cards() == [] and not fs.find("cards/memory/cards")
        assert st.gc(grace_s=0).orphans_deleted == []


def test_writes_to_the_bucket_are_create_only(s3, tmp_path):
    """A card's objects, references and the store marker never replace an object (If-None-Match: *)."""
    from cachecard.kvstore.objects import StoreObjects

    url = "s3://cards/create-only"
    with Store(url, index=tmp_path / "index", storage_options=s3.options) as st:
        cid = st.put(make_kv(tokens=20), np.arange(20), IDENT, agent="a")
        objects: StoreObjects = st.objects
        store_id = st.store_id
        fs, card = objects.fs, objects.card_path(cid)
        saved = {p: fs.cat_file(p) for p in (f"{card}/zarr.json", f"{card}/k/zarr.json")}
        shard = fs.cat_file(f"{card}/k/c/0/0/0/0")
        fs.rm(list(saved))  # as if the card were half written: a shard is there, its metadata is not
        with pytest.raises(CardExistsError, match="written once") as e:  # the conditional PUT of the shard: 412
            objects.write_card(cid, make_kv(tokens=20, seed=9), np.arange(20), IDENT, codec="lossless", parent=None)
        assert "pre-conditions" in str(e.value.__cause__)  # S3 itself refused: If-None-Match: *
        assert fs.cat_file(f"{card}/k/c/0/0/0/0") == shard
        for p, data in saved.items():
            fs.pipe_file(p, data)
        st._cards.clear()
        assert st.load(cid).equal(make_kv(tokens=20))  # no object of the card was replaced
        assert objects.write_small(objects.ref_path("a", cid), b"{}", create=True) is False
        assert b"card_id" in fs.cat_file(objects.ref_path("a", cid))
    # a second node "creating" the same store at the same moment adopts the marker the first one wrote
    with Store(url, index=tmp_path / "index2", storage_options=s3.options, create=True) as st:
        assert st.store_id == store_id


def test_unreachable_object_store_is_a_clear_error(s3, tmp_path):
    dead = dict(s3.options, endpoint_url=f"http://127.0.0.1:{free_port()}",
                config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    with pytest.raises(StoreError, match=r"object store at 's3://cards/x'.*reachable.*retry"):
        Store("s3://cards/x", index=tmp_path / "i", storage_options=dead)


def test_object_store_down_mid_put_leaves_nothing_half(tmp_path):
    with MotoS3("down") as server:
        st = Store("s3://down/s", index=tmp_path / "index", storage_options=dict(
            server.options, config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1}))
        keep = st.put(make_kv(tokens=20), np.arange(20), IDENT, agent="a")
        server.stop()
        with pytest.raises(StoreError, match="object store at 's3://down/s'"):
            st.put(make_kv(tokens=30, seed=2), np.arange(500, 530), IDENT, agent="a")
        assert [c.card_id for c in st.cards()] == [keep] and st.stats()["puts_in_progress"] == 0
        st.close()


def test_read_through_cache_serves_hot_cards_from_local_disk(s3, tmp_path):
    url = "s3://cards/cached"
    kvs = [make_kv(tokens=40, seed=i) for i in range(3)]
    with Store(url, index=tmp_path / "index", storage_options=s3.options) as st:
        ids = [st.put(kv, np.arange(40) + 1000 * i, IDENT, agent="a") for i, kv in enumerate(kvs)]
        size = st.cards()[0].bytes
    node = Store(url, index=tmp_path / "index", storage_options=s3.options, open_cache=0,
                 cache_dir=tmp_path / "cache", cache_bytes=2 * size + size // 2)
    cache = node.objects.cache
    assert node.load(ids[0]).equal(kvs[0]) and (cache.hits, cache.misses) == (0, 1)
    assert node.load(ids[0]).equal(kvs[0]) and (cache.hits, cache.misses) == (1, 1)
    node.load(ids[1])
    node.load(ids[0])  # ids[0] is now the most recently used, ids[1] the least
    node.load(ids[2])  # three cards do not fit: the least recently used copy goes
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*"))
    assert cached == sorted([ids[0], ids[2]]) and cache.bytes() <= 2 * size + size // 2
    fs = __import__("s3fs").S3FileSystem(**s3.options)
    fs.rm(f"cards/cached/cards/{ids[0][:2]}/{ids[0]}/k", recursive=True)  # the bucket's copy is damaged
    assert node.load(ids[0]).equal(kvs[0])  # served from this node's disk
    node.delete(ids[0])  # deleting a card drops its cached copy too
    assert ids[0] not in [p.name for p in (tmp_path / "cache").glob("*/*")]
    node.close()


@pytest.mark.skipif(bool(redis_missing()), reason=redis_missing() or "")
def test_bucket_and_redis_flush_reindex_from_the_bucket(s3, tmp_path):
    with RedisServer(tmp_path / "redis") as redis:
        url = "s3://cards/shared"
        kv = make_kv(tokens=50)
        with Store(url, index=redis.url, storage_options=s3.options, block_tokens=16) as st:
            a = st.put(kv, np.arange(50), IDENT, agent="a")
            st.handoff(a, "b")
            before = [(c.card_id, c.agents, c.total) for c in st.cards()]
            __import__("redis").Redis.from_url(redis.url).flushall()
            assert st.reindex().cards == 1
            assert [(c.card_id, c.agents, c.total) for c in st.cards()] == before
            assert st.load(st.match(np.arange(60), IDENT, agent="b")).equal(kv)
