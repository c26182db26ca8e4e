"""spec/codecs/frontier.md is enough to decode a frontier chunk: an independent pure-Python decoder written
from the text (cachecard.testing.frontier_reference) agrees bit for bit with cachecard.codecs.frontier on
every golden vector and on hypothesis data, its rANS encoder reproduces constriction's words, and both
refuse the same damaged streams."""

from __future__ import annotations

import json
from pathlib import Path

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachecard.codecs.base import NO_CONTEXT, ChunkContext, from_float32
from cachecard.codecs.frontier import FrontierCodec, model_of
from cachecard.testing import frontier_reference as ref
from cachecard.testing.codec_cases import VECTORS
from cachecard.testing.codec_data import kv_like, stored

GOLDEN = Path(__file__).parents[2] / "spec" / "vectors" / "codecs"
FRONTIER = [v for v in VECTORS if v[1] == "cachecard.frontier"]


def golden(name: str) -> tuple[FrontierCodec, np.ndarray, bytes, np.ndarray]:
    folder = GOLDEN / name
    codec = FrontierCodec.from_dict(json.loads((folder / "case.json").read_text())["codec"])
    return codec, np.load(folder / "input.npy"), (folder / "encoded.bin").read_bytes(), np.load(folder / "decoded.npy")


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def test_there_are_frontier_golden_vectors():
    assert len(FRONTIER) >= 2 and all((GOLDEN / v[0]).is_dir() for v in FRONTIER)


@pytest.mark.parametrize("case", FRONTIER, ids=[v[0] for v in FRONTIER])
def test_reference_decodes_golden_vector_like_the_codec(case):
    codec, x, encoded, decoded = golden(case[0])
    want = codec.decode_array(np.frombuffer(encoded, np.uint8), x.shape)
    got = ref.decode(encoded, x.shape, codec.config.seed)
    assert np.array_equal(bits(got), bits(want))
    assert np.array_equal(bits(from_float32(got, x.dtype)), bits(decoded))


@pytest.mark.parametrize("case", FRONTIER, ids=[v[0] for v in FRONTIER])
def test_reference_reencodes_golden_stream_and_fields(case):
    """parse/build is the byte layout of the spec; the reference rANS encoder gives the stored words."""
    codec, x, encoded, _ = golden(case[0])
    chunk = ref.parse(encoded, x.shape)
    assert ref.build(chunk) == encoded
    assert len(chunk.counts) > 1 and len(chunk.words) > 0, "the golden vector should exercise rANS"
    cdf = ref.quantized_cdf(chunk.counts)
    symbols = ref.rans_decode(chunk.words, cdf, int(chunk.counts.sum()))
    assert np.array_equal(np.bincount(symbols, minlength=len(chunk.counts)), chunk.counts)
    assert ref.rans_encode(symbols, cdf) == chunk.words.tolist()


@st.composite
def frontier_chunks(draw):
    cfg = dict(step=draw(st.sampled_from([0.05, 0.3, 0.8, 2.0, 4.0])), center=draw(st.booleans()),
               sinks=draw(st.integers(0, 3)), recent=draw(st.integers(0, 4)),
               salient=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), seed=draw(st.integers(0, 2**63 - 1)))
    d = draw(st.sampled_from([2, 4, 8, 32, 64]))
    h, c = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    x = kv_like((1, h, c, d), draw(st.integers(0, 2**16)), draw(st.sampled_from([1e-3, 1.0, 40.0])),
                outliers=draw(st.booleans()))
    if draw(st.booleans()):
        x[:, :, : draw(st.integers(0, c))] = 0
    x = stored(x, draw(st.sampled_from(["float32", "float16", "bfloat16"])))
    ctx = draw(st.sampled_from([NO_CONTEXT, ChunkContext(valid_tokens=c, card_tokens=c, positions=np.arange(c))]))
    return FrontierCodec(**cfg), x, ctx


