"""Every preset writes a card that reads back (spec/codecs/README.md §6): lossless ones bit for bit, lossy
ones within their codecs' bounds, each array's zarr.json naming the codecs that decode it, and a hypothesis
round-trip through real cards of random shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import cachecard
from cachecard.codecs import PRESETS, pipeline
from cachecard.codecs.base import KVCodec, to_float32
from cachecard.errors import UnsupportedCodecError
from cachecard.card import layout
from cachecard.testing import make_identity
from cachecard.testing.codec_data import kv_like

NAMES = sorted(PRESETS)


def card_kv(tokens: int, dtype: str, seed: int, head_dim: int = 64, layers: int = 2) -> cachecard.CanonicalKV:
    from cachecard.testing.codec_data import stored

    shape = (layers, 2, tokens, head_dim)
    k = stored(kv_like(shape, seed), dtype)
    v = stored(kv_like(shape, seed + 1, outliers=False), dtype)
    if dtype == "bfloat16":
        import ml_dtypes

        k, v = k.view(ml_dtypes.bfloat16), v.view(ml_dtypes.bfloat16)
    return cachecard.CanonicalKV(k, v)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8)
@given(tokens=st.integers(1, 300), dtype=st.sampled_from(["float32", "float16", "bfloat16"]), seed=st.integers(0, 999))
def test_preset_roundtrip_through_a_card(name, tokens, dtype, seed):
    kv = card_kv(tokens, dtype, seed)
    ident = make_identity(layers=2, heads=2, head_dim=64, dtype=dtype)
    store = zarr.storage.MemoryStore()
    m = cachecard.write_card(store, kv, np.arange(tokens), ident, codec=name)
    assert (m.codecs.k, m.codecs.v) == (name, name)
    back = cachecard.open_card(store).read()
    assert back.k.shape == kv.k.shape and back.k.dtype == kv.k.dtype
    if not PRESETS[name].lossy:
        assert back.equal(kv)
        return
    for which in ("k", "v"):
        codec = pipeline(name, which, getattr(kv, which), ident).serializer
        assert isinstance(codec, KVCodec)
        x = to_float32(getattr(kv, which))
        err = np.abs(to_float32(getattr(back, which)) - x)
        # the codec's bound on its float32 decode, plus one rounding to the card's element type
        ulp = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
        bound = chunk_bounds(codec, x) * (1 + ulp) + np.abs(x) * ulp + 1e-6
        assert np.all(err <= bound)


def chunk_bounds(codec: KVCodec, x: np.ndarray) -> np.ndarray:
    """The codec's bound per inner chunk, as the writer chunks (balanced, zero-padded) the (L, H, T, D) array."""
    layers, heads, t, d = x.shape
    c = layout.balanced_chunk(t, layout.DEFAULT_CHUNK_TOKENS)
    padded = np.zeros((layers, heads, -(-t // c) * c, d), np.float32)
    padded[:, :, :t] = x
    out = np.empty_like(padded)
    for layer in range(layers):
        for s in range(0, padded.shape[2], c):
            out[layer:layer + 1, :, s:s + c] = codec.error_bound(padded[layer:layer + 1, :, s:s + c])
    return out[:, :, :t]


def test_arrays_record_the_pipeline_that_decodes_them():
    kv = card_kv(40, "float16", 1)
    store = zarr.storage.MemoryStore()
    cachecard.write_card(store, kv, np.arange(40), make_identity(layers=2, heads=2, head_dim=64), codec=("q8", "turbo3"))
    k = json.loads(store._store_dict["k/zarr.json"].to_bytes())
    v = json.loads(store._store_dict["v/zarr.json"].to_bytes())
    inner = lambda meta: [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]  # noqa: E731
    assert inner(k) == ["cachecard.q8_0", "crc32c"] and inner(v) == ["cachecard.turbo", "crc32c"]


def test_unknown_preset_fails_before_writing(tmp_path):
    with pytest.raises(UnsupportedCodecError, match="known presets"):
        cachecard.write_card(tmp_path / "c", card_kv(4, "float16", 1), np.arange(4),
                             make_identity(layers=2, heads=2, head_dim=64), codec="q3_magic")
    assert not list(tmp_path.iterdir())


def test_codec_that_cannot_take_the_head_dim_is_a_clear_error(tmp_path):
    kv = card_kv(8, "float16", 1, head_dim=24)
    with pytest.raises(cachecard.KVShapeError, match="head_dim"):
        cachecard.write_card(tmp_path / "c", kv, np.arange(8), make_identity(layers=2, heads=2, head_dim=24),
                             codec="turbo3")
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
