"""hnswlib's ``BFIndex`` (exact search), in NumPy."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from ._hnswlib_common import (
    _E_CORRUPT,
    _E_FEW,
    _E_FULL,
    _E_INITED,
    _E_NOT_INIT,
    _MAGIC_BF,
    F32,
    U64,
    Filter,
    _as_data,
    _as_ids,
    _as_label,
    _as_size,
    _as_threads,
    _check_space,
    _default_threads,
    _empty_result,
    _normalized,
    _pack,
    _read_file,
    _read_hnswlib_bf_file,
    _unpack,
    _write_file,
    log,
)

__all__ = ["BFIndex"]

#: Twice float32's unit roundoff. A float32 dot product of two d-vectors is within
#: d * 2**-24 * |a| |b| of the exact one, whatever the order of the sum (Higham, "Accuracy and
#: Stability of Numerical Algorithms", 3.1): the scan ranks in float32 (what BLAS is fast at)
#: and this bounds how far a float32 distance may be from the float64 one.
_ROUNDING = 2.0 ** -23
#: The same bound's absolute part, per term: products that underflow (or that a BLAS built
#: to flush subnormals to zero drops) are off by up to float32's least normal, 2**-126.
_UNDERFLOW = 2.0 ** -122


class _ReadWriteLock:
    """Many readers or one writer, phase-fair: a waiting writer holds back readers that
    come after it (a stream of overlapping queries cannot starve an insert), and a writer
    that finishes lets in about as many readers as were waiting before the next writer
    goes (a stream of inserts cannot starve the queries either)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # holding it
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admit = 0  # waiting readers let in ahead of the waiting writers

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writing or (self._writers_waiting and not self._admit):
                    self._cond.wait()
            except BaseException:  # (interrupted while waiting: give back its turn)
                self._readers_waiting -= 1
                self._admit = min(self._admit, self._readers_waiting)
                self._cond.notify_all()
                raise
            self._readers_waiting -= 1
            if self._admit:
                self._admit -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers or self._admit:
                    self._cond.wait()
            except BaseException:  # (interrupted while waiting: let the readers in)
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._admit = self._readers_waiting
                self._cond.notify_all()


