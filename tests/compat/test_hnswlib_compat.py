"""hnswcache.compat.hnswlib behaves like hnswlib 0.8.0.

Every scenario in ``test_*`` taking the ``hl`` fixture runs against each implementation that
is importable: our module always, the real ``hnswlib`` package when it is installed. The
expectations are hard-coded (they are hnswlib's observed behaviour), so on a machine without
hnswlib the same assertions still check our module, and with it they prove both agree.
Tests named ``*_ours`` cover what real hnswlib cannot be asked safely (it crashes the
interpreter before ``init_index`` or on a query of the wrong dimension).
"""

from __future__ import annotations

import copy
import pickle
import struct
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import hnswcache
import hnswcache.compat.hnswlib as ours

IMPLS: dict[str, ModuleType] = {"hnswcache": ours}
try:
    import hnswlib as real_hnswlib

    IMPLS["hnswlib"] = real_hnswlib
except ImportError:  # the same assertions then run against our module alone
    real_hnswlib = None

SPACES = ("l2", "ip", "cosine")


@pytest.fixture(params=sorted(IMPLS))
def hl(request: pytest.FixtureRequest) -> ModuleType:
    return IMPLS[request.param]


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters: an embedding-like workload."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).standard_normal((40, dim)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(base: np.ndarray, queries: np.ndarray, k: int, space: str) -> np.ndarray:
    """Indices of the exact k nearest rows under hnswlib's distance of ``space``."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if space == "l2":
        d = (q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None, :]
    else:
        if space == "cosine":
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = 1.0 - q @ b.T
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def build(hl: ModuleType, space: str = "l2", dim: int = 4, n: int = 0, max_elements: int = 100,
          **kw: Any) -> Any:
    p = hl.Index(space, dim)
    p.init_index(max_elements, **kw)
    if n:
        p.add_items(np.arange(n * dim, dtype=np.float32).reshape(n, dim))
    return p


# ---------------------------------------------------------------------- construction
def test_unknown_space_is_a_runtime_error(hl: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="Space name must be one of l2, ip, or cosine"):
        hl.Index("euclid", 4)
    with pytest.raises(RuntimeError):
        hl.BFIndex("dot", 4)


def test_properties_before_and_after_init(hl: ModuleType) -> None:
    p = hl.Index("cosine", 8)
    assert (p.space, p.dim, p.M, p.ef_construction, p.max_elements, p.element_count) == (
        "cosine", 8, 0, 0, 0, 0)
    assert p.ef == 10
    assert p.num_threads >= 1
    assert repr(p) == "<hnswlib.Index(space='cosine', dim=8)>"
    p.set_ef(42)  # allowed before init_index and kept
    p.init_index(max_elements=50, M=8, ef_construction=60, random_seed=1)
    assert (p.M, p.ef_construction, p.max_elements, p.element_count, p.ef) == (8, 60, 50, 0, 42)
    assert (p.get_max_elements(), p.get_current_count()) == (50, 0)
    with pytest.raises(RuntimeError, match="already initiated"):
        p.init_index(10)
    with pytest.raises(AttributeError):
        p.space = "l2"


def test_ef_and_num_threads_settings(hl: ModuleType) -> None:
    p = build(hl, n=10)
    p.set_ef(33)
    assert p.ef == 33
    p.ef = 44
    assert p.ef == 44
    p.set_num_threads(3)
    assert p.num_threads == 3
    p.num_threads = 1
    assert p.num_threads == 1
    with pytest.raises(TypeError):
        p.set_ef(-1)
    with pytest.raises(TypeError):
        p.knn_query(np.zeros(4), k=-1)
    with pytest.raises(TypeError):
        p.knn_query(np.zeros(4), k=2.0)
    p.set_ef(0)  # ef below k is raised to k
    labels, _ = p.knn_query(np.zeros(4), k=3)
    assert labels.tolist() == [[0, 1, 2]]


def test_out_of_range_sizes_fail_where_hnswlibs_binding_does(hl: ModuleType) -> None:
    """From a differential review: ef = 2**64 was accepted and every later query failed
    with InvalidVectorsError ("refused vector row"); k = 2**31 was one too; a huge ef
    that hnswlib takes made every query fail."""
    p = build(hl, n=10)
    with pytest.raises(TypeError):
        p.ef = 2**64
    with pytest.raises(TypeError):
        p.set_num_threads(2**40)
    with pytest.raises(TypeError):
        p.knn_query(np.zeros(4), k=1, num_threads=2**40)
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        p.knn_query(np.zeros(4), k=2**31)
    p.ef = 2**40  # (searches as any ef past the count does)
    assert p.knn_query(np.zeros(4), k=3)[0].tolist() == [[0, 1, 2]]


# ---------------------------------------------------------------------- distances
@pytest.mark.parametrize("space", SPACES)
def test_distances_dtypes_and_shapes(hl: ModuleType, space: str) -> None:
    data = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]], dtype=np.float64)
    p = hl.Index(space, 3)
    p.init_index(10)
    p.add_items(data)
    q = np.array([[1.0, 0.5, 0.0], [0.0, 0.1, 1.0]])
    labels, dist = p.knn_query(q, k=4)
    assert labels.dtype == np.uint64 and dist.dtype == np.float32
    assert labels.shape == dist.shape == (2, 4)
    for r in range(2):
        for lab, d in zip(labels[r], dist[r]):
            x, y = data[int(lab)], q[r]
            if space == "l2":
                want = ((x - y) ** 2).sum()
            elif space == "ip":
                want = 1 - x @ y
            else:
                want = 1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y)
            assert d == pytest.approx(want, abs=1e-5)
        assert np.all(np.diff(dist[r]) >= 0)


def test_cosine_stores_normalised_vectors_and_accepts_zero(hl: ModuleType) -> None:
    p = hl.Index("cosine", 2)
    p.init_index(5)
    p.add_items([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(p.get_items([0]), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(p.get_items([1]), [[0.0, 0.0]])
    labels, dist = p.knn_query([1.0, 0.0], k=2)
    assert labels.tolist() == [[0, 1]]
    np.testing.assert_allclose(dist, [[0.4, 1.0]], rtol=1e-6)


# ---------------------------------------------------------------------- inputs
def test_accepted_inputs(hl: ModuleType) -> None:
    p = build(hl, dim=3, max_elements=20)
    p.add_items([1, 2, 3])  # a 1-D single vector
    p.add_items([[4, 5, 6], [7, 8, 9]])  # lists of ints
    p.add_items(np.ones((2, 3), dtype=np.float64), np.array([10, 11], dtype=np.int32))
    p.add_items(np.full(3, 5.0), 12)  # a scalar label for a single row
    assert sorted(p.get_ids_list()) == [0, 1, 2, 10, 11, 12]
    labels, dist = p.knn_query([1, 2, 3])  # 1-D query, default k=1
    assert labels.shape == (1, 1) and labels[0, 0] == 0 and dist[0, 0] == 0
    labels, _ = p.knn_query(np.empty((0, 3)), k=2)
    assert labels.shape == (0, 2)
    labels, dist = p.knn_query(np.zeros((2, 3)), k=0)
    assert labels.shape == dist.shape == (2, 0)


def test_rejected_inputs(hl: ModuleType) -> None:
    p = build(hl, dim=3, max_elements=20)
    with pytest.raises(RuntimeError, match="Wrong dimensionality"):
        p.add_items(np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="Data must be a 1D or 2D array"):
        p.add_items(np.ones((2, 2, 3)))
    with pytest.raises(RuntimeError, match="does not match the input data vector shape"):
        p.add_items(np.ones((2, 3)), [1, 2, 3])
    # hnswlib 0.8.0 reads labels as a 1-D array: an (n, 1) column is rejected
    with pytest.raises(RuntimeError, match="does not match the input data vector shape"):
        p.add_items(np.ones((2, 3)), np.array([[1], [2]]))
    with pytest.raises(OverflowError):
        p.add_items(np.ones((1, 3)), [-1])
    with pytest.raises(ValueError):
        p.add_items([["a", "b", "c"]])
    with pytest.raises(RuntimeError, match="Data must be a 1D or 2D array"):
        p.knn_query(np.ones((1, 1, 3)))
    assert p.get_current_count() == 0


# ---------------------------------------------------------------------- labels and counting
def test_running_counter_counts_every_row(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=100)
    p.add_items(np.ones((3, 2)))  # 0, 1, 2
    p.add_items(np.ones((2, 2)), [50, 51])  # explicit ids advance the counter too
    p.add_items(np.ones((1, 2)))  # -> 5
    with pytest.raises(RuntimeError):
        p.add_items(np.ones((1, 3)))  # a failed call does not advance it
    p.add_items(np.ones((1, 2)))  # -> 6
    assert sorted(p.get_ids_list()) == [0, 1, 2, 5, 6, 50, 51]


def test_existing_label_is_updated_not_counted(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=3)
    p.add_items([[0, 0], [1, 1], [2, 2]])
    p.add_items([[9, 9]], [1])  # full, but an update needs no room
    assert p.get_current_count() == 3
    np.testing.assert_array_equal(p.get_items([1]), [[9, 9]])
    labels, _ = p.knn_query([9, 9], k=1)
    assert labels[0, 0] == 1


def test_repeated_label_in_one_batch_keeps_the_last_row(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=10)
    p.add_items([[1, 1], [2, 2], [3, 3]], [7, 7, 8])
    assert p.get_current_count() == 2
    np.testing.assert_array_equal(p.get_items([7, 8]), [[2, 2], [3, 3]])


def test_capacity_inserts_what_fits_then_raises(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=4)
    p.add_items([[0, 0], [1, 1]])
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        p.add_items([[2, 2], [3, 3], [4, 4]], [10, 11, 12])
    assert p.get_current_count() == 4
    assert sorted(p.get_ids_list()) == [0, 1, 10, 11]
    with pytest.raises(RuntimeError, match="Cannot resize"):
        p.resize_index(3)
    p.resize_index(6)
    assert (p.max_elements, p.get_max_elements()) == (6, 6)
    p.add_items([[5, 5], [6, 6]])  # counter: 2 + (failed call not counted) -> 2, 3
    assert sorted(p.get_ids_list()) == [0, 1, 2, 3, 10, 11]
    with pytest.raises(RuntimeError):
        p.add_items([[7, 7]])


def test_fewer_than_k_results_is_a_runtime_error(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=10)
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        p.knn_query([0, 0], k=1)  # empty index
    p.add_items([[0, 0], [1, 1], [2, 2]])
    assert p.knn_query([0, 0], k=3)[0].shape == (1, 3)
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        p.knn_query([0, 0], k=4)


# ---------------------------------------------------------------------- get_items / ids
def test_get_items(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=10)
    p.add_items([[1, 2], [3, 4]], [5, 6])
    got = p.get_items([6, 5])
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, [[3, 4], [1, 2]])
    assert p.get_items(np.array([5]), return_type="list") == [[1.0, 2.0]]
    np.testing.assert_array_equal(p.get_items([5, 5]), [[1, 2], [1, 2]])
    np.testing.assert_array_equal(p.get_items(np.array([[6], [5]])), [[3, 4], [1, 2]])
    empty = p.get_items()
    assert isinstance(empty, np.ndarray) and empty.size == 0
    assert p.get_items(return_type="list") == []
    with pytest.raises(RuntimeError, match="Label not found"):
        p.get_items([99])
    with pytest.raises(ValueError, match="return_type"):
        p.get_items([5], return_type="tensor")
    with pytest.raises(ValueError, match="accepts a list of indices"):
        p.get_items(5)
    ids = p.get_ids_list()
    assert sorted(ids) == [5, 6] and all(type(i) is int for i in ids)


# ---------------------------------------------------------------------- deletion
def test_mark_and_unmark_deleted(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=10)
    p.add_items([[0, 0], [1, 1], [2, 2], [3, 3]])
    p.mark_deleted(1)
    assert p.get_current_count() == p.element_count == 4  # still counted
    assert sorted(p.get_ids_list()) == [0, 1, 2, 3]  # and listed
    labels, _ = p.knn_query([1, 1], k=3)
    assert 1 not in labels
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        p.knn_query([1, 1], k=4)
    with pytest.raises(RuntimeError, match="Label not found"):
        p.get_items([1])
    with pytest.raises(RuntimeError, match="already deleted"):
        p.mark_deleted(1)
    with pytest.raises(RuntimeError, match="Label not found"):
        p.mark_deleted(42)
    with pytest.raises(RuntimeError, match="not deleted"):
        p.unmark_deleted(2)
    with pytest.raises(RuntimeError, match="Label not found"):
        p.unmark_deleted(42)
    p.mark_deleted(np.uint64(3))
    p.unmark_deleted(1)
    labels, dist = p.knn_query([1, 1], k=1)
    assert (labels[0, 0], dist[0, 0]) == (1, 0.0)
    np.testing.assert_array_equal(p.get_items([1]), [[1, 1]])


def test_adding_a_deleted_label_revives_it(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=10)
    p.add_items([[0, 0], [1, 1], [2, 2]])
    p.mark_deleted(1)
    p.add_items([[5, 5]], [1])
    assert p.get_current_count() == 3
    labels, dist = p.knn_query([5, 5], k=1)
    assert (labels[0, 0], dist[0, 0]) == (1, 0.0)


def test_replace_deleted(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=3)
    p.add_items([[0, 0], [1, 1], [2, 2]])
    p.mark_deleted(0)
    with pytest.raises(RuntimeError, match="disabled in constructor"):
        p.add_items([[3, 3]], [7], replace_deleted=True)

    r = build(hl, dim=2, max_elements=3, allow_replace_deleted=True)
    r.add_items([[0, 0], [1, 1], [2, 2]])
    with pytest.raises(RuntimeError, match="exceeds"):
        r.add_items([[3, 3]], [7])
    r.mark_deleted(0)
    r.add_items([[3, 3]], [7], replace_deleted=True)  # takes the deleted element's place
    assert r.get_current_count() == 3
    assert sorted(r.get_ids_list()) == [1, 2, 7]
    with pytest.raises(RuntimeError, match="exceeds"):
        r.add_items([[4, 4]], [8], replace_deleted=True)  # no deleted place left
    r.mark_deleted(7)
    with pytest.raises(RuntimeError, match="update deleted elements"):
        r.add_items([[4, 4]], [7])
    r.add_items([[4, 4]], [7], replace_deleted=True)
    labels, dist = r.knn_query([4, 4], k=1)
    assert (labels[0, 0], dist[0, 0]) == (7, 0.0)


# ---------------------------------------------------------------------- filter
def test_filter(hl: ModuleType) -> None:
    p = build(hl, dim=2, max_elements=300)
    p.add_items(np.arange(400, dtype=np.float32).reshape(200, 2))
    labels, _ = p.knn_query(np.zeros((3, 2)), k=5, filter=lambda label: label % 7 == 3)
    assert labels.tolist() == [[3, 10, 17, 24, 31]] * 3
    labels, _ = p.knn_query([0, 0], k=2, num_threads=1, filter=lambda label: label in (150, 199))
    assert labels.tolist() == [[150, 199]]
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        p.knn_query([0, 0], k=3, filter=lambda label: label in (150, 199))


# ---------------------------------------------------------------------- persistence
def test_save_and_load(hl: ModuleType, tmp_path: Path) -> None:
    path = str(tmp_path / "index.bin")
    p = build(hl, "cosine", dim=4, max_elements=20)
    data = clustered(10, 4)
    p.add_items(data)
    p.mark_deleted(3)
    p.set_ef(77)
    p.save_index(path)

    q = hl.Index("cosine", 4)
    q.load_index(path)
    assert (q.max_elements, q.element_count, q.M, q.ef_construction) == (20, 10, 16, 200)
    assert q.ef == 10  # a loaded index starts again from ef = 10
    assert sorted(q.get_ids_list()) == list(range(10))
    with pytest.raises(RuntimeError, match="Label not found"):
        q.get_items([3])
    q.unmark_deleted(3)  # deletion marks survive, with the vector
    np.testing.assert_allclose(q.get_items([3]), data[3:4], rtol=1e-6)
    q.add_items(data[:1])  # the counter restarts at the element count
    assert 10 in q.get_ids_list()
    labels, _ = q.knn_query(data[1:5], k=1)
    assert labels[:, 0].tolist() == [1, 2, 3, 4]

    for asked, kept in ((0, 20), (5, 20), (50, 50)):
        r = hl.Index("cosine", 4)
        r.load_index(path, max_elements=asked)
        assert r.get_max_elements() == kept
    q.load_index(path)  # into an initialised index: replaces it
    assert q.get_current_count() == 10
    with pytest.raises(RuntimeError, match="Cannot open file"):
        hl.Index("l2", 4).load_index(str(tmp_path / "missing.bin"))
    (tmp_path / "junk.bin").write_bytes(b"xx")
    with pytest.raises(RuntimeError):
        hl.Index("l2", 4).load_index(str(tmp_path / "junk.bin"))


@pytest.mark.parametrize("state", ["uninitialised", "empty", "full", "deleted"])
def test_pickle(hl: ModuleType, state: str) -> None:
    p = hl.Index("l2", 4)
    p.set_ef(25)
    p.set_num_threads(3)
    data = clustered(8, 4)
    if state != "uninitialised":
        p.init_index(8, allow_replace_deleted=True)
    if state in ("full", "deleted"):
        p.add_items(data, [10, 11, 12, 13, 14, 15, 16, 17])
    if state == "deleted":
        p.mark_deleted(12)
    q = pickle.loads(pickle.dumps(p))
    assert (q.space, q.dim, q.ef, q.num_threads) == ("l2", 4, 25, 3)
    assert (q.max_elements, q.element_count) == (p.max_elements, p.element_count)
    if state == "uninitialised":
        assert q.max_elements == 0
        return
    assert sorted(q.get_ids_list()) == sorted(p.get_ids_list())
    if state == "empty":
        q.add_items(data[:2])
        assert sorted(q.get_ids_list()) == [0, 1]
        return
    np.testing.assert_array_equal(q.knn_query(data, k=3)[0], p.knn_query(data, k=3)[0])
    c = copy.deepcopy(p)
    assert c.element_count == 8
    if state == "deleted":
        q.add_items(data[:1], [40], replace_deleted=True)  # allow_replace_deleted survives
        assert sorted(q.get_ids_list()) == [10, 11, 13, 14, 15, 16, 17, 40]
        p.unmark_deleted(12)
        assert 12 not in q.knn_query(data[2], k=1)[0]  # the copy is independent
    else:
        q.resize_index(9)
        q.add_items(data[:1])  # the counter restarts at the element count
        assert 8 in q.get_ids_list()


# ---------------------------------------------------------------------- quality
@pytest.mark.parametrize("space", SPACES)
def test_recall_against_exact_search(hl: ModuleType, space: str) -> None:
    base, queries = clustered(3000, 24, seed=1), clustered(200, 24, seed=2)
    if space == "ip":
        base = base * np.random.default_rng(3).uniform(0.5, 1.5, (3000, 1)).astype(np.float32)
    p = hl.Index(space, 24)
    p.init_index(3000, M=16, ef_construction=100)
    p.add_items(base)
    p.set_ef(100)
    labels, _ = p.knn_query(queries, k=10)
    assert recall(labels, exact(base, queries, 10, space)) >= 0.97


REFERENCES = ["exact search"] + (["hnswlib"] if real_hnswlib is not None else [])


@pytest.mark.parametrize("reference", REFERENCES)
def test_same_answers_as_reference(reference: str) -> None:
    """Where search is exact (small index, large ef) ours gives the reference's labels
    (real hnswlib's when installed, brute force always), and under deletions and updates the
    same ids and counts."""
    data = clustered(300, 8, seed=5)
    updates = clustered(20, 8, seed=99)
    deleted = list(range(0, 280, 7))

    def scenario(hl: ModuleType) -> tuple[np.ndarray, np.ndarray, list[int], int]:
        p = hl.Index("cosine", 8)
        p.init_index(400)
        p.add_items(data)
        for label in deleted:
            p.mark_deleted(label)
        p.add_items(updates, np.arange(280, 300))
        p.set_ef(400)
        labels, dist = p.knn_query(data[::3], k=5)
        return labels, dist, sorted(p.get_ids_list()), p.get_current_count()

    labels, dist, ids, count = scenario(ours)
    assert (ids, count) == (list(range(300)), 300)
    if reference == "hnswlib":
        assert real_hnswlib is not None
        ref_labels, ref_dist, ref_ids, ref_count = scenario(real_hnswlib)
        assert (ref_ids, ref_count) == (ids, count)
    else:
        live = np.array([i for i in range(300) if i not in set(deleted)])
        current = data.copy()
        current[280:] = updates
        order = exact(current[live], data[::3], 5, "cosine")
        ref_labels = live[order].astype(np.uint64)
        unit = current / np.linalg.norm(current, axis=1, keepdims=True)
        q = data[::3] / np.linalg.norm(data[::3], axis=1, keepdims=True)
        ref_dist = 1.0 - np.einsum("qkd,qd->qk", unit[ref_labels.astype(np.int64)], q)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)


def test_hnswlib_readme_example_runs_unchanged(hl: ModuleType) -> None:
    """hnswlib's README example, line for line (only the import differs)."""
    dim, num_elements = 16, 1000
    data = np.float32(np.random.default_rng(0).random((num_elements, dim)))
    ids = np.arange(num_elements)
    p = hl.Index(space="l2", dim=dim)
    p.init_index(max_elements=num_elements, ef_construction=200, M=16)
    p.add_items(data, ids)
    p.set_ef(50)
    labels, distances = p.knn_query(data, k=1)
    assert np.mean(labels.reshape(-1) == ids) > 0.99
    p_copy = pickle.loads(pickle.dumps(p))
    assert p_copy.element_count == num_elements and p_copy.ef == 50
    labels2, _ = p_copy.knn_query(data, k=1)
    np.testing.assert_array_equal(labels, labels2)


def test_concurrent_adds_and_queries(hl: ModuleType) -> None:
    p = build(hl, dim=8, max_elements=4000)
    data = clustered(4000, 8, seed=9)
    errors: list[BaseException] = []

    def work(part: int) -> None:
        try:
            rows = np.arange(part * 1000, (part + 1) * 1000)
            for chunk in np.array_split(rows, 10):
                p.add_items(data[chunk], chunk, num_threads=1)
                p.knn_query(data[chunk[:5]], k=1, num_threads=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert p.get_current_count() == 4000
    p.set_ef(64)
    labels, _ = p.knn_query(data[:200], k=1)
    assert np.mean(labels[:, 0] == np.arange(200)) > 0.98


# ---------------------------------------------------------------------- BFIndex
@pytest.mark.parametrize("space", SPACES)
def test_bf_index_is_exact(hl: ModuleType, space: str) -> None:
    base, queries = clustered(500, 12, seed=4), clustered(30, 12, seed=6)
    b = hl.BFIndex(space, 12)
    b.init_index(600)
    b.add_items(base)
    assert (b.get_max_elements(), b.get_current_count()) == (600, 500)
    labels, dist = b.knn_query(queries, k=5)
    assert labels.dtype == np.uint64 and dist.dtype == np.float32 and labels.shape == (30, 5)
    assert recall(labels, exact(base, queries, 5, space)) == 1.0


def test_bf_index_updates_deletes_and_limits(hl: ModuleType, tmp_path: Path) -> None:
    b = hl.BFIndex("l2", 2)
    assert repr(b) == "<hnswlib.BFIndex(space='l2', dim=2)>"
    b.init_index(3)
    with pytest.raises(RuntimeError, match="already initiated"):
        b.init_index(3)
    b.add_items([[0, 0], [1, 1]])
    b.add_items([[5, 5]], [0])  # overwrite
    assert b.get_current_count() == 2
    assert b.knn_query([5, 5], k=1)[0].tolist() == [[0]]
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        b.add_items([[2, 2], [3, 3]])  # labels 3 (fits) and 4
    assert b.get_current_count() == 3
    b.delete_vector(1)  # frees its place
    b.delete_vector(99)  # unknown: ignored
    assert b.get_current_count() == 2
    labels, dist = b.knn_query([[0, 0]], k=1, filter=lambda label: label != 0)
    assert labels.tolist()[0][0] == 3 and dist[0, 0] == 8
    with pytest.raises(RuntimeError, match="Wrong dimensionality"):
        b.add_items([[1, 2, 3]])
    b.set_num_threads(2)
    assert b.num_threads == 2
    path = str(tmp_path / "bf.bin")
    b.save_index(path)
    c = hl.BFIndex("l2", 2)
    c.load_index(path)
    assert (c.get_current_count(), c.get_max_elements()) == (2, 3)
    np.testing.assert_array_equal(c.knn_query([[0, 0]], k=2)[0], b.knn_query([[0, 0]], k=2)[0])


def test_bf_index_l2_is_exact_where_float32_sums_cancel(hl: ModuleType) -> None:
    """Rows far from the origin and close to each other: |x|^2 + |q|^2 - 2 x.q in float32
    loses every digit that tells them apart (hnswlib sums the squared differences). The
    answer must be float64 brute force's, labels and distances."""
    rng = np.random.default_rng(11)
    dim = 64
    offset = rng.uniform(500, 1000, dim).astype(np.float32)
    base = offset + rng.uniform(-0.05, 0.05, (400, dim)).astype(np.float32)
    queries = offset + rng.uniform(-0.05, 0.05, (20, dim)).astype(np.float32)
    b = hl.BFIndex("l2", dim)
    b.init_index(400)
    b.add_items(base)
    labels, dist = b.knn_query(queries, k=5)
    diff = queries.astype(np.float64)[:, None, :] - base.astype(np.float64)[None, :, :]
    d64 = (diff ** 2).sum(-1)
    truth = np.argsort(d64, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_allclose(dist, np.take_along_axis(d64, truth, axis=1), rtol=1e-4)


def test_bf_index_answers_from_rows_as_they_are_under_concurrent_writes_ours() -> None:
    """Queries read the rows in place while other threads add, overwrite and delete: every
    answer is a label with its own vector's distance (a row moved by a delete while a query
    scanned it would pair one label with another's vector), and neither side starves: the
    lock lets the waiting queries in between writes (with writers preferred outright, 8
    writing threads left 2 queries answered in 2 s)."""
    rng = np.random.default_rng(12)
    dim = 32
    vecs = rng.standard_normal((600, dim)).astype(np.float32)  # label i's vector: vecs[i]
    b = ours.BFIndex("l2", dim)
    b.init_index(600)
    b.add_items(vecs[:300], np.arange(300))
    stop = threading.Event()
    errors: list[str] = []
    answered = [0, 0]
    writes = [0] * 6

    def writer(w: int) -> None:
        r = np.random.default_rng(w)
        try:
            while not stop.is_set():
                lab = int(r.integers(0, 600))
                if r.random() < 0.5:
                    b.add_items(vecs[lab], [lab])
                else:
                    b.delete_vector(lab)
                writes[w] += 1
        except BaseException as exc:  # noqa: BLE001 (reported below, not lost in a thread)
            errors.append(f"writer: {exc!r}")

    def reader(i: int) -> None:
        r = np.random.default_rng(10 + i)
        try:
            while not stop.is_set():
                q = r.standard_normal((int(r.integers(1, 4)), dim)).astype(np.float32)
                try:
                    labels, dist = b.knn_query(q, k=3)
                except RuntimeError:  # (fewer than 3 rows at that moment)
                    continue
                want = ((q[:, None, :].astype(np.float64)
                         - vecs[labels.astype(np.int64)]) ** 2).sum(-1)
                if not np.allclose(dist, want, rtol=1e-5, atol=1e-5):
                    errors.append(f"{labels.tolist()} {dist.tolist()} {want.tolist()}")
                answered[i] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"reader: {exc!r}")

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(6)]
    threads += [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    stop.wait(2.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors[:3]
    assert min(answered) >= 50 and min(writes) >= 50, (answered, writes)
    labels = np.arange(600)[[lab in b._where for lab in range(600)]]
    got, _ = b.knn_query(vecs[labels], k=1)
    assert got[:, 0].tolist() == labels.tolist()


def test_bf_index_input_conversion_may_query_the_index_ours() -> None:
    """add_items converts its arguments before it takes the lock: an array-like whose
    conversion queries the same index (or a logging handler) cannot deadlock it."""
    b = ours.BFIndex("l2", 2)
    b.init_index(10)
    b.add_items([[0.0, 0.0]])

    class Asks:
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            assert b.knn_query([[0.0, 0.0]], k=1)[0][0, 0] == 0
            return np.array([[3.0, 4.0]], dtype=dtype or np.float32)

    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(b.add_items(Asks()) is None), daemon=True)
    t.start()
    t.join(10)
    assert done == [True], "add_items with an array-like that queries the index hung"
    labels, dist = b.knn_query([[3.0, 4.0]], k=1)
    assert labels[0, 0] == 1 and dist[0, 0] == 0


@pytest.mark.parametrize("space", ["l2", "ip"])
def test_bf_index_rows_that_overflow_float32_are_still_ranked_and_filtered(
        hl: ModuleType, space: str) -> None:
    """A row whose float32 distance overflows (or holds inf) is ranked by its float64
    distance, and a row the filter refuses is never answered, however its float32
    distance came out (found by review: an inf row made the float32 bound infinite and
    let refused rows back in)."""
    huge = np.array([[1e20, 1e20], [0.0, 0.0], [1e19, 0.0]], dtype=np.float32)
    b = hl.BFIndex(space, 2)
    b.init_index(3)
    b.add_items(huge)
    labels, _ = b.knn_query(np.array([[1e20, 1e20]], dtype=np.float32), k=1)
    assert labels.tolist() == [[0]]  # l2: distance 0; ip: 1 - 2e40, the least
    rows = np.array([[-np.inf, 0], [1, 0], [2, 0], [0.9, 0]], dtype=np.float32)
    c = hl.BFIndex(space, 2)
    c.init_index(4)
    c.add_items(rows)
    q = np.array([[1, 0]] if space == "ip" else [[2, 0]], dtype=np.float32)
    labels, _ = c.knn_query(q, k=1, filter=lambda label: label != 2)
    assert labels.tolist() == [[1]]


def test_bf_index_filter_may_query_and_change_the_index_ours() -> None:
    """The filter runs outside the index's lock: it may query the index (no deadlock), and
    a row it deletes meanwhile is not answered (the rows are matched by label)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    b = ours.BFIndex("l2", 8)
    b.init_index(50)
    b.add_items(x)
    q = x[7] + 0.01
    nearest = exact(x, q[None], 50, "l2")[0].tolist()
    # The nearest admitted row after the query's own: deleted while the filter runs.
    doomed = next(lab for lab in nearest[1:] if lab % 5 != 3)

    def keep(label: int) -> bool:
        if label == 0:
            assert b.knn_query(x[0], k=1)[0][0, 0] == 0  # a query from inside the filter
            b.delete_vector(doomed)  # another row takes the deleted one's place
        return label % 5 != 3

    done: list[Any] = []
    t = threading.Thread(target=lambda: done.append(b.knn_query(q, k=4, filter=keep)),
                         daemon=True)
    t.start()
    t.join(10)
    assert done, "knn_query with a filter that queries the index did not return"
    labels, dist = done[0]
    want = [lab for lab in nearest if lab != doomed and lab % 5 != 3][:4]
    assert labels[0].tolist() == want
    np.testing.assert_allclose(dist[0], ((x[want] - q) ** 2).sum(1), rtol=1e-5)


# ---------------------------------------------------------------------- ours only
def test_calls_before_init_raise_instead_of_crashing_ours() -> None:
    p = ours.Index("l2", 4)
    for call in (
        lambda: p.add_items(np.zeros((1, 4))),
        lambda: p.knn_query(np.zeros(4)),
        lambda: p.get_items([0]),
        lambda: p.get_ids_list(),
        lambda: p.mark_deleted(0),
        lambda: p.unmark_deleted(0),
        lambda: p.resize_index(5),
        lambda: p.save_index("/nonexistent/x.bin"),
        lambda: p.get_max_elements(),
        lambda: p.get_current_count(),
    ):
        with pytest.raises(RuntimeError, match="not initialized"):
            call()
    b = ours.BFIndex("l2", 4)
    with pytest.raises(RuntimeError, match="not initialized"):
        b.add_items(np.zeros((1, 4)))
    with pytest.raises(RuntimeError, match="not initialized"):
        b.knn_query(np.zeros(4))


def test_guards_where_hnswlib_has_undefined_behaviour_ours(tmp_path: Path) -> None:
    p = build(ours, dim=4, n=5)
    with pytest.raises(RuntimeError, match="Wrong dimensionality"):
        p.knn_query(np.ones((1, 3)))
    with pytest.raises(OverflowError):
        p.add_items(np.ones((1, 4)), [2**63])
    b = ours.BFIndex("l2", 4)
    b.init_index(5)
    b.add_items(np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        b.knn_query(np.ones(4), k=3)
    p.save_index(str(tmp_path / "l2.bin"))
    with pytest.raises(RuntimeError, match="dimension"):
        ours.Index("ip", 4).load_index(str(tmp_path / "l2.bin"))
    b2 = pickle.loads(pickle.dumps(b))  # our BFIndex also pickles
    assert b2.get_current_count() == 2


def test_index_copy_constructor_ours() -> None:
    p = build(ours, dim=4, n=5)
    p.mark_deleted(2)
    q = ours.Index(p)
    r = ours.Index(index=p)
    for c in (q, r):
        assert c.element_count == 5 and sorted(c.get_ids_list()) == [0, 1, 2, 3, 4]
    q.unmark_deleted(2)
    with pytest.raises(RuntimeError):
        p.get_items([2])


def test_runs_on_the_native_index_ours() -> None:
    p = build(ours, "cosine", dim=4, n=3)
    assert isinstance(p._native, hnswcache.Index)
    assert p._native.metric == "ip"  # cosine = ip on vectors normalised like hnswlib


# ---------------------------------------------------------------------- hnswlib's files
def hnswlib_file(labels: list[int], vectors: np.ndarray, deleted: set[int], m: int = 16,
                 max_elements: int = 50) -> bytes:
    """The byte layout of hnswlib's ``saveIndex`` (a graph without links, which our loader
    ignores anyway: it rebuilds from the vectors)."""
    n, dim = vectors.shape
    max_m0 = 2 * m
    offset_data = 4 + 4 * max_m0
    label_offset = offset_data + 4 * dim
    size_data = label_offset + 8
    out = struct.pack("<6Q", 0, max_elements, n, size_data, label_offset, offset_data)
    out += struct.pack("<iI", 0, 0) + struct.pack("<3QdQ", m, max_m0, m, 1 / np.log(m), 200)
    for i in range(n):
        header = bytearray(4)
        header[2] = 1 if labels[i] in deleted else 0
        out += bytes(header) + bytes(4 * max_m0)
        out += vectors[i].astype(np.float32).tobytes() + struct.pack("<Q", labels[i])
    for _ in range(n):
        out += struct.pack("<I", 0)
    return out


WRITERS = ["by hand"] + (["by hnswlib"] if real_hnswlib is not None else [])


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_loads_files_written_by_hnswlib_ours(writer: str, space: str, tmp_path: Path) -> None:
    data = clustered(200, 8, seed=11)
    labels = list(range(1000, 1200))
    path = tmp_path / "hnswlib.bin"
    if writer == "by hnswlib":
        assert real_hnswlib is not None
        r = real_hnswlib.Index(space, 8)
        r.init_index(300)
        r.add_items(data, labels)
        r.mark_deleted(1005)
        r.save_index(str(path))
    else:
        stored = data / np.linalg.norm(data, axis=1, keepdims=True) if space == "cosine" else data
        path.write_bytes(hnswlib_file(labels, stored, {1005}, max_elements=300))
    p = ours.Index(space, 8)
    p.load_index(str(path))
    assert (p.get_max_elements(), p.get_current_count(), p.M) == (300, 200, 16)
    assert sorted(p.get_ids_list()) == labels
    with pytest.raises(RuntimeError, match="Label not found"):
        p.get_items([1005])
    p.set_ef(200)
    found, _ = p.knn_query(data, k=1)
    hits = found[:, 0].astype(np.int64) == np.array(labels)
    assert not hits[5] and 1005 not in found  # the deleted element is never returned
    assert hits.sum() >= 195  # every other element finds itself (ANN: a few may miss)
    with pytest.raises(RuntimeError, match="corrupted or unsupported"):
        ours.Index(space, 7).load_index(str(path))  # a dimension that does not fit the file


# ---------------------------------------------------------------- found by a review, 2026-12-05


def test_bf_knn_query_takes_num_threads_as_hnswlib(hl: ModuleType) -> None:
    bf = hl.BFIndex(space="l2", dim=4)
    bf.init_index(max_elements=10)
    bf.add_items(np.eye(4, dtype=np.float32), [0, 1, 2, 3])
    q = np.eye(4, dtype=np.float32)[:1]
    assert bf.knn_query(q, k=2, num_threads=2)[0][0, 0] == 0
    assert bf.knn_query(q, 2, 1, lambda label: label != 0)[0][0, 0] != 0


def test_index_file_size_is_what_save_index_writes(hl: ModuleType, tmp_path: Path) -> None:
    idx = hl.Index(space="l2", dim=8)
    idx.init_index(max_elements=100, M=8)
    idx.add_items(clustered(50, 8))
    idx.save_index(str(tmp_path / "i.bin"))
    assert idx.index_file_size() == (tmp_path / "i.bin").stat().st_size


def test_ef_construction_is_at_least_m_as_in_hnswlib(hl: ModuleType) -> None:
    idx = hl.Index(space="l2", dim=8)
    idx.init_index(max_elements=100, M=32, ef_construction=10)
    assert idx.ef_construction == 32


def test_get_items_reads_a_2d_id_array_as_hnswlib(hl: ModuleType) -> None:
    idx = hl.Index(space="l2", dim=4)
    idx.init_index(max_elements=10)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    idx.add_items(x, [0, 1, 2, 3, 4])
    got = np.asarray(idx.get_items(np.array([[1, 2], [3, 4]])))
    np.testing.assert_array_equal(got, x[[1, 2]])


def test_refused_rows_raise_an_error_both_value_and_runtime_ours() -> None:
    idx = ours.Index(space="l2", dim=4)
    idx.init_index(max_elements=10)
    bad = np.ones((4, 4), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(RuntimeError, match="NaN"):
        idx.add_items(bad)
    with pytest.raises(ValueError, match="NaN"):
        idx.add_items(bad)
    assert idx.get_current_count() == 0
    with pytest.raises(OverflowError, match="below 2"):
        idx.add_items(np.ones((1, 4), dtype=np.float32), [2**63 - 1])


def test_the_face_builds_with_hnswlibs_heuristic() -> None:
    # hnswcache.Index prunes with a slack (alpha 1.2) since 2026-12-05; the face promises
    # hnswlib's behaviour, so it builds with alpha 1, its files too.
    idx = ours.Index(space="cosine", dim=8)
    idx.init_index(max_elements=100)
    idx.add_items(clustered(50, 8))
    assert idx._idx().alpha == 1.0
    assert hnswcache.Index(8).alpha == 1.2


# ------------------------------------------------------------ found by a review, 2026-12-05 (2)
NAN_ROW = np.full((1, 4), np.nan, dtype=np.float32)


def state_of(p: Any) -> tuple[int, list[int], list[int], np.ndarray]:
    """What a caller can see: the count, the ids, those marked deleted, the others' vectors."""
    ids = sorted(p.get_ids_list())
    hidden = []
    for i in ids:
        try:
            p.get_items([i])
        except RuntimeError:
            hidden.append(i)
    vectors = np.asarray(p.get_items([i for i in ids if i not in hidden]))
    return p.element_count, ids, hidden, vectors


def test_a_refused_batch_leaves_deletions_and_vacancies_ours() -> None:
    x = clustered(10, 4)
    p = ours.Index("l2", 4)
    p.init_index(20)
    p.add_items(x)
    p.mark_deleted(3)
    before = state_of(p)
    with pytest.raises(ours.InvalidVectorsError):
        p.add_items(NAN_ROW, [3])  # would have revived the deleted label
    after = state_of(p)
    assert after[:3] == before[:3] and after[2] == [3]
    np.testing.assert_array_equal(after[3], before[3])
    with pytest.raises(RuntimeError, match="already deleted"):
        p.mark_deleted(3)
    p.unmark_deleted(3)  # its vector was kept
    np.testing.assert_array_equal(p.get_items([3]), x[3:4])

    r = ours.Index("l2", 4)
    r.init_index(10, allow_replace_deleted=True)
    r.add_items(x)
    r.mark_deleted(5)
    before = state_of(r)
    refused = [
        (NAN_ROW, [42]),  # a new label would take the deleted place
        (np.vstack([x[1:2], NAN_ROW]), [1, 2]),  # an update would move into it (a ghost)
    ]
    for rows, labels in refused:
        with pytest.raises(ours.InvalidVectorsError):
            r.add_items(rows, labels, replace_deleted=True)
        after = state_of(r)
        assert after[:3] == before[:3] and after[2] == [5]
        np.testing.assert_array_equal(after[3], before[3])
    r.add_items(x[:1] + 1, [43], replace_deleted=True)  # the vacancy is still there
    assert r.element_count == 10
    assert sorted(r.get_ids_list()) == sorted(set(range(10)) - {5} | {43})


@pytest.mark.parametrize("space", SPACES)
def test_a_refused_query_row_is_a_runtime_error_naming_the_row_ours(space: str) -> None:
    x = clustered(50, 4)
    p = ours.Index(space, 4)
    p.init_index(50)
    p.add_items(x)
    asked: list[int] = []

    def admit_all(label: int) -> bool:
        asked.append(label)
        return True

    nan_q = x[:3].copy()
    nan_q[1, 2] = np.nan
    bad = [(nan_q, "row 1 contains NaN or infinity")]
    if space != "cosine":  # (cosine queries are normalised first)
        huge_q = x[:3].copy()
        huge_q[2, 0] = 1e19
        bad.append((huge_q, "row 2 has a squared norm above 8.5e37"))
    for q, message in bad:
        for kw in ({}, {"filter": admit_all}):
            with pytest.raises(RuntimeError, match=message) as info:
                p.knn_query(q, k=2, **kw)
            assert isinstance(info.value, ours.InvalidVectorsError)
            assert isinstance(info.value, ValueError)
    assert asked == []  # the batch is refused before the filter is called
    if real_hnswlib is not None:  # the difference: hnswlib answers, with NaN distances
        h = real_hnswlib.Index(space, 4)
        h.init_index(50)
        h.add_items(x)
        assert np.isnan(h.knn_query(nan_q, k=2)[1][1]).all()


@pytest.mark.parametrize("writer", WRITERS)
def test_a_hnswlib_file_with_a_nan_row_is_refused_and_keeps_the_index_ours(
    writer: str, tmp_path: Path
) -> None:
    data = clustered(60, 4, seed=3)
    data[17] = np.nan
    labels = list(range(100, 160))
    paths = {}
    for name, deleted in (("live", set()), ("deleted", {117})):
        path = tmp_path / f"{name}.bin"
        if writer == "by hnswlib":
            assert real_hnswlib is not None
            r = real_hnswlib.Index("l2", 4)
            r.init_index(100)
            r.add_items(data, labels)
            for label in deleted:
                r.mark_deleted(label)
            r.save_index(str(path))
        else:
            path.write_bytes(hnswlib_file(labels, data, deleted, max_elements=100))
        paths[name] = str(path)

    p = ours.Index("l2", 4)
    p.init_index(10)
    p.add_items(data[:5], [0, 1, 2, 3, 4])
    p.mark_deleted(2)
    p.set_ef(33)
    before = state_of(p)
    with pytest.raises(RuntimeError, match=r"labels \[117\]") as info:
        p.load_index(paths["live"])
    assert isinstance(info.value, ours.InvalidVectorsError)
    after = state_of(p)
    assert after[:3] == before[:3] and (p.max_elements, p.ef) == (10, 33)
    np.testing.assert_array_equal(after[3], before[3])
    assert p.knn_query(data[1], k=1)[0].tolist() == [[1]]

    # marked deleted in the file, the NaN row is harmless: loaded, and never revived
    p.load_index(paths["deleted"])
    assert (p.element_count, sorted(p.get_ids_list())) == (60, labels)
    with pytest.raises(ours.InvalidVectorsError):
        p.unmark_deleted(117)
    with pytest.raises(RuntimeError, match="already deleted"):
        p.mark_deleted(117)
    assert p.element_count == 60


def test_a_damaged_file_of_ours_keeps_the_index_ours(tmp_path: Path) -> None:
    p = build(ours, dim=4, n=6, max_elements=10)
    p.mark_deleted(4)
    p.save_index(str(tmp_path / "good.bin"))
    data = (tmp_path / "good.bin").read_bytes()
    assert data.count(b'"ghosts"') == 1
    (tmp_path / "bad.bin").write_bytes(data.replace(b'"ghosts"', b'"ghostz"'))  # same length
    q = build(ours, dim=4, n=3, max_elements=7)
    before = state_of(q)
    with pytest.raises(RuntimeError, match="corrupted"):
        q.load_index(str(tmp_path / "bad.bin"))
    after = state_of(q)
    assert after[:3] == before[:3] and q.max_elements == 7
    np.testing.assert_array_equal(after[3], before[3])
    q.load_index(str(tmp_path / "good.bin"))
    assert state_of(q)[:3] == state_of(p)[:3]


def test_a_half_filter_asks_about_as_few_labels_as_hnswlib() -> None:
    """A filter admitting half the labels: the filter is called on a few candidates per
    query (as hnswlib does), not on every live label; recall stays hnswlib's."""
    n, dim, k, nq = 20000, 16, 10, 50
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    allowed = np.arange(0, n, 2)
    d = ((queries[:, None, :] - x[allowed][None, :, :]) ** 2).sum(-1)
    truth = allowed[np.argsort(d, axis=1)[:, :k]]

    def run(lib: ModuleType) -> tuple[int, float]:
        p = lib.Index("l2", dim)
        p.init_index(n, M=16, ef_construction=64)
        p.add_items(x)
        p.set_ef(64)
        calls = [0]

        def even(label: int) -> bool:
            calls[0] += 1
            return label % 2 == 0

        labels, _ = p.knn_query(queries, k=k, filter=even, num_threads=1)
        assert all(int(v) % 2 == 0 for v in labels.ravel())
        return calls[0], recall(labels, truth)

    calls, found = run(ours)
    assert calls <= nq * n // 50  # one call per live label in a few queries is past this
    assert found >= 0.95
    if real_hnswlib is not None:
        their_calls, their_found = run(real_hnswlib)
        assert calls <= 3 * their_calls
        assert found >= their_found - 0.02


def test_bf_cosine_distances_are_the_hnsw_indexs_ours() -> None:
    """Our BFIndex normalises a cosine query, as Index does (hnswlib 0.8.0's BFIndex does
    not, and returns 1 - |q| cos: a documented difference)."""
    base = clustered(200, 6, seed=8)
    queries = 3 * np.random.default_rng(8).standard_normal((10, 6)).astype(np.float32)
    b = ours.BFIndex("cosine", 6)
    b.init_index(200)
    b.add_items(base)
    h = ours.Index("cosine", 6)
    h.init_index(200)
    h.add_items(base)
    h.set_ef(200)
    labels, dist = b.knn_query(queries, k=5)
    h_labels, h_dist = h.knn_query(queries, k=5)
    np.testing.assert_array_equal(labels, h_labels)
    np.testing.assert_allclose(dist, h_dist, atol=1e-5)
    if real_hnswlib is not None:
        r = real_hnswlib.BFIndex("cosine", 6)
        r.init_index(200)
        r.add_items(base)
        r_labels, r_dist = r.knn_query(queries, k=5)
        np.testing.assert_array_equal(r_labels, labels)
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        np.testing.assert_allclose(r_dist, 1 - norms * (1 - dist), atol=1e-4)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, lambda b: pickle.loads(pickle.dumps(b))])
def test_a_bf_index_copy_is_independent_ours(how: Any) -> None:
    x = clustered(20, 4, seed=2)
    b = ours.BFIndex("l2", 4)
    b.init_index(30)
    b.add_items(x[:10])
    c = how(b)
    c.delete_vector(0)
    b.add_items(x[:1] + 5, [0])  # an update in the original
    c.add_items(x[10:12], [50, 51])
    assert (b.get_current_count(), c.get_current_count()) == (10, 11)
    labels, dist = b.knn_query(x[0] + 5, k=2)
    assert labels[0, 0] == 0 and dist[0, 0] == 0 and labels[0, 1] != 0
    labels, _ = c.knn_query(x[:10], k=1)
    assert 0 not in labels and labels[1:, 0].tolist() == list(range(1, 10))
    labels, _ = b.knn_query(x[10:12], k=1)
    assert 50 not in labels and 51 not in labels


def test_counts_and_ids_hold_while_another_thread_marks_and_unmarks() -> None:
    """hnswlib's count never moves when an element is marked or unmarked deleted; here the
    element left the core before it was recorded as deleted, and a reader in between saw
    2,001 or 1,999 elements (thousands of times in 15 s, in a review)."""
    rng = np.random.default_rng(8)
    x = rng.random((2000, 16), dtype=np.float32)
    p = ours.Index("l2", 16)
    p.init_index(4000)
    p.add_items(x, np.arange(2000))
    stop = threading.Event()
    wrong: list[str] = []

    def writer() -> None:
        r = np.random.default_rng(9)
        while not stop.is_set():
            lab = int(r.integers(0, 2000))
            p.mark_deleted(lab)
            p.unmark_deleted(lab)

    def reader() -> None:
        while not stop.is_set():
            c = p.get_current_count()
            ids = p.get_ids_list()
            if c != 2000 or p.element_count != 2000:
                wrong.append(f"count {c}")
            if len(ids) != 2000 or len(set(ids)) != 2000:
                wrong.append(f"ids {len(ids)} unique {len(set(ids))}")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    stop.wait(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]
