"""Encode and decode throughput of every preset on one CPU core, in GB/s of fp16 KV (issue 3).

Run: .venv/bin/python bench/codec_speed.py [out.json] [--presets NAME ...]   (bench/codecs.py runs it and merges
the figures; with --presets only those rows are measured and merged into out.json)

The input is a real SmolLM2-135M KV cache (2048-token prefix of the pydoc corpus) stored as float16; every
inner chunk (one layer, 256 tokens) is encoded and decoded through the codec objects, as the card writer and
reader do, without zarr's per-chunk plumbing. BLAS and torch are held to one thread. Decode is reported twice:
to float32 (what an fp32 model or a device upload takes) and to the card's float16. The baseline in the same
run is a plain memory copy of the same bytes. ``cachecard.rotq`` rows also give the fp16 decode with torch hidden
(``decode_fp16_numpy_only_GBps``: numpy's float32 BLAS product and float16 cast instead of torch's int8 product).

``frontier_parallel`` (with --presets frontier...): the frontier decode of every chunk serially, on 2 threads
and on 2 processes. constriction (0.5) keeps the GIL while it decodes (its Python bindings never release it),
so threads cannot help; processes can, at the price of shipping the decoded chunks back.
"""

from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cachecard.codecs import PRESETS, pipeline  # noqa: E402
from cachecard.codecs.base import ChunkContext, KVCodec  # noqa: E402

CHUNK = 256


def real_kv(prefix: int = 2048) -> tuple[np.ndarray, np.ndarray, object]:
    import torch

    torch.set_num_threads(1)
    from cachecard.testing.smollm2 import load, windows

    from cachecard.adapters import hf

    model, tok = load()
    ids = torch.from_numpy(windows(prefix, 0, 1))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    kv = hf.to_canonical(cache)
    return kv.k.astype(np.float16), kv.v.astype(np.float16), hf.model_identity(model, tokenizer=tok, kv_dtype="float16")


def timed(f, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def chunks(x: np.ndarray):
    layers, _, t, _ = x.shape
    for layer in range(layers):
        for s in range(0, t, CHUNK):
            yield x[layer:layer + 1, :, s:s + CHUNK], ChunkContext(
                layer=layer, token_start=s, valid_tokens=min(CHUNK, t - s), card_tokens=t,
                positions=np.arange(s, min(s + CHUNK, t)))


def measure(name: str, k: np.ndarray, v: np.ndarray, identity) -> dict:
    row: dict = {"codec": name}
    enc = dec32 = dec16 = numpy16 = 0.0
    nbytes = 0
    for which, x in (("k", k), ("v", v)):
        codec = pipeline(name, which, x, identity).serializer
        if not isinstance(codec, KVCodec):  # lossless presets: zarr's bytes codec, i.e. a copy
            row.update(encode_GBps=None, decode_GBps=None, decode_fp16_GBps=None)
            return row
        parts = list(chunks(x))
        datas = [np.frombuffer(codec.encode_chunk(c, ctx), np.uint8) for c, ctx in parts]
        enc += timed(lambda: [codec.encode_chunk(c, ctx) for c, ctx in parts], 1)
        dec32 += timed(lambda: [codec.decode_array(d, c.shape) for d, (c, _) in zip(datas, parts)])
        dec16 += timed(lambda: [codec.decode_chunk(d, c.shape, c.dtype) for d, (c, _) in zip(datas, parts)])
        if getattr(codec, "codec_id", None) == "cachecard.rotq":  # also without torch: numpy alone
            torch, sys.modules["torch"] = sys.modules["torch"], None
            try:
                numpy16 += timed(lambda: [codec.decode_chunk(d, c.shape, c.dtype) for d, (c, _) in zip(datas, parts)])
            finally:
                sys.modules["torch"] = torch
        nbytes += x.nbytes
    row.update(encode_GBps=nbytes / enc / 1e9, decode_GBps=nbytes / dec32 / 1e9, decode_fp16_GBps=nbytes / dec16 / 1e9)
    if numpy16:
        row["decode_fp16_numpy_only_GBps"] = nbytes / numpy16 / 1e9
    return row


def _decode_frontier(job: tuple[dict, bytes, tuple[int, ...]]) -> np.ndarray:
    config, data, shape = job
    from cachecard.codecs.frontier import FrontierCodec

    return FrontierCodec(**config).decode_chunk(np.frombuffer(data, np.uint8), shape, np.dtype("<f2"))


def frontier_parallel(k: np.ndarray, identity) -> dict:
    """GB/s of fp16 output decoding every frontier3.2 K chunk: serially, on 2 threads, on 2 processes."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    codec = pipeline("frontier3.2", "k", k, identity).serializer
    jobs = [(codec.config.model_dump(), codec.encode_chunk(c, ctx), c.shape) for c, ctx in chunks(k)]
    out = {"serial": k.nbytes / timed(lambda: [_decode_frontier(j) for j in jobs], 1) / 1e9}
    with ThreadPoolExecutor(2) as pool:
        out["threads_2"] = k.nbytes / timed(lambda: list(pool.map(_decode_frontier, jobs)), 1) / 1e9
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_decode_frontier, jobs[:2]))  # start the workers
        out["processes_2"] = k.nbytes / timed(lambda: list(pool.map(_decode_frontier, jobs, chunksize=8)), 1) / 1e9
    return out


def main() -> None:
    args = sys.argv[1:]
    names = list(PRESETS)
    if "--presets" in args:
        i = args.index("--presets")
        names, args = args[i + 1:], args[:i]
    path = Path(args[0] if args else "bench/results/codec_speed.json")
    k, v, identity = real_kv()
    copy = timed(lambda: (k.copy(), v.copy()), 5)
    rows = []
    for name in names:
        rows.append(measure(name, k, v, identity))
        print(json.dumps(rows[-1]), flush=True)
    out = {"memcpy_GBps": (k.nbytes + v.nbytes) / copy / 1e9, "shape": list(k.shape), "rows": rows}
    if names != list(PRESETS) and path.exists():  # merge: keep the other presets' rows
        previous = json.loads(path.read_text())
        kept = [r for r in previous["rows"] if r["codec"] not in names]
        out = {**previous, **out, "rows": kept + rows}
    if "frontier3.2" in names:
        out["frontier_parallel"] = frontier_parallel(k, identity)
        print(json.dumps(out["frontier_parallel"]), flush=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