class BFIndex:
    """hnswlib's ``BFIndex``: exact (brute-force) search, in NumPy.

    Deleting an element frees its place (``get_current_count`` drops), unlike
    :meth:`Index.mark_deleted`.

    ``knn_query`` answers as computing every distance in float64 would: one float32 pass
    over the rows ranks them, and the rows float32 rounding could have misplaced around
    the k-th (and any whose float32 distance is not finite) are computed again in float64;
    where that would be more than an eighth of the rows (data far from the origin), and
    on small indexes (rows x dim <= 65,536), every distance is computed in float64. Ties
    go to the lower label, as in hnswlib. It reads the rows in place: writers wait for
    running queries, queries for a running writer, and a finished writer lets about as
    many queries in as were waiting before the next writer; arguments are converted and
    a ``filter`` is called outside that lock.

    Differences from hnswlib 0.8.0, on purpose: under ``cosine`` the query is normalised
    too, so distances are ``1 - cos`` as :class:`Index` returns them (hnswlib's ``BFIndex``
    normalises only the stored vectors and returns ``1 - |q| cos``: the same labels, other
    distances); a ``BFIndex`` can be copied and pickled (hnswlib's cannot).
    """

    _CHUNK = 1 << 22  # distance matrix entries computed at once

    def __init__(self, space: str, dim: int) -> None:
        self._space = _check_space(space)
        self._dim = _as_size(dim, "__init__", "dim")
        self._num_threads = _default_threads()
        # Queries read the rows in place (copied, a single query at 50k rows took ~10x
        # hnswlib's): writers wait for them, and they for writers.
        self._lock = _ReadWriteLock()
        self._inited = False
        self._max_elements = 0
        self._cur_l = 0
        self._vectors = np.empty((0, self._dim), dtype=np.float32)
        self._labels = np.empty(0, dtype=np.int64)
        self._sq = np.empty(0, dtype=np.float64)  # each row's squared norm (float64)
        self._count = 0
        self._version = 0  # bumped by every change of which label is at which row
        # The version at which the float32 ranking recomputed most rows (-1: none).
        self._rank32_failed = -1
        self._where: dict[int, int] = {}

    def _check(self) -> None:
        if not self._inited:
            raise RuntimeError(_E_NOT_INIT)

    def init_index(self, max_elements: int) -> None:
        """Create an empty index holding at most ``max_elements`` elements."""
        with self._lock.write():
            if self._inited:
                raise RuntimeError(_E_INITED)
            self._max_elements = _as_size(max_elements, "init_index", "max_elements")
            self._inited = True

    def _reserve(self, n: int) -> None:
        if n <= self._vectors.shape[0]:
            return
        cap = min(max(n, 2 * self._vectors.shape[0], 64), max(self._max_elements, n))
        vectors = np.empty((cap, self._dim), dtype=np.float32)
        labels = np.empty(cap, dtype=np.int64)
        sq = np.empty(cap, dtype=np.float64)
        vectors[: self._count] = self._vectors[: self._count]
        labels[: self._count] = self._labels[: self._count]
        sq[: self._count] = self._sq[: self._count]
        self._vectors, self._labels, self._sq = vectors, labels, sq

    def add_items(self, data: Any, ids: Any = None) -> None:
        """Insert vectors, or overwrite those whose label exists; rows past
        ``max_elements`` raise ``RuntimeError`` after the ones before were inserted."""
        self._check()
        # Converted before the lock: an array-like's own code may query this index.
        x = _as_data(data, self._dim)
        rows = x.shape[0]
        given = _as_ids(ids, rows)
        if self._space == "cosine" and rows:
            x = _normalized(x)
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64) if rows else x[:0, 0]
        with self._lock.write():
            self._check()
            labels = (
                given
                if given is not None
                else np.arange(self._cur_l, self._cur_l + rows, dtype=np.int64)
            )
            self._reserve(min(self._count + rows, self._max_elements))
            self._version += 1
            for row, lab in enumerate(labels.tolist()):
                slot = self._where.get(lab)
                if slot is None:
                    if self._count >= self._max_elements:
                        raise RuntimeError(_E_FULL)
                    slot = self._count
                    self._count += 1
                    self._where[lab] = slot
                    self._labels[slot] = lab
                self._vectors[slot] = x[row]
                self._sq[slot] = sq[row]
            self._cur_l += rows

    def delete_vector(self, label: int) -> None:
        """Remove ``label`` (the last element takes its place); unknown labels are ignored."""
        with self._lock.write():
            self._check()
            lab = _as_label(label, "delete_vector")
            slot = self._where.pop(lab, None)
            if slot is None:
                return
            self._version += 1
            last = self._count - 1
            if slot != last:
                moved = int(self._labels[last])
                self._vectors[slot] = self._vectors[last]
                self._sq[slot] = self._sq[last]
                self._labels[slot] = moved
                self._where[moved] = slot
            self._count = last

    def _all_exact(self, x: F32, xs: F32) -> npt.NDArray[np.float64]:
        """Every distance of a chunk of queries, in float64 (how every query was answered
        before the float32 pass, and still where that pass would recompute most rows)."""
        q64, x64 = x.astype(np.float64), xs.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # (rows of inf or NaN: as they come)
            if self._space == "l2":
                qq = np.einsum("ij,ij->i", q64, q64)[:, None]
                xx = np.einsum("ij,ij->i", x64, x64)[None, :]
                return np.maximum(qq + xx - 2.0 * (q64 @ x64.T), 0.0)
            return 1.0 - q64 @ x64.T

    def _nearest(self, x: F32, xs: F32, labels: npt.NDArray[np.int64],
                 sq: npt.NDArray[np.float64], refused: npt.NDArray[np.bool_] | None,
                 admitted: int, k: int, rank32: bool
                 ) -> tuple[npt.NDArray[np.intp], F32, bool]:
        """Rows of ``xs`` (positions) nearest each query of ``x``, nearest first (ties by
        label, as hnswlib's heap of (distance, label) breaks them), their distances
        (computed in float64, returned as float32), and whether the float32 ranking paid.
        With ``rank32`` one float32 pass ranks every row and only the rows it cannot place
        for sure (within twice its rounding bound of the k-th best, or not finite) are
        computed again in float64; where that would be more than an eighth of the rows
        (data far from the origin: a wide bound), and without ``rank32``, every distance
        is computed in float64. ``admitted``: how many rows ``refused`` leaves."""
        r, n = x.shape[0], xs.shape[0]
        cand = None
        if rank32:
            cand = self._ranked32(x, xs, sq, refused, k)
            if int(cand.sum()) > max(4 * k * r, r * admitted // 8):
                cand = None
                rank32 = False
        if cand is None:
            d = self._all_exact(x, xs)
            if refused is not None:
                d[:, refused] = np.inf
            key = np.where(np.isnan(d), np.inf, d)
            # Every row up to the k-th distance (ties with it included), admitted.
            edge = np.partition(key, k - 1, axis=1)[:, k - 1] if k < n else key.max(axis=1)
            keep = key <= edge[:, None]
            if refused is not None:
                keep[:, refused] = False
            rows_of, cols = np.nonzero(keep)
            dist = d[rows_of, cols]
        else:
            rows_of, cols = np.nonzero(cand)
            q64 = x.astype(np.float64)[rows_of]
            x64 = xs[cols].astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                if self._space == "l2":
                    diff = x64 - q64
                    dist = np.einsum("ij,ij->i", diff, diff)
                else:
                    dist = 1.0 - np.einsum("ij,ij->i", x64, q64)
        # Sorted by query, then distance (NaN last), then label; each query's first k.
        order = np.lexsort((labels[cols], np.where(np.isnan(dist), np.inf, dist), rows_of))
        starts = np.concatenate(([0], np.cumsum(np.bincount(rows_of, minlength=r))[:-1]))
        pick = order[starts[:, None] + np.arange(k)[None, :]]
        with np.errstate(over="ignore"):  # (a float64 distance past float32's range: inf)
            return cols[pick], dist[pick].astype(np.float32), rank32

    def _ranked32(self, x: F32, xs: F32, sq: npt.NDArray[np.float64],
                  refused: npt.NDArray[np.bool_] | None, k: int) -> npt.NDArray[np.bool_]:
        """Which rows each query must compute in float64, from one float32 pass: those
        within twice the float32 rounding bound of the k-th best, and those whose float32
        distance is not finite; never a refused row; every admitted row of a query with
        fewer than k finite distances."""
        n = xs.shape[0]
        with np.errstate(over="ignore", invalid="ignore"):
            s = x @ xs.T  # float32: a single query is one pass over the rows
        qq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        top = math.sqrt(float(np.max(sq, initial=0.0, where=np.isfinite(sq))))
        terms = self._dim + 4
        with np.errstate(over="ignore", invalid="ignore"):
            if self._space == "l2":
                approx = s
                approx *= np.float32(-2.0)
                approx += sq.astype(np.float32)[None, :]
                approx += qq.astype(np.float32)[:, None]
                # |x - q|^2 = |x|^2 + |q|^2 - 2 x.q: each term's rounding is bounded by the
                # norms, (|x| + |q|)^2 at most in all.
                bound = terms * (_ROUNDING * (np.sqrt(qq) + top) ** 2 + _UNDERFLOW)
            else:
                approx = s
                np.subtract(np.float32(1.0), s, out=approx)
                bound = terms * (_ROUNDING * (np.sqrt(qq) * top + 1.0) + _UNDERFLOW)
        # A row whose float32 distance is not finite (it overflowed, or holds NaN or inf)
        # could be anywhere: it is always recomputed.
        unsure = ~np.isfinite(approx)
        approx[unsure] = np.inf
        if refused is not None:
            approx[:, refused] = np.inf
            unsure[:, refused] = False
        kth = np.partition(approx, k - 1, axis=1)[:, k - 1] if k < n else approx.max(axis=1)
        with np.errstate(invalid="ignore"):
            cand = (approx <= (kth + 2.0 * bound)[:, None]) | unsure
        if refused is not None:
            cand[:, refused] = False
        short = cand.sum(axis=1) < k  # (the k-th is not finite)
        if short.any():
            cand[short] = True if refused is None else ~refused
        return cand

    def _chunks(self, rows: int) -> Iterator[slice]:
        step = max(1, self._CHUNK // max(self._count, 1))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def knn_query(
        self, data: Any, k: int = 1, num_threads: int = -1, filter: Filter | None = None
    ) -> tuple[U64, F32]:
        """The exact ``k`` nearest elements of each row: ``(labels uint64, distances
        float32)``, nearest first. Raises ``RuntimeError`` when fewer than ``k`` are
        admitted. ``num_threads`` is accepted as hnswlib's is (the scan is numpy's)."""
        self._check()
        _as_threads(num_threads, "knn_query")
        k = _as_size(k, "knn_query", "k")
        x = _as_data(data, self._dim)
        rows = x.shape[0]
        if rows == 0 or k == 0:
            return _empty_result(rows, k)
        if self._space == "cosine":
            x = _normalized(x)  # hnswlib's BFIndex does not (see the class docstring)
        admitted: npt.NDArray[np.int64] | None = None
        if filter is not None:
            # The filter runs outside the lock (it may query this index itself), on the
            # labels as they were; rows that changed since are matched by label.
            with self._lock.read():
                seen = self._labels[: self._count].copy()
                version = self._version
            ok = np.fromiter((bool(filter(v)) for v in seen.tolist()), dtype=bool,
                             count=seen.shape[0])
            admitted = seen[ok]
        with self._lock.read():
            n = self._count
            xs, labels, sq = self._vectors[:n], self._labels[:n], self._sq[:n]
            refused = None
            if admitted is not None:
                refused = ~ok if version == self._version else ~np.isin(labels, admitted)
            admitted_rows = n - (0 if refused is None else int(refused.sum()))
            if admitted_rows < k:
                raise RuntimeError(_E_FEW)
            out_l, out_d = _empty_result(rows, k)
            # The float32 pass pays on large rows, unless it did not on these rows already.
            rank32 = n * self._dim > 1 << 16 and self._rank32_failed != self._version
            for part in self._chunks(rows):
                top, out_d[part], paid = self._nearest(x[part], xs, labels, sq, refused,
                                                       admitted_rows, k, rank32)
                out_l[part] = labels[top].astype(np.uint64)
                if rank32 and not paid:
                    rank32 = False
                    self._rank32_failed = self._version  # (a plain store: no lock needed)
        return out_l, out_d

    def set_num_threads(self, num_threads: int) -> None:
        """Kept for hnswlib compatibility (the NumPy search uses NumPy's threads)."""
        self._num_threads = _as_threads(num_threads, "set_num_threads")

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self.set_num_threads(value)

    @property
    def space(self) -> str:
        return self._space

    @property
    def dim(self) -> int:
        return self._dim

    def get_max_elements(self) -> int:
        self._check()
        return self._max_elements

    def get_current_count(self) -> int:
        self._check()
        return self._count

    def save_index(self, path_to_index: str | os.PathLike[str]) -> None:
        """Write the index to a file."""
        with self._lock.read():
            self._check()
            header = {
                "space": self._space,
                "dim": self._dim,
                "max_elements": self._max_elements,
                "count": self._count,
            }
            data = _pack(
                _MAGIC_BF,
                header,
                [
                    self._labels[: self._count].tobytes(),
                    self._vectors[: self._count].tobytes(),
                ],
            )
        _write_file(path_to_index, data)

    def load_index(self, path_to_index: str | os.PathLike[str], max_elements: int = 0) -> None:
        """Replace this index by one read from a file written by :meth:`save_index` or by
        hnswlib's ``BFIndex.save_index``. As in hnswlib, the stored ``max_elements`` is kept
        (the argument is accepted and ignored)."""
        _as_size(max_elements, "load_index", "max_elements")
        data = _read_file(path_to_index)
        if data.startswith(_MAGIC_BF):
            header, (lb, vb) = _unpack(_MAGIC_BF, data, 2)
            if header.get("space") != self._space or header.get("dim") != self._dim:
                raise RuntimeError(f"{_E_CORRUPT}: space or dimension differ from this index")
            saved_max = int(header["max_elements"])
            labels = np.frombuffer(lb, dtype=np.int64).copy()
            try:
                vectors = np.frombuffer(vb, dtype=np.float32).reshape(labels.shape[0], self._dim)
            except ValueError as exc:
                raise RuntimeError(_E_CORRUPT) from exc
        else:
            saved_max, labels, vectors = _read_hnswlib_bf_file(data, self._dim)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).copy()
        sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        with self._lock.write():
            replaced = self._inited
            self._max_elements = saved_max
            self._vectors, self._labels, self._sq = vectors, labels, sq
            self._version += 1
            self._count = labels.shape[0]
            self._where = {int(v): i for i, v in enumerate(labels.tolist())}
            self._cur_l = self._count
            self._inited = True
        if replaced:  # (after the lock: a logging handler is the application's code)
            log.warning(
                "Calling load_index for an already inited index. "
                "Old index is being deallocated."
            )

    def __getstate__(self) -> dict[str, Any]:
        with self._lock.read():
            state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_sq")}
            state["_vectors"] = self._vectors[: self._count].copy()
            state["_labels"] = self._labels[: self._count].copy()
            state["_where"] = dict(self._where)  # copy.copy() must not share it
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = _ReadWriteLock()
        self._version = int(state.get("_version", 0))
        self._rank32_failed = -1
        # (derived, so not pickled: recomputed, also for a pickle made before it existed)
        self._sq = np.einsum("ij,ij->i", self._vectors, self._vectors, dtype=np.float64)

    def __repr__(self) -> str:
        return f"<hnswlib.BFIndex(space='{self._space}', dim={self._dim})>"
