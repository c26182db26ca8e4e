"""Agents taking turns over one pool (DESIGN.md §4 "Hot tier"): the loop behind ``examples/pool_workflow.py``
and ``bench/pool.py``, for transformers models.

A turn feeds one agent its new tokens (after any tokens still pending: its last generated one, or tokens to
recompute), measures the time to the first generated token (making the agent resident included: a reload
from the store, or a re-prefill), scores the new tokens against the model's predictions (teacher forcing:
the negative log-likelihood of each new token after the first), then generates greedily. The agent's last
generated token stays pending and opens its next turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cachecard.pool.hf import PoolCache
from cachecard.pool.pool import BlockPool


@dataclass
class Turn:
    """What one turn did and cost."""

    round: int
    agent: str
    fed: int                      # tokens the forward computed (pending, recomputed and new ones)
    new: int                      # new tokens of this turn
    generated: list[int]
    ttft_s: float                 # start of the turn to the first generated token
    seconds: float                # the whole turn
    nll: float                    # summed over `scored` new tokens
    scored: int
    reloaded: bool                # the agent came back from the store
    recomputed: int               # tokens it had before that were computed again (no store, or not stored)
    stats: dict[str, Any] = field(default_factory=dict)  # the pool's stats after the turn


@torch.no_grad()
def take_turn(pool: BlockPool, model: Any, agent: str, new: Sequence[int], *, generate: int, round: int = 0,
              score: int | None = None, workspace: str = "batch") -> Turn:
    """One agent's turn: feed ``new``, score its last ``score`` tokens (default: all), generate ``generate``
    tokens greedily (0: just read ``new``)."""
    t0 = time.perf_counter()
    counts = dict(pool.counts)
    with PoolCache(pool, [agent], model, workspace=workspace) as cache:
        inputs = cache.feed([list(new)], reserve=generate)
        fed = inputs["input_ids"].shape[1]
        # logits of the scored positions only (a 4K prefill's full logits take GBs)
        keep = min(len(new) if score is None else score, fed)
        logits = model(**inputs, logits_to_keep=keep).logits[0].float()
        token = int(logits[-1].argmax())
        ttft = time.perf_counter() - t0
        target = torch.as_tensor(list(new)[len(new) - keep + 1:], device=logits.device)
        nll = float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum")) if len(target) else 0.0
        out = [token] if generate else []
        for _ in range(generate - 1):
            logits = model(**cache.feed([[out[-1]]])).logits
            out.append(int(logits[0, -1].argmax()))
        if out:
            cache.hold([[out[-1]]])
    stats = pool.stats()
    return Turn(round, agent, fed, len(new), out, ttft, time.perf_counter() - t0, nll, len(target),
                stats["reloads"] > counts["reloads"], stats["tokens_recomputed"] - counts["tokens_recomputed"], stats)


def round_robin(pool: BlockPool, model: Any, agents: Sequence[str], turn_tokens: Callable[[int, str], Sequence[int]],
                *, rounds: int, generate: int, on_turn: Callable[[Turn], None] | None = None,
                score: int | None = None, workspace: str = "batch") -> list[Turn]:
    """``rounds`` rounds in which every agent, in order, takes a turn with ``turn_tokens(round, agent)``."""
    turns = []
    for r in range(rounds):
        for a in agents:
            turns.append(take_turn(pool, model, a, turn_tokens(r, a), generate=generate, round=r, score=score,
                                   workspace=workspace))
            if on_turn is not None:
                on_turn(turns[-1])
    return turns


__all__ = ["Turn", "round_robin", "take_turn"]
