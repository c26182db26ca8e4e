"""The one module that touches zarr's internals (zarr 3.1; pinned in pyproject.toml).

Cards are plain Zarr v3, but the card writer encodes inner chunks itself (codecs get their chunk's context)
and the readers read shards without zarr's per-chunk pipeline. Both need pieces of zarr that are not public
API: the chunk spec inside a shard, a serializer's single-chunk encoder, the shard assembler, a zip member's
size without reading it, zip failures turned into card errors, and the synchronous bridge to zarr's async stores. They are all here, each tested in
tests/card/test_zarr_shim.py, so moving to a newer zarr is a change to this file alone.
"""

from __future__ import annotations

import asyncio
import struct
import zipfile
import zlib
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import ShardingCodec
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.indexing import morton_order_iter
from zarr.core.sync import sync
from zarr.storage import ZipStore

from cachecard.card.zipcheck import check_members
from cachecard.errors import CacheCardError, CorruptCardError

__all__ = [
    "Buffer", "BufferPrototype", "RangeByteRequest", "SuffixByteRequest", "ShardGeometry", "encode_shard", "encode_single", "get_bytes", "get_ranges",
    "group_document", "CardZipStore", "open_zip", "prototype", "shard_geometry", "sync", "zip_member_size",
]


def prototype() -> BufferPrototype:
    """zarr's default (host memory) buffer prototype."""
    return default_buffer_prototype()


class ShardGeometry:
    """What the writer and the generic decode path need of a card array's single shard."""

    def __init__(self, arr: zarr.Array) -> None:
        meta = arr.metadata
        (sharding,) = meta.codecs
        if not isinstance(sharding, ShardingCodec):
            raise TypeError("card arrays hold exactly one sharding codec")
        self.sharding = sharding
        proto = prototype()
        shard_spec = meta.get_chunk_spec((0, 0, 0, 0), ArrayConfig(order="C", write_empty_chunks=True), proto)
        self.chunk_spec: ArraySpec = sharding._get_chunk_spec(shard_spec)  # noqa: SLF001 - zarr 3.1
        self.per_shard: tuple[int, ...] = tuple(sharding._get_chunks_per_shard(shard_spec))  # noqa: SLF001
        self.shard_key = f"{arr.path}/{meta.encode_chunk_key((0, 0, 0, 0))}"

    def morton_order(self) -> list[tuple[int, ...]]:
        """Inner chunk coordinates in the order zarr's sharding codec stores them."""
        return list(morton_order_iter(self.per_shard))

    def decode_batch(self, raws: Iterable[np.ndarray]) -> list[np.ndarray]:
        """Decode encoded inner chunks (payload + every bytes codec) with the shard's own codec pipeline."""
        proto = prototype()
        batch = [(proto.buffer.from_bytes(raw.tobytes()), self.chunk_spec) for raw in raws]
        return [np.asarray(d.as_numpy_array()) for d in sync(self.sharding.codec_pipeline.decode(batch))]


def shard_geometry(arr: zarr.Array) -> ShardGeometry:
    return ShardGeometry(arr)


def encode_single(serializer: ArrayBytesCodec, block: np.ndarray, geometry: ShardGeometry) -> bytes:
    """One inner chunk through a zarr serializer, without zarr's batching (the writer parallelises itself)."""
    buf = sync(serializer._encode_single(prototype().nd_buffer.from_numpy_array(block),  # noqa: SLF001
                                         geometry.chunk_spec))
    return buf.to_bytes()


def encode_shard(geometry: ShardGeometry, encoded: dict[tuple[int, ...], bytes]) -> Buffer:
    """The shard object from its inner chunks' serializer bytes: the remaining bytes codecs (crc32c) per
    chunk, then zarr's own index and order."""
    proto = prototype()
    order = geometry.morton_order()
    buffers = [proto.buffer.from_bytes(encoded[k]) for k in order]
    for codec in geometry.sharding.codec_pipeline.bytes_bytes_codecs:
        buffers = list(sync(codec.encode([(b, geometry.chunk_spec) for b in buffers])))
    shard = sync(geometry.sharding._encode_shard_dict(  # noqa: SLF001 - zarr 3.1's shard assembler
        dict(zip(order, buffers)), chunks_per_shard=geometry.per_shard, buffer_prototype=proto))
    if shard is None:
        raise ValueError("zarr assembled no shard from the chunks")
    return shard


