"""The object table of format 1.3 (spec/cachecard-1.md §7.2, "Object table"): every object of a card bound to
its card, array and position.

The manifest lists each object (array documents, the K and V shards, the token and position chunks) with its
size and SHA-256, and for each shard the SHA-256 of its index and the CRC-32C of every inner chunk in chunk-grid
order. The manifest checksum covers the table, so an object copied from another card, another array (K<->V)
or another position cannot verify, while a partial read still reads only the chunks it needs:

- the writer records the table as objects are stored (:class:`Recorder`);
- readers read every object they need whole through :class:`GuardedStore`, which checks its size and SHA-256
  (and, on an unbound card, refuses to read more than :data:`MAX_WHOLE_BYTES` of a metadata document);
- the shard readers check each shard index against ``index_sha256`` and each inner chunk's stored CRC-32C
  against the table's value for its (layer, token chunk) (card/shard_read.py, reader.py);
- ``verify`` and keyed reads check the SHA-256 of whole shards, streamed (:func:`object_sha256`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, AsyncGenerator, Iterable

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.storage import WrapperStore

from cachecard.card import _zarr
from cachecard.card._zarr import Buffer, BufferPrototype
from cachecard.card.zipcheck import MAX_DOCUMENT_BYTES
from cachecard.errors import CorruptCardError, ManifestError
from cachecard.manifest import ObjectEntry

SHARD_CHUNK_KEY = "c/0/0/0/0"  # the single shard of k and v (format 1.1+)
MAX_WHOLE_BYTES = MAX_DOCUMENT_BYTES  # a document read whole without a table entry (a 1.0-1.2 card)
_STREAM = 8 << 20  # bytes per request when hashing a whole shard


def shard_key(which: str) -> str:
    return f"{which}/{SHARD_CHUNK_KEY}"


def shard_digests(raw: bytes | memoryview, n: int) -> tuple[str, np.ndarray]:
    """SHA-256 (hex) of a shard's index and the stored CRC-32C of each of its ``n`` inner chunks, in index
    (C grid) order, read from the shard's own bytes (0 for an entry that points outside them)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    index_bytes = data[len(data) - (16 * n + 4):]
    entries = index_bytes[:-4].view("<u8").reshape(n, 2)
    data_end = len(data) - len(index_bytes)
    ok = (entries[:, 1] >= 4) & (entries[:, 0] <= data_end) & (entries[:, 1] <= data_end - np.minimum(
        entries[:, 0], data_end))
    ends = np.where(ok, entries[:, 0] + entries[:, 1], 4).astype(np.int64)
    picks = ends[:, None] - 4 + np.arange(4)
    crcs = np.ascontiguousarray(data[picks]).view("<u4").reshape(n)
    return hashlib.sha256(index_bytes).hexdigest(), np.where(ok, crcs, 0).astype(np.uint32)


def encode_crcs(crcs: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(crcs, dtype="<u4").tobytes()).decode("ascii")


def decode_crcs(text: str, shape: tuple[int, int], label: str, key: str) -> np.ndarray:
    """The table's ``chunk_crc32c`` of shard ``key`` as a uint32 array of the shard's chunk grid ``shape``."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ManifestError(f"objects[{key!r}].chunk_crc32c is not base64 ({e})", card=label, part="manifest") from e
    want = 4 * shape[0] * shape[1]
    if len(raw) != want:
        raise ManifestError(f"objects[{key!r}].chunk_crc32c holds {len(raw)} bytes; the shard's chunk grid "
                            f"{shape} needs {want}", card=label, part="manifest")
    crcs = np.frombuffer(raw, dtype="<u4").astype(np.uint32).reshape(shape)
    crcs.flags.writeable = False
    return crcs


def table_entries(recorded: dict[str, tuple[int, str]], shards: dict[str, tuple[str, np.ndarray]]
                  ) -> dict[str, ObjectEntry]:
    """The object table from the writer's records: ``(size, sha256)`` per object, and per shard
    ``(index_sha256, crcs)``."""
    table = {}
    for key in sorted(recorded):
        size, digest = recorded[key]
        extra = {}
        if key in shards:
            index_sha, crcs = shards[key]
            extra = {"index_sha256": index_sha, "chunk_crc32c": encode_crcs(crcs)}
        table[key] = ObjectEntry(size=size, sha256=digest, **extra)
    return table


class Recorder(WrapperStore[Store]):
    """Passes writes through and records each object's size and SHA-256 (and, for the shards announced with
    :meth:`expect_shard`, the index digest and chunk CRCs) for the object table."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.recorded: dict[str, tuple[int, str]] = {}
        self.shards: dict[str, tuple[str, np.ndarray]] = {}
        self._shard_chunks: dict[str, int] = {}

    def _with_store(self, store: Store) -> Recorder:  # zarr re-wraps stores; the copy records into this one
        other = type(self)(store)
        other.recorded, other.shards, other._shard_chunks = self.recorded, self.shards, self._shard_chunks
        return other

    def expect_shard(self, key: str, n_chunks: int) -> None:
        self._shard_chunks[key] = n_chunks

    def _record(self, key: str, value: Buffer) -> None:
        if "/" not in key:
            return  # the root document carries the manifest: it is not in the table
        raw = value.as_numpy_array().view(np.uint8).reshape(-1)
        self.recorded[key] = (len(raw), hashlib.sha256(raw).hexdigest())
        if key in self._shard_chunks:
            self.shards[key] = shard_digests(raw, self._shard_chunks[key])

    async def set(self, key: str, value: Buffer) -> None:
        self._record(key, value)
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        self._record(key, value)
        await self._store.set_if_not_exists(key, value)


