"""Reading and verifying a card (spec/cachecard-1.md §4–9).

Opening a card reads only metadata and the token ids, and checks: a committed manifest, its checksum, the
format version (older minors are migrated, newer versions refused), the manifest schema, that the arrays
match the manifest, and that the token ids match their digest. Reading KV touches only the chunks a layer
range and token range need; every stored chunk carries a crc32c, and a missing object is an error (zarr
alone would return zeros for it).

``Card.read_encoded`` returns K or V chunks as stored, undecoded: each inner chunk's serializer payload
(its crc32c verified, then stripped) with the chunk's layer and token span, and the serializer that
decodes it. A runtime whose cache holds a codec's bytes as they are (mlx-lm's ``QuantizedKVCache`` and
``cachecard.mlx_affine``) restores from these without a dequantize/requantize round. It reads format 1.1+
cards whose chunk pipeline is ``serializer + crc32c``; anything else is an :class:`UnsupportedCodecError`
(use ``read``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import google_crc32c
import numpy as np
import pydantic
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore, ZipStore

from cachecard.errors import (
    CacheCardError, CardNotFoundError, CorruptCardError, FormatVersionError, IncompleteCardError, ManifestError,
    NotACardError, UnsupportedCodecError,
)
from cachecard.kv import NUMPY_DTYPES, CanonicalKV
from cachecard.card import layout
from cachecard.card._zarr import SuffixByteRequest, get_bytes, sync, zip_member_size
from cachecard.card import shard_read
from cachecard.card.locations import ROOT_KEY, Location, describe, describe_folder, readable, stored_objects
from cachecard.card.writer import DIGEST_ATTR, MANIFEST_ATTR
from cachecard.manifest import FORMAT_MAJOR, FORMAT_MINOR, CardManifest, manifest_digest, token_digest

DEFAULT_MAX_EXPANSION = 32  # decoded bytes per stored byte above which a declared shape is implausible
MAX_OBJECTS_PER_READ = 1 << 20  # more objects than this for one read means a hostile chunk grid
_EMPTY = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class VerifyReport:
    card_id: str
    format: str
    tokens: int
    objects: int
    stored_bytes: int
    chunks_checked: int


@dataclass(frozen=True)
class EncodedChunk:
    """One stored inner chunk of K or V: layer, tokens ``[token_start, token_start + tokens)`` (the chunk
    holds ``chunk_tokens`` rows; rows past ``tokens`` are the writer's padding) and the serializer payload."""

    layer: int
    token_start: int
    tokens: int
    payload: np.ndarray  # uint8, crc32c verified and stripped


@dataclass(frozen=True)
class EncodedKV:
    """Undecoded chunks of one card array (``k`` or ``v``), in (layer, token) order."""

    codec: Any                          # the zarr array-to-bytes codec (serializer) of every chunk
    chunk_shape: tuple[int, int, int, int]  # (1, kv_heads, chunk_tokens, head_dim)
    chunks: list[EncodedChunk]
    buffer: np.ndarray | None = None    # every payload, back to back, in order (None when nothing was read)


@dataclass(frozen=True)
class ShardLayout:
    """K or V of a format 1.1+ card as stored: one shard object whose inner chunks are ``payload + crc32c``.

    ``index`` holds ``(offset, nbytes)`` per inner chunk in grid order (layer-major, then token chunk), already
    checked against the shard index's own crc32c; ``expected_crcs`` (layers, token chunks), where the card's
    manifest binds every chunk's crc32c (format 1.3), else ``None``."""

    which: str
    label: str
    store: Store
    key: str
    size: int
    index: np.ndarray
    chunk_shape: tuple[int, ...]    # (1, kv_heads, chunk_tokens, head_dim)
    shape: tuple[int, ...]          # (layers, kv_heads, tokens, head_dim)
    serializer: Any
    storage: np.dtype
    expected_crcs: np.ndarray | None = None


class Card:
    """An opened, validated card. Create with :func:`open_card`."""

    def __init__(self, store: Store, label: str, manifest: CardManifest, *, max_expansion: float) -> None:
        self._store = store
        self.label = label
        self.manifest = manifest
        self._max_expansion = max_expansion
        self._minor = manifest.format_minor
        self._arrays: dict[str, zarr.Array] = {}
        self._indexed_shards: dict[str, np.ndarray] = {}  # checked shard indexes: (offset, nbytes) per chunk
        self.fast = True  # decode 1.1 shards with the fast path (kvstore/shard_read.py); False: through zarr
        for which in ("k", "v"):  # array metadata must agree with the manifest before anything is decoded
            self._all_kv_arrays(which)
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
        lr = _as_range(layers, self.manifest.model.num_layers, "layers")
        tr = _as_range(slice(0, tokens) if isinstance(tokens, int) else tokens, self.manifest.tokens.count, "tokens")
        outs = (None, None)
        if out is not None:
            m = self.manifest.model
            want = (len(lr), m.num_kv_heads, len(tr), m.head_dim)
            storage = self._kv_dtype()
            rows = (m.head_dim * storage.itemsize, storage.itemsize)
            if any(a.shape != want or a.dtype.itemsize != storage.itemsize or a.strides[-2:] != rows for a in out):
                raise ValueError(f"out arrays must have shape {want}, {storage.itemsize}-byte elements and "
                                 f"contiguous rows; got {[(a.shape, a.dtype, a.strides) for a in out]}")
            outs = tuple(a.view(storage) for a in out)
        k = self._read_kv("k", lr, tr, outs[0])
        v = self._read_kv("v", lr, tr, outs[1])
        dt = NUMPY_DTYPES[self.manifest.model.kv_dtype]
        return CanonicalKV(k.view(dt), v.view(dt))

    def read_encoded(self, which: str, layers: range | slice | int | None = None,
                     tokens: slice | int | None = None, *,
                     alloc: Callable[[int], np.ndarray] | None = None) -> EncodedKV:
        """The stored chunks of K (``which="k"``) or V that a layer range × token range touches, undecoded:
        each chunk's crc32c is verified as :meth:`read` does, then stripped.

        The payloads are read by parallel workers (on local stores) into one buffer, back to back in (layer,
        token) order; ``alloc`` (total bytes -> a uint8 array, e.g. pinned memory for a device copy) provides it.

        Raises :class:`UnsupportedCodecError` when the card's chunks are not ``serializer + crc32c``
        (compressed chunks, or a format 1.0 card): read those with :meth:`read`.
        """
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v'; got {which!r}")
        lr = _as_range(layers, self.manifest.model.num_layers, "layers")
        tr = _as_range(slice(0, tokens) if isinstance(tokens, int) else tokens, self.manifest.tokens.count, "tokens")
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
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((0, 0, 0, 0))}"
        (size,) = _sizes(self._store, [key])
        if size is None:
            raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                   card=self.label, part=which)
        if key not in self._indexed_shards:
            self._indexed_shards[key] = _check_shard_index(self._store, arr, key, self.label, which)
        buffer: list[np.ndarray] = []

        def keep(n: int) -> np.ndarray:  # one call: every payload goes into this buffer
            buffer.append((alloc or _uint8_buffer)(n))
            return buffer[0]

        places = shard_read.read_payloads_into(self._store, arr, key, size, self._indexed_shards[key], lr, tr,
                                             self.label, which, keep)
        c, count = chunk_shape[2], self.manifest.tokens.count
        chunks = [EncodedChunk(layer, j * c, min(c, count - j * c), buffer[0][at:at + nb])
                  for layer, j, at, nb in places]
        return EncodedKV(serializer, chunk_shape, chunks, buffer[0])  # type: ignore[arg-type]

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
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((0, 0, 0, 0))}"
        (size,) = _sizes(self._store, [key])
        if size is None:
            raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                   card=self.label, part=which)
        if key not in self._indexed_shards:
            self._indexed_shards[key] = _check_shard_index(self._store, arr, key, self.label, which)
        expected = getattr(self, "expected_crcs", None)
        return ShardLayout(
            which=which, label=self.label, store=self._store, key=key, size=size,
            index=self._indexed_shards[key], chunk_shape=tuple(arr.chunks), shape=tuple(arr.shape),
            serializer=serializer, storage=self._kv_dtype(),
            expected_crcs=expected(which) if expected is not None else None)

    def objects(self) -> dict[str, int]:
        """Every stored object of the card and its size in bytes."""
        return stored_objects(self._store)

    def verify(self) -> VerifyReport:
        """Read and check every chunk of the card, one layer at a time; raise on the first problem."""
        m = self.manifest.model
        chunks = 0
        for layer in range(m.num_layers):
            self.read(layers=layer)
        for which in ("k", "v"):
            for arr in self._all_kv_arrays(which):
                chunks += math.prod(math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks) if s) if arr.size else 0
        objs = self.objects()
        return VerifyReport(self.manifest.card_id, self.format, self.manifest.tokens.count, len(objs),
                            sum(objs.values()), chunks)

    # -- layouts ------------------------------------------------------------------------------------------
    def _array(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> zarr.Array:
        if path not in self._arrays:
            try:
                arr = zarr.open_array(self._store, path=path, mode="r", zarr_format=3)
            except CacheCardError:
                raise  # e.g. a codec configuration this version cannot decode
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
        keys = [f"{arr.path}/{arr.metadata.encode_chunk_key(c)}" for c in _grid_cells(bounds, grid)]
        sizes = _sizes(self._store, keys)
        for key, size in zip(keys, sizes):
            if size is None:
                raise CorruptCardError(f"object {key!r} is missing; the card is damaged: delete it and save again",
                                       card=self.label, part=name)
        if arr.shards is not None:
            for key in keys:
                if key not in self._indexed_shards:
                    self._indexed_shards[key] = _check_shard_index(self._store, arr, key, self.label, name)
        decoded = math.prod(b - a for a, b in bounds) * arr.dtype.itemsize
        stored = sum(s for s in sizes if s is not None)
        if decoded > self._max_expansion * stored + (1 << 20):
            raise ManifestError(f"declares {decoded} decoded bytes for {stored} stored bytes of {name!r}; "
                                "refusing an implausible shape (a hostile or damaged manifest)",
                                card=self.label)
        if self.fast and arr.shards is not None and len(keys) == 1 and sizes[0] is not None:
            fast = shard_read.read_shard_region(self._store, arr, keys[0], sizes[0], self._indexed_shards[keys[0]],
                                                bounds, self.label, name, out=out)
            if fast is not None:
                return fast
        try:
            if out is not None:
                out[...] = arr[region]
                return out
            return np.asarray(arr[region])
        except Exception as e:  # noqa: BLE001 - decode failures are located below and reported precisely
            raise self._locate_corruption(name, arr, bounds) from e

    def _locate_corruption(self, name: str, arr: zarr.Array, bounds: list[tuple[int, int]]) -> CacheCardError:
        dims = arr.metadata.dimension_names or tuple(f"dim{i}" for i in range(arr.ndim))
        for cell in _grid_cells(bounds, arr.chunks):
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
              max_expansion: float = DEFAULT_MAX_EXPANSION) -> Card:
    """Open and validate the card at ``location`` (reads metadata and token ids, no KV chunks)."""
    label = describe(location)
    store = readable(location, storage_options=storage_options)
    root = _read_root(store, label)
    manifest = _parse_manifest(root, label)
    return Card(store, label, manifest, max_expansion=max_expansion)


