"""Token pruning (spec/codecs/pruning.md) and format 1.2 (spec/cachecard-1.md §5.6, §8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

import cachecard
from cachecard.transforms.pruning import prune, select
from cachecard.manifest import Pruning
from cachecard.testing import make_identity, make_kv


@given(st.integers(1, 60), st.floats(0.01, 1.0), st.sampled_from(["value_norm", "front", "back"]), st.integers(0, 99))
def test_selection_keeps_the_stated_fraction_in_order(tokens, keep, method, seed):
    kv = make_kv(tokens=tokens, seed=seed)
    idx = select(kv, keep, method)
    assert len(idx) == min(tokens, max(1, math.ceil(keep * tokens)))
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < tokens
    if method == "front":
        assert idx[0] == 0 and idx[-1] == len(idx) - 1
    if method == "back":
        assert idx[-1] == tokens - 1
    if method == "value_norm":
        v = kv.v.astype(np.float32)
        score = np.linalg.norm(v, axis=-1).sum(axis=(0, 1))
        dropped = np.setdiff1d(np.arange(tokens), idx)
        if dropped.size:
            assert score[idx].min() >= score[dropped].max() - 1e-4


def test_pruned_card_records_what_it_kept_and_where_the_sequence_continues():
    kv = make_kv(tokens=40, dtype="float16")
    ids = np.arange(1000, 1040)
    p = prune(kv, ids, keep=0.25, method="value_norm")
    store = zarr.storage.MemoryStore()
    m = cachecard.write_card(store, p.kv, p.tokens, make_identity(), positions=p.positions, pruning=p.record)
    card = cachecard.open_card(store)
    assert card.format == "1.3" and m.pruning == p.record
    assert card.manifest.pruning.source_tokens == 40 and card.next_position() == 40
    assert np.array_equal(card.positions(), p.positions) and np.array_equal(card.token_ids(), ids[p.positions])
    assert card.read().equal(p.kv)


def test_unpruned_cards_say_so_with_a_null_pruning_record():
    store = zarr.storage.MemoryStore()
    cachecard.write_card(store, make_kv(tokens=5), np.arange(5), make_identity())
    card = cachecard.open_card(store)
    assert card.format == "1.3" and card.manifest.pruning is None and card.next_position() == 5
    attrs = zarr.open_group(store, mode="r").attrs.asdict()["cachecard"]
    assert attrs["pruning"] is None and attrs["format_minor"] == 3  # writers write every key (spec §5.6)


def test_pruning_is_never_a_default_and_is_checked():
    kv = make_kv(tokens=10)
    p = prune(kv, np.arange(10), keep=0.5, method="front")
    with pytest.raises(ValueError, match="explicit positions"):  # a pruning record without its positions
        cachecard.write_card(zarr.storage.MemoryStore(), p.kv, p.tokens, make_identity(), pruning=p.record)
    with pytest.raises(ValueError, match="keep must be"):
        prune(kv, np.arange(10), keep=0)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune(kv, np.arange(10), keep=0.5, method="random")
    with pytest.raises(ValueError):
        Pruning(method="front", keep=0.5, source_tokens=10, source_sha256="xyz")
