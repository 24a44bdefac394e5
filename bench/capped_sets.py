"""A capped cache after a bulk load: what each ``set()`` that evicts costs.

    python bench/capped_sets.py [--n 50000] [--sets 50] [--stores memory,valkey]

Fills a :class:`~hnswcache.SemanticCache` with ``max_entries=--n`` to its cap by
``set_many`` batches of 1,000 (random 64-d vectors, no lookup in between, as a warm-up
import does), then times ``--sets`` single ``set()`` calls of new prompts, each of which
evicts one entry. ``valkey`` is a private valkey-server (the ``server`` extra) over TCP.
Until the thirteenth session of 2026-12-06 each such set recomputed this process's
unread writes from every logged event (one per entry in the memory store, each mapped to
its whole batch): seconds per set after such an import.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from hnswcache import SemanticCache
from hnswcache.store.server import EmbeddedServer


def no_embedder(texts: list[str]) -> np.ndarray:
    raise RuntimeError("the benchmark passes its embeddings")


def run(name: str, store: str, n: int, sets: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n + sets, 64)).astype(np.float32)
    cache = SemanticCache(no_embedder, store=store, max_entries=n,
                          namespace=f"capped{time.time_ns()}")
    t = time.perf_counter()
    for s in range(0, n, 1000):
        cache.set_many([(f"p{i}", "r") for i in range(s, min(n, s + 1000))],
                       embeddings=x[s:min(n, s + 1000)])
    load = time.perf_counter() - t
    lat = []
    for i in range(n, n + sets):
        t0 = time.perf_counter_ns()
        cache.set(f"p{i}", "r", embedding=x[i])
        lat.append((time.perf_counter_ns() - t0) / 1e3)
    ev = cache.stats()["evictions"]
    print(f"| {name} | {n} | {load:.1f} | {np.percentile(lat, 50):.0f} | {max(lat):.0f} | {ev} |")
    cache.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--sets", type=int, default=50)
    ap.add_argument("--stores", default="memory,valkey")
    args = ap.parse_args()
    print("| store | entries (the cap) | bulk load s | evicting set() p50 µs | max µs | "
          "evictions |\n|---|---:|---:|---:|---:|---:|")
    for name in args.stores.split(","):
        if name == "memory":
            run("memory", "memory", args.n, args.sets)
        elif name == "valkey":
            with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp) as server:
                run("valkey (TCP)", server.url, args.n, args.sets)
        else:
            raise SystemExit(f"unknown store {name!r}")


if __name__ == "__main__":
    main()
