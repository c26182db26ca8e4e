"""Undecoded reads of a format 1.1+ shard (spec/cachecard-1.md §5.2, §10): the serializer's payloads of a
layer range x token range, crc32c checked (and on a 1.3 card, against the object table) and stripped, back to
back in one caller buffer, for runtimes that take a codec's bytes as they are (the MLX adapter hands
``cachecard.mlx_affine`` payloads to ``QuantizedKVCache``; llama.cpp copies ggml blocks)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ShardingCodec

from cachecard.card import _zarr
from cachecard.card._zarr import RangeByteRequest
from cachecard.card.shard_io import (
    IOV_BATCH, REMOTE_CONCURRENCY, RUN_GAP, _OPEN_FLAGS, _STAGING_WORKERS, _Chunk, _coalesce, _corrupt, _crc32c,
    _in_workers, _local_path,
    _preadv_full,
)
from cachecard.card.table_check import TABLE_MISMATCH, first_misplaced, misplaced, unreadable_is_corrupt
from cachecard.errors import CorruptCardError

def encoded_serializer(arr: zarr.Array) -> Any | None:
    """The serializer of a format 1.1 card array whose inner chunks are ``serializer + crc32c`` (so a
    stored payload is exactly the serializer's bytes); ``None`` for any other layout."""
    codecs = arr.metadata.codecs
    if arr.ndim != 4 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    pipe = codecs[0].codec_pipeline
    after = list(pipe.bytes_bytes_codecs)
    if list(pipe.array_array_codecs) or len(after) != 1 or not isinstance(after[0], Crc32cCodec):
        return None
    return pipe.array_bytes_codec


def _indexed_chunks(arr: zarr.Array, key: str, shard_size: int, index: np.ndarray, layers: range, tokens: range,
                    label: str, name: str) -> list[_Chunk]:
    """The checked index entries of ``layers`` × the token chunks that meet ``tokens``, in (layer, token)
    order: every entry must lie inside the shard's data, and no two may overlap (the undecoded paths hand
    payloads to runtimes as they are, so a chunk must be exactly its own bytes)."""
    L, H, T, D = arr.shape
    c = arr.chunks[2]
    per_tokens = arr.shards[2] // c
    if len(index) != L * per_tokens:
        raise CorruptCardError(f"the shard index of object {key!r} has {len(index)} entries for a grid of "
                               f"{L * per_tokens} chunks; delete the card and save it again", card=label, part=name)
    if not len(layers) or not len(tokens):
        return []
    data_end = shard_size - (16 * len(index) + 4)
    chunks = []
    for layer in layers:
        for j in range(tokens.start // c, (tokens.stop - 1) // c + 1):
            off, nb = (int(x) for x in index[layer * per_tokens + j])
            if nb < 4 or off > data_end or nb > data_end - off:
                raise _corrupt(label, name, key, layer, j, c, H, D, T,
                               f"its index entry ({off}, {nb}) lies outside the shard's data")
            chunks.append(_Chunk(layer, j, off, nb))
    by_offset = sorted(chunks, key=lambda ck: ck.offset)
    for a, b in zip(by_offset, by_offset[1:]):  # our writer never shares bytes between chunks
        if b.offset < a.offset + a.nbytes:
            raise _corrupt(label, name, key, b.layer, b.j, c, H, D, T, "its index entry overlaps another chunk")
    return chunks


def check_stored_crcs(store: Store, arr: zarr.Array, key: str, shard_size: int, index: np.ndarray, layers: range,
                      tokens: range, expected: np.ndarray, label: str, name: str) -> None:
    """For reads that zarr decodes (it checks each chunk against its stored CRC-32C): every chunk of ``layers``
    × the token chunks that meet ``tokens`` must store the object table's CRC-32C for its position. One 4-byte
    ranged read per chunk; only the fallback path needs it."""
    L, H, T, D = arr.shape
    c = arr.chunks[2]
    chunks = _indexed_chunks(arr, key, shard_size, index, layers, tokens, label, name)
    tails = _zarr.get_ranges(store, key, [(ck.offset + ck.nbytes - 4, ck.offset + ck.nbytes) for ck in chunks],
                             REMOTE_CONCURRENCY)
    for ck, tail in zip(chunks, tails):
        if tail is None or len(tail) != 4:
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, "the shard is truncated")
        if misplaced(expected, ck.layer, ck.j, int.from_bytes(tail, "little")):
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, TABLE_MISMATCH)


def _read_encoded_remote(store: Store, arr: zarr.Array, key: str, shard_size: int, index: np.ndarray,
                         layers: range, tokens: range, label: str, name: str,
                         expected: np.ndarray | None) -> list[tuple[int, int, np.ndarray]]:
    """:func:`read_payloads_into` for object stores: one ranged request covers every chunk; returns
    ``(layer, token_chunk_index, payload)`` in (layer, token) order, each crc32c verified and stripped."""
    L, H, T, D = arr.shape
    c = arr.chunks[2]
    chunks = _indexed_chunks(arr, key, shard_size, index, layers, tokens, label, name)
    if not chunks:
        return []
    start = min(ck.offset for ck in chunks)
    end = max(ck.offset + ck.nbytes for ck in chunks)
    got = _zarr.get_bytes(store, key, RangeByteRequest(start, end))
    raw = np.empty(0, np.uint8) if got is None else np.frombuffer(got, dtype=np.uint8)
    out = []
    for ck in chunks:
        part = raw[ck.offset - start:ck.offset - start + ck.nbytes]
        if len(part) != ck.nbytes:
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, "the shard is truncated")
        stored = int(part[-4:].view("<u4")[0])
        if _crc32c(part[:-4]) != stored:
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, "crc32c mismatch")
        if misplaced(expected, ck.layer, ck.j, stored):
            raise _corrupt(label, name, key, ck.layer, ck.j, c, H, D, T, TABLE_MISMATCH)
        out.append((ck.layer, ck.j, part[:-4]))
    return out


