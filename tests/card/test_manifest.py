"""Manifest models, schema and identity (spec §5.6, §6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachecard.manifest import CardManifest, LayerKind, ModelIdentity, json_schema, manifest_digest
from cachecard.testing import make_identity

SPEC = Path(__file__).parents[2] / "spec"


def test_schema_file_matches_models():
    """spec/schemas/manifest.schema.json is generated from the models; regenerate with `make schema`."""
    on_disk = json.loads((SPEC / "schemas" / "manifest.schema.json").read_text())
    assert on_disk == json_schema(), "schema drifted from the pydantic models: run `make schema`"


@given(layers=st.integers(1, 8), heads=st.integers(1, 64), dim=st.integers(1, 256).map(lambda d: d * 2),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), count=st.integers(0, 2**31 - 1))
def test_manifest_json_roundtrip_and_stable_digest(layers, heads, dim, dtype, count):
    table = {"k/zarr.json": {"size": 1187, "sha256": "1" * 64},
             "k/c/0/0/0/0": {"size": 99, "sha256": "2" * 64, "index_sha256": "3" * 64, "chunk_crc32c": "AAAAAA=="}}
    m = CardManifest(cachecard_format=1, format_minor=3, card_id="f" * 32, created="2026-11-22T00:00:00Z",
                     producer={"version": "0.1.0"}, model=make_identity(layers, heads, dim, dtype),
                     tokens={"count": count, "sha256": "0" * 64}, codecs={"k": "lossless", "v": "lossless"},
                     objects=table)
    doc = json.loads(json.dumps(m.to_json_dict()))
    assert CardManifest.model_validate(doc) == m
    assert manifest_digest(doc) == manifest_digest(m.to_json_dict())


def test_models_are_frozen_and_strict():
    ident = make_identity()
    with pytest.raises(pydantic.ValidationError):
        ident.num_layers = 3
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ModelIdentity.model_validate({**ident.model_dump(), "colour": "blue"})
    with pytest.raises(pydantic.ValidationError, match="layer_kinds"):
        make_identity(layers=3, layer_kinds=(LayerKind(),))
    with pytest.raises(pydantic.ValidationError, match="window"):
        LayerKind(attention="sliding")


def test_identity_mismatches_name_each_field():
    a = make_identity()
    b = make_identity(num_kv_heads=4, weights_hash="sha256:" + "00" * 32, name="other name")
    diffs = a.mismatches(b)
    assert len(diffs) == 2 and diffs[0].startswith("num_kv_heads: card has 2, model has 4")
    assert a.mismatches(make_identity(name="display only")) == []


def test_import_cachecard_imports_no_framework():
    code = ("import sys, cachecard, cachecard.cli; "
            "print(sorted({'torch', 'mlx', 'llama_cpp', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
