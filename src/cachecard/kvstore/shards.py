"""Encoding a card's K or V shard (spec/cachecard-1.md §5.2), chunk by chunk, with context.

zarr's own write path hands a codec nothing but the chunk's values. Card codecs may also use where the
chunk sits (layer, token offset, RoPE positions: spec/codecs/README.md "Chunk context"), so the writer
encodes inner chunks itself, in parallel, and lets zarr assemble the shard (index, order, crc32c) from them.
The bytes are exactly those zarr writes for context-free codecs; tests/test_vectors.py holds us to that.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.codecs import ShardingCodec
from zarr.core.array_spec import ArrayConfig
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import morton_order_iter
from zarr.core.sync import sync

from cachecard.codecs.base import ChunkContext, KVCodec

_WORKERS = min(8, os.cpu_count() or 1)


def write_kv_shard(z: zarr.Array, data: np.ndarray, positions: np.ndarray, which: str) -> None:
    """Encode ``data`` (L, H, T, D, storage dtype) into the single shard of card array ``z`` and store it.

    ``positions`` holds the RoPE position of each of the T tokens.
    """
    meta = z.metadata
    (sharding,) = meta.codecs
    assert isinstance(sharding, ShardingCodec), "card arrays hold exactly one sharding codec"
    proto = default_buffer_prototype()
    shard_spec = meta.get_chunk_spec((0, 0, 0, 0), ArrayConfig(order="C", write_empty_chunks=True), proto)
    chunk_spec = sharding._get_chunk_spec(shard_spec)  # noqa: SLF001 - zarr 3.1's chunk spec of a shard
    per_shard = sharding._get_chunks_per_shard(shard_spec)  # noqa: SLF001
    L, H, T, D = data.shape
    c = sharding.chunk_shape[2]
    span = per_shard[2] * c
    padded = np.zeros((L, H, span, D), dtype=data.dtype)
    padded[:, :, :T] = data
    pos = np.concatenate([positions, positions[-1:] + 1 + np.arange(span - T)]) if T else np.arange(span)

    serializer = sharding.codec_pipeline.array_bytes_codec
    after = list(sharding.codec_pipeline.bytes_bytes_codecs)

    def encode(coords: tuple[int, ...]) -> tuple[tuple[int, ...], bytes]:
        layer, _, j, _ = coords
        block = padded[layer:layer + 1, :, j * c:(j + 1) * c]
        if isinstance(serializer, KVCodec):
            ctx = ChunkContext(layer=layer, which=which, token_start=j * c,  # type: ignore[arg-type]
                               valid_tokens=max(0, min(c, T - j * c)), card_tokens=T,
                               positions=pos[j * c:(j + 1) * c])
            return coords, serializer.encode_chunk(block, ctx)
        buf = sync(serializer._encode_single(proto.nd_buffer.from_numpy_array(block), chunk_spec))  # noqa: SLF001
        return coords, buf.to_bytes()

    order = list(morton_order_iter(per_shard))
    with ThreadPoolExecutor(_WORKERS) as pool:
        encoded = dict(pool.map(encode, order))
    buffers = [proto.buffer.from_bytes(encoded[k]) for k in order]
    for codec in after:
        buffers = list(sync(codec.encode([(b, chunk_spec) for b in buffers])))
    shard = sync(sharding._encode_shard_dict(dict(zip(order, buffers)),  # noqa: SLF001
                                             chunks_per_shard=per_shard, buffer_prototype=proto))
    assert shard is not None and math.prod(per_shard) == len(order)
    sync(z.store.set(f"{z.path}/{meta.encode_chunk_key((0, 0, 0, 0))}", shard))
