"""Cards as plain ``{key: bytes}`` dicts, and what a forger can do to them (for tests and bench/integrity.py).

A forger who can write to a card's bucket but lacks the store key can rewrite any object and then recompute
every unkeyed checksum: chunk and shard-index CRC-32Cs, the object table, the manifest checksum
(:func:`reseal`). Such a card passes every check but the keyed one (spec/cachecard-1.md §7.4): the tests use
this to show that, and to reach the checks that lie behind the object table. :func:`unbind` rewrites a
format 1.3 card as the 1.1/1.2 card with the same arrays (what an older writer made).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from cachecard.card.objects import shard_digests, table_entries
from cachecard.manifest import manifest_digest

ROOT = "zarr.json"
MANIFEST, DIGEST, HMAC = "cachecard", "cachecard_sha256", "cachecard_hmac_sha256"


def load(location: Any) -> dict[str, bytes]:
    """Every object of a card: a directory, a ``.zip`` or a zarr MemoryStore."""
    if isinstance(location, zarr.storage.MemoryStore):
        return {k: v.to_bytes() for k, v in location._store_dict.items()}  # noqa: SLF001
    path = Path(location)
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            return {i.filename: zf.read(i) for i in zf.infolist()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def save(objs: dict[str, bytes], location: Any) -> None:
    """Replace the card at ``location`` (directory, ``.zip``: members stored, in dict order; MemoryStore)."""
    if isinstance(location, zarr.storage.MemoryStore):
        from cachecard.card._zarr import prototype

        location._store_dict.clear()  # noqa: SLF001
        location._store_dict.update({k: prototype().buffer.from_bytes(v) for k, v in objs.items()})  # noqa: SLF001
        return
    path = Path(location)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for key, raw in objs.items():
                zf.writestr(key, raw)
        return
    for key, raw in objs.items():
        target = path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)


def root_doc(objs: dict[str, bytes]) -> dict[str, Any]:
    return json.loads(objs[ROOT])


def set_root(objs: dict[str, bytes], doc: dict[str, Any], *, fix_digest: bool = True) -> None:
    """Write the root document back, its manifest checksum recomputed (unless ``fix_digest`` is false)."""
    attrs = doc["attributes"]
    if fix_digest:
        attrs[DIGEST] = manifest_digest(attrs[MANIFEST])
    objs[ROOT] = json.dumps(doc).encode()


def fix_shard_crcs(raw: bytes, n: int) -> bytes:
    """A shard with every inner chunk's CRC-32C and its index CRC-32C recomputed over the present bytes."""
    out = bytearray(raw)
    index = np.frombuffer(bytes(out[len(out) - (16 * n + 4):-4]), "<u8").reshape(n, 2)
    for off, nb in index.tolist():
        if nb >= 4 and off + nb <= len(out) - (16 * n + 4):
            out[off + nb - 4:off + nb] = google_crc32c.value(bytes(out[off:off + nb - 4])).to_bytes(4, "little")
    body = bytes(out[len(out) - (16 * n + 4):-4])
    out[-4:] = google_crc32c.value(body).to_bytes(4, "little")
    return bytes(out)


def shard_chunks(objs: dict[str, bytes], which: str) -> int:
    """Inner chunks per shard of array ``which``, from its metadata document."""
    meta = json.loads(objs[f"{which}/zarr.json"])
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    return math.prod(s // c for s, c in zip(shard, inner))


def reseal(objs: dict[str, bytes], *, crcs: bool = True, keep_hmac: bool = False) -> dict[str, bytes]:
    """Recompute every unkeyed checksum in place: the shards' CRC-32Cs (if ``crcs``), the object table of a
    1.3 card from the objects as they are now, and the manifest checksum. The HMAC (which needs the key) is
    dropped unless ``keep_hmac``. Returns ``objs``."""
    doc = root_doc(objs)
    manifest = doc["attributes"][MANIFEST]
    shards: dict[str, tuple[str, np.ndarray]] = {}
    for which in ("k", "v"):
        key = f"{which}/c/0/0/0/0"
        if key in objs and f"{which}/zarr.json" in objs:
            n = shard_chunks(objs, which)
            if crcs:
                objs[key] = fix_shard_crcs(objs[key], n)
            if len(objs[key]) >= 16 * n + 4:
                shards[key] = shard_digests(objs[key], n)
    if manifest.get("objects") is not None:
        listed = [k for k in objs if k != ROOT and k.split("/")[0] in ("k", "v", "tokens", "positions")]
        recorded = {k: (len(objs[k]), hashlib.sha256(objs[k]).hexdigest()) for k in listed}
        table = table_entries(recorded, {k: v for k, v in shards.items() if k in recorded})
        manifest["objects"] = {k: e.model_dump(mode="json") for k, e in table.items()}
    if not keep_hmac:
        doc["attributes"].pop(HMAC, None)
    set_root(objs, doc)
    return objs


def crc_collide(data: bytearray, at: int, want: int) -> None:
    """Rewrite ``data[at:at + 4]`` so that CRC-32C(``data``) == ``want``: CRC is affine over GF(2), so 32 free
    bits can reach any value (a forger keeps a chunk's CRC while changing its bytes; only a digest sees it)."""
    def crc(buf: bytes) -> int:
        return google_crc32c.value(buf)

    base = bytearray(data)
    base[at:at + 4] = b"\0\0\0\0"
    c0 = crc(bytes(base))
    columns = []
    for bit in range(32):
        probe = bytearray(base)
        probe[at + bit // 8] ^= 1 << (bit % 8)
        columns.append(crc(bytes(probe)) ^ c0)
    # Solve sum(x_bit * columns[bit]) == want ^ c0 over GF(2) (Gaussian elimination on 32-bit rows).
    rows = [(columns[b], 1 << b) for b in range(32)]
    target, solution = want ^ c0, 0
    basis: list[tuple[int, int]] = []
    for value, combo in rows:
        for bv, bc in basis:
            if value ^ bv < value:
                value, combo = value ^ bv, combo ^ bc
        if value:
            basis.append((value, combo))
            basis.sort(reverse=True)
    for bv, bc in basis:
        if target ^ bv < target:
            target, solution = target ^ bv, solution ^ bc
    if target:
        raise ValueError("no 4-byte patch reaches that CRC")  # cannot happen: the 32 columns span GF(2)^32
    data[at:at + 4] = solution.to_bytes(4, "little")


def unbind(objs: dict[str, bytes]) -> dict[str, bytes]:
    """The format 1.1 (or, for a pruned card, 1.2) card with the same arrays as this 1.3 card."""
    doc = root_doc(objs)
    manifest = doc["attributes"][MANIFEST]
    manifest.pop("objects", None)
    if manifest.get("pruning") is None:
        manifest.pop("pruning", None)
        manifest["format_minor"] = 1
    else:
        manifest["format_minor"] = 2
    doc["attributes"].pop(HMAC, None)
    set_root(objs, doc)
    return objs


__all__ = ["crc_collide", "fix_shard_crcs", "load", "reseal", "root_doc", "save", "set_root", "shard_chunks", "unbind"]
