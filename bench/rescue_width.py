"""How many upper nodes must a far search's rescue rank again on their 8-bit copies? The
rescue (``Index.rescue_beam``) takes the ``width`` nearest nodes of level >= 1 by sign bits,
ranks them on their 8-bit copies and walks level 0 again from the best ``search_starts``.
This script measures what a narrower width loses, over several graphs, with more
resolution than ``bench/rescue.py`` (one graph, ~14 rescued paraphrases).

    python bench/rescue_width.py [--n 100000] [--seeds 3] [--widths 0,16,32,64,128]

Each graph is built as :class:`~hnswcache.SemanticCache` builds one (as ``bench/rescue.py``)
over the first ``--n`` sgd rows and half of the 999 paraphrase questions, spread through
the build: seed ``s`` stores the first half (even ``s``) or the second half (odd ``s``) in
its own insertion order. Queries: the 999 paraphrases and 1,000 random unit vectors. Per
width, summed over the graphs:

- ``lost``: paraphrases whose best entry by brute force is at or above the cache's
  threshold but whose search returns none at it;
- ``rescued``: paraphrases whose first walk ended below the rescue's similarity (0.4);
  ``top1``: of those, how many ended on brute force's nearest entry;
- ``random top1``: random vectors answered with brute force's nearest entry (what
  ``SemanticCache.lookup`` reports as the nearest similarity of a far miss);
- latency of a random vector's search (µs; each query's fastest of ``--passes``, widths
  alternating): p50 and p99.

Width 0 is the plain walk (no rescue). At 100k rows (~6,200 upper nodes) every width from
16 up scans the sign bits; narrower ones walk a level-1 beam that wide instead (the scan is
used up to ``32 * M * width`` codes: ``sketch_scan_pays``). The figures of
``docs/results/rescue_width_*.txt`` come from this script.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cache_ef import DATA, OFFSET, K, unit  # (bench/ is this script's folder)
from hnswcache.cache import DEFAULT_THRESHOLD
from hnswcache.index import Index

BELOW = 0.4  # SemanticCache's rescue_below


def build(base: np.ndarray, questions: np.ndarray, seed: int) -> tuple[Index, np.ndarray,
                                                                         np.ndarray, slice]:
    half = len(questions) // 2
    stored = slice(0, half) if seed % 2 == 0 else slice(half, len(questions))
    q = questions[stored]
    vecs = np.concatenate([base, q])
    labels = np.concatenate([np.arange(len(base)),
                             OFFSET + np.arange(len(questions))[stored]]).astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(vecs))
    idx = Index(vecs.shape[1], metric="cosine", M=16, ef_construction=100, ef_search=24,
                dtype="int8", alpha=1.2)
    idx.search_starts = 4
    for s in range(0, len(vecs), 1000):
        idx.add(vecs[perm[s:s + 1000]], labels[perm[s:s + 1000]])
    return idx, vecs, labels, stored


def answers(idx: Index, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best label and its search's latency (µs)."""
    best = np.empty(len(q), dtype=np.int64)
    lat = np.empty(len(q))
    for i in range(len(q)):
        t = time.perf_counter_ns()
        lab, _ = idx.search(q[i:i + 1], k=K, num_threads=1)
        lat[i] = (time.perf_counter_ns() - t) / 1e3
        best[i] = lab[0, 0]
    return best, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--widths", default="0,16,32,64,128")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    t = DEFAULT_THRESHOLD
    base = unit(np.load(DATA / "sgd" / "base_f16.npy", mmap_mode="r")[: args.n])
    pq = unit(np.load(DATA / "paraphrases" / "q.npy"))
    pp = unit(np.load(DATA / "paraphrases" / "paraphrase.npy"))
    rnd = unit(np.random.default_rng(1).standard_normal((1000, base.shape[1])))
    tot = {w: {"lost": 0, "rescued": 0, "top1": 0, "rtop1": 0, "lat": []} for w in widths}
    must = 0
    for seed in range(args.seeds):
        idx, vecs, labels, _ = build(base, pq, seed)
        idx.rescue_distance = 1.0 - BELOW
        row_of = {int(lab): r for r, lab in enumerate(labels)}
        sims = pp @ vecs.T
        true_best = labels[sims.argmax(axis=1)]
        true_sim = sims.max(axis=1)
        must += int((true_sim >= t).sum())
        rtrue = labels[(rnd @ vecs.T).argmax(axis=1)]
        idx.rescue_beam = 0
        plain, _ = answers(idx, pp)
        plain_sim = np.array([float(vecs[row_of[int(b)]] @ pp[i]) for i, b in enumerate(plain)])
        far = plain_sim < BELOW
        fastest = {w: np.full(len(rnd), np.inf) for w in widths}
        for p in range(args.passes):
            for w in widths:  # alternating, so a noisy minute hits every width alike
                idx.rescue_beam = w
                rb, lat = answers(idx, rnd)
                fastest[w] = np.minimum(fastest[w], lat)
                if p:
                    continue
                best, _ = answers(idx, pp)
                sim = np.array([float(vecs[row_of[int(b)]] @ pp[i]) if b >= 0 else -1.0
                                for i, b in enumerate(best)])
                d = tot[w]
                d["lost"] += int(((true_sim >= t) & (sim < t)).sum())
                d["rescued"] += int(far.sum())
                d["top1"] += int((far & (best == true_best)).sum())
                d["rtop1"] += int((rb == rtrue).sum())
        for w in widths:
            tot[w]["lat"].append(fastest[w])
        print(f"graph {seed}: {len(vecs)} rows, {int(far.sum())} paraphrases rescued, "
              f"{int((far & (plain == true_best)).sum())} of them on the nearest without",
              flush=True)
    print(f"{args.seeds} graphs, threshold {t}: {must} paraphrases have an entry at or above it")
    print(f"{'width':>5} {'lost':>5} {'rescued':>7} {'top1':>5} {'random top1':>11} "
          f"{'p50':>6} {'p99':>6}")
    for w in widths:
        d = tot[w]
        lat = np.concatenate(d["lat"])
        print(f"{w:>5} {d['lost']:>5} {d['rescued']:>7} {d['top1']:>5} "
              f"{d['rtop1']:>6} / {len(rnd) * args.seeds:<4} {np.percentile(lat, 50):>6.1f} "
              f"{np.percentile(lat, 99):>6.1f}")


if __name__ == "__main__":
    main()
