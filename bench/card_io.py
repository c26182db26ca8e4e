"""Card write/read throughput vs a raw read of the same bytes, same run (SmolLM2-135M shape, fp16).

Run: .venv/bin/python bench/card_io.py   ->  bench/results/card_io.json
Ratios, not absolute times, are the result: the machine varies, the comparison in one run does not.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import cachecard
from cachecard import CanonicalKV, LayerKind, ModelIdentity, Rope

LAYERS, HEADS, DIM = 30, 3, 64  # SmolLM2-135M
REPEATS = 7


def identity() -> ModelIdentity:
    return ModelIdentity(name="SmolLM2-135M shape", architecture="llama", num_layers=LAYERS, num_kv_heads=HEADS,
                         head_dim=DIM, layer_kinds=(LayerKind(),) * LAYERS, rope=Rope(theta=1e5, rotary_dim=DIM),
                         kv_dtype="float16", weights_hash="sha256:" + "0" * 64, tokenizer_hash="sha256:" + "0" * 64)


def best(f) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for tokens in (1024, 4096):
            shape = (LAYERS, HEADS, tokens, DIM)
            kv = CanonicalKV(rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16))
            path = Path(d) / f"card{tokens}"
            t = time.perf_counter()
            cachecard.write_card(path, kv, np.arange(tokens), identity())
            write_s = time.perf_counter() - t
            raw = Path(d) / f"raw{tokens}.bin"
            with open(raw, "wb") as f:
                f.write(kv.k.tobytes() + kv.v.tobytes())
                os.fsync(f.fileno())
            read_best, read_med = best(lambda: cachecard.open_card(path).read())
            raw_best, raw_med = best(lambda: np.fromfile(raw, dtype=np.float16))
            prefix_best, _ = best(lambda: cachecard.open_card(path).read(tokens=256))
            card = cachecard.open_card(path)
            rows.append({
                "tokens": tokens, "kv_bytes": kv.nbytes, "objects": len(card.objects()),
                "bytes_on_disk": sum(card.objects().values()),
                "objects_format_1_0": 2 * LAYERS * (1 + -(-tokens // 256)) + 2,
                "write_s": write_s, "read_s": read_best, "raw_read_s": raw_best,
                "read_vs_raw": raw_best / read_best, "read_GBps": kv.nbytes / read_best / 1e9,
                "prefix256_read_s": prefix_best, "read_median_s": read_med, "raw_median_s": raw_med,
            })
            print(json.dumps(rows[-1]))
    out = Path(__file__).parent / "results" / "card_io.json"
    out.write_text(json.dumps({"model_shape": [LAYERS, HEADS, DIM], "dtype": "float16", "page_cache": "warm",
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
