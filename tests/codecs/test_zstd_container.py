"""The informative Blosc 1 header of spec/codecs/README.md §7 is what the reference writer's `zstd` preset
stores: read a card's shard by hand (index at the end, crc32c after each inner chunk) and check the header of
every inner chunk."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import cachecard
from cachecard.testing import make_identity, make_kv


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zstd_chunks_start_with_the_documented_blosc1_header(tmp_path, dtype):
    kv = make_kv(layers=2, heads=2, tokens=40, head_dim=8, dtype=dtype, seed=1)
    cachecard.write_card(tmp_path / "card", kv, np.arange(40), make_identity(dtype=dtype), codec="zstd",
                         chunk_tokens=16)
    shard = (tmp_path / "card" / "k" / "c" / "0" / "0" / "0" / "0").read_bytes()
    chunks = 2 * 3                                           # layers x ceil(40 / 14) token chunks of c = 14
    index = np.frombuffer(shard[-(16 * chunks + 4):-4], "<u8").reshape(chunks, 2)
    size = np.dtype({"float32": "<f4"}.get(dtype, "<u2")).itemsize
    for offset, nbytes in index:
        body = shard[offset:offset + nbytes - 4]             # the inner pipeline's crc32c is the last 4 bytes
        version, versionlz, flags, typesize, raw, _blocksize, cbytes = struct.unpack("<BBBBIII", body[:16])
        assert (version, versionlz, typesize) == (2, 1, size)
        assert flags & 0b1110_0001 == 0b1000_0001, f"flags {flags:#x}: byte shuffle and compressor 4 (zstd)"
        assert raw == 2 * 14 * 8 * size and cbytes == len(body)
