"""What a reader holds of a card's object table (spec/cachecard-1.md §7.2) while the card is open: the shard
indexes it checked (their digests), the table's CRC-32C per chunk of ``k`` and ``v``, and the shards whose
whole SHA-256 it checked (``verify``; every read in keyed mode, §7.4). An unbound (1.0-1.2) card has no table:
then only the structural checks apply."""

from __future__ import annotations

import numpy as np
import zarr
from zarr.abc.store import Store

from cachecard.card import objects, structure
from cachecard.card._zarr import get_bytes
from cachecard.errors import CorruptCardError
from cachecard.manifest import ObjectEntry


class Binding:
    def __init__(self, store: Store, label: str, table: dict[str, ObjectEntry] | None, *, keyed: bool) -> None:
        self._store = store
        self.label = label
        self.table = table
        self.keyed = keyed
        self.crcs: dict[str, np.ndarray] = {}  # the table's CRC-32C per (layer, token chunk) of k and v
        self._indexes: dict[str, np.ndarray] = {}  # checked shard indexes: (offset, nbytes) per chunk
        self._whole_checked: set[str] = set()  # shards whose SHA-256 was checked

    def bind(self, arrays: dict[str, zarr.Array], tokens: int) -> None:
        """The table lists exactly the card's objects (as its opened arrays say); keep the chunk CRCs."""
        table = self.table or {}
        structure.check_table_covers(table, structure.card_objects(arrays, tokens, len(table), self.label),
                                     self.label)
        for which in ("k", "v"):
            key = objects.shard_key(which)
            if key in table:
                arr = arrays[which]
                grid = (arr.shape[0], arr.shards[2] // arr.chunks[2])
                self.crcs[which] = objects.decode_crcs(table[key].chunk_crc32c or "", grid, self.label, key)

    def shard_index(self, name: str, arr: zarr.Array, key: str, size: int) -> np.ndarray:
        """The shard's checked index, read once per opened card; on a bound card the shard's size and index
        digest are the table's, and in keyed mode its whole SHA-256 too."""
        if key not in self._indexes:
            entry = None if self.table is None else self.table.get(key)
            if self.table is not None and entry is None:
                raise CorruptCardError(f"object {key!r} is not in the card's object table", card=self.label, part=name)
            if entry is not None:
                objects.check_size(self.label, key, entry, size, name)
            self._indexes[key] = structure.check_shard_index(
                self._store, arr, key, self.label, name, size=size,
                index_sha256=entry.index_sha256 if entry is not None else None)
            if self.keyed and entry is not None:
                self.check_whole_shard(key, entry, name)
        return self._indexes[key]

    def check_whole_shard(self, key: str, entry: ObjectEntry, name: str) -> None:
        """A shard's SHA-256, streamed in bounded requests, once per opened card."""
        if key in self._whole_checked:
            return
        if objects.object_sha256(self._store, key, entry.size) != entry.sha256:
            raise CorruptCardError(f"object {key!r} does not match its SHA-256 in the object table; the card is "
                                   "corrupt or was altered: delete it and save again", card=self.label, part=name)
        self._whole_checked.add(key)

    def verify(self) -> None:
        """Every object of the table: present, its size, its SHA-256."""
        table = self.table or {}
        keys = sorted(table)
        for key, size in zip(keys, structure.sizes(self._store, keys)):
            entry = table[key]
            if size is None:
                raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                       card=self.label, part=key)
            objects.check_size(self.label, key, entry, size)
            if entry.index_sha256 is not None:  # a shard: streamed
                self.check_whole_shard(key, entry, key.split("/")[0])
            else:
                objects.check_whole(self.label, key, entry, get_bytes(self._store, key) or b"")


__all__ = ["Binding"]
