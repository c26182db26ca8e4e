"""Invalid golden vectors (spec §11): every card in spec/vectors/invalid is refused with its documented error
class, one case per refusal rule of spec §9 (scripts/make_invalid_vectors.py wrote them, once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cachecard
from cachecard import errors

INVALID = Path(__file__).parents[2] / "spec" / "vectors" / "invalid"
CASES = json.loads((INVALID / "cases.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_invalid_vector_is_refused_with_its_error(case):
    path = INVALID / case["name"] / case["card"]
    assert path.exists() or path.is_symlink() or case["error"] == "CardNotFoundError", "vectors are write-once"
    with pytest.raises(errors.CacheCardError) as e:
        card = cachecard.open_card(path, key=case.get("key"))
        card.read()
        card.verify()
    assert type(e.value).__name__ == case["error"], f"{case['rule']}: {e.value}"
    assert str(path) in str(e.value)


def test_every_refusal_rule_has_a_vector():
    names = {c["name"].split("-")[0] for c in CASES}
    assert {"not", "incomplete", "corrupt", "tampered", "manifest", "version", "unsupported"} <= names
    classes = {c["error"] for c in CASES}
    assert classes == {"CardNotFoundError", "NotACardError", "IncompleteCardError", "CorruptCardError",
                       "TamperedCardError", "ManifestError", "FormatVersionError", "UnsupportedCodecError"}
