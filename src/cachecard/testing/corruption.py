"""A seeded corruption campaign over cards (issue 13; spec/cachecard-1.md §7, §9): damage a card, read it by
every path, and classify what came back. ``tests/card/test_corruption.py`` runs a bounded sample in CI;
``bench/integrity.py --full`` runs 10,000+ trials in watched worker processes.

Fault kinds come in three classes:

- ``damage``: what disks, networks, careless tools and naive tampering do, no checksum recomputed (bit flips,
  bursts, truncation, deletion, appended junk, objects swapped between cards, arrays and chunk positions,
  edited metadata, zip-level damage, duplicate/``..``/link members, zip bombs, links and FIFOs in directories);
- ``inner``: forgeries that recompute the CRC-32Cs inside objects (chunk CRCs, shard index CRCs) but not the
  manifest: the object table must catch them;
- ``forgery``: forgeries that recompute every unkeyed checksum (chunk and index CRCs, the object table, the
  manifest checksum; or keep a chunk's CRC by a 4-byte collision). Without the store key they read as a valid
  card (reported, expected); with it every one must be refused.

Every trial reads the damaged card by every path (open, full read, partial read, ``read_encoded``, verify;
each on a freshly opened card) and is ``detected`` (some path raised a CacheCardError, none returned wrong
data), ``harmless`` (every path returned exactly the original), ``silent_wrong`` (some path returned data that
differs) or ``foreign`` (some path raised an exception that is not a CacheCardError).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cachecard
from cachecard.errors import CacheCardError, UnsupportedCodecError
from cachecard.testing import forgery, make_identity, make_kv
from cachecard.testing.faults import FAULTS

KEY = b"campaign-store-key-0123456789"
READ_LIMIT = 256 << 20  # max_read_bytes of every read in the campaign: bounded memory
LAYERS, HEADS, TOKENS, DIM, CHUNK = 3, 2, 40, 64, 16
PRESETS = ("lossless", "q8", "q4_0", "q4", "turbo3", "frontier3.2", "zstd")
PARTIAL = dict(layers=range(1, 3), tokens=slice(5, 30))


@dataclass
class Variant:
    """A pristine card: its objects, and what every read path returns for it."""

    name: str
    preset: str
    container: str        # "dir" or "zip"
    keyed: bool
    objs: dict[str, bytes]
    other: dict[str, bytes]  # a card of the same shape and preset, other values (for swaps)
    expected: dict[str, Any] = field(default_factory=dict)


def build_variants(root: Path, presets: tuple[str, ...] = PRESETS, *, unbound: bool = False) -> list[Variant]:
    """Cards of every preset, as directories and as zips, unkeyed; plus keyed lossless and q4_0 cards and a
    card with explicit positions. ``unbound``: the same cards rewritten as format 1.1 (no object table, no
    keyed cards), the baseline that shows what the table adds."""
    specs = [(p, c, False, False) for p in presets for c in ("dir", "zip")]
    specs += [("lossless", "dir", False, True)]
    if not unbound:
        specs += [("lossless", "dir", True, False), ("q4_0", "zip", True, False)]
    out = []
    for preset, container, keyed, explicit in specs:
        name = f"{preset}-{container}" + ("-keyed" if keyed else "") + ("-positions" if explicit else "")
        cards = []
        for seed in (1, 2):
            loc = root / f"{name}-{seed}" / ("card.zip" if container == "zip" else "card")
            kv = make_kv(layers=LAYERS, heads=HEADS, tokens=TOKENS, head_dim=DIM, seed=seed)
            pos = np.arange(TOKENS) * 2 + 3 if explicit else None
            cachecard.write_card(loc, kv, np.arange(TOKENS) + 7 * seed,
                                 make_identity(layers=LAYERS, heads=HEADS, head_dim=DIM), codec=preset,
                                 chunk_tokens=CHUNK, positions=pos, key=KEY if keyed else None)
            objs = forgery.load(loc)
            if unbound:
                forgery.save(forgery.unbind(objs), loc)
            cards.append(objs)
        v = Variant(name + ("-1.1" if unbound else ""), preset, container, keyed, cards[0], cards[1])
        loc = root / f"{name}-1" / ("card.zip" if container == "zip" else "card")
        v.expected = observe_values(loc, KEY if keyed else None)
        out.append(v)
    return out


# -- reading by every path -----------------------------------------------------------------------------------
def _paths() -> dict[str, Callable[[Any], Any]]:
    def enc(which: str, **sel: Any) -> Callable[[Any], Any]:
        def f(card: Any) -> Any:
            try:
                e = card.read_encoded(which, **sel)
            except UnsupportedCodecError:
                return "unsupported"
            return [(c.layer, c.token_start, c.tokens, c.payload.tobytes()) for c in e.chunks]
        return f

    def kv_bytes(kv: Any) -> tuple[bytes, bytes]:
        return kv.k.tobytes(), kv.v.tobytes()

    return {
        "open": lambda card: (json.dumps(card.manifest.model_dump(mode="json", exclude={"objects"}), sort_keys=True),
                              card.token_ids().tobytes(), card.positions().tobytes(), card.next_position()),
        "read": lambda card: kv_bytes(card.read()),
        "partial": lambda card: kv_bytes(card.read(**PARTIAL)),
        "encoded_k": enc("k"),
        "encoded_v": enc("v", layers=range(1, 3), tokens=20),
        "verify": lambda card: card.verify().chunks_checked,
    }


def observe_values(location: Path, key: bytes | None) -> dict[str, Any]:
    """What each read path returns for a card (the pristine reference)."""
    return {name: f(cachecard.open_card(location, key=key, max_read_bytes=READ_LIMIT)) for name, f in _paths().items()}


def observe(location: Path, key: bytes | None, expected: dict[str, Any]) -> dict[str, str]:
    """Each path's outcome: ``ok`` (as expected), ``wrong``, ``error`` (a CacheCardError) or ``foreign:<type>``."""
    out: dict[str, str] = {}
    for name, f in _paths().items():
        try:
            got = f(cachecard.open_card(location, key=key, max_read_bytes=READ_LIMIT))
        except CacheCardError:
            out[name] = "error"
        except Exception as e:  # noqa: BLE001 - exactly what the campaign counts
            out[name] = f"foreign:{type(e).__name__}: {e}"[:300]
        else:
            out[name] = "ok" if got == expected[name] else "wrong"
    return out


