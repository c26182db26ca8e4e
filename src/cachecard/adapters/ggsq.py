"""llama.cpp's per-sequence KV state, byte for byte (spec/cachecard-1.md §4 canonical layout; the layout
below is llama.cpp's ``llama_kv_cache::state_write`` in the versions SLOT_VERSIONS names).

Two containers hold the same memory-module bytes:

* ``llama_state_seq_get_data`` output: ``u32 0xaf143cd8`` (llama.cpp's ``io_magic``), ``i32 seq_id``, then
  the memory state;
* a slot file (``llama_state_seq_save_file``, the server's ``/slots?action=save``): ``u32 'ggsq'``,
  ``u32 version``, ``u32 n_tokens``, ``i32 tokens[n_tokens]``, then the memory state.

The memory state of a plain KV cache (``llama_kv_cache::state_write``), all fields little-endian::

    u32 n_stream
    per stream:  u32 cell_count                       (0: nothing else for this stream)
                 per cell: i32 pos, u32 n_seq_id, [cell ext], i32 seq_id[n_seq_id]
                 u32 v_trans, u32 n_layer
                 per layer: i32 k_type, u64 k_row_size, cell_count rows of K
                 v_trans == 0, per layer: i32 v_type, u64 v_row_size, cell_count rows of V
                 v_trans == 1, per layer: i32 v_type, u32 v_el_size, u32 n_embd_v, then n_embd_v rows of
                                          cell_count elements (V transposed: one row per channel)

The cell ext (M-RoPE 2D positions, and since slot version 3 a token id) is written only for models that need
it; the bytes do not say so, so the caller passes its size (0 for everything else).

This module parses and re-serialises those bytes exactly; it imports no llama.cpp. Iterated SWA and hybrid
memories (two memory blocks, or recurrent state) are refused. :func:`allocate` lays a state out in one
preallocated buffer (headers and cell records written, K and V rows as views to fill in place), which is how
a restore synthesises a state without intermediate copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cachecard.errors import KVShapeError, UnsupportedStateError

IO_MAGIC = 0xAF143CD8          # llama_context's io_magic, first word of llama_state_seq_get_data output
SLOT_MAGIC = 0x67677371        # LLAMA_STATE_SEQ_MAGIC, 'ggsq'
SLOT_VERSIONS = (2, 3)         # LLAMA_STATE_SEQ_VERSION of llama.cpp trees whose KV layout this module knows
SLOT_VERSION = 3               # what write_slot_file writes by default (llama-cpp-python 0.3.36)
MAX_STREAMS = 1024             # llama.cpp has one stream per sequence at most (n_seq_max)
MAX_LAYERS = 4096


class GGMLType(NamedTuple):
    """A ggml element type as the KV cache stores it: ``block_bytes`` bytes hold ``block`` elements."""

    name: str
    block: int
    block_bytes: int


# ggml_type ids (ggml.h) of the KV cache types llama.cpp accepts (common/arg.cpp kv_cache_types).
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("f32", 1, 4),
    1: GGMLType("f16", 1, 2),
    2: GGMLType("q4_0", 32, 18),
    3: GGMLType("q4_1", 32, 20),
    6: GGMLType("q5_0", 32, 22),
    7: GGMLType("q5_1", 32, 24),
    8: GGMLType("q8_0", 32, 34),
    20: GGMLType("iq4_nl", 32, 18),
    30: GGMLType("bf16", 1, 2),
}
TYPE_IDS: dict[str, int] = {t.name: i for i, t in GGML_TYPES.items()}


def runtime_version() -> str:
    """The installed llama-cpp-python version, for error messages (never imports llama_cpp)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python {version('llama_cpp_python')}"
    except PackageNotFoundError:
        return "no llama-cpp-python installed"


