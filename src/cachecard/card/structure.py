"""Checks on stored objects that need no decoding (spec/cachecard-1.md §5.4, §7, §9): object sizes, shard
indexes, the object table against the objects a card's arrays consist of, and the read limits."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec

from cachecard.card._zarr import SuffixByteRequest, get_bytes, sync
from cachecard.card.objects import shard_key
from cachecard.errors import CorruptCardError, ManifestError
from cachecard.manifest import ObjectEntry

MAX_OBJECTS_PER_READ = 1 << 20  # more objects (or inner chunks) than this for one read means a hostile chunk grid
_EMPTY = np.uint64(2**64 - 1)


def physical_memory() -> int:
    """Bytes of RAM of this machine: the default limit of one read's decoded size."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def sizes(store: Store, keys: list[str]) -> list[int | None]:
    """Stored size of each object, None where missing. A stat, never a read of the object."""

    async def one(key: str) -> int | None:
        try:
            return await store.getsize(key)
        except (FileNotFoundError, KeyError):
            return None

    async def all_() -> list[int | None]:
        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(all_())


def check_plain_sizes(arr: zarr.Array, keys: list[str], got: list[int | None], label: str, name: str) -> None:
    """Unsharded ``bytes + crc32c`` chunks (token ids, positions, format 1.0 KV) have one exact size: anything
    else is damage, and is refused before a tiny object can declare a huge chunk."""
    codecs = arr.metadata.codecs
    if arr.shards is not None or len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) \
            or not isinstance(codecs[1], Crc32cCodec):
        return
    want = math.prod(arr.chunks) * arr.dtype.itemsize + 4
    for key, size in zip(keys, got):
        if size != want:
            raise CorruptCardError(f"object {key!r} holds {size} bytes; a chunk of {name!r} is {want}: the card is "
                                   "damaged, delete it and save again", card=label, part=name)


def check_shard_index(store: Store, arr: zarr.Array, key: str, label: str, name: str, *,
                      size: int | None = None, index_sha256: str | None = None) -> np.ndarray:
    """Every inner chunk of a shard must be stored (spec §5.4): zarr would read an empty entry as zeros. On a
    format 1.3 card the index must also be the one the object table names (``index_sha256``).

    One small suffix read per shard, once per opened card; zarr reads the same bytes again to decode."""
    per_shard = math.prod(s // c for s, c in zip(arr.shards, arr.chunks))
    index_bytes = per_shard * 16 + 4
    if size is not None and index_bytes > size:
        raise CorruptCardError(f"object {key!r} holds {size} bytes, too few for the index of its {per_shard} inner "
                               "chunks; delete the card and save it again", card=label, part=name)
    raw = get_bytes(store, key, SuffixByteRequest(index_bytes)) or b""
    if len(raw) != index_bytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptCardError(f"the shard index of object {key!r} is missing, truncated or fails its "
                               "crc32c; delete the card and save it again", card=label, part=name)
    if index_sha256 is not None and hashlib.sha256(raw).hexdigest() != index_sha256:
        raise CorruptCardError(f"the shard index of object {key!r} is not the one in the object table (a shard from "
                               "another card, array or position); delete the card and save it again",
                               card=label, part=name)
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    empty = int(np.sum((index[:, 0] == _EMPTY) | (index[:, 1] == _EMPTY)))
    if empty:
        raise CorruptCardError(f"object {key!r} lacks {empty} inner chunks (a writer must store every chunk); "
                               "delete the card and save it again", card=label, part=name)
    return index


def card_objects(arrays: dict[str, zarr.Array], tokens: int, table_size: int, label: str) -> set[str]:
    """The keys of every object a format 1.1+ card with these opened arrays consists of (but the root)."""
    keys = set()
    for name, arr in arrays.items():
        keys.add(f"{name}/zarr.json")
        if name in ("k", "v"):
            if tokens:
                keys.add(shard_key(name))
            continue
        n = math.ceil(tokens / arr.chunks[0]) if tokens else 0
        if n > table_size:
            raise ManifestError(f"{name!r} is stored in {n} chunks, more than the {table_size} objects the object table "
                                "lists; refusing an implausible card", card=label, part="manifest")
        keys.update(f"{name}/{arr.metadata.encode_chunk_key((i,))}" for i in range(n))
    return keys


def check_table_covers(table: dict[str, ObjectEntry], wanted: set[str], label: str) -> None:
    """The object table lists exactly the card's objects."""
    missing, extra = sorted(wanted - set(table)), sorted(set(table) - wanted)
    if missing or extra:
        raise ManifestError(f"the object table does not list exactly the card's objects (lacks {missing[:5]}, "
                            f"lists unknown {extra[:5]})", card=label, part="manifest")


__all__ = ["MAX_OBJECTS_PER_READ", "card_objects", "check_plain_sizes", "check_shard_index", "check_table_covers",
           "physical_memory", "sizes"]
