"""Model identity shared by runtimes (spec §6): the gguf-sha256 scheme and the restore check."""

from __future__ import annotations

import pytest
from cachecard.testing import make_identity

from cachecard import IdentityMismatchError
from cachecard.identity import check_identity, gguf_identity

gguf = pytest.importorskip("gguf")


def test_restore_check_ignores_kv_dtype_and_names_other_fields():
    card = make_identity(dtype="float16")
    check_identity(card, make_identity(dtype="float32"))  # a restore converts the element type
    other = make_identity(dtype="float32", num_kv_heads=4, weights_hash="sha256:" + "ef" * 32)
    with pytest.raises(IdentityMismatchError, match="num_kv_heads: card has 2, model has 4") as e:
        check_identity(card, other)
    assert "weights_hash" in str(e.value) and "kv_dtype" not in str(e.value)
    check_identity(card, other, allow={"num_kv_heads", "weights_hash"})


def test_smollm2_gguf_identity():
    from cachecard.testing import smollm2

    ident = gguf_identity(smollm2.gguf_path(), kv_dtype="float32")
    assert (ident.architecture, ident.num_layers, ident.num_kv_heads, ident.head_dim) == ("llama", 30, 3, 64)
    assert ident.rope.theta == 100000.0 and ident.rope.rotary_dim == 64 and ident.kv_dtype == "float32"
    assert ident.weights_hash.startswith("gguf-sha256:") and ident.tokenizer_hash.startswith("gguf-sha256:")
    assert gguf_identity(smollm2.gguf_path(), kv_dtype="float16").mismatches(ident)[0].startswith("kv_dtype")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a readable GGUF file|lacks metadata|no general.architecture"):
        gguf_identity(bad, kv_dtype="float16")


def test_a_gguf_without_shapes_is_refused(tmp_path):
    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="lacks metadata key llama.block_count"):
        gguf_identity(path, kv_dtype="float16")
