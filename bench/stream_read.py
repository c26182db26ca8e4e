"""Where the streamed read of a restore spends its time, against the raw parallel read of the same bytes.

    python bench/stream_read.py [--tokens 8192] [--codec q4_0]   -> bench/results/stream_read.json

A Llama-3.1-8B-shaped card (32 layers, 8 KV heads, head_dim 128, random bf16 KV) is written once; then, warm:
the raw read of its bytes (the I/O limit), ``read_spans`` without and with checksums, with host -> device
copies launched per piece (on CUDA), for several piece sizes and worker counts. Ratios are to the raw read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import cachecard
from cachecard.card import stream
from cachecard.testing import make_identity

RESULTS = Path(__file__).parent / "results"


def median(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--codec", default="q4_0")
    ap.add_argument("--out", type=Path, default=RESULTS / "stream_read.json")
    args = ap.parse_args()
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    rng = np.random.default_rng(0)
    shape = (32, 8, args.tokens, 128)
    import ml_dtypes

    kv = cachecard.CanonicalKV(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16),
                               rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16))
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TTFT_DIR")) as tmp:
        cachecard.write_card(Path(tmp) / "c", kv, np.arange(args.tokens), make_identity(32, 8, 128, "bfloat16"),
                             codec=args.codec)
        card = cachecard.open_card(Path(tmp) / "c")
        lays = [card.shard_layout(w) for w in ("k", "v")]
        tables = [stream.chunk_table(lay, range(32), args.tokens) for lay in lays]
        total = sum(t.length for t in tables)
        alloc = (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()) if cuda else \
            (lambda n: np.empty(n, np.uint8))
        bufs = [alloc(t.length) for t in tables]
        devs = [torch.empty(t.length, dtype=torch.uint8, device="cuda") for t in tables] if cuda else []
        copy_stream = torch.cuda.Stream() if cuda else None

        def raw(piece: int) -> None:
            work = []
            fds = [os.open(stream.local_path(lay), os.O_RDONLY) for lay in lays]
            for fd, t, b in zip(fds, tables, bufs):
                work += [(fd, q.start, b[q.start - t.base:q.end - t.base]) for q in stream.pieces(t, piece)]
            stream._run(lambda w: os.preadv(w[0], [memoryview(w[2])], w[1]), work)  # noqa: SLF001
            for fd in fds:
                os.close(fd)

        def spans(piece: int, verify: bool, copies: bool) -> None:
            jobs = []
            for i, (lay, t, b) in enumerate(zip(lays, tables, bufs)):
                cb = None
                if copies:
                    d, h = devs[i], torch.from_numpy(b)

                    def cb(a, e, d=d, h=h):
                        d[a:e].copy_(h[a:e], non_blocking=True)
                jobs.append(stream.Job(lay, t, b, cb))
            with torch.cuda.stream(copy_stream) if copies else contextlib.nullcontext():
                stream.read_spans(jobs, verify=verify, piece_bytes=piece)
            if copies:
                torch.cuda.synchronize()

        for piece in (2 << 20, 4 << 20, 8 << 20, 16 << 20):
            base = median(lambda: raw(piece))
            row = {"piece_mb": piece >> 20, "bytes": total, "raw_s": base, "raw_gbs": total / base / 1e9}
            for name, verify, copies in (("spans", False, False), ("spans_crc", True, False),
                                         ("spans_copy", False, True)):
                if copies and not cuda:
                    continue
                row[f"{name}_ratio"] = median(lambda: spans(piece, verify, copies)) / base
            rows.append(row)
            print(row, flush=True)
    out = {"tokens": args.tokens, "codec": args.codec, "workers": stream.WORKERS, "cuda": cuda, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
