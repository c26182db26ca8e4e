"""The ``cachecard`` command (typer + rich).

Exit codes: 0 success, 1 a card failed a check or could not be read, 2 bad usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cachecard.calibrate import register as _register_calibrate
from cachecard.errors import CacheCardError
from cachecard.card import layout
from cachecard.card.reader import open_card

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect and check CacheCard KV-cache cards and stores.")
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from cachecard import __version__

        out.print(f"cachecard {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Inspect and check CacheCard KV-cache cards and stores."""


# -- stores (agent memory: cachecard.kvstore.store) -------------------------------------------------------------
IndexOpt = Annotated[Optional[str], typer.Option("--index", help="the store's index: an LMDB directory (default: "
                                                 "<store>/index, or a per-URL cache dir for remote stores), or "
                                                 "redis://host:6379/0 for an index shared by many nodes")]
OptionsOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="fsspec storage option KEY=VALUE "
                                                         "(repeatable), e.g. -o endpoint_url=http://...")]
StoreArg = Annotated[str, typer.Argument(help="store directory or fsspec URL (s3://bucket/prefix)")]


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
    card: Annotated[str, typer.Argument(help="card directory, .zip or fsspec URL; or a store, with CARD_ID")],
    card_id: Annotated[Optional[str], typer.Argument(help="a card id (or its first characters) from "
                                                     "`cachecard ls`, when CARD is a store")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    index: IndexOpt = None,
    option: OptionsOpt = None,
) -> None:
    """Show a card's model identity, tokens, layout, codecs and size on disk."""
    location = card
    if card_id is not None:
        with _store(card, index, option) as st:
            location = st.card_location(_resolve_id(st, card_id))
    try:
        info = _summary(location)
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
def verify(
    cards: Annotated[list[str], typer.Argument(help="one or more cards, or stores (every card is checked)")],
    index: IndexOpt = None,
    option: OptionsOpt = None,
) -> None:
    """Read every chunk of each card and check every checksum. Exit 1 if any card fails."""
    failed = 0
    for card in cards:
        if _is_store(card, option):
            failed += _verify_store(card, index, option)
            continue
        try:
            report = open_card(card).verify()
        except CacheCardError as e:
            _fail(card, e)
            failed += 1
            continue
        binding = ("every object bound to the card" if report.bound else
                   "[yellow]unbound[/yellow] (format 1.0-1.2: objects not bound to the card; rewrite to bind)")
        if report.authenticated:
            binding += ", HMAC verified"
        if report.unlisted:
            binding += f"; ignored {len(report.unlisted)} objects not in its table: {', '.join(report.unlisted[:5])}"
        out.print(f"[green]OK[/green] {card}: format {report.format}, {report.tokens} tokens, "
                  f"{report.chunks_checked} chunks in {report.objects} objects, {report.stored_bytes:,} bytes; "
                  f"{binding}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _options(option: list[str] | None) -> dict[str, object]:
    opts: dict[str, object] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"storage options are KEY=VALUE; got {item!r}")
        opts[key] = json.loads(value) if value[:1] in "{[" or value in ("true", "false") else value
    return opts


def _is_store(location: str, option: list[str] | None = None) -> bool:
    from cachecard.kvstore.store import STORE_FILE

    if "://" not in location:
        return (Path(location) / STORE_FILE).is_file()
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(location, **_options(option))
        return bool(fs.isfile(f"{base.rstrip('/')}/{STORE_FILE}"))
    except Exception:  # noqa: BLE001 - not reachable or not a store: treat it as a card location
        return False


