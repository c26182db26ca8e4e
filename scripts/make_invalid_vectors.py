"""Writes spec/vectors/invalid/ — once: cards every conforming reader must refuse, one per refusal rule of
spec/cachecard-1.md §9, each with the error class a reader raises (the reference classes' names).

Run with CACHECARD_REGEN_VECTORS=1 (``make vectors``); existing cases are left untouched. Each case is the
small valid card of ``base()`` with one thing broken; where the rule sits behind the object table, the card is
"resealed" (every unkeyed checksum recomputed, as a forger would) so that it is exactly that rule that refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cachecard
from cachecard.testing import forgery, make_identity, make_kv

INVALID = Path(__file__).parent.parent / "spec" / "vectors" / "invalid"
KEY = "cachecard golden-vector store key (public: for tests only)"
Objs = dict[str, bytes]


def base(*, key: str | None = None) -> Objs:
    """A valid format 1.3 card: 2 layers, 2 KV heads, 9 tokens in chunks of 3, head_dim 8, float16."""
    with tempfile.TemporaryDirectory() as d:
        kv = make_kv(layers=2, heads=2, tokens=9, head_dim=8, dtype="float16", seed=99)
        cachecard.write_card(Path(d) / "c", kv, np.arange(9) * 5, make_identity(), chunk_tokens=3, key=key)
        return forgery.load(Path(d) / "c")


def manifest_edit(edit: Callable[[dict], None], *, reseal: bool = False) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        doc = forgery.root_doc(o)
        edit(doc["attributes"]["cachecard"])
        forgery.set_root(o, doc)
        return forgery.reseal(o) if reseal else o
    return f


def meta_edit(key: str, edit: Callable[[dict], None]) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        doc = json.loads(o[key])
        edit(doc)
        o[key] = json.dumps(doc).encode()
        return o
    return f


def then_reseal(*steps: Callable[[Objs], Objs], crcs: bool = True) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        for step in steps:
            o = step(o)
        return forgery.reseal(o, crcs=crcs)
    return f


def stale_checksum(o: Objs) -> Objs:
    doc = forgery.root_doc(o)
    doc["attributes"]["cachecard"]["start_position"] = 1
    forgery.set_root(o, doc, fix_digest=False)
    return o


def index_entry_outside(o: Objs) -> Objs:
    n, index = shard_index(o)
    index[3, 0] = 10**6
    return set_index(o, index)


def zero_index_crc(o: Objs) -> Objs:
    raw = bytearray(o["k/c/0/0/0/0"])
    raw[-4:] = bytes(4)
    o["k/c/0/0/0/0"] = bytes(raw)
    return o


def token_flip_with_its_crc(o: Objs) -> Objs:
    """Another token id, with the chunk's own CRC recomputed: only the manifest's token digest differs."""
    import google_crc32c

    raw = bytearray(o["tokens/c/0"])
    raw[0] ^= 0x01
    raw[-4:] = google_crc32c.value(bytes(raw[:-4])).to_bytes(4, "little")
    o["tokens/c/0"] = bytes(raw)
    return o


def swap_k_and_v(o: Objs) -> Objs:
    o["k/c/0/0/0/0"], o["v/c/0/0/0/0"] = o["v/c/0/0/0/0"], o["k/c/0/0/0/0"]
    return o


def shard_index(o: Objs, key: str = "k/c/0/0/0/0") -> tuple[int, np.ndarray]:
    n = forgery.shard_chunks(o, key[0])
    raw = o[key]
    return n, np.frombuffer(raw[len(raw) - (16 * n + 4):-4], "<u8").reshape(n, 2).copy()


def set_index(o: Objs, index: np.ndarray, key: str = "k/c/0/0/0/0") -> Objs:
    n = len(index)
    raw = bytearray(o[key])
    raw[len(raw) - (16 * n + 4):-4] = index.astype("<u8").tobytes()
    o[key] = forgery.fix_shard_crcs(bytes(raw), n)
    return o


def flip(key: str, at: int) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        raw = bytearray(o[key])
        raw[at] ^= 0x10
        o[key] = bytes(raw)
        return o
    return f


def swap_chunks(o: Objs) -> Objs:
    n, index = shard_index(o)
    (a, size), (b, _) = index[0], index[1]
    raw = bytearray(o["k/c/0/0/0/0"])
    raw[a:a + size], raw[b:b + size] = raw[b:b + size], raw[a:a + size]
    o["k/c/0/0/0/0"] = bytes(raw)
    return o


def swap_index(o: Objs) -> Objs:
    n, index = shard_index(o)
    index[[0, 1]] = index[[1, 0]]
    return set_index(o, index)


def empty_entry(o: Objs) -> Objs:
    n, index = shard_index(o)
    index[2] = 2**64 - 1
    return set_index(o, index)


def other_cards_shard(o: Objs) -> Objs:
    with tempfile.TemporaryDirectory() as d:
        kv = make_kv(layers=2, heads=2, tokens=9, head_dim=8, dtype="float16", seed=100)
        cachecard.write_card(Path(d) / "c", kv, np.arange(9) * 5, make_identity(), chunk_tokens=3)
        o["k/c/0/0/0/0"] = (Path(d) / "c" / "k" / "c" / "0" / "0" / "0" / "0").read_bytes()
    return o


def drop(*keys: str) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        for k in keys:
            o.pop(k)
        return o
    return f


def put(key: str, raw: bytes) -> Callable[[Objs], Objs]:
    def f(o: Objs) -> Objs:
        o[key] = raw
        return o
    return f


def unbound_with(edit: Callable[[dict], None]) -> Callable[[Objs], Objs]:
    """A format 1.1 card (no table) whose manifest breaks a rule, its checksum recomputed."""
    def f(o: Objs) -> Objs:
        forgery.unbind(o)
        return manifest_edit(edit)(o)
    return f


def many_token_chunks(o: Objs) -> Objs:
    """A 1.1 card whose tokens array has 3 * 2**20 one-id chunks: more objects than one read may touch."""
    forgery.unbind(o)
    n = 3 * 2**20  # a multiple of the inner chunk (3 tokens)
    doc = forgery.root_doc(o)
    doc["attributes"]["cachecard"]["tokens"]["count"] = n
    forgery.set_root(o, doc)
    for which in ("k", "v"):
        meta = json.loads(o[f"{which}/zarr.json"])
        meta["shape"][2] = n
        meta["chunk_grid"]["configuration"]["chunk_shape"][2] = n
        o[f"{which}/zarr.json"] = json.dumps(meta).encode()
    meta = json.loads(o["tokens/zarr.json"])
    meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"] = [n], [1]
    o["tokens/zarr.json"] = json.dumps(meta).encode()
    return o


# zip containers: (members as (ZipInfo or name, bytes), compression)
def zip_with(extra: Callable[[Objs], list[tuple[Any, bytes]]], *, compression: int = zipfile.ZIP_STORED,
             patch: Callable[[bytearray], None] | None = None) -> Callable[[Objs], bytes]:
    def f(o: Objs) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "card.zip"
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with zipfile.ZipFile(path, "w", compression=compression) as zf:
                    for name, raw in list(o.items()) + extra(o):
                        zf.writestr(name, raw)
            raw = bytearray(path.read_bytes())
            if patch is not None:
                patch(raw)
            return bytes(raw)
    return f


def symlink_member(o: Objs) -> list[tuple[Any, bytes]]:
    info = zipfile.ZipInfo("k/extra-link")
    info.create_system, info.external_attr = 3, 0o120777 << 16
    return [(info, b"../../../etc/passwd")]


def lie_about_size(raw: bytearray) -> None:
    cd = raw.rfind(b"PK\x01\x02")  # the last central directory entry (the root zarr.json)
    raw[cd + 24:cd + 28] = (2**31).to_bytes(4, "little")


def encrypted_flag(raw: bytearray) -> None:
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 8] |= 0x1


def truncate_zip(raw: bytearray) -> None:
    del raw[len(raw) // 2:]


DIR, ZIP = "card", "card.zip"
# name: (container, spec rule, error class, builder, needs the key)
CASES: dict[str, tuple[str, str, str, Callable[..., Any], bool]] = {
    "not-found-empty-zip": (ZIP, "§9 nothing stored", "CardNotFoundError", lambda o: zip_with(lambda o: [])({}), False),
    "not-a-card-array-root": (DIR, "§9 root is not a group", "NotACardError",
                              put("zarr.json", b'{"zarr_format": 3, "node_type": "array", "attributes": {}}'), False),
    "not-a-card-foreign-group": (DIR, "§9 no cachecard attribute", "NotACardError",
                                 put("zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'), False),
    "incomplete-no-root": (DIR, "§7.3 incomplete card", "IncompleteCardError", drop("zarr.json"), False),
    "corrupt-root-not-json": (DIR, "§9 root not JSON", "CorruptCardError", put("zarr.json", b"{\"zarr_format\": 3,"),
                              False),
    "corrupt-manifest-checksum": (DIR, "§7.2 manifest checksum", "CorruptCardError", stale_checksum, False),
    "corrupt-token-digest": (DIR, "§6 token binding", "CorruptCardError", then_reseal(token_flip_with_its_crc),
                             False),
    "corrupt-array-shape": (DIR, "§5.6 arrays agree with the manifest", "CorruptCardError",
                            then_reseal(meta_edit("v/zarr.json", lambda m: m["shape"].__setitem__(1, 3))), False),
    "corrupt-array-dtype": (DIR, "§5.6 arrays agree with the manifest", "CorruptCardError",
                            then_reseal(meta_edit("k/zarr.json", lambda m: m.update(data_type="float32"))), False),
    "corrupt-missing-shard": (DIR, "§5.4 every chunk is stored", "CorruptCardError", drop("v/c/0/0/0/0"), False),
    "corrupt-missing-array": (DIR, "§5.6 array missing", "CorruptCardError",
                              then_reseal(drop("v/zarr.json", "v/c/0/0/0/0")), False),
    "corrupt-empty-index-entry": (DIR, "§5.4 every inner chunk is stored", "CorruptCardError",
                                  then_reseal(empty_entry), False),
    "corrupt-index-entry-outside": (DIR, "§5.4 index entry inside the shard", "CorruptCardError",
                                    then_reseal(index_entry_outside), False),
    "corrupt-chunk-crc": (DIR, "§7.1 chunk checksum", "CorruptCardError", flip("v/c/0/0/0/0", 5), False),
    "corrupt-index-crc": (DIR, "§7.1 shard index checksum", "CorruptCardError",
                          then_reseal(zero_index_crc, crcs=False), False),
    "corrupt-truncated-shard": (DIR, "§7.1 truncated object", "CorruptCardError",
                                lambda o: put("k/c/0/0/0/0", o["k/c/0/0/0/0"][:-30])(o), False),
    "corrupt-token-chunk-size": (DIR, "§9 unsharded chunk size", "CorruptCardError",
                                 then_reseal(lambda o: put("tokens/c/0", o["tokens/c/0"] + b"\0" * 8)(o)), False),
    "corrupt-table-object-digest": (DIR, "§7.2 object SHA-256 (an edited codec parameter)", "CorruptCardError",
                                    meta_edit("k/zarr.json", lambda m: m.update(fill_value=1.0)), False),
    "corrupt-table-chunk-position": (DIR, "§7.2 chunk CRC against the table (chunks swapped)", "CorruptCardError",
                                     swap_chunks, False),
    "corrupt-table-index-digest": (DIR, "§7.2 shard index SHA-256 (entries swapped)", "CorruptCardError",
                                   swap_index, False),
    "corrupt-table-other-card": (DIR, "§7.2 an object from another card", "CorruptCardError", other_cards_shard,
                                 False),
    "corrupt-table-kv-swap": (DIR, "§7.2 K and V swapped", "CorruptCardError", swap_k_and_v, False),
    "corrupt-dir-symlink": (DIR, "§5.1 containers: a link in a directory card", "CorruptCardError", None, False),
    "corrupt-zip-duplicate-member": (ZIP, "§5.1 containers: duplicate member", "CorruptCardError",
                                     zip_with(lambda o: [("k/c/0/0/0/0", other_cards_shard(dict(o))["k/c/0/0/0/0"])]),
                                     False),
    "corrupt-zip-dotdot-member": (ZIP, "§5.1 containers: '..' member", "CorruptCardError",
                                  zip_with(lambda o: [("k/../../evil", b"x")]), False),
    "corrupt-zip-absolute-member": (ZIP, "§5.1 containers: absolute member", "CorruptCardError",
                                    zip_with(lambda o: [("/etc/cachecard", b"x")]), False),
    "corrupt-zip-symlink-member": (ZIP, "§5.1 containers: link member", "CorruptCardError",
                                   zip_with(symlink_member), False),
    "corrupt-zip-encrypted-member": (ZIP, "§5.1 containers: encrypted member", "CorruptCardError",
                                     zip_with(lambda o: [], patch=encrypted_flag), False),
    "corrupt-zip-bzip2-member": (ZIP, "§5.1 containers: compression method", "CorruptCardError",
                                 zip_with(lambda o: [], compression=zipfile.ZIP_BZIP2), False),
    "corrupt-zip-declared-size": (ZIP, "§5.1 containers: a size deflate cannot produce (zip bomb)",
                                  "CorruptCardError", zip_with(lambda o: [], compression=zipfile.ZIP_DEFLATED,
                                                               patch=lie_about_size), False),
    "corrupt-zip-truncated": (ZIP, "§5.1 containers: unreadable zip", "CorruptCardError",
                              zip_with(lambda o: [], patch=truncate_zip), False),
    "tampered-no-hmac": (DIR, "§7.4 keyed: HMAC missing (stripped)", "TamperedCardError", then_reseal(), True),
    "tampered-forged-hmac": (DIR, "§7.4 keyed: HMAC wrong (a resealed forgery)", "TamperedCardError", None, True),
    "manifest-not-an-object": (DIR, "§9 manifest not an object", "ManifestError",
                               manifest_edit(lambda m: None), False),
    "manifest-minor-not-integer": (DIR, "§8 format_minor is an integer", "ManifestError",
                                   manifest_edit(lambda m: m.update(format_minor="3")), False),
    "manifest-unknown-key": (DIR, "§5.6 unknown keys", "ManifestError",
                             then_reseal(manifest_edit(lambda m: m["model"].update(colour="blue"))), False),
    "manifest-missing-key": (DIR, "§5.6 required keys", "ManifestError",
                             then_reseal(manifest_edit(lambda m: m.pop("codecs"))), False),
    "manifest-created-offset": (DIR, "§5.6 created: RFC 3339 UTC with Z only", "ManifestError",
                                then_reseal(manifest_edit(lambda m: m.update(created="2026-11-22T06:19:29+00:00"))),
                                False),
    "manifest-string-for-number": (DIR, "§5.6 exact JSON types", "ManifestError",
                                   then_reseal(manifest_edit(lambda m: m["model"].update(num_layers="2"))), False),
    "manifest-layer-kinds-count": (DIR, "§5.6 rules across fields: layer_kinds", "ManifestError",
                                   then_reseal(manifest_edit(lambda m: m["model"]["layer_kinds"].pop())), False),
    "manifest-pruning-null-in-1.1": (DIR, "§5.6 pruning absent in 1.0/1.1, even null", "ManifestError",
                                     unbound_with(lambda m: m.update(pruning=None)), False),
    "manifest-objects-in-1.2": (DIR, "§5.6 objects only in 1.3+", "ManifestError",
                                manifest_edit(lambda m: m.update(format_minor=2)), False),
    "manifest-1.3-without-objects": (DIR, "§5.6 objects required in 1.3", "ManifestError",
                                     manifest_edit(lambda m: m.pop("objects")), False),
    "manifest-table-extra-object": (DIR, "§7.2 the table lists exactly the card's objects", "ManifestError",
                                    manifest_edit(lambda m: m["objects"].update({"tokens/c/1": m["objects"][
                                        "tokens/c/0"]})), False),
    "manifest-table-crc-count": (DIR, "§7.2 one CRC per inner chunk", "ManifestError",
                                 manifest_edit(lambda m: m["objects"]["k/c/0/0/0/0"].update(chunk_crc32c="AAAAAA==")),
                                 False),
    "manifest-implausible-chunk-grid": (DIR, "§9 implausible: more than 2^20 objects per read", "ManifestError",
                                        many_token_chunks, False),
    "version-newer-minor": (DIR, "§8 newer minor", "FormatVersionError",
                            manifest_edit(lambda m: m.update(format_minor=4)), False),
    "version-newer-major": (DIR, "§8 newer major", "FormatVersionError",
                            manifest_edit(lambda m: m.update(cachecard_format=2)), False),
    "version-major-zero": (DIR, "§8 major other than 1", "FormatVersionError",
                           manifest_edit(lambda m: m.update(cachecard_format=0)), False),
    "unsupported-codec": (DIR, "§5.5 unknown codec", "UnsupportedCodecError",
                          then_reseal(meta_edit("k/zarr.json", lambda m: m["codecs"][0]["configuration"][
                              "codecs"].__setitem__(0, {"name": "cachecard.from_the_future", "configuration": {}}))),
                          False),
}


def write_case(name: str) -> dict[str, Any]:
    container, rule, error, build, keyed = CASES[name]
    case = INVALID / name
    case.mkdir(parents=True)
    objs = base(key=KEY if keyed else None)
    if name == "manifest-not-an-object":
        doc = forgery.root_doc(objs)
        doc["attributes"]["cachecard"] = ["not", "an", "object"]
        doc["attributes"]["cachecard_sha256"] = "0" * 64
        objs["zarr.json"] = json.dumps(doc).encode()
    elif name == "tampered-forged-hmac":
        objs = forgery.reseal(flip("v/c/0/0/0/0", 3)(objs), keep_hmac=True)
    elif name == "corrupt-dir-symlink":
        forgery.save(objs, case / DIR)
        (case / "elsewhere").write_bytes(objs["k/c/0/0/0/0"])
        shard = case / DIR / "k" / "c" / "0" / "0" / "0" / "0"
        shard.unlink()
        shard.symlink_to(os.path.relpath(case / "elsewhere", shard.parent))
        return {"name": name, "card": DIR, "rule": rule, "error": error}
    else:
        built = build(objs)
        if isinstance(built, bytes):  # a zip built whole
            (case / ZIP).write_bytes(built)
            return {"name": name, "card": ZIP, "rule": rule, "error": error}
        objs = built
    forgery.save(objs, case / container)
    entry = {"name": name, "card": container, "rule": rule, "error": error}
    if keyed:
        entry["key"] = KEY
    return entry


def main() -> None:
    if os.environ.get("CACHECARD_REGEN_VECTORS") != "1":
        raise SystemExit("golden vectors are write-once; set CACHECARD_REGEN_VECTORS=1 to add missing cases")
    os.environ.pop("CACHECARD_KEY", None)
    listing = INVALID / "cases.json"
    entries = {e["name"]: e for e in json.loads(listing.read_text())} if listing.exists() else {}
    for name in CASES:
        if (INVALID / name).exists():
            continue
        try:
            entries[name] = write_case(name)
        except BaseException:
            shutil.rmtree(INVALID / name, ignore_errors=True)
            raise
        print("wrote", INVALID / name)
    listing.write_text(json.dumps([entries[n] for n in sorted(entries)], indent=1) + "\n")


if __name__ == "__main__":
    main()
