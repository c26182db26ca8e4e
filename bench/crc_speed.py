"""crc32c throughput on this machine: one thread, and N threads over chunks as the restore path checks them.

    python bench/crc_speed.py        -> prints GB/s (a quick check of the host a restore runs on)
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import crc32c
import google_crc32c
import numpy as np

CHUNK = 147_456 + 4          # an 8-head x 256-token x 128-channel q4_0 chunk
N = 2048


def main() -> None:
    data = np.random.default_rng(0).integers(0, 255, CHUNK * N, dtype=np.uint8)
    mv = memoryview(data)
    print("crc32c hardware:", crc32c.hardware_based, "cpus:", os.cpu_count())
    for name, fn in (("crc32c", lambda b: crc32c.crc32c(b, gil_release_mode=1)), ("google_crc32c", lambda b: google_crc32c.value(np.frombuffer(b, np.uint8)))):
        t = time.perf_counter()
        for i in range(N):
            fn(mv[i * CHUNK:(i + 1) * CHUNK])
        one = data.nbytes / (time.perf_counter() - t) / 1e9
        for threads in (4, 8, 16):
            with ThreadPoolExecutor(threads) as pool:
                t = time.perf_counter()
                list(pool.map(lambda i: fn(mv[i * CHUNK:(i + 1) * CHUNK]), range(N)))
                many = data.nbytes / (time.perf_counter() - t) / 1e9
            print(f"{name}: 1 thread {one:.1f} GB/s, {threads} threads {many:.1f} GB/s")
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():  # the restore path's device check (adapters/device_crc.py)
        from cachecard.adapters.device_crc import crc32c_chunks

        raw = torch.from_numpy(data).cuda()
        starts = np.arange(N, dtype=np.int64) * CHUNK
        lens = np.full(N, CHUNK - 4, np.int64)
        for _ in range(3):
            crc32c_chunks(raw, starts, lens)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            got = crc32c_chunks(raw, starts, lens)
        torch.cuda.synchronize()
        gbs = 10 * data.nbytes / (time.perf_counter() - t) / 1e9
        ok = got[:4].cpu().numpy().view(np.uint32).tolist() == [crc32c.crc32c(mv[i * CHUNK:(i + 1) * CHUNK - 4])
                                                                for i in range(4)]
        print(f"device ({torch.cuda.get_device_name()}): {gbs:.0f} GB/s, equal to crc32c: {ok}")


if __name__ == "__main__":
    main()