def _unsupported(what: str) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"{what}. cachecard reads the llama.cpp KV state layout of slot versions {SLOT_VERSIONS} "
        f"(llama-cpp-python 0.3.30-0.3.36); installed: {runtime_version()}. If the bytes come from a newer "
        "llama.cpp, upgrade cachecard; if they were cut short, save the state again.")


def type_of(type_id: int, what: str) -> GGMLType:
    try:
        return GGML_TYPES[type_id]
    except KeyError:
        raise _unsupported(f"{what} has ggml type id {type_id}, not a KV cache type cachecard knows "
                           f"({ {i: t.name for i, t in GGML_TYPES.items()} })") from None


@dataclass(eq=False)
class LayerRows:
    """One layer's K or V of one stream, as stored.

    ``data`` is ``(cell_count, row_size)`` uint8 (one row per cell), or for transposed V
    ``(n_embd, cell_count * el_size)`` (one row per channel); ``size`` is the row size (K, plain V) or the
    element size (transposed V). ``data`` is ``None`` in a state being built: :func:`allocate` gives it its
    place."""

    type_id: int
    size: int
    data: np.ndarray | None
    n_embd: int | None = None  # set for transposed V only

    def shape(self, cells: int) -> tuple[int, int]:
        """``(rows, bytes per row)`` of the data in a stream of ``cells`` cells."""
        return (self.n_embd, cells * self.size) if self.n_embd is not None else (cells, self.size)

    @property
    def type(self) -> GGMLType:
        return GGML_TYPES[self.type_id]

    @property
    def transposed(self) -> bool:
        return self.n_embd is not None


@dataclass(eq=False)
class StreamState:
    """One stream of the cache: per-cell position and sequence ids, then every layer's K and V."""

    positions: np.ndarray                       # int32, one per cell, in cell order
    seq_ids: list[np.ndarray]                   # int32 array per cell
    cell_ext: list[bytes] = field(default_factory=list)  # per cell, when the model has a cell ext
    v_trans: bool = False
    k: list[LayerRows] = field(default_factory=list)
    v: list[LayerRows] = field(default_factory=list)

    @property
    def cell_count(self) -> int:
        return len(self.positions)


@dataclass(eq=False)
class SeqState:
    """A parsed llama.cpp sequence state. ``seq_id`` is the header's sequence id (``None`` for the payload of a
    slot file, which has no header); ``streams`` holds one entry per stream, ``None`` for an empty one."""

    streams: list[StreamState | None]
    seq_id: int | None = None
    cell_ext_size: int = 0

    def stream(self) -> StreamState:
        """The one non-empty stream (a single sequence lives in one stream)."""
        full = [s for s in self.streams if s is not None]
        if len(full) != 1:
            raise UnsupportedStateError(f"the state holds {len(full)} non-empty streams; a sequence's KV lives in "
                                        "exactly one. Save one sequence (seq_id >= 0) of a non-empty cache")
        return full[0]

    def to_buffer(self) -> np.ndarray:
        """The exact bytes llama.cpp wrote (with the ``io_magic`` header when ``seq_id`` is set), as one uint8
        array: writable, and usable as a buffer without another copy."""
        return allocate(self)[0]

    def to_bytes(self) -> bytes:
        """The exact bytes llama.cpp wrote (with the ``io_magic`` header when ``seq_id`` is set)."""
        return self.to_buffer().tobytes()


_ROWS_HEADER = 12  # i32 type + u64 row size, or (transposed V) i32 type + u32 element size + u32 n_embd


