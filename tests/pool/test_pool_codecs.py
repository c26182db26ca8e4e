"""Resident codecs: a row is exactly its card codec's bytes for one vector, and every decoder agrees."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cachecard.errors import KVShapeError, UnsupportedCodecError
from cachecard.kv import NUMPY_DTYPES
from cachecard.pool.codecs import RESIDENT_CODECS, ResidentCodec

torch = pytest.importorskip("torch")

NAMES = sorted(RESIDENT_CODECS)
SCALES = ["float16", "bfloat16", "float32"]


def vectors(d: int = 64):
    """(tokens, head_dim) float32 vectors of KV-like magnitudes (|x| in [1e-6, 300], or 0), repeats included.
    (Below ~1e-36, ggml's q8_0 scale underflows and 1/d overflows: not a KV value, and not this module's.)"""
    mag = st.floats(np.float32(1e-6), 300, width=32)
    element = st.just(0.0) | mag | mag.map(lambda v: -v)
    return st.integers(1, 9).flatmap(lambda n: hnp.arrays(np.float32, (n, d), elements=element))


@given(x=vectors(), name=st.sampled_from(NAMES), scale=st.sampled_from(SCALES))
def test_rows_are_the_card_codecs_bytes(x, name, scale):
    c = ResidentCodec(name, 64, scale_dtype=scale)
    rows = c.encode_np(x)
    assert rows.shape == (len(x), c.row_bytes) and rows.dtype == np.uint8
    payload = c.rows_to_payload(rows)
    if c.serializer is None:  # raw little-endian values of the card's element type
        assert payload.tobytes() == x.astype(NUMPY_DTYPES[c.card_dtype]).tobytes()
    else:
        storage = NUMPY_DTYPES[c.card_dtype]
        assert payload.tobytes() == c.serializer.encode_chunk(x.astype(storage))  # what a card writer stores
        # and a card reader decodes the chunk to exactly what the pool attends to
        read = c.serializer.decode_chunk(payload, x.shape, np.dtype(storage)).astype(np.float32)
        assert np.array_equal(read, c.decode_np(rows))
    assert np.array_equal(c.payload_to_rows(payload, len(x)), rows)


@given(x=vectors(), name=st.sampled_from(NAMES), scale=st.sampled_from(SCALES))
def test_torch_decoder_matches_numpy_bit_for_bit(x, name, scale):
    c = ResidentCodec(name, 64, scale_dtype=scale)
    rows = c.encode_np(x)
    got = c.decode_torch(torch.from_numpy(rows.copy()), torch.float32).numpy()
    assert np.array_equal(got, c.decode_np(rows))
    assert np.array_equal(c.encode_torch(torch.from_numpy(x)).numpy(), rows)


@pytest.mark.parametrize("name", NAMES)
def test_zero_row_is_the_writers_padding(name):
    c = ResidentCodec(name, 64)
    assert np.array_equal(c.zero_row(), c.encode_np(np.zeros((1, 64), np.float32))[0])
    assert not np.any(c.decode_np(c.zero_row()[None]))


def test_affine_payload_of_another_scale_type_is_not_taken_as_rows():
    half, full = ResidentCodec("q4", 64, scale_dtype="float16"), ResidentCodec("q4", 64, scale_dtype="float32")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert half.payload_to_rows(full.rows_to_payload(full.encode_np(x)), 3) is None


def test_sizes_and_refusals():
    assert ResidentCodec("fp16", 64).row_bytes == 128
    assert ResidentCodec("q4", 64).row_bytes == 36 == ResidentCodec("q4_0", 64).row_bytes  # 4.5 bits per value
    assert ResidentCodec("q8_0", 64).row_bytes == 68
    assert ResidentCodec("turbo4", 64).row_bytes == 34  # 4.25 bits per value: a float16 gain + 64 4-bit codes
    with pytest.raises(UnsupportedCodecError, match="unknown resident codec 'q3'"):
        ResidentCodec("q3", 64)
    with pytest.raises(KVShapeError, match="multiple of 64"):
        ResidentCodec("q4", 32)


def test_turbo4_rows_are_the_turbo4_presets_codec():
    from cachecard.codecs.presets import preset

    c = ResidentCodec("turbo4", 64)
    for planner in (preset("turbo4").k, preset("turbo4").v):
        assert c.matches_card(planner(None, None).serializer, "float32")
    assert not c.matches_card(preset("turbo3").k(None, None).serializer, "float32")


def test_affine_rows_are_what_mx_quantize_returns():
    mx = pytest.importorskip("mlx.core")
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float16)
    c = ResidentCodec("q4", 64, scale_dtype="float16")
    packed, scales, biases = (np.array(a) for a in mx.quantize(mx.array(x), group_size=64, bits=4))
    assert np.array_equal(c.rows_from_affine(packed, scales, biases), c.encode_np(x))
    back = c.affine_from_rows(c.encode_np(x))
    assert all(np.array_equal(a, b) for a, b in zip(back, (packed, scales, biases)))
