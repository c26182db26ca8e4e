"""Several processes on one store, and writers killed with SIGKILL (tests/store_worker.py is the client)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cachecard import Store
from store_worker import check, reap

WORKER = Path(__file__).parent / "store_worker.py"


def spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONHASHSEED=str(np.random.randint(1 << 30)))  # hashes must not depend on it
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def assert_consistent(store: Store) -> None:
    """The index agrees with the store: every indexed card verifies and matches its manifest, every card
    in the store is indexed, every ref object is an index reference."""
    rep = store.verify()
    assert not rep.failures, rep.failures
    scan = store.objects.scan()
    committed = {c for c, i in scan.cards.items() if i.committed}
    indexed = {c.card_id for c in store.cards()}
    assert committed == indexed
    assert {(a, c.card_id) for c in store.cards() for a in c.agents} == scan.refs


def test_processes_put_match_load_delete_on_one_store(tmp_path):
    root = tmp_path / "store"
    Store(root).close()
    procs = [spawn("stress", str(root), f"agent{i}", str(i), "25") for i in range(3)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        reap(procs)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().endswith("ok")
    with Store(root) as store:
        assert_consistent(store)
        before = {(c.card_id, c.agents, c.total) for c in store.cards()}
        store.reindex()  # the index is exactly what the manifests and refs say
        assert {(c.card_id, c.agents, c.total) for c in store.cards()} == before
        assert store.gc(grace_s=0).freed == []


def test_sigkill_writer_leaves_committed_cards_intact_and_orphans_collectable(tmp_path):
    root = tmp_path / "store"
    Store(root).close()
    rng = np.random.default_rng(7)
    committed: dict[str, np.ndarray] = {}
    for round_ in range(4):
        p = spawn("crash", str(root), "writer", str(round_))
        first = p.stdout.readline()  # wait for the first commit: start-up time depends on the machine's load
        time.sleep(float(rng.random()) * 1.5)  # then kill it at a random point, most likely mid-put
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        for line in (first + out).split("\n")[:-1]:  # whole lines only: the kill may cut the last one short
            cid, toks = line.split(" ")
            committed[cid] = np.array([int(t) for t in toks.split(",")])
    assert committed, "the writer committed nothing before it was killed"
    with Store(root) as store:
        for cid, toks in committed.items():  # every card committed before a kill is intact
            check(store.load(cid), toks)
            assert (store.tokens_of(cid) == toks).all()
        rep = store.gc(grace_s=0)
        for cid in committed:
            assert cid not in rep.freed and cid not in rep.orphans_deleted
        assert_consistent(store)
        assert not [p for p in (root / "cards").rglob(".*")], "partial writes left after gc"
        for cid, toks in committed.items():
            check(store.load(cid), toks)