def allocate(state: SeqState) -> tuple[np.ndarray, SeqState]:
    """One buffer of exactly ``state``'s bytes with every header and cell record written, and a copy of
    ``state`` whose rows' ``data`` are views of their place in that buffer.

    Rows that have data are copied in. Rows whose ``data`` is ``None`` are left for the caller to fill through
    the returned views, every byte of them, before the buffer is used (it starts uninitialised).

    Raises
    ------
    KVShapeError
        A stream's layers disagree in number between K and V, rows hold the wrong number of bytes, or the cell
        ext blocks are not ``cell_ext_size`` bytes each.
    """
    ext = state.cell_ext_size
    counts = [None if s is None else np.fromiter(map(len, s.seq_ids), np.int64, s.cell_count)
              for s in state.streams]
    size = (8 if state.seq_id is not None else 0) + 4
    for s, n_ids in zip(state.streams, counts):
        size += 4
        if s is None:
            continue
        if len(s.v) != len(s.k):
            raise KVShapeError(f"a stream holds {len(s.k)} layers of K and {len(s.v)} of V; llama.cpp writes both "
                               "for every layer")
        size += s.cell_count * (8 + ext) + 4 * int(n_ids.sum()) + 8
        size += sum(_ROWS_HEADER + int(np.prod(r.shape(s.cell_count))) for r in (*s.k, *s.v))
    buf = np.empty(size, np.uint8)
    at = 0
    if state.seq_id is not None:
        struct.pack_into("<Ii", buf, 0, IO_MAGIC, state.seq_id)
        at = 8
    struct.pack_into("<I", buf, at, len(state.streams))
    at += 4
    placed: list[StreamState | None] = []
    for s, n_ids in zip(state.streams, counts):
        struct.pack_into("<I", buf, at, 0 if s is None else s.cell_count)
        at += 4
        if s is None:
            placed.append(None)
            continue
        at = _write_cells(buf, at, s, n_ids, ext)
        struct.pack_into("<II", buf, at, int(s.v_trans), len(s.k))
        at += 8
        out = StreamState(s.positions, s.seq_ids, s.cell_ext, s.v_trans)
        for rows, into in [(r, out.k) for r in s.k] + [(r, out.v) for r in s.v]:
            if rows.transposed:
                struct.pack_into("<iII", buf, at, rows.type_id, rows.size, rows.n_embd)
            else:
                struct.pack_into("<iQ", buf, at, rows.type_id, rows.size)
            at += _ROWS_HEADER
            shape = rows.shape(s.cell_count)
            view = buf[at:at + shape[0] * shape[1]].reshape(shape)
            at += view.size
            if rows.data is not None:
                if rows.data.nbytes != view.size:
                    raise KVShapeError(f"rows of {rows.data.nbytes} bytes where the layout needs {shape[0]} x "
                                       f"{shape[1]} (type {rows.type.name}, size {rows.size}, {s.cell_count} cells)")
                view[...] = np.ascontiguousarray(rows.data).view(np.uint8).reshape(shape)
            into.append(LayerRows(rows.type_id, rows.size, view, rows.n_embd))
        placed.append(out)
    return buf, SeqState(placed, state.seq_id, ext)


