"""What is not the index contract: the prefix hash scheme, the LMDB backend (map growth, full disk), store
settings, no pickle, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
from typer.testing import CliRunner

import cachecard
from cachecard import Store, StoreError
from cachecard.cli import app
from cachecard.kvstore import prefix as ix
from store_helpers import IDENT, seq_kv, tokens
from cachecard.testing import make_identity


def test_block_hashes_are_deterministic_across_processes():
    code = ("import numpy as np; from cachecard.kvstore import prefix as ix; import sys;"
            "from cachecard.testing import make_identity as m; raw = ix.token_bytes(np.arange(100));"
            "print(b''.join(ix.chain(ix.model_key(m()), raw, 16)).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed), cwd=Path(__file__).parent.parent).stdout
            for seed in ("0", "1", "12345")}
    assert len(outs) == 1
    # pinned: the scheme (BLAKE2b-128, person, int32 LE, model key) never changes silently
    assert ix.model_key(IDENT).hex()[:16] == ix.model_key(make_identity(name="other name")).hex()[:16]
    h0 = ix.chain(ix.model_key(IDENT), ix.token_bytes(np.arange(16)), 16)[0]
    import hashlib
    import rfc8785
    mk = hashlib.sha256(rfc8785.dumps(IDENT.model_dump(mode="json", exclude={"name"}))).digest()
    want = hashlib.blake2b(mk + np.arange(16, dtype="<i4").tobytes(), digest_size=16, person=b"cachecard.blk.v1")
    assert h0 == want.digest()


def test_no_pickle_anywhere():
    src = Path(cachecard.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle." not in text, path
        assert "import shelve" not in text and "import dill" not in text, path


def test_lmdb_map_grows_by_itself(tmp_path):
    with Store(tmp_path / "s", block_tokens=1, map_size=64 << 10) as s:
        start = s.index.env.info()["map_size"]
        ids = [s.put(seq_kv(300, seed=i), tokens(300, start=1000 * i), IDENT, agent="a") for i in range(4)]
        assert s.index.env.info()["map_size"] > start and s.index.grows >= 1
        assert s.stats()["blocks"] == 1200
        for i, cid in enumerate(ids):
            assert s.match(tokens(300, start=1000 * i), IDENT) == cachecard.Match(cid, 300)


def test_store_settings_are_checked(tmp_path):
    with pytest.raises(StoreError, match="no cachecard store"):
        Store(tmp_path / "none", create=False)
    Store(tmp_path / "s", block_tokens=8).close()
    with pytest.raises(StoreError, match="block_tokens=8"):
        Store(tmp_path / "s", block_tokens=16)
    with Store(tmp_path / "s") as s:
        assert s.block_tokens == 8


def test_cli_ls_stats_verify_gc_reindex_rm(tmp_path):
    root = tmp_path / "s"
    with Store(root) as s:
        a = s.put(seq_kv(20), tokens(20), IDENT, agent="alice")
        s.handoff(a, "bob")
    run = CliRunner().invoke
    r = run(app, ["ls", str(root)])
    assert r.exit_code == 0 and a[:8] in r.output and "alice" in r.output
    r = run(app, ["ls", str(root), "--json", "--agent", "bob"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["card_id"] == a
    r = run(app, ["stats", str(root), "--json"])
    assert json.loads(r.output)["cards"] == 1
    r = run(app, ["verify", str(root)])
    assert r.exit_code == 0 and "1 of 1 cards verified" in r.output
    r = run(app, ["gc", str(root), "--grace", "0"])
    assert r.exit_code == 0 and "removed 0 unreferenced" in r.output
    r = run(app, ["reindex", str(root)])
    assert r.exit_code == 0 and "indexed 1 cards, 2 references" in r.output
    r = run(app, ["rm", str(root), a, "--agent", "alice"])
    assert r.exit_code == 0 and "freed 0 cards" in r.output
    r = run(app, ["rm", str(root), "--agent", "bob"])
    assert r.exit_code == 0 and f"freed 1 cards: {a}" in r.output
    r = run(app, ["rm", str(root), "--agent", "../x"])
    assert r.exit_code == 1 and "agent id" in r.output
    r = run(app, ["ls", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no cachecard store" in r.output


def test_an_lmdb_index_of_another_store_is_refused(tmp_path):
    with Store(tmp_path / "one") as one:
        one_id = one.store_id
    with pytest.raises(StoreError, match=f"belongs to another store .*{one_id}"):
        Store(tmp_path / "two", index=tmp_path / "one" / "index")
    marker = tmp_path / "old" / "cachecard-store.json"  # a store made before store ids: nothing to check
    Store(tmp_path / "old").close()
    doc = json.loads(marker.read_text())
    del doc["store_id"]
    marker.write_text(json.dumps(doc))
    with Store(tmp_path / "old") as st:
        assert st.store_id == "" and "store_id" not in json.loads(marker.read_text())
