"""The hot tier: agents in a fixed memory budget (issue 15), four configurations in the same run.

    nice .venv/bin/python bench/pool.py              # 10 agents x 4K (2K shared), SmolLM2-135M fp32, CPU
    .venv/bin/python bench/pool.py --quick           # a small version of the same (minutes)
    nice .venv/bin/python bench/pool.py --q4 q4 --out bench/results/pool-q4.json   # (c), (d) in MLX affine q4
    python bench/pool.py --device cuda               # Llama-3.1-8B-shaped random bf16 model (no perplexity)

Writes bench/results/pool.json (bench/results/pool-quick.json with --quick) and a PNG beside it.

The workflow: ``agents`` agents, each with a ``context``-token context of which the first ``shared`` tokens
are the same for all (pydoc text; each agent's own part and turns continue its own stretch of the corpus).
Setup: every agent reads its context. Then ``rounds`` rounds, round robin: each turn feeds an agent
``turn`` new tokens and generates ``generate`` greedily (``cachecard.pool.workflow``). The budget holds
exactly ``budget_agents`` (3) agents at their final length in fp16. Configurations:

(a) no persistence: fp16 resident, no store; an evicted agent is recomputed when it comes back;
(b) fp16 resident, evictions to fp16 cards and reloads from them;
(c) a 4-bit codec resident, cards of the same codec (``--q4``: ``turbo4``, rotation + 4-bit Lloyd-Max, 4.25
    bits, by default; ``q4``, MLX affine 4-bit with fp16 scales, 4.5 bits; ``q4_0``);
(d) (c) with shared prefix blocks.

Reported per configuration: agents resident at once (the most seen, and how many agents of the final length
the budget holds), bytes per resident agent, setup and workflow time (the rounds; setup is when each agent
reads its context), TTFT p50/p95 over the rounds' turns, evictions/reloads/re-prefills, and the perplexity of
each round's new tokens (teacher-forced, all but each turn's first) and its drift from (a). Then 15 agents
sharing one ``context``-token context in the 4-bit codec: their resident bytes against one agent's plus their suffixes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cachecard import Store
from cachecard.adapters import hf
from cachecard.pool import BlockPool
from cachecard.pool.codecs import ResidentCodec
from cachecard.pool.workflow import round_robin, take_turn

RESULTS = Path(__file__).parent / "results"
FULL = dict(agents=10, context=4096, shared=2048, turn=64, generate=32, rounds=3, budget_agents=3, sharers=15)
QUICK = dict(agents=5, context=512, shared=256, turn=32, generate=8, rounds=3, budget_agents=2, sharers=15)
CONFIGS = {"a": ("fp16", False, False), "b": ("fp16", True, False), "c": ("q4", True, False), "d": ("q4", True, True)}
BLOCK = 16


def smollm2_model():
    from cachecard.testing import smollm2

    model, _ = smollm2.load()
    hf.bind(model, hf.model_identity(model, gguf=smollm2.gguf_path()))
    return model, smollm2.corpus_ids(), "SmolLM2-135M-Instruct fp32 (real weights), CPU"


def llama8b_model(device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cachecard import LayerKind, ModelIdentity, Rope

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    hf.bind(model, ModelIdentity(  # random weights: a stated identity instead of hashing 16 GB
        name="Llama-3.1-8B shape, random weights", architecture="llama", num_layers=32, num_kv_heads=8,
        head_dim=128, layer_kinds=(LayerKind(),) * 32, rope=Rope(theta=500000.0, rotary_dim=128),
        kv_dtype="bfloat16", weights_hash="sha256:" + "5" * 64, tokenizer_hash="sha256:" + "6" * 64))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 200_000)
    return model, ids, "Llama-3.1-8B shape, random bf16 weights (perplexity meaningless)"


def streams(corpus: np.ndarray, p: dict) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
    """Each agent's context (shared part + its own stretch of the corpus) and its turns (what follows it)."""
    own = p["context"] - p["shared"]
    span = own + p["rounds"] * p["turn"]
    names = [f"agent{i}" for i in range(p["agents"])]
    starts = np.linspace(p["shared"], len(corpus) - span, p["agents"]).astype(int)
    shared = corpus[:p["shared"]].tolist()
    ctx, turns = {}, {}
    for name, s in zip(names, starts):
        text = corpus[s:s + span].tolist()
        ctx[name] = shared + text[:own]
        turns[name] = [text[own + r * p["turn"]:own + (r + 1) * p["turn"]] for r in range(p["rounds"])]
    return ctx, turns


