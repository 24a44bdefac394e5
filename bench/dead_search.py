"""Search cost as the share of dead entries (expired, not yet consolidated) grows.

    python bench/dead_search.py [--n 40000] [--dtype float32|int8]

A cache whose TTLs ran out during a quiet spell keeps its expired entries in the graph until
the next insert consolidates it. Searches walk through dead nodes; this prints, for each dead
share, the time per query (one thread, k=10, 200 sgd queries) and recall@10 against an exact
search of the live entries (``../shared/data/sgd``; random vectors without it). Then what
automatic consolidation's checks add to one-row inserts into a growing index.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hnswcache import Index

SGD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    n = args.n
    if (SGD / "base_f16.npy").exists():
        base = np.load(SGD / "base_f16.npy", mmap_mode="r")[:n].astype(np.float32)
        q = np.load(SGD / "queries.npy")[:200].astype(np.float32)
    else:
        rng = np.random.default_rng(0)
        base = rng.standard_normal((n, 384)).astype(np.float32)
        q = rng.standard_normal((200, 384)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    order = np.random.default_rng(0).permutation(n)
    print(f"{n} rows, {args.dtype}, M 16, ef_construction 100, k 10, {len(q)} queries")
    print("| dead share | live | ef | ms / query | recall@10 |\n|---:|---:|---:|---:|---:|")
    for frac in (0.0, 0.5, 0.9, 0.99, 0.999, 0.99975, 1.0):
        idx = Index(base.shape[1], ef_construction=100, dtype=args.dtype, seed=1,
                    clock=lambda: 0.0)
        ttl = np.full(n, 1e9)
        dead = order[: int(frac * n)]
        ttl[dead] = 10.0
        idx.add(base, np.arange(n), ttl=ttl)
        now = 100.0  # the short TTLs have run out; nothing has consolidated them
        live = np.setdiff1d(np.arange(n), dead)
        for ef in (24, 64):
            t0 = time.perf_counter()
            lab, _ = idx.search(q, k=10, ef=ef, num_threads=1, now=now)
            ms = (time.perf_counter() - t0) / len(q) * 1e3
            rec = "-"
            if len(live):
                kk = min(10, len(live))
                gt = live[np.argsort(-(q @ base[live].T), axis=1)[:, :kk]]
                hits = [len(set(a) & set(b)) for a, b in zip(lab[:, :kk].tolist(), gt.tolist())]
                rec = f"{np.mean(hits) / kk:.4f}"
            print(f"| {frac:.5f} | {len(live)} | {ef} | {ms:.3f} | {rec} |")
    # What automatic consolidation adds to one-row inserts into a growing index (no dead
    # entries, so it never runs: only its checks cost).
    print("\n| auto_consolidate | 1,000 one-row adds into an index of "
          f"{n - 1000} | per add |\n|---|---:|---:|")
    for tau in (None, 0.1):
        idx = Index(base.shape[1], ef_construction=100, dtype=args.dtype, seed=1,
                    auto_consolidate=tau)
        idx.add(base[: n - 1000], np.arange(n - 1000))
        t0 = time.perf_counter()
        for i in range(n - 1000, n):
            idx.add(base[i], [i])
        sec = time.perf_counter() - t0
        print(f"| {tau} | {sec * 1e3:.0f} ms | {sec:.3f} ms |")


if __name__ == "__main__":
    main()
