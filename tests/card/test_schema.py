"""The JSON Schema (spec/schemas/manifest.schema.json) states what the manifest models enforce (spec §5.6):
every valid vector's manifest validates, and every invalid vector whose rule the schema can express fails it,
as the reader refuses it. Rules across fields it cannot express are listed in the spec as reader checks."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from cachecard.testing import forgery

SPEC = Path(__file__).parents[2] / "spec"
SCHEMA = json.loads((SPEC / "schemas" / "manifest.schema.json").read_text())
VALID = json.loads((SPEC / "vectors" / "cases.json").read_text())
INVALID = {c["name"]: c for c in json.loads((SPEC / "vectors" / "invalid" / "cases.json").read_text())}
# invalid vectors whose manifest the schema itself refuses (the others break rules across fields or objects)
SCHEMA_RULES = ["manifest-unknown-key", "manifest-missing-key", "manifest-created-offset",
                "manifest-string-for-number", "manifest-pruning-null-in-1.1", "manifest-objects-in-1.2",
                "manifest-1.3-without-objects", "manifest-minor-not-integer", "manifest-not-an-object"]


def manifest_of(card: Path) -> object:
    return forgery.root_doc(forgery.load(card))["attributes"]["cachecard"]


def validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


@pytest.mark.parametrize("name", VALID)
def test_every_valid_vector_manifest_validates(name):
    case = SPEC / "vectors" / name
    card = case / "card.zip" if (case / "card.zip").exists() else case / "card"
    validator().validate(manifest_of(card))


@pytest.mark.parametrize("name", SCHEMA_RULES)
def test_the_schema_refuses_what_the_reader_refuses(name):
    case = INVALID[name]
    assert case["error"] == "ManifestError"
    assert not validator().is_valid(manifest_of(SPEC / "vectors" / "invalid" / name / case["card"]))


def test_required_fields_have_no_default():
    for field in ("cachecard_format", "format_minor"):
        assert field in SCHEMA["required"] and "default" not in SCHEMA["properties"][field]
