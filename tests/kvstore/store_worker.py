"""A store client run as a subprocess by tests/test_store_procs.py (stress and SIGKILL tests).

Usage: python tests/store_worker.py MODE STORE AGENT SEED N
  stress: N random operations (put / match / load / delete) on STORE as AGENT; prints "ok" at the end.
  crash:  puts cards as AGENT forever (some continuing earlier ones); prints each committed card id and its
          token count as soon as put returns, so the parent knows what must survive a SIGKILL.
Every card's KV is a deterministic function of its tokens, so any process can check any card it loads.
"""

from __future__ import annotations

import sys

import numpy as np

from cachecard import CanonicalKV, CardNotFoundError, LayerKind, ModelIdentity, Rope, Store

LAYERS, HEADS, DIM = 2, 2, 8
SHARED = list(range(500, 600))  # every agent's sequences start with these 100 tokens


def identity() -> ModelIdentity:
    return ModelIdentity(name="tiny", architecture="llama", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                         layer_kinds=(LayerKind(),) * LAYERS, rope=Rope(theta=10000.0, rotary_dim=DIM),
                         kv_dtype="float16", weights_hash="sha256:" + "ab" * 32, tokenizer_hash="sha256:" + "cd" * 32)


def kv_for(tokens: np.ndarray) -> CanonicalKV:
    """KV whose every entry depends only on (layer, head, token id, position, channel): checkable anywhere."""
    t = np.asarray(tokens, dtype=np.float32)
    pos = np.arange(len(t), dtype=np.float32)
    base = (t[None, None, :, None] * 0.001 + pos[None, None, :, None] * 0.01
            + np.arange(LAYERS, dtype=np.float32)[:, None, None, None]
            + np.arange(HEADS, dtype=np.float32)[None, :, None, None] * 0.1
            + np.arange(DIM, dtype=np.float32)[None, None, None, :] * 0.0001)
    return CanonicalKV(base.astype(np.float16), (-base).astype(np.float16))


def check(kv: CanonicalKV, tokens: np.ndarray) -> None:
    if not kv.equal(kv_for(tokens)):
        raise AssertionError(f"loaded KV does not match its tokens ({len(tokens)} tokens)")


def load_shared(store: Store) -> None:
    """Load the longest cached prefix of the shared context, whichever agent's card holds it (it may vanish
    under us: another process deletes it)."""
    query = np.array(SHARED + [1])
    m = store.match(query, identity())
    if m is not None:
        try:
            check(store.load(m), query[:m.tokens])
        except CardNotFoundError:
            pass


def reap(procs: list) -> None:
    """Kill what is still running of ``procs`` (a test that failed midway) and collect them."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def stress(store: Store, agent: str, rng: np.random.Generator, n: int) -> None:
    ident = identity()
    mine: dict[str, np.ndarray] = {}
    for _ in range(n):
        op = rng.choice(["put", "put", "match", "load", "delete"])
        if op == "put":
            base = SHARED if rng.random() < 0.7 else []
            extra = rng.integers(0, 1000, size=int(rng.integers(1, 90))).tolist()
            toks = np.array(base + extra, dtype=np.int64)
            cid = store.put(kv_for(toks), toks, ident, agent=agent)
            check(store.load(cid), toks)
            mine[cid] = toks
        elif op == "match" and mine:
            toks = mine[list(mine)[int(rng.integers(len(mine)))]]
            m = store.match(np.concatenate([toks, [1500, 1500]]), ident, agent=agent)
            assert m is not None and m.tokens == len(toks), (m, len(toks))
            check(store.load(m), toks[:m.tokens])
        elif op == "load":
            load_shared(store)
        elif op == "delete" and mine:
            cid = list(mine)[int(rng.integers(len(mine)))]
            store.delete(cid, agent=agent)
            del mine[cid]
    for cid, toks in mine.items():  # everything this agent still holds is intact
        check(store.load(cid), toks)
    print("ok", flush=True)


def crash(store: Store, agent: str, rng: np.random.Generator) -> None:
    ident = identity()
    prev = np.array(SHARED)
    while True:
        toks = np.concatenate([prev, rng.integers(0, 1000, size=int(rng.integers(1, 300)))]) \
            if rng.random() < 0.6 else rng.integers(0, 1000, size=int(rng.integers(1, 300)))
        cid = store.put(kv_for(toks), toks, ident, agent=agent)
        print(cid, ",".join(map(str, toks.tolist())), flush=True)
        prev = toks if len(toks) < 2000 else np.array(SHARED)


def main() -> None:
    mode, root, agent, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(seed)
    with Store(root) as store:
        if mode == "stress":
            stress(store, agent, rng, int(sys.argv[5]))
        else:
            crash(store, agent, rng)


if __name__ == "__main__":
    main()