def group_document(attributes: dict[str, Any]) -> bytes:
    """The bytes zarr writes as a group's ``zarr.json`` with these attributes."""
    meta = GroupMetadata(attributes=attributes, zarr_format=3)
    return meta.to_buffer_dict(prototype())["zarr.json"].to_bytes()


def get_bytes(store: Store, key: str, byte_range: Any = None) -> bytes | None:
    """An object's bytes (or a byte range of it), ``None`` when it is missing."""
    buf = sync(store.get(key, prototype=prototype(), byte_range=byte_range))
    return None if buf is None else buf.to_bytes()


def get_ranges(store: Store, key: str, spans: list[tuple[int, int]], concurrency: int) -> list[bytes | None]:
    """Byte ranges ``[start, end)`` of one object, ``concurrency`` requests in flight (object stores)."""
    proto = prototype()

    async def fetch_all() -> list[Any]:
        sem = asyncio.Semaphore(concurrency)

        async def one(start: int, end: int) -> Any:
            async with sem:
                return await store.get(key, prototype=proto, byte_range=RangeByteRequest(start, end))

        return list(await asyncio.gather(*(one(a, b) for a, b in spans)))

    return [None if b is None else b.to_bytes() for b in sync(fetch_all())]


# What zipfile and zlib raise on a damaged archive or member (truncation, bad CRC, bad headers, bad streams).
_ZIP_FAILURES = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError,
                 struct.error, OverflowError)


class CardZipStore(ZipStore):
    """zarr's read-only ZipStore whose failures are :class:`CorruptCardError` naming the card and member: zarr
    catches only ``KeyError`` (a missing member), so a damaged zip would surface as ``zipfile.BadZipFile``."""

    label = "<zip>"

    def _get(self, key: str, prototype: BufferPrototype, byte_range: Any = None) -> Buffer | None:
        try:
            return super()._get(key, prototype, byte_range)
        except CacheCardError:
            raise
        except _ZIP_FAILURES as e:
            raise CorruptCardError(f"zip member {key!r} cannot be read ({type(e).__name__}: {e}); the card is "
                                   "damaged: delete it (or restore it from a replica)", card=self.label,
                                   part=key) from e

    async def getsize(self, key: str) -> int:
        """From the central directory (zarr 3.1's ``getsize`` reads the whole member)."""
        try:
            return self._zf.getinfo(key).file_size
        except KeyError:
            raise FileNotFoundError(key) from None

    def sizes(self) -> dict[str, int]:
        """Every member (but directory entries) and its size, from the central directory."""
        return {i.filename: i.file_size for i in self._zf.infolist() if not i.is_dir()}


def open_zip(path: Any, label: str | None = None) -> CardZipStore:
    """A read-only zip card store, opened now (zarr opens stores lazily; raw ``get`` needs it open), its
    central directory checked (card/zipcheck.py). A damaged container is a :class:`CorruptCardError`."""
    store = CardZipStore(path, mode="r")
    store.label = label if label is not None else str(path)
    try:
        sync(store._open())  # noqa: SLF001
    except _ZIP_FAILURES as e:
        raise CorruptCardError(f"not a readable zip file ({type(e).__name__}: {e}); the card is damaged: delete "
                               "it (or restore it from a replica)", card=store.label) from e
    try:
        check_members(store._zf, store.label)  # noqa: SLF001
    except CacheCardError:
        store.close()
        raise
    return store


def zip_member_size(store: ZipStore, key: str) -> int:
    """A zip member's size from the central directory (zarr 3.1's ``getsize`` reads the whole member)."""
    return store._zf.getinfo(key).file_size  # noqa: SLF001
