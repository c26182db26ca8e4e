"""Reading and verifying a card (spec/cachecard-1.md §4–10).

Opening a card reads only metadata and the token ids, and checks: a committed manifest, its checksum (and,
with a store key, its HMAC), the format version (older minors are migrated, newer versions refused), the
manifest schema, that the arrays match the manifest, and that the token ids match their digest. On a format
1.3 card every object read whole (array documents, token and position chunks) must match its size and SHA-256
in the manifest's object table, and the table must list exactly the card's objects.

Reading KV touches only the chunks a layer range and token range need. Every stored chunk carries a crc32c,
checked on every read; on a 1.3 card it must also be the table's CRC-32C for that (array, layer, token chunk),
and each shard index must match the table's digest, so an object from another card, array or position cannot
pass. A missing object is an error (zarr alone would return zeros for it). ``verify`` checks every byte; in
keyed mode reads also check the whole SHA-256 of each shard they touch, once per opened card.

``Card.read_encoded`` returns K or V chunks as stored, undecoded: each inner chunk's serializer payload
(its crc32c verified, then stripped) with the chunk's layer and token span, and the serializer that
decodes it. A runtime whose cache holds a codec's bytes as they are (mlx-lm's ``QuantizedKVCache`` and
``cachecard.mlx_affine``) restores from these without a dequantize/requantize round. It reads format 1.1+
cards whose chunk pipeline is ``serializer + crc32c``; anything else is an :class:`UnsupportedCodecError`
(use ``read``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import zarr
from zarr.abc.store import Store

from cachecard.errors import (
    CacheCardError, CorruptCardError, ManifestError, ReadLimitError, UnsupportedCodecError,
)
from cachecard.kv import NUMPY_DTYPES, CanonicalKV
from cachecard.card import keyed, layout, objects, shard_read, structure
from cachecard.card.binding import Binding
from cachecard.card.records import EncodedChunk, EncodedKV, ShardLayout, VerifyReport  # noqa: F401 - re-exported
from cachecard.card.locations import ROOT_KEY, Location, describe, readable, stored_objects
from cachecard.card.root import MIGRATIONS, parse_manifest, read_root  # noqa: F401 - MIGRATIONS re-exported
from cachecard.manifest import CardManifest, token_digest

MAX_OBJECTS_PER_READ = structure.MAX_OBJECTS_PER_READ


class Card:
    """An opened, validated card. Create with :func:`open_card`."""

    def __init__(self, store: Store, label: str, manifest: CardManifest, *, max_expansion: float | None = None,
                 max_read_bytes: int | None = None, key: bytes | None = None) -> None:
        self._store = store  # shard reads: the fast paths need the store's own type (local files)
        self._guarded = objects.GuardedStore(store, label, manifest.objects)  # zarr reads objects through this
        self.label = label
        self.manifest = manifest
        self._max_expansion = max_expansion
        self._max_read_bytes = max_read_bytes if max_read_bytes is not None else structure.physical_memory()
        self._key = key
        self._minor = manifest.format_minor
        self._arrays: dict[str, zarr.Array] = {}
        self._binding = Binding(store, label, manifest.objects, keyed=key is not None)
        self.fast = True  # decode 1.1 shards with the fast path (card/shard_read.py); False: through zarr
        for which in ("k", "v"):  # array metadata must agree with the manifest before anything is decoded
            self._all_kv_arrays(which)
        count = manifest.tokens.count
        id_arrays = ["tokens"] + (["positions"] if manifest.positions == "explicit" else [])
        for name in id_arrays:
            self._array(name, (count,), np.dtype("<i4"))
        if self.bound:
            self._binding.bind(self._arrays, count)
        self._ids = self._read_ids("tokens")
        if token_digest(self._ids) != manifest.tokens.sha256:
            raise CorruptCardError("token ids do not match the digest in the manifest; the card is corrupt",
                                   card=label, part="tokens")
        self._positions = self._read_ids("positions") if manifest.positions == "explicit" else None
        if self._positions is not None and np.any(np.diff(self._positions) <= 0):
            raise CorruptCardError("explicit positions are not strictly increasing", card=label, part="positions")

    # -- public -------------------------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return f"{self.manifest.cachecard_format}.{self._minor}"

    @property
    def bound(self) -> bool:
        """Whether the card's objects are bound to it by an object table (format 1.3+); older cards are
        "unbound": an object copied from another card of the same shape can pass their checks."""
        return self.manifest.objects is not None

    @property
    def authenticated(self) -> bool:
        """Whether the card's HMAC was verified under a store key when it was opened (spec §7.4)."""
        return self._key is not None

    def expected_crcs(self, which: str) -> np.ndarray | None:
        """The object table's CRC-32C (uint32) of every inner chunk of ``k`` or ``v``, shape (num_layers,
        token_chunks), as each chunk stores it (over the bytes before its crc32c); ``None`` for an unbound
        (format 1.0–1.2) card. A reader that checks chunks itself (on a device, say) compares against these."""
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v'; got {which!r}")
        if not self.bound:
            return None
        if which in self._binding.crcs:
            return self._binding.crcs[which].copy()
        return np.zeros((self.manifest.model.num_layers, 0), dtype=np.uint32)  # an empty card has no chunks

    def shard_index(self, which: str) -> np.ndarray:
        """The checked index of the shard of ``k`` or ``v`` (format 1.1+): ``(offset, nbytes)`` per inner chunk in
        C order of (layer, token chunk), every entry stored, its CRC and (on a bound card) its digest checked;
        read once per opened card. For readers that fetch chunks themselves (the chunk's CRC-32C must then be
        checked against :meth:`expected_crcs`)."""
        if which not in ("k", "v") or self._minor == 0:
            raise ValueError(f"shard_index needs 'k' or 'v' of a format 1.1+ card; got {which!r} (format {self.format})")
        return self._shard(which)[2]

    def shard_layout(self, which: str) -> ShardLayout:
        """Where K (``which="k"``) or V lies on storage, for readers that stream it their own way
        (``cachecard.card.stream``): the shard object, its checked index and how its chunks decode.

        Raises :class:`UnsupportedCodecError` for layouts ``read_encoded`` refuses too (use ``read``)."""
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v'; got {which!r}")
        arr = None if self._minor == 0 else self._stacked(which)
        serializer = None if arr is None else shard_read.encoded_serializer(arr)
        if serializer is None:
            raise UnsupportedCodecError(
                f"this card's {which!r} array (format {self.format}, preset {getattr(self.manifest.codecs, which)!r})"
                " is not stored as serializer + crc32c chunks: use read()", card=self.label, part=which)
        key, size, index = self._shard(which)
        return ShardLayout(which=which, label=self.label, store=self._store, key=key, size=size, index=index,
                           chunk_shape=tuple(arr.chunks), shape=tuple(arr.shape), serializer=serializer,
                           storage=self._kv_dtype(), expected_crcs=self.expected_crcs(which))

    def _shard(self, which: str) -> tuple[str, int, np.ndarray]:
        """Key, stored size and checked index of the shard of ``k`` or ``v``."""
        arr, key = self._stacked(which), objects.shard_key(which)
        (size,) = structure.sizes(self._store, [key])
        if size is None:
            raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                   card=self.label, part=which)
        return key, size, self._binding.shard_index(which, arr, key, size)

    @property
    def _indexed_shards(self) -> dict[str, np.ndarray]:  # the 1.2 reader's name, for callers that used it
        return self._binding._indexes  # noqa: SLF001

    def token_ids(self) -> np.ndarray:
        """The token ids (int32) the KV was computed from."""
        return self._ids.copy()

    def positions(self) -> np.ndarray:
        """The position of every stored token (contiguous from ``start_position`` unless explicit)."""
        if self._positions is not None:
            return self._positions.copy()
        start = self.manifest.start_position
        return np.arange(start, start + self.manifest.tokens.count, dtype=np.int32)

    def next_position(self) -> int:
        """The RoPE position of the token that continues this card's sequence (after pruning, the source
        sequence's length, not the last kept position + 1)."""
        m = self.manifest
        if m.pruning is not None:
            return m.pruning.source_tokens
        if self._positions is not None and len(self._positions):
            return int(self._positions[-1]) + 1
        return m.start_position + m.tokens.count

    def read(self, layers: range | slice | int | None = None, tokens: slice | int | None = None, *,
             out: tuple[np.ndarray, np.ndarray] | None = None) -> CanonicalKV:
        """Decode K and V for a contiguous layer range and token range (``tokens=n`` means the first n).

        Only the chunks that intersect the request are read. ``out``: K and V arrays of shape (layers, heads,
        tokens, head_dim) whose element size is the card's KV dtype's (views into a runtime's preallocated
        cache, say; each (layer, head) row contiguous) to decode into, instead of new arrays.
        """
        lr = layout.as_range(layers, self.manifest.model.num_layers, "layers")
        tr = layout.as_range(slice(0, tokens) if isinstance(tokens, int) else tokens, self.manifest.tokens.count, "tokens")
        outs = (None, None) if out is None else self._out_views(out, len(lr), len(tr))
        k = self._read_kv("k", lr, tr, outs[0])
        v = self._read_kv("v", lr, tr, outs[1])
        dt = NUMPY_DTYPES[self.manifest.model.kv_dtype]
        return CanonicalKV(k.view(dt), v.view(dt))

    def read_encoded(self, which: str, layers: range | slice | int | None = None,
                     tokens: slice | int | None = None, *,
                     alloc: Callable[[int], np.ndarray] | None = None) -> EncodedKV:
        """The stored chunks of K (``which="k"``) or V that a layer range × token range touches, undecoded:
        each chunk's crc32c is verified as :meth:`read` does (on a format 1.3 card, also against the object
        table), then stripped.

        The payloads are read by parallel workers (on local stores) into one buffer, back to back in (layer,
        token) order; ``alloc`` (total bytes -> a uint8 array, e.g. pinned memory for a device copy) provides it.

        Raises :class:`UnsupportedCodecError` when the card's chunks are not ``serializer + crc32c``
        (compressed chunks, or a format 1.0 card): read those with :meth:`read`.
        """
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v'; got {which!r}")
        lr = layout.as_range(layers, self.manifest.model.num_layers, "layers")
        tr = layout.as_range(slice(0, tokens) if isinstance(tokens, int) else tokens, self.manifest.tokens.count, "tokens")
        unsupported = UnsupportedCodecError(
            f"read_encoded needs format 1.1+ chunks stored as serializer + crc32c; this card's {which!r} array "
            f"(format {self.format}, preset {getattr(self.manifest.codecs, which)!r}) is not: use read()",
            card=self.label, part=which)
        arr = None if self._minor == 0 else self._stacked(which)
        serializer = None if arr is None else shard_read.encoded_serializer(arr)
        if serializer is None:
            raise unsupported
        chunk_shape = tuple(arr.chunks)
        if not len(lr) or not len(tr):
            return EncodedKV(serializer, chunk_shape, [])  # type: ignore[arg-type]
        key, size, index = self._shard(which)
        buffer: list[np.ndarray] = []

        def keep(n: int) -> np.ndarray:  # one call: every payload goes into this buffer
            buffer.append((alloc or _uint8_buffer)(n))
            return buffer[0]

        places = shard_read.read_payloads_into(self._store, arr, key, size, index, lr, tr, self.label, which, keep,
                                               expected=self._binding.crcs.get(which))
        c, count = chunk_shape[2], self.manifest.tokens.count
        chunks = [EncodedChunk(layer, j * c, min(c, count - j * c), buffer[0][at:at + nb])
                  for layer, j, at, nb in places]
        return EncodedKV(serializer, chunk_shape, chunks, buffer[0])  # type: ignore[arg-type]

    def objects(self) -> dict[str, int]:
        """Every stored object of the card and its size in bytes."""
        return stored_objects(self._store)

    def verify(self) -> VerifyReport:
        """Check every byte of the card: every chunk, decoded one layer at a time (errors name the chunk), then
        on a format 1.3 card every object's size and SHA-256 against the object table; raise on the first
        problem."""
        m = self.manifest.model
        chunks = 0
        for layer in range(m.num_layers):
            self.read(layers=layer)
        if self.bound:
            self._binding.verify()
        for which in ("k", "v"):
            for arr in self._all_kv_arrays(which):
                chunks += math.prod(math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks) if s) if arr.size else 0
        objs = self.objects()
        unlisted = tuple(sorted(set(objs) - set(self.manifest.objects) - {ROOT_KEY})) if self.bound else ()
        return VerifyReport(self.manifest.card_id, self.format, self.manifest.tokens.count, len(objs),
                            sum(objs.values()), chunks, self.bound, self.authenticated, unlisted)

    # -- layouts ------------------------------------------------------------------------------------------
    def _array(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> zarr.Array:
        if path not in self._arrays:
            try:
                arr = zarr.open_array(self._guarded, path=path, mode="r", zarr_format=3)
            except CacheCardError:
                raise  # e.g. a codec configuration this version cannot decode, or a document off the table
            except zarr.errors.UnknownCodecError as e:
                raise UnsupportedCodecError(f"array {path!r} needs a codec this installation lacks ({e}); "
                                            "install the cachecard version or plugin that provides it",
                                            card=self.label) from e
            except Exception as e:  # noqa: BLE001 - any failure to open is a damaged card
                raise CorruptCardError(f"array {path!r} is missing or unreadable ({type(e).__name__}: {e}); "
                                       "the card is damaged: delete it and save again", card=self.label) from e
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise CorruptCardError(f"array {path!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}, but "
                                       f"the manifest implies {shape} and {dtype}", card=self.label)
            self._arrays[path] = arr
        return self._arrays[path]

    def _kv_dtype(self) -> np.dtype:
        return layout.STORAGE_DTYPES[self.manifest.model.kv_dtype]

    def _all_kv_arrays(self, which: str) -> list[zarr.Array]:
        m = self.manifest.model
        if self._minor == 0:
            return [self._legacy_layer(which, i) for i in range(m.num_layers)]
        return [self._stacked(which)]

    def _stacked(self, which: str) -> zarr.Array:
        m = self.manifest.model
        shape = layout.kv_shape(m.num_layers, m.num_kv_heads, self.manifest.tokens.count, m.head_dim)
        return self._array(which, shape, self._kv_dtype())

    def _legacy_layer(self, which: str, layer: int) -> zarr.Array:
        m = self.manifest.model
        shape = (m.num_kv_heads, self.manifest.tokens.count, m.head_dim)
        return self._array(layout.legacy_layer_path(which, layer), shape, self._kv_dtype())

    def _out_views(self, out: tuple[np.ndarray, np.ndarray], layers: int, tokens: int) -> tuple[np.ndarray, ...]:
        m = self.manifest.model
        want = (layers, m.num_kv_heads, tokens, m.head_dim)
        storage = self._kv_dtype()
        rows = (m.head_dim * storage.itemsize, storage.itemsize)
        if any(a.shape != want or a.dtype.itemsize != storage.itemsize or a.strides[-2:] != rows for a in out):
            raise ValueError(f"out arrays must have shape {want}, {storage.itemsize}-byte elements and contiguous "
                             f"rows; got {[(a.shape, a.dtype, a.strides) for a in out]}")
        return tuple(a.view(storage) for a in out)

    def _read_kv(self, which: str, lr: range, tr: range, out: np.ndarray | None = None) -> np.ndarray:
        tok = slice(tr.start, tr.stop)
        if self._minor == 0:  # format 1.0: one array per layer
            m = self.manifest.model
            parts = [self._read_region(which, self._legacy_layer(which, i), (slice(None), tok, slice(None)))
                     for i in lr]
            empty = np.empty((0, m.num_kv_heads, len(tr), m.head_dim), self._kv_dtype())
            got = np.stack(parts) if parts else empty
            if out is None:
                return got
            out[...] = got
            return out
        arr = self._stacked(which)
        return self._read_region(which, arr, (slice(lr.start, lr.stop), slice(None), tok, slice(None)), out)

    def _read_ids(self, name: str) -> np.ndarray:
        arr = self._array(name, (self.manifest.tokens.count,), np.dtype("<i4"))
        return self._read_region(name, arr, (slice(None),))

    # -- the one place chunk data is read ---------------------------------------------------------------
    def _read_region(self, name: str, arr: zarr.Array, region: tuple[slice, ...],
                     out: np.ndarray | None = None) -> np.ndarray:
        bounds = [s.indices(n)[:2] for s, n in zip(region, arr.shape)]
        grid = arr.shards or arr.chunks
        n_objects = math.prod(max(0, (b - 1) // g - a // g + 1) for (a, b), g in zip(bounds, grid))
        if n_objects > MAX_OBJECTS_PER_READ:
            raise ManifestError(f"{name!r} declares {n_objects} objects for one read; refusing an implausible "
                                "chunk grid (a hostile or damaged card)", card=self.label)
        decoded = math.prod(b - a for a, b in bounds) * arr.dtype.itemsize
        if decoded > self._max_read_bytes:
            raise ReadLimitError(f"reading {name!r} here would decode {decoded} bytes, more than this reader's limit "
                                 f"of {self._max_read_bytes} (max_read_bytes); read a layer or token range at a time",
                                 card=self.label, part=name)
        keys = [f"{arr.path}/{arr.metadata.encode_chunk_key(c)}" for c in layout.grid_cells(bounds, grid)]
        sizes = structure.sizes(self._store, keys)
        for key, size in zip(keys, sizes):
            if size is None:
                raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                       card=self.label, part=name)
        stored = sum(s for s in sizes if s is not None)
        if self._max_expansion is not None and decoded > self._max_expansion * stored + (1 << 20):
            raise ManifestError(f"declares {decoded} decoded bytes for {stored} stored bytes of {name!r}; "
                                "refusing an implausible shape (max_expansion)", card=self.label)
        if arr.shards is None:
            structure.check_plain_sizes(arr, keys, sizes, self.label, name)
            return self._zarr_read(name, arr, region, bounds)
        indexes = [self._binding.shard_index(name, arr, key, size)  # type: ignore[arg-type]
                   for key, size in zip(keys, sizes)]
        expected = self._binding.crcs.get(name)
        if self.fast and len(keys) == 1:
            fast = shard_read.read_shard_region(self._store, arr, keys[0], sizes[0], indexes[0], bounds, self.label,
                                                name, out, expected=expected)
            if fast is not None:
                return fast
        got = self._zarr_read(name, arr, region, bounds)
        if expected is not None and len(keys) == 1 and got.size:
            (l0, l1), _, (t0, t1), _ = bounds
            shard_read.check_stored_crcs(self._store, arr, keys[0], sizes[0], indexes[0], range(l0, l1),
                                         range(t0, t1), expected, self.label, name)
        if out is not None:
            out[...] = got
            return out
        return got

    def _zarr_read(self, name: str, arr: zarr.Array, region: tuple[slice, ...],
                   bounds: list[tuple[int, int]]) -> np.ndarray:
        try:
            return np.asarray(arr[region])
        except CacheCardError:
            raise
        except Exception as e:  # noqa: BLE001 - decode failures are located below and reported precisely
            raise self._locate_corruption(name, arr, bounds) from e

    def _locate_corruption(self, name: str, arr: zarr.Array, bounds: list[tuple[int, int]]) -> CacheCardError:
        dims = arr.metadata.dimension_names or tuple(f"dim{i}" for i in range(arr.ndim))
        for cell in layout.grid_cells(bounds, arr.chunks):
            sel = tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(cell, arr.chunks, arr.shape))
            try:
                arr[sel]
            except Exception as e:  # noqa: BLE001
                where = ", ".join(f"{d} {s.start}" + (f"-{s.stop - 1}" if s.stop - s.start > 1 else "")
                                  for d, s in zip(dims, sel) if d is not None)
                grid = arr.shards or arr.chunks
                obj = f"{arr.path}/{arr.metadata.encode_chunk_key(tuple(s.start // g for s, g in zip(sel, grid)))}"
                return CorruptCardError(f"chunk ({where}) in object {obj!r} is corrupt or truncated ({e}); "
                                        "delete the card and save it again, or restore it from a replica",
                                        card=self.label, part=name)
        return CorruptCardError("a chunk failed to decode; the card is damaged: delete it and save again",
                                card=self.label, part=name)


def _uint8_buffer(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.uint8)


def open_card(location: Location, *, storage_options: dict[str, Any] | None = None,
              max_expansion: float | None = None, max_read_bytes: int | None = None,
              key: keyed.StoreKey = None) -> Card:
    """Open and validate the card at ``location`` (reads metadata and token ids, no KV chunks).

    Parameters
    ----------
    max_read_bytes
        Largest decoded size of one read (default: this machine's physical memory); a bigger read raises
        :class:`ReadLimitError` before anything is allocated.
    max_expansion
        Optional: refuse reads whose decoded size exceeds this many times the stored bytes they touch (+1 MiB).
        Off by default: compressed codecs (zstd, entropy coding) legitimately exceed any fixed ratio.
    key
        Store key for keyed tamper evidence (spec §7.4); default ``$CACHECARD_KEY`` if set. With a key, a card
        whose HMAC is missing or wrong is refused (:class:`TamperedCardError`), and reads check the SHA-256 of
        each whole shard they touch.
    """
    label = describe(location)
    store_key = keyed.resolve_key(key)
    store = readable(location, storage_options=storage_options)
    manifest = parse_manifest(read_root(store, label), label, store_key)
    return Card(store, label, manifest, max_expansion=max_expansion, max_read_bytes=max_read_bytes, key=store_key)


def read_card(location: Location, *, layers: range | slice | int | None = None,
              tokens: slice | int | None = None, **kwargs: Any) -> CanonicalKV:
    """Open a card and decode its KV (or a layer range / token range of it)."""
    return open_card(location, **kwargs).read(layers=layers, tokens=tokens)


def verify_card(location: Location, **kwargs: Any) -> VerifyReport:
    """Open a card and check every byte of it."""
    return open_card(location, **kwargs).verify()


# -- helpers ------------------------------------------------------------------------------------------------
def _check_shard_index(store: Store, arr: zarr.Array, key: str, label: str, name: str, *,
                       index_sha256: str | None = None) -> np.ndarray:
    """Kept for callers of the 1.1 reader: :func:`structure.check_shard_index`."""
    return structure.check_shard_index(store, arr, key, label, name, index_sha256=index_sha256)