def blocks_for(tokens: int) -> int:
    return math.ceil(tokens / BLOCK)


def block_bytes(ident, codec: str) -> int:
    return 2 * ident.num_layers * ident.num_kv_heads * BLOCK * ResidentCodec(codec, ident.head_dim).row_bytes


@torch.no_grad()
def reference_nll(model, seqs: dict[str, list[int]], starts: list[tuple[int, str, int]], p: dict) -> list[float]:
    """Per round, the summed NLL of the scored tokens (each turn's new tokens but the first) when each agent's
    whole final sequence goes through the model at once, in full precision (no pool, no quantized cache)."""
    out = [0.0] * p["rounds"]
    for a, seq in seqs.items():
        mine = [(r, s) for r, b, s in starts if b == a]
        pos = torch.tensor([s + i for _, s in mine for i in range(p["turn"] - 1)])
        h = model.model(input_ids=torch.tensor([seq[:int(pos.max()) + 1]], device=model.device)).last_hidden_state[0]
        logits = model.lm_head(h[pos.to(h.device)]).float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(seq, device=h.device)[pos.to(h.device) + 1],
                                                reduction="none").view(len(mine), -1).sum(1)
        for (r, _), x in zip(mine, nll.tolist()):
            out[r] += x
    return out


def run_config(key: str, model, ident, ctx, turns, p: dict, budget: int, device: str, tmp: Path,
               reference: bool = True, q4: str = "q4") -> dict:
    codec, persist, share = CONFIGS[key]
    codec = q4 if codec == "q4" else codec
    store = Store(tmp / f"store-{key}") if persist else None
    pool = BlockPool(ident, budget_bytes=budget, codec=codec, block_tokens=BLOCK, store=store,
                     share_prefixes=share, device=device)
    names = list(ctx)
    for n in names:
        pool.add(n)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    for n in names:
        take_turn(pool, model, n, ctx[n], generate=0)
    sync()
    setup = time.perf_counter() - t0
    seen, starts = [], []

    def turn_tokens(r: int, a: str) -> list[int]:
        starts.append((r, a, len(pool.tokens(a))))  # where this turn's new tokens start in the agent's sequence
        return turns[a][r]

    t0 = time.perf_counter()
    done = round_robin(pool, model, names, turn_tokens, rounds=p["rounds"], generate=p["generate"],
                       score=p["turn"], on_turn=lambda t: seen.append(t.stats["resident"]))
    sync()
    workflow = time.perf_counter() - t0
    ref = reference_nll(model, {a: pool.tokens(a).tolist() for a in names}, starts, p) if reference else None
    s = pool.stats()
    ttft = [t.ttft_s for t in done]
    per_round = []
    for r in range(p["rounds"]):
        rt = [t for t in done if t.round == r]
        nll, n = sum(t.nll for t in rt), sum(t.scored for t in rt)
        per_round.append({"round": r + 1, "ppl": math.exp(nll / n), "ttft_p50_s": statistics.median(t.ttft_s for t in rt)})
        if ref is not None:  # the same tokens through the model without any cache quantization
            per_round[-1]["ppl_full_precision_same_tokens"] = math.exp(ref[r] / n)
            per_round[-1]["drift_pct_same_tokens"] = 100 * (math.exp((nll - ref[r]) / n) - 1)
    final = p["context"] + p["rounds"] * (p["turn"] + p["generate"])
    own_blocks = blocks_for(final)  # copy on write needs a block only after a fork (none here)
    shared_blocks = p["shared"] // BLOCK if share else 0
    total_blocks = pool.alloc.total
    fit = (total_blocks - shared_blocks) // (own_blocks - shared_blocks)
    row = {
        "config": key, "codec": pool.codec.describe(), "store": persist, "shared_prefixes": share,
        "budget_bytes": budget, "blocks": total_blocks, "block_bytes": pool.block_bytes,
        "agents_fit_at_final_length": int(fit), "agents_resident_max": max(seen), "agents_resident_min": min(seen),
        "bytes_used_end": s["bytes_used"], "bytes_per_resident_agent": s["bytes_used"] / max(1, s["resident"]),
        "setup_s": setup, "workflow_s": workflow, "total_s": setup + workflow,
        "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": float(np.percentile(ttft, 95)),
        "evictions": s["evictions"], "reloads": s["reloads"], "reprefills": s["reprefills"],
        "tokens_reloaded": s["tokens_reloaded"], "tokens_recomputed": s["tokens_recomputed"],
        "tokens_shared": s["tokens_shared"], "evict_failures": s["evict_failures"], "rounds": per_round,
        "store_bytes": store.stats()["bytes"] if store else 0,
    }
    if store is not None:
        store.close()
    print(f"({key}) {row['codec']}: fit {fit}, resident max {max(seen)}, setup {setup:.1f}s, workflow "
          f"{workflow:.1f}s, TTFT p50 {row['ttft_p50_s']:.2f}s p95 {row['ttft_p95_s']:.2f}s, evictions "
          f"{s['evictions']}, reloads {s['reloads']}, re-prefills {s['reprefills']}, "
          f"ppl {[round(x['ppl'], 3) for x in per_round]}, same-token drift "
          f"{[round(x.get('drift_pct_same_tokens', float('nan')), 2) for x in per_round]}%", flush=True)
    return row


