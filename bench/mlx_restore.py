"""MLX restore from a card vs mlx-lm's own ``load_prompt_cache``, SmolLM2 (fp32) in mlx-lm on the CPU.

At 1K, 2K and 4K tokens, in one run and one model (the GGUF's weights dequantized to fp32, the folder
``cachecard.testing.smollm2.hf_folder`` writes):

* ``load_prompt_cache``: mlx-lm's ``load_prompt_cache`` of a ``save_prompt_cache`` file of a cache that
  mlx-lm's own ``update_and_fetch`` filled (its own restore, from the page cache);
* ``card_<codec>``: ``cachecard.adapters.mlx.restore`` of a card of the same KV on local disk (open, read,
  decode, build the layers); ``lossless`` = the fp32 KV as is, ``q4`` = ``cachecard.mlx_affine`` 4-bit restored
  as ``QuantizedKVCache(64, 4)`` without dequantizing.

Each restore is timed alone (``*_s``) and with the first decode step after it (``*_step_s``: the next token
through the model on the restored cache, evaluated), since how a cache is laid out decides what that step
costs (mlx-lm grows a full buffer by copying all of it). ``step_s`` is the bare step: on a cache with room,
the step's token taken back off after each repeat. The KV is random with SmolLM2's shapes: restore and step
times do not depend on the values, and mlx's CPU prefill takes minutes at 4K on a shared 2-core machine
(``prefill_1k_s``, measured once on 1K tokens of pydoc text, says how long). Times are best of ``REPEAT``.
Run: ``python bench/mlx_restore.py`` (a few minutes on 2 cores); writes bench/results/mlx_restore.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cachecard.testing import smollm2  # noqa: E402

import cachecard  # noqa: E402

SIZES = (1024, 2048, 4096)
CODECS = {"lossless": None, "q4": (64, 4)}  # card preset -> the ``quantized=`` of the restore
REPEAT = 5
OUT = Path(__file__).parent / "results" / "mlx_restore.json"


def best(fn, repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    from cachecard.adapters import mlx as mlxa

    model, _ = load(smollm2.hf_folder(Path(tempfile.gettempdir()) / "cachecard-smollm2-hf"))
    ident = mlxa.model_identity(model, gguf=smollm2.gguf_path())
    ids = smollm2.corpus_ids()
    rng = np.random.default_rng(0)

    def step(cache: list, token: int) -> None:
        mx.eval(model(mx.array([[token]]), cache=cache))

    t = time.perf_counter()
    mx.eval(model(mx.array([ids[:1024].tolist()]), cache=make_prompt_cache(model)))
    prefill_1k = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            tokens, nxt = ids[:n].astype(int).tolist(), int(ids[n])
            cache = make_prompt_cache(model)  # filled the way a prefill fills it
            shape = (1, ident.num_kv_heads, n, ident.head_dim)
            for c in cache:
                c.update_and_fetch(*(mx.array(rng.standard_normal(shape, np.float32)) for _ in "kv"))
            mx.eval([c.state[:2] for c in cache])
            kv, _ = mlxa.capture(model, cache, tokens)
            path = os.path.join(tmp, f"{n}.safetensors")
            save_prompt_cache(path, cache)
            row = {"tokens": n, "step_s": best(lambda: (step(cache, nxt), cache_trim(cache))),
                   "load_prompt_cache_s": best(lambda: mx.eval([c.state for c in load_prompt_cache(path)])),
                   "load_prompt_cache_step_s": best(lambda: step(load_prompt_cache(path), nxt))}
            for codec, quantized in CODECS.items():
                loc = Path(tmp) / f"{n}-{codec}"
                cachecard.write_card(loc, kv, tokens, ident, codec=codec, runtime=mlxa.RUNTIME)
                row[f"card_{codec}_s"] = best(lambda: mlxa.restore(loc, model, identity=ident, quantized=quantized))
                row[f"card_{codec}_step_s"] = best(
                    lambda: step(mlxa.restore(loc, model, identity=ident, quantized=quantized), nxt))
                row[f"card_{codec}_bytes"] = sum(cachecard.open_card(loc).objects().values())
            for key in [k for k in row if k.startswith("card_") and k.endswith("_s")]:
                base = "load_prompt_cache_step_s" if key.endswith("_step_s") else "load_prompt_cache_s"
                row[key[:-2] + "_vs_load_prompt_cache"] = row[key] / row[base]
            rows.append(row)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr)
    result = {
        "rows": rows,
        "setup": {"model": "SmolLM2-135M-Instruct (GGUF weights dequantized, fp32) in mlx-lm, random KV of its shapes",
                  "runtime": mlxa.RUNTIME, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "prefill_1k_s": prefill_1k,
                  "timing": f"best of {REPEAT}, card and file in the page cache",
                  "card": "open + read/decode + build KVCache/QuantizedKVCache layers (+ one decode step: *_step_s)"},
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


def cache_trim(cache: list) -> None:
    """Take the step's token back off the live cache, so every repeat steps from the same prefix."""
    for c in cache:
        c.trim(1)


if __name__ == "__main__":
    main()
