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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cachecard
from cachecard.errors import CacheCardError, UnsupportedCodecError
from cachecard.testing import forgery, make_identity, make_kv

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


# -- faults --------------------------------------------------------------------------------------------------
Objs = dict[str, bytes]
SHARDS = ("k/c/0/0/0/0", "v/c/0/0/0/0")


def _data_keys(objs: Objs) -> list[str]:
    return sorted(objs)


def _index(objs: Objs, key: str) -> tuple[int, np.ndarray]:
    n = forgery.shard_chunks(objs, key[0])
    raw = objs[key]
    return n, np.frombuffer(raw[len(raw) - (16 * n + 4):-4], "<u8").reshape(n, 2).astype(np.int64)


def f_bitflip(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    raw = bytearray(o[key])
    at = int(r.integers(len(raw)))
    raw[at] ^= 1 << int(r.integers(8))
    o[key] = bytes(raw)
    return f"{key}@{at}"


def f_burst(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    raw = bytearray(o[key])
    n = int(r.integers(1, 65))
    at = int(r.integers(max(1, len(raw) - n + 1)))
    raw[at:at + n] = r.integers(0, 256, size=len(raw[at:at + n]), dtype=np.uint8).tobytes()
    o[key] = bytes(raw)
    return f"{key}@{at}+{n}"


def f_truncate(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    keep = int(r.integers(len(o[key])))
    o[key] = o[key][:keep]
    return f"{key}[:{keep}]"


def f_delete(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    del o[key]
    return key


def f_append(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    n = int(r.integers(1, 4097))
    o[key] = o[key] + r.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    return f"{key}+{n}"


def f_swap_cards(o: Objs, v: Variant, r: np.random.Generator) -> str:
    key = r.choice([k for k in _data_keys(o) if k in v.other and v.other[k] != o[k]] or ["zarr.json"])
    o[key] = v.other[key]
    return key


def f_swap_arrays(o: Objs, v: Variant, r: np.random.Generator) -> str:
    a, b = [("k/c/0/0/0/0", "v/c/0/0/0/0"), ("k/zarr.json", "v/zarr.json"), ("tokens/c/0", "positions/c/0")][
        int(r.integers(3 if "positions/c/0" in o else 2))]
    o[a], o[b] = o[b], o[a]
    return f"{a}<->{b}"


def f_swap_chunks(o: Objs, v: Variant, r: np.random.Generator) -> str:
    """Two inner chunks of one shard trade bytes (each keeps its own valid CRC); the index is untouched."""
    key = str(r.choice(SHARDS))
    n, index = _index(o, key)
    raw = bytearray(o[key])
    i, j = (int(x) for x in r.choice(n, size=2, replace=False))
    (ai, ni), (aj, nj) = index[i], index[j]
    if ni != nj:  # entropy-coded chunks differ in size: move the shorter one's bytes only
        ni = nj = min(ni, nj)
    raw[ai:ai + ni], raw[aj:aj + nj] = raw[aj:aj + nj], raw[ai:ai + ni]
    o[key] = bytes(raw)
    return f"{key} chunks {i}<->{j}"


def f_meta_edit(o: Objs, v: Variant, r: np.random.Generator) -> str:
    """Edit a value in an array's metadata document (a codec parameter, chunk shape, dtype, fill value...)."""
    key = str(r.choice([k for k in o if k.endswith("/zarr.json") and k != "zarr.json"]))
    doc = json.loads(o[key])
    leaves = list(_leaves(doc))
    path, value = leaves[int(r.integers(len(leaves)))]
    new = _mutate(value, r)
    _set(doc, path, new)
    o[key] = json.dumps(doc).encode()
    return f"{key}:{'/'.join(map(str, path))}={new!r}"[:200]


def f_crc_fix_chunk(o: Objs, v: Variant, r: np.random.Generator) -> str:
    """Inner forgery: change bytes of a chunk and recompute its crc32c (and the index's): the table differs."""
    key = str(r.choice(SHARDS))
    n, index = _index(o, key)
    i = int(r.integers(n))
    off, nb = index[i]
    raw = bytearray(o[key])
    at = off + int(r.integers(max(1, nb - 4)))
    raw[at] ^= 1 + int(r.integers(255))
    o[key] = forgery.fix_shard_crcs(bytes(raw), n)
    return f"{key} chunk {i} @{at}"


def f_index_swap(o: Objs, v: Variant, r: np.random.Generator) -> str:
    """Inner forgery: two shard index entries trade places, the index CRC recomputed."""
    key = str(r.choice(SHARDS))
    n, index = _index(o, key)
    i, j = (int(x) for x in r.choice(n, size=2, replace=False))
    index = index.copy()
    index[[i, j]] = index[[j, i]]
    raw = bytearray(o[key])
    raw[len(raw) - (16 * n + 4):-4] = index.astype("<u8").tobytes()
    o[key] = forgery.fix_shard_crcs(bytes(raw), n)
    return f"{key} index {i}<->{j}"


def f_forge_data(o: Objs, v: Variant, r: np.random.Generator) -> str:
    name = f_crc_fix_chunk(o, v, r)
    forgery.reseal(o)
    return name


def f_forge_swap(o: Objs, v: Variant, r: np.random.Generator) -> str:
    name = f_swap_cards(o, v, r) if r.integers(2) else f_swap_arrays(o, v, r)
    forgery.reseal(o)
    return name


def f_forge_manifest(o: Objs, v: Variant, r: np.random.Generator) -> str:
    doc = forgery.root_doc(o)
    m = doc["attributes"]["cachecard"]
    field_, value = [("start_position", 5), ("created", "2020-01-01T00:00:00Z"), ("card_id", "0" * 32),
                     ("model.weights_hash", "sha256:" + "ee" * 32), ("model.name", "forged")][int(r.integers(5))]
    target = m["model"] if field_.startswith("model.") else m
    target[field_.split(".")[-1]] = value
    if field_ == "start_position" and m["positions"] == "explicit":
        m["positions"], m["start_position"] = "contiguous", 0
        o.pop("positions/c/0", None)
        o.pop("positions/zarr.json", None)
    forgery.set_root(o, doc)
    forgery.reseal(o)
    return field_


def f_forge_collision(o: Objs, v: Variant, r: np.random.Generator) -> str:
    """A chunk's values change while its CRC-32C stays (a 4-byte collision): the index and table CRCs still
    match; only the shard's SHA-256 (verify, keyed reads) differs."""
    key = str(r.choice(SHARDS))
    n, index = _index(o, key)
    i = int(r.integers(n))
    off, nb = (int(x) for x in index[i])
    raw = bytearray(o[key])
    body = bytearray(raw[off:off + nb - 4])
    want = int.from_bytes(raw[off + nb - 4:off + nb], "little")
    if len(body) < 8:
        return f_forge_data(o, v, r)
    body[int(r.integers(len(body) - 4))] ^= 0x5A
    at = int(r.integers(len(body) - 3))
    forgery.crc_collide(body, at, want)
    raw[off:off + nb - 4] = body
    o[key] = bytes(raw)
    return f"{key} chunk {i} collide@{at}"


# container-level faults: applied to the materialized card (a zip file or a directory)
def z_bytes(path: Path, r: np.random.Generator) -> str:
    raw = bytearray(path.read_bytes())
    how = int(r.integers(4))
    if how == 0:
        at = int(r.integers(len(raw)))
        raw[at] ^= 1 << int(r.integers(8))
        desc = f"flip@{at}"
    elif how == 1:
        keep = int(r.integers(len(raw)))
        raw = raw[:keep]
        desc = f"truncate[:{keep}]"
    elif how == 2:
        raw += r.integers(0, 256, size=int(r.integers(1, 2048)), dtype=np.uint8).tobytes()
        desc = "append"
    else:
        at = int(r.integers(len(raw)))
        n = int(r.integers(1, 65))
        raw[at:at + n] = r.integers(0, 256, size=len(raw[at:at + n]), dtype=np.uint8).tobytes()
        desc = f"burst@{at}"
    path.write_bytes(bytes(raw))
    return desc


def z_members(path: Path, r: np.random.Generator, other: Objs) -> str:
    """Duplicate, path-like, link and size-lying members."""
    how = int(r.integers(5))
    with zipfile.ZipFile(path) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    extra: list[tuple[Any, bytes]] = []
    if how == 0:
        key = str(r.choice([i.filename for i, _ in members]))
        extra.append((key, other.get(key, b"junk")))
        desc = f"duplicate {key}"
    elif how == 1:
        name = str(r.choice(["../zarr.json", "/k/zarr.json", "k/../../x", "k\\c\\0", "./tokens/c/0"]))
        extra.append((name, b"{}"))
        desc = f"member {name!r}"
    elif how == 2:
        link = zipfile.ZipInfo(str(r.choice(["k/c/0/0/0/0.link", "zarr.json.lnk"])))
        link.create_system, link.external_attr = 3, 0o120777 << 16
        extra.append((link, b"/etc/passwd"))
        desc = "symlink member"
    else:
        desc = "size lie"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as zf:
            for info, raw in members + extra:
                zf.writestr(info, raw)
    if how >= 3:  # patch a central directory entry's sizes (a bomb's lie, or a stored size mismatch)
        raw = bytearray(path.read_bytes())
        starts = [i for i in range(len(raw) - 4) if raw[i:i + 4] == b"PK\x01\x02"]
        cd = starts[int(r.integers(len(starts)))]
        field_at = cd + (24 if how == 3 else 20)
        raw[field_at:field_at + 4] = int(r.integers(2**20, 2**32 - 1)).to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    return desc


def d_entries(path: Path, r: np.random.Generator, other_dir: Path) -> str:
    """A directory card's object replaced by a link (to another card's object), a FIFO, or a directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    victim = files[int(r.integers(len(files)))]
    rel = victim.relative_to(path)
    how = int(r.integers(3))
    victim.unlink()
    if how == 0:
        victim.symlink_to(other_dir / rel if (other_dir / rel).exists() else "/etc/passwd")
        return f"symlink {rel}"
    if how == 1:
        os.mkfifo(victim)
        return f"fifo {rel}"
    victim.mkdir()
    return f"directory {rel}"


FAULTS: dict[str, tuple[str, Callable[..., str]]] = {
    "bitflip": ("damage", f_bitflip), "burst": ("damage", f_burst), "truncate": ("damage", f_truncate),
    "delete": ("damage", f_delete), "append": ("damage", f_append), "swap_cards": ("damage", f_swap_cards),
    "swap_arrays": ("damage", f_swap_arrays), "swap_chunks": ("damage", f_swap_chunks),
    "meta_edit": ("damage", f_meta_edit),
    "zip_bytes": ("damage", z_bytes), "zip_members": ("damage", z_members), "dir_entries": ("damage", d_entries),
    "crc_fix_chunk": ("inner", f_crc_fix_chunk), "index_swap": ("inner", f_index_swap),
    "forge_data": ("forgery", f_forge_data), "forge_swap": ("forgery", f_forge_swap),
    "forge_manifest": ("forgery", f_forge_manifest), "forge_collision": ("forgery", f_forge_collision),
}


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


def _leaves(doc: Any, path: tuple = ()) -> Any:
    if isinstance(doc, dict):
        for k, val in doc.items():
            yield from _leaves(val, path + (k,))
    elif isinstance(doc, list):
        for k, val in enumerate(doc):
            yield from _leaves(val, path + (k,))
    else:
        yield path, doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _mutate(value: Any, r: np.random.Generator) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + int(r.choice([-1, 1, 7, -value - 1, 2**31]))
    if isinstance(value, float):
        return value * 1.5 + 1
    if isinstance(value, str):
        return value[:-1] + ("x" if not value.endswith("x") else "y")
    return 0


__all__ = ["FAULTS", "KEY", "Variant", "build_variants", "classify", "observe", "trial"]
