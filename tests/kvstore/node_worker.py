"""One serving node of a store shared by several machines, run as a subprocess by test_store_multinode.py.

Usage: python node_worker.py NODE STORE_URL REDIS_URL S3_ENDPOINT CACHE_DIR SEED SECONDS LOG
Opens the store (cards on S3, index on Redis, its own local cache), prints "ready", then for SECONDS runs mixed
put / match / load / handoff / delete / gc as agents n<NODE>a<k>. Each put that returned, each handoff that
returned and each delete about to start is appended to LOG as a JSON line, flushed at once, so the test knows
what must be there even if this process is SIGKILLed. A StoreError (the index restarting) is logged and the
operation skipped. Every KV is a function of its tokens (store_worker.kv_for), so any node checks any card.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from cachecard import Store, StoreError
from store_worker import SHARED, check, identity, kv_for, load_shared


def main() -> None:
    node, url, redis_url, endpoint, cache_dir, seed, seconds, log_path = sys.argv[1:9]
    rng = np.random.default_rng(int(seed))
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}, "config_kwargs": {"retries": {"max_attempts": 2}}}
    ident = identity()
    agents = [f"n{node}a{k}" for k in range(3)]
    others = [f"n{n}a{k}" for n in range(3) for k in range(3) if str(n) != node]
    mine: list[tuple[str, str, np.ndarray]] = []   # (agent, card, tokens) this node put and still holds
    with open(log_path, "a") as log, Store(url, index=redis_url, storage_options=opts, cache_dir=cache_dir,
                                           cache_bytes=4 << 20) as store:
        def note(**entry: object) -> None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

        print("ready", flush=True)
        end = time.monotonic() + float(seconds)
        while time.monotonic() < end:
            op = rng.choice(["put", "put", "put", "match", "load", "handoff", "delete", "gc"], p=None)
            try:
                if op == "put":
                    agent = agents[int(rng.integers(3))]
                    base = SHARED if rng.random() < 0.6 else []
                    if mine and rng.random() < 0.4:  # continue one of this node's sequences
                        base = mine[int(rng.integers(len(mine)))][2].tolist()
                    toks = np.array(base + rng.integers(0, 1000, int(rng.integers(1, 40))).tolist())
                    note(op="putting", agent=agent)
                    cid = store.put(kv_for(toks), toks, ident, agent=agent)
                    note(op="put", agent=agent, card=cid, tokens=toks.tolist())
                    mine.append((agent, cid, toks))
                elif op == "match" and mine:
                    agent, _, toks = mine[int(rng.integers(len(mine)))]
                    m = store.match(np.concatenate([toks, [1500]]), ident, agent=agent)
                    assert m is not None and m.tokens == len(toks), (m, len(toks))
                    check(store.load(m), toks)
                elif op == "load":
                    load_shared(store)  # any node's card: may vanish under us
                elif op == "handoff" and mine:
                    _, cid, toks = mine[int(rng.integers(len(mine)))]
                    to = others[int(rng.integers(len(others)))]
                    store.handoff(cid, to)
                    note(op="handoff", agent=to, card=cid, tokens=toks.tolist())
                elif op == "delete" and mine:
                    agent, cid, _ = mine.pop(int(rng.integers(len(mine))))
                    if not any(a == agent and c == cid for a, c, _ in mine):
                        note(op="delete", agent=agent, card=cid)
                        store.delete(cid, agent=agent)
                elif op == "gc":
                    store.gc(grace_s=30.0)  # puts in flight on other nodes hold leases younger than this
            except StoreError as e:
                note(op="error", what=str(op), error=str(e)[:300])
                time.sleep(0.2)
    print("done", flush=True)


if __name__ == "__main__":
    main()
