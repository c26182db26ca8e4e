"""Shared pieces of the shard readers (spec/cachecard-1.md §5.2): chunk records, read coalescing, positional
reads that finish, worker fan-out and the corruption error naming a chunk. Used by ``shard_read`` (decoded
regions) and ``shard_payloads`` (undecoded payloads)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
from zarr.abc.store import Store
from zarr.storage import LocalStore

from cachecard.errors import CorruptCardError

RUN_GAP = 64 << 10        # coalesce ranges separated by less than this many bytes
RUN_MAX = 8 << 20         # but keep each read at most this large (streamed through a reused buffer)
REMOTE_CONCURRENCY = 16   # ranged requests in flight per read on object stores
MAX_DIRECT_HEADS = 64     # scatter-read chunks straight into the output up to this many KV heads
IOV_BATCH = 1000          # iovecs per preadv call (Linux IOV_MAX is 1024)
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_STAGING_WORKERS = max(1, min(8, os.cpu_count() or 1))  # read_payloads_into: big reads for device restores
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)  # a card never reads through a symbolic link

try:  # the crc32c package releases the GIL, so parallel workers check CRCs in parallel; same values
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - google_crc32c is always there (zarr's own dependency)
    _crc32c = google_crc32c.value


@dataclass(frozen=True)
class _Chunk:
    layer: int      # grid coordinate along layers
    j: int          # token-chunk index
    offset: int
    nbytes: int


def _coalesce(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    runs: list[list[_Chunk]] = []
    start = end = 0
    for ck in chunks:  # sorted by offset
        if runs and ck.offset - end <= RUN_GAP and ck.offset + ck.nbytes - start <= RUN_MAX:
            runs[-1].append(ck)
            end = max(end, ck.offset + ck.nbytes)
            continue
        runs.append([ck])
        start, end = ck.offset, ck.offset + ck.nbytes
    return runs


def _span(run: list[_Chunk]) -> tuple[int, int]:
    return run[0].offset, max(x.offset + x.nbytes for x in run)


def _local_path(store: Store, key: str) -> Path | None:
    if type(store) is LocalStore:
        return Path(store.root) / key
    return None


def _in_workers(work: Callable[[list[list[_Chunk]]], None], runs: list[list[_Chunk]], workers: int) -> None:
    """``work`` over ``runs`` dealt round-robin to up to ``workers`` threads (reads release the GIL)."""
    n = min(workers, len(runs))
    if n <= 1:
        work(runs)
        return
    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(work, runs[i::n]) for i in range(n)]:
            f.result()


def _preadv_full(fd: int, bufs: list[memoryview], offset: int) -> int:
    """preadv until every buffer is full or the file ends; returns the bytes read."""
    total = sum(len(m) for m in bufs)
    got = os.preadv(fd, bufs, offset)
    if got == total or got == 0:
        return got
    # A short read (rare on regular files): finish buffer by buffer.
    done = got
    skip = got
    for m in bufs:
        if skip >= len(m):
            skip -= len(m)
            continue
        part = m[skip:]
        skip = 0
        while len(part):
            n = os.preadv(fd, [part], offset + done)
            if n == 0:
                return done
            done += n
            part = part[n:]
    return done


def _pread_into(fd: int, view: np.ndarray, offset: int) -> int:
    mv = memoryview(view)
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break  # end of file: the caller reports truncation
        got += n
    return got


def _corrupt(label: str, name: str, key: str, layer: int = 0, j: int = 0, c: int = 1, H: int = 1, D: int = 1,
             T: int = 1, why: str = "") -> CorruptCardError:
    t_end = min((j + 1) * c, T) - 1
    where = (f"layer {layer}, kv_head 0" + (f"-{H - 1}" if H > 1 else "") + f", token {j * c}"
             + (f"-{t_end}" if t_end > j * c else "") + ", channel 0" + (f"-{D - 1}" if D > 1 else ""))
    return CorruptCardError(f"chunk ({where}) in object {key!r} is corrupt or truncated ({why}); "
                            "delete the card and save it again, or restore it from a replica", card=label, part=name)



