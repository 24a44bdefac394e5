"""What one query costs outside the graph: a 50-vector index (graph work is small), k=10,
ef 10, one query per call through each library's Python API (the adapters of
``hnswcache.benchmark``, which ``hnswcache bench`` uses), best of 7 rounds of 5 passes.

    python bench/call_overhead.py [--rounds 7]

The figures in docs/benchmarks.md ("What a single query costs outside the graph") come
from this script; libraries not installed are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from hnswcache.benchmark import make_adapter, normalise

_MODULES = {"hnswcache": "hnswcache", "hnswlib": "hnswlib", "faiss": "faiss",
            "usearch": "usearch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((50, 384)).astype(np.float32))
    q = normalise(rng.standard_normal((200, 384)).astype(np.float32))
    labels = np.arange(50)
    out = {}
    for lib, module in _MODULES.items():
        if importlib.util.find_spec(module) is None:
            print(f"{lib:10s} not installed")
            continue
        a = make_adapter(lib, 384)
        a.build(x, labels, 1)
        a.set_ef(10)
        qs = a.prepare_queries(q)
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(5):
                for v in qs:
                    a.search_one(v, 10)
            best = min(best, (time.perf_counter() - t0) / (5 * len(qs)))
        out[lib] = best
    ref = out.get("hnswcache")
    for lib, s in out.items():
        ratio = f"  ({s / ref:.2f}x hnswcache)" if ref else ""
        print(f"{lib:10s} {s * 1e6:6.1f} µs per call{ratio}")


if __name__ == "__main__":
    main()
