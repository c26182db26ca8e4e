"""The fast read path of a format 1.1 shard (spec/cachecard-1.md §5.2, §10).

zarr decodes a shard one inner chunk at a time through its async pipeline, about 0.2 ms per chunk, so a
4K-token card of a 30-layer model (960 inner chunks) reads at a fraction of disk speed. This module reads a
layer range × token range of a card's single shard itself:

1. the shard index (already read and CRC-checked by the reader) gives ``(offset, nbytes)`` per inner chunk;
2. the needed byte ranges are coalesced into a few large ranged reads (``pread`` into a reused buffer for
   local files, concurrent ranged ``get`` requests for object stores);
3. every inner chunk's crc32c is verified (google_crc32c), then the chunk is decoded straight into the
   output: ``np.frombuffer`` for the plain ``bytes`` serializer, ``KVCodec.decode_chunk`` for cachecard's
   codecs, and zarr's own codec pipeline (batched) for anything else.

``read_payloads_into`` reads the same chunks without decoding them: the serializer's payloads (crc32c checked
and removed) back to back in one caller buffer, for runtimes that take a codec's bytes as they are (the MLX
adapter hands ``cachecard.mlx_affine`` payloads to ``QuantizedKVCache`` with no dequantize/requantize; the
torch adapters copy the buffer to a GPU and decode there).

Integrity is the same as zarr's path: an index entry outside the shard's data, a truncated chunk or a CRC
failure is a :class:`CorruptCardError` naming the chunk and the object. On a format 1.3 card every path also
checks each chunk's CRC-32C against the object table's value for its (layer, token chunk) (``expected``), so a
chunk from another card, array or position cannot pass (spec §7.2). Unknown layouts return ``None`` and the
reader falls back to zarr.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from cachecard.card import _zarr
from cachecard.card.table_check import TABLE_MISMATCH, first_misplaced, misplaced, unreadable_is_corrupt
from cachecard.codecs.base import KVCodec
from cachecard.errors import CorruptCardError

from cachecard.card.shard_io import (
    IOV_BATCH, MAX_DIRECT_HEADS, REMOTE_CONCURRENCY, RUN_GAP, _OPEN_FLAGS, _WORKERS, _Chunk, _coalesce, _corrupt,
    _in_workers, _local_path, _pread_into, _preadv_full, _span,
)
from cachecard.card.shard_payloads import check_stored_crcs, encoded_serializer, read_payloads_into  # noqa: F401

def read_shard_region(store: Store, arr: zarr.Array, key: str, shard_size: int, index: np.ndarray,
                      bounds: list[tuple[int, int]], label: str, name: str, out: np.ndarray | None = None, *,
                      expected: np.ndarray | None = None) -> np.ndarray | None:
    """Decode ``bounds`` (per-axis ``(start, stop)`` of (layer, kv_head, token, channel)) of the card array
    ``arr`` from its single shard ``key``; ``None`` if this layout is not one the fast path knows.
    ``expected``: the object table's CRC-32C per (layer, token chunk), checked against every chunk read."""
    meta = arr.metadata
    codecs = meta.codecs
    if arr.ndim != 4 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding: ShardingCodec = codecs[0]
    L, H, T, D = arr.shape
    cl, ch, c, cd = sharding.chunk_shape
    shards = arr.shards
    if (cl, ch, cd) != (1, H, D) or shards is None or tuple(shards[:2]) != (L, H) or shards[3] != D:
        return None
    per_tokens = shards[2] // c
    if shards[2] % c or len(index) != L * per_tokens:
        return None
    pipe = sharding.codec_pipeline
    if list(pipe.array_array_codecs):
        return None
    serializer = pipe.array_bytes_codec
    after = list(pipe.bytes_bytes_codecs)
    storage = np.dtype(arr.dtype).newbyteorder("<")
    decode = _decoder(serializer, after, arr, storage, (1, H, c, D))
    if decode is None:
        return None

    (l0, l1), (h0, h1), (t0, t1), (d0, d1) = bounds
    if out is None:
        out = np.empty((max(0, l1 - l0), max(0, h1 - h0), max(0, t1 - t0), max(0, d1 - d0)), dtype=storage)
    if out.size == 0:
        return out
    data_end = shard_size - (16 * len(index) + 4)
    chunks = []
    for layer in range(l0, l1):
        for j in range(t0 // c, (t1 - 1) // c + 1):
            off, nb = (int(x) for x in index[layer * per_tokens + j])
            if nb < 4 or off > data_end or nb > data_end - off:
                raise _corrupt(label, name, key, layer, j, c, H, D, T,
                               f"its index entry ({off}, {nb}) lies outside the shard's data")
            chunks.append(_Chunk(layer, j, off, nb))
    chunks.sort(key=lambda ch_: ch_.offset)
    runs = _coalesce(chunks)

    def place(buf: np.ndarray, base: int, run: list[_Chunk]) -> None:
        payloads = []
        for ck in run:
            raw = buf[ck.offset - base: ck.offset - base + ck.nbytes]
            if len(raw) != ck.nbytes:
                raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, "the shard is truncated")
            body = raw[:-4]
            stored = int(raw[-4:].view("<u4")[0])
            if google_crc32c.value(body) != stored:
                raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, "crc32c mismatch")
            if misplaced(expected, ck.layer, ck.j, stored):
                raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, TABLE_MISMATCH)
            payloads.append((ck, raw))
        try:
            decoded = decode([raw for _, raw in payloads])
        except CorruptCardError:
            raise
        except Exception as e:  # noqa: BLE001 - a payload that passes its CRC but does not decode
            ck = payloads[0][0]
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, f"{type(e).__name__}: {e}") from e
        for (ck, _), block in zip(payloads, decoded):
            if block.shape != (1, H, c, D):
                raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T,
                               f"decoded to shape {block.shape}, not {(1, H, c, D)}")
            a, b = max(t0, ck.j * c), min(t1, (ck.j + 1) * c)
            out[ck.layer - l0, :, a - t0:b - t0] = block[0, h0:h1, a - ck.j * c:b - ck.j * c, d0:d1]

    path = _local_path(store, key)
    if path is not None and not path.is_file():
        raise CorruptCardError(f"object {key!r} is missing; the card is damaged (or was deleted while being read)",
                               card=label, part=name)
    if path is not None and getattr(decode, "plain", False) and H <= MAX_DIRECT_HEADS and (h0, h1) == (0, H) \
            and (d0, d1) == (0, D):
        check = functools.partial(_corrupt, label, name, key, c=c, H=H, D=D, T=T)
        with unreadable_is_corrupt(label, name, key):
            _read_local_direct(path, runs, out, l0, t0, t1, c, check, expected)
    elif path is not None:
        with unreadable_is_corrupt(label, name, key):
            _read_local(path, runs, place)
    else:
        _read_remote(store, key, runs, place)
    return out


