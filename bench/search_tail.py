"""Is a search's p99 the query's own work or the machine's noise?

    PYTHONPATH=python python bench/search_tail.py

Builds an index as SemanticCache does (100k sgd rows, cosine, M=16, ef_construction=100,
batches of 1,000), runs the 1,000 sgd queries five times (k=4, ef 64, one at a time) and
compares the p99 over every call with the p99 of each query's fastest run: the second is what
the query itself costs; the gap is interference (timer ticks, the host's other tenants).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import hnswcache

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"


def main() -> None:
    base = np.load(DATA / "base_f16.npy").astype(np.float32)[:100000]
    q = np.load(DATA / "queries.npy").astype(np.float32)
    idx = hnswcache.Index(384, ef_construction=100)
    for s in range(0, len(base), 1000):
        idx.add(base[s:s + 1000])
    times = np.zeros((5, len(q)))
    for r in range(5):
        for j, x in enumerate(q):
            t = time.perf_counter()
            idx.search(x, 4, ef=64)
            times[r, j] = time.perf_counter() - t
    times *= 1e6
    mins = times.min(0)
    print(f"every call: p50 {np.percentile(times, 50):.1f} p99 {np.percentile(times, 99):.1f} µs"
          f" | each query's fastest of 5: p50 {np.percentile(mins, 50):.1f}"
          f" p99 {np.percentile(mins, 99):.1f} max {mins.max():.1f} µs")


if __name__ == "__main__":
    main()