def _store(location: str, index: str | None, option: list[str] | None):  # noqa: ANN202
    from cachecard.kvstore.store import Store

    try:
        return Store(location, index=index, create=False, storage_options=_options(option) or None)
    except CacheCardError as e:
        path = Path(location)
        if "://" in location or _is_store(location, option) or path.is_file():
            err.print(f"[red]FAIL[/red] {e}", highlight=False, soft_wrap=True)
        elif not path.exists():
            err.print(f"[red]FAIL[/red] no cachecard store at {location!r}: it does not exist; name a store "
                      "directory (a folder holding cachecard-store.json)", highlight=False, soft_wrap=True)
        else:  # a folder, but not a store: say what it holds, in this command's terms
            from cachecard.card.locations import folder_contents, held

            cards, stores = folder_contents(path)
            err.print(f"[red]FAIL[/red] {location!r} is not a cachecard store (it has no cachecard-store.json)"
                      + (f"; it holds {held(path, cards, stores)}" if cards or stores else ""),
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _resolve_id(st, text: str) -> str:  # noqa: ANN001
    """A full card id from an id or its first characters (as `ls` shows parents); exit 1 when none or
    several cards match."""
    ids = [c.card_id for c in st.cards()]
    found = [i for i in ids if i.startswith(text.lower())] if text else []
    if len(found) != 1:
        why = "no card id starts with" if not found else f"{len(found)} card ids start with"
        err.print(f"[red]FAIL[/red] {why} {text!r} in {st.root_label}; list them with `cachecard ls "
                  f"{st.root_label}`", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    return found[0]


def _bar(description: str):  # noqa: ANN202
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


def _run_with_bar(description: str, fn):  # noqa: ANN001, ANN202
    with _bar(description) as bar:
        task = bar.add_task(description, total=None)
        return fn(lambda done, total: bar.update(task, completed=done, total=total))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _verify_store(location: str, index: str | None, option: list[str] | None) -> int:
    with _store(location, index, option) as st:
        rep = _run_with_bar("verifying cards", lambda p: st.verify(progress=p))
    for card_id, why in rep.failures.items():
        err.print(f"[red]FAIL[/red] {card_id}: {why}", highlight=False, soft_wrap=True)
    colour = "green" if not rep.failures else "red"
    out.print(f"[{colour}]{'OK' if not rep.failures else 'FAIL'}[/{colour}] {location}: {rep.ok} of {rep.checked} "
              "cards verified", highlight=False, soft_wrap=True)
    return 1 if rep.failures else 0


@app.command("ls")
def ls_(
    store: StoreArg,
    agent: Annotated[Optional[str], typer.Option(help="only this agent's cards")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    index: IndexOpt = None,
    option: OptionsOpt = None,
) -> None:
    """List a store's cards: agents, tokens (own / whole sequence), parent, size, last access."""
    from datetime import datetime

    with _store(store, index, option) as st:
        try:
            cards = st.cards(agent=agent)
        except CacheCardError as e:
            err.print(f"[red]FAIL[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps([c.__dict__ for c in cards]))
        return
    # Ids on one line: whole when the terminal has room, else their first 12 characters (inspect and rm
    # take either; --json always gives whole ids).
    id_width = 32 if out.width >= 120 else 12
    table = Table(title=f"{store}: {len(cards)} cards", title_justify="left")
    for col in ("card", "agents", "tokens", "parent", "codecs", "size", "accessed"):
        table.add_column(col, justify="right" if col in ("tokens", "size") else "left", no_wrap=col == "card",
                         min_width=id_width if col == "card" else None, overflow="ellipsis")
    for c in cards:
        parent = f"{c.parent[:12]} @{c.parent_tokens}" if c.parent else "-"
        when = datetime.fromtimestamp(c.accessed).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(c.card_id[:id_width], ", ".join(c.agents) or f"- ({c.children} children)",
                      f"{c.tokens} / {c.total}", parent, "/".join(dict.fromkeys(c.codecs)), _size(c.bytes), when)
    out.print(table)


@app.command()
def stats(store: StoreArg, as_json: Annotated[bool, typer.Option("--json")] = False, index: IndexOpt = None,
          option: OptionsOpt = None) -> None:
    """Cards, agents, references, blocks indexed, bytes, and how much sharing saves."""
    with _store(store, index, option) as st:
        info = st.stats()
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"store {store}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in info.items():
        if key in ("bytes", "index_bytes", "index_map_size"):
            value = _size(value)
        elif key == "sharing":
            value = f"{value:.2f}x tokens represented per token stored"
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@app.command()
def gc(
    store: StoreArg,
    grace: Annotated[float, typer.Option(help="leave unindexed data younger than this many seconds alone")] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be removed; change nothing")] = False,
    index: IndexOpt = None,
    option: OptionsOpt = None,
) -> None:
    """Collect orphans and unreferenced cards; adopt committed cards the index lacks."""
    with _store(store, index, option) as st:
        rep = _run_with_bar("scanning cards", lambda p: st.gc(grace_s=grace, dry_run=dry_run, progress=p))
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(rep.freed)} unreferenced cards, {len(rep.orphans_deleted)} orphans and "
              f"{len(rep.partial_deleted)} partial writes ({_size(rep.bytes_freed)}); adopted {len(rep.adopted)}; "
              f"fixed {rep.refs_fixed} references", highlight=False, soft_wrap=True)
    for card_id in rep.lost:
        err.print(f"[yellow]LOST[/yellow] {card_id}: indexed but its data is gone; `cachecard reindex` drops it",
                  highlight=False, soft_wrap=True)


@app.command()
def reindex(store: StoreArg, index: IndexOpt = None, option: OptionsOpt = None) -> None:
    """Rebuild the index (LMDB or Redis) from the card manifests and the agents' references."""
    with _store(store, index, option) as st:
        rep = _run_with_bar("reading manifests", lambda p: st.reindex(progress=p))
    out.print(f"indexed {rep.cards} cards, {rep.refs} references, {rep.blocks} blocks", highlight=False)
    for card_id, why in rep.skipped.items():
        err.print(f"[yellow]SKIPPED[/yellow] {card_id}: {why}", highlight=False, soft_wrap=True)


@app.command()
def rm(
    store: StoreArg,
    cards: Annotated[Optional[list[str]], typer.Argument(help="card ids")] = None,
    agent: Annotated[Optional[str], typer.Option(help="remove only this agent's references (with no card ids: "
                                                 "all of them)")] = None,
    index: IndexOpt = None,
    option: OptionsOpt = None,
) -> None:
    """Remove references to cards; data goes when no agent and no other card uses it."""
    if not cards and agent is None:
        raise typer.BadParameter("name card ids, or --agent to drop an agent")
    with _store(store, index, option) as st:
        ids = [_resolve_id(st, c) for c in cards or []]  # every id checked before anything is removed
        try:
            freed = st.drop_agent(agent) if not ids and agent is not None else []
            for card_id in ids:
                freed += st.delete(card_id, agent=agent)
        except CacheCardError as e:
            err.print(f"[red]FAIL[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    out.print(f"removed references; freed {len(freed)} cards" + (f": {', '.join(freed)}" if freed else ""),
              highlight=False, soft_wrap=True)


@app.command()
def presets(as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """List the codec presets a card can be written with (spec/codecs/README.md)."""
    from cachecard.codecs import PRESETS

    rows = [{"preset": p.name, "lossy": p.lossy, "summary": p.summary} for p in PRESETS.values()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="codec presets", title_justify="left")
    for col in ("preset", "lossy", "summary"):
        table.add_column(col, style="bold cyan" if col == "preset" else None)
    for r in rows:
        table.add_row(r["preset"], "yes" if r["lossy"] else "no", r["summary"])
    out.print(table)


_register_calibrate(app)  # `cachecard calibrate` (src/cachecard/calibrate.py)


def main() -> None:
    app()
