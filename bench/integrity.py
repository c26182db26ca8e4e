"""The corruption campaign (issue 13) and what the object table costs, same run.

Run: .venv/bin/python bench/integrity.py            # 900 trials, a quick look
     .venv/bin/python bench/integrity.py --full     # 10,080 trials on format 1.3 cards + 1,080 on 1.1 cards,
                                                    # and the costs -> bench/results/integrity.json

Trials run in worker processes watched by this one: a worker that reports nothing for TRIAL_TIMEOUT seconds is
killed and its trial counted as a hang; each worker's address space is capped (RLIMIT_AS), so a runaway
allocation shows up as a MemoryError (a foreign exception), and its peak RSS is reported. Every trial is
deterministic (seed, index): ``--replay N`` reruns one and prints what each read path saw.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "integrity.json"
TRIAL_TIMEOUT = 120.0
ADDRESS_SPACE = 8 << 30
SEED = 2026


def worker(slot: int, indices: list[int], seed: int, unbound: bool, out: mp.Queue) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    from cachecard.testing import corruption

    with tempfile.TemporaryDirectory() as d:
        variants = corruption.build_variants(Path(d) / "v", unbound=unbound)
        for i in indices:
            out.put(("start", i, slot))
            try:
                result = corruption.trial(i, seed, variants, Path(d) / "s")
            except Exception as e:  # noqa: BLE001 - a fault of the harness, reported as such
                result = {"trial": i, "kind": "?", "class": "?", "outcome": "harness_error", "error": repr(e)}
            result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.put(("done", i, result))


def run(trials: int, seed: int, workers: int, unbound: bool) -> tuple[list[dict], float]:
    """Every trial's result; a trial whose worker went silent for TRIAL_TIMEOUT is a ``hang``."""
    ctx = mp.get_context("fork")
    todo = list(range(trials))
    results: dict[int, dict] = {}
    t0 = time.perf_counter()
    while todo:
        queue: mp.Queue = ctx.Queue()
        shares = [todo[w::workers] for w in range(workers)]
        procs = [ctx.Process(target=worker, args=(w, s, seed, unbound, queue)) for w, s in enumerate(shares) if s]
        for p in procs:
            p.start()
        running: dict[int, int] = {}  # worker slot -> the trial it last started
        last = time.monotonic()
        while len(results) < trials and any(p.is_alive() for p in procs):
            try:
                what, i, result = queue.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty
                if time.monotonic() - last > TRIAL_TIMEOUT + 60:  # a worker went silent: kill them all
                    break
                continue
            last = time.monotonic()
            if what == "start":
                running[result] = i
            else:
                results[i] = result
                if len(results) % 500 == 0:
                    print(f"  {len(results)}/{trials} trials, {time.perf_counter() - t0:.0f} s", flush=True)
        for p in procs:
            p.kill()
            p.join()
        stuck = [i for i in running.values() if i not in results]
        for i in stuck:
            results[i] = {"trial": i, "kind": "?", "class": "?", "outcome": "hang"}
        todo = [i for i in range(trials) if i not in results]
    return [results[i] for i in range(trials)], time.perf_counter() - t0


def summarize(results: list[dict]) -> dict:
    by_class: dict = collections.defaultdict(collections.Counter)
    by_kind: dict = collections.defaultdict(collections.Counter)
    keyed: dict = collections.defaultdict(collections.Counter)
    paths: dict = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for r in results:
        by_class[r["class"]][r["outcome"]] += 1
        by_kind[r["kind"]][r["outcome"]] += 1
        if "keyed_outcome" in r:
            keyed[r["kind"]][r["keyed_outcome"]] += 1
        for path, outcome in r.get("paths", {}).items():
            paths[r["kind"]][path][outcome.split(":")[0]] += 1
    bad = [r for r in results if r["outcome"] in ("foreign", "hang", "harness_error")
           or (r["outcome"] == "silent_wrong" and r["class"] != "forgery")
           or r.get("keyed_outcome") in ("silent_wrong", "foreign", "hang")]
    return {
        "trials": len(results),
        "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "forgeries_with_key": {k: dict(v) for k, v in sorted(keyed.items())},
        "paths_by_kind": {k: {p: dict(c) for p, c in v.items()} for k, v in sorted(paths.items())},
        "max_rss_mib": round(max((r.get("rss_mib", 0) for r in results), default=0), 1),
        "problems": bad[:50],
    }


