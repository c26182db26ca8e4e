"""`cachecard inspect` and `cachecard verify` (exit codes scripts can use)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cachecard.cli import app

runner = CliRunner()


def test_inspect_table_and_json(small_card):
    path = str(small_card[0])
    r = runner.invoke(app, ["inspect", path])
    assert r.exit_code == 0, r.output
    for text in ("llama", "lossless", "1.3", "kv heads", "compression"):
        assert text in r.output
    r = runner.invoke(app, ["inspect", "--json", path])
    info = json.loads(r.output)
    assert info["tokens"] == 50 and info["layers"] == 3 and info["objects"] == 7
    assert 0.5 < info["compression_vs_kv_dtype"] <= 1.0  # a tiny card: metadata is a visible share


def test_verify_ok_and_failures(small_card, tmp_path):
    path = small_card[0]
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 0 and r.output.startswith("OK")
    shard = path / "k" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    r = runner.invoke(app, ["verify", str(path), str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert "FAIL" in r.output and "corrupt" in r.output and "nothing is stored here" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1


def test_presets_lists_every_preset():
    import json

    from typer.testing import CliRunner

    from cachecard.cli import app
    from cachecard.codecs import PRESETS

    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["preset"] for r in rows] == list(PRESETS)
    assert {r["preset"] for r in rows if not r["lossy"]} == {"lossless", "zstd"}


# -- what a newcomer tries first (issue 17) -----------------------------------------------------------------------
import pytest  # noqa: E402

import cachecard  # noqa: E402
from cachecard.testing import make_identity, make_kv  # noqa: E402


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A regular file, a folder of two cards, a store with one card, and an empty folder."""
    monkeypatch.chdir(tmp_path)
    kv, ids, ident = make_kv(), list(range(37)), make_identity()
    (tmp_path / "notes.txt").write_text("hello")
    cachecard.write_card("cards/a", kv, ids, ident)
    cachecard.write_card("cards/b.zip", kv, ids, ident)
    with cachecard.Store("store") as st:
        card_id = st.put(kv, ids, ident, agent="x")
    (tmp_path / "empty").mkdir()
    return card_id


def _fails(args, *texts):
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    for text in texts:
        assert text in r.output, r.output
    assert "Traceback" not in r.output and "Store(" not in r.output  # no Python advice to CLI users
    return r.output


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_card_commands_on_a_regular_file_fail_cleanly(places, command):
    _fails([command, "notes.txt"], "not a zip archive")


@pytest.mark.parametrize("command", ["ls", "stats", "gc", "reindex"])
def test_store_commands_on_a_file_or_a_folder_say_what_it_is(places, command):
    _fails([command, "notes.txt"], "is a file")
    _fails([command, "cards"], "not a cachecard store", "2 cards", "cachecard inspect cards/a")
    _fails([command, "."], "1 store", "cachecard ls store")
    _fails([command, "missing"], "does not exist")


def test_card_commands_on_folders_describe_them_instead_of_advising_deletion(places):
    out = _fails(["inspect", "store"], "a cachecard store", "cachecard ls store", "cachecard inspect store CARD_ID")
    out += _fails(["inspect", "cards"], "2 cards (a, b.zip")
    out += _fails(["verify", "."], "1 store")
    assert "delete" not in out and "did not finish" not in out


def test_inspect_a_card_of_a_store_by_id_or_prefix(places):
    card_id = places
    for given in (card_id, card_id[:8]):
        r = runner.invoke(app, ["inspect", "--json", "store", given])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["card_id"] == card_id
    _fails(["inspect", "store", "0000"], "no card id starts with '0000'", "cachecard ls store")


def test_ls_prints_ids_on_one_line_that_other_commands_take(places, monkeypatch):
    from cachecard import cli

    monkeypatch.setattr(cli.out, "width", 140)
    r = runner.invoke(app, ["ls", "store"])
    assert r.exit_code == 0 and places in r.output
    monkeypatch.setattr(cli.out, "width", 80)
    r = runner.invoke(app, ["ls", "store"])
    assert r.exit_code == 0 and places[:12] in r.output
    assert runner.invoke(app, ["inspect", "store", places[:12]]).exit_code == 0


def test_rm_with_a_bad_id_removes_nothing(places):
    out = _fails(["rm", "store", places, "zzz"], "no card id starts with 'zzz'")
    assert "removed" not in out
    with cachecard.Store("store") as st:
        assert [c.card_id for c in st.cards()] == [places]
    r = runner.invoke(app, ["rm", "store", places[:6]])
    assert r.exit_code == 0 and "freed 1 cards" in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cachecard {cachecard.__version__}"
