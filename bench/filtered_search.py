"""A search restricted to a list of labels (``Index.search(filter=...)``, which the hnswlib
face's ``knn_query(filter=)`` and a vector store's metadata filter come down to): its cost
and recall@10 against the exact answer, by the number of labels allowed.

    python bench/filtered_search.py [--n 50000] [--sizes 200,400,1000,...] [--queries 200]

Index: the first ``--n`` sgd rows (all-MiniLM-L6-v2, 384-d), cosine, M=16,
ef_construction=100; one query per call (sgd's own queries), k=10, ef 64; each size draws
its allowed labels at random. The times include building the filter from the labels
(one hash lookup per label), which every call pays.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cache_ef import DATA, unit  # (bench/ is this script's folder)
from hnswcache import Index

SGD = DATA / "sgd"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--sizes", default="200,256,400,1000,2000,4000,8000,16000,25000")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    x = np.load(SGD / "base_f16.npy", mmap_mode="r")[:args.n].astype(np.float32)
    q = np.load(SGD / "queries.npy").astype(np.float32)[:args.queries]
    idx = Index(x.shape[1], metric="cosine", M=16, ef_construction=100)
    idx.add(x, np.arange(len(x)))
    xn, qn = unit(x), unit(q)
    rng = np.random.default_rng(0)
    print(f"{len(x)} sgd rows, {len(q)} queries, k=10, ef 64, isa {idx.isa}\n")
    print("| labels allowed | share | p50 µs | p99 µs | recall@10 |\n|---:|---:|---:|---:|---:|")
    for size in (int(v) for v in args.sizes.split(",")):
        allowed = rng.choice(len(x), size, replace=False)
        lat, rec = [], 0.0
        for i in range(len(q)):
            t = time.perf_counter_ns()
            labels, _ = idx.search(q[i:i + 1], k=10, ef=64, filter=allowed)
            lat.append((time.perf_counter_ns() - t) / 1e3)
            truth = allowed[np.argsort(-(xn[allowed] @ qn[i]))[:10]]
            rec += len(set(labels[0].tolist()) & set(truth.tolist())) / len(truth)
        p50, p99 = np.percentile(lat, [50, 99])
        print(f"| {size} | {size / len(x):.3f} | {p50:.0f} | {p99:.0f} | {rec / len(q):.3f} |")


if __name__ == "__main__":
    main()