class GuardedStore(WrapperStore[Store]):
    """The read side: every object read whole is read with a bounded ranged request and, on a bound (1.3)
    card, checked against its table entry (size and SHA-256) before anyone uses it; a bound card's readers
    may read no object outside its table."""

    def __init__(self, store: Store, label: str, table: dict[str, ObjectEntry] | None) -> None:
        super().__init__(store)
        self.label = label
        self.table = table

    def _with_store(self, store: Store) -> GuardedStore:  # zarr re-wraps stores (e.g. read-only views)
        return type(self)(store, self.label, self.table)

    def _entry(self, key: str) -> ObjectEntry | None:
        if self.table is None:
            return None
        entry = self.table.get(key)
        if entry is None:
            raise CorruptCardError(f"object {key!r} is not in the card's object table; a format 1.3 card has no "
                                   "other objects: it is damaged or was assembled from parts", card=self.label,
                                   part=key)
        return entry

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        entry = self._entry(key)
        if byte_range is not None or (entry is None and not key.endswith("zarr.json")):
            # ranges are bounded by their callers; an unbound card's chunks by the structural size checks
            return await self._store.get(key, prototype, byte_range)
        limit = entry.size if entry is not None else MAX_WHOLE_BYTES
        buf = await self._store.get(key, prototype, RangeByteRequest(0, limit + 1))
        if buf is None:
            return None
        if entry is None:
            if len(buf) > limit:
                raise ManifestError(f"document {key!r} holds more than {limit} bytes, more than any card's metadata; "
                                    "refusing an implausible card", card=self.label, part=key)
            return buf
        check_whole(self.label, key, entry, buf.as_numpy_array().view(np.uint8).reshape(-1))
        return buf

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, br) for key, br in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, proto, br in requests:
            yield key, await self.get(key, proto, br)


def check_size(label: str, key: str, entry: ObjectEntry, size: int, part: str | None = None) -> None:
    """An object's stored size against its table entry."""
    if size != entry.size:
        what = "truncated" if size < entry.size else "longer than written"
        raise CorruptCardError(f"object {key!r} is {what}: it holds {size} bytes, the object table says {entry.size}; "
                               "the card is damaged: delete it and save again", card=label, part=part or key)


def check_whole(label: str, key: str, entry: ObjectEntry, raw: Any) -> None:
    """An object's bytes against its table entry."""
    check_size(label, key, entry, len(raw))
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise CorruptCardError(f"object {key!r} does not match its SHA-256 in the object table: corrupt, or copied "
                               "from another card, array or position; delete the card and save again",
                               card=label, part=key)


def object_sha256(store: Store, key: str, size: int) -> str | None:
    """SHA-256 (hex) of the first ``size`` bytes of an object, streamed in bounded requests; ``None`` when the
    object is missing or shorter."""
    h = hashlib.sha256()
    for start in range(0, size, _STREAM):
        end = min(size, start + _STREAM)
        part = _zarr.get_bytes(store, key, RangeByteRequest(start, end))
        if part is None or len(part) != end - start:
            return None
        h.update(part)
    return h.hexdigest()


__all__ = ["GuardedStore", "MAX_WHOLE_BYTES", "Recorder", "check_size", "check_whole", "decode_crcs", "encode_crcs",
           "object_sha256", "shard_digests", "shard_key", "table_entries"]
