"""Codec decode on a GPU through each codec's torch path (issue 3: "a torch path, so the GPU restore can decode
on the device"). Run on a CUDA machine:

    python bench/gpu_decode.py OUT.json

For every codec: the torch decode on the GPU agrees with the numpy reference (exactly, or within float32
rounding for the rotation codecs), and its throughput in GB/s of fp16 KV for a Llama-3.1-8B-shaped layer
(8 KV heads, head_dim 128, 32K tokens) against a device-to-device copy of the same bytes (the baseline, same run).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from cachecard.codecs import CODECS

CONFIGS = [
    ("cachecard.q8_0", {}), ("cachecard.q4_0", {}), ("cachecard.q4_1", {}),
    ("cachecard.mlx_affine", {"bits": 4, "group_size": 64}), ("cachecard.mlx_affine", {"bits": 8, "group_size": 64}),
    ("cachecard.nf4", {"block_size": 64}),
    ("cachecard.kivi", {"bits": 2, "group_size": 32, "axis": "channel"}),
    ("cachecard.turbo", {"bits": 3, "seed": 1}),
    ("cachecard.mixed", {"base_bits": 2, "salient_bits": 4, "salient": 0.25, "sinks": 4, "recent": 32, "seed": 1}),
    ("cachecard.frontier", {"step": 0.6, "center": True, "sinks": 4, "recent": 32, "salient": 0.0, "seed": 1}),
    ("cachecard.rotq", {"bits": 3, "center": True, "sinks": 4, "recent": 32, "seed": 1}),
    ("cachecard.rotq", {"bits": 2, "center": False, "sinks": 4, "recent": 32, "seed": 1}),
]


def gpu_time(f, repeat: int = 10) -> float:
    f()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def fused(copy_s: float, copy_bytes: int) -> list[dict]:
    """The restore path's fused kernel (adapters/device_decode.py): every chunk of an 8K-token card of the
    Llama-3.1-8B shape (32 layers) decoded, cast to bf16 and laid out in one launch; GB/s of bf16 output."""
    import tempfile

    import cachecard
    from cachecard.adapters import device_decode
    from cachecard.card import stream
    from cachecard.testing import make_identity

    rng = np.random.default_rng(1)
    shape = (32, 8, 8192, 128)
    import ml_dtypes

    kv = cachecard.CanonicalKV(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16),
                               rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("lossless", "q8", "q4_0", "gpu3"):
            cachecard.write_card(f"{tmp}/{preset}", kv, np.arange(8192), make_identity(32, 8, 128, "bfloat16"),
                                 codec=preset)
            card = cachecard.open_card(f"{tmp}/{preset}")
            lay = card.shard_layout("k")
            table = stream.chunk_table(lay, range(32), 8192)
            host = np.zeros(table.length, np.uint8)
            stream.read_span(lay, table, host)
            raw = torch.from_numpy(host).cuda()
            out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            s = gpu_time(lambda: device_decode.decode_chunks(raw, table, lay.serializer, lay.storage, out,
                                                             lay.chunk_shape, 8192, host=host))
            rows.append({"preset": preset, "stored_MB": table.length / 1e6, "ms": s * 1e3,
                         "output_GBps": out.numel() * 2 / s / 1e9, "vs_device_copy": (copy_s * out.numel() * 2
                                                                                     / copy_bytes) / s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, 8, 256, 128)).astype(np.float16)
    big = rng.standard_normal((1, 8, 32768, 128)).astype(np.float16)
    copy_src = torch.from_numpy(big).to(dev)
    copy_s = gpu_time(lambda: copy_src.clone())
    rows = []
    for cid, cfg in CONFIGS:
        codec = CODECS[cid](**cfg)
        data = codec.encode_chunk(small)
        want = codec.decode_array(np.frombuffer(data, np.uint8), small.shape)
        got = codec.decode_torch(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev), small.shape).cpu().numpy()
        exact = bool(np.array_equal(got, want))
        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
        payload = torch.frombuffer(bytearray(codec.encode_chunk(big)), dtype=torch.uint8).to(dev)
        s = gpu_time(lambda: codec.decode_torch(payload, big.shape), repeat=3 if "frontier" in cid else 10)
        rows.append({"codec": cid, "config": cfg, "bit_exact_vs_numpy": exact, "max_rel_diff": err,
                     "decode_GBps": big.nbytes / s / 1e9, "vs_device_copy": copy_s / s})
        print(json.dumps(rows[-1]), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(big.shape),
           "device_copy_GBps": big.nbytes / copy_s / 1e9, "rows": rows, "fused": fused(copy_s, big.nbytes)}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
