"""MLX (mlx-lm) adapter: KVCache / QuantizedKVCache <-> card, direct Q4 injection, generation after a restore,
mlx-lm prompt-cache files, and (marked ``model``) SmolLM2 in MLX and across transformers <-> MLX."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import cachecard  # noqa: E402
from cachecard.adapters import mlx as mlxa  # noqa: E402
from cachecard.adapters import mlx_cache  # noqa: E402
from cachecard.codecs.presets import PRESETS  # noqa: E402
from cachecard.kv import NUMPY_DTYPES  # noqa: E402
from mlx_lm import generate, stream_generate  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import KVCache, QuantizedKVCache, load_prompt_cache, make_prompt_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

VOCAB = 128
HEAD_DIM = 64  # mlx_affine groups of 64 channels need head_dim a multiple of 64


# -- a tiny random mlx-lm llama and an in-memory tokenizer ---------------------------------------------------
def tiny_model(dtype: str = "float32", seed: int = 0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
                           vocab_size=VOCAB)
    model = llama.Model(args)
    model.set_dtype(mlx_cache.MX_DTYPES[dtype])
    mx.eval(model.parameters())
    return model


def tiny_tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=t, eos_token="w127"))


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB - 1, n).tolist()  # never w127, the EOS


def prefill(model, ids: list[int]) -> list:
    cache = make_prompt_cache(model)
    model(mx.array([ids]), cache=cache)
    mx.eval([c.state[:2] for c in cache])
    return cache


def identity(model):
    return mlxa.model_identity(model, tokenizer=tiny_tokenizer(), name="tiny")


def equal_bits(a: mx.array, b: mx.array) -> bool:
    a, b = mlxa.to_numpy(a), mlxa.to_numpy(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    u = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(u), b.view(u)))


def quantized_state_equal(ours: list, theirs: list) -> bool:
    """Bit-equal (packed, scales, biases) of K and V over each layer's first ``offset`` tokens."""
    for a, b in zip(ours, theirs, strict=True):
        if (a.offset, a.group_size, a.bits) != (b.offset, b.group_size, b.bits):
            return False
        for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
            if not equal_bits(x[..., :a.offset, :], y[..., :b.offset, :]):
                return False
    return True


# -- fast tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kvcache_card_round_trip_is_bit_exact(tmp_path, dtype):
    model = tiny_model(dtype)
    ids = prompt_ids(37)
    cache = prefill(model, ids)
    assert cache[0].keys.shape[2] == 256  # mlx-lm's preallocated buffer: only `offset` tokens are KV
    ident = identity(model)
    assert ident.kv_dtype == dtype and ident.architecture == "llama" and ident.head_dim == HEAD_DIM
    mlxa.save(tmp_path / "c", model, cache, ids, identity=ident)

    restored = mlxa.restore(tmp_path / "c", model, identity=ident)
    for a, b in zip(restored, cache, strict=True):
        assert isinstance(a, KVCache) and a.offset == b.offset == 37
        assert equal_bits(a.keys[..., :37, :], b.keys[..., :37, :])
        assert equal_bits(a.values[..., :37, :], b.values[..., :37, :])
        assert a.keys.shape[2] == 256 and not mlxa.to_numpy(a.keys[..., 37:, :]).any()  # laid out as mlx-lm's
    assert mlxa.to_canonical(restored).equal(mlxa.to_canonical(cache))


