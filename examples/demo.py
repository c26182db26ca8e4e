"""CacheCard demo: three agents share a ~2K-token context through a store, on SmolLM2-135M (real weights,
offline, CPU).

Run 1 (empty store, or ``--fresh``): each agent (planner, coder, critic) prefills the shared context plus its
role and saves its KV cache in the store; the shared context is stored once. Run 2: each agent gets a new
question, restores its cache from the store (prefix match, read, decode, inject) and generates; the demo
prints time to first token with a full prefill and with the restore, bytes on disk per codec, and what the
store holds. ``make demo`` runs both.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from cachecard.testing import smollm2  # noqa: E402  (bench/smollm2.py: the offline model and the pydoc corpus)

import cachecard  # noqa: E402
from cachecard.adapters import hf  # noqa: E402
from cachecard.cli import app  # noqa: E402

OUT = Path("cachecard-demo")
CODEC = "q8"                      # what the agents' store keeps (bytes per codec are shown below)
SHARED_TOKENS = 2000
AGENTS = {
    "planner": ("You are the planner. Break the task into small steps for the coder and the critic.",
                "Plan how to explain Python's assignment statement to a new programmer."),
    "coder": ("You are the coder. You write short, correct Python that follows the plan.",
              "Write an example that shows augmented assignment."),
    "critic": ("You are the critic. You review the coder's work and point out mistakes.",
               "What mistake do beginners make with chained assignment?"),
}


def shared_context(tok) -> list[int]:
    """~2K tokens of Python's own reference text as the team's shared brief (chat format, system turn)."""
    from pydoc_data.topics import topics

    head = tok("<|im_start|>system\nThe team's reference material:\n\n").input_ids
    body = tok("\n\n".join(topics[k] for k in ("assignment", "augassign", "numbers", "types"))).input_ids
    return head + body[:SHARED_TOKENS - len(head)]


def turn(tok, text: str, role: str) -> list[int]:
    return tok(f"<|im_end|>\n<|im_start|>{role}\n{text}").input_ids


def ttft_prefill(model, ids: list[int]) -> tuple[float, int]:
    t = time.perf_counter()
    with torch.no_grad():
        first = int(model(torch.as_tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
    return time.perf_counter() - t, first


def ttft_restore(model, store, ids: list[int], agent: str) -> tuple[float, int, int]:
    """Time to first token through the store: match, read, decode, inject, compute the uncached suffix."""
    t = time.perf_counter()
    cache, n = hf.restore_from_store(store, model, ids, agent=agent)
    with torch.no_grad():
        out = model(torch.as_tensor([ids[n:]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = int(out.logits[0, -1].argmax())
    return time.perf_counter() - t, first, n


def generate(model, tok, ids: list[int], cache, max_new_tokens: int = 32) -> str:
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor([ids]), past_key_values=cache, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip().replace("\n", " ")


def first_run(model, tok, store, shared: list[int]) -> None:
    print(f"run 1: the store is empty; each agent prefills the {len(shared)}-token shared context + its role")
    for agent, (role, _) in AGENTS.items():
        ids = shared + turn(tok, role, "system")
        t = time.perf_counter()
        with torch.no_grad():
            cache = model(torch.as_tensor([ids]), use_cache=True).past_key_values
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        card_id = store.put(hf.to_canonical(cache), ids, hf.identity_of(model), agent=agent, codec=CODEC)
        print(f"  {agent:8s} {len(ids)} tokens: prefill {prefill:.2f} s, saved as card {card_id[:12]} "
              f"in {time.perf_counter() - t:.2f} s")


def second_run(model, tok, store, shared: list[int]) -> None:
    print("run 2: a new question for each agent; restore from the store vs prefill from scratch")
    rows = []
    for agent, (role, question) in AGENTS.items():
        ids = shared + turn(tok, role, "system") + turn(tok, question, "user") + turn(tok, "", "assistant")
        full_s, full_first = ttft_prefill(model, ids)
        restore_s, first, cached = ttft_restore(model, store, ids, agent)
        answer = generate(model, tok, ids, hf.restore_from_store(store, model, ids, agent=agent)[0])
        rows.append((agent, len(ids), cached, full_s, restore_s, full_first == first))
        print(f"  {agent:8s} {len(ids)} tokens ({cached} from the store): TTFT prefill {full_s * 1e3:.0f} ms, "
              f"restore {restore_s * 1e3:.0f} ms ({full_s / restore_s:.1f}x); same first token: {full_first == first}")
        print(f"           {agent} says: {answer[:150]!r}")
    speedup = sum(r[3] for r in rows) / sum(r[4] for r in rows)
    print(f"  overall: restore is {speedup:.1f}x faster to the first token than prefill")


def bytes_per_codec(model, shared: list[int]) -> None:
    print(f"bytes on disk for the {len(shared)}-token shared context, per codec (an fp32 model, so lossless is fp32):")
    with torch.no_grad():
        kv = hf.to_canonical(model(torch.as_tensor([shared]), use_cache=True).past_key_values)
    fp16 = kv.k.size * 2 * 2
    for codec in ("lossless", "q8", "q4", "frontier3.2"):
        path = OUT / "codecs" / codec
        t = time.perf_counter()
        cachecard.write_card(path, kv, shared, hf.identity_of(model), codec=codec)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"  {codec:12s} {size / 1e6:7.1f} MB  ({fp16 / size:4.2f}x vs fp16; "
              f"written in {time.perf_counter() - t:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="start from an empty store (run 1)")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    t = time.perf_counter()
    model, tok = smollm2.load()
    hf.bind(model, hf.model_identity(model, tokenizer=tok, gguf=smollm2.gguf_path(), name="SmolLM2-135M-Instruct"))
    print(f"loaded SmolLM2-135M-Instruct (real weights, fp32, CPU) in {time.perf_counter() - t:.1f} s")
    torch.manual_seed(0)
    shared = shared_context(tok)
    store = cachecard.Store(OUT / "store")
    if not store.cards():
        first_run(model, tok, store, shared)
    else:
        second_run(model, tok, store, shared)
        bytes_per_codec(model, shared)
    stats = store.stats()
    print(f"the store holds {stats['cards']} cards for {stats['agents']} agents: {stats['tokens_represented']} "
          f"tokens of KV in {stats['tokens_stored']} stored ({stats['sharing']:.2f}x sharing), "
          f"{stats['bytes'] / 1e6:.1f} MB")
    store.close()
    app(["ls", str(OUT / "store")], standalone_mode=False)


if __name__ == "__main__":
    main()
