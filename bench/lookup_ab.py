"""The cost of one in-memory lookup with its embedding given, measured without the host's
pauses: ``--n`` sgd entries, 2,000 exact and 2,000 semantic lookups, ``--passes`` passes,
each query's fastest pass, the median over queries. Run it alternately against two builds
(their ``python/`` folders, same native module) to compare lookup code:

    PYTHONPATH=python python bench/lookup_ab.py
    PYTHONPATH=/tmp/old/python python bench/lookup_ab.py

The figures of ``docs/results/lookup_ab_20261206_s12.txt`` come from it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_cache import load, no_embedder  # (bench/ is this script's folder)
from hnswcache import SemanticCache


def fastest(cache: SemanticCache, items: list[tuple[str, np.ndarray]], passes: int) -> float:
    """The median over ``items`` of each lookup's fastest pass, in µs."""
    best = np.full(len(items), np.inf)
    for _ in range(passes):
        for i, (prompt, vec) in enumerate(items):
            t = time.perf_counter_ns()
            cache.get(prompt, embedding=vec)
            best[i] = min(best[i], time.perf_counter_ns() - t)
    return float(np.median(best)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    texts, base, qtexts, qv, _ = load(args.n, 2000)
    cache = SemanticCache(no_embedder, store="memory")
    for s in range(0, len(texts), 1000):
        cache.set_many([(t, f"r{s + i}") for i, t in enumerate(texts[s:s + 1000])],
                       embeddings=base[s:s + 1000])
    rng = np.random.default_rng(2)
    exact = [(texts[i], base[i]) for i in rng.integers(0, len(texts), 2000)]
    semantic = list(zip(qtexts, qv))
    for name, items in (("exact", exact), ("semantic", semantic)):
        print(name, "median of per-query min µs", round(fastest(cache, items, args.passes), 2))
    cache.close()


if __name__ == "__main__":
    main()