def read_payloads_into(store: Store, arr: zarr.Array, key: str, shard_size: int, index: np.ndarray,
                       layers: range, tokens: range, label: str, name: str,
                       alloc: Callable[[int], np.ndarray], *,
                       expected: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
    """The stored payloads of the inner chunks of ``layers`` × the token chunks that meet ``tokens`` of ``arr``
    (one that :func:`encoded_serializer` accepts), crc32c verified and stripped, back to back in one buffer
    from ``alloc(total bytes)`` (a pinned staging buffer for a device copy, say); on local stores parallel
    workers read and check them in place (against ``expected``, the object table's CRC-32C per (layer, token
    chunk), too). Returns ``(layer, token_chunk_index, offset, nbytes)`` per chunk in (layer, token) order."""
    path = _local_path(store, key)
    if path is None:  # object stores: one ranged read, then a copy
        found = _read_encoded_remote(store, arr, key, shard_size, index, layers, tokens, label, name, expected)
        out = alloc(sum(p.nbytes for _, _, p in found))
        places, pos = [], 0
        for layer, j, payload in found:
            out[pos:pos + payload.nbytes] = payload
            places.append((layer, j, pos, payload.nbytes))
            pos += payload.nbytes
        return places
    L, H, T, D = arr.shape
    c = arr.chunks[2]
    chunks = _indexed_chunks(arr, key, shard_size, index, layers, tokens, label, name)
    places, pos = [], 0
    for ck in chunks:
        places.append((ck.layer, ck.j, pos, ck.nbytes - 4))
        pos += ck.nbytes - 4
    out = alloc(pos)
    if not path.is_file():
        raise CorruptCardError(f"object {key!r} is missing; the card is damaged (or was deleted while being read)",
                               card=label, part=name)
    check = functools.partial(_corrupt, label, name, key, c=c, H=H, D=D, T=T)
    with unreadable_is_corrupt(label, name, key):
        _scatter_payloads(path, chunks, [at for _, _, at, _ in places], out, check, expected)
    return places


def _scatter_payloads(path: Path, chunks: list[_Chunk], dest: list[int], out: np.ndarray,
                      check: Callable[..., CorruptCardError], expected: np.ndarray | None) -> None:
    """``preadv`` each chunk's payload straight to ``out[dest:]`` and its crc32c beside it (one kernel copy,
    no staging), then check the CRCs in place; runs of chunks go to parallel workers."""
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].offset)
    runs = _coalesce([chunks[i] for i in order])
    at = {id(chunks[i]): dest[i] for i in order}
    fd = os.open(path, _OPEN_FLAGS)
    try:
        def work(batch: list[list[_Chunk]]) -> None:
            junk = memoryview(np.empty(RUN_GAP, dtype=np.uint8))
            for run in batch:
                crcs = np.empty((len(run), 4), dtype=np.uint8)
                crc_mv = memoryview(crcs.reshape(-1))
                iov: list[memoryview] = []
                pos = start = run[0].offset
                for i, ck in enumerate(run):
                    if ck.offset < pos:  # overlapping chunks: only a hostile index does this
                        raise check(layer=ck.layer, j=ck.j, why="its index entry overlaps another chunk")
                    if ck.offset > pos:
                        iov.append(junk[:ck.offset - pos])
                    a = at[id(ck)]
                    iov.append(memoryview(out[a:a + ck.nbytes - 4]))
                    iov.append(crc_mv[4 * i:4 * i + 4])
                    pos = ck.offset + ck.nbytes
                got = want = 0
                for k in range(0, len(iov), IOV_BATCH):
                    part = iov[k:k + IOV_BATCH]
                    got += _preadv_full(fd, part, start + want)
                    want += sum(len(m) for m in part)
                    if got != want:
                        raise check(layer=run[-1].layer, j=run[-1].j, why="the shard is truncated")
                stored = crcs.view("<u4")[:, 0]
                bad = first_misplaced(expected, run, stored)
                if bad >= 0:
                    raise check(layer=run[bad].layer, j=run[bad].j, why=TABLE_MISMATCH)
                for i, ck in enumerate(run):
                    a = at[id(ck)]
                    if _crc32c(out[a:a + ck.nbytes - 4]) != stored[i]:
                        raise check(layer=ck.layer, j=ck.j, why="crc32c mismatch")

        _in_workers(work, runs, _STAGING_WORKERS)
    finally:
        os.close(fd)


__all__ = ["check_stored_crcs", "encoded_serializer", "read_payloads_into"]
