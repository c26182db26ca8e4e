"""The ``cachecard`` command (typer + rich).

Exit codes: 0 success, 1 a card failed a check or could not be read, 2 bad usage.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cachecard.errors import CacheCardError
from cachecard.kvstore import layout, open_card

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect and check CacheCard KV-cache cards.")
out = Console()
err = Console(stderr=True)


def _summary(location: str) -> dict[str, object]:
    card = open_card(location)
    m = card.manifest
    objs = card.objects()
    stored = sum(objs.values())
    elements = 2 * m.model.num_layers * m.model.num_kv_heads * m.tokens.count * m.model.head_dim
    raw = elements * layout.STORAGE_DTYPES[m.model.kv_dtype].itemsize
    return {
        "card": location, "card_id": m.card_id, "format": card.format, "created": m.created.isoformat(),
        "producer": f"{m.producer.library} {m.producer.version}" + (f" ({m.producer.runtime})" if m.producer.runtime else ""),
        "model": m.model.name or "-", "architecture": m.model.architecture, "layers": m.model.num_layers,
        "kv_heads": m.model.num_kv_heads, "head_dim": m.model.head_dim, "kv_dtype": m.model.kv_dtype,
        "rope_theta": m.model.rope.theta, "weights_hash": m.model.weights_hash,
        "tokenizer_hash": m.model.tokenizer_hash, "tokens": m.tokens.count, "start_position": m.start_position,
        "positions": m.positions, "parent": f"{m.parent.card_id} ({m.parent.tokens} tokens)" if m.parent else "-",
        "codec_k": m.codecs.k, "codec_v": m.codecs.v, "objects": len(objs), "bytes_on_disk": stored,
        "kv_bytes": raw, "compression_vs_kv_dtype": raw / stored if stored else 0.0,
        "compression_vs_fp16": elements * 2 / stored if stored else 0.0,
    }


def _fail(location: str, e: CacheCardError) -> None:
    err.print(f"[red]FAIL[/red] {e}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    card: Annotated[str, typer.Argument(help="card directory, .zip or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show a card's model identity, tokens, layout, codecs and size on disk."""
    try:
        info = _summary(card)
    except CacheCardError as e:
        _fail(card, e)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"CacheCard {info['card_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in info.items():
        if key.startswith("compression"):
            value = f"{value:.2f}x"
        elif key in ("bytes_on_disk", "kv_bytes"):
            value = f"{value:,} B"
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@app.command()
def verify(cards: Annotated[list[str], typer.Argument(help="one or more cards")]) -> None:
    """Read every chunk of each card and check every checksum. Exit 1 if any card fails."""
    failed = 0
    for card in cards:
        try:
            report = open_card(card).verify()
        except CacheCardError as e:
            _fail(card, e)
            failed += 1
            continue
        out.print(f"[green]OK[/green] {card}: format {report.format}, {report.tokens} tokens, "
                  f"{report.chunks_checked} chunks in {report.objects} objects, {report.stored_bytes:,} bytes",
                  highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()
