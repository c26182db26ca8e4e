"""The streaming read path (cachecard.card.stream): chunk tables, pieces, reads and checksum verification."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachecard
from cachecard.card import stream
from cachecard.testing import make_identity, make_kv


def _card(tmp_path, codec="q8", tokens=83, chunk=16, layers=3):
    kv = make_kv(layers=layers, heads=2, tokens=tokens, head_dim=32, dtype="float16")
    cachecard.write_card(tmp_path / "c", kv, np.arange(tokens), make_identity(layers=layers, head_dim=32),
                         codec=codec, chunk_tokens=chunk)
    return cachecard.open_card(tmp_path / "c")


def _read(card, which, tokens, **kw):
    lay = card.shard_layout(which)
    table = stream.chunk_table(lay, range(card.manifest.model.num_layers), tokens)
    buf = np.zeros(table.length, np.uint8)
    stream.read_span(lay, table, buf, **kw)
    return lay, table, buf


@pytest.mark.parametrize("codec", ["lossless", "q8", "q4_0"])
@pytest.mark.parametrize("tokens", [83, 40, 16, 1])
def test_read_span_holds_every_chunk_as_stored(tmp_path, codec, tokens):
    card = _card(tmp_path, codec)
    for which in ("k", "v"):
        lay, table, buf = _read(card, which, tokens, piece_bytes=4096)
        stream.verify_chunks(lay, table, buf)
        enc = card.read_encoded(which, tokens=tokens)
        got = [buf[int(a):int(a) + int(n) - 4] for a, n in zip(table.payload_offsets(), table.nbytes)]
        assert len(got) == len(enc.chunks)
        for g, ch in zip(got, enc.chunks):
            assert np.array_equal(g, ch.payload)
        assert list(zip(table.layers, table.token_chunks)) == [(ch.layer, ch.token_start // lay.chunk_shape[2])
                                                                   for ch in enc.chunks]


def test_on_piece_sees_every_byte_once(tmp_path):
    card = _card(tmp_path, "lossless", tokens=200)
    seen = []
    lay, table, buf = _read(card, "k", 200, piece_bytes=4096, on_piece=lambda a, b: seen.append((a, b)))
    covered = np.zeros(table.length, bool)
    for a, b in seen:
        assert not covered[a:b].any()
        covered[a:b] = True
    for a, n in zip(table.payload_offsets(), table.nbytes):
        assert covered[a:a + n].all()


@settings(max_examples=60)
@given(st.lists(st.integers(4, 1 << 20), min_size=1, max_size=40), st.lists(st.integers(0, 1 << 21), min_size=40,
       max_size=40), st.integers(4096, 1 << 21), st.booleans())
def test_pieces_cover_every_chunk(sizes, gaps, piece, aligned):
    off, pos = [], 5000
    for n, g in zip(sizes, gaps):  # chunks back to back with gaps, as a token prefix of a shard leaves
        off.append(pos)
        pos += n + g
    off, nb = np.array(off, np.int64), np.array(sizes, np.int64)
    table = stream.ChunkTable(np.zeros(len(off), np.int64), np.zeros(len(off), np.int64), off, nb, None,
                              int(off.min()) // 4096 * 4096, 0)
    ps = stream.pieces(table, piece, aligned=aligned)
    owned = np.concatenate([q.chunks for q in ps])
    assert len(owned) == len(set(owned.tolist()))  # no chunk checked twice
    if not aligned:
        assert sorted(owned.tolist()) == list(range(len(off)))  # every chunk checked by the worker that read it
    for q in ps:
        assert q.start < q.end and (not aligned or (q.start % stream.ALIGN == 0 and q.end % stream.ALIGN == 0))
        for i in q.chunks:
            assert q.start <= off[i] and off[i] + nb[i] <= q.end
    for s, n in zip(off, nb):  # every byte of every chunk is read by some piece
        pos = s
        while pos < s + n:
            hit = [q for q in ps if q.start <= pos < q.end]
            assert hit, (pos, ps)
            pos = hit[0].end


def test_read_spans_reads_k_and_v_together_and_verifies(tmp_path):
    card = _card(tmp_path, "q4_0", tokens=300)
    jobs = []
    for which in ("k", "v"):
        lay = card.shard_layout(which)
        table = stream.chunk_table(lay, range(3), 300)
        jobs.append(stream.Job(lay, table, np.zeros(table.length, np.uint8)))
    stream.read_spans(jobs, piece_bytes=4096)
    for job in jobs:
        stream.verify_chunks(job.layout, job.table, job.dest)
    path = stream.local_path(jobs[1].layout)
    data = bytearray(path.read_bytes())
    data[int(jobs[1].table.offsets[7]) + 1] ^= 1
    path.write_bytes(bytes(data))
    for direct in (False, True):
        with pytest.raises(cachecard.CorruptCardError, match="crc32c mismatch"):
            stream.read_spans([stream.Job(j.layout, j.table, _aligned(j.table.length)) for j in jobs],
                              piece_bytes=4096, direct=direct)


def _aligned(n):
    import mmap

    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8)


@pytest.mark.parametrize("where", ["payload", "trailer"])
def test_a_flipped_byte_is_found_and_named(tmp_path, where):
    card = _card(tmp_path, "q8")
    lay, table, buf = _read(card, "v", 83)
    i = 5
    at = int(table.payload_offsets()[i]) + (int(table.nbytes[i]) - 2 if where == "trailer" else 3)
    buf[at] ^= 0x10
    c = lay.chunk_shape[2]
    with pytest.raises(cachecard.CorruptCardError, match=f"layer {int(table.layers[i])}, token "
                                                         f"{int(table.token_chunks[i]) * c}"):
        stream.verify_chunks(lay, table, buf)


def test_a_chunk_that_differs_from_the_bound_checksum_is_refused(tmp_path):
    card = _card(tmp_path, "q8")
    lay = card.shard_layout("k")
    table = stream.chunk_table(lay, range(3), 83)
    wrong = np.zeros((3, 8), np.uint32)  # as a manifest would bind other chunks here
    bound = stream.ChunkTable(table.layers, table.token_chunks, table.offsets, table.nbytes,
                              wrong[table.layers, table.token_chunks], table.base, table.length)
    buf = np.zeros(table.length, np.uint8)
    stream.read_span(lay, bound, buf)
    stream.verify_chunks(lay, table, buf)  # self-consistent chunks...
    with pytest.raises(cachecard.CorruptCardError, match="not the one the manifest binds"):
        stream.verify_chunks(lay, bound, buf)  # ...that are not this card's


def test_truncated_shard_is_an_error_not_zeros(tmp_path):
    card = _card(tmp_path, "q4_0")
    lay = card.shard_layout("k")  # index read and checked before the damage
    path = stream.local_path(lay)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    table = stream.chunk_table(lay, range(3), 83)
    with pytest.raises(cachecard.CorruptCardError, match="shard ends"):
        stream.read_span(lay, table, np.zeros(table.length, np.uint8))


def test_hostile_index_entries_are_refused(tmp_path):
    card = _card(tmp_path, "q8")
    lay = card.shard_layout("k")
    for bad, why in (((10**9, 40), "outside"), ((0, 10**9), "outside"), (None, "overlaps")):
        index = lay.index.copy()
        index[2] = bad if bad is not None else (index[1][0] + 1, index[1][1])
        hostile = stream.ShardLayout(**{**lay.__dict__, "index": index})
        with pytest.raises(cachecard.CorruptCardError, match=why):
            stream.chunk_table(hostile, range(3), 83)


def test_direct_io_reads_the_same_bytes_or_falls_back(tmp_path):
    card = _card(tmp_path, "lossless", tokens=300)
    _, _, plain = _read(card, "k", 300)
    lay = card.shard_layout("k")
    table = stream.chunk_table(lay, range(3), 300)
    import mmap

    aligned = np.frombuffer(mmap.mmap(-1, table.length), np.uint8)  # page-aligned, as O_DIRECT needs
    stream.read_span(lay, table, aligned, direct=True, verify=True)
    for a, n in zip(table.payload_offsets(), table.nbytes):  # direct reads whole pages around the chunks
        assert np.array_equal(aligned[a:a + n], plain[a:a + n])
