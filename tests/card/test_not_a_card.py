"""open_card and Store on what is not a card or not a store: a clear CacheCardError that says what is there,
never advice to delete good data (issue 17, items 3 and 4)."""

from __future__ import annotations

import pytest

import cachecard
from cachecard.card.locations import STORE_MARKER
from cachecard.kvstore.names import STORE_FILE
from cachecard.testing import make_identity, make_kv


def test_the_store_marker_is_the_stores_file():
    assert STORE_MARKER == STORE_FILE


def test_a_regular_file_is_not_a_card(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"\0" * 100)
    with pytest.raises(cachecard.NotACardError, match="not a zip archive"):
        cachecard.open_card(tmp_path / "f.bin")


def test_folders_that_are_not_cards_are_described(tmp_path):
    kv, ids, ident = make_kv(), list(range(37)), make_identity()
    cachecard.write_card(tmp_path / "cards" / "a", kv, ids, ident)
    with cachecard.Store(tmp_path / "demo" / "store") as st:
        st.put(kv, ids, ident, agent="x")
    cases = {tmp_path / "cards": "1 card (a:", tmp_path / "demo": "1 store (store:",
             tmp_path / "demo" / "store": "is a cachecard store"}
    for where, text in cases.items():
        with pytest.raises(cachecard.NotACardError) as e:
            cachecard.open_card(where)
        assert text in str(e.value) and "delete" not in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(cachecard.NotACardError, match="no zarr.json"):
        cachecard.open_card(tmp_path / "other")


def test_a_half_written_card_is_still_called_one(tmp_path):
    kv, ids, ident = make_kv(), list(range(37)), make_identity()
    cachecard.write_card(tmp_path / "c", kv, ids, ident)
    (tmp_path / "c" / "zarr.json").unlink()
    with pytest.raises(cachecard.IncompleteCardError, match="did not finish"):
        cachecard.open_card(tmp_path / "c")


def test_store_on_a_file_or_a_folder_of_other_data_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(cachecard.StoreError, match="is a file"):
        cachecard.Store(tmp_path / "f")
    cachecard.write_card(tmp_path / "memory" / "planner.card", make_kv(), list(range(37)), make_identity())
    with pytest.raises(cachecard.StoreError, match=r"holds other data \(planner.card\)"):
        cachecard.Store(tmp_path / "memory")  # a store there could not see the card
    assert cachecard.open_card(tmp_path / "memory" / "planner.card")  # and nothing was touched


def test_batch_of_one_token_ids_are_accepted_by_write_card_and_put(tmp_path):
    import numpy as np

    kv, ident = make_kv(tokens=10), make_identity()
    ids = np.arange(10)[None]  # (1, T), as tokenizers return
    cachecard.write_card(tmp_path / "c", kv, ids, ident)
    assert cachecard.open_card(tmp_path / "c").token_ids().tolist() == list(range(10))
    with cachecard.Store(tmp_path / "s") as st:
        st.put(kv, ids, ident, agent="a")
        assert st.match(ids, ident).tokens == 10
    with pytest.raises(cachecard.KVShapeError, match="a batch of 2 sequences"):
        cachecard.write_card(tmp_path / "d", kv, np.zeros((2, 10), int), ident)
