"""How small can the cache's search ``ef`` be? Hits lost against brute force, per ef.

    python bench/cache_ef.py [--n 100000] [--configs 16,32,64,16/64] [--dtype float32]

A semantic cache only needs the nearest stored entry, and only when it is at or above the
threshold, so it can search with a smaller candidate list than an ANN benchmark (recall@10)
needs. This measures, on an index built as :class:`~hnswcache.SemanticCache` builds one
(cosine, M=16, ef_construction=100, inserted in batches of 1,000, ``candidates=4``):

1. ``sgd``: the first ``--n`` rows of ``../shared/data/sgd`` (all-MiniLM-L6-v2 user
   requests), its 1,000 queries. Against brute force over the same rows: ``top1`` = the
   index's best candidate is the true nearest row (or ties with it); ``hits`` = lookups that
   are hits at the default threshold; ``lost`` = brute-force hits the index misses;
   ``other`` = hits answered by another entry than the true nearest one. Native search
   latency (one query at a time, one thread) is printed beside.
2. ``paraphrases``: ``../shared/data/paraphrases`` (999 question/paraphrase pairs) inside
   the same ``--n`` sgd rows as distractors. A cache holding the questions of the first half
   is asked the paraphrases of both halves: ``para_hit`` = paraphrases of stored questions
   that get *their own* question's answer, ``para_wrong`` = ... another entry's answer,
   ``false_hit`` = paraphrases of questions *not* stored that get any hit at all.

Every figure is at the cache's default threshold.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hnswcache.cache import DEFAULT_THRESHOLD
from hnswcache.index import Index

log = logging.getLogger("cache_ef")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
K = 4  # SemanticCache(candidates=4)
OFFSET = 10 ** 9  # the label of paraphrase question i is OFFSET + i


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def among(base: np.ndarray, questions: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``base`` plus the first half of ``questions`` (question i labelled ``OFFSET + i``;
    base rows keep their row number), and an insertion order that spreads the questions
    through the build: ``(vectors, labels, order, half)``."""
    half = len(questions) // 2
    vecs = np.concatenate([base, questions[:half]])
    labels = np.concatenate([np.arange(len(base)), OFFSET + np.arange(half)]).astype(np.int64)
    return vecs, labels, np.random.default_rng(0).permutation(len(vecs)), half


