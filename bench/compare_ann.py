"""hnswcache against hnswlib, faiss (IndexHNSWFlat) and usearch on one dataset.

A thin wrapper: the code lives in ``hnswcache.benchmark`` (shared with the ``hnswcache bench``
command). This script keeps its command line and defaults to ``../shared/data/sgd``::

    python bench/compare_ann.py                       # ../shared/data/sgd
    python bench/compare_ann.py --synthetic 20000     # no data needed
    python bench/compare_ann.py --base b.npy --queries q.npy [--gt gt.npy]

(Run with the package installed, or ``PYTHONPATH=python`` from a clone with a built core.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from hnswcache import benchmark as _benchmark
from hnswcache.benchmark import *  # noqa: F403  (re-exported for bench/churn.py and others)
from hnswcache.benchmark import (  # noqa: F401  (explicit for readers and type checkers)
    ADAPTERS,
    LIBRARIES,
    THRESHOLDS,
    DatasetSpec,
    brute_force_knn,
    cpu_name,
    interpolated_table,
    load_vectors,
    markdown_table,
    plot_sweep,
    prepare_dataset,
    recall_at_k,
    rss_bytes,
    run_comparison,
    summarize,
    sweep_table,
    synthetic_vectors,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"
_benchmark.DEFAULT_DATA = DEFAULT_DATA


def main(argv: list[str] | None = None) -> int:
    return _benchmark.main(argv, prog="python bench/compare_ann.py")


if __name__ == "__main__":
    sys.exit(main())
