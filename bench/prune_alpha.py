"""The pruning slack ``alpha`` of the graph build: recall, a foreign cluster, build time.

    python bench/prune_alpha.py [--alphas 1.0,1.1,1.2,1.3] [--n 113052]

For each ``alpha`` (``Index(alpha=...)``), on ``../shared/data`` (all-MiniLM-L6-v2, 384-d),
indexes built as the cache builds them (cosine, M=16, ef_construction=100, batches of 1,000;
int8 rows with 8 search starts, float32 rows with 2):

1. ``recall@10`` of the 1,000 sgd queries against ``gt.npy`` over all sgd rows, per ef;
2. ``own``: the first 499 questions of ``paraphrases`` stored among the first 100k sgd rows
   (another topic: travel and restaurant requests vs. general questions), each asked its
   paraphrase; of the paraphrases whose exact nearest row is their own question at
   similarity >= 0.85 (a hit by brute force), how many find it among k=4 results, per ef.

Recall figures do not depend on the host; build times do (and are only compared within a run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hnswcache import Index

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EFS = (16, 32, 64, 128)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(x: np.ndarray, labels: np.ndarray, dtype: str, alpha: float) -> tuple[Index, float]:
    idx = Index(x.shape[1], M=16, ef_construction=100, dtype=dtype, alpha=alpha)
    idx.search_starts = 8 if dtype == "int8" else 2
    t = time.perf_counter()
    for s in range(0, len(x), 1000):
        idx.add(x[s:s + 1000], labels[s:s + 1000])
    return idx, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", default="1.0,1.1,1.2,1.3")
    ap.add_argument("--n", type=int, default=113_052, help="sgd rows for recall@10")
    args = ap.parse_args()
    base = unit(np.load(DATA / "sgd" / "base_f16.npy", mmap_mode="r")[: args.n])
    q = unit(np.load(DATA / "sgd" / "queries.npy"))
    gt = np.load(DATA / "sgd" / "gt.npy")[:, :10]
    pq = unit(np.load(DATA / "paraphrases" / "q.npy"))
    pp = unit(np.load(DATA / "paraphrases" / "paraphrase.npy"))
    half = len(pq) // 2
    offset = 10**9
    mixed = np.concatenate([base[:100_000], pq[:half]])
    mixed_labels = np.concatenate([np.arange(100_000), offset + np.arange(half)]).astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(mixed))
    ex = pp[:half] @ mixed.T
    own = offset + np.arange(half)
    target = (mixed_labels[ex.argmax(1)] == own) & (ex.max(1) >= 0.85)
    print(f"recall@10: {len(base)} sgd rows, 1,000 queries (gt.npy); own: {int(target.sum())} "
          f"paraphrases whose nearest row (>= 0.85) is their own question, among 100,499 rows")
    print(f"{'alpha':>5} {'dtype':>7} {'build s':>8}  " + "  ".join(f"r@10 ef{e:<3}" for e in EFS)
          + f" {'build s':>8}  " + "  ".join(f"own ef{e:<3}" for e in EFS))
    for alpha in (float(a) for a in args.alphas.split(",")):
        for dtype in ("int8", "float32"):
            idx, bt = build(base, np.arange(len(base), dtype=np.int64), dtype, alpha)
            rec = []
            for ef in EFS:
                found, _ = idx.search(q, k=10, ef=ef, num_threads=1)
                rec.append(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, gt)]))
            del idx
            pidx, pbt = build(mixed[perm], mixed_labels[perm], dtype, alpha)
            got = []
            for ef in EFS:
                lab, _ = pidx.search(pp[:half], k=4, ef=ef, num_threads=1)
                got.append(int(((lab == own[:, None]).any(1) & target).sum()))
            print(f"{alpha:5.2f} {dtype:>7} {bt:8.1f}  " + "  ".join(f"{r:10.4f}" for r in rec)
                  + f" {pbt:8.1f}  " + "  ".join(f"{g:9d}" for g in got), flush=True)


if __name__ == "__main__":
    main()
