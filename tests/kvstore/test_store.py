"""The store (agent memory over cards): put / match / load / share / delete / evict / gc / verify / reindex,
hostile input, index growth, full disk, CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cachecard
from cachecard import (
    AgentIdError, CanonicalKV, CardNotFoundError, CorruptCardError, IdentityMismatchError, KVShapeError, Store,
    StoreError, StoreFullError,
)
from cachecard.cli import app
from cachecard.kvstore import index as ix
from cachecard.testing import make_identity, make_kv

IDENT = make_identity()


def seq_kv(n: int, seed: int = 0) -> CanonicalKV:
    return make_kv(tokens=n, seed=seed)


def extend(kv: CanonicalKV, more: int, seed: int = 1) -> CanonicalKV:
    add = make_kv(tokens=more, seed=seed)
    return CanonicalKV(np.concatenate([kv.k, add.k], axis=2), np.concatenate([kv.v, add.v], axis=2))


def tokens(n: int, start: int = 1000) -> np.ndarray:
    return np.arange(start, start + n)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store", block_tokens=16) as s:
        s.atime_resolution_s = 0.0  # exact LRU order for the eviction tests
        yield s


def card_bytes(store: Store) -> int:
    return sum(c.bytes for c in store.cards())


# -- basics ------------------------------------------------------------------------------------------------
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
    assert store.cards() == [] and not any((store.index.path.parent / "cards").rglob("zarr.json"))
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


def test_block_hashes_are_deterministic_across_processes():
    code = ("import numpy as np; from cachecard.kvstore import index as ix; import sys;"
            "from cachecard.testing import make_identity as m; raw = ix.token_bytes(np.arange(100));"
            "print(b''.join(ix.chain(ix.model_key(m()), raw, 16)).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed), cwd=Path(__file__).parent.parent).stdout
            for seed in ("0", "1", "12345")}
    assert len(outs) == 1
    # pinned: the scheme (BLAKE2b-128, person, int32 LE, model key) never changes silently
    assert ix.model_key(IDENT).hex()[:16] == ix.model_key(make_identity(name="other name")).hex()[:16]
    h0 = ix.chain(ix.model_key(IDENT), ix.token_bytes(np.arange(16)), 16)[0]
    import hashlib
    import rfc8785
    mk = hashlib.sha256(rfc8785.dumps(IDENT.model_dump(mode="json", exclude={"name"}))).digest()
    want = hashlib.blake2b(mk + np.arange(16, dtype="<i4").tobytes(), digest_size=16, person=b"cachecard.blk.v1")
    assert h0 == want.digest()


# -- gc, verify, reindex ----------------------------------------------------------------------------------
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


def test_reindex_into_an_empty_index(tmp_path):
    root = tmp_path / "s"
    with Store(root) as s:
        cid = s.put(seq_kv(20), tokens(20), IDENT, agent="a")
    with Store(root, index=tmp_path / "fresh-index") as s:
        assert s.cards() == []
        s.reindex()
        assert s.match(tokens(20), IDENT, agent="a") == cachecard.Match(cid, 20)


def test_gc_collects_orphans_and_partial_writes_and_adopts(store, tmp_path):
    root = Path(store._base)
    kv = seq_kv(20)
    keep = store.put(kv, tokens(20), IDENT, agent="a")
    # an orphan: a committed card that no agent references and the index lacks (a crash before its ref)
    orphan = "ab" * 16
    cachecard.write_card(root / "cards" / orphan[:2] / orphan, kv, tokens(20), IDENT, card_id=orphan)
    # a put that crashed after its ref object: gc adopts it
    adopt = "cd" * 16
    cachecard.write_card(root / "cards" / adopt[:2] / adopt, seq_kv(5), tokens(5, start=9), IDENT, card_id=adopt)
    store._write_ref("z", adopt)
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
    import shutil
    shutil.rmtree(store.card_location(a))
    shutil.copytree(store.card_location(b), store.card_location(a))
    with pytest.raises(CorruptCardError, match="does not match the index"):
        store.load(a)


# -- hostile input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("agent", ["", "../evil", "a/b", "a\\b", "a\x00b", "a\nb", "x" * 129, ".hidden", "-x", 5])
def test_bad_agent_ids_are_refused(store, agent):
    with pytest.raises(AgentIdError) as e:
        store.put(seq_kv(5), tokens(5), IDENT, agent=agent)
    assert repr(agent)[:20] in str(e.value) or not isinstance(agent, str)
    assert store.cards() == []
    assert not (Path(store._base).parent / "evil").exists()


def test_bad_card_ids_are_refused(store):
    for bad in ("../../etc", "AB" * 16, "a" * 31, ""):
        with pytest.raises(CardNotFoundError, match="not a card id"):
            store.load(bad)
        with pytest.raises(CardNotFoundError):
            store.delete(bad)


def test_another_model_is_refused_on_load(store):
    a = store.put(seq_kv(10), tokens(10), IDENT, agent="a")
    with pytest.raises(IdentityMismatchError, match="weights_hash"):
        store.load(a, model=make_identity(weights_hash="sha256:" + "ee" * 32))
    with pytest.raises(KVShapeError):
        store.put(seq_kv(10), tokens(10), make_identity(layers=3), agent="a")
    with pytest.raises(KVShapeError):
        store.put(seq_kv(10), tokens(9), IDENT, agent="a")


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


def test_no_pickle_anywhere():
    src = Path(cachecard.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle." not in text, path
        assert "import shelve" not in text and "import dill" not in text, path


# -- index growth, full disk -------------------------------------------------------------------------------
def test_lmdb_map_grows_by_itself(tmp_path):
    with Store(tmp_path / "s", block_tokens=1, map_size=64 << 10) as s:
        start = s.index.env.info()["map_size"]
        ids = [s.put(seq_kv(300, seed=i), tokens(300, start=1000 * i), IDENT, agent="a") for i in range(4)]
        assert s.index.env.info()["map_size"] > start and s.index.grows >= 1
        assert s.stats()["blocks"] == 1200
        for i, cid in enumerate(ids):
            assert s.match(tokens(300, start=1000 * i), IDENT) == cachecard.Match(cid, 300)


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
    assert sorted(p.name for p in Path(store._base, "cards").glob("*/*")) == [keep]  # no partial write left
    # and the ref object write failing (disk full after the card) also loses nothing
    monkeypatch.setattr(Store, "_write_small", lambda self, p, d: (_ for _ in ()).throw(
        StoreFullError("disk is full")))
    with pytest.raises(StoreFullError):
        store.put(extend(kv, 10), tokens(50), IDENT, agent="a")
    monkeypatch.undo()
    assert [c.card_id for c in store.cards()] == [keep] and store.stats()["puts_in_progress"] == 0
    assert store.gc(grace_s=0).orphans_deleted == []


def test_store_settings_are_checked(tmp_path):
    with pytest.raises(StoreError, match="no cachecard store"):
        Store(tmp_path / "none", create=False)
    Store(tmp_path / "s", block_tokens=8).close()
    with pytest.raises(StoreError, match="block_tokens=8"):
        Store(tmp_path / "s", block_tokens=16)
    with Store(tmp_path / "s") as s:
        assert s.block_tokens == 8


# -- CLI ----------------------------------------------------------------------------------------------------
def test_cli_ls_stats_verify_gc_reindex_rm(tmp_path):
    root = tmp_path / "s"
    with Store(root) as s:
        a = s.put(seq_kv(20), tokens(20), IDENT, agent="alice")
        s.handoff(a, "bob")
    run = CliRunner().invoke
    r = run(app, ["ls", str(root)])
    assert r.exit_code == 0 and a[:8] in r.output and "alice" in r.output
    r = run(app, ["ls", str(root), "--json", "--agent", "bob"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["card_id"] == a
    r = run(app, ["stats", str(root), "--json"])
    assert json.loads(r.output)["cards"] == 1
    r = run(app, ["verify", str(root)])
    assert r.exit_code == 0 and "1 of 1 cards verified" in r.output
    r = run(app, ["gc", str(root), "--grace", "0"])
    assert r.exit_code == 0 and "removed 0 unreferenced" in r.output
    r = run(app, ["reindex", str(root)])
    assert r.exit_code == 0 and "indexed 1 cards, 2 references" in r.output
    r = run(app, ["rm", str(root), a, "--agent", "alice"])
    assert r.exit_code == 0 and "freed 0 cards" in r.output
    r = run(app, ["rm", str(root), "--agent", "bob"])
    assert r.exit_code == 0 and f"freed 1 cards: {a}" in r.output
    r = run(app, ["rm", str(root), "--agent", "../x"])
    assert r.exit_code == 1 and "agent id" in r.output
    r = run(app, ["ls", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no cachecard store" in r.output
