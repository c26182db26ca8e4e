"""The fused device decode (adapters/device_decode.py): the Triton kernel equals the torch reference and the
host reader bit for bit, and a damaged card never reaches the caller. Runs on a CUDA machine (skipped here)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import cachecard  # noqa: E402
from cachecard.adapters import device_decode  # noqa: E402
from cachecard.adapters.torch_read import read_kv  # noqa: E402
from cachecard.card import stream  # noqa: E402
from cachecard.testing import make_identity, make_kv  # noqa: E402

@pytest.fixture(autouse=True)
def rotq_kernel(monkeypatch):
    """These tests are what clears the fused rotq kernel for default use (device_decode.ROTQ_KERNEL)."""
    monkeypatch.setattr(device_decode, "ROTQ_KERNEL", True)


TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("preset", ["lossless", "q8", "q4_0", "q4_1", "gpu3", "gpu2.5"])
@pytest.mark.parametrize("card_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_kernel_equals_torch_reference_and_host_reader(tmp_path, preset, card_dtype, out_dtype):
    kv = make_kv(layers=3, heads=4, tokens=300, head_dim=128, dtype=card_dtype, seed=7)
    kv = cachecard.CanonicalKV((kv.k * 7).astype(kv.k.dtype), (kv.v * 0.01).astype(kv.v.dtype))  # scales far from 1
    cachecard.write_card(tmp_path / "c", kv, np.arange(300), make_identity(3, 4, 128, card_dtype), codec=preset,
                         chunk_tokens=64)
    card = cachecard.open_card(tmp_path / "c")
    for tokens in (300, 129, 1):
        host = card.read(tokens=tokens)
        for which, ref in (("k", host.k), ("v", host.v)):
            lay = card.shard_layout(which)
            table = stream.chunk_table(lay, range(3), tokens)
            buf = np.zeros(table.length, np.uint8)
            stream.read_span(lay, table, buf)
            raw = torch.from_numpy(buf).cuda()
            a = torch.full((3, 4, 320, 128), float("nan"), dtype=TORCH[out_dtype], device="cuda")
            b = a.clone()
            device_decode.decode_chunks(raw, table, lay.serializer, lay.storage, a, lay.chunk_shape, tokens,
                                        host=buf)
            device_decode.decode_chunks_torch(raw, table, lay.serializer, lay.storage, b, lay.chunk_shape, tokens)
            assert torch.equal(a[:, :, :tokens].view(torch.uint8), b[:, :, :tokens].view(torch.uint8))
            assert torch.isnan(a[:, :, tokens:].float()).all()  # nothing written past the tokens asked for
            want = torch.from_numpy(np.asarray(ref, dtype=np.float32)).to(TORCH[out_dtype]).cuda()
            assert torch.equal(a[:, :, :tokens].view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("preset", ["lossless", "q8", "q4_0", "gpu3"])
def test_streamed_restore_equals_host_restore(tmp_path, preset):
    kv = make_kv(layers=4, heads=2, tokens=1000, head_dim=64, dtype="bfloat16")
    cachecard.write_card(tmp_path / "c", kv, np.arange(1000), make_identity(4, 2, 64, "bfloat16"), codec=preset)
    card = cachecard.open_card(tmp_path / "c")
    for direct in (False, True):
        k, v = read_kv(card, 999, device="cuda", dtype=torch.bfloat16, direct=direct)
        hk, hv = read_kv(card, 999, device="cpu", dtype=torch.bfloat16, via_torch=False)
        assert torch.equal(k.cpu(), hk) and torch.equal(v.cpu(), hv)


def test_a_damaged_chunk_raises_and_nothing_is_returned(tmp_path):
    kv = make_kv(layers=2, heads=2, tokens=600, head_dim=64, dtype="float16")
    cachecard.write_card(tmp_path / "c", kv, np.arange(600), make_identity(2, 2, 64), codec="q4_0")
    card = cachecard.open_card(tmp_path / "c")
    lay = card.shard_layout("v")
    path = stream.local_path(lay)
    data = bytearray(path.read_bytes())
    data[int(lay.index[3][0]) + 10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(cachecard.CorruptCardError, match="crc32c"):
        read_kv(card, 600, device="cuda", dtype=torch.float16)
