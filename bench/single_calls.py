"""One call at a time on a 100k-row index, as applications call the drop-in faces: a single
``knn_query`` and a single ``add_items`` through the hnswlib face against hnswlib itself,
a single GPTCache vector-store ``search`` through ``HnswCacheVectorStore`` against
GPTCache's own hnswlib store, and the exact ``BFIndex`` of both hnswlib faces (one query a
call, and a batch, on the first ``--bf-n`` rows). Same rows (sgd, all-MiniLM-L6-v2, 384-d),
M=16, ef_construction=100, ef 64, k=4; the libraries alternate query by query so that all
see the same host.

    python bench/single_calls.py [--n 100000] [--queries 1000] [--bf-n 50000]

``docs/results/single_calls_*.txt`` come from it. Libraries not installed are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cache_ef import DATA, unit  # (bench/ is this script's folder)

SGD = DATA / "sgd"


def timed(calls: dict[str, Callable[[int], Any]], n: int) -> dict[str, np.ndarray]:
    """Each call ``n`` times, the libraries alternating call by call: µs per call."""
    out = {name: np.empty(n) for name in calls}
    for i in range(n):
        for name, call in calls.items():
            t = time.perf_counter_ns()
            call(i)
            out[name][i] = (time.perf_counter_ns() - t) / 1e3
    return out


def report(title: str, got: dict[str, np.ndarray], ref: str) -> None:
    print(f"\n{title}\n\n| library | p50 µs | p99 µs | p50 / {ref}'s |\n|---|---:|---:|---:|")
    base = float(np.percentile(got[ref], 50)) if ref in got else float("nan")
    for name, a in got.items():
        p50, p99 = np.percentile(a, [50, 99])
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {p50 / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)  # (sgd has 1,000)
    ap.add_argument("--bf-n", type=int, default=50_000, help="rows of the BFIndex runs")
    ap.add_argument("--bf-queries", type=int, default=200)
    args = ap.parse_args()
    base = unit(np.load(SGD / "base_f16.npy", mmap_mode="r")[:args.n])
    queries = unit(np.load(SGD / "queries.npy"))
    nq = min(args.queries, len(queries))
    extra = unit(base[:nq] + 0.05)  # rows for the single adds: near, not equal, to stored ones
    n = len(base)
    print(f"{n} sgd rows (384-d), {nq} single calls each")

    from hnswcache.compat import hnswlib as face

    faces: dict[str, Any] = {"hnswcache (hnswlib face)": face}
    if importlib.util.find_spec("hnswlib"):
        import hnswlib

        faces["hnswlib"] = hnswlib
    built = {}
    for name, mod in faces.items():
        p = mod.Index(space="cosine", dim=base.shape[1])
        p.init_index(max_elements=n + nq, M=16, ef_construction=100)
        t = time.perf_counter()
        p.add_items(base, np.arange(n))
        print(f"{name}: built in {time.perf_counter() - t:.1f} s")
        p.set_ef(64)
        built[name] = p
    queries_ = {name: (lambda i, p=p: p.knn_query(queries[i], k=4)) for name, p in built.items()}
    report("knn_query, one query a call (k=4, ef 64)", timed(queries_, nq), "hnswlib")
    adds = {name: (lambda i, p=p: p.add_items(extra[i], [n + i])) for name, p in built.items()}
    report("add_items, one row a call", timed(adds, nq), "hnswlib")
    del built

    bf_rows = base[:args.bf_n]
    bfs = {}
    for name, mod in faces.items():
        b = mod.BFIndex(space="cosine", dim=base.shape[1])
        b.init_index(len(bf_rows))
        b.add_items(bf_rows, np.arange(len(bf_rows)))
        bfs[name] = b
    nb = min(args.bf_queries, nq)
    report(f"BFIndex knn_query at {len(bf_rows)} rows, one query a call (k=4)",
           timed({name: (lambda i, b=b: b.knn_query(queries[i], k=4)) for name, b in bfs.items()},
                 nb), "hnswlib")
    report(f"BFIndex knn_query at {len(bf_rows)} rows, {nb} queries a call (k=10)",
           timed({name: (lambda i, b=b: b.knn_query(queries[:nb], k=10))
                  for name, b in bfs.items()}, 5), "hnswlib")
    if "hnswlib" in bfs:
        ours, theirs = (b.knn_query(queries[:nb], k=10)[0] for b in bfs.values())
        print(f"\nBFIndex labels equal to hnswlib's: {np.mean(ours == theirs):.4f} of "
              f"{ours.size}")
    del bfs

    if not importlib.util.find_spec("gptcache"):
        return
    import tempfile

    from gptcache.manager.vector_data.base import VectorData
    from gptcache.manager.vector_data.hnswlib_store import Hnswlib

    from hnswcache.integrations.gptcache import HnswCacheVectorStore

    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, Any] = {
            "hnswcache (HnswCacheVectorStore)": HnswCacheVectorStore(
                base.shape[1], top_k=4, M=16, ef_construction=100, ef_search=64),
            "GPTCache's hnswlib store": Hnswlib(f"{tmp}/g.bin", base.shape[1], 4,
                                               n + nq),
        }
        stores["GPTCache's hnswlib store"]._index.set_ef(64)  # (its default: 2 * top_k)
        for name, st in stores.items():
            t = time.perf_counter()
            for s in range(0, n, 1000):
                st.mul_add([VectorData(id=s + j, data=base[s + j])
                            for j in range(min(1000, n - s))])
            print(f"{name}: filled in {time.perf_counter() - t:.1f} s")
        report("GPTCache vector store search, one query a call (top_k=4, ef 64)",
               timed({name: (lambda i, st=st: st.search(queries[i], 4))
                      for name, st in stores.items()}, nq), "GPTCache's hnswlib store")


if __name__ == "__main__":
    main()
