"""Format 1.3's object table (spec §7.2): every object bound to its card, array and position (issue 13, defects 1
and 2). Objects from another card, the other array or another position, and edited metadata, never read back
as data; partial reads still read only what they need; older cards read as "unbound"."""

from __future__ import annotations

import json

import google_crc32c
import numpy as np
import pytest
from typer.testing import CliRunner

import cachecard
from cachecard import CacheCardError, CorruptCardError
from cachecard.cli import app
from cachecard.testing import forgery, make_identity, make_kv

IDENT = make_identity(layers=3, heads=2, head_dim=32)
SHARD = "c/0/0/0/0"


def write(path, seed=0, codec="lossless", tokens=50):
    kv = make_kv(layers=3, heads=2, tokens=tokens, head_dim=32, seed=seed)
    cachecard.write_card(path, kv, np.arange(tokens), IDENT, codec=codec, chunk_tokens=16)
    return kv


def every_read_path_refuses(path, match=None):
    """Opening, a full read, a partial read, read_encoded and verify: each raises (or open does)."""
    try:
        card = cachecard.open_card(path)
    except CacheCardError as e:
        assert match is None or __import__("re").search(match, str(e)), str(e)
        return
    calls = [card.read, lambda: card.read(layers=1, tokens=slice(10, 40)), card.verify]
    try:
        card.read_encoded("k")
        calls += [lambda: card.read_encoded("k"), lambda: card.read_encoded("v", layers=2)]
    except cachecard.UnsupportedCodecError:
        pass
    except CacheCardError:
        pass
    for call in calls:
        with pytest.raises(CacheCardError, match=match):
            call()


def test_a_shard_copied_from_another_card_of_the_same_shape_is_refused(tmp_path):
    write(tmp_path / "a", seed=1)
    write(tmp_path / "b", seed=2)
    (tmp_path / "a" / "k" / SHARD).write_bytes((tmp_path / "b" / "k" / SHARD).read_bytes())
    every_read_path_refuses(tmp_path / "a", match="object table")


def test_swapping_k_and_v_is_refused(tmp_path):
    write(tmp_path / "a")
    k, v = (tmp_path / "a" / "k" / SHARD), (tmp_path / "a" / "v" / SHARD)
    kb, vb = k.read_bytes(), v.read_bytes()
    k.write_bytes(vb)
    v.write_bytes(kb)
    every_read_path_refuses(tmp_path / "a", match="object table")


def test_metadata_swapped_in_from_the_other_array_or_another_card_is_refused(tmp_path):
    write(tmp_path / "a", codec=("q8", "lossless"))
    write(tmp_path / "b", codec="q8", seed=3)
    card = tmp_path / "a"
    (card / "v" / "zarr.json").write_bytes((card / "k" / "zarr.json").read_bytes())  # K's pipeline over V's bytes
    with pytest.raises(CorruptCardError, match="v/zarr.json.*SHA-256|v/zarr.json.*truncated|v/zarr.json.*longer"):
        cachecard.open_card(card)
    write(tmp_path / "c", codec=("q8", "lossless"))
    (tmp_path / "c" / "v" / "zarr.json").write_bytes((tmp_path / "b" / "v" / "zarr.json").read_bytes())
    with pytest.raises(CorruptCardError, match="object table"):
        cachecard.open_card(tmp_path / "c")


def test_an_edited_codec_parameter_is_refused(tmp_path):
    """Defect 2: a frontier `seed` (or any codec parameter) changed in zarr.json changes decoded values."""
    kv = make_kv(layers=2, heads=2, tokens=40, head_dim=64)
    ident = make_identity(layers=2, heads=2, head_dim=64)
    cachecard.write_card(tmp_path / "f", kv, np.arange(40), ident, codec="frontier3.2", chunk_tokens=16)
    meta_path = tmp_path / "f" / "v" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"][0]["configuration"]
    assert "seed" in inner
    inner["seed"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCardError, match="v/zarr.json"):
        cachecard.open_card(tmp_path / "f")