@settings(max_examples=60, deadline=None)
@given(frontier_chunks())
def test_reference_decoder_equals_codec_on_random_chunks(chunk):
    codec, x, ctx = chunk
    data = codec.encode_chunk(x, ctx)
    want = codec.decode_array(np.frombuffer(data, np.uint8), x.shape)
    assert np.array_equal(bits(ref.decode(data, x.shape, codec.config.seed)), bits(want))


counts_strategy = st.one_of(
    st.lists(st.integers(0, 50), min_size=2, max_size=40),
    st.lists(st.integers(0, 2**20), min_size=2, max_size=300),
    st.builds(lambda n, big: [big] + [1] * n + [0, 3], st.integers(0, 2000), st.integers(1, 2**31)),
).filter(lambda c: sum(c) > 0)


@settings(max_examples=80, deadline=None)
@given(counts_strategy, st.integers(0, 2**32 - 1), st.integers(1, 600))
def test_reference_rans_equals_constriction(counts, seed, n):
    """Same model, same words, both directions; symbols of zero count are still codable (the model leaks)."""
    counts = np.asarray(counts, np.uint32)
    rng = np.random.default_rng(seed)
    symbols = rng.integers(0, len(counts), n).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, model_of(counts))
    words = coder.get_compressed()
    cdf = ref.quantized_cdf(counts)
    assert ref.rans_encode(symbols.tolist(), cdf) == words.tolist()
    assert ref.rans_decode(words, cdf, n) == symbols.tolist()


def test_reference_and_codec_refuse_the_same_damaged_streams():
    """Bit flips in the rANS words of a golden chunk: either both refuse, or both decode the same values."""
    codec, x, encoded, _ = golden(FRONTIER[0][0])
    chunk = ref.parse(encoded, x.shape)
    start = len(encoded) - 4 * len(chunk.words)
    rng = np.random.default_rng(13)
    outcomes = {"refused": 0, "decoded": 0}
    for flip in [*(rng.integers(start * 8, len(encoded) * 8, 150)), len(encoded) * 8 - 1]:
        damaged = bytearray(encoded)
        damaged[flip // 8] ^= 1 << (flip % 8)
        results = []
        for decode in (lambda b: codec.decode_array(np.frombuffer(b, np.uint8), x.shape),
                       lambda b: ref.decode(b, x.shape, codec.config.seed)):
            try:
                results.append(bits(decode(bytes(damaged))))
            except ValueError:
                results.append(None)
        assert (results[0] is None) == (results[1] is None), f"bit {flip}: one decoder refused, the other did not"
        if results[0] is not None:
            assert np.array_equal(results[0], results[1])
        outcomes["refused" if results[0] is None else "decoded"] += 1
    assert outcomes["refused"] > 0


def test_stream_ending_in_a_zero_word_or_with_state_left_is_refused():
    counts = np.array([3, 1], np.uint32)
    cdf = ref.quantized_cdf(counts)
    words = ref.rans_encode([0, 1, 0, 1], cdf)
    assert ref.rans_decode(np.array(words, np.uint32), cdf, 4) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="last word is 0"):
        ref.rans_decode(np.array(words + [0], np.uint32), cdf, 4)
    with pytest.raises(ValueError):
        constriction.stream.stack.AnsCoder(np.array(words + [0], np.uint32))
    with pytest.raises(ValueError, match="not 0"):              # one symbol too few: state left over
        ref.rans_decode(np.array(words, np.uint32), cdf, 3)
    coder = constriction.stream.stack.AnsCoder(np.array(words, np.uint32))
    coder.decode(model_of(counts), 3)
    assert not coder.is_empty()
    # trailing symbols 0 (whose cdf starts at 0) leave an empty state unchanged: the count is what ends a stream
    assert ref.rans_encode([1, 0, 0], cdf) == ref.rans_encode([1], cdf)


def test_spec_tables_equal_the_codec():
    from cachecard.codecs.frontier import FRAC

    assert np.array_equal(ref.F.view(np.uint32), FRAC.view(np.uint32))