def read_card(location: Location, *, layers: range | slice | int | None = None,
              tokens: slice | int | None = None, **kwargs: Any) -> CanonicalKV:
    """Open a card and decode its KV (or a layer range / token range of it)."""
    return open_card(location, **kwargs).read(layers=layers, tokens=tokens)


def verify_card(location: Location, **kwargs: Any) -> VerifyReport:
    """Open a card and check every byte of it."""
    return open_card(location, **kwargs).verify()


# -- manifest: version dispatch and migration ---------------------------------------------------------------
def _read_root(store: Store, label: str) -> dict[str, Any]:
    raw = get_bytes(store, ROOT_KEY)
    if raw is None:
        if sync(_any_key(store)):
            other = describe_folder(store.root) if isinstance(store, LocalStore) else None
            if other is not None:  # a store, a folder of cards, ...: not data to delete
                raise other
            raise IncompleteCardError("card data without a committed manifest: a write that did not finish. "
                                      "It holds nothing usable; delete it (or let gc collect it)", card=label)
        raise CardNotFoundError("nothing is stored here; check the location", card=label)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCardError(f"the root zarr.json is not valid JSON ({e}); the card is corrupt",
                               card=label, part="zarr.json") from e
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise NotACardError("not a zarr v3 group, so not a CacheCard", card=label)
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or MANIFEST_ATTR not in attrs:
        raise NotACardError(f"a zarr group without the {MANIFEST_ATTR!r} attribute: not a CacheCard", card=label)
    return attrs


