"""Keyed tamper evidence (spec §7.4): with a store key a card carries an HMAC of its manifest; a forger who can
write to the bucket and recompute every unkeyed checksum, but lacks the key, cannot make a card that verifies."""

from __future__ import annotations

import numpy as np
import pytest

import cachecard
from cachecard import CorruptCardError, InvalidKeyError, TamperedCardError
from cachecard.testing import forgery, make_identity, make_kv

KEY = b"0123456789abcdef-store-key"
IDENT = make_identity(layers=2, heads=2, head_dim=32)
KV = make_kv(layers=2, heads=2, tokens=40, head_dim=32)


def write(path, **kw):
    cachecard.write_card(path, KV, np.arange(40), IDENT, chunk_tokens=16, **kw)


def test_a_keyed_card_verifies_under_its_key_and_reads_without_one(tmp_path):
    write(tmp_path / "c", key=KEY)
    card = cachecard.open_card(tmp_path / "c", key=KEY)
    assert card.authenticated and card.read().equal(KV)
    report = card.verify()
    assert report.authenticated and report.bound
    plain = cachecard.open_card(tmp_path / "c")  # without a key the HMAC is not checked (nor needed)
    assert not plain.authenticated and plain.read().equal(KV)


def test_wrong_key_and_missing_hmac_are_refused(tmp_path):
    write(tmp_path / "keyed", key=KEY)
    with pytest.raises(TamperedCardError, match="does not verify"):
        cachecard.open_card(tmp_path / "keyed", key=b"another key of 16+ bytes")
    write(tmp_path / "plain")
    with pytest.raises(TamperedCardError, match="no HMAC"):
        cachecard.open_card(tmp_path / "plain", key=KEY)
    with pytest.raises(CorruptCardError):  # TamperedCardError is a kind of corruption for callers
        cachecard.open_card(tmp_path / "plain", key=KEY)


def test_the_environment_variable_is_the_default_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHECARD_KEY", KEY.decode())
    write(tmp_path / "c")
    assert cachecard.open_card(tmp_path / "c").authenticated
    monkeypatch.delenv("CACHECARD_KEY")
    assert cachecard.open_card(tmp_path / "c", key=KEY.decode()).authenticated  # str keys are UTF-8
    assert "hmac" in (tmp_path / "c" / "zarr.json").read_text()
    assert KEY.decode() not in (tmp_path / "c" / "zarr.json").read_text()  # never in the card


def test_short_keys_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InvalidKeyError, match="at least 16 bytes"):
        write(tmp_path / "c", key=b"short")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("keep_hmac", [False, True])
def test_a_forgery_that_recomputes_every_unkeyed_checksum_is_caught_only_with_the_key(tmp_path, keep_hmac):
    write(tmp_path / "c", key=KEY)
    objs = forgery.load(tmp_path / "c")
    raw = bytearray(objs["v/c/0/0/0/0"])
    raw[10] ^= 0x40  # a different value in layer 0's first V chunk
    objs["v/c/0/0/0/0"] = bytes(raw)
    forgery.save(forgery.reseal(objs, keep_hmac=keep_hmac), tmp_path / "c")
    forged = cachecard.open_card(tmp_path / "c")  # every unkeyed check passes: the limit of checksums
    forged.verify()
    assert not np.array_equal(forged.read().v.view(np.uint16), KV.v.view(np.uint16))
    with pytest.raises(TamperedCardError):
        cachecard.open_card(tmp_path / "c", key=KEY)


def test_a_crc_collision_inside_a_chunk_is_caught_by_verify_and_by_keyed_reads(tmp_path):
    """A forger keeps a chunk's CRC-32C (4 bytes suffice) while changing its values: the shard index and every
    table CRC still match, so an unkeyed partial read returns the forged values; the shard's SHA-256 does not
    match, which `verify` and every keyed read check."""
    write(tmp_path / "c", key=KEY)
    objs = forgery.load(tmp_path / "c")
    n = forgery.shard_chunks(objs, "k")
    raw = bytearray(objs["k/c/0/0/0/0"])
    off, nb = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").reshape(n, 2)[0].tolist()
    chunk = bytearray(raw[off:off + nb - 4])
    want = int.from_bytes(raw[off + nb - 4:off + nb], "little")
    chunk[0] ^= 0x7C
    forgery.crc_collide(chunk, 8, want)
    raw[off:off + nb - 4] = chunk
    objs["k/c/0/0/0/0"] = bytes(raw)
    forgery.save(objs, tmp_path / "c")
    unkeyed = cachecard.open_card(tmp_path / "c")
    assert not np.array_equal(unkeyed.read(layers=0, tokens=16).k.view(np.uint16), KV.k[:1, :, :16].view(np.uint16))
    with pytest.raises(CorruptCardError, match="SHA-256"):
        unkeyed.verify()
    with pytest.raises(CorruptCardError, match="SHA-256"):
        cachecard.open_card(tmp_path / "c", key=KEY).read(layers=0, tokens=16)
    with pytest.raises(CorruptCardError, match="SHA-256"):
        cachecard.open_card(tmp_path / "c", key=KEY).read_encoded("k", layers=1)
