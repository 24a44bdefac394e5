"""How long an insert waits for the removal of the dead, inline against in the background.

An index of ``--n`` rows of ../shared/data/sgd (int8 rows, the cache's replica format)
whose oldest 12.5% have expired; then ``--adds`` single-row inserts in a loop, each timed,
with automatic consolidation at 10%:

* ``inline`` (``Index``'s default): the insert that finds the dead share past the
  threshold runs the pass itself;
* ``background`` (``background_consolidation=True``, what the cache's replicas use): that
  insert starts a thread for the pass, and the inserts go on while it computes its repairs.

Both modes start from the same graph (``to_bytes``/``from_bytes`` of one build) in one
process. Reported: the longest insert, inserts over 10 ms, p50/p99 of all inserts, and the
pass's own report (its time, and how long inserts and searches were held back by it).

Usage::

    python bench/consolidate_stall.py              # 100k rows, 3,000 inserts
    python bench/consolidate_stall.py --n 20000    # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import hnswcache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sgd" / "base_f16.npy"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(blob: bytes, x: np.ndarray, n: int, adds: int, background: bool) -> None:
    clock = Clock()
    idx = hnswcache.Index.from_bytes(blob, clock=clock, auto_consolidate=0.10)
    idx.background_consolidation = background
    clock.t = 2.0  # the first 12.5% (ttl 1) have expired
    lat = np.empty(adds)
    for j in range(adds):
        s = time.perf_counter()
        idx.add(x[n + j : n + j + 1], [n + j])
        lat[j] = time.perf_counter() - s
    idx.wait_for_consolidation()
    stats = idx.stats()
    ms = lat * 1e3
    name = "background" if background else "inline"
    print(f"{name:>10}: longest insert {ms.max():8.1f} ms, over 10 ms {int((ms > 10).sum()):3d}, "
          f"p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms; "
          f"dead after {stats['dead']}, free slots {stats['free']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--adds", type=int, default=3000)
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    x = np.load(a.data, mmap_mode="r")
    if x.ndim != 2 or x.shape[0] < a.n + a.adds:
        raise SystemExit(f"{a.data}: need at least {a.n + a.adds} rows, got shape {x.shape}")
    x = np.ascontiguousarray(x[: a.n + a.adds], dtype=np.float32)
    clock = Clock()
    idx = hnswcache.Index(x.shape[1], dtype="int8", clock=clock, auto_consolidate=None)
    ttl = np.where(np.arange(a.n) < a.n // 8, 1.0, 1e9)
    t0 = time.perf_counter()
    idx.add(x[: a.n], np.arange(a.n), ttl=ttl)
    print(f"{a.n} rows of {a.data.name} built in {time.perf_counter() - t0:.1f} s "
          f"(isa {idx.isa}); {a.adds} single-row inserts after 12.5% expired:")
    blob = idx.to_bytes()
    for background in (False, True):
        run(blob, x, a.n, a.adds, background)
    # The pass's own report, on a copy (the same work as both runs above did).
    clock2 = Clock()
    copy = hnswcache.Index.from_bytes(blob, clock=clock2, auto_consolidate=None)
    clock2.t = 2.0
    rep = copy.consolidate(num_threads=1)
    print("one pass, one thread: {seconds:.2f} s; searches held back {blocked_seconds:.3f} s, "
          "inserts {inserts_blocked_seconds:.3f} s; {removed} removed, {repaired} lists "
          "repaired".format(**rep))


if __name__ == "__main__":
    main()