async def _any_key(store: Store) -> bool:
    async for _ in store.list():
        return True
    return False


def _parse_manifest(attrs: dict[str, Any], label: str) -> CardManifest:
    raw = attrs[MANIFEST_ATTR]
    if not isinstance(raw, dict):
        raise ManifestError("the manifest must be a JSON object", card=label, part="manifest")
    if attrs.get(DIGEST_ATTR) != manifest_digest(raw):
        raise CorruptCardError(f"the manifest does not match its {DIGEST_ATTR} checksum; the card is corrupt or "
                               "was edited", card=label, part="manifest")
    major, minor = raw.get("cachecard_format"), raw.get("format_minor")
    if not isinstance(major, int) or not isinstance(minor, int) or isinstance(major, bool) or minor < 0:
        raise ManifestError(f"cachecard_format and format_minor must be integers; got {major!r}, {minor!r}",
                            card=label, part="manifest")
    if (major, minor) > (FORMAT_MAJOR, FORMAT_MINOR):
        raise FormatVersionError(f"written in CacheCard format {major}.{minor}; this reader implements up to "
                                 f"{FORMAT_MAJOR}.{FORMAT_MINOR}. Upgrade cachecard to read it", card=label)
    if major < FORMAT_MAJOR:
        raise FormatVersionError(f"format {major}.{minor} predates format 1 and cannot be read", card=label)
    try:  # strict JSON-mode validation: "2" is not an integer, a number is not a time
        return CardManifest.model_validate_json(json.dumps(MIGRATIONS[minor](raw)), strict=True)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise ManifestError(f"invalid manifest ({problems})", card=label, part="manifest") from None


