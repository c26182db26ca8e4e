"""Block accounting: reference counts, registered prefix blocks that outlive their agents until needed."""

from __future__ import annotations

import numpy as np
import pytest

from cachecard.pool.blocks import BlockAllocator, chain, root_hash


def test_refcounts_and_free_list():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert a.available() == 1 and a.used() == 3 and sorted(x) == [0, 1, 2]
    a.incref(x[:1])
    a.decref(x)
    assert a.used() == 1 and a.shared() == 0  # block x[0] still referenced once
    a.decref(x[:1])
    assert a.available() == 4
    with pytest.raises(RuntimeError, match="released more often"):
        a.decref(x[:1])


def test_registered_block_is_cached_after_release_and_reclaimed_last_released_last():
    a = BlockAllocator(3)
    b0, b1, b2 = a.allocate(3)
    a.register(b0, b"h0")
    a.register(b1, b"h1")
    a.register(b2, b"h0")  # a second block for a hash already registered stays unregistered
    a.decref([b1, b0, b2])
    assert a.cached() == 2 and a.available() == 3 and a.lookup(b"h0") == b0
    a.incref([a.lookup(b"h0")])  # found again while cached: referenced, no longer reclaimable
    assert a.cached() == 1
    got = a.allocate(2)  # the free block first, then the least recently released cached one
    assert got == [b2, b1] and a.lookup(b"h1") is None and a.lookup(b"h0") == b0


def test_chained_hashes_depend_on_everything_before():
    r1, r2 = root_hash(b"m" * 32, "q4", 16), root_hash(b"m" * 32, "q8_0", 16)
    t = np.arange(16)
    assert r1 != r2 and chain(r1, t) != chain(r2, t)
    assert chain(chain(r1, t), t) != chain(chain(r1, t + 1), t)
    assert chain(r1, t) == chain(r1, t.astype(np.int64))  # ids hash as int32 little-endian, any input type
