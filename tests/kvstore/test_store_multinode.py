"""Three nodes on one store (spec/store-1.md §4): cards on one S3 bucket (moto), the index on one Redis, each
node a process with its own local directory. Mixed put / match / load / handoff / delete / gc for a bounded
time; one node is SIGKILLed mid-put and Redis restarts mid-run. Then every put that returned (and was not
deleted) is matchable and loads right on every node, verify is clean, and the index equals a reindex from the
bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cachecard import Store
from cachecard.testing.services import MotoS3, RedisServer, redis_missing
from store_worker import check, identity, kv_for, reap

pytest.importorskip("moto.server")
pytestmark = [pytest.mark.skipif(bool(redis_missing()), reason=redis_missing() or ""),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")]
WORKER = Path(__file__).parent / "node_worker.py"
SECONDS = 6.0


def expected(logs: list[Path]) -> dict[tuple[str, str], np.ndarray]:
    """(agent, card) -> tokens of every reference a node saw returned and never started to delete."""
    refs: dict[tuple[str, str], np.ndarray] = {}
    gone: set[tuple[str, str]] = set()
    for path in logs:
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:  # a line cut short by SIGKILL
                continue
            if e["op"] in ("put", "handoff"):
                refs[(e["agent"], e["card"])] = np.array(e["tokens"])
            elif e["op"] == "delete":
                gone.add((e["agent"], e["card"]))
    return {k: v for k, v in refs.items() if k not in gone}


def test_three_nodes_one_bucket_one_redis(tmp_path):
    url = "s3://cards/agents"
    with RedisServer(tmp_path / "redis") as redis, MotoS3("cards") as s3:
        Store(url, index=redis.url, storage_options=s3.options, block_tokens=16).close()
        logs = [tmp_path / f"node{n}.log" for n in range(3)]
        procs = [subprocess.Popen(
            [sys.executable, str(WORKER), str(n), url, redis.url, s3.endpoint, str(tmp_path / f"node{n}"),
             str(100 + n), str(SECONDS), str(logs[n])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).parent, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
            for n in range(3)]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
            killed = threading.Event()

            def kill_node2_mid_put() -> None:
                deadline = time.monotonic() + SECONDS / 2
                while time.monotonic() < deadline:  # wait until node 2 has started a put, then kill it
                    lines = logs[2].read_text().splitlines() if logs[2].exists() else []
                    if len(lines) > 4 and '"putting"' in lines[-1]:
                        break
                    time.sleep(0.005)
                os.kill(procs[2].pid, signal.SIGKILL)
                killed.set()

            killer = threading.Thread(target=kill_node2_mid_put)
            killer.start()
            time.sleep(SECONDS / 3)
            redis.restart()  # mid-run: the nodes see errors for a moment, nothing committed is lost
            killer.join()
            results = [p.communicate(timeout=180) for p in procs]
        finally:
            reap(procs)
        assert killed.is_set() and procs[2].returncode == -signal.SIGKILL
        for p, (out, err) in zip(procs[:2], results[:2]):
            assert p.returncode == 0 and out.strip().endswith("done"), err[-3000:]
        want = expected(logs)
        assert len(want) > 10, "the nodes committed too little to test anything"
        nodes = [Store(url, index=redis.url, storage_options=s3.options, cache_dir=tmp_path / f"check{n}")
                 for n in range(3)]
        try:
            rep = nodes[0].gc(grace_s=0)  # nothing in flight any more: the killed node's put is collected
            assert not set(rep.freed) & {c for _, c in want}
            ident = identity()
            for node in nodes:  # every returned put, on every node
                for (agent, card), toks in want.items():
                    m = node.match(np.concatenate([toks, [1999]]), ident, agent=agent)
                    assert m is not None and m.tokens == len(toks), (agent, card, m, len(toks))
                    check(node.load(m), toks)
                    check(node.load(card), toks)
                    assert agent in {c.card_id: c for c in node.cards(agent=agent)}[card].agents
            assert not nodes[1].verify().failures
            before = [(c.card_id, c.agents, c.total, c.parent, c.bytes) for c in nodes[1].cards()]
            nodes[2].reindex()  # from the bucket alone
            assert [(c.card_id, c.agents, c.total, c.parent, c.bytes) for c in nodes[0].cards()] == before
            assert kv_for(np.arange(3)).num_tokens == 3
        finally:
            for node in nodes:
                node.close()
