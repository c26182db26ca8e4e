"""Golden vectors (spec §11): every card in spec/vectors decodes to exactly its stored arrays, forever.
Encoding is deterministic: writing the same KV again gives byte-identical chunk objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cachecard
from cachecard.card import layout

VECTORS = Path(__file__).parents[2] / "spec" / "vectors"
CASES = json.loads((VECTORS / "cases.json").read_text())


def card_path(case: Path) -> Path:
    return case / "card.zip" if (case / "card.zip").exists() else case / "card"


@pytest.mark.parametrize("name", CASES)
def test_vector_decodes_exactly(name):
    case = VECTORS / name
    assert case.is_dir(), f"golden vector {name} is missing; vectors are write-once and must stay committed"
    key = (case / "key.txt").read_text() if (case / "key.txt").exists() else None
    card = cachecard.open_card(card_path(case), key=key)
    assert card.authenticated == (key is not None) and card.bound == (name >= "v1.3")
    kv = card.read()
    storage = layout.STORAGE_DTYPES[card.manifest.model.kv_dtype]
    assert np.array_equal(kv.k.view(storage), np.load(case / "k.npy"))
    assert np.array_equal(kv.v.view(storage), np.load(case / "v.npy"))
    assert np.array_equal(card.token_ids(), np.load(case / "tokens.npy"))
    assert np.array_equal(card.positions(), np.load(case / "positions.npy"))
    card.verify()
    assert card.format == name[1:4]


def test_older_minor_is_migrated_and_partially_readable():
    case = VECTORS / "v1.0-float16-per-layer"
    card = cachecard.open_card(card_path(case))
    part = card.read(layers=1, tokens=slice(10, 20))
    assert np.array_equal(part.k.view("<f2"), np.load(case / "k.npy")[1:2, :, 10:20])


def test_keyed_vector_is_refused_under_another_key():
    with pytest.raises(cachecard.TamperedCardError):
        cachecard.open_card(VECTORS / "v1.3-float16-keyed" / "card", key="not the golden-vector key, 16+ bytes")


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("v1.0") and "zip" not in n])
def test_reencoding_is_byte_identical(name, tmp_path):
    case = VECTORS / name
    src = cachecard.open_card(card_path(case))
    m = src.manifest
    chunk = max(1, int(__import__("zarr").open_array(str(card_path(case)), path="k").chunks[2]))
    cachecard.write_card(tmp_path / "again", src.read(), src.token_ids(), m.model, chunk_tokens=chunk,
                         parent=m.parent, positions=src.positions() if m.positions == "explicit" else None,
                         pruning=m.pruning)
    for key in src.objects():
        if key != "zarr.json":  # the root holds a fresh card id and time
            assert (tmp_path / "again" / key).read_bytes() == (card_path(case) / key).read_bytes(), key
