"""Microbenchmarks of the native core (pytest-benchmark): not part of the test suite.

    pytest bench/test_micro.py --benchmark-only
    pytest bench/test_micro.py --benchmark-only -k kernel --benchmark-columns=mean,ops

* kernel throughput per instruction set: one query against a block of rows through
  ``_core.kernel_batch`` (the loop the graph search runs), for every ISA this CPU and this
  build support; ``extra_info`` carries distances/s and GB/s of vector data read;
* add throughput: building a fresh index of 5,000 vectors, one and two threads;
* search QPS: one query per call (the cache's case) and a batch on two threads.

Add and search run once per ISA: ``HNSWCACHE_ISA`` is read when an Index is created, so the
benchmark sets it before constructing one and checks ``Index.isa`` to be sure which kernel
ran. Data: the first rows of ../shared/data/sgd when present, clustered random vectors
otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

hnswcache = pytest.importorskip("hnswcache")
_core = pytest.importorskip("hnswcache._core")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"
ISAS = list(_core.supported_isas())
DIM = 384


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _vectors(n: int, seed: int) -> np.ndarray:
    path = DATA / "base_f16.npy"
    if path.exists():
        base = np.load(path, mmap_mode="r")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(base.shape[0], n, replace=False))
        return _normalise(np.asarray(base[rows], dtype=np.float32))
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, n // 500), DIM)).astype(np.float32)
    x = centres[rng.integers(0, centres.shape[0], n)]
    return _normalise(x + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32))


def _queries(n: int) -> np.ndarray:
    path = DATA / "queries.npy"
    if path.exists():
        return _normalise(np.load(path)[:n])
    return _vectors(n, seed=7)


def _index_with_isa(isa: str, **kwargs) -> hnswcache.Index:
    """An Index whose distance kernel is ``isa`` (skips if the core would not honour it)."""
    old = os.environ.get("HNSWCACHE_ISA")
    os.environ["HNSWCACHE_ISA"] = isa
    try:
        index = hnswcache.Index(DIM, **kwargs)
    finally:
        if old is None:
            del os.environ["HNSWCACHE_ISA"]
        else:
            os.environ["HNSWCACHE_ISA"] = old
    if index.isa != isa:
        pytest.skip(f"asked for {isa}, the index runs {index.isa}: "
                    f"run with HNSWCACHE_ISA={isa} set before Python starts")
    return index


def _mean(benchmark) -> float:
    """Mean seconds per call; NaN when timing is off (``--benchmark-disable`` runs each
    benchmark once as a plain test)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats else float("nan")


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("rows", [256, 4096], ids=["L2-resident", "from-L3"])
@pytest.mark.parametrize("op", ["dot", "l2sq"])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_batch(benchmark, isa: str, op: str, rows: int) -> None:
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((rows, DIM)).astype(np.float32)
    q = rng.standard_normal(DIM).astype(np.float32)
    out = benchmark(_core.kernel_batch, isa, op, q, xs)
    assert out.shape == (rows,)
    mean = _mean(benchmark)
    benchmark.extra_info["distances_per_s"] = rows / mean
    benchmark.extra_info["GB_per_s"] = rows * DIM * 4 / mean / 1e9


@pytest.mark.parametrize("dim", [1, 15, 97, 384, 1025])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_batch_odd_dims(benchmark, isa: str, dim: int) -> None:
    """Tails matter: odd dimensions run the masked/remainder path of each kernel."""
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((1024, dim)).astype(np.float32)
    q = rng.standard_normal(dim).astype(np.float32)
    benchmark(_core.kernel_batch, isa, "dot", q, xs)
    benchmark.extra_info["distances_per_s"] = 1024 / _mean(benchmark)


# ----------------------------------------------------------------------------- add
@pytest.fixture(scope="module")
def add_data() -> np.ndarray:
    return _vectors(5000, seed=1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_add_throughput(benchmark, isa: str, threads: int, add_data: np.ndarray) -> None:
    labels = np.arange(add_data.shape[0], dtype=np.int64)

    def setup():
        return (_index_with_isa(isa, capacity=add_data.shape[0]),), {}

    def build(index):
        index.add(add_data, labels, num_threads=threads)

    benchmark.pedantic(build, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["vectors_per_s"] = add_data.shape[0] / _mean(benchmark)


# ----------------------------------------------------------------------------- search
@pytest.fixture(scope="module", params=ISAS)
def search_index(request) -> Iterator[tuple[str, hnswcache.Index]]:
    isa = request.param
    x = _vectors(20_000, seed=2)
    index = _index_with_isa(isa, capacity=x.shape[0])
    index.add(x, np.arange(x.shape[0], dtype=np.int64), num_threads=2)
    yield isa, index


@pytest.mark.parametrize("ef", [16, 64, 128])
def test_search_single_query(benchmark, search_index, ef: int) -> None:
    """One query per call from Python: what a cache lookup costs, wrapper included."""
    isa, index = search_index
    qs = list(_queries(200))

    def run():
        for q in qs:
            index.search(q, 10, ef=ef, num_threads=1)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["isa"] = isa
    benchmark.extra_info["qps"] = len(qs) / _mean(benchmark)


def test_search_batch(benchmark, search_index) -> None:
    """1,000 queries in one call on two threads (GIL released, thread pool)."""
    isa, index = search_index
    qs = _queries(1000)
    benchmark.pedantic(index.search, args=(qs, 10), kwargs={"ef": 64, "num_threads": 2},
                       rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["isa"] = isa
    benchmark.extra_info["qps"] = qs.shape[0] / _mean(benchmark)
