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
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from zarr.storage import LocalStore

from cachecard.card.reader import ShardLayout
from cachecard.errors import CorruptCardError

try:  # releases the GIL (always, mode 1), so workers check CRCs in parallel; same values as google_crc32c
    from functools import partial

    from crc32c import crc32c as _crc32c_gil

    _crc32c = partial(_crc32c_gil, gil_release_mode=1)
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


@dataclass(frozen=True)
class Piece:
    """One worker's read: file range ``[start, end)`` and the chunks (indices into the table) that lie wholly
    inside it, checked as soon as it is read."""

    start: int
    end: int
    chunks: np.ndarray


def pieces(table: ChunkTable, piece_bytes: int = PIECE_BYTES, *, aligned: bool = False,
           tail_bytes: int = 0) -> list[Piece]:
    """The reads of a table, about ``piece_bytes`` each, skipping gaps over MAX_GAP: cut at chunk boundaries
    (every chunk in one piece), or with ``aligned`` at ALIGN boundaries (for O_DIRECT; a chunk may then
    straddle two pieces and belongs to neither's ``chunks``). The last ``tail_bytes`` are cut in quarter
    pieces: the last wave of reads is then small, and so is the copy that cannot overlap a read."""
    if not len(table):
        return []
    order = np.argsort(table.offsets, kind="stable")
    starts, ends = table.offsets[order].tolist(), (table.offsets + table.nbytes)[order].tolist()
    if aligned:
        piece_bytes = max(ALIGN, -(-piece_bytes // ALIGN) * ALIGN)
    small = max(ALIGN, piece_bytes // 4 // ALIGN * ALIGN)
    end_all = ends[-1]
    ranges: list[tuple[int, int]] = []
    a = starts[0] // ALIGN * ALIGN if aligned else starts[0]
    b = a

    def size(at: int) -> int:
        return small if end_all - at <= tail_bytes else piece_bytes

    for s, e in zip(starts, ends):
        if s - b > MAX_GAP or (not aligned and e - a > size(a) and b > a):  # close the piece
            ranges.append((a, -(-b // ALIGN) * ALIGN if aligned else b))
            a = s // ALIGN * ALIGN if aligned else s
        b = max(b, e)
        while aligned and b - a >= size(a):
            ranges.append((a, a + size(a)))
            a += size(a)
    if b > a:
        ranges.append((a, -(-b // ALIGN) * ALIGN if aligned else b))
    lo = np.searchsorted(starts, [r[0] for r in ranges], side="left")
    hi = np.searchsorted(ends, [r[1] for r in ranges], side="right")
    return [Piece(r[0], r[1], order[i:j][np.asarray(starts[i:j]) >= r[0]] if j > i else order[:0])
            for r, i, j in zip(ranges, lo, hi)]


@dataclass
class Job:
    """One array's streamed read: where from, which chunks, into which buffer, and who hears of each piece."""

    layout: ShardLayout
    table: ChunkTable
    dest: np.ndarray
    on_piece: Callable[[int, int], None] | None = None


def read_span(layout: ShardLayout, table: ChunkTable, dest: np.ndarray, *,
              on_piece: Callable[[int, int], None] | None = None, direct: bool = False, verify: bool = False,
              piece_bytes: int = PIECE_BYTES) -> None:
    """:func:`read_spans` of one array."""
    read_spans([Job(layout, table, dest, on_piece)], direct=direct, verify=verify, piece_bytes=piece_bytes)


def read_spans(jobs: list[Job], *, direct: bool = False, verify: bool = True,
               piece_bytes: int = PIECE_BYTES) -> None:
    """Read every chunk of each job's table into its ``dest`` (uint8, at least ``table.length`` bytes; file
    offset ``table.base`` lands at ``dest[0]``): the pieces of all jobs go to one pool of workers, and as soon as
    a piece is read, ``on_piece(a, b)`` runs with its range in ``dest`` in the calling thread (so device copies
    are launched from one thread) while the worker, with ``verify``, checks the crc32c of the chunks it read (what :func:`verify_chunks` checks), so checksums overlap the reads and the
    device copies. ``direct`` uses O_DIRECT (``dest`` must then be ALIGN-aligned, as pinned and page-allocated
    memory is). Raises :class:`CorruptCardError` (a shard shorter than its index, a chunk failing its
    checksum) only after every worker is done."""
    opened: list[int] = []
    work: list[tuple[int, Job, Piece, np.ndarray, int]] = []
    sums: list[np.ndarray] = []
    try:
        for job in jobs:
            path = local_path(job.layout)
            if path is None:
                raise ValueError(f"card {job.layout.label}: streaming reads need a local card; use read_encoded")
            if job.dest.nbytes < job.table.length:
                raise ValueError(f"dest holds {job.dest.nbytes} bytes; the read needs {job.table.length}")
            fd = _open(path, job.layout, direct)
            opened.append(fd)
            computed = np.zeros(len(job.table), dtype=np.uint32)
            sums.append(computed)
            last = int((job.table.offsets + job.table.nbytes).max()) if len(job.table) else 0
            for piece in pieces(job.table, piece_bytes, aligned=direct, tail_bytes=WORKERS * piece_bytes // 2):
                work.append((fd, job, piece, computed, last))
        work.sort(key=lambda w: w[2].start - w[2].end)  # big pieces first, every array's small tail last
        done = np.zeros(0, dtype=np.int64)
        landed: queue.SimpleQueue = queue.SimpleQueue()
        callbacks = sum(1 for w in work if w[1].on_piece is not None)

        def read(item: tuple[int, Job, Piece, np.ndarray, int]) -> None:
            fd, job, piece, computed, last = item
            base = job.table.base
            view = memoryview(job.dest[piece.start - base:piece.end - base])
            got = 0
            try:
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], piece.start + got)
                    if n == 0:
                        break
                    got += n
                if piece.start + got < min(piece.end, last):
                    raise _corrupt(job.layout, 0, 0, f"the shard ends at byte {piece.start + got}; its index "
                                                     f"needs {last}")
            finally:  # the caller's thread waits for one message per piece, whatever happens
                if job.on_piece is not None:
                    landed.put((job.on_piece, piece.start - base, piece.end - base))
            if verify:
                _crcs(job, piece.chunks, computed)

        futures = [_pool().submit(read, w) for w in work]
        for _ in range(callbacks):  # on_piece runs here, in the caller's thread (device copies: one launcher)
            on_piece, a, b = landed.get()
            on_piece(a, b)
        _wait(futures)
        if verify:
            for job, computed in zip(jobs, sums):
                covered = np.concatenate([w[2].chunks for w in work if w[1] is job] or [done])
                rest = np.setdiff1d(np.arange(len(job.table)), covered)  # chunks that straddled two pieces
                if len(rest):
                    per = max(1, -(-len(rest) // (WORKERS * 2)))
                    _run(lambda k, job=job, computed=computed, rest=rest: _crcs(job, rest[k:k + per], computed),
                         range(0, len(rest), per))
                check_crcs(job.layout, job.table, job.dest, computed)
    finally:
        for fd in opened:
            os.close(fd)


def verify_chunks(layout: ShardLayout, table: ChunkTable, dest: np.ndarray) -> None:
    """Check every chunk in ``dest`` (as :func:`read_span` left it): crc32c of the payload equal to the chunk's
    trailer and, for bound cards, to the manifest's value. Raises :class:`CorruptCardError` naming the first
    bad chunk (in grid order) after every worker is done."""
    n = len(table)
    if not n:
        return
    computed = np.zeros(n, dtype=np.uint32)
    job = Job(layout, table, dest)
    per = max(1, -(-n // (WORKERS * 4)))
    _run(lambda k: _crcs(job, np.arange(k, min(n, k + per)), computed), range(0, n, per))
    check_crcs(layout, table, dest, computed)


def _open(path: Path, layout: ShardLayout, direct: bool) -> int:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise CorruptCardError(f"object {layout.key!r} is missing; the card is damaged (or was deleted while "
                               "being read)", card=layout.label, part=layout.which) from None
    except OSError:  # a file system without O_DIRECT: read through the page cache
        return os.open(path, os.O_RDONLY)


def _crcs(job: Job, which: np.ndarray, out: np.ndarray) -> None:
    """crc32c of the payload of each chunk ``which`` (indices into the table) into ``out``."""
    mv = memoryview(job.dest)
    rel = job.table.payload_offsets()[which].tolist()
    size = job.table.nbytes[which].tolist()
    for i, a, n in zip(which.tolist(), rel, size):
        out[i] = _crc32c(mv[a:a + n - 4])


def check_crcs(layout: ShardLayout, table: ChunkTable, dest: np.ndarray, computed: np.ndarray) -> None:
    """Checksums computed over each chunk's payload (here or on a device) against the chunk's trailer in
    ``dest`` and the manifest's binding, vectorised; :class:`CorruptCardError` names the first bad chunk."""
    if not len(table):
        return
    tail = (table.payload_offsets() + table.nbytes - 4)[:, None] + np.arange(4)
    trailers = dest[tail].view("<u4").reshape(-1)
    bad = computed != trailers
    if table.expected is not None:
        bad |= computed != table.expected
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        why = "crc32c mismatch" if computed[i] != trailers[i] else \
            "its crc32c is not the one the manifest binds to this position (a chunk from elsewhere)"
        raise _corrupt(layout, int(table.layers[i]), int(table.token_chunks[i]), why)


def _run(work: Callable[..., None], items: object) -> None:
    _wait([_pool().submit(work, item) for item in items])  # type: ignore[attr-defined]


def _wait(futures: list) -> None:
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


__all__ = ["ChunkTable", "Job", "Piece", "check_crcs", "chunk_table", "local_path", "pieces", "read_span", "read_spans",
           "verify_chunks"]