def _decoder(serializer: Any, after: list[Any], arr: zarr.Array, storage: np.dtype,
             shape: tuple[int, ...]) -> Callable[[list[np.ndarray]], list[np.ndarray]] | None:
    """A batch decoder of CRC-checked encoded inner chunks (``payload + crc32c``)."""
    if not after or not isinstance(after[-1], Crc32cCodec):
        return None  # spec: crc32c is always last; anything else goes through zarr
    if len(after) == 1 and isinstance(serializer, BytesCodec) and (
            serializer.endian is None or serializer.endian.value == "little" or storage.itemsize == 1):
        nbytes = int(np.prod(shape)) * storage.itemsize

        def plain(raws: list[np.ndarray]) -> list[np.ndarray]:
            blocks = []
            for raw in raws:
                if len(raw) - 4 != nbytes:
                    raise ValueError(f"chunk holds {len(raw) - 4} bytes, expected {nbytes}")
                blocks.append(raw[:-4].view(storage).reshape(shape))
            return blocks

        plain.plain = True  # type: ignore[attr-defined]
        return plain
    if len(after) == 1 and isinstance(serializer, KVCodec):
        return lambda raws: [serializer.decode_chunk(raw[:-4], shape, storage) for raw in raws]
    # Any other pipeline (e.g. bytes-to-bytes compressors): zarr's codec objects, one batch per run.
    geo = _zarr.shard_geometry(arr)
    return lambda raws: [d.view(storage).reshape(shape) for d in geo.decode_batch(raws)]


def _read_local(path: Path, runs: list[list[_Chunk]], place: Callable[[np.ndarray, int, list[_Chunk]], None],
                workers: int = _WORKERS) -> None:
    fd = os.open(path, _OPEN_FLAGS)
    try:
        def work(batch: list[list[_Chunk]]) -> None:
            buf = np.empty(max(_span(r)[1] - _span(r)[0] for r in batch), dtype=np.uint8)
            for run in batch:
                start, end = _span(run)
                view = buf[:end - start]
                got = _pread_into(fd, view, start)
                place(view[:got], start, run)

        _in_workers(work, runs, workers)
    finally:
        os.close(fd)


