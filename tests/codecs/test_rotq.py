"""``cachecard.rotq`` (spec/codecs/rotq.md): numpy and torch decode to the same bits, records sit where the
header says, damaged headers fail, the gain is unbiased, and the planner meets its rate with per-layer rates
that follow the profile. (Round trip, error bound, determinism, strict configuration and golden vectors are
tested for every codec in test_codecs.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import cachecard
from cachecard.codecs import allocation, pipeline, profiles
from cachecard.codecs.base import NO_CONTEXT, ChunkContext, to_float32
from cachecard.codecs.profiles import SensitivityProfile
from cachecard.codecs.rotq import HEADER, RotqCodec
from cachecard.codecs.turbo import TurboCodec
from cachecard.testing import make_identity
from cachecard.testing.codec_data import kv_like, stored


def encode(codec: RotqCodec, x: np.ndarray, ctx: ChunkContext = NO_CONTEXT) -> np.ndarray:
    return np.frombuffer(codec.encode_chunk(x, ctx), np.uint8)


def context(start: int, c: int, card: int) -> ChunkContext:
    return ChunkContext(layer=0, token_start=start, valid_tokens=min(c, card - start), card_tokens=card,
                        positions=np.arange(start, start + c))


@settings(max_examples=40)
@given(d=st.sampled_from([8, 16, 64, 128]), heads=st.integers(1, 3), c=st.integers(1, 48), bits=st.integers(1, 4),
       center=st.booleans(), sinks=st.integers(0, 6), recent=st.integers(0, 20), start=st.integers(0, 60),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**16))
def test_torch_decode_is_bit_identical_to_numpy(d, heads, c, bits, center, sinks, recent, start, dtype, scale, seed):
    codec = RotqCodec(bits=bits, center=center, sinks=sinks, recent=recent, seed=seed)
    x = stored(kv_like((1, heads, c, d), seed, scale), dtype)
    data = encode(codec, x, context(start, c, start + c + 3))
    want = codec.decode_array(data, x.shape)
    got = codec.decode_torch(torch.from_numpy(data.copy()), x.shape)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_host_decode_with_and_without_torch_gives_the_reference_bits(monkeypatch, dtype):
    """The host decoder takes torch's int8 product and elementwise kernels when torch is loaded, numpy's float32
    BLAS otherwise; decode_chunk fuses the cast. All give from_float32(decode_array(...)) bit for bit."""
    import sys

    from cachecard.codecs.base import from_float32

    codec = RotqCodec(bits=3, center=True, sinks=2, recent=4, seed=5)
    for d in (64, 128):
        x = stored(kv_like((1, 2, 40, d), 1), dtype)
        data = encode(codec, x, context(0, 40, 40))
        results = []
        for hide in (False, True):
            if hide:
                monkeypatch.setitem(sys.modules, "torch", None)
            f32 = codec.decode_array(data, x.shape)
            results += [f32.view(np.uint32), from_float32(f32, x.dtype).view(np.uint8),
                        codec.decode_chunk(data, x.shape, x.dtype).view(np.uint8)]
            monkeypatch.undo()
        assert all(np.array_equal(results[i], results[i + 3]) for i in range(3))
        assert np.array_equal(results[1], results[2])


def test_protected_tokens_and_their_records_are_where_the_header_says():
    codec = RotqCodec(bits=2, center=True, sinks=3, recent=5, seed=1)
    x = stored(kv_like((1, 2, 32, 64), 2), "float16")
    data = encode(codec, x, context(0, 32, 30))  # 30 real tokens, 2 of padding
    _, _, bits, _, a, r0, r1, _, _ = HEADER.unpack(data[:HEADER.size].tobytes())
    assert (bits, a, r0, r1) == (2, 3, 25, 30)
    out = codec.decode_array(data, x.shape)
    err = np.sum((out - to_float32(x)) ** 2, axis=-1) / np.sum(to_float32(x) ** 2, axis=-1)
    protected = np.r_[0:3, 25:30]
    assert err[:, :, protected].max() < 1e-3 < err[:, :, 3:25].mean()
    # fixed-size records: damaging one unprotected record changes exactly that vector
    g, t, d, p = 2, 32, 64, 8
    mean = 2 * g * d
    record = HEADER.size + mean + g * p * d + (1 * (t - p) + 7) * d * bits // 8  # head 1, base rank 7 = token 10
    bad = data.copy()
    bad[record] ^= 0xFF
    changed = np.any(codec.decode_array(bad, x.shape) != out, axis=-1)
    assert changed.sum() == 1 and changed[0, 1, 10]


@pytest.mark.parametrize("field,value", [(0, 2), (1, 2), (2, 5), (3, 1)])
def test_a_damaged_header_is_refused(field, value):
    codec = RotqCodec(bits=3, center=False, sinks=0, recent=0, seed=1)
    x = stored(kv_like((1, 1, 8, 16), 3), "float16")
    data = encode(codec, x).copy()
    data[field] = value
    with pytest.raises(ValueError, match="cachecard.rotq"):
        codec.decode_array(data, x.shape)


def test_protected_ranges_out_of_order_or_too_long_are_refused():
    codec = RotqCodec(bits=3, center=False, sinks=0, recent=0, seed=1)
    x = stored(kv_like((1, 1, 8, 16), 3), "float16")
    data = encode(codec, x)
    for a, r0, r1 in ((3, 2, 8), (0, 6, 5), (0, 8, 9)):
        head = list(HEADER.unpack(data[:HEADER.size].tobytes()))
        head[4:7] = a, r0, r1
        bad = np.concatenate([np.frombuffer(HEADER.pack(*head), np.uint8), data[HEADER.size:]])
        with pytest.raises(ValueError, match="protected ranges|bytes"):
            codec.decode_array(bad, x.shape)


def test_head_dims_outside_the_spec_are_refused_with_advice():
    from cachecard.errors import KVShapeError

    codec = RotqCodec(bits=3, center=False, sinks=0, recent=0, seed=1)
    for d in (4, 48, 2048):
        with pytest.raises(KVShapeError, match="power of two"):
            codec.encode_chunk(np.zeros((1, 1, 4, d), np.float16))


def test_the_gain_is_unbiased_where_least_squares_shrinks():
    """<x̂, x> = <x, x> per vector (up to the log-coded scale), where turbo's least-squares gain shrinks every
    vector by the distortion (spec "Encoding")."""
    x = np.random.default_rng(0).standard_normal((1, 4, 256, 64)).astype(np.float32)

    def ratio(codec):
        out = codec.decode_array(np.frombuffer(codec.encode_array(x, NO_CONTEXT), np.uint8), x.shape)
        return np.einsum("...d,...d->...", out, x) / np.einsum("...d,...d->...", x, x)

    ours, turbo = ratio(RotqCodec(bits=2, center=False, sinks=0, recent=0, seed=1)), ratio(TurboCodec(bits=2, seed=1))
    assert abs(ours.mean() - 1) < 0.003 and np.abs(ours - 1).max() < 2 ** (1 / 32) - 1 + 1e-4
    assert turbo.mean() < 0.9


def test_a_tiny_chunk_is_stored_as_zeros_not_subnormal_scales():
    codec = RotqCodec(bits=3, center=False, sinks=0, recent=0, seed=1)
    x = np.full((1, 1, 4, 16), 1e-38, np.float32)
    out = codec.decode_array(np.frombuffer(codec.encode_array(x, NO_CONTEXT), np.uint8), x.shape)
    assert not np.any(out)


# -- planning -------------------------------------------------------------------------------------------------
IDENT = make_identity(layers=4, heads=2, head_dim=64)


@pytest.mark.parametrize("name,bits,tokens", [("gpu3", 3.0, 300), ("gpu3", 3.0, 1000), ("gpu2.5", 2.5, 1500)])
def test_presets_meet_their_rate_counting_every_stored_byte(name, bits, tokens):
    kv = cachecard.CanonicalKV(kv_like((4, 2, tokens, 64), 1).astype(np.float16),
                               kv_like((4, 2, tokens, 64), 2).astype(np.float16))
    store = zarr.storage.MemoryStore()
    cachecard.write_card(store, kv, np.arange(tokens), IDENT, codec=name)
    card = cachecard.open_card(store)
    stored_bytes = sum(size for key, size in card.objects().items() if key.startswith(("k/c/", "v/c/")))
    rate = 8 * stored_bytes / (kv.k.size + kv.v.size)
    assert rate <= bits and rate > bits - 0.25
    back = card.read()
    assert np.abs(back.k.astype(np.float32) - kv.k).max() < 10 * np.abs(kv.k).max()


def test_a_card_too_short_for_the_rate_gets_the_floor_everywhere():
    """Protected tokens are fixed costs: on a short card gpu2.5 cannot reach 2.5 bits and every rate is 2."""
    p = allocation.plan((4, 2, 300, 64), 2.5, None, sinks=4, recent=32)
    assert set(p.k) == set(p.v) == {2} and p.bits_per_element > 2.5


def test_sensitive_layers_get_more_bits_from_the_profile():
    profiles.register(SensitivityProfile(weights_hash=IDENT.weights_hash, k=[1e-4, 1e-2, 1e-4, 1e-4],
                                         v=[1e-4, 1e-4, 1e-4, 1e-3], reference="test"))
    try:
        k = kv_like((4, 2, 2000, 64), 1).astype(np.float16)
        kb = pipeline("gpu3", "k", k, IDENT).serializer.config.layer_bits
        vb = pipeline("gpu3", "v", k, IDENT).serializer.config.layer_bits
        assert kb[1] == max(kb) > min(kb) and vb[3] == max(vb)
        assert allocation.plan(k.shape, 3.0, IDENT, sinks=4, recent=32).bits_per_element <= 3.0
    finally:
        profiles.unregister(IDENT.weights_hash)
    default = pipeline("gpu3", "k", k, IDENT).serializer.config.layer_bits
    assert len(set(default)) <= 2  # without a profile every layer is alike (up to the budget's remainder)


def test_user_profiles_are_found_by_weights_hash_and_a_bad_one_is_named(tmp_path, monkeypatch):
    from cachecard.errors import ProfileError

    monkeypatch.setenv("CACHECARD_PROFILES", str(tmp_path))
    p = SensitivityProfile(weights_hash="sha256:" + "ab" * 32, k=[1.0, 2.0], v=[3.0, 4.0], reference="t")
    path = profiles.save(p)
    assert path.parent == tmp_path and profiles.lookup(p.weights_hash) == p
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="calibrate"):
        profiles.lookup(p.weights_hash)