def _write_cells(buf: np.ndarray, at: int, s: StreamState, n_ids: np.ndarray, ext: int) -> int:
    """Write the cell records (``i32 pos, u32 n_seq_id, ext, i32 seq_id[n_seq_id]``) at ``at``, every field
    scattered at once rather than one ``struct.pack`` per cell; return the offset after them."""
    cells = s.cell_count
    rec = 8 + ext + 4 * n_ids
    start = at + np.cumsum(rec) - rec
    head = np.empty((cells, 2), "<i4")
    head[:, 0] = s.positions
    head[:, 1] = n_ids
    buf[start[:, None] + np.arange(8)] = head.view(np.uint8).reshape(cells, 8)
    if ext:
        exts = np.frombuffer(b"".join(s.cell_ext), np.uint8)
        if len(s.cell_ext) != cells or exts.size != cells * ext:
            raise KVShapeError(f"{len(s.cell_ext)} cell ext blocks of {exts.size} bytes in all; the stream needs "
                               f"{cells} of {ext} bytes")
        buf[start[:, None] + 8 + np.arange(ext)] = exts.reshape(cells, ext)
    ids = np.concatenate(s.seq_ids).astype("<i4", copy=False)
    if ids.size:
        first_id = np.repeat(np.cumsum(n_ids) - n_ids, n_ids)  # index in ``ids`` of each cell's first id
        where = np.repeat(start + 8 + ext, n_ids) + 4 * (np.arange(ids.size) - first_id)
        buf[where[:, None] + np.arange(4)] = ids.view(np.uint8).reshape(-1, 4)
    return at + int(rec.sum())


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every failure names the offset and the field."""

    def __init__(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        self.buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or n > self.left:
            raise _unsupported(f"truncated state: {what} needs {n} bytes at offset {self.pos}, "
                               f"but only {self.left} remain of {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what).tobytes())

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]


def parse_seq_state(data: bytes | bytearray | memoryview | np.ndarray, *, header: bool = True,
                    cell_ext_size: int = 0) -> SeqState:
    """Parse a sequence state without copying the KV bytes.

    Parameters
    ----------
    data
        ``llama_state_seq_get_data`` output (``header=True``), or the state part of a slot file
        (``header=False``).
    cell_ext_size
        Bytes of the per-cell ext block: 0 unless the model uses M-RoPE (8 bytes, slot version 2; 12 bytes,
        version 3) or per-token n-gram embeddings.

    Raises
    ------
    UnsupportedStateError
        Truncated or trailing bytes, an unknown ggml type, or row sizes that contradict each other.
    """
    cur = _Cursor(data)
    seq_id = None
    if header:
        magic, seq_id = cur.unpack("<Ii", "the io header (magic, seq_id)")
        if magic != IO_MAGIC:
            raise _unsupported(f"the state starts with {magic:#010x}, not llama.cpp's sequence state magic "
                               f"{IO_MAGIC:#010x} (a slot file starts with 'ggsq': use read_slot_file)")
    n_stream = cur.u32("n_stream")
    if not 1 <= n_stream <= MAX_STREAMS:
        raise _unsupported(f"n_stream is {n_stream}, outside 1..{MAX_STREAMS}")
    streams = [_parse_stream(cur, s, cell_ext_size) for s in range(n_stream)]
    if cur.left:
        raise _unsupported(f"{cur.left} bytes follow the KV cache state at offset {cur.pos}: a second memory "
                           "block (iSWA or hybrid/recurrent models), which cachecard does not read, or a "
                           "wrong cell_ext_size")
    return SeqState(streams, seq_id, cell_ext_size)


def _parse_stream(cur: _Cursor, s: int, ext: int) -> StreamState | None:
    cells = cur.u32(f"stream {s} cell_count")
    if cells == 0:
        return None
    if cells * 8 > cur.left:
        raise _unsupported(f"truncated state: stream {s} declares {cells} cells but only {cur.left} bytes remain")
    positions = np.empty(cells, np.int32)
    seq_ids, exts = [], []
    for i in range(cells):
        positions[i], n_ids = cur.unpack("<iI", f"cell {i} (pos, n_seq_id)")
        if n_ids * 4 > cur.left:
            raise _unsupported(f"cell {i} declares {n_ids} sequence ids, more than the {cur.left} bytes left")
        if ext:
            exts.append(cur.take(ext, f"cell {i} ext").tobytes())
        seq_ids.append(cur.take(4 * n_ids, f"cell {i} seq ids").view("<i4").copy())
    v_trans, n_layer = cur.unpack("<II", f"stream {s} (v_trans, n_layer)")
    if v_trans > 1 or not 1 <= n_layer <= MAX_LAYERS:
        raise _unsupported(f"stream {s} has v_trans {v_trans} and n_layer {n_layer}; expected 0/1 and "
                           f"1..{MAX_LAYERS} (the cell metadata is probably misread: check cell_ext_size)")
    st = StreamState(positions, seq_ids, exts, bool(v_trans))
    for layer in range(n_layer):
        type_id, row = cur.unpack("<iQ", f"layer {layer} K (type, row size)")
        t = type_of(type_id, f"layer {layer} K")
        if row == 0 or row % t.block_bytes:
            raise _unsupported(f"layer {layer} K row size {row} is not a whole number of {t.name} blocks "
                               f"({t.block_bytes} bytes)")
        if cells * row > cur.left:
            raise _unsupported(f"truncated state: layer {layer} K needs {cells} x {row} bytes at offset {cur.pos}, "
                               f"{cur.left} remain")
        st.k.append(LayerRows(type_id, row, cur.take(cells * row, f"layer {layer} K").reshape(cells, row)))
    for layer in range(n_layer):
        if v_trans:
            type_id, el, n_embd = cur.unpack("<iII", f"layer {layer} V (type, element size, n_embd)")
            t = type_of(type_id, f"layer {layer} V")
            if t.block != 1 or el != t.block_bytes or n_embd == 0:
                raise _unsupported(f"layer {layer} V is transposed with type {t.name}, element size {el} and "
                                   f"{n_embd} channels; llama.cpp transposes only f32/f16/bf16 V")
            if n_embd * cells * el > cur.left:
                raise _unsupported(f"truncated state: layer {layer} V needs {n_embd} x {cells} x {el} bytes at "
                                   f"offset {cur.pos}, {cur.left} remain")
            data = cur.take(n_embd * cells * el, f"layer {layer} V").reshape(n_embd, cells * el)
            st.v.append(LayerRows(type_id, el, data, n_embd))
        else:
            type_id, row = cur.unpack("<iQ", f"layer {layer} V (type, row size)")
            t = type_of(type_id, f"layer {layer} V")
            if row == 0 or row % t.block_bytes:
                raise _unsupported(f"layer {layer} V row size {row} is not a whole number of {t.name} blocks")
            if cells * row > cur.left:
                raise _unsupported(f"truncated state: layer {layer} V needs {cells} x {row} bytes at offset "
                                   f"{cur.pos}, {cur.left} remain")
            st.v.append(LayerRows(type_id, row, cur.take(cells * row, f"layer {layer} V").reshape(cells, row)))
    return st


# -- slot files ------------------------------------------------------------------------------------------------
def parse_slot_file(data: bytes | bytearray | memoryview | np.ndarray, *,
                    cell_ext_size: int = 0) -> tuple[SeqState, np.ndarray, int]:
    """Parse slot-file bytes into ``(state, tokens, version)``; the state has no header (``seq_id`` None)."""
    cur = _Cursor(data)
    magic, version, n_tokens = cur.unpack("<III", "the slot file header (magic, version, n_tokens)")
    if magic != SLOT_MAGIC:
        raise _unsupported(f"not a llama.cpp slot file: magic {magic:#010x}, expected 'ggsq' ({SLOT_MAGIC:#010x})")
    if version not in SLOT_VERSIONS:
        raise _unsupported(f"slot file version {version}")
    tokens = cur.take(4 * n_tokens, f"{n_tokens} token ids").view("<i4").copy()
    state = parse_seq_state(cur.buf[cur.pos:], header=False, cell_ext_size=cell_ext_size)
    return state, tokens, version


def slot_header(tokens: np.ndarray | list[int], *, version: int = SLOT_VERSION) -> bytes:
    """What a slot file holds before its state: magic, version, token count and the token ids."""
    if version not in SLOT_VERSIONS:
        raise _unsupported(f"cannot write slot file version {version}")
    ids = np.asarray(tokens, "<i4")
    return struct.pack("<III", SLOT_MAGIC, version, len(ids)) + ids.tobytes()


def slot_file_bytes(state: SeqState, tokens: np.ndarray | list[int], *, version: int = SLOT_VERSION) -> bytes:
    """The bytes of a slot file holding ``state`` (its header, if any, is dropped) and ``tokens``."""
    body = SeqState(state.streams, None, state.cell_ext_size).to_buffer()
    return b"".join((slot_header(tokens, version=version), body))
