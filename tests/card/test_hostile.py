"""Hostile and damaged containers (issue 13, defects 3-5): every damage of a ``.zip`` card is a CacheCardError
naming the card; duplicate, ``..``, absolute and link members and zip bombs are refused before inflating;
directory cards hold no symbolic links or special files (spec §5.1, §9)."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachecard
from cachecard import CacheCardError, CorruptCardError, ManifestError
from cachecard.testing import forgery, make_identity, make_kv

KV = make_kv(layers=2, heads=2, tokens=30, head_dim=16)
IDENT = make_identity(layers=2, heads=2, head_dim=16)


@pytest.fixture(scope="module")
def zip_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("z") / "card.zip"
    cachecard.write_card(path, KV, np.arange(30), IDENT, chunk_tokens=8)
    return path.read_bytes()


def read_everything(path) -> None:
    card = cachecard.open_card(path)
    card.verify()
    assert card.read().equal(KV) and np.array_equal(card.token_ids(), np.arange(30))


@settings(max_examples=40)
@given(data=st.data())
def test_damaged_zip_is_always_a_cachecard_error_naming_the_card(tmp_path_factory, zip_bytes, data):
    """Truncation anywhere, or a flipped bit anywhere (headers, central directory, members): a CacheCardError
    naming the card, or nothing changed that is returned. Never zipfile.BadZipFile or another foreign error."""
    raw = bytearray(zip_bytes)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        raw[data.draw(st.integers(0, len(raw) - 1), label="at")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path_factory.mktemp("d") / "card.zip"
    path.write_bytes(bytes(raw))
    try:
        read_everything(path)
    except CacheCardError as e:
        assert str(path) in str(e)


def rebuild(path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members:
            zf.writestr(name, raw)


def members_of(zip_bytes: bytes, tmp_path) -> list[tuple[str, bytes]]:
    (tmp_path / "src.zip").write_bytes(zip_bytes)
    with zipfile.ZipFile(tmp_path / "src.zip") as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def test_duplicate_member_names_are_refused(zip_bytes, tmp_path):
    """Defect 4: zipfile reads the later of two same-named members; a card with two is refused."""
    members = members_of(zip_bytes, tmp_path)
    other = make_kv(layers=2, heads=2, tokens=30, head_dim=16, seed=9)
    cachecard.write_card(tmp_path / "other.zip", other, np.arange(30), IDENT, chunk_tokens=8)
    with zipfile.ZipFile(tmp_path / "other.zip") as zf:
        fake = zf.read("k/c/0/0/0/0")
    with pytest.warns(UserWarning, match="Duplicate name"):
        rebuild(tmp_path / "dup.zip", members + [("k/c/0/0/0/0", fake)])
    with pytest.raises(CorruptCardError, match="'k/c/0/0/0/0' appears twice"):
        cachecard.open_card(tmp_path / "dup.zip")


@pytest.mark.parametrize("name", ["../evil", "/abs/zarr.json", "k/../../x", "k\\c\\0", "C:/x", "k//c", "./k/x",
                                  "k/\x01"])
def test_member_names_that_are_not_plain_relative_paths_are_refused(zip_bytes, tmp_path, name):
    rebuild(tmp_path / "bad.zip", members_of(zip_bytes, tmp_path) + [(name, b"x")])
    with pytest.raises(CorruptCardError, match="not a relative name"):
        cachecard.open_card(tmp_path / "bad.zip")


def test_symlink_and_encrypted_members_are_refused(zip_bytes, tmp_path):
    link = zipfile.ZipInfo("k/link")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    rebuild(tmp_path / "link.zip", members_of(zip_bytes, tmp_path) + [(link, b"/etc/passwd")])
    with pytest.raises(CorruptCardError, match="symbolic link"):
        cachecard.open_card(tmp_path / "link.zip")


def test_a_zip_bomb_document_is_refused_before_inflating(zip_bytes, tmp_path):
    """Defect 5: a root document that inflates to 65 MiB (from ~65 KiB) is refused from its declared size."""
    members = dict(members_of(zip_bytes, tmp_path))
    bomb = members.pop("zarr.json") + b" " * (65 << 20)  # still valid JSON: whitespace
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
        zf.writestr("zarr.json", bomb)
    del bomb
    assert (tmp_path / "bomb.zip").stat().st_size < 1 << 20
    with pytest.raises(CorruptCardError, match="zarr.json.*declares 6816.*before inflating"):
        cachecard.open_card(tmp_path / "bomb.zip")


def test_a_member_declaring_more_than_its_data_can_hold_is_refused(zip_bytes, tmp_path):
    """A central directory entry that claims 2**40 bytes from a few deflated bytes (a lying size)."""
    deflated = tmp_path / "d.zip"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, raw in members_of(zip_bytes, tmp_path):
            zf.writestr(name, raw)
    assert cachecard.open_card(deflated).read().equal(KV)  # deflated members are fine
    raw = bytearray(deflated.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")  # the last central directory entry
    raw[cd + 24:cd + 28] = (2**32 - 2).to_bytes(4, "little")  # uncompressed size
    deflated.write_bytes(bytes(raw))
    with pytest.raises(CorruptCardError, match="more than deflate can produce|zip"):
        cachecard.open_card(deflated)


def test_symlinks_and_special_files_inside_a_directory_card_are_refused(tmp_path):
    cachecard.write_card(tmp_path / "a", KV, np.arange(30), IDENT, chunk_tokens=8)
    cachecard.write_card(tmp_path / "b", KV, np.arange(30), IDENT, chunk_tokens=8)
    shard = tmp_path / "a" / "k" / "c" / "0" / "0" / "0" / "0"
    shard.unlink()
    shard.symlink_to(tmp_path / "b" / "k" / "c" / "0" / "0" / "0" / "0")
    with pytest.raises(CorruptCardError, match="symbolic link"):
        cachecard.open_card(tmp_path / "a")
    shard.unlink()
    os.mkfifo(shard)  # reading a FIFO would block forever
    with pytest.raises(CorruptCardError, match="special file"):
        cachecard.open_card(tmp_path / "a")
    shard.unlink()
    (tmp_path / "a" / "k" / "c").rename(tmp_path / "elsewhere")
    (tmp_path / "a" / "k" / "c").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CorruptCardError, match="symbolic link"):
        cachecard.open_card(tmp_path / "a")
    os.symlink(tmp_path / "b", tmp_path / "link-to-card")  # the card's own path may be a link: the user's choice
    assert cachecard.open_card(tmp_path / "link-to-card").read().equal(KV)


def test_an_oversized_root_document_is_refused_without_reading_it_all(tmp_path):
    cachecard.write_card(tmp_path / "a", KV, np.arange(30), IDENT, chunk_tokens=8)
    with open(tmp_path / "a" / "zarr.json", "ab") as f:
        f.truncate(10 << 30)  # sparse: 10 GiB declared
    with pytest.raises(ManifestError, match="root zarr.json holds more than"):
        cachecard.open_card(tmp_path / "a")


def test_unbound_cards_refuse_oversized_documents_too(tmp_path):
    cachecard.write_card(tmp_path / "a", KV, np.arange(30), IDENT, chunk_tokens=8)
    forgery.save(forgery.unbind(forgery.load(tmp_path / "a")), tmp_path / "a")
    with open(tmp_path / "a" / "k" / "zarr.json", "ab") as f:
        f.truncate(1 << 30)
    with pytest.raises(CacheCardError, match="k"):
        cachecard.open_card(tmp_path / "a")


def test_zlib_garbage_in_a_deflated_member_is_corruption(zip_bytes, tmp_path):
    members = members_of(zip_bytes, tmp_path)
    path = tmp_path / "g.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, raw in members:
            zf.writestr(name, raw)
    raw = bytearray(path.read_bytes())
    at = len(raw) // 3  # inside some member's deflate stream
    raw[at:at + 16] = bytes(range(16))
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheCardError):
        read_everything(path)
