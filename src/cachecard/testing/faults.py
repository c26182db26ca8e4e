"""The faults of the corruption campaign (cachecard.testing.corruption), one function per kind: what it does to
a card as a ``{key: bytes}`` dict (or, for container faults, to the materialized zip file or directory), and a
short description of where. Every fault draws from the trial's own random generator, so trials replay."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cachecard.testing import forgery

# -- faults on cards as objects --------------------------------------------------------------------------------------------------
Objs = dict[str, bytes]
SHARDS = ("k/c/0/0/0/0", "v/c/0/0/0/0")


def _data_keys(objs: Objs) -> list[str]:
    return sorted(objs)


def _index(objs: Objs, key: str) -> tuple[int, np.ndarray]:
    n = forgery.shard_chunks(objs, key[0])
    raw = objs[key]
    return n, np.frombuffer(raw[len(raw) - (16 * n + 4):-4], "<u8").reshape(n, 2).astype(np.int64)


def f_bitflip(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    raw = bytearray(o[key])
    at = int(r.integers(len(raw)))
    raw[at] ^= 1 << int(r.integers(8))
    o[key] = bytes(raw)
    return f"{key}@{at}"


def f_burst(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    raw = bytearray(o[key])
    n = int(r.integers(1, 65))
    at = int(r.integers(max(1, len(raw) - n + 1)))
    raw[at:at + n] = r.integers(0, 256, size=len(raw[at:at + n]), dtype=np.uint8).tobytes()
    o[key] = bytes(raw)
    return f"{key}@{at}+{n}"


def f_truncate(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    keep = int(r.integers(len(o[key])))
    o[key] = o[key][:keep]
    return f"{key}[:{keep}]"


def f_delete(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    del o[key]
    return key


def f_append(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice(_data_keys(o))
    n = int(r.integers(1, 4097))
    o[key] = o[key] + r.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    return f"{key}+{n}"


def f_swap_cards(o: Objs, v: Any, r: np.random.Generator) -> str:
    key = r.choice([k for k in _data_keys(o) if k in v.other and v.other[k] != o[k]] or ["zarr.json"])
    o[key] = v.other[key]
    return key


def f_swap_arrays(o: Objs, v: Any, r: np.random.Generator) -> str:
    a, b = [("k/c/0/0/0/0", "v/c/0/0/0/0"), ("k/zarr.json", "v/zarr.json"), ("tokens/c/0", "positions/c/0")][
        int(r.integers(3 if "positions/c/0" in o else 2))]
    o[a], o[b] = o[b], o[a]
    return f"{a}<->{b}"


def f_swap_chunks(o: Objs, v: Any, r: np.random.Generator) -> str:
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


def f_meta_edit(o: Objs, v: Any, r: np.random.Generator) -> str:
    """Edit a value in an array's metadata document (a codec parameter, chunk shape, dtype, fill value...)."""
    key = str(r.choice([k for k in o if k.endswith("/zarr.json") and k != "zarr.json"]))
    doc = json.loads(o[key])
    leaves = list(_leaves(doc))
    path, value = leaves[int(r.integers(len(leaves)))]
    new = _mutate(value, r)
    _set(doc, path, new)
    o[key] = json.dumps(doc).encode()
    return f"{key}:{'/'.join(map(str, path))}={new!r}"[:200]


def f_crc_fix_chunk(o: Objs, v: Any, r: np.random.Generator) -> str:
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


def f_index_swap(o: Objs, v: Any, r: np.random.Generator) -> str:
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


def f_forge_data(o: Objs, v: Any, r: np.random.Generator) -> str:
    name = f_crc_fix_chunk(o, v, r)
    forgery.reseal(o)
    return name


def f_forge_swap(o: Objs, v: Any, r: np.random.Generator) -> str:
    name = f_swap_cards(o, v, r) if r.integers(2) else f_swap_arrays(o, v, r)
    forgery.reseal(o)
    return name


def f_forge_manifest(o: Objs, v: Any, r: np.random.Generator) -> str:
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


def f_forge_collision(o: Objs, v: Any, r: np.random.Generator) -> str:
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


__all__ = ["FAULTS", "Objs"]
