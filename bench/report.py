"""Markdown tables of bench/results/*.json for the README's performance section.

Run: .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def codecs() -> str:
    data = json.loads((RESULTS / "codecs.json").read_text())
    rows = ["| preset | bits/elem | vs fp16 | ppl Δ % (P=512 / 2048 / all) | mean KL | decode GB/s (f32 / fp16) | encode GB/s |",
            "|---|---|---|---|---|---|---|"]
    for p in sorted(data["points"], key=lambda p: -p["bits_per_element"]):
        bp = p["by_prefix"]
        rows.append(
            f"| `{p['codec']}` | {p['bits_per_element']:.2f} | {p['compression']:.2f}x | "
            f"{bp['512']['ppl_delta_pct']:+.2f} / {bp['2048']['ppl_delta_pct']:+.2f} / **{p['ppl_delta_pct']:+.2f}** | "
            f"{p['kl']:.4f} | {fmt(p.get('decode_GBps'), '.2f')} / {fmt(p.get('decode_fp16_GBps'), '.2f')} | "
            f"{fmt(p.get('encode_GBps'), '.3f')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(codecs())
