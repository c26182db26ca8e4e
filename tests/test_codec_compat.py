"""Compatibility codecs are bit-exact with the runtimes' own quantizers (spec/codecs/q8_0.md, ...)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from hypothesis import given
from hypothesis import strategies as st

from cachecard.codecs.q8_0 import Q8_0Codec
from codec_data import kv_like

rows = st.builds(lambda n, d, seed, scale: kv_like((n, d), seed, scale),
                 st.integers(1, 9), st.sampled_from([32, 64, 128]), st.integers(0, 2**16),
                 st.sampled_from([1e-4, 0.01, 1.0, 100.0]))


@given(rows)
def test_q8_0_bytes_equal_ggml(x):
    assert Q8_0Codec().encode_array(x, None) == quants.quantize(x, GGMLQuantizationType.Q8_0).tobytes()
    data = np.frombuffer(Q8_0Codec().encode_array(x, None), np.uint8)
    want = quants.dequantize(data.reshape(x.shape[0], -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(Q8_0Codec().decode_array(data, x.shape), want.reshape(x.shape))
