"""The hnswlib face's exact ``BFIndex`` on shapes other than 384-d embeddings, against
hnswlib's: tiny indexes, many queries against few rows, low-dimensional data far from the
origin (where the float32 ranking falls back to float64 throughout), integer-valued rows.

    python bench/bf_shapes.py

Median milliseconds of one ``knn_query`` call (the batch given at once) over a few
repetitions, each library on the same rows and queries. To time another version of the
face, put its ``python/`` folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from hnswcache.compat import hnswlib as face


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def median_ms(call: Callable[[], Any], reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    rng = np.random.default_rng(0)
    near = np.array([40.7, -74.0])  # latitude, longitude: far from the origin, close together
    cases = [
        ("n=10 d=16 cosine, 1 query, k=1", "cosine", unit(rng.standard_normal((10, 16))),
         unit(rng.standard_normal((1, 16))), 1, 2000),
        ("n=1000 d=64 l2, 10000 queries, k=10", "l2",
         rng.standard_normal((1000, 64)).astype(np.float32),
         rng.standard_normal((10000, 64)).astype(np.float32), 10, 3),
        ("n=100 d=8 l2, 100000 queries, k=1", "l2",
         rng.standard_normal((100, 8)).astype(np.float32),
         rng.standard_normal((100000, 8)).astype(np.float32), 1, 3),
        ("n=50000 d=384 cosine, 200 queries, k=10", "cosine",
         unit(rng.standard_normal((50000, 384))), unit(rng.standard_normal((200, 384))), 10, 3),
        ("lat/lon n=100000 d=2 l2, 1 query, k=5", "l2",
         (near + 0.1 * rng.standard_normal((100000, 2))).astype(np.float32),
         (near + 0.1 * rng.standard_normal((1, 2))).astype(np.float32), 5, 20),
        ("lat/lon n=100000 d=2 l2, 1000 queries, k=5", "l2",
         (near + 0.1 * rng.standard_normal((100000, 2))).astype(np.float32),
         (near + 0.1 * rng.standard_normal((1000, 2))).astype(np.float32), 5, 2),
        ("0..255 integers n=50000 d=128 l2, 1 query, k=10", "l2",
         rng.integers(0, 256, (50000, 128)).astype(np.float32),
         rng.integers(0, 256, (1, 128)).astype(np.float32), 10, 20),
    ]
    libs: dict[str, Any] = {"hnswcache (hnswlib face)": face}
    if importlib.util.find_spec("hnswlib"):
        import hnswlib

        libs["hnswlib"] = hnswlib
    print("| case | " + " | ".join(f"{name} ms" for name in libs) + " |")
    print("|---|" + "---:|" * len(libs))
    for name, space, base, queries, k, reps in cases:
        cells = []
        for mod in libs.values():
            b = mod.BFIndex(space, base.shape[1])
            b.init_index(len(base))
            b.add_items(base)
            cells.append(f"{median_ms(partial(b.knn_query, queries, k=k), reps):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
