"""A team of agents in a fixed memory budget: the CacheCard hot tier (cachecard.pool) on SmolLM2-135M (real
weights, offline, CPU), with a live view.

Every agent reads the same reference text (held once in the pool: shared prefix blocks) and then its own role.
They take turns round robin: each turn, an agent reads what the previous one said and answers. The pool holds
their KV quantized (``--codec``) under a byte budget (``--budget-agents``: how many agents would fit in fp16);
when an agent must come in, the least recently used one goes to the store (only the tokens the store lacks)
and comes back by reading its cards (no re-prefill). After each round the last speaker hands its memory to a
reviewer through ``Store.handoff``; the reviewer is attached to the pool from the store (its blocks are the
speaker's, shared) and sums up.

Run it twice with the same ``--store``: the second run attaches every agent from the store and goes on where
the first stopped (an agent's memory survives a process restart).

    python examples/pool_workflow.py --agents 5 --rounds 2 --store /tmp/team
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from cachecard import Store
from cachecard.adapters import hf
from cachecard.pool import BlockPool
from cachecard.pool.workflow import Turn, take_turn
from cachecard.testing import smollm2

ROLES = {
    "planner": "You are the planner. Break the task into small steps.",
    "coder": "You are the coder. You write short, correct Python.",
    "critic": "You are the critic. You point out mistakes in what was said.",
    "tester": "You are the tester. You propose a test for what was said.",
    "writer": "You are the writer. You explain things to beginners.",
    "librarian": "You are the librarian. You cite the reference text.",
    "skeptic": "You are the skeptic. You question every claim.",
    "editor": "You are the editor. You make answers shorter.",
}
TASK = "Explain Python's assignment statement, with an example."


def reference(tok, tokens: int) -> list[int]:
    from pydoc_data.topics import topics

    head = tok("<|im_start|>system\nThe team's reference material:\n\n").input_ids
    body = tok("\n\n".join(topics[k] for k in ("assignment", "augassign", "numbers", "types"))).input_ids
    return head + body[:tokens - len(head)]


def role(tok, text: str) -> list[int]:
    """Closes the shared system turn (the reference text) with the agent's own role."""
    return tok(f"\n\n{text}<|im_end|>\n").input_ids


def message(tok, text: str, *, after_reply: bool) -> list[int]:
    """A user turn, then the assistant's turn opened for the reply (after a reply, close that first)."""
    return tok(("<|im_end|>\n" if after_reply else "") + f"<|im_start|>user\n{text}<|im_end|>\n"
               "<|im_start|>assistant\n").input_ids


def view(pool: BlockPool, log: list[str], title: str) -> Group:
    s = pool.stats()
    head = (f"[b]{s['codec']}[/b] · {s['bytes_used'] / 2**20:.1f} / {pool.budget_bytes / 2**20:.1f} MiB · "
            f"{s['resident']}/{s['agents']} agents resident · {s['blocks_shared']} shared blocks · "
            f"evictions {s['evictions']} · reloads {s['reloads']} · re-prefills {s['reprefills']}")
    table = Table(expand=True)
    for col in ("agent", "resident", "tokens", "resident KiB", "card"):
        table.add_column(col, justify="right" if col in ("tokens", "resident KiB") else "left")
    for name in pool.agents():
        i = pool.info(name)
        table.add_row(name, "[green]●[/green]" if i.resident else "[dim]○ in store[/dim]", str(i.tokens + i.pending),
                      f"{i.bytes / 1024:.0f}" if i.resident else "-", (i.card_id or "-")[:8])
    return Group(Panel(head, title=title), table, Panel("\n".join(log[-8:]) or "…", title="last turns"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=5, help=f"team size (at most {len(ROLES)})")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generate", type=int, default=24, help="tokens each turn generates")
    ap.add_argument("--context", type=int, default=1024, help="tokens of shared reference text")
    ap.add_argument("--codec", default="q4", help="resident codec: q4, q4_0, q8_0, fp16, ...")
    ap.add_argument("--budget-agents", type=float, default=1.0,
                    help="budget: this many agents in fp16 (q4 holds 3.5x as many, and the shared text once)")
    ap.add_argument("--store", type=Path, default=None, help="store directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = smollm2.load()
    ident = hf.bind(model, hf.model_identity(model, gguf=smollm2.gguf_path()))
    names = list(ROLES)[:args.agents]
    tmp = tempfile.TemporaryDirectory() if args.store is None else None
    store = Store(args.store or tmp.name)
    ctx = reference(tok, args.context)
    per_agent = args.context + 64 + args.rounds * (args.generate + 64)
    fp16 = 2 * 2 * ident.num_layers * ident.num_kv_heads * ident.head_dim * per_agent
    pool = BlockPool(ident, budget_bytes=int(args.budget_agents * fp16), codec=args.codec, store=store)
    known = set(store.agents())
    log: list[str] = []
    last = ("", TASK)  # (who spoke, what they said)
    with Live(view(pool, log, "starting"), refresh_per_second=4) as live:
        def show(t: Turn, text: str) -> None:
            how = "reloaded" if t.reloaded else ("recomputed" if t.recomputed else "resident")
            log.append(f"[b]{t.agent}[/b] ({how}, first token {t.ttft_s:.2f}s): {text.strip()[:100]!r}")
            live.update(view(pool, log, f"round {t.round + 1}/{args.rounds}"))

        for name in names:
            if name in known:
                pool.attach(name)  # a previous run's agent: its memory is in the store
                log.append(f"{name}: attached from the store ({pool.info(name).tokens} tokens)")
            else:
                pool.add(name)
        for r in range(args.rounds):
            for name in names:
                fresh = pool.info(name).tokens == 0 and not pool.info(name).pending
                prompt = (ctx + role(tok, ROLES[name]) if fresh else []) + \
                    message(tok, f"{last[0] or 'The lead'} says: {last[1]}", after_reply=not fresh)
                t = take_turn(pool, model, name, prompt, generate=args.generate, round=r)
                text = tok.decode(t.generated)
                show(t, text)
                last = (name, text)
            # hand the last speaker's memory to a reviewer, who sums up
            card = pool.persist(last[0])
            reviewer = f"reviewer-r{r + 1}"
            store.handoff(card, to_agent=reviewer)
            pool.attach(reviewer)
            t = take_turn(pool, model, reviewer, message(tok, "Sum up the team's answer in one sentence.",
                                                         after_reply=True), generate=args.generate, round=r)
            show(t, tok.decode(t.generated))
            pool.drop(reviewer)
            store.drop_agent(reviewer)
        for name in names:  # everything the store lacks goes there: the next run attaches from it
            pool.persist(name)
        live.update(view(pool, log, "done"))
    s = store.stats()
    print(f"store: {s['cards']} cards, {s['bytes'] / 2**20:.1f} MiB, {s['tokens_stored']} tokens stored for "
          f"{s['tokens_represented']} represented (sharing x{s['sharing']:.1f})")
    store.close()


if __name__ == "__main__":
    main()
