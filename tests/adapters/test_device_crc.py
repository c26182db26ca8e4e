"""crc32c by 64-byte blocks (adapters/device_crc.py): the decomposition the device kernel uses equals crc32c
(checked on the host here; the kernel against it on a GPU)."""

from __future__ import annotations

import crc32c
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torch")
from cachecard.adapters import device_crc  # noqa: E402


@given(st.binary(min_size=0, max_size=5000))
def test_block_decomposition_is_crc32c(data):
    assert device_crc.crc32c_blocks_numpy(np.frombuffer(data, np.uint8)) == crc32c.crc32c(data)


def test_block_matrices_grow_consistently():
    small = device_crc.block_matrices(5).copy()
    assert np.array_equal(device_crc.block_matrices(300)[:5], small)
    assert np.array_equal(small[0], np.uint32(1) << np.arange(32, dtype=np.uint32))  # M_0 is the identity


def test_kernel_equals_crc32c_on_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3_000_000, dtype=np.uint8)
    starts = np.array([0, 3, 100, 4096, 70_000, 1_000_000, 2_000_001], np.int64)
    lens = np.array([0, 1, 63, 64, 65_537, 524_288, 999_999], np.int64)
    got = device_crc.crc32c_chunks(torch.from_numpy(data).cuda(), starts, lens).cpu().numpy().view(np.uint32)
    want = [crc32c.crc32c(data[s:s + n].tobytes()) for s, n in zip(starts, lens)]
    assert got.tolist() == want