@pytest.mark.parametrize("quantized", [None, (64, 4)])
def test_first_step_after_a_restore_writes_in_place(tmp_path, quantized):
    """A restored layer has room for the next token even at a multiple of 256 tokens, where mlx-lm's own
    buffer is full and its next step copies the whole cache to grow it; the step's KV is the live cache's."""
    model = tiny_model()
    ids = prompt_ids(257)
    cache = prefill(model, ids[:256])
    mlxa.save(tmp_path / "c", model, cache, ids[:256], identity=identity(model), codec="q4" if quantized else "lossless")
    restored = mlxa.restore(tmp_path / "c", model, identity=identity(model), quantized=quantized)
    first = restored[0].keys[0] if quantized else restored[0].keys
    assert first.shape[2] == 512
    mx.eval(model(mx.array([ids[256:]]), cache=restored))
    assert restored[0].offset == 257 and (restored[0].keys[0] if quantized else restored[0].keys) is first
    if quantized is None:
        mx.eval(model(mx.array([ids[256:]]), cache=cache))
        assert mlxa.to_canonical(restored).equal(mlxa.to_canonical(cache))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_q4_card_goes_into_quantized_cache_bit_identical(tmp_path, monkeypatch, dtype, bits):
    """A cachecard.mlx_affine card restores to exactly the state KVCache.to_quantized gives, no requantizing."""
    model = tiny_model(dtype)
    ids = prompt_ids(300)  # two token chunks of the card, two 256-steps of mlx-lm's buffer
    cache = prefill(model, ids)
    mlxa.save(tmp_path / "c", model, cache, ids, identity=identity(model), codec="q4" if bits == 4 else "mlx8",
              chunk_tokens=128)
    theirs = [c.to_quantized(group_size=64, bits=bits) for c in cache]

    card = cachecard.open_card(tmp_path / "c")
    split, decoded = mlxa.MLXAffineCodec.split, []
    monkeypatch.setattr(mlxa.MLXAffineCodec, "split", lambda self, *a: decoded.append(1) or split(self, *a))
    monkeypatch.setattr(mlxa.MLXAffineCodec, "decode_array", None)  # the direct path never decodes
    ours = mlxa.restore(card, model, identity=identity(model), quantized=(64, bits))
    assert len(decoded) == 2 * 2 * 3, "the direct path reads every chunk's payload (K, V x 2 layers x 3 chunks)"
    assert all(isinstance(c, QuantizedKVCache) for c in ours)
    assert quantized_state_equal(ours, theirs)
    # and the first 100 tokens only
    part = mlxa.restore(card, model, identity=identity(model), quantized=(64, bits), tokens=100)
    assert part[0].offset == 100 and equal_bits(part[1].keys[1][..., :100, :], theirs[1].keys[1][..., :100, :])
    if dtype != "float32":  # a model computing in float32 gets the card's 16-bit scales widened, exactly
        wide = mlxa.cache_from_card(card, quantized=(64, bits), dtype="float32")
        assert wide[0].keys[1].dtype == mx.float32 and equal_bits(wide[0].keys[0], ours[0].keys[0])
        assert np.array_equal(mlxa.to_numpy(wide[0].keys[1]), mlxa.to_numpy(ours[0].keys[1]).astype(np.float32))


def test_read_encoded_verifies_checksums(tmp_path):
    model = tiny_model()
    ids = prompt_ids(20)
    mlxa.save(tmp_path / "c", model, prefill(model, ids), ids, identity=identity(model), codec="q4")
    enc = cachecard.open_card(tmp_path / "c").read_encoded("k")
    assert [(c.layer, c.token_start, c.tokens) for c in enc.chunks] == [(0, 0, 20), (1, 0, 20)]
    shard = next(p for p in (tmp_path / "c").rglob("*") if p.is_file() and "k/c" in p.as_posix())
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # inside the first chunk's payload
    shard.write_bytes(bytes(raw))
    with pytest.raises(cachecard.CorruptCardError, match="crc32c mismatch"):
        cachecard.open_card(tmp_path / "c").read_encoded("k")
    with pytest.raises(cachecard.UnsupportedCodecError, match="use read"):
        mlxa.save(tmp_path / "z", model, prefill(model, ids), ids, identity=identity(model), codec="zstd")
        cachecard.open_card(tmp_path / "z").read_encoded("v")


@pytest.mark.parametrize("preset", ["q8", "q4_1", "q4"])
def test_other_codecs_are_dequantized_within_their_bound(tmp_path, preset):
    model = tiny_model()
    ids = prompt_ids(40)
    cache = prefill(model, ids)
    exact = mlxa.to_canonical(cache)
    mlxa.save(tmp_path / "c", model, cache, ids, identity=identity(model), codec=preset)
    # q4 asked as 8-bit is not the stored configuration: decoded, then quantized by mx.quantize
    got = mlxa.restore(tmp_path / "c", model, identity=identity(model), quantized=(64, 8) if preset == "q4" else None)
    kv = mlxa.to_canonical(got)
    codec = PRESETS[preset].k(exact.k, None).serializer
    for which in ("k", "v"):
        x, y = getattr(exact, which).astype(np.float32), getattr(kv, which).astype(np.float32)
        err = np.abs(x - y)
        bound = codec.error_bound(x)
        if preset == "q4":  # plus one 8-bit requantization step of the decoded values
            bound = bound + mlxa.MLXAffineCodec(bits=8, group_size=64).error_bound(y)
        assert np.all(err <= bound), f"{which}: max excess {np.max(err - bound)}"
        assert err.max() > 0  # lossy, and really decoded