def classify(outcomes: dict[str, str]) -> str:
    values = list(outcomes.values())
    if any(v.startswith("foreign") for v in values):
        return "foreign"
    if "wrong" in values:
        return "silent_wrong"
    if "error" in values:
        return "detected"
    return "harmless"


def trial(i: int, seed: int, variants: list[Variant], scratch: Path) -> dict[str, Any]:
    """Trial ``i`` of the campaign ``seed``: deterministic, so any result can be replayed alone."""
    r = np.random.default_rng([seed, i])
    kinds = [k for k in FAULTS if _pool(k, variants)]
    kind = kinds[i % len(kinds)]
    klass, fault = FAULTS[kind]
    pool = _pool(kind, variants)
    v = pool[int(r.integers(len(pool)))]
    objs = dict(v.objs)
    where = scratch / f"t{i}"
    loc = where / ("card.zip" if v.container == "zip" else "card")
    if kind in ("zip_bytes", "zip_members", "dir_entries"):
        forgery.save(objs, loc)
        if kind == "dir_entries":
            other = where / "other"
            forgery.save(v.other, other)
            desc = fault(loc, r, other)
        else:
            desc = fault(loc, r) if kind == "zip_bytes" else fault(loc, r, v.other)
    else:
        desc = fault(objs, v, r)
        forgery.save(objs, loc)
    result = {"trial": i, "kind": kind, "class": klass, "variant": v.name, "fault": desc}
    outcomes = observe(loc, None, v.expected)
    result["outcome"] = classify(outcomes)
    if klass == "forgery":
        keyed = observe(loc, KEY, v.expected)
        result["keyed_outcome"] = classify(keyed)
        result["keyed_paths"] = keyed
    result["paths"] = outcomes
    _remove(where)
    return result


def _pool(kind: str, variants: list[Variant]) -> list[Variant]:
    """The variants a fault applies to: zip faults to zips, directory faults to directories, forgeries to
    keyed cards (they are judged with and without the key)."""
    klass = FAULTS[kind][0]
    return [v for v in variants if (not kind.startswith("zip_") or v.container == "zip")
            and (kind != "dir_entries" or v.container == "dir") and (klass != "forgery" or v.keyed)]


def _remove(path: Path) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:  # FIFOs and read-only leftovers
        os.chmod(p, stat.S_IWRITE)
        func(p)
    shutil.rmtree(path, onerror=onerror)


__all__ = ["FAULTS", "KEY", "Variant", "build_variants", "classify", "observe", "trial"]
