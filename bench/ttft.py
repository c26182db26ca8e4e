"""Time to first token: restore from a store vs full prefill, in the same run.

    .venv/bin/python bench/ttft.py          # CPU: SmolLM2-135M fp32 (real weights) at 1K, 2K, 4K
    python bench/ttft.py --gpu              # GPU: Llama-3.1-8B-shaped random bf16 model, 1K-32K, warm/cold

Both write their part of bench/results/ttft.json (the other part is kept) and redraw bench/results/ttft.png.

TTFT is the time from a request (a prompt of ``context`` cached tokens + 1 new token) to its first generated
token. Prefill: one forward pass over the whole prompt, argmax. Restore: ``hf.restore_from_store`` (prefix
match in the index, card read, decode, inject into a DynamicCache) + a forward pass over the uncached token +
argmax. Each figure is the median of ``--repeats`` runs after one warm-up. On the GPU, "cold" drops the
cards' pages from the page cache (posix_fadvise DONTNEED after a sync) and opens a fresh Store before each
restore; "warm" reuses the Store and the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cachecard import Store
from cachecard.adapters import hf
from cachecard.card.layout import DEFAULT_CHUNK_TOKENS

RESULTS = Path(__file__).parent / "results"
CPU_CONTEXTS = (1024, 2048, 4096)
CPU_CODECS = ("lossless", "q8", "q4", "frontier3.2")
GPU_CONTEXTS = (1024, 4096, 8192, 16384, 32768)
# "preset@chunk_tokens": bigger inner chunks mean less per-chunk work on a restore (and coarser partial reads)
GPU_CODECS = ("lossless", "q8", "q4_0", "q8@1024", "q4_0@1024")


def median_time(fn, repeats: int, before=None) -> float:
    times = []
    for i in range(repeats + 1):  # the first run warms up
        if before:
            before()
        t = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_token_prefill(model, prompt: torch.Tensor, sync) -> int:
    with torch.no_grad():
        tok = int(model(prompt, logits_to_keep=1).logits[0, -1].argmax())
    sync()
    return tok


def first_token_restore(model, store: Store, prompt: torch.Tensor, agent: str, sync) -> int:
    cache, n = hf.restore_from_store(store, model, prompt[0], agent=agent)
    with torch.no_grad():
        tok = int(model(prompt[:, n:], past_key_values=cache, logits_to_keep=1).logits[0, -1].argmax())
    sync()
    return tok


def run(model, ids: torch.Tensor, contexts, codecs, store_dir: Path, repeats: int, device: str,
        cold: bool) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ident = hf.identity_of(model)
    store = Store(store_dir)
    longest = max(contexts)
    with torch.no_grad():  # one prefill of the longest context gives every shorter context's KV too
        kv = hf.to_canonical(model.model(ids[:, :longest], use_cache=True).past_key_values)
    for spec in codecs:
        codec, _, chunk = spec.partition("@")
        t = time.perf_counter()
        store.put(kv, ids[0, :longest].cpu().numpy(), ident, agent=_agent(spec), codec=codec, share=False,
                  chunk_tokens=int(chunk or DEFAULT_CHUNK_TOKENS))
        print(f"  stored {longest} tokens as {spec} in {time.perf_counter() - t:.1f} s", flush=True)
    del kv
    os.sync()
    rows = []
    for n in contexts:
        prompt = ids[:, :n + 1]
        prefill_s = median_time(lambda: first_token_prefill(model, prompt, sync), repeats)
        expect = first_token_prefill(model, prompt, sync)
        for spec in codecs:
            agent = _agent(spec)
            codec, _, chunk = spec.partition("@")
            for mode in (("warm", "cold") if cold else ("warm",)):
                holder = {"store": store}

                def drop() -> None:
                    _drop_page_cache(store_dir)
                    holder["store"] = Store(store_dir)

                restore_s = median_time(
                    lambda: first_token_restore(model, holder["store"], prompt, agent, sync), repeats,
                    before=drop if mode == "cold" else None)
                same = first_token_restore(model, holder["store"], prompt, agent, sync) == expect
                row = {"context": n, "codec": codec, "prefill_s": prefill_s, "restore_s": restore_s,
                       "ratio": prefill_s / restore_s, "same_first_token": same,
                       "chunk_tokens": int(chunk or DEFAULT_CHUNK_TOKENS)}
                if device == "cuda":
                    row["cache"] = mode
                rows.append(row)
                print(f"  {n:6d} {spec:12s} {mode}: prefill {prefill_s * 1e3:8.1f} ms, restore "
                      f"{restore_s * 1e3:7.1f} ms, {prefill_s / restore_s:6.1f}x, same token: {same}", flush=True)
    store.close()
    return rows


def _agent(spec: str) -> str:
    return spec.replace(".", "_").replace("@", "_")


def _drop_page_cache(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cpu(repeats: int) -> list[dict]:
    from cachecard.testing import smollm2

    model, tok = smollm2.load()
    hf.bind(model, hf.model_identity(model, tokenizer=tok, gguf=smollm2.gguf_path()))
    ids = torch.as_tensor(smollm2.corpus_ids()[None, :max(CPU_CONTEXTS) + 1])
    with tempfile.TemporaryDirectory(dir=RESULTS.parent) as tmp:
        return run(model, ids, CPU_CONTEXTS, CPU_CODECS, Path(tmp) / "store", repeats, "cpu", cold=False)


def gpu(repeats: int, contexts=GPU_CONTEXTS) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cachecard import LayerKind, ModelIdentity, Rope

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    # Random weights: hashing 16 GB would only slow the bench down; the identity is a stated constant.
    hf.bind(model, ModelIdentity(
        name="Llama-3.1-8B shape, random weights", architecture="llama", num_layers=32, num_kv_heads=8,
        head_dim=128, layer_kinds=(LayerKind(),) * 32, rope=Rope(theta=500000.0, rotary_dim=128),
        kv_dtype="bfloat16", weights_hash="sha256:" + "5" * 64, tokenizer_hash="sha256:" + "6" * 64))
    ids = torch.randint(0, cfg.vocab_size, (1, max(contexts) + 1), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    root = Path(os.environ.get("TTFT_DIR", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        return run(model, ids, contexts, GPU_CODECS, Path(tmp) / "store", repeats, "cuda", cold=True)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    parts = [p for p in ("cpu", "gpu") if results.get(p)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = results[part]
        ctx = sorted({r["context"] for r in rows})
        pre = [next(r["prefill_s"] for r in rows if r["context"] == c) for c in ctx]
        ax.plot(ctx, [p * 1e3 for p in pre], "k-o", label="prefill")
        for codec in dict.fromkeys((r["codec"], r.get("chunk_tokens", 256)) for r in rows):
            for mode in dict.fromkeys(r.get("cache", "warm") for r in rows):
                pts = [(r["context"], r["restore_s"] * 1e3) for r in rows
                       if (r["codec"], r.get("chunk_tokens", 256)) == codec and r.get("cache", "warm") == mode]
                name = codec[0] + (f"@{codec[1]}" if codec[1] != 256 else "")
                ax.plot(*zip(*pts), "--" if mode == "cold" else "-", marker=".",
                        label=f"restore {name}" + (f" ({mode})" if part == "gpu" else ""))
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="TTFT (ms)",
               title="CPU: SmolLM2-135M fp32" if part == "cpu" else "GPU: Llama-3.1-8B shape bf16")
        ax.set_xticks(ctx, [f"{c // 1024}K" for c in ctx])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "ttft.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU part (needs CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "ttft.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"cpu": [], "gpu": []}
    part = "gpu" if args.gpu else "cpu"
    results[part] = gpu(args.repeats) if args.gpu else cpu(args.repeats)
    results[f"{part}_setup"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "device": torch.cuda.get_device_name() if args.gpu else "cpu",
                                "repeats": args.repeats, "measured": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results)
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
