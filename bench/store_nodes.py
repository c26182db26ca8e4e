"""Several nodes on one store (part of bench/store.py): puts/s from 1 and 3 node processes on one bucket (moto
S3 on loopback) and one Redis index, and a cold node's time to its first match with the shared Redis index vs
with a local LMDB index it must first rebuild from the bucket (``reindex``)."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cachecard import CanonicalKV, LayerKind, ModelIdentity, Rope, Store, __version__
from cachecard.testing import make_identity
from cachecard.testing.services import MotoS3, RedisServer

URL = "s3://cards/agents"
TINY = make_identity(layers=2, heads=2, head_dim=8)
LAYERS, HEADS, DIM = 30, 3, 64


def smollm2_shape() -> ModelIdentity:
    """An identity of SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64, fp16)."""
    return ModelIdentity(name="SmolLM2-135M shape", architecture="llama", num_layers=LAYERS, num_kv_heads=HEADS,
                         head_dim=DIM, layer_kinds=(LayerKind(),) * LAYERS, rope=Rope(theta=1e5, rotary_dim=DIM),
                         kv_dtype="float16", weights_hash="sha256:" + "0" * 64, tokenizer_hash="sha256:" + "0" * 64)


def _kv(n: int, seed: int, ident: Any) -> CanonicalKV:
    rng = np.random.default_rng(seed)
    shape = (ident.num_layers, ident.num_kv_heads, n, ident.head_dim)
    return CanonicalKV(rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16))


def _put_node(node: int, root: str, redis_url: str, options: dict[str, Any], seconds: float, tokens: int,
              shape: str, start: Any, out: Any) -> None:
    """One node: put new turns (a shared 64-token context plus ``tokens`` new ones) for ``seconds``."""
    ident = TINY if shape == "tiny" else smollm2_shape()
    kv = _kv(64 + tokens, node, ident)
    with Store(root, index=redis_url, storage_options=options if "://" in root else None) as st:
        rng = np.random.default_rng(node)
        start.wait()
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            ids = np.concatenate([np.arange(64), rng.integers(0, 50_000, tokens)])
            st.put(kv, ids, ident, agent=f"node{node}")
            n += 1
    out.put(n)


def puts_per_second(root: str, redis_url: str, options: dict[str, Any], nodes: int, seconds: float, tokens: int,
                    shape: str) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_put_node, args=(n, root, redis_url, options, seconds, tokens, shape, start, out))
             for n in range(nodes)]
    for p in procs:
        p.start()
    time.sleep(8.0)  # let every node import and open the store before the clock starts
    start.set()
    total = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def cold_start(redis_url: str, options: dict[str, Any], tmp: Path, cards: int) -> dict[str, float]:
    """A bucket of ``cards`` cards; a fresh node's time to its first match: shared index vs LMDB reindex."""
    with Store(URL + "-cold", index=redis_url + "?namespace=cold", storage_options=options, block_tokens=64) as st:
        kv = _kv(100, 0, TINY)
        for i in range(cards):
            st.put(kv, np.arange(100) + 1000 * i, TINY, agent=f"a{i % 10}")
    query = np.arange(100) + 1000 * (cards - 1)
    t = time.perf_counter()
    with Store(URL + "-cold", index=redis_url + "?namespace=cold", storage_options=options) as st:
        assert st.match(query, TINY) is not None
    redis_s = time.perf_counter() - t
    t = time.perf_counter()
    with Store(URL + "-cold", index=tmp / "cold-lmdb", storage_options=options) as st:
        st.reindex()
        assert st.match(query, TINY) is not None
    lmdb_s = time.perf_counter() - t
    return {"cold_node_cards": cards, "cold_node_first_match_redis_s": redis_s,
            "cold_node_first_match_lmdb_reindex_s": lmdb_s, "cold_node_reindex_s_per_card": lmdb_s / cards,
            "cold_node_redis_vs_reindex": lmdb_s / redis_s}


def bench_nodes(seconds: float = 10.0, cold_cards: int = 200) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis, MotoS3("cards") as s3:
        out: dict[str, Any] = {}
        for name, shape, tokens, root in (("tiny", "tiny", 16, URL), ("smollm2", "smollm2", 64, URL),
                                          ("tiny_local_objects", "tiny", 16, f"{tmp}/objects")):
            rates = [puts_per_second(f"{root}-{name}-{n}", redis.url + f"?namespace={name}{n}", s3.options, n,
                                     seconds, tokens, shape) for n in (1, 3)]
            out.update({f"redis_puts_per_s_1_node_{name}": rates[0], f"redis_puts_per_s_3_nodes_{name}": rates[1],
                        f"redis_puts_3_vs_1_node_{name}": rates[1] / rates[0]})
        out.update(cold_start(redis.url, s3.options, Path(tmp), cold_cards))
        out["nodes_setup"] = (f"cachecard {__version__}; puts: nodes are processes on this 2-core machine, each "
                              "putting a 64-token shared context plus new tokens (tiny: 2 layers x 2 heads x 8, "
                              "16 new tokens; smollm2: SmolLM2-135M shape, 64 new tokens, ~1.5 MB of fp16 KV) "
                              "into one moto S3 bucket and one redis-server on loopback (tiny_local_objects: the same, cards in one "
                              "local directory instead of S3, to show what the index side sustains); cold node: a fresh "
                              "Store's open + first match with the shared index vs open + reindex + first match")
        return out


__all__ = ["LAYERS", "HEADS", "DIM", "bench_nodes", "smollm2_shape"]
