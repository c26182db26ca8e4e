"""Properties every KV codec must have (spec/codecs/README.md): shape and dtype round-trip, the error bound
its spec states, deterministic bytes, strict configuration, a device (torch) decoder that agrees with numpy,
and golden vectors that decode and re-encode exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cachecard.codecs import CODECS
from cachecard.codecs.base import NO_CONTEXT, ChunkContext, KVCodec, to_float32
from cachecard.errors import KVShapeError, UnsupportedCodecError
from cachecard.testing.codec_cases import CONFIGS, INVALID, VECTORS
from cachecard.testing.codec_data import kv_like, stored

GOLDEN = Path(__file__).parents[2] / "spec" / "vectors" / "codecs"
ALL = [(cid, cfg) for cid in sorted(CONFIGS) for cfg in CONFIGS[cid]]
IDS = [f"{cid}-{json.dumps(cfg, sort_keys=True)}" for cid, cfg in ALL]
HEAD_DIMS = [2, 8, 16, 32, 64, 128]


def make(cid: str, cfg: dict) -> KVCodec:
    return CODECS[cid](**cfg)


def head_dims(codec: KVCodec) -> list[int]:
    ok = []
    for d in HEAD_DIMS:
        try:
            codec.check_head_dim(d)
            ok.append(d)
        except KVShapeError:
            pass
    return ok


def test_every_codec_is_tested():
    assert set(CODECS) <= set(CONFIGS), f"codecs without test configurations: {set(CODECS) - set(CONFIGS)}"
    assert set(CONFIGS) <= set(CODECS), f"test configurations for unknown codecs: {set(CONFIGS) - set(CODECS)}"


@st.composite
def chunks(draw, codec: KVCodec):
    d = draw(st.sampled_from(head_dims(codec)))
    h = draw(st.integers(1, 3))
    c = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
    x = kv_like((1, h, c, d), draw(st.integers(0, 2**16)), scale, outliers=draw(st.booleans()))
    if draw(st.booleans()):  # zero blocks and zero vectors must survive
        x[:, :, : draw(st.integers(0, c))] = 0
    start = draw(st.integers(0, 5000))
    ctx = draw(st.sampled_from([NO_CONTEXT, ChunkContext(
        layer=draw(st.integers(0, 40)), which=draw(st.sampled_from(["k", "v"])), token_start=start,
        valid_tokens=c, card_tokens=start + c, positions=np.arange(start, start + c))]))
    return stored(x, dtype), ctx


@pytest.mark.parametrize(("cid", "cfg"), ALL, ids=IDS)
def test_roundtrip_within_stated_bound_and_deterministic(cid, cfg):
    codec = make(cid, cfg)

    @given(chunks(codec))
    def check(chunk):
        x, ctx = chunk
        data = codec.encode_chunk(x, ctx)
        assert codec.encode_chunk(x.copy(), ctx) == data, "encoding must be deterministic"
        out = codec.decode_chunk(np.frombuffer(data, np.uint8), x.shape, x.dtype)
        assert out.shape == x.shape and out.dtype == x.dtype
        exact = to_float32(x)
        dec = codec.decode_array(np.frombuffer(data, np.uint8), x.shape)
        assert dec.dtype == np.float32 and dec.shape == x.shape
        err = np.abs(dec - exact)
        bound = codec.error_bound(exact)
        assert np.all(err <= bound), f"error {err.max()} exceeds the stated bound at {np.argmax(err - bound)}"
        if not np.any(exact):
            assert not np.any(dec), "an all-zero chunk decodes to zeros"
        if not codec.lossy:
            assert np.array_equal(out.view(np.uint8), x.view(np.uint8))

    check()


@pytest.mark.parametrize("tokens", [37, 3], ids=["37-tokens", "3-tokens"])  # 3: mixed's rate map is 1 byte
@pytest.mark.parametrize(("cid", "cfg"), ALL, ids=IDS)
def test_torch_decoder_matches_numpy(cid, cfg, tokens):
    codec = make(cid, cfg)
    d = head_dims(codec)[-1]
    x = stored(kv_like((1, 2, tokens, d), seed=3), "float16")
    data = codec.encode_chunk(x, ChunkContext(positions=np.arange(tokens), valid_tokens=tokens,
                                              card_tokens=tokens))
    want = codec.decode_array(np.frombuffer(data, np.uint8), x.shape)
    got = codec.decode_torch(torch.frombuffer(bytearray(data), dtype=torch.uint8), x.shape)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max() + 1))


@pytest.mark.parametrize(("cid", "cfg"), ALL, ids=IDS)
def test_configuration_is_strict_and_round_trips(cid, cfg):
    codec = make(cid, cfg)
    again = type(codec).from_dict(json.loads(json.dumps(codec.to_dict())))
    assert again == codec and again.to_dict() == codec.to_dict()
    with pytest.raises(UnsupportedCodecError, match="bogus"):
        make(cid, {**codec.to_dict()["configuration"], "bogus": 1})


@pytest.mark.parametrize(("cid", "cfg"), [(c, x) for c in sorted(INVALID) for x in INVALID[c]])
def test_invalid_configuration_is_refused(cid, cfg):
    with pytest.raises(UnsupportedCodecError):
        make(cid, cfg)


@pytest.mark.parametrize(("cid", "cfg"), ALL, ids=IDS)
def test_truncated_payload_is_an_error_not_garbage(cid, cfg):
    codec = make(cid, cfg)
    x = stored(kv_like((1, 2, 9, head_dims(codec)[-1]), seed=1), "float16")
    data = np.frombuffer(codec.encode_chunk(x), np.uint8)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            codec.decode_array(data[:cut], x.shape)


@pytest.mark.parametrize("case", VECTORS, ids=[v[0] for v in VECTORS])
def test_golden_vector(case):
    name, cid, cfg, dtype, shape, seed, ctx = case
    folder = GOLDEN / name
    assert folder.is_dir(), f"golden vector {name} is missing; vectors are write-once (make vectors adds new ones)"
    meta = json.loads((folder / "case.json").read_text())
    codec = CODECS[meta["codec"]["name"]].from_dict(meta["codec"])
    assert meta["codec"] == codec.to_dict() == {"name": cid, "configuration": codec.to_dict()["configuration"]}
    x = np.load(folder / "input.npy")
    encoded = (folder / "encoded.bin").read_bytes()
    out = codec.decode_chunk(np.frombuffer(encoded, np.uint8), x.shape, x.dtype)
    assert np.array_equal(out.view(np.uint8), np.load(folder / "decoded.npy").view(np.uint8))
    c = meta["context"]
    context = NO_CONTEXT if c is None else ChunkContext(
        layer=c["layer"], which=c.get("which"), token_start=c["token_start"], valid_tokens=x.shape[2],
        card_tokens=c["token_start"] + x.shape[2],
        positions=np.arange(c["position_start"], c["position_start"] + x.shape[2]))
    assert codec.encode_chunk(x, context) == encoded, "re-encoding a golden vector must be byte-identical"


def test_zarr_without_our_codecs_fails_clearly(tmp_path):
    """A zarr reader that lacks the cachecard codecs raises UnknownCodecError, never returns garbage."""
    if not CODECS:
        pytest.skip("no cachecard codecs registered")
    import zarr

    cid, cfg = ALL[0]
    codec = make(cid, cfg)
    d = head_dims(codec)[-1]
    z = zarr.create_array(str(tmp_path / "a"), shape=(1, 1, 4, d), dtype="<f2", chunks=(1, 1, 4, d),
                          serializer=codec, compressors=None, filters=None, fill_value=0)
    z[...] = np.ones((1, 1, 4, d), np.float16)
    script = f"""
import importlib.metadata as md
real = md.entry_points
everything = md.EntryPoints(e for d in md.distributions() for e in d.entry_points)
def hidden(**kw):
    return md.EntryPoints(e for e in everything.select(**kw) if not e.value.startswith("cachecard"))
md.entry_points = hidden
import zarr, zarr.errors
try:
    zarr.open_array({str(tmp_path / "a")!r}, mode="r")[...]
except zarr.errors.UnknownCodecError as e:
    print("UnknownCodecError", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "UnknownCodecError" in out.stdout and cid in out.stdout, out.stdout + out.stderr


def test_fast_float16_and_bfloat16_conversion_rounds_like_numpy():
    """from_float32 takes torch's vectorised conversion when torch is loaded: it must give the same bits."""
    from cachecard.codecs.base import from_float32
    import ml_dtypes

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 5000),
                        np.float32([65504, 65519.99, 65520, 1e6, -1e6, 2**-24, 2**-25, 3 * 2**-26, -0.0, 0.0])]
                       ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(from_float32(x, np.dtype("<f2")).view("<u2"), want.view("<u2"))
    assert np.array_equal(from_float32(x, np.dtype("<u2")), x.astype(ml_dtypes.bfloat16).view("<u2"))
