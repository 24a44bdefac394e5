"""How long do searches wait while an index, or a cache's snapshot, is being saved?

    python bench/save_stall.py [--n 100000] [--rounds 4] [--cache]

A save copies the graph while inserts and consolidation wait (searches, deletes and
touches go on), then checksums and writes the copy without holding anything. This builds
an index of ``--n`` rows of ``../shared/data/sgd`` as the cache builds one (int8, M 16,
ef_construction 100), then for each round saves it in a thread while the main thread
searches one query at a time (k 4), and prints the save's duration and the searches'
latency during it: ``max`` is the longest wait.

With ``--cache`` it does the same one level up: a ``SemanticCache`` of ``--n`` entries on
a private valkey-server (the ``server`` extra) saves a snapshot (``save_snapshot()``, what
a periodic snapshot runs) in a thread while the main thread calls ``get``: first alone,
then while another process writes an entry every 5 ms, so that lookups apply its changes
(which waited for the whole save until the fifth session of 2026-12-05).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hnswcache.index import Index

SGD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"


def during(save: Callable[[], None], call: Callable[[int], None]) -> tuple[float, np.ndarray]:
    """Run ``save`` in a thread and ``call(i)`` in this one until it ends: the save's
    seconds and each call's latency (µs)."""
    th = threading.Thread(target=save)
    t0 = time.perf_counter()
    th.start()
    lat = []
    i = 0
    while th.is_alive():
        t = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - t)
        i += 1
    th.join()
    return time.perf_counter() - t0, np.asarray(lat) * 1e6


def report(what: str, seconds: float, lat: np.ndarray) -> None:
    print(f"{what}: save {seconds * 1e3:.0f} ms; {len(lat)} calls during it: p50 "
          f"{np.percentile(lat, 50):.0f} µs, p99 {np.percentile(lat, 99):.0f} µs, "
          f"max {lat.max() / 1e3:.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cache", action="store_true", help="also a SemanticCache snapshot")
    args = ap.parse_args()
    base = np.load(SGD / "base_f16.npy", mmap_mode="r")[: args.n].astype(np.float32)
    queries = np.load(SGD / "queries.npy").astype(np.float32)
    idx = Index(base.shape[1], metric="cosine", dtype="int8", M=16, ef_construction=100)
    for s in range(0, len(base), 5000):
        idx.add(base[s:s + 5000], np.arange(s, s + len(base[s:s + 5000])))
    print(f"index: {len(base)} sgd rows, int8, M 16, ef_construction 100")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "index.hci"
        for _ in range(args.rounds):
            secs, lat = during(lambda: idx.save(path),
                               lambda i: idx.search(queries[i % len(queries)][None], k=4,
                                                    num_threads=1) and None)
            report("Index.save", secs, lat)
    if args.cache:
        bench_cache_snapshot(base, queries, args.rounds)


def bench_cache_snapshot(base: np.ndarray, queries: np.ndarray, rounds: int) -> None:
    from hnswcache import SemanticCache
    from hnswcache.store.server import EmbeddedServer

    def no_embedder(texts: list[str]) -> np.ndarray:
        raise RuntimeError("the benchmark passes precomputed embeddings")

    with tempfile.TemporaryDirectory() as d, EmbeddedServer(d) as srv:
        cache = SemanticCache(no_embedder, store=srv.unix_url, namespace="stall",
                              snapshot_dir=Path(d) / "snap", snapshot_interval=None)
        for s in range(0, len(base), 1000):
            cache.set_many([(f"entry {s + i}", "x") for i in range(len(base[s:s + 1000]))],
                           embeddings=base[s:s + 1000])
        cache.sync()  # (its own writes, read back from the log: not part of any save)
        print(f"cache: {len(cache)} entries on valkey (unix socket)")

        def lookup(i: int) -> None:
            cache.get(f"query {i}", embedding=queries[i % len(queries)])

        for _ in range(rounds):
            secs, lat = during(cache.save_snapshot, lookup)
            report("SemanticCache.save_snapshot", secs, lat)
        ctx = mp.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Event()
        writer = ctx.Process(target=write_every_5ms, args=(srv.unix_url, queries, ready, stop))
        writer.start()
        try:
            if not ready.wait(300):  # (its warm start: ~10 s per 100k entries)
                raise RuntimeError("the writing process did not start")
            for _ in range(rounds):
                secs, lat = during(cache.save_snapshot, lookup)
                report("  the same while another process writes", secs, lat)
                secs, lat = during(lambda: time.sleep(0.4), lookup)
                report("  the writes and no save (0.4 s of lookups)", secs, lat)
        finally:
            stop.set()
            writer.join()
        cache.close()


def write_every_5ms(url: str, queries: np.ndarray, ready: object, stop: object) -> None:
    """Another process's writes: one new entry every 5 ms until ``stop`` is set (``ready``
    once the first is written)."""
    from hnswcache import SemanticCache

    def no_embedder(texts: list[str]) -> np.ndarray:
        raise RuntimeError("the benchmark passes precomputed embeddings")

    w = SemanticCache(no_embedder, store=url, namespace="stall", snapshot_interval=None)
    i = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        w.set(f"written {i}", "y", embedding=queries[i % len(queries)])
        i += 1
        ready.set()  # type: ignore[attr-defined]
        time.sleep(0.005)
    w.close()


if __name__ == "__main__":
    main()
