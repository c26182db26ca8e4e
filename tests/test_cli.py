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