def test_to_canonical_refuses_what_is_not_one_plain_sequence():
    from mlx_lm.models.cache import RotatingKVCache

    model = tiny_model()
    cache = make_prompt_cache(model)
    with pytest.raises(cachecard.KVShapeError, match="holds no KV yet"):
        mlxa.to_canonical(cache)
    model(mx.array([[1, 2, 3], [4, 5, 6]]), cache=cache)
    with pytest.raises(cachecard.KVShapeError, match="batch of 2"):
        mlxa.to_canonical(cache)
    with pytest.raises(cachecard.KVShapeError, match="RotatingKVCache"):
        mlxa.to_canonical([RotatingKVCache(max_size=8)])


def test_identity_mismatch_is_refused(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    ids = prompt_ids(12)
    mlxa.save(tmp_path / "c", model, prefill(model, ids), ids, identity=identity(model))
    with pytest.raises(cachecard.IdentityMismatchError, match="weights_hash: card has 'sha256:"):
        mlxa.restore(tmp_path / "c", other, identity=identity(other))
    with pytest.raises(cachecard.IdentityMismatchError, match="weights_hash"):
        mlxa.restore(tmp_path / "c", other)  # no identity given: weights and shapes still checked
    mlxa.restore(tmp_path / "c", model)  # the same model passes
    with pytest.raises(TypeError, match="tokenizer="):
        mlxa.model_identity(model)


def test_restore_continues_generation_exactly(tmp_path):
    """generate / stream_generate after a restored card equal generation from the whole prompt."""
    model, tok = tiny_model(), tiny_tokenizer()
    ids = prompt_ids(50)
    greedy = make_sampler(temp=0.0)
    ref = [r.token for r in stream_generate(model, tok, prompt=ids, max_tokens=12, sampler=greedy)]
    mlxa.save(tmp_path / "c", model, prefill(model, ids[:-1]), ids[:-1], identity=identity(model))

    cache = mlxa.restore(tmp_path / "c", model, identity=identity(model))
    got = [r.token for r in stream_generate(model, tok, prompt=ids[-1:], max_tokens=12, sampler=greedy,
                                            prompt_cache=cache)]
    assert got == ref
    text = generate(model, tok, prompt=ids[-1:], max_tokens=12, sampler=greedy,
                    prompt_cache=mlxa.restore(tmp_path / "c", model, identity=identity(model)))
    assert text == tok.decode(ref)


def test_quantized_restore_continues_like_mlx_lm_quantized_cache(tmp_path):
    """Generation from a directly injected Q4 card equals generation from mlx-lm's own to_quantized cache."""
    model, tok = tiny_model(), tiny_tokenizer()
    ids = prompt_ids(50)
    greedy = make_sampler(temp=0.0)
    cache = prefill(model, ids[:-1])
    mlxa.save(tmp_path / "c", model, cache, ids[:-1], identity=identity(model), codec="q4")
    theirs = [c.to_quantized(group_size=64, bits=4) for c in cache]
    ours = mlxa.restore(tmp_path / "c", model, identity=identity(model), quantized=(64, 4))

    def run(pc):
        return [r.token for r in stream_generate(model, tok, prompt=ids[-1:], max_tokens=10, sampler=greedy,
                                                 prompt_cache=pc)]

    assert run(ours) == run(theirs)


def test_prompt_cache_files_both_ways(tmp_path):
    model = tiny_model("float16")
    ids = prompt_ids(30)
    cache = prefill(model, ids)
    ident = identity(model)
    meta = {"model": "tiny-llama", "chat_template": "{{ messages }}"}

    # mlx-lm file -> card: mlx-lm files record no token ids, so they are passed
    from mlx_lm.models.cache import save_prompt_cache
    save_prompt_cache(str(tmp_path / "mlx.safetensors"), cache, meta)
    with pytest.raises(ValueError, match="pass tokens="):
        mlxa.import_prompt_cache(tmp_path / "mlx.safetensors", tmp_path / "a", ident)
    manifest, got_meta = mlxa.import_prompt_cache(tmp_path / "mlx.safetensors", tmp_path / "a", ident, tokens=ids)
    assert got_meta == meta and manifest.producer.runtime == mlxa.RUNTIME
    card = cachecard.open_card(tmp_path / "a")
    assert card.read().equal(mlxa.to_canonical(cache)) and card.token_ids().tolist() == ids

    # card -> mlx-lm file: load_prompt_cache reads it, metadata as given plus the card's
    mlxa.export_prompt_cache(card, tmp_path / "out.safetensors", metadata=meta)
    loaded, loaded_meta = load_prompt_cache(str(tmp_path / "out.safetensors"), return_metadata=True)
    assert {k: loaded_meta[k] for k in meta} == meta
    assert loaded_meta[mlxa.META_CARD_ID] == card.manifest.card_id
    assert mlxa.to_canonical(loaded).equal(card.read())

    # and back to a card, tokens and identity from the file; a wrong model is refused
    manifest2, meta2 = mlxa.import_prompt_cache(tmp_path / "out.safetensors", tmp_path / "b", ident)
    assert meta2 == meta and cachecard.open_card(tmp_path / "b").read().equal(card.read())
    with pytest.raises(cachecard.IdentityMismatchError, match="prompt-cache file"):
        mlxa.import_prompt_cache(tmp_path / "out.safetensors", tmp_path / "x", identity(tiny_model("float16", 3)))

    # quantized export is mlx-lm's own QuantizedKVCache state
    mlxa.export_prompt_cache(card, tmp_path / "q.safetensors", quantized=(64, 8))
    q = load_prompt_cache(str(tmp_path / "q.safetensors"))
    assert isinstance(q[0], QuantizedKVCache)
    assert quantized_state_equal(q, [c.to_quantized(group_size=64, bits=8) for c in cache])
    mlxa.import_prompt_cache(tmp_path / "q.safetensors", tmp_path / "c", ident)  # dequantized on the way in
    x, y = card.read().k.astype(np.float32), cachecard.read_card(tmp_path / "c").k.astype(np.float32)
    assert np.all(np.abs(x - y) <= mlxa.MLXAffineCodec(bits=8, group_size=64).error_bound(x))


@settings(max_examples=25)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 40),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), seed=st.integers(0, 2**16))
def test_canonical_round_trip_property(layers, heads, tokens, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (layers, heads, tokens, HEAD_DIM)
    kv = cachecard.CanonicalKV(*(rng.standard_normal(shape).astype(NUMPY_DTYPES[dtype]) for _ in range(2)))
    back = mlxa.to_canonical(mlxa.from_canonical(kv))
    assert back.equal(kv)
    q = mlxa.from_canonical(kv, quantized=(64, 4))
    theirs = [c.to_quantized(64, 4) for c in mlxa.from_canonical(kv)]
    assert quantized_state_equal(q, theirs)


# -- real weights: SmolLM2-135M from its GGUF ---------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(mlx model, mlx tokenizer, GGUF identity of the fp32 model) of SmolLM2 converted to an HF folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cachecard.testing import smollm2
    from mlx_lm import load

    folder = smollm2.hf_folder(tmp_path_factory.getbasetemp() / "smollm2-hf")
    model, tok = load(folder)
    return model, tok, mlxa.model_identity(model, gguf=smollm2.gguf_path())


def smol_prompt(tok, n: int) -> list[int]:
    from pydoc_data.topics import topics

    return tok.encode(topics["assignment"][:2000])[:n]


@pytest.mark.model
def test_smollm2_lossless_continuation_and_q4_injection(tmp_path, smol):
    model, tok, ident = smol
    assert (ident.num_layers, ident.num_kv_heads, ident.head_dim, ident.rope.theta) == (30, 3, 64, 100000.0)
    ids = smol_prompt(tok, 200)
    greedy = make_sampler(temp=0.0)
    cache = prefill(model, ids[:-1])
    mlxa.save(tmp_path / "c", model, cache, ids[:-1], identity=ident)
    mlxa.save(tmp_path / "q", model, cache, ids[:-1], identity=ident, codec="q4")

    def run(pc):
        return [r.token for r in stream_generate(model, tok, prompt=ids[-1:], max_tokens=16, sampler=greedy,
                                                 prompt_cache=pc)]

    ref = [r.token for r in stream_generate(model, tok, prompt=ids, max_tokens=16, sampler=greedy)]
    assert run(mlxa.restore(tmp_path / "c", model, identity=ident)) == ref
    theirs = [c.to_quantized(group_size=64, bits=4) for c in cache]
    ours = mlxa.restore(tmp_path / "q", model, identity=ident, quantized=(64, 4))
    assert quantized_state_equal(ours, theirs)


@pytest.mark.model
def test_smollm2_cross_runtime_transformers_and_mlx(tmp_path, smol):
    """A lossless card from transformers continues in MLX, and one from MLX in transformers, exactly as
    each runtime continues its own cache (both bind to the GGUF identity)."""
    torch = pytest.importorskip("torch")
    from cachecard.testing import smollm2
    from cachecard.adapters import hf
    from cachecard.identity import gguf_identity

    model, tok, ident = smol
    hf_model, hf_tok = smollm2.load()
    hf_ident = gguf_identity(smollm2.gguf_path(), kv_dtype="float32")
    assert hf_ident.mismatches(ident) == []
    ids = smol_prompt(tok, 160)
    n = 12
    greedy = make_sampler(temp=0.0)

    def mlx_continue(pc):
        return [r.token for r in stream_generate(model, tok, prompt=ids[-1:], max_tokens=n, sampler=greedy,
                                                 prompt_cache=pc)]

    def hf_continue(past):
        nxt, out = torch.tensor([ids[-1:]]), []
        with torch.no_grad():
            for _ in range(n):
                o = hf_model(nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
                out.append(int(nxt))
        return out

    with torch.no_grad():
        hf_cache = hf_model(torch.tensor([ids[:-1]]), use_cache=True).past_key_values
    cachecard.write_card(tmp_path / "from_hf", hf.to_canonical(hf_cache), ids[:-1], hf_ident, runtime=hf.RUNTIME)
    mlx_cache = prefill(model, ids[:-1])
    mlxa.save(tmp_path / "from_mlx", model, mlx_cache, ids[:-1], identity=ident)

    hf_own = hf_continue(hf.from_canonical(cachecard.read_card(tmp_path / "from_hf")))
    mlx_own = mlx_continue(mlxa.restore(tmp_path / "from_mlx", model, identity=ident))
    hf_from_mlx = hf_continue(hf.from_canonical(cachecard.read_card(tmp_path / "from_mlx")))
    mlx_from_hf = mlx_continue(mlxa.restore(tmp_path / "from_hf", model, identity=ident))
    # each runtime continues the other's card as it continues its own (K/V agree to float32 rounding)
    diff = np.abs(cachecard.read_card(tmp_path / "from_hf").k - cachecard.read_card(tmp_path / "from_mlx").k).max()
    print(f"HF vs MLX KV max |diff| {diff:.3g}; hf {hf_own} mlx {mlx_own}")
    assert mlx_from_hf == mlx_own
    assert hf_from_mlx == hf_own
    assert hf_own == mlx_own


# -- identities that travel (issue 17, item 2) ------------------------------------------------------------------
def test_a_card_bound_to_a_gguf_is_refused_with_the_gguf_advice_and_allow_works(tmp_path):
    """A card written elsewhere with a GGUF identity, restored into a model nothing is known about: the
    refusal says how to make them agree (gguf=), and allow= (which every restore takes) lets it in."""
    model = tiny_model()
    ids = prompt_ids(20)
    theirs = identity(model).model_copy(update={"weights_hash": "gguf-sha256:" + "1" * 64,
                                                "tokenizer_hash": "gguf-sha256:" + "2" * 64})
    mlxa.save(tmp_path / "c", model, prefill(model, ids), ids, identity=theirs)
    with pytest.raises(cachecard.IdentityMismatchError, match=r"gguf=PATH"):
        mlxa.restore(tmp_path / "c", model, quantized=(64, 4))
    cache = mlxa.restore(tmp_path / "c", model, quantized=(64, 4), allow={"weights_hash"})
    assert cache[0].offset == 20
    assert mlxa.load(tmp_path / "c", model, identity=theirs)[0].offset == 20
