"""Native search time of several replica settings, measured side by side.

    python bench/search_ab.py [--n 100000] [--configs float32:64:2,int8:32:8,...]

A config is ``dtype:ef:search_starts``. One index per dtype is built as the cache builds
its replica (cosine, M=16, ef_construction=100, batches of 1,000) on the first ``--n`` rows
of ``../shared/data/sgd``; then every config answers the 1,000 sgd queries one at a time
(k=4, one thread) in ``--passes`` passes whose order alternates, so the host's slow and
fast moments fall on every config alike (on a shared 2-core guest they move absolute times
by 2x). Printed per config: how often the best candidate, re-scored on the exact vectors, is
the true nearest row (``top1``); p50 / p99 over every call; and the p50 / p99 of each
query's fastest pass (what the search itself costs, without most of the interference).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hnswcache.index import Index

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--configs", default="float32:64:2,int8:64:2,int8:48:8,int8:32:8,"
                                         "int8:24:8,float32:32:8")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    configs = []
    for c in args.configs.split(","):
        dtype, ef, starts = c.split(":")
        configs.append((dtype, int(ef), int(starts)))

    base = unit(np.load(DATA / "base_f16.npy", mmap_mode="r")[: args.n])
    q = unit(np.load(DATA / "queries.npy"))
    exact = q @ base.T
    true_sim = exact.max(axis=1)
    indexes = {}
    for dtype in dict.fromkeys(c[0] for c in configs):
        idx = Index(base.shape[1], metric="cosine", M=16, ef_construction=100, dtype=dtype)
        for s in range(0, len(base), 1000):
            idx.add(base[s:s + 1000])
        indexes[dtype] = idx

    times = {c: np.zeros((args.passes, len(q))) for c in configs}
    top1 = {}
    for p in range(args.passes):
        for c in configs if p % 2 == 0 else configs[::-1]:
            idx = indexes[c[0]]
            idx.search_starts = c[2]
            hits = 0
            for j in range(len(q)):
                t = time.perf_counter_ns()
                labels, _ = idx.search(q[j:j + 1], k=4, ef=c[1], num_threads=1)
                times[c][p, j] = (time.perf_counter_ns() - t) / 1e3
                found = labels[0][labels[0] >= 0]
                if found.size and abs(float((base[found] @ q[j]).max()) - true_sim[j]) < 1e-6:
                    hits += 1
            top1[c] = hits / len(q)
    print(f"sgd: {len(base)} rows, {len(q)} queries x {args.passes} passes, k=4, one thread (µs)")
    print(f"{'dtype':8s} {'ef':>3s} {'starts':>6s} {'top1':>6s} {'p50':>7s} {'p99':>7s} "
          f"{'best p50':>9s} {'best p99':>9s}")
    for c in configs:
        a = times[c]
        best = a.min(axis=0)
        print(f"{c[0]:8s} {c[1]:3d} {c[2]:6d} {top1[c]:6.3f} {np.percentile(a, 50):7.1f} "
              f"{np.percentile(a, 99):7.1f} {np.percentile(best, 50):9.1f} "
              f"{np.percentile(best, 99):9.1f}")


if __name__ == "__main__":
    main()