@pytest.mark.parametrize("path", ["fast", "zarr", "encoded", "verify"])
def test_chunks_swapped_inside_a_shard_are_refused_by_every_read_path(tmp_path, path):
    """Two inner chunks trade places, each with its own valid crc32c, the shard index untouched: only the
    table's CRC per (layer, token chunk) can tell, and every read path checks it."""
    write(tmp_path / "a")
    shard = tmp_path / "a" / "k" / SHARD
    raw = bytearray(shard.read_bytes())
    n = forgery.shard_chunks(forgery.load(tmp_path / "a"), "k")
    index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").reshape(n, 2)
    (a_off, size), (b_off, b_size) = index[1 * 4 + 0], index[1 * 4 + 1]  # layer 1, token chunks 0 and 1
    assert size == b_size
    a_bytes, b_bytes = bytes(raw[a_off:a_off + size]), bytes(raw[b_off:b_off + size])
    raw[a_off:a_off + size], raw[b_off:b_off + size] = b_bytes, a_bytes
    shard.write_bytes(bytes(raw))
    card = cachecard.open_card(tmp_path / "a")
    assert np.array_equal(card.read(layers=0).k, card.read(layers=0).k)  # untouched layers read fine
    card.fast = path != "zarr"
    call = {"fast": lambda: card.read(layers=1, tokens=20), "zarr": lambda: card.read(layers=1, tokens=20),
            "encoded": lambda: card.read_encoded("k", layers=1), "verify": card.verify}[path]
    with pytest.raises(CorruptCardError, match="layer 1.*(position|object table)"):
        call()


def test_expected_crcs_are_the_chunks_stored_crcs_in_grid_order(tmp_path):
    write(tmp_path / "a", tokens=50)
    card = cachecard.open_card(tmp_path / "a")
    crcs = card.expected_crcs("v")
    assert crcs.shape == (3, 4) and crcs.dtype == np.uint32  # 50 tokens in balanced chunks of 13
    enc = card.read_encoded("v")
    for ch in enc.chunks:
        assert crcs[ch.layer, ch.token_start // 13] == google_crc32c.value(ch.payload.tobytes())
    crcs[:] = 0  # a copy: the card's own table is untouched
    assert card.expected_crcs("v").any()
    with pytest.raises(ValueError):
        card.expected_crcs("x")
    cachecard.write_card(tmp_path / "empty", make_kv(layers=3, heads=2, tokens=0, head_dim=32), [], IDENT)
    assert cachecard.open_card(tmp_path / "empty").expected_crcs("k").shape == (3, 0)


def test_table_lists_every_object_and_binds_the_index(tmp_path):
    write(tmp_path / "a")
    card = cachecard.open_card(tmp_path / "a")
    table = card.manifest.objects
    assert set(table) == set(card.objects()) - {"zarr.json"}
    assert table["k/" + SHARD].index_sha256 is not None and table["tokens/zarr.json"].index_sha256 is None
    assert all(e.size == card.objects()[k] for k, e in table.items())


def test_a_manifest_whose_table_lists_other_objects_is_refused(tmp_path):
    write(tmp_path / "a")
    objs = forgery.load(tmp_path / "a")
    doc = forgery.root_doc(objs)
    table = doc["attributes"]["cachecard"]["objects"]
    table["tokens/c/1"] = table["tokens/c/0"]  # an object the card does not have
    forgery.set_root(objs, doc)
    forgery.save(objs, tmp_path / "a")
    with pytest.raises(cachecard.ManifestError, match="object table does not list exactly"):
        cachecard.open_card(tmp_path / "a")


def test_older_cards_read_and_are_flagged_unbound(tmp_path):
    kv = write(tmp_path / "a")
    forgery.save(forgery.unbind(forgery.load(tmp_path / "a")), tmp_path / "a")
    card = cachecard.open_card(tmp_path / "a")
    assert card.format == "1.1" and not card.bound and card.expected_crcs("k") is None
    assert card.read().equal(kv)
    report = card.verify()
    assert not report.bound and report.format == "1.1"
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "a")])
    assert r.exit_code == 0 and "unbound" in r.output
    write(tmp_path / "b")
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "b")])
    assert r.exit_code == 0 and "unbound" not in r.output and "bound to the card" in r.output
    assert cachecard.verify_card(tmp_path / "b").bound


def test_partial_reads_of_a_bound_card_touch_only_what_they_need(tmp_path):
    """The table costs no extra reads: damage outside the read range does not stop a partial read."""
    kv = write(tmp_path / "a")
    shard = tmp_path / "a" / "v" / SHARD
    raw = bytearray(shard.read_bytes())
    n = 12
    index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").reshape(n, 2)
    off, _ = index[2 * 4 + 3]  # layer 2, last token chunk
    raw[int(off) + 1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    card = cachecard.open_card(tmp_path / "a")
    part = card.read(layers=range(0, 2))
    assert np.array_equal(part.v, kv.v[0:2]) and np.array_equal(part.k, kv.k[0:2])
    with pytest.raises(CorruptCardError, match="layer 2"):
        card.read(layers=2)
    with pytest.raises(CorruptCardError):
        card.verify()
