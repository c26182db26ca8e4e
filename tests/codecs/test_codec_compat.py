"""Compatibility codecs are bit-exact with the runtimes' own quantizers (spec/codecs/q8_0.md, q4_0.md, q4_1.md,
mlx_affine.md, nf4.md): gguf.quants for ggml blocks, mlx.core.quantize, bitsandbytes' NF4 rule."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from hypothesis import given
from hypothesis import strategies as st

from cachecard.codecs.base import to_float32
from cachecard.codecs.mlx_affine import HEADER, MLXAffineCodec, round_bf16, round_f16
from cachecard.codecs.nf4 import NF4, NF4Codec
from cachecard.codecs.q4_0 import Q4_0Codec
from cachecard.codecs.q4_1 import Q4_1Codec
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.testing.codec_data import kv_like, stored

rows = st.builds(lambda n, d, seed, scale: kv_like((n, d), seed, scale),
                 st.integers(1, 9), st.sampled_from([32, 64, 128]), st.integers(0, 2**16),
                 st.sampled_from([1e-4, 0.01, 1.0, 100.0]))


@given(rows)
def test_q8_0_bytes_equal_ggml(x):
    assert Q8_0Codec().encode_array(x, None) == quants.quantize(x, GGMLQuantizationType.Q8_0).tobytes()
    data = np.frombuffer(Q8_0Codec().encode_array(x, None), np.uint8)
    want = quants.dequantize(data.reshape(x.shape[0], -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(Q8_0Codec().decode_array(data, x.shape), want.reshape(x.shape))


@given(rows)
def test_q4_0_bytes_equal_ggml(x):
    data = Q4_0Codec().encode_array(x, None)
    assert data == quants.quantize(x, GGMLQuantizationType.Q4_0).tobytes()
    want = quants.dequantize(np.frombuffer(data, np.uint8).reshape(x.shape[0], -1), GGMLQuantizationType.Q4_0)
    assert np.array_equal(Q4_0Codec().decode_array(np.frombuffer(data, np.uint8), x.shape), want.reshape(x.shape))


@given(rows)
def test_q4_1_bytes_equal_ggml(x):
    data = Q4_1Codec().encode_array(x, None)
    assert data == quants.quantize(x, GGMLQuantizationType.Q4_1).tobytes()
    want = quants.dequantize(np.frombuffer(data, np.uint8).reshape(x.shape[0], -1), GGMLQuantizationType.Q4_1)
    assert np.array_equal(Q4_1Codec().decode_array(np.frombuffer(data, np.uint8), x.shape), want.reshape(x.shape))


@given(rows, st.sampled_from([2, 3, 4, 5, 6, 8]), st.sampled_from([32, 64, 128]),
       st.sampled_from(["float32", "float16", "bfloat16"]), st.booleans())
def test_mlx_affine_equals_mx_quantize(x, bits, group, dtype, zero_rows):
    """Chunk = header, then mx.quantize's (packed, scales, biases) bytes; decode = mx.dequantize in float32."""
    mx = pytest.importorskip("mlx.core")
    if x.shape[1] % group:
        x = np.tile(x, (1, group // x.shape[1]))
    if zero_rows:
        x[: x.shape[0] // 2] = 0
    x = stored(x, dtype)
    codec = MLXAffineCodec(bits=bits, group_size=group)
    data = codec.encode_chunk(x)
    w = mx.array(to_float32(x)).astype(getattr(mx, dtype))
    q, s, b = mx.quantize(w, group_size=group, bits=bits, mode="affine")
    sb = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    triple = [np.array(q).tobytes()] + [np.array(a.astype(mx.float32)).astype(sb).tobytes() for a in (s, b)]
    assert data[HEADER:] == b"".join(triple)
    want = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits).astype(mx.float32))
    payload = np.frombuffer(data, np.uint8)
    assert np.array_equal(codec.decode_array(payload, x.shape), want)
    got = codec.decode_torch(torch.frombuffer(bytearray(data), dtype=torch.uint8), x.shape)
    assert np.array_equal(got.numpy(), want)


def bnb_nf4_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' default (torch) quantize_4bit for nf4, restated: A * (1 / absmax), clamp, argmin of
    |scaled - code| (first index on ties), (q[0::2] << 4) | q[1::2]. Zero blocks get code 7 (0.0) here."""
    a = torch.from_numpy(x.reshape(-1, block))
    absmax = a.abs().max(dim=1).values
    inv = torch.where(absmax == 0, 0.0, 1 / absmax)
    scaled = torch.clamp(a * inv[:, None], -1, 1).reshape(-1, 1)
    q = torch.argmin(torch.abs(scaled - torch.from_numpy(NF4)), dim=-1).to(torch.uint8)
    return (q[::2] << 4 | q[1::2]).numpy(), absmax.numpy()


@given(rows, st.sampled_from([32, 64, 128, 256]))
def test_nf4_equals_table_argmin_and_midpoints(x, block):
    if x.shape[1] % block:
        x = np.tile(x, (1, block // x.shape[1]))
    data = NF4Codec(block_size=block).encode_array(x, None)
    codes, absmax = bnb_nf4_reference(x, block)
    assert data == codes.tobytes() + absmax.astype("<f4").tobytes()
    # bitsandbytes' CUDA kernel compares against the midpoints (x > mid goes up): the same codes, except for
    # values within float32 rounding of a midpoint
    scaled = np.clip(x.reshape(-1, block) * (np.float32(1) / np.abs(x.reshape(-1, block)).max(1, keepdims=True)),
                     -1, 1).reshape(-1)
    mids = (NF4[:-1].astype(np.float64) + NF4[1:]) / 2
    near = np.abs(scaled[:, None] - mids).min(axis=1) < 1e-6
    q = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1)
    assert np.array_equal(q[~near], np.searchsorted(mids, scaled, side="left")[~near])
    want = (NF4[q].reshape(-1, block) * absmax[:, None]).reshape(x.shape)
    assert np.array_equal(NF4Codec(block_size=block).decode_array(np.frombuffer(data, np.uint8), x.shape), want)


def test_nf4_ties_go_to_the_lower_code():
    """Where float32 |s - c_i| == |s - c_(i+1)| (six of the fifteen midpoints), the lower code wins."""
    ties = [(i, m) for i in range(15)
            if abs((m := np.float32((np.float64(NF4[i]) + NF4[i + 1]) / 2)) - NF4[i]) == abs(m - NF4[i + 1])]
    assert len(ties) >= 3
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1.0                                           # absmax 1: the scaled values are the inputs
    x[0, 2: 2 + len(ties)] = [m for _, m in ties]
    data = np.frombuffer(NF4Codec(block_size=32).encode_array(x, None), np.uint8)
    q = np.stack([data[:16] >> 4, data[:16] & 15], axis=1).reshape(-1)
    assert q[2: 2 + len(ties)].tolist() == [i for i, _ in ties]


def test_fast_float16_and_bfloat16_rounding_equal_casts():
    """mlx_affine's decoder rounds to float16/bfloat16 on bit patterns; it must equal the casts (checked once
    over every float32 with |x| <= 65504; here over random patterns and every float16 midpoint ± 1 ulp)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.abs(x) <= 65504]
    h = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    h = h[np.isfinite(h)]
    mids = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    x = np.concatenate([x, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    x = x[np.abs(x) <= 65504]
    y = x.copy()
    round_f16(y)
    assert np.array_equal(y.view(np.uint32), x.astype(np.float16).astype(np.float32).view(np.uint32))
    x = x[np.isfinite(x)]
    y = x.copy()
    round_bf16(y)
    assert np.array_equal(y.view(np.uint32), x.astype(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32))
