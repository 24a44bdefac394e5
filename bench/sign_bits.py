"""Do sign bits find the upper-level node nearest a query? A check, in NumPy, of the rescue's
scan (``docs/architecture.md``, "A far search is rescued").

    python bench/sign_bits.py

Rows: the first 100,000 sgd requests and the first 499 paraphrase questions (as
``bench/rescue.py`` builds them); a random 1/16 of them stands for the nodes of level >= 1.
For each paraphrase (and 500 random unit vectors), the nodes' 1-bit codes (the signs of
each value, or of each value minus the mean of 1,024 nodes) are ranked by Hamming distance
to the query's; printed: how often the ``top`` nearest by sign bits hold the nearest node
by cosine ("best-found") and how many of the 4 nearest they hold.
"""

from __future__ import annotations

import numpy as np

from cache_ef import DATA, unit  # (bench/ is this script's folder)


def main() -> None:
    base = unit(np.load(DATA / "sgd" / "base_f16.npy")[:100_000].astype(np.float32))
    q = unit(np.load(DATA / "paraphrases" / "q.npy").astype(np.float32))
    para = unit(np.load(DATA / "paraphrases" / "paraphrase.npy").astype(np.float32))
    rows = np.concatenate([base, q[:499]])
    rng = np.random.default_rng(0)
    upper = rows[rng.random(len(rows)) < 1 / 16]
    rnd = unit(rng.standard_normal((500, rows.shape[1])).astype(np.float32))
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    print(f"{len(upper)} upper nodes of {len(rows)} rows")
    for name, center in (("signs", np.zeros(rows.shape[1], np.float32)),
                         ("signs - mean", upper[:1024].mean(0))):
        codes = np.packbits((upper - center) > 0, axis=1)
        for qname, queries in (("paraphrases", para), ("random", rnd)):
            sims = queries @ upper.T
            qcodes = np.packbits((queries - center) > 0, axis=1)
            for top in (32, 64, 128):
                best = four = 0
                for i in range(len(queries)):
                    ham = popcount[np.bitwise_xor(codes, qcodes[i])].sum(1)
                    cand = np.argpartition(ham, top)[:top]
                    exact4 = np.argsort(-sims[i])[:4]
                    got4 = cand[np.argsort(-sims[i][cand])[:4]]
                    best += exact4[0] in got4
                    four += len(set(exact4) & set(got4))
                print(f"{name:12s} {qname:11s} top {top:3d}: best-found "
                      f"{best / len(queries):.3f}, top-4 held {four / len(queries) / 4:.3f}")


if __name__ == "__main__":
    main()
