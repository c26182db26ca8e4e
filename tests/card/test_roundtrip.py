"""Round-trips of cards through every kind of location, whole and partial (spec §4, §5, §10)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

import cachecard
from cachecard import CanonicalKV, ParentRef
from cachecard.testing import make_identity, make_kv
from cachecard.testing.strategies import cards


@given(cards(), st.data())
def test_roundtrip_memory_store_whole_and_partial(card, data):
    kv, ident, chunk = card
    ids = np.arange(kv.num_tokens) * 7 % 49152
    store = zarr.storage.MemoryStore()
    man = cachecard.write_card(store, kv, ids, ident, chunk_tokens=chunk)
    c = cachecard.open_card(store)
    assert c.manifest == man
    assert c.read().equal(kv)
    assert np.array_equal(c.token_ids(), ids)
    assert np.array_equal(c.positions(), np.arange(kv.num_tokens))

    l0 = data.draw(st.integers(0, kv.num_layers - 1))
    l1 = data.draw(st.integers(l0, kv.num_layers))
    t0 = data.draw(st.integers(0, kv.num_tokens))
    t1 = data.draw(st.integers(t0, kv.num_tokens))
    part = c.read(layers=range(l0, l1), tokens=slice(t0, t1))
    want = CanonicalKV(kv.k[l0:l1, :, t0:t1], kv.v[l0:l1, :, t0:t1])
    assert part.equal(want)
    assert c.read(tokens=t1).equal(CanonicalKV(kv.k[:, :, :t1], kv.v[:, :, :t1]))


@pytest.mark.parametrize("suffix", ["card", "card.zip"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_local_dir_and_zip(tmp_path, suffix, dtype):
    kv = make_kv(layers=3, heads=2, tokens=300, head_dim=16, dtype=dtype)
    ident = make_identity(layers=3, head_dim=16, dtype=dtype)
    path = tmp_path / suffix
    cachecard.write_card(path, kv, np.arange(300), ident)
    out = cachecard.read_card(path)
    assert out.equal(kv) and out.k.dtype == kv.k.dtype
    assert cachecard.verify_card(path).tokens == 300
    assert [p.name for p in tmp_path.iterdir()] == [suffix]  # no staging leftovers


def test_roundtrip_fsspec_url():
    kv = make_kv(tokens=20)
    url = "memory://cards/roundtrip-1"
    cachecard.write_card(url, kv, np.arange(20), make_identity())
    assert cachecard.read_card(url).equal(kv)


def test_card_is_a_handful_of_objects(tmp_path):
    """A 4K-token, 30-layer card is 7 objects in format 1.1 (1.0 needed about a thousand)."""
    kv = make_kv(layers=30, heads=1, tokens=4096, head_dim=2)
    cachecard.write_card(tmp_path / "c", kv, np.arange(4096), make_identity(layers=30, heads=1, head_dim=2))
    assert len(cachecard.open_card(tmp_path / "c").objects()) == 7


def test_balanced_chunks_store_no_padding(tmp_path):
    kv = make_kv(layers=1, heads=1, tokens=42, head_dim=64, dtype="float32")
    cachecard.write_card(tmp_path / "c", kv, np.arange(42), make_identity(1, 1, 64, "float32"))
    objs = cachecard.open_card(tmp_path / "c").objects()
    shard = objs["k/c/0/0/0/0"]
    assert kv.k.nbytes <= shard <= kv.k.nbytes + 64  # data + index + crcs, no 256-token padding


def test_parent_and_explicit_positions(tmp_path):
    kv = make_kv(tokens=5)
    parent = ParentRef(card_id="0" * 32, tokens=100)
    cachecard.write_card(tmp_path / "a", kv, np.arange(5), make_identity(), parent=parent)
    c = cachecard.open_card(tmp_path / "a")
    assert c.manifest.parent == parent and c.manifest.start_position == 100
    assert np.array_equal(c.positions(), np.arange(100, 105))

    pos = np.array([0, 3, 9, 10, 42])
    cachecard.write_card(tmp_path / "b", kv, np.arange(5), make_identity(), positions=pos)
    c = cachecard.open_card(tmp_path / "b")
    assert c.manifest.positions == "explicit" and np.array_equal(c.positions(), pos)


def test_partial_read_fetches_only_needed_chunks():
    """Reading one layer's first chunk touches that chunk's bytes and the shard index, nothing more."""

    reads: list[tuple[str, object]] = []

    class Recording(zarr.storage.MemoryStore):  # zarr re-creates stores (read-only copies), so log outside
        async def get(self, key, prototype, byte_range=None):
            reads.append((key, byte_range))
            return await super().get(key, prototype, byte_range)

        async def getsize(self, key):  # a stat, as LocalStore and FsspecStore do (the default calls get)
            return len(self._store_dict[key])

    kv = make_kv(layers=8, heads=2, tokens=1024, head_dim=16)
    store = Recording()
    cachecard.write_card(store, kv, np.arange(1024), make_identity(8, 2, 16))
    card = cachecard.open_card(store)
    reads.clear()
    part = card.read(layers=3, tokens=100)
    assert part.equal(CanonicalKV(kv.k[3:4, :, :100], kv.v[3:4, :, :100]))
    shard_reads = [r for k, r in reads if "/c/" in k]
    assert shard_reads and all(r is not None for r in shard_reads)  # byte ranges only, never whole shards
    fetched = sum(getattr(r, "end", 0) - getattr(r, "start", 0) for r in shard_reads)
    assert fetched == 2 * (256 * 2 * 16 * 2 + 4)  # one 256-token chunk (+ crc32c) of K and of V


@pytest.mark.parametrize("bad", [
    dict(layers=3), dict(heads=3), dict(head_dim=4), dict(dtype="float32"),
])
def test_writer_refuses_kv_that_does_not_match_identity(tmp_path, bad):
    kv = make_kv()
    ident = make_identity(**{**dict(layers=2, heads=2, head_dim=8, dtype="float16"), **bad})
    with pytest.raises(cachecard.KVShapeError, match="does not match the model identity"):
        cachecard.write_card(tmp_path / "c", kv, np.arange(37), ident)
    assert not (tmp_path / "c").exists()


def test_writer_refuses_wrong_token_count_and_bad_ids(tmp_path):
    kv = make_kv(tokens=4)
    with pytest.raises(cachecard.KVShapeError, match="one token id per cached token"):
        cachecard.write_card(tmp_path / "c", kv, [1, 2, 3], make_identity())
    with pytest.raises(cachecard.KVShapeError, match="integers in"):
        cachecard.write_card(tmp_path / "c", kv, [1, 2, 3, -1], make_identity())
    with pytest.raises(cachecard.KVShapeError, match="strictly increasing"):
        cachecard.write_card(tmp_path / "c", kv, [1, 2, 3, 4], make_identity(), positions=[0, 2, 2, 3])


def test_unknown_codec_preset_is_refused_before_writing(tmp_path):
    with pytest.raises(cachecard.UnsupportedCodecError, match="known presets"):
        cachecard.write_card(tmp_path / "c", make_kv(), np.arange(37), make_identity(), codec="q3_magic")
    assert not list(tmp_path.iterdir())


def test_layer_and_token_selection_errors(small_card):
    card = cachecard.open_card(small_card[0])
    with pytest.raises(ValueError, match="contiguous"):
        card.read(layers=slice(0, 3, 2))
    with pytest.raises(IndexError):
        card.read(layers=7)
    assert card.read(tokens=1000).num_tokens == 50  # a prefix longer than the card is the whole card
