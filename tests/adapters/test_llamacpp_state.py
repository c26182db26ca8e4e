"""llama.cpp sequence states built in one buffer (no llama.cpp needed): the buffer writer against the
one-``struct.pack``-per-field reference, the fused K/V relayout against the straightforward one, and a card's
state (stored blocks copied, the rest decoded) against decoding the card and building the state from it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachecard
from cachecard.adapters import ggsq
from cachecard.adapters.ggsq import GGML_TYPES, TYPE_IDS, LayerRows, SeqState, StreamState
from cachecard.adapters.llamacpp_card import card_state
from cachecard.adapters.llamacpp_kv import (
    CacheLayout, encode_rows, from_canonical, k_order, neox_to_norm, skeleton, state_buffer,
)
from cachecard.card.reader import Card
from cachecard.codecs.base import NO_CONTEXT
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.errors import KVShapeError, UnsupportedStateError
from cachecard.kv import CanonicalKV
from cachecard.testing import make_identity
from cachecard.testing.ggsq_reference import state_bytes
from cachecard.testing.strategies import seq_states

PLAIN, BLOCKS = ["f32", "f16", "bf16"], ["q8_0", "q4_0", "q4_1"]


@settings(max_examples=150, deadline=None)
@given(seq_states())
def test_buffer_writer_writes_the_reference_bytes(state: SeqState) -> None:
    assert state.to_bytes() == state_bytes(state)
    buf, placed = ggsq.allocate(state)
    for s, p in zip(state.streams, placed.streams):
        for rows, views in ((s.k, p.k), (s.v, p.v)) if s is not None else ():
            for r, view in zip(rows, views):  # the views are the rows' place in the buffer
                assert np.shares_memory(view.data, buf)
                np.testing.assert_array_equal(view.data, r.data)


@settings(max_examples=60, deadline=None)
@given(seq_states())
def test_rows_without_data_are_filled_in_place(state: SeqState) -> None:
    empty = SeqState([None if s is None else StreamState(
        s.positions, s.seq_ids, s.cell_ext, s.v_trans, [LayerRows(r.type_id, r.size, None, r.n_embd) for r in s.k],
        [LayerRows(r.type_id, r.size, None, r.n_embd) for r in s.v]) for s in state.streams],
        state.seq_id, state.cell_ext_size)
    buf, placed = ggsq.allocate(empty)
    for s, p in zip(state.streams, placed.streams):
        for r, view in zip([*s.k, *s.v], [*p.k, *p.v]) if s is not None else ():
            view.data[...] = r.data
    assert buf.tobytes() == state_bytes(state)


def test_rows_of_the_wrong_size_are_refused() -> None:
    st_ = StreamState(np.arange(2, dtype=np.int32), [np.array([0], np.int32)] * 2, [], False,
                      [LayerRows(1, 4, np.zeros((2, 6), np.uint8))], [LayerRows(1, 4, None)])
    with pytest.raises(KVShapeError, match="12 bytes where the layout needs 2 x 4"):
        ggsq.allocate(SeqState([st_], 0))
    st_.k[0].data, st_.v = None, []
    with pytest.raises(KVShapeError, match="1 layers of K and 0 of V"):
        ggsq.allocate(SeqState([st_], 0))


def _old_state(kv: CanonicalKV, pos: np.ndarray, seq_id: int | None, layout: CacheLayout, order: str) -> SeqState:
    """``to_state`` before the buffer builder: permute all of K, then per layer relayout, encode, one array each."""
    n, n_embd = kv.num_tokens, kv.num_kv_heads * kv.head_dim
    k = neox_to_norm(kv.k) if order == "norm" else kv.k
    st_ = StreamState(pos, [np.array([max(seq_id or 0, 0)], np.int32)] * n, [], layout.v_trans)
    for i in range(kv.num_layers):
        krows = encode_rows(k[i].transpose(1, 0, 2).reshape(n, n_embd), layout.k_type)
        st_.k.append(LayerRows(TYPE_IDS[layout.k_type], krows.shape[1], krows))
        if layout.v_trans:
            cols = encode_rows(kv.v[i].transpose(0, 2, 1).reshape(n_embd, n), layout.v_type)
            st_.v.append(LayerRows(TYPE_IDS[layout.v_type], GGML_TYPES[TYPE_IDS[layout.v_type]].block_bytes, cols,
                                   n_embd))
        else:
            vrows = encode_rows(kv.v[i].transpose(1, 0, 2).reshape(n, n_embd), layout.v_type)
            st_.v.append(LayerRows(TYPE_IDS[layout.v_type], vrows.shape[1], vrows))
    streams: list[StreamState | None] = [None] * layout.n_stream
    streams[layout.stream] = st_
    return SeqState(streams, seq_id)


@st.composite
def states_to_build(draw: st.DrawFn) -> tuple:
    """``(kv, positions, seq_id, layout, order)``: any shape, element type, cache layout and K order."""
    heads, dim = draw(st.integers(1, 3)), draw(st.sampled_from([2, 6, 32, 64]))
    shape = (draw(st.integers(1, 3)), heads, draw(st.integers(1, 40)), dim)
    dtype = draw(st.sampled_from(["float32", "float16", ml_dtypes.bfloat16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kv = CanonicalKV(*(rng.standard_normal(shape).astype(dtype) for _ in "kv"))
    types = PLAIN + BLOCKS if heads * dim % 32 == 0 else PLAIN
    v_trans = draw(st.booleans())
    n_stream = draw(st.integers(1, 3))
    layout = CacheLayout(draw(st.sampled_from(types)), draw(st.sampled_from(PLAIN if v_trans else types)), v_trans,
                         n_stream, draw(st.integers(0, n_stream - 1)))
    pos = np.sort(rng.choice(10**6, shape[2], replace=False)).astype(np.int32)
    return kv, pos, draw(st.one_of(st.none(), st.integers(0, 63))), layout, draw(st.sampled_from(["norm", "neox"]))


@settings(max_examples=200, deadline=None)
@given(states_to_build())
def test_fused_builder_equals_the_old_construction(case: tuple) -> None:
    kv, pos, seq_id, layout, order = case
    built = from_canonical(kv, positions=pos, seq_id=seq_id, layout=layout, order=order)
    assert built == state_bytes(_old_state(kv, pos, seq_id, layout, order))


def test_layouts_cachecard_cannot_write_are_refused() -> None:
    pos = np.arange(2, dtype=np.int32)
    for layout, why in ((CacheLayout("q5_0", "f16"), "cannot write KV cache type q5_0"),
                        (CacheLayout("f16", "q8_0", True), "never transposes a q8_0"),
                        (CacheLayout(cell_ext_size=8), "ext block")):
        with pytest.raises(UnsupportedStateError, match=why):
            skeleton(2, 1, 64, layout, pos, 0)
    with pytest.raises(UnsupportedStateError, match="48 channels per token are not whole q8_0"):
        skeleton(2, 1, 48, CacheLayout("q8_0", "q8_0", False), pos, 0)


# -- a card straight into a state -------------------------------------------------------------------------------
def _q8_exact_kv(tokens: int, seed: int = 0) -> CanonicalKV:
    """float32 KV that q8_0 holds exactly (already quantized once), so blocks copied from a q8 card equal blocks
    made again from the decoded card, and the two ways of building a state can be compared byte for byte."""
    rng = np.random.default_rng(seed)
    shape = (2, 3, tokens, 64)
    q = Q8_0Codec()

    def exact(x: np.ndarray) -> np.ndarray:
        return q.decode_array(np.frombuffer(q.encode_array(x, NO_CONTEXT), np.uint8), x.shape)

    return CanonicalKV(*(exact(rng.standard_normal(shape).astype(np.float32)) for _ in "kv"))


@pytest.mark.parametrize("codec", ["lossless", "zstd", "q8", "q4_0"])
@pytest.mark.parametrize("layout", [CacheLayout("f16", "f16", True), CacheLayout("q8_0", "q8_0", False),
                                    CacheLayout("q4_0", "q4_0", False), CacheLayout("f32", "q8_0", False)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tokens", [300, 270])  # 270: the last chunk is cut short
def test_card_state_equals_decoding_and_building(tmp_path, codec: str, layout: CacheLayout, arch: str,
                                                 tokens: int) -> None:
    ident = make_identity(2, 3, 64, "float32", architecture=arch)
    cachecard.write_card(tmp_path / "c", _q8_exact_kv(300), np.arange(300), ident, codec=codec)
    card = cachecard.open_card(tmp_path / "c")
    order = k_order(ident)
    want, _ = state_buffer(card.read(tokens=tokens), seq_id=5, layout=layout, order=order)
    assert card_state(card, tokens, layout, order, seq_id=5).tobytes() == want.tobytes()


@pytest.mark.parametrize("arch,copied", [("qwen2", "K and V"), ("llama", "V")])
def test_block_cards_are_copied_not_decoded(tmp_path, monkeypatch, arch: str, copied: str) -> None:
    """A q8 card into a q8_0 cache: V's blocks (and K's, when K needs no interleave) are copied as stored;
    Card.read, which would decode K and V both, is never called (NORM K is decoded chunk by chunk)."""
    ident = make_identity(2, 3, 64, "float32", architecture=arch)
    kv = _q8_exact_kv(300, seed=1)
    cachecard.write_card(tmp_path / "c", kv, np.arange(300), ident, codec="q8")
    card = cachecard.open_card(tmp_path / "c")
    layout = CacheLayout("q8_0", "q8_0", False)
    monkeypatch.setattr(Card, "read", lambda *a, **k: pytest.fail(f"{copied} are copied: nothing to decode"))
    got = card_state(card, 300, layout, k_order(ident), seq_id=0)
    assert got.tobytes() == from_canonical(kv, layout=layout, order=k_order(ident))
