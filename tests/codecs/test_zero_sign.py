"""The sign of zero out of the rotation codecs is what spec/codecs/turbo.md "Rotation" says: an exact zero of
R⁻¹ is +0 whatever the signs of its zero terms; a negative value that underflows float32 is −0; frontier
adds its mean by IEEE addition (+0 unless both are −0); the conversion to the element type keeps the sign.
The numpy and torch decoders, and the independent reference decoder, all agree to the bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachecard.codecs import _hadamard as hadamard
from cachecard.codecs.base import from_float32
from cachecard.codecs.frontier import FrontierCodec
from cachecard.codecs.mixed import MixedCodec
from cachecard.codecs.turbo import TurboCodec
from cachecard.testing import frontier_reference as ref

NEG0, TINY = np.float32(-0.0), np.float32(2.0**-149)
DIMS = [2, 4, 8, 16, 64, 128]
SEED = 11


def signbits(x) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.signbit(np.asarray(x, np.float32))


def all_negative_zero_terms(d: int) -> np.ndarray:
    """Row j: a ±0 vector y whose every term y_i · s_j · H_ji of output j is −0."""
    m = hadamard._matrix(SEED, d)                      # m[j, i] = s_j H_ji: output j = Σ_i y_i m[j, i]
    return np.where(m > 0, NEG0, np.float32(0.0)).astype(np.float32)


@pytest.mark.parametrize("d", DIMS)
def test_exact_zero_is_positive_whatever_the_terms(d):
    rows = np.concatenate([all_negative_zero_terms(d), np.full((1, d), NEG0), np.zeros((1, d), np.float32)])
    for out in (hadamard.inverse(rows, SEED), hadamard.inverse_torch(torch.from_numpy(rows), SEED),
                ref.inverse_rotation(rows, SEED)):
        assert not np.any(np.asarray(out)), "zeros in, zeros out"
        assert not signbits(out).any(), "an exact zero sum is +0"


@pytest.mark.parametrize("d", [4, 8, 16, 64])
def test_negative_underflow_is_negative_zero(d):
    """y = −2^-149 e_0: x_j = s_j · (−2^-149) / √D, below half the smallest subnormal: ±0 with that sign."""
    y = np.zeros((1, d), np.float32)
    y[0, 0] = -TINY
    want = hadamard.signs(SEED, d) > 0                  # s_j = +1 -> negative -> −0
    for out in (hadamard.inverse(y, SEED), hadamard.inverse_torch(torch.from_numpy(y), SEED),
                ref.inverse_rotation(y, SEED)):
        assert not np.any(np.asarray(out))
        assert np.array_equal(signbits(out)[0], want)


def decoders(codec, data: bytes, shape):
    yield codec.decode_array(np.frombuffer(data, np.uint8), shape)
    yield codec.decode_torch(torch.frombuffer(bytearray(data), dtype=torch.uint8), shape).numpy()


def test_turbo_negative_zero_scale_decodes_to_positive_zeros():
    d, n = 16, 3
    codec = TurboCodec(bits=3, seed=SEED)
    data = np.full(n, NEG0, "<f2").tobytes() + bytes(range(7, 7 + n * 6))   # any codes
    for out in decoders(codec, data, (1, 1, n, d)):
        assert not np.any(out) and not signbits(out).any()


def test_mixed_negative_zero_scales_decode_to_positive_zeros():
    d, cfg = 8, dict(base_bits=2, salient_bits=4, salient=0.0, sinks=0, recent=0, seed=SEED)
    codec = MixedCodec(**cfg)
    rate_map = bytes([0b0000_0010])                     # token 0 protected (class 2), tokens 1..3 base
    protected = np.float16(-0.0).tobytes() + np.arange(-4, 4, dtype=np.int8).tobytes()
    base = np.full(3, NEG0, "<f2").tobytes() + bytes([0x5A, 0xC3] * 3)
    for out in decoders(codec, rate_map + protected + base, (1, 1, 4, d)):
        assert not np.any(out) and not signbits(out).any()


def frontier_chunk(d: int, *, centered: bool, mean: float, qmin: int, symbols: list[int], ref_rms: float,
                   step: float = 1.0) -> bytes:
    """One head, two tokens: token 0 protected with a −0 scale, token 1 ECSQ with scale code 255."""
    counts = np.bincount(symbols, minlength=1).astype(np.uint32)
    words = ref.rans_encode(symbols, ref.quantized_cdf(counts)) if len(counts) > 1 else []
    return ref.build(ref.Chunk(
        flags=int(centered), step=np.float32(step), ref=np.float32(ref_rms), protected=np.array([True, False]),
        mean=np.full((1, d), mean, np.float16) if centered else None, p_scale=np.array([-0.0], np.float16),
        p_codes=np.arange(d, dtype=np.int8).reshape(1, d) - 3, scale_code=np.array([255], np.uint8), qmin=qmin,
        counts=counts, words=np.array(words, np.uint32)))


@pytest.mark.parametrize("centered", [False, True])
def test_frontier_zero_products_decode_to_positive_zeros(centered):
    """ECSQ values −1 · (+0) = −0 and protected codes · (−0): every term ±0; the mean −0 adds +0 + −0 = +0."""
    d = 8
    data = frontier_chunk(d, centered=centered, mean=-0.0, qmin=-1, symbols=[0] * d, ref_rms=0.0)
    codec = FrontierCodec(step=1.0, center=centered, sinks=0, recent=0, salient=0.0, seed=SEED)
    for out in [*decoders(codec, data, (1, 1, 2, d)), ref.decode(data, (1, 1, 2, d), SEED)]:
        assert not np.any(out) and not signbits(out).any()


@pytest.mark.parametrize("centered", [False, True])
def test_frontier_underflow_keeps_its_sign_unless_a_mean_is_added(centered):
    d = 16
    data = frontier_chunk(d, centered=centered, mean=-0.0, qmin=-1, symbols=[0] + [1] * (d - 1), ref_rms=TINY)
    codec = FrontierCodec(step=1.0, center=centered, sinks=0, recent=0, salient=0.0, seed=SEED)
    want = np.zeros((1, 1, 2, d), bool)
    want[0, 0, 1] = hadamard.signs(SEED, d) > 0         # ŷ = −2^-149 e_0 underflows to ∓0
    # centered: x̂ = R⁻¹ŷ + (−0), so −0 stays −0 and +0 stays +0 (IEEE: +0 + −0 = +0, −0 + −0 = −0)
    for out in [*decoders(codec, data, (1, 1, 2, d)), ref.decode(data, (1, 1, 2, d), SEED)]:
        assert not np.any(out)
        assert np.array_equal(signbits(out), want)
        for storage in (np.dtype("<f2"), np.dtype("<u2")):   # the element type keeps the sign
            stored = from_float32(out, storage).view("<u2")
            assert np.array_equal(stored == 0x8000, want) and np.all((stored & 0x7FFF) == 0)
