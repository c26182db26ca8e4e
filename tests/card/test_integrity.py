"""Bad input gets a clear error and never silently wrong KV (spec §5.4, §7, §9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from zarr.core.buffer import cpu

import cachecard
from cachecard import (
    CacheCardError, CardNotFoundError, CorruptCardError, FormatVersionError, IncompleteCardError, ManifestError,
    NotACardError, ReadLimitError,
)
from cachecard.manifest import manifest_digest
from cachecard.testing import forgery, make_identity, make_kv

KV = make_kv(layers=3, heads=2, tokens=50, head_dim=8)
IDS = np.arange(50)


def fresh_store() -> dict:
    store = zarr.storage.MemoryStore()
    cachecard.write_card(store, KV, IDS, make_identity(layers=3), chunk_tokens=16)
    return store


def read_all(store) -> cachecard.CanonicalKV:
    card = cachecard.open_card(store)
    card.verify()
    assert np.array_equal(card.token_ids(), IDS)
    return card.read()


def put(store, key: str, data: bytes) -> None:
    store._store_dict[key] = cpu.Buffer.from_bytes(data)


KEYS = sorted(fresh_store()._store_dict)


@given(key=st.sampled_from(KEYS), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected_or_harmless(key, where, bit):
    """A flipped bit anywhere either raises a CacheCardError or changes nothing that is returned."""
    store = fresh_store()
    raw = bytearray(store._store_dict[key].to_bytes())
    raw[int(where * len(raw))] ^= 1 << bit
    put(store, key, bytes(raw))
    try:
        out = read_all(store)
    except CacheCardError:
        return
    assert out.equal(KV)  # e.g. a bit in a dimension name: metadata only


@given(key=st.sampled_from(KEYS), keep=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_detected(key, keep):
    store = fresh_store()
    raw = store._store_dict[key].to_bytes()
    put(store, key, raw[: int(keep * len(raw))])
    with pytest.raises(CacheCardError):
        read_all(store)


@pytest.mark.parametrize("key", ["k/c/0/0/0/0", "v/c/0/0/0/0", "tokens/c/0", "k/zarr.json", "tokens/zarr.json"])
def test_missing_object_is_corruption_not_zeros(key):
    store = fresh_store()
    del store._store_dict[key]
    with pytest.raises(CorruptCardError, match="missing"):
        read_all(store)


def test_corrupt_chunk_error_names_card_array_chunk_and_object(small_card):
    path = small_card[0]
    shard = path / "v" / "c" / "0" / "0" / "0" / "0"
    index, raw = shard_index(path, "v")  # 50 tokens in chunks of 13: grid (3 layers, 1, 4 chunks, 1)
    offset, _ = index[1 * 4 + 1]  # layer 1, tokens 13-25 (the index is in C order of the chunk grid)
    raw[int(offset) + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    card = cachecard.open_card(path)
    card.read(layers=0)  # other chunks still read fine
    with pytest.raises(CorruptCardError) as e:
        card.read(layers=1)
    msg = str(e.value)
    assert str(path) in msg and "'v'" in msg and "layer 1" in msg and "token 13-25" in msg
    assert "v/c/0/0/0/0" in msg and "save it again" in msg
    assert e.value.part == "v"
    with pytest.raises(CorruptCardError):
        card.verify()


def test_shard_with_an_unstored_inner_chunk_fails_verify(small_card):
    """A writer that skipped a chunk (index entry 2^64-1) would read as zeros; verify refuses it."""
    import google_crc32c

    path = small_card[0]
    shard = path / "k" / "c" / "0" / "0" / "0" / "0"
    card = cachecard.open_card(path)
    index, raw = shard_index(path, "k")
    n = len(index)
    index[2] = 2**64 - 1
    body = index.tobytes()
    raw[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCardError, match="object table"):
        card.verify()
    forgery.save(forgery.reseal(forgery.load(path), crcs=False), path)  # a forger's card: past the table
    card = cachecard.open_card(path)
    with pytest.raises(CorruptCardError, match="lacks 1 inner chunks"):
        card.verify()
    with pytest.raises(CorruptCardError, match="lacks 1 inner chunks"):
        cachecard.open_card(path).read(layers=2)  # a plain read refuses too: never zeros


def shard_index(path, name: str) -> tuple[np.ndarray, bytearray]:
    """The (offset, nbytes) index of a card's single shard, and the shard's bytes."""
    arr = zarr.open_array(str(path), path=name, mode="r")
    n = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks)]))
    raw = bytearray((path / name / "c" / "0" / "0" / "0" / "0").read_bytes())
    return np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").copy().reshape(-1, 2), raw


def rewrite_manifest(store, edit, *, fix_digest: bool = True) -> None:
    doc = json.loads(store._store_dict["zarr.json"].to_bytes())
    edit(doc["attributes"]["cachecard"])
    if fix_digest:
        doc["attributes"]["cachecard_sha256"] = manifest_digest(doc["attributes"]["cachecard"])
    put(store, "zarr.json", json.dumps(doc).encode())


def test_edited_manifest_fails_its_checksum():
    store = fresh_store()
    rewrite_manifest(store, lambda m: m["model"].update(num_layers=2), fix_digest=False)
    with pytest.raises(CorruptCardError, match="checksum"):
        cachecard.open_card(store)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(surprise=1), "surprise"),                                   # unknown key
    (lambda m: m["model"].update(evil="x"), "model.evil"),                          # unknown nested key
    (lambda m: m["model"].update(num_layers=10**9), "num_layers"),                  # absurd shape
    (lambda m: m["model"].update(architecture="a\x00b"), "architecture"),           # control characters
    (lambda m: m["model"].update(weights_hash="../../etc/passwd"), "weights_hash"),
    (lambda m: m.update(card_id="x" * 10**5), "card_id"),
    (lambda m: m.update(created="2026-01-01T00:00:00"), "created"),                 # naive time
    (lambda m: m.update(format_minor="1"), "integers"),
    (lambda m: m["model"].update(num_layers="3"), "num_layers"),                   # strings are not numbers
    (lambda m: m["model"]["rope"].update(theta="10000"), "theta"),
    (lambda m: m.update(created=1700000000), "created"),
    (lambda m: m.update(start_position=2**31 - 10), "int32"),
    (lambda m: m.pop("tokens"), "tokens"),
])
def test_hostile_manifest_is_rejected_clearly(edit, match):
    store = fresh_store()
    rewrite_manifest(store, edit)
    with pytest.raises(ManifestError, match=match):
        cachecard.open_card(store)


def test_manifest_disagreeing_with_arrays_is_corruption():
    store = fresh_store()
    rewrite_manifest(store, lambda m: m["model"].update(kv_dtype="float32"))
    with pytest.raises(CorruptCardError, match="dtype"):
        cachecard.open_card(store)
    store = fresh_store()
    rewrite_manifest(store, lambda m: m["tokens"].update(sha256="0" * 64))
    with pytest.raises(CorruptCardError, match="digest"):
        cachecard.open_card(store)


@pytest.mark.parametrize("token_chunk", [2**31, 1])
def test_huge_declared_shape_is_refused_without_allocating(token_chunk):
    """Manifest and array metadata agree on 2**31-1 tokens; every object exists, but holds a few bytes."""
    from cachecard.card.writer import _commit_root
    from cachecard.manifest import CardManifest, Codecs, Producer, TokenBinding

    n = 2**31 - 1
    ident = make_identity(layers=1, heads=1, head_dim=8)
    store = zarr.storage.MemoryStore()
    for name in ("k", "v"):
        zarr.create_array(store, name=name, shape=(1, 1, n, 8), dtype="<f2", chunks=(1, 1, 2**20, 8),
                          shards=(1, 1, 2**31, 8), zarr_format=3)
        put(store, f"{name}/c/0/0/0/0", b"tiny")
    zarr.create_array(store, name="tokens", shape=(n,), dtype="<i4", chunks=(token_chunk,), zarr_format=3)
    put(store, "tokens/c/0", b"tiny")
    manifest = CardManifest(cachecard_format=1, format_minor=1, card_id="a" * 32, created="2026-01-01T00:00:00Z",
                            producer=Producer(version="0"), model=ident, tokens=TokenBinding(count=n, sha256="0" * 64),
                            codecs=Codecs(k="lossless", v="lossless"))
    _commit_root(store, manifest)
    # one token chunk per id: too many objects; one chunk of 2**31 ids: more than the reader allows at once
    with pytest.raises((ManifestError, ReadLimitError), match="implausible|limit"):
        cachecard.open_card(store, max_read_bytes=1 << 30)
    with pytest.raises(CacheCardError):  # and with the default limit (this machine's memory), still refused
        cachecard.open_card(store)


@pytest.mark.parametrize("major, minor, error, match", [
    (2, 0, FormatVersionError, "Upgrade cachecard"),
    (1, 4, FormatVersionError, "Upgrade cachecard"),
    (0, 9, FormatVersionError, "predates"),
])
def test_newer_or_unknown_versions_are_refused(major, minor, error, match):
    store = fresh_store()
    rewrite_manifest(store, lambda m: m.update(cachecard_format=major, format_minor=minor))
    with pytest.raises(error, match=match):
        cachecard.open_card(store)


def test_not_found_incomplete_and_foreign(tmp_path):
    with pytest.raises(CardNotFoundError):
        cachecard.open_card(tmp_path / "nothing")
    with pytest.raises(CardNotFoundError):
        cachecard.open_card(zarr.storage.MemoryStore())

    foreign = tmp_path / "foreign"
    zarr.create_group(str(foreign), attributes={"hello": 1})
    with pytest.raises(NotACardError, match="without the 'cachecard' attribute"):
        cachecard.open_card(foreign)
    arr = tmp_path / "array"
    zarr.create_array(str(arr), shape=(2,), dtype="i4")
    with pytest.raises(NotACardError, match="not a zarr v3 group"):
        cachecard.open_card(arr)

    store = fresh_store()
    del store._store_dict["zarr.json"]  # what an interrupted object-store write leaves
    with pytest.raises(IncompleteCardError, match="did not finish"):
        cachecard.open_card(store)

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "zarr.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(CorruptCardError, match="not valid JSON"):
        cachecard.open_card(junk)


def test_card_without_our_codecs_fails_in_plain_zarr():
    """A reader lacking a codec named in zarr.json gets zarr's UnknownCodecError, never garbage."""
    store = fresh_store()
    meta = json.loads(store._store_dict["k/zarr.json"].to_bytes())
    meta["codecs"][0]["configuration"]["codecs"][0] = {"name": "cachecard.not_installed", "configuration": {}}
    put(store, "k/zarr.json", json.dumps(meta).encode())
    with pytest.raises(CorruptCardError, match="object table"):  # format 1.3: the document is bound to the card
        cachecard.open_card(store)
    forgery.save(forgery.reseal(forgery.load(store)), store)  # as a card with that codec would be
    with pytest.raises(zarr.errors.UnknownCodecError):
        zarr.open_array(store, path="k", mode="r")
    with pytest.raises(cachecard.UnsupportedCodecError, match="cachecard.not_installed"):
        cachecard.open_card(store)