def best(f, repeats: int = 9, clock=time.perf_counter) -> float:
    """The fastest of ``repeats`` runs of ``f`` (seconds of ``clock``)."""
    times = []
    for _ in range(repeats):
        t = clock()
        f()
        times.append(clock() - t)
    return min(times)


def costs() -> dict:
    """What binding costs on a SmolLM2-shaped card of 32K tokens: manifest bytes; open, read and verify of the
    same arrays as format 1.3 and as 1.1 (forgery.unbind); the table's per-chunk check alone (the same opened
    card with and without its table CRCs); keyed reads; the writer's hashing. CPU times (all threads) are the
    best of 9 and say what the work costs; wall times on this shared 2-core machine vary by +-30%."""
    import numpy as np

    import cachecard
    from cachecard.testing import forgery, make_identity

    out: dict = {"setup": "30 layers, 3 KV heads, head_dim 64, fp16 -> q4_0, 32,768 tokens; local directory, warm "
                          "page cache; ms, best of 9; *_ratio = 1.3 / 1.1 of the same arrays"}
    rng = np.random.default_rng(0)
    ident = make_identity(layers=30, heads=3, head_dim=64)
    tokens = 32768
    shape = (30, 3, tokens, 64)
    kv = cachecard.CanonicalKV(rng.standard_normal(shape).astype(np.float16),
                               rng.standard_normal(shape).astype(np.float16))
    key = b"bench-store-key-0123456789abcdef"
    cpu = time.process_time
    with tempfile.TemporaryDirectory() as d:
        for chunk in (256, 1024):
            bound, unbound, keyed = (Path(d) / f"{n}{chunk}" for n in ("bound", "unbound", "keyed"))
            t = time.process_time()
            cachecard.write_card(bound, kv, np.arange(tokens), ident, codec="q4_0", chunk_tokens=chunk)
            write_cpu = time.process_time() - t
            cachecard.write_card(keyed, kv, np.arange(tokens), ident, codec="q4_0", chunk_tokens=chunk, key=key)
            objs = forgery.load(bound)
            forgery.save(forgery.unbind(dict(objs)), unbound)
            digest_cpu = best(lambda: [hashlib.sha256(v).digest() for v in objs.values()], clock=cpu)
            row = {
                "chunk_tokens": chunk, "inner_chunks_per_array": 30 * tokens // chunk,
                "root_bytes_1_3": len(objs["zarr.json"]), "root_bytes_1_1": (unbound / "zarr.json").stat().st_size,
                "stored_bytes": sum(len(v) for v in objs.values()),
                "write_cpu_ms": round(write_cpu * 1e3), "write_sha256_cpu_ms": round(digest_cpu * 1e3, 1),
            }
            for what, f in {
                "open": lambda p: cachecard.open_card(p),
                "read_prefix_1024": lambda p: cachecard.open_card(p).read(tokens=1024),
                "read_encoded_k": lambda p: cachecard.open_card(p).read_encoded("k"),
                "read_all": lambda p: cachecard.open_card(p).read(),
                "verify": lambda p: cachecard.open_card(p).verify(),
            }.items():
                reps = 3 if what in ("read_all", "verify") else 9
                for clock, unit in ((cpu, "cpu"), (time.perf_counter, "wall")):
                    a = best(lambda: f(bound), reps, clock)
                    b = best(lambda: f(unbound), reps, clock)
                    row[f"{what}_{unit}_ms_1_3"], row[f"{what}_{unit}_ms_1_1"] = round(a * 1e3, 2), round(b * 1e3, 2)
                    row[f"{what}_{unit}_ratio"] = round(a / b, 3)
            card = cachecard.open_card(bound)
            card.read_encoded("k")  # index read and checked once
            with_table = best(lambda: card.read_encoded("k"), 15, cpu)
            saved, card._binding.crcs = card._binding.crcs, {}  # noqa: SLF001 - the same read without the check
            without = best(lambda: card.read_encoded("k"), 15, cpu)
            card._binding.crcs = saved  # noqa: SLF001
            row["chunk_check_cpu_ms_per_3840_chunks"] = round((with_table - without) * 1e3 * 3840 /
                                                              (30 * tokens // chunk), 2)
            row["read_encoded_k_cpu_ms_without_table_check"] = round(without * 1e3, 2)
            row["read_encoded_k_cpu_ms_with_table_check"] = round(with_table * 1e3, 2)
            for what, f in {"open": lambda: cachecard.open_card(keyed, key=key),
                            "read_prefix_1024": lambda: cachecard.open_card(keyed, key=key).read(tokens=1024)}.items():
                row[f"{what}_keyed_wall_ms"] = round(best(f, 5) * 1e3, 2)
            shard = objs["k/c/0/0/0/0"]
            row["sha256_mb_per_s"] = round(len(shard) / best(lambda: hashlib.sha256(shard).digest(), 5) / 1e6)
            out[f"chunk_{chunk}"] = row
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="10,080 trials (+1,080 on unbound cards) and the costs")
    ap.add_argument("--trials", type=int, default=900)
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--replay", type=int, default=None, help="rerun one trial in this process and print it")
    ap.add_argument("--costs-only", action="store_true")
    args = ap.parse_args()
    if args.replay is not None:
        from cachecard.testing import corruption

        with tempfile.TemporaryDirectory() as d:
            variants = corruption.build_variants(Path(d) / "v")
            print(json.dumps(corruption.trial(args.replay, args.seed, variants, Path(d) / "s"), indent=1))
        return
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.costs_only:
        trials = 10080 if args.full else args.trials
        results, secs = run(trials, args.seed, args.workers, unbound=False)
        report["campaign"] = {"format": "1.3", "seed": args.seed, "workers": args.workers,
                              "seconds": round(secs, 1), **summarize(results)}
        print(json.dumps({k: report["campaign"][k] for k in ("trials", "by_class", "max_rss_mib")}, indent=1))
        if args.full:
            results, secs = run(1080, args.seed, args.workers, unbound=True)
            report["unbound_baseline"] = {"format": "1.1 (the same cards without the object table)",
                                          "seconds": round(secs, 1), **summarize(results)}
            print(json.dumps(report["unbound_baseline"]["by_kind"], indent=1))
    if args.full or args.costs_only:
        report["costs"] = costs()
    report["setup"] = {
        "cards": "3 layers, 2 KV heads, 40 tokens, head_dim 64, chunks of <=16 tokens; presets lossless, q8, q4_0, "
                 "q4, turbo3, frontier3.2, zstd as directory and zip; a card with explicit positions; keyed lossless "
                 "(dir) and q4_0 (zip) cards for the forgeries",
        "read_paths": "open (manifest, token ids, positions), read(), read(layers 1-2, tokens 5-29), "
                      "read_encoded('k'), read_encoded('v', layers 1-2, 20 tokens), verify(); each on a fresh open",
        "outcomes": "detected = a CacheCardError and nothing wrong returned; harmless = everything returned is the "
                    "original; silent_wrong = something returned differs; foreign = an exception that is not a "
                    "CacheCardError; hang = no answer in 120 s",
        "limits": f"max_read_bytes 256 MiB per read; worker address space {ADDRESS_SPACE >> 30} GiB",
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()
