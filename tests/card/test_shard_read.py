"""The fast shard read path (kvstore/fastread.py) returns exactly what zarr's path returns, and keeps every
integrity check: on local directories, zip files and object stores, for plain and coded chunks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.storage import MemoryStore

import cachecard
from cachecard import CorruptCardError
from cachecard.testing import forgery, make_identity, make_kv


def both(location, layers, tokens):
    fast = cachecard.open_card(location)
    slow = cachecard.open_card(location)
    slow.fast = False
    return fast.read(layers=layers, tokens=tokens), slow.read(layers=layers, tokens=tokens)


@settings(max_examples=25)
@given(tokens=st.integers(1, 90), chunk=st.integers(1, 40), heads=st.integers(1, 3),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]), where=st.sampled_from(["dir", "zip", "memory"]),
       data=st.data())
def test_fast_path_equals_zarr_path(tmp_path_factory, tokens, chunk, heads, dtype, where, data):
    kv = make_kv(layers=3, heads=heads, tokens=tokens, head_dim=4, dtype=dtype)
    ident = make_identity(layers=3, heads=heads, head_dim=4, dtype=dtype)
    d = tmp_path_factory.mktemp("fr")
    loc = {"dir": d / "card", "zip": d / "card.zip", "memory": MemoryStore()}[where]
    cachecard.write_card(loc, kv, np.arange(tokens), ident, chunk_tokens=chunk)
    l0 = data.draw(st.integers(0, 2))
    l1 = data.draw(st.integers(l0 + 1, 3))
    t0 = data.draw(st.integers(0, tokens))
    t1 = data.draw(st.integers(t0, tokens))
    fast, slow = both(loc, range(l0, l1), slice(t0, t1))
    assert fast.equal(slow)
    assert np.array_equal(fast.k.view(np.uint8), kv.k[l0:l1, :, t0:t1].view(np.uint8))


@pytest.mark.parametrize("codec", ["q8", "zstd"])
def test_fast_path_decodes_coded_chunks_like_zarr(tmp_path, codec):
    kv = make_kv(layers=2, heads=2, tokens=70, head_dim=32)
    ident = make_identity(layers=2, heads=2, head_dim=32)
    try:
        cachecard.write_card(tmp_path / "c", kv, np.arange(70), ident, codec=codec, chunk_tokens=32)
    except cachecard.UnsupportedCodecError:
        pytest.skip(f"codec preset {codec!r} not available")
    for layers, tokens in [(None, None), (1, slice(5, 66))]:
        fast, slow = both(tmp_path / "c", layers, tokens)
        assert fast.equal(slow)


def test_index_entry_outside_the_shard_is_corruption(small_card):
    import google_crc32c

    path = small_card[0]
    shard = path / "k" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    n = 3 * 4  # 3 layers x 4 token chunks
    index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").copy().reshape(-1, 2)
    index[5, 0] = len(raw)  # points past the data
    body = index.tobytes()
    raw[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCardError, match="not the one in the object table"):
        cachecard.open_card(path).read(layers=1)
    forgery.save(forgery.reseal(forgery.load(path), crcs=False), path)  # past the table: the bounds check
    with pytest.raises(CorruptCardError, match=r"layer 1, kv_head 0-1, token 13-25.*outside the shard"):
        cachecard.open_card(path).read(layers=1)
    cachecard.open_card(path).read(layers=0)  # other chunks read fine


def test_truncated_shard_is_corruption_on_the_fast_path(small_card):
    path = small_card[0]
    shard = path / "v" / "c" / "0" / "0" / "0" / "0"
    raw = shard.read_bytes()
    card = cachecard.open_card(path)
    card.read(layers=0)  # the index is checked and cached now
    shard.write_bytes(raw[:100])
    with pytest.raises(CorruptCardError):
        card.read()


@pytest.mark.parametrize("codec", ["q8", "lossless"])
def test_read_encoded_is_the_same_on_local_and_object_stores(tmp_path, codec):
    """Parallel in-place reads (local files) and one ranged request (fsspec) give the same payloads."""
    import uuid

    kv = make_kv(layers=3, heads=2, tokens=70, head_dim=32)
    ident = make_identity(layers=3, head_dim=32)
    url = f"memory://cachecard-{uuid.uuid4().hex}/card"
    for where in (tmp_path / "card", url):
        cachecard.write_card(where, kv, np.arange(70), ident, codec=codec, chunk_tokens=16)
    local, remote = (cachecard.open_card(w).read_encoded("v", layers=range(1, 3), tokens=40)
                     for w in (tmp_path / "card", url))
    assert [(c.layer, c.token_start) for c in local.chunks] == [(c.layer, c.token_start) for c in remote.chunks]
    assert len(local.chunks) == 2 * 3 and np.array_equal(local.buffer, remote.buffer)
    assert all(np.array_equal(a.payload, b.payload) for a, b in zip(local.chunks, remote.chunks))
