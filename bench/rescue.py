"""Does a far search's rescue (``Index.rescue_beam``) find what the plain walk misses, and
what does it cost? One index, the rescue off and on, in one process.

    python bench/rescue.py [--n 100000] [--beams 64,128,256] [--below 0.4] [--passes 3]

The index is built as :class:`~hnswcache.SemanticCache` builds one (cosine, int8 rows,
M=16, ef_construction=100, alpha 1.2, 4 starts, ef 24, in batches of 1,000) over the first
``--n`` rows of ``../shared/data/sgd`` (all-MiniLM-L6-v2 user requests) plus the first 499
questions of ``../shared/data/paraphrases``, spread through the build: a small cluster of
another domain, which a walk from the top of the graph can miss. Three query sets:

- ``sgd``: sgd's 1,000 queries (the rows' own domain);
- ``para``: the 999 paraphrases (of the 499 stored questions and of 500 not stored);
- ``random``: 1,000 random unit vectors (nothing near them: every one is rescued).

For each, against brute force at the cache's threshold: ``lost`` = lookups whose best entry
is at or above the threshold but whose search returns none at it; for ``para`` also
``para_hit`` (a stored question's paraphrase answered by that question) and ``other_hit``
(a paraphrase of a question not stored answered at all); ``rescued`` = the share of
lookups whose nearest result was below ``--below`` (similarity) and so searched again.
Latencies (µs, one query at a time) are each query's fastest of ``--passes`` passes, the
settings alternating pass by pass, and over every call.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cache_ef import DATA, OFFSET, K, among, unit  # (bench/ is this script's folder)
from hnswcache.cache import DEFAULT_THRESHOLD
from hnswcache.index import Index


def run(idx: Index, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's best label, its similarity (on the exact vectors: the cache re-scores
    its candidates) and the search's latency in µs."""
    labels = np.empty(len(q), dtype=np.int64)
    dists = np.empty(len(q))
    lat = np.empty(len(q))
    for i in range(len(q)):
        row = q[i:i + 1]
        t = time.perf_counter_ns()
        lab, dist = idx.search(row, k=K, num_threads=1)
        lat[i] = (time.perf_counter_ns() - t) / 1e3
        labels[i], dists[i] = lab[0, 0], dist[0, 0]
    return labels, dists, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--beams", default="64,128,256")
    ap.add_argument("--below", type=float, default=0.4,
                    help="rescue a search whose nearest result has a lower similarity")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    t = DEFAULT_THRESHOLD

    base = unit(np.load(DATA / "sgd" / "base_f16.npy", mmap_mode="r")[: args.n])
    pq = unit(np.load(DATA / "paraphrases" / "q.npy"))
    pp = unit(np.load(DATA / "paraphrases" / "paraphrase.npy"))
    vecs, labels, perm, half = among(base, pq)
    idx = Index(vecs.shape[1], metric="cosine", M=16, ef_construction=100, ef_search=24,
                dtype="int8", alpha=1.2)
    idx.search_starts = 4
    t0 = time.perf_counter()
    for s in range(0, len(vecs), 1000):
        idx.add(vecs[perm[s:s + 1000]], labels[perm[s:s + 1000]])
    print(f"built {len(vecs)} entries ({len(base)} sgd rows, {half} questions) in "
          f"{time.perf_counter() - t0:.1f} s; threshold {t}, rescue below similarity "
          f"{args.below}, isa {idx.isa}")
    row_of = {int(lab): r for r, lab in enumerate(labels)}

    rng = np.random.default_rng(1)
    sets = {"sgd": unit(np.load(DATA / "sgd" / "queries.npy")), "para": pp,
            "random": unit(rng.standard_normal((1000, vecs.shape[1])))}
    configs = [0] + [int(b) for b in args.beams.split(",")]
    print(f"{'set':>6} {'beam':>5} {'lost':>5} {'para_hit':>8} {'other_hit':>9} "
          f"{'rescued':>7} {'p50':>7} {'p99':>7} {'p99 fastest':>11}")
    for name, q in sets.items():
        true_sim = (q @ vecs.T).max(axis=1)
        results: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            b: [] for b in configs}
        for _ in range(args.passes):
            for b in configs:  # alternating, so a noisy minute hits every setting alike
                idx.rescue_beam = b
                idx.rescue_distance = 1.0 - args.below
                results[b].append(run(idx, q))
        plain_sim = 1.0 - results[0][0][1]
        for b in configs:
            best, dist, _ = results[b][0]
            lat_all = np.concatenate([r[2] for r in results[b]])
            fastest = np.min(np.stack([r[2] for r in results[b]]), axis=0)
            # exact similarity of the best candidate (the index's are on 8-bit rows)
            sim = np.array([float(vecs[row_of[int(lab)]] @ q[i]) if lab >= 0 else -1.0
                            for i, lab in enumerate(best)])
            hit = sim >= t
            lost = int(((true_sim >= t) & ~hit).sum())
            extra = ("", "")
            if name == "para":
                stored = np.arange(len(q)) < half
                own = OFFSET + np.arange(len(q))
                extra = (f"{(hit & stored & (best == own)).sum() / half:.4f}",
                         f"{(hit & ~stored).sum() / (len(q) - half):.4f}")
            rescued = float((plain_sim < args.below).mean()) if b else 0.0
            print(f"{name:>6} {b:>5} {lost:>5} {extra[0]:>8} {extra[1]:>9} {rescued:>7.3f} "
                  f"{np.percentile(lat_all, 50):>7.1f} {np.percentile(lat_all, 99):>7.1f} "
                  f"{np.percentile(fastest, 99):>11.1f}")
        print(f"{name:>6} brute: {int((true_sim >= t).sum())} lookups at or above the "
              f"threshold")


if __name__ == "__main__":
    main()