def build(vectors: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> Index:
    idx = Index(vectors.shape[1], metric="cosine", M=args.M, ef_construction=args.efc,
                dtype=args.dtype, alpha=args.alpha)
    idx.search_starts = args.starts
    t = time.perf_counter()
    for s in range(0, len(vectors), 1000):
        idx.add(vectors[s:s + 1000], labels[s:s + 1000])
    log.info("built %d entries (M=%d, ef_construction=%d) in %.1f s: %.0f inserts/s",
             len(vectors), args.M, args.efc, time.perf_counter() - t,
             len(vectors) / (time.perf_counter() - t))
    return idx


def parse_config(text: str) -> tuple[int, int]:
    """``"64"``: one search at ef 64; ``"16/64"``: ef 16, then ef 64 if nothing reached the
    threshold (what ``SemanticCache(ef_first=16, ef_search=64)`` does)."""
    first, _, full = text.partition("/")
    return int(first), int(full or first)


def search_all(
    idx: Index, q: np.ndarray, config: tuple[int, int], threshold: float,
    vectors_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best candidate (label, similarity) of each query, one query at a time (as the cache
    searches), and the latency of each lookup's search(es) in µs. As the cache does, the
    ``K`` candidates are re-scored on their exact vectors (``vectors_of(labels)``): with
    ``--dtype int8`` the index's own similarities are those of the quantised rows."""
    ef_first, ef = config
    best = np.full(len(q), -1, dtype=np.int64)
    sim = np.full(len(q), -np.inf)
    lat = np.empty(len(q))
    for i in range(len(q)):
        row = q[i:i + 1]
        t = time.perf_counter_ns()
        labels, dists = idx.search(row, k=K, ef=ef_first, num_threads=1)
        if ef > ef_first and 1.0 - float(dists[0, 0]) < threshold:
            labels, dists = idx.search(row, k=K, ef=ef, num_threads=1)
        lat[i] = (time.perf_counter_ns() - t) / 1e3
        found = labels[0][labels[0] >= 0]
        if found.size:
            exact = vectors_of(found) @ q[i]
            j = int(exact.argmax())
            best[i], sim[i] = found[j], float(exact[j])
    return best, sim, lat


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--configs", default="8,16,24,32,48,64,128,16/64,16/128,24/128",
                    help="ef values; 'a/b' = ef a, then ef b for lookups with no hit at a")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "int8"))
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--efc", type=int, default=100, help="ef_construction")
    ap.add_argument("--alpha", type=float, help="pruning slack (default: the index's)")
    ap.add_argument("--starts", type=int, default=2,
                    help="Index.search_starts: level-0 starting points (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="latency passes (lowest p99 kept)")
    args = ap.parse_args()
    configs = [(c, parse_config(c)) for c in args.configs.split(",")]
    t = DEFAULT_THRESHOLD

    base = unit(np.load(DATA / "sgd" / "base_f16.npy", mmap_mode="r")[: args.n])
    q = unit(np.load(DATA / "sgd" / "queries.npy"))
    idx = build(base, np.arange(len(base), dtype=np.int64), args)
    exact = q @ base.T
    true_best = exact.argmax(axis=1)
    true_sim = exact.max(axis=1)
    true_hit = true_sim >= t
    log.info("sgd: %d entries, %d queries, dtype %s, M=%d, ef_construction=%d, alpha %.2f, "
             "%d starts, threshold %.2f: brute-force hits %d", len(base), len(q), args.dtype,
             args.M, args.efc, idx.alpha, args.starts, t, int(true_hit.sum()))
    log.info("search latency (µs, one thread) over all lookups / hits / misses")
    log.info("%7s %7s %5s %5s %6s %9s %9s %9s %9s", "ef", "top1", "hits", "lost", "other",
             "all p50", "all p99", "hit p99", "miss p99")
    for name, cfg in configs:
        runs = [search_all(idx, q, cfg, t, lambda lab: base[lab]) for _ in range(args.repeat)]
        best, sim, _ = runs[0]
        lat = min((r[2] for r in runs), key=lambda a: float(np.percentile(a, 99)))
        top1 = (best == true_best) | (np.abs(sim - true_sim) <= 1e-6)
        hit = sim >= t
        lost = int((true_hit & ~hit).sum())
        other = int((hit & ~top1).sum())
        log.info("%7s %7.4f %5d %5d %6d %9.1f %9.1f %9.1f %9.1f", name, top1.mean(),
                 int(hit.sum()), lost, other, np.percentile(lat, 50), np.percentile(lat, 99),
                 np.percentile(lat[hit], 99), np.percentile(lat[~hit], 99))

    pq = unit(np.load(DATA / "paraphrases" / "q.npy"))
    pp = unit(np.load(DATA / "paraphrases" / "paraphrase.npy"))
    vecs, labels, perm, half = among(base, pq)
    stored = np.arange(len(pp)) < half
    own = OFFSET + np.arange(len(pp))

    def row(name: str, best: np.ndarray, sim: np.ndarray) -> None:
        hit = sim >= t
        log.info("%7s %9.4f %11.4f %10.4f", name, (hit & stored & (best == own)).sum() / half,
                 (hit & stored & (best != own)).sum() / half,
                 (hit & ~stored).sum() / (len(pp) - half))

    for what, vv, ll, pm in (
        (f"among {len(base)} sgd rows", vecs, labels, perm),
        ("alone", pq[:half], labels[len(base):], np.arange(half)),
    ):
        pidx = build(vv[pm], ll[pm], args)
        row_of = {int(lab): r for r, lab in enumerate(ll)}

        def vectors_of(lab: np.ndarray, vv: np.ndarray = vv,
                       row_of: dict[int, int] = row_of) -> np.ndarray:
            return vv[[row_of[int(x)] for x in lab]]

        ex = pp @ vv.T
        log.info("")
        log.info("paraphrases: %d questions stored %s; asked the paraphrases of those %d and "
                 "of %d questions not stored", half, what, half, len(pp) - half)
        log.info("%7s %9s %11s %10s", "ef", "para_hit", "para_wrong", "other_hit")
        row("brute", ll[ex.argmax(axis=1)], ex.max(axis=1))
        for name, cfg in configs:
            best, sim, _ = search_all(pidx, pp, cfg, t, vectors_of)
            row(name, best, sim)


if __name__ == "__main__":
    main()
