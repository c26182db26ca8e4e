"""SIGKILL a card writer mid-write, again and again (issue 13): nothing committed is lost, nothing half written
is ever readable, and the store verifies clean after gc.

Run: .venv/bin/python bench/crash.py --kills 200   ->  bench/results/crash.json

Each round starts a writer process (alternately: ``write_card`` to directories and ``.zip`` files; ``Store.put``
into one store), waits until it has committed one card, kills it with SIGKILL at a random moment (most likely
mid-write) and checks:

- every card the writer reported committed (after ``write_card`` / ``put`` returned) opens, verifies and holds
  exactly its KV;
- every other path the writer touched (final names it had not reported yet, staging ``.partial-*`` paths)
  either is refused with a CacheCardError or, if complete, verifies and holds exactly its KV: never a half
  card that opens, never a foreign exception;
- at the end, the store's gc removes every partial write and its verify finds no failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "crash.json"
LAYERS, HEADS, DIM = 2, 2, 32


def identity():  # noqa: ANN201
    from cachecard.testing import make_identity

    return make_identity(layers=LAYERS, heads=HEADS, head_dim=DIM)


def kv_for(seed: int, tokens: int):  # noqa: ANN201
    from cachecard.testing import make_kv

    return make_kv(layers=LAYERS, heads=HEADS, tokens=tokens, head_dim=DIM, seed=seed)


def tokens_for(seed: int) -> np.ndarray:
    n = 50 + seed % 300
    return (np.arange(n) * 7 + seed) % 30000


def child(mode: str, root: Path, start: int) -> None:
    """The writer: writes forever, printing each committed card as soon as it is committed."""
    import cachecard

    seed = start
    if mode == "store":
        store = cachecard.Store(root / "store")
        while True:
            toks = tokens_for(seed)
            cid = store.put(kv_for(seed, len(toks)), toks, identity(), agent="writer")
            print(f"{cid} {seed}", flush=True)
            seed += 1
    while True:
        toks = tokens_for(seed)
        path = root / "cards" / (f"c{seed}.zip" if seed % 2 else f"c{seed}")
        cachecard.write_card(path, kv_for(seed, len(toks)), toks, identity(), codec="q8" if seed % 3 else "lossless",
                             chunk_tokens=32)
        print(f"{path.name} {seed}", flush=True)
        seed += 1


_EXPECTED: dict = {}


def expected(seed: int):  # noqa: ANN201
    """What card ``seed`` must decode to (q8 cards: what the writer's own codec makes of it)."""
    import tempfile

    import cachecard

    if seed in _EXPECTED:
        return _EXPECTED[seed]
    toks = tokens_for(seed)
    if seed % 3 == 0:
        _EXPECTED[seed] = kv_for(seed, len(toks))
    else:
        with tempfile.TemporaryDirectory() as d:
            cachecard.write_card(Path(d) / "c", kv_for(seed, len(toks)), toks, identity(), codec="q8",
                                 chunk_tokens=32)
            _EXPECTED[seed] = cachecard.open_card(Path(d) / "c").read()
    return _EXPECTED[seed]


PROBLEMS = ("lost", "half_readable", "wrong", "foreign")


def fresh_stats() -> dict:
    return {"committed_ok": 0, "committed_unreported": 0, "staging_complete": 0, "partial_refused": 0,
            **{k: [] for k in PROBLEMS}}


def check_cards(root: Path, committed: dict[str, int], stats: dict) -> None:
    import cachecard

    cards = root / "cards"
    for entry in sorted(cards.iterdir()) if cards.exists() else []:
        seed = committed.get(entry.name)
        try:
            card = cachecard.open_card(entry)
            card.verify()
            kv = card.read()
        except cachecard.CacheCardError:
            if seed is not None:
                stats["lost"].append(entry.name)
            elif entry.name.startswith("."):
                stats["partial_refused"] += 1
            else:
                stats["half_readable"].append(entry.name)  # a final name must hold a whole card
            continue
        except Exception as e:  # noqa: BLE001
            stats["foreign"].append(f"{entry.name}: {type(e).__name__}: {e}")
            continue
        want = seed if seed is not None else int(entry.name.lstrip(".").split(".")[0].lstrip("c").split("-")[0] or -1)
        if not kv.equal(expected(want)):
            stats["wrong"].append(entry.name)
        elif seed is not None:
            stats["committed_ok"] += 1
        elif entry.name.startswith("."):
            stats["staging_complete"] += 1  # killed between its last write and the rename: never published
        else:
            stats["committed_unreported"] += 1  # committed, killed before it could print


def check_store(root: Path, committed: dict[str, int], stats: dict, *, final: bool) -> None:
    import cachecard

    with cachecard.Store(root / "store") as store:
        for cid, seed in committed.items():
            try:
                ok = store.load(cid).equal(kv_for(seed, len(tokens_for(seed))))
            except cachecard.CacheCardError:
                ok = False
            if not ok:
                stats["lost"].append(cid)
            else:
                stats["committed_ok"] += 1
        if final:
            rep = store.gc(grace_s=0)
            stats["gc_partial_deleted"] = len(rep.partial_deleted)
            stats["gc_orphans_deleted"] = len(rep.orphans_deleted)
            stats["verify_failures_after_gc"] = dict(store.verify().failures)
            leftovers = [p.name for p in (root / "store" / "cards").rglob(".*")]
            stats["partial_left_after_gc"] = len(leftovers)


def run(kills: int, root: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    committed: dict[str, dict[str, int]] = {"cards": {}, "store": {}}
    stats: dict = {"kills": 0, "killed_mid_run": 0, **fresh_stats()}
    start = 0
    t0 = time.perf_counter()
    for round_ in range(kills):
        mode = ("cards", "store")[round_ % 2]
        p = subprocess.Popen([sys.executable, __file__, "--child", mode, str(root), str(start)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = p.stdout.readline()  # the first commit: start-up time depends on the machine's load
        time.sleep(float(rng.random()) * 0.4)
        if p.poll() is None:
            stats["killed_mid_run"] += 1
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        stats["kills"] += 1
        lines = (first + out).split("\n")[:-1]  # whole lines only: the kill may cut the last one short
        if not lines:
            raise RuntimeError(f"the writer committed nothing before it was killed: {err[-2000:]}")
        for line in lines:
            name, s = line.split(" ")
            committed[mode][name] = int(s)
        start = max(int(line.split(" ")[1]) for line in lines) + 2  # skip the seed it was writing
        if mode == "cards" and round_ % 10 == 0:  # look for trouble as it happens (the final check counts)
            interim = fresh_stats()
            check_cards(root, committed["cards"], interim)
            for k in PROBLEMS:
                stats[k] = sorted(set(stats[k]) | set(interim[k]))
        if (round_ + 1) % 20 == 0:
            print(f"  {round_ + 1}/{kills} kills, {time.perf_counter() - t0:.0f} s", flush=True)
    check_cards(root, committed["cards"], stats)
    check_store(root, committed["store"], stats, final=True)
    stats["committed"] = {k: len(v) for k, v in committed.items()}
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "START"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.child:
        mode, root, start = args.child
        child(mode, Path(root), int(start))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        stats = run(args.kills, Path(d), args.seed)
    stats["setup"] = ("writer processes alternately calling write_card (directory and .zip cards, lossless and q8, "
                      "2 layers x 2 heads x 50-350 tokens x 32) and Store.put; SIGKILL at a random moment up to 0.4 s "
                      "after the first commit of each process")
    print(json.dumps(stats, indent=1))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    print("wrote", args.out)
    bad = stats["lost"] or stats["half_readable"] or stats["wrong"] or stats["foreign"] or \
        stats["verify_failures_after_gc"] or stats["partial_left_after_gc"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
