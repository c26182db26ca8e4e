"""Writes spec/vectors/ — once. Golden vectors are write-once: never regenerate an existing case.

Run with CACHECARD_REGEN_VECTORS=1 (``make vectors``); existing cases are left untouched, so only new cases
are written. Each case holds a card and the exact arrays it must decode to, as .npy (bfloat16 as uint16 bits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

import cachecard  # noqa: E402
from cachecard import ParentRef  # noqa: E402
from cachecard.card import layout  # noqa: E402
from cachecard.card.locations import writable  # noqa: E402
from cachecard.card.writer import _commit_root  # noqa: E402
from cachecard.manifest import CardManifest, Codecs, Producer, TokenBinding, token_digest  # noqa: E402
from cachecard.testing import make_identity, make_kv  # noqa: E402

VECTORS = Path(__file__).parent.parent / "spec" / "vectors"


def expected(case: Path, kv: cachecard.CanonicalKV, ids: np.ndarray, positions: np.ndarray) -> None:
    storage = layout.STORAGE_DTYPES[kv.dtype]
    np.save(case / "k.npy", kv.k.view(storage))
    np.save(case / "v.npy", kv.v.view(storage))
    np.save(case / "tokens.npy", ids.astype("<i4"))
    np.save(case / "positions.npy", positions.astype("<i4"))


def write_v1_1(case: Path, *, card: str, tokens: int, dtype: str, chunk: int = 16, **kw) -> None:
    kv = make_kv(layers=2, heads=2, tokens=tokens, head_dim=8, dtype=dtype, seed=len(case.name))
    ids = (np.arange(tokens) * 31 + 7) % 49152
    m = cachecard.write_card(case / card, kv, ids, make_identity(dtype=dtype), chunk_tokens=chunk, **kw)
    start = m.start_position
    pos = np.asarray(kw["positions"]) if "positions" in kw else np.arange(start, start + tokens)
    expected(case, kv, ids, pos)


def write_v1_0(case: Path) -> None:
    """Format 1.0: one unsharded array per layer. Kept here (not in the library) because no one may write it."""
    kv = make_kv(layers=2, heads=2, tokens=37, head_dim=8, dtype="float16", seed=10)
    ids = np.arange(37) * 3
    ident = make_identity()
    manifest = CardManifest(
        cachecard_format=1, format_minor=0, card_id="10" * 16, created="2026-11-22T00:00:00Z", producer=Producer(version="0.1.0"),
        model=ident, tokens=TokenBinding(count=37, sha256=token_digest(ids)), codecs=Codecs(k="lossless", v="lossless"))
    with writable(case / "card") as (data, root):
        for which, arr in (("k", kv.k), ("v", kv.v)):
            for i in range(kv.num_layers):
                z = zarr.create_array(data, name=layout.legacy_layer_path(which, i), shape=arr[i].shape, dtype="<f2",
                                      chunks=(2, 16, 8), serializer=BytesCodec(), compressors=[Crc32cCodec()],
                                      filters=None, fill_value=0, zarr_format=3, config={"write_empty_chunks": True})
                z[...] = arr[i]
        z = zarr.create_array(data, name="tokens", shape=(37,), dtype="<i4", chunks=(37,), serializer=BytesCodec(),
                              compressors=[Crc32cCodec()], filters=None, fill_value=0, zarr_format=3)
        z[...] = ids
        _commit_root(root, manifest)
    expected(case, kv, ids, np.arange(37))


def write_v1_2_pruned(case: Path) -> None:
    """Format 1.2: a value-norm pruned card (half of 24 tokens) with its pruning record."""
    from cachecard.transforms.pruning import prune

    kv = make_kv(layers=2, heads=2, tokens=24, head_dim=8, dtype="float16", seed=12)
    ids = (np.arange(24) * 17 + 3) % 49152
    p = prune(kv, ids, keep=0.5, method="value_norm")
    cachecard.write_card(case / "card", p.kv, p.tokens, make_identity(), chunk_tokens=8, positions=p.positions,
                         pruning=p.record)
    expected(case, p.kv, p.tokens, p.positions)


GOLDEN_KEY = "cachecard golden-vector store key (public: for tests only)"


def write_v1_3(case: Path, *, card: str, tokens: int, dtype: str, chunk: int = 16, **kw) -> None:
    """Format 1.3 (this version's writer): the same arrays as the 1.1 cases, with the object table."""
    write_v1_1(case, card=card, tokens=tokens, dtype=dtype, chunk=chunk, **kw)


def write_v1_3_keyed(case: Path) -> None:
    """A keyed card (spec §7.4): its HMAC verifies under GOLDEN_KEY, written next to it as key.txt."""
    write_v1_3(case, card="card", tokens=21, dtype="float16", chunk=8, key=GOLDEN_KEY)
    (case / "key.txt").write_text(GOLDEN_KEY)


CASES = {
    "v1.0-float16-per-layer": write_v1_0,
    "v1.1-float16": lambda c: write_v1_1(c, card="card", tokens=37, dtype="float16"),
    "v1.1-float32-empty": lambda c: write_v1_1(c, card="card", tokens=0, dtype="float32"),
    "v1.1-bfloat16-parent": lambda c: write_v1_1(c, card="card", tokens=20, dtype="bfloat16",
                                                 parent=ParentRef(card_id="ab" * 16, tokens=64)),
    "v1.1-float16-positions-zip": lambda c: write_v1_1(c, card="card.zip", tokens=5, dtype="float16",
                                                       positions=[0, 1, 7, 8, 30]),
    "v1.2-float16-pruned": write_v1_2_pruned,
    "v1.3-float16": lambda c: write_v1_3(c, card="card", tokens=37, dtype="float16"),
    "v1.3-float32-empty": lambda c: write_v1_3(c, card="card", tokens=0, dtype="float32"),
    "v1.3-bfloat16-positions-zip": lambda c: write_v1_3(c, card="card.zip", tokens=9, dtype="bfloat16", chunk=4,
                                                        positions=[0, 1, 2, 5, 8, 13, 21, 34, 55]),
    "v1.3-bfloat16-parent": lambda c: write_v1_3(c, card="card", tokens=20, dtype="bfloat16",
                                                 parent=ParentRef(card_id="cd" * 16, tokens=100)),
    "v1.3-float16-keyed": write_v1_3_keyed,
}


def main() -> None:
    if os.environ.get("CACHECARD_REGEN_VECTORS") != "1":
        raise SystemExit("golden vectors are write-once; set CACHECARD_REGEN_VECTORS=1 to add missing cases")
    os.environ.pop("CACHECARD_KEY", None)  # only the keyed case is keyed
    for name, make in CASES.items():
        case = VECTORS / name
        if case.exists():
            continue
        case.mkdir(parents=True)
        make(case)
        print("wrote", case)
    json.dump(sorted(CASES), open(VECTORS / "cases.json", "w"), indent=1)


if __name__ == "__main__":
    main()
