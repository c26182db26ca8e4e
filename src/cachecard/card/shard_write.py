"""Encoding a card's K or V shard (spec/cachecard-1.md §5.2), chunk by chunk, with context.

zarr's own write path hands a codec nothing but the chunk's values. Card codecs may also use where the
chunk sits (layer, token offset, RoPE positions: spec/codecs/README.md "Chunk context"), so the writer
encodes inner chunks itself, in parallel, and lets zarr assemble the shard (index, order, crc32c) from them.
The bytes are exactly those zarr writes for context-free codecs; tests/card/test_vectors.py holds us to that.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import zarr

from cachecard.card import _zarr
from cachecard.codecs.base import ChunkContext, KVCodec

_WORKERS = min(8, os.cpu_count() or 1)


# (which, layer, token_start, valid_tokens, chunk_tokens) -> one inner chunk's serializer payload
Payloads = Callable[[str, int, int, int, int], bytes]


def write_kv_shard(z: zarr.Array, data: np.ndarray, positions: np.ndarray, which: str,
                   payloads: Payloads | None = None) -> None:
    """Encode ``data`` (L, H, T, D, storage dtype) into the single shard of card array ``z`` and store it.

    ``positions`` holds the RoPE position of each of the T tokens. ``payloads``, when given, supplies every
    inner chunk's serializer payload already encoded (a runtime that holds the codec's bytes, e.g. a block
    pool of quantized KV): ``data`` is then not encoded.
    """
    geo = _zarr.shard_geometry(z)
    L, H, T, D = data.shape
    c = geo.sharding.chunk_shape[2]
    span = geo.per_shard[2] * c
    padded = np.zeros((L, H, span, D), dtype=data.dtype)
    padded[:, :, :T] = data
    pos = np.concatenate([positions, positions[-1:] + 1 + np.arange(span - T)]) if T else np.arange(span)
    serializer = geo.sharding.codec_pipeline.array_bytes_codec

    def encode(coords: tuple[int, ...]) -> tuple[tuple[int, ...], bytes]:
        layer, _, j, _ = coords
        if payloads is not None:
            return coords, bytes(payloads(which, layer, j * c, max(0, min(c, T - j * c)), c))
        block = padded[layer:layer + 1, :, j * c:(j + 1) * c]
        if isinstance(serializer, KVCodec):
            ctx = ChunkContext(layer=layer, which=which, token_start=j * c,  # type: ignore[arg-type]
                               valid_tokens=max(0, min(c, T - j * c)), card_tokens=T,
                               positions=pos[j * c:(j + 1) * c])
            return coords, serializer.encode_chunk(block, ctx)
        return coords, _zarr.encode_single(serializer, block, geo)

    with ThreadPoolExecutor(_WORKERS) as pool:
        encoded = dict(pool.map(encode, geo.morton_order()))
    _zarr.sync(z.store.set(geo.shard_key, _zarr.encode_shard(geo, encoded)))