def sharing_check(model, ident, corpus, p: dict, device: str, codec: str) -> dict:
    """``sharers`` agents over one ``context``-token context, ``codec`` with shared blocks: their resident
    bytes against one agent's context plus each one's own suffix."""
    ctx = corpus[:p["context"]].tolist()
    suffix = p["turn"]
    per_token = block_bytes(ident, codec) / BLOCK
    need = blocks_for(p["context"]) + p["sharers"] * (blocks_for(suffix) + 2)
    pool = BlockPool(ident, budget_bytes=need * block_bytes(ident, codec), codec=codec, block_tokens=BLOCK,
                     device=device)
    pool.add("reader")
    take_turn(pool, model, "reader", ctx, generate=0)
    one = pool.stats()["bytes_used"]
    for i in range(p["sharers"]):
        name = f"sharer{i}"
        pool.add(name)
        take_turn(pool, model, name, ctx + corpus[p["context"] + i * suffix:p["context"] + (i + 1) * suffix].tolist(),
                  generate=0)
    pool.drop("reader")
    used = pool.stats()["bytes_used"]
    own = p["sharers"] * suffix * per_token
    fp16_alone = (p["sharers"] * (p["context"] + suffix) * 2 * ident.num_layers * ident.num_kv_heads * ident.head_dim * 2)
    out = {"agents": p["sharers"], "context": p["context"], "suffix": suffix, "bytes_used": used,
           "one_agent_context_bytes": one, "suffix_bytes": own, "ratio_vs_one_plus_suffixes": used / (one + own),
           "fp16_unshared_bytes": fp16_alone, "x_smaller_than_fp16_unshared": fp16_alone / used,
           "blocks_shared": pool.stats()["blocks_shared"]}
    print(f"{p['sharers']} agents sharing a {p['context']}-token context: {used / 2**20:.1f} MiB = "
          f"{out['ratio_vs_one_plus_suffixes']:.3f}x one agent's context + their suffixes "
          f"({fp16_alone / 2**20:.0f} MiB in fp16 without sharing)", flush=True)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["configs"]
    labels = [f"({r['config']}) {r['codec'].split(' ')[0]}{' +store' if r['store'] else ''}"
              f"{' +shared' if r['shared_prefixes'] else ''}" for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].bar(labels, [r["agents_fit_at_final_length"] for r in rows], color="tab:blue")
    ax[0].set_title("agents the budget holds (final length)")
    ax[1].bar(labels, [r["workflow_s"] for r in rows], color="tab:orange", label="rounds")
    ax[1].bar(labels, [r["setup_s"] for r in rows], bottom=[r["workflow_s"] for r in rows], color="tab:gray",
              alpha=0.5, label="setup (read contexts)")
    ax[1].set_title("time (s)")
    ax[1].legend()
    same = all("drift_pct_same_tokens" in x for r in rows for x in r["rounds"])
    for r, lab in zip(rows, labels):
        ax[2].plot([x["round"] for x in r["rounds"]],
                   [x["drift_pct_same_tokens"] if same else x["ppl"] for x in r["rounds"]], marker="o", label=lab)
    ax[2].set_title("perplexity drift (%) vs a full-precision pass over the same tokens" if same
                    else "perplexity of each round's new tokens", fontsize=10)
    ax[2].set_xlabel("round")
    ax[2].set_xticks([x["round"] for x in rows[0]["rounds"]])
    ax[2].legend(fontsize=8)
    for a in ax[:2]:
        a.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"{res['setup']['model']}: {res['setup']['agents']} agents, {res['setup']['context']}-token context "
                 f"({res['setup']['shared']} shared), budget = {res['setup']['budget_agents']} agents in fp16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small run: " + json.dumps(QUICK))
    ap.add_argument("--device", default="cpu", help="cpu (SmolLM2) or cuda (Llama-3.1-8B shape, random weights)")
    ap.add_argument("--configs", default="abcd")
    ap.add_argument("--q4", default="turbo4", help="the 4-bit resident codec of (c) and (d): turbo4 (rotation + "
                    "Lloyd-Max, 4.25 bits), q4 (MLX affine, 4.5 bits) or q4_0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=N",
                    help="override a workflow parameter, e.g. --set agents=6 --set context=2048")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 cores shared with other jobs: 1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the full-precision pass over each agent's "
                    "final sequence (same-token perplexity drift)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in p:
            raise SystemExit(f"--set: unknown parameter {key!r}; known: {sorted(p)}")
        p[key] = int(value)
    model, corpus, what = smollm2_model() if args.device == "cpu" else llama8b_model(args.device)
    ident = hf.identity_of(model)
    ctx, turns = streams(corpus, p)
    final = p["context"] + p["rounds"] * (p["turn"] + p["generate"])
    budget = p["budget_agents"] * blocks_for(final) * block_bytes(ident, "fp16")
    res = {"setup": {"model": what, "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "block_tokens": BLOCK, "workspace": "batch", "exact_fresh": True, "q4_codec": args.q4,
                     "budget_bytes": budget, **p}, "configs": []}
    with tempfile.TemporaryDirectory(dir=RESULTS.parent) as tmp:
        for key in args.configs:
            res["configs"].append(run_config(key, model, ident, ctx, turns, p, budget, args.device, Path(tmp),
                                             reference=not args.no_reference and args.device == "cpu", q4=args.q4))
    res["sharing"] = sharing_check(model, ident, corpus, p, args.device, args.q4) if p["sharers"] else None
    by = {r["config"]: r for r in res["configs"]}
    if {"a", "b", "c", "d"} <= set(by):
        a = by["a"]
        for r in res["configs"]:
            r["ppl_drift_pct_vs_a"] = [100 * (x["ppl"] / y["ppl"] - 1) for x, y in zip(r["rounds"], a["rounds"])]
        res["agents_ratio_q4_vs_fp16"] = by["c"]["agents_fit_at_final_length"] / by["b"]["agents_fit_at_final_length"]
        res["agents_ratio_shared_vs_fp16"] = by["d"]["agents_fit_at_final_length"] / by["b"]["agents_fit_at_final_length"]
        res["bytes_ratio_fp16_vs_q4"] = by["b"]["block_bytes"] / by["c"]["block_bytes"]
        res["workflow_speedup_vs_reprefill"] = a["workflow_s"] / by["d"]["workflow_s"]
        res["total_speedup_vs_reprefill"] = a["total_s"] / by["d"]["total_s"]
        res["ppl_drift_pct_q4_raw"] = by["c"]["ppl_drift_pct_vs_a"][-1]
        res["ppl_drift_pct_q4_shared_raw"] = by["d"]["ppl_drift_pct_vs_a"][-1]
        if "drift_pct_same_tokens" in a["rounds"][-1]:
            def same(r: dict) -> float:  # a round's ppl over the same tokens' full-precision ppl
                return 1 + r["drift_pct_same_tokens"] / 100

            for r in res["configs"]:
                r["ppl_drift_pct_same_tokens_vs_a"] = [100 * (same(x) / same(y) - 1)
                                                       for x, y in zip(r["rounds"], a["rounds"])]
            res["ppl_drift_pct_q4"] = by["c"]["ppl_drift_pct_same_tokens_vs_a"][-1]
            res["ppl_drift_pct_q4_shared"] = by["d"]["ppl_drift_pct_same_tokens_vs_a"][-1]
        res["definitions"] = {
            "agents_ratio_*": "agents of the final length the budget holds, q4 (or q4 + shared prefix) over fp16",
            "workflow_speedup_vs_reprefill": "time of the rounds (after every agent read its context), (a) / (d)",
            "total_speedup_vs_reprefill": "the same with the setup (every agent reading its context) included",
            "ppl_drift_pct_q4": "round 3, (c): perplexity of the scored tokens over their perplexity in one "
                                "full-precision pass over the same tokens, relative to the same ratio for (a)",
            "ppl_drift_pct_q4_raw": "round 3: (c)'s perplexity over (a)'s; the tokens differ (each config "
                                    "generates its own), so this mixes in generation differences"}
    out = args.out or RESULTS / ("pool-quick.json" if args.quick else "pool.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    try:
        plot(res, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=1))


if __name__ == "__main__":
    main()
