"""Streaming K or V of a card off local storage in a few large reads (spec/cachecard-1.md §10, "Restore").

The restore path of device runtimes. A card's K (or V) is one shard whose inner chunks lie back to back, so
the chunks a restore needs are a handful of large byte ranges, not thousands of small reads:

1. :func:`chunk_table` picks the chunks of a layer range x token prefix from the shard index (vectorised:
   bounds and overlaps checked once, no per-chunk Python objects);
2. :func:`read_span` reads their byte span into one caller buffer (pinned memory, for a device copy) in pieces
   of ``piece_bytes``, by parallel workers, and hands each piece to ``on_piece`` as soon as it lands, so the
   host-to-device copy of piece *i* overlaps the read of piece *i+1*. ``direct=True`` reads with ``O_DIRECT``
   (cold data: deeper queues, no page-cache copy);
3. :func:`verify_chunks` checks every chunk's crc32c — against the chunk's own trailer and, for cards whose
   manifest binds chunk checksums, against the manifest's value for that position — by parallel workers. The
   caller runs it while the device copies and decodes, and must not use the data before it returns: a restore
   never hands over KV whose checksums were not verified (spec §10).

Decoding is the caller's (``cachecard.adapters.torch_read`` decodes on the device).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from zarr.storage import LocalStore

from cachecard.card.reader import ShardLayout
from cachecard.errors import CorruptCardError

try:  # releases the GIL, so workers check CRCs in parallel; same values as google_crc32c
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover
    from google_crc32c import value as _crc32c

ALIGN = 4096                 # O_DIRECT alignment of file offsets, sizes and buffers
PIECE_BYTES = 8 << 20        # one worker's read; the unit handed to on_piece
MAX_GAP = 1 << 20            # unneeded bytes read rather than split a piece (a token prefix leaves gaps)
WORKERS = max(1, min(16, os.cpu_count() or 1))

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # started once: a restore should not pay for 16 thread starts
        _POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="cachecard-stream")
    return _POOL


@dataclass(frozen=True)
class ChunkTable:
    """The inner chunks a read needs, in grid order (layer-major, then token chunk).

    Offsets are in the shard object; ``base`` is the file offset of the caller's buffer's first byte (the
    span's start rounded down to ``ALIGN``) and ``length`` the buffer size the span needs."""

    layers: np.ndarray       # int64 layer of each chunk
    token_chunks: np.ndarray  # int64 token-chunk index j (tokens j*c .. j*c+c-1)
    offsets: np.ndarray      # int64 offset of the chunk (payload then 4-byte crc32c) in the shard
    nbytes: np.ndarray       # int64 size including the crc32c
    expected: np.ndarray | None  # uint32 manifest-bound crc32c of each chunk, or None (unbound card)
    base: int
    length: int

    def __len__(self) -> int:
        return len(self.offsets)

    def payload_offsets(self) -> np.ndarray:
        """Offsets of each chunk's payload in the caller's buffer."""
        return self.offsets - self.base


def chunk_table(layout: ShardLayout, layers: range, tokens: int) -> ChunkTable:
    """The chunks holding ``layers`` x tokens ``[0, tokens)`` of a shard, checked: every index entry inside the
    shard's data and no two chunks overlapping (a hostile index could alias one chunk's bytes as another's)."""
    L, H, T, D = layout.shape
    c = layout.chunk_shape[2]
    per_tokens = len(layout.index) // max(L, 1)
    if not 0 <= tokens <= T or (layers and not 0 <= layers.start <= layers.stop <= L):
        raise IndexError(f"card {layout.label}: cannot take layers {layers} x {tokens} tokens of {L} x {T}")
    nj = -(-tokens // c)
    lay = np.repeat(np.asarray(layers, dtype=np.int64), nj)
    j = np.tile(np.arange(nj, dtype=np.int64), len(layers))
    entries = layout.index[lay * per_tokens + j].astype(np.int64) if len(lay) else np.zeros((0, 2), np.int64)
    off, nb = entries[:, 0], entries[:, 1]
    data_end = layout.size - (16 * len(layout.index) + 4)
    bad = np.flatnonzero((nb < 4) | (off < 0) | (off > data_end) | (nb > data_end - off))
    if len(bad):
        i = int(bad[0])
        raise _corrupt(layout, int(lay[i]), int(j[i]), f"its index entry ({off[i]}, {nb[i]}) lies outside the "
                                                          "shard's data")
    order = np.argsort(off, kind="stable")
    overlap = np.flatnonzero(off[order][1:] < (off + nb)[order][:-1])
    if len(overlap):
        i = int(order[overlap[0] + 1])
        raise _corrupt(layout, int(lay[i]), int(j[i]), "its index entry overlaps another chunk")
    expected = None
    if layout.expected_crcs is not None and len(lay):
        expected = np.asarray(layout.expected_crcs, dtype=np.uint32)[lay, j]
    if not len(off):
        return ChunkTable(lay, j, off, nb, expected, 0, 0)
    base = int(off.min()) // ALIGN * ALIGN
    end = int((off + nb).max())
    return ChunkTable(lay, j, off, nb, expected, base, -(-(end - base) // ALIGN) * ALIGN)


def local_path(layout: ShardLayout) -> Path | None:
    """The shard's file on a local store (None for object stores and zips: read those with ``read_encoded``)."""
    if type(layout.store) is LocalStore:
        return Path(layout.store.root) / layout.key
    return None


def pieces(table: ChunkTable, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """File ranges ``[a, b)`` to read, ALIGN-aligned, about ``piece_bytes`` each, skipping gaps over MAX_GAP."""
    if not len(table):
        return []
    piece_bytes = max(ALIGN, -(-piece_bytes // ALIGN) * ALIGN)
    order = np.argsort(table.offsets)
    starts, ends = table.offsets[order], (table.offsets + table.nbytes)[order]
    out: list[tuple[int, int]] = []
    a = int(starts[0]) // ALIGN * ALIGN
    b = a
    for s, e in zip(starts.tolist(), ends.tolist()):
        if s - b > MAX_GAP:  # a hole of unneeded chunks: close the piece
            out.append((a, -(-b // ALIGN) * ALIGN))
            a = s // ALIGN * ALIGN
        b = max(b, e)
        while b - a >= piece_bytes:
            cut = a + piece_bytes
            out.append((a, cut))
            a = cut
    if b > a:
        out.append((a, -(-b // ALIGN) * ALIGN))
    return out


def read_span(layout: ShardLayout, table: ChunkTable, dest: np.ndarray, *,
              on_piece: Callable[[int, int], None] | None = None, direct: bool = False,
              piece_bytes: int = PIECE_BYTES) -> None:
    """Read every chunk of ``table`` into ``dest`` (uint8, at least ``table.length`` bytes; file offset
    ``table.base`` lands at ``dest[0]``), pieces in parallel; ``on_piece(a, b)`` gets each piece's range in
    ``dest`` from the worker that read it. ``direct`` uses O_DIRECT (``dest`` must then be ALIGN-aligned, as
    pinned and page-allocated memory is). Raises :class:`CorruptCardError` if the shard is shorter than its
    index says."""
    path = local_path(layout)
    if path is None:
        raise ValueError(f"card {layout.label}: streaming reads need a local card; use read_encoded")
    if dest.nbytes < table.length:
        raise ValueError(f"dest holds {dest.nbytes} bytes; the read needs {table.length}")
    todo = pieces(table, piece_bytes)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CorruptCardError(f"object {layout.key!r} is missing; the card is damaged (or was deleted while "
                               "being read)", card=layout.label, part=layout.which) from None
    except OSError:  # a file system without O_DIRECT: read through the page cache
        fd = os.open(path, os.O_RDONLY)
    last_needed = int((table.offsets + table.nbytes).max()) if len(table) else 0

    def work(piece: tuple[int, int]) -> None:
        a, b = piece
        view = memoryview(dest[a - table.base:b - table.base])
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], a + got)
            if n == 0:
                break
            got += n
        if a + got < min(b, last_needed):
            raise _corrupt(layout, 0, 0, f"the shard ends at byte {a + got}; its index needs {last_needed}")
        if on_piece is not None:
            on_piece(a - table.base, b - table.base)

    try:
        _run(work, todo)
    finally:
        os.close(fd)


def verify_chunks(layout: ShardLayout, table: ChunkTable, dest: np.ndarray) -> None:
    """Check every chunk in ``dest`` (as :func:`read_span` left it): crc32c of the payload equal to the chunk's
    trailer and, for bound cards, to the manifest's value. Raises :class:`CorruptCardError` naming the first
    bad chunk (in grid order) after every worker is done."""
    n = len(table)
    if not n:
        return
    rel = table.payload_offsets()
    ends = rel + table.nbytes
    trailers = np.empty(n, dtype=np.uint32)
    computed = np.empty(n, dtype=np.uint32)
    per = max(1, -(-n // (WORKERS * 4)))

    def work(k: int) -> None:
        for i in range(k, min(n, k + per)):
            a, e = int(rel[i]), int(ends[i])
            computed[i] = _crc32c(dest[a:e - 4])
            trailers[i] = dest[e - 4:e].view("<u4")[0]

    _run(work, range(0, n, per))
    bad = computed != trailers
    if table.expected is not None:
        bad |= computed != table.expected
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        why = "crc32c mismatch" if computed[i] != trailers[i] else \
            "its crc32c is not the one the manifest binds to this position (a chunk from elsewhere)"
        raise _corrupt(layout, int(table.layers[i]), int(table.token_chunks[i]), why)


def _run(work: Callable[..., None], items: object) -> None:
    futures = [_pool().submit(work, item) for item in items]  # type: ignore[attr-defined]
    errors = []
    for f in futures:  # wait for all: no worker may still write into a buffer the caller frees
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]


def _corrupt(layout: ShardLayout, layer: int, j: int, why: str) -> CorruptCardError:
    _, H, T, D = layout.shape
    c = layout.chunk_shape[2]
    t_end = min((j + 1) * c, T) - 1
    where = f"layer {layer}, token {j * c}" + (f"-{t_end}" if t_end > j * c else "")
    return CorruptCardError(f"chunk ({where}) in object {layout.key!r} is corrupt or truncated ({why}); delete "
                            "the card and save it again, or restore it from a replica", card=layout.label,
                            part=layout.which)


__all__ = ["ChunkTable", "chunk_table", "local_path", "pieces", "read_span", "verify_chunks"]