def _read_local_direct(path: Path, runs: list[list[_Chunk]], out: np.ndarray, l0: int, t0: int, t1: int, c: int,
                       check: Callable[..., CorruptCardError], expected: np.ndarray | None = None) -> None:
    """Plain (``bytes`` + crc32c) chunks of a local shard: ``preadv`` scatters each chunk's bytes straight
    into the output (one kernel copy, as a raw read does), then the CRC is checked in place. Chunks cut by
    the token range (or holding padding) go through a scratch buffer."""
    nl, H, nt, D = out.shape
    rb = D * out.dtype.itemsize  # bytes per token row of one head
    # (layer, head) rows of bytes: contiguous even when ``out`` is a token-range view of a larger buffer
    rows_np = [[out[li, h].reshape(-1).view(np.uint8) for h in range(H)] for li in range(nl)]
    rows_mv = [[memoryview(x) for x in r] for r in rows_np]
    fd = os.open(path, _OPEN_FLAGS)
    try:
        def work(batch: list[list[_Chunk]]) -> None:
            junk = memoryview(np.empty(RUN_GAP, dtype=np.uint8))
            for run in batch:
                start = run[0].offset
                iov: list[memoryview] = []
                crcs = np.empty((len(run), 4), dtype=np.uint8)
                crc_mv = memoryview(crcs.reshape(-1))
                direct: list[tuple[_Chunk, int, int, int, int]] = []
                scratch: list[tuple[_Chunk, np.ndarray]] = []
                pos = start
                for i, ck in enumerate(run):
                    if ck.offset < pos:  # overlapping chunks (a hostile index): read this one on its own
                        buf = np.empty(ck.nbytes, dtype=np.uint8)
                        if _preadv_full(fd, [memoryview(buf)], ck.offset) != ck.nbytes:
                            raise check(layer=ck.layer, j=ck.j, why="the shard is truncated")
                        scratch.append((ck, buf))
                        continue
                    if ck.offset > pos:
                        iov.append(junk[:ck.offset - pos])
                    a = ck.j * c
                    if a >= t0 and a + c <= t1 and ck.nbytes - 4 == H * c * rb:
                        li, x0, x1 = ck.layer - l0, (a - t0) * rb, (a + c - t0) * rb
                        iov.extend(m[x0:x1] for m in rows_mv[li])
                        iov.append(crc_mv[4 * i:4 * i + 4])
                        direct.append((ck, li, x0, x1, i))
                    else:
                        buf = np.empty(ck.nbytes, dtype=np.uint8)
                        iov.append(memoryview(buf))
                        scratch.append((ck, buf))
                    pos = ck.offset + ck.nbytes
                got, want = 0, 0
                for k in range(0, len(iov), IOV_BATCH):
                    part = iov[k:k + IOV_BATCH]
                    size = sum(len(m) for m in part)
                    got += _preadv_full(fd, part, start + want)
                    want += size
                    if got != want:
                        raise check(layer=run[-1].layer, j=run[-1].j, why="the shard is truncated")
                stored = crcs.view("<u4")[:, 0]
                bad = first_misplaced(expected, [d[0] for d in direct], stored[[d[4] for d in direct]])
                if bad >= 0:
                    raise check(layer=direct[bad][0].layer, j=direct[bad][0].j, why=TABLE_MISMATCH)
                for ck, li, x0, x1, i in direct:
                    crc = 0
                    for row in rows_np[li]:
                        crc = google_crc32c.extend(crc, row[x0:x1])
                    if crc != stored[i]:
                        raise check(layer=ck.layer, j=ck.j, why="crc32c mismatch")
                for ck, buf in scratch:
                    if google_crc32c.value(buf[:-4]) != int(buf[-4:].view("<u4")[0]):
                        raise check(layer=ck.layer, j=ck.j, why="crc32c mismatch")
                    if misplaced(expected, ck.layer, ck.j, int(buf[-4:].view("<u4")[0])):
                        raise check(layer=ck.layer, j=ck.j, why=TABLE_MISMATCH)
                    if len(buf) - 4 != H * c * rb:
                        raise check(layer=ck.layer, j=ck.j, why=f"chunk holds {len(buf) - 4} bytes")
                    block = buf[:-4].view(out.dtype).reshape(H, c, D)
                    a, b = max(t0, ck.j * c), min(t1, (ck.j + 1) * c)
                    out[ck.layer - l0, :, a - t0:b - t0] = block[:, a - ck.j * c:b - ck.j * c]

        _in_workers(work, runs, _WORKERS)
    finally:
        os.close(fd)


def _read_remote(store: Store, key: str, runs: list[list[_Chunk]],
                 place: Callable[[np.ndarray, int, list[_Chunk]], None]) -> None:
    got = _zarr.get_ranges(store, key, [_span(r) for r in runs], REMOTE_CONCURRENCY)
    jobs = [(np.empty(0, np.uint8) if raw is None else np.frombuffer(raw, dtype=np.uint8), _span(run)[0], run)
            for run, raw in zip(runs, got)]
    if len(jobs) == 1 or _WORKERS == 1:
        for job in jobs:
            place(*job)
        return
    with ThreadPoolExecutor(min(_WORKERS, len(jobs))) as pool:
        for f in [pool.submit(place, *job) for job in jobs]:
            f.result()


__all__ = ["check_stored_crcs", "encoded_serializer", "read_payloads_into", "read_shard_region"]
