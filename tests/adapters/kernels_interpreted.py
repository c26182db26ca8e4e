"""Run by test_kernels_interpreted.py in a subprocess with TRITON_INTERPRET=1: the fused Triton decode kernels
(adapters/device_decode.py, adapters/device_rotq.py) on CPU tensors under Triton's interpreter, against the
torch reference and the host reader, bit for bit, and the crc32c kernel (adapters/device_crc.py) against
crc32c. Prints one line per mismatch, then "N decodes, M mismatches".

The interpreter emulates bfloat16 casts (numpy has no bfloat16), so the cases here are float16 and float32
cards and outputs; bfloat16 and the kernels' speed are checked on a GPU (test_device_decode.py)."""

from __future__ import annotations

import itertools
import os
import sys
import tempfile

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the docstring)"
torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]  # no CUDA: plain memory

import cachecard  # noqa: E402
import crc32c  # noqa: E402

from cachecard.adapters import device_crc, device_decode, device_rotq  # noqa: E402
from cachecard.card import stream  # noqa: E402
from cachecard.testing import make_identity, make_kv  # noqa: E402

TORCH = {"float32": torch.float32, "float16": torch.float16}
LAYERS, HEADS, TOKENS, D, CHUNK = 2, 2, 150, 64, 64


def decodes(preset: str, card_dtype: str, out_dtype: str, tmp: str) -> list[str]:
    kv = make_kv(layers=LAYERS, heads=HEADS, tokens=TOKENS, head_dim=D, dtype=card_dtype, seed=7)
    kv = cachecard.CanonicalKV((kv.k * 7).astype(kv.k.dtype), (kv.v * 0.01).astype(kv.v.dtype))  # scales far from 1
    cachecard.write_card(f"{tmp}/c", kv, np.arange(TOKENS), make_identity(LAYERS, HEADS, D, card_dtype), codec=preset,
                         chunk_tokens=CHUNK)
    card = cachecard.open_card(f"{tmp}/c")
    bad = []
    for tokens, which in itertools.product((TOKENS, CHUNK + 1, 1), ("k", "v")):
        ref = getattr(card.read(tokens=tokens), which)
        lay = card.shard_layout(which)
        table = stream.chunk_table(lay, range(LAYERS), tokens)
        buf = np.zeros(table.length, np.uint8)
        stream.read_span(lay, table, buf)
        raw = torch.from_numpy(buf)
        kernel = torch.full((LAYERS, HEADS, 3 * CHUNK, D), float("nan"), dtype=TORCH[out_dtype])
        reference = kernel.clone()
        kind = device_decode.kind_of(lay.serializer, lay.storage)
        if kind == device_decode.ROTQ:
            device_rotq.decode(raw, buf, table, lay.serializer, device_decode._STORAGE_KIND[lay.storage], kernel,
                               lay.chunk_shape, tokens, 0, "c", which)
        else:
            device_decode._decode_triton(raw, table, kind, lay.storage, kernel, lay.chunk_shape, tokens, 0)
        device_decode.decode_chunks_torch(raw, table, lay.serializer, lay.storage, reference, lay.chunk_shape, tokens)
        want = torch.from_numpy(np.asarray(ref, dtype=np.float32)).to(TORCH[out_dtype])
        got = kernel[:, :, :tokens]
        if not (torch.equal(got.view(torch.uint8), reference[:, :, :tokens].view(torch.uint8))
                and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                and torch.isnan(kernel[:, :, tokens:]).all()):
            bad.append(f"{preset} {card_dtype} card -> {out_dtype}, {tokens} tokens, {which}")
    return bad


def crcs() -> list[str]:
    data = np.random.default_rng(1).integers(0, 256, 140_000, dtype=np.uint8)
    starts = np.array([0, 3, 100, 4096, 70_000], np.int64)
    lens = np.array([0, 1, 63, 64, 65_537], np.int64)
    got = device_crc.crc32c_chunks(torch.from_numpy(data), starts, lens).numpy().view(np.uint32).tolist()
    want = [crc32c.crc32c(data[s:s + n].tobytes()) for s, n in zip(starts, lens)]
    return [] if got == want else [f"crc32c of chunks {lens.tolist()}: {got} != {want}"]


def main() -> None:
    presets = sys.argv[1:] or ["lossless", "q8", "q4_0", "q4_1", "gpu3", "gpu2.5"]
    runs, bad = 1, crcs()
    for preset, card_dtype, out_dtype in itertools.product(presets, TORCH, TORCH):
        with tempfile.TemporaryDirectory() as tmp:
            bad += decodes(preset, card_dtype, out_dtype, tmp)
        runs += 6
    for line in bad:
        print("mismatch:", line)
    print(f"{runs} decodes, {len(bad)} mismatches")


if __name__ == "__main__":
    main()