def _same(raw: dict[str, Any]) -> dict[str, Any]:
    return raw


# Manifest migrations per minor, to the current model. 1.0 and 1.1 manifests share fields (1.2 adds the
# optional `pruning`); 1.0 differs in array layout, which Card dispatches on (format_minor).
MIGRATIONS = {0: _same, 1: _same, 2: _same}


# -- helpers ------------------------------------------------------------------------------------------------
def _as_range(sel: range | slice | int | None, n: int, what: str) -> range:
    if sel is None:
        return range(n)
    if isinstance(sel, int) and not isinstance(sel, bool):
        if not 0 <= sel < n and what == "layers":
            raise IndexError(f"{what} index {sel} out of range for {n}")
        sel = slice(sel, sel + 1)
    if isinstance(sel, range):
        sel = slice(sel.start, sel.stop, sel.step)
    if not isinstance(sel, slice):
        raise TypeError(f"{what} must be an int, a range or a slice; got {type(sel).__name__}")
    r = range(*sel.indices(n))
    if r.step != 1:
        raise ValueError(f"{what} must be a contiguous range (step 1); got step {r.step}")
    return r


def _grid_cells(bounds: list[tuple[int, int]], grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    if any(b <= a for a, b in bounds):
        return []
    return list(itertools.product(*(range(a // g, (b - 1) // g + 1) for (a, b), g in zip(bounds, grid))))


def _sizes(store: Store, keys: list[str]) -> list[int | None]:
    """Stored size of each object, None where missing. A stat, never a read of the object."""

    async def one(key: str) -> int | None:
        try:
            if isinstance(store, ZipStore):  # zarr 3.1's ZipStore.getsize reads the whole member
                return zip_member_size(store, key)
            return await store.getsize(key)
        except (FileNotFoundError, KeyError):
            return None

    async def all_() -> list[int | None]:
        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(all_())


def _check_shard_index(store: Store, arr: zarr.Array, key: str, label: str, name: str) -> np.ndarray:
    """Every inner chunk of a shard must be stored (spec §5.4): zarr would read an empty entry as zeros.

    One small suffix read per shard, once per opened card; zarr reads the same bytes again to decode."""
    per_shard = math.prod(s // c for s, c in zip(arr.shards, arr.chunks))
    index_bytes = per_shard * 16 + 4
    raw = get_bytes(store, key, SuffixByteRequest(index_bytes)) or b""
    if len(raw) != index_bytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptCardError(f"the shard index of object {key!r} is missing, truncated or fails its "
                               "crc32c; delete the card and save it again", card=label, part=name)
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    empty = int(np.sum((index[:, 0] == _EMPTY) | (index[:, 1] == _EMPTY)))
    if empty:
        raise CorruptCardError(f"object {key!r} lacks {empty} inner chunks (a writer must store every chunk); "
                               "delete the card and save it again", card=label, part=name)
    return index
