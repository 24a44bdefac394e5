"""hnswlib's ``BFIndex`` (exact search), in NumPy."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

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


class BFIndex:
    """hnswlib's ``BFIndex``: exact (brute-force) search, in NumPy.

    Deleting an element frees its place (``get_current_count`` drops), unlike
    :meth:`Index.mark_deleted`.

    Differences from hnswlib 0.8.0, on purpose: under ``cosine`` the query is normalised
    too, so distances are ``1 - cos`` as :class:`Index` returns them (hnswlib's ``BFIndex``
    normalises only the stored vectors and returns ``1 - |q| cos``: the same labels, other
    distances); a ``BFIndex`` can be copied and pickled (hnswlib's cannot).
    """

    _CHUNK = 1 << 24  # distance matrix entries computed at once

    def __init__(self, space: str, dim: int) -> None:
        self._space = _check_space(space)
        self._dim = _as_size(dim, "__init__", "dim")
        self._num_threads = _default_threads()
        self._lock = threading.RLock()
        self._inited = False
        self._max_elements = 0
        self._cur_l = 0
        self._vectors = np.empty((0, self._dim), dtype=np.float32)
        self._labels = np.empty(0, dtype=np.int64)
        self._count = 0
        self._where: dict[int, int] = {}

    def _check(self) -> None:
        if not self._inited:
            raise RuntimeError(_E_NOT_INIT)

    def init_index(self, max_elements: int) -> None:
        """Create an empty index holding at most ``max_elements`` elements."""
        with self._lock:
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
        vectors[: self._count] = self._vectors[: self._count]
        labels[: self._count] = self._labels[: self._count]
        self._vectors, self._labels = vectors, labels

    def add_items(self, data: Any, ids: Any = None) -> None:
        """Insert vectors, or overwrite those whose label exists; rows past
        ``max_elements`` raise ``RuntimeError`` after the ones before were inserted."""
        with self._lock:
            self._check()
            x = _as_data(data, self._dim)
            rows = x.shape[0]
            given = _as_ids(ids, rows)
            labels = (
                given
                if given is not None
                else np.arange(self._cur_l, self._cur_l + rows, dtype=np.int64)
            )
            if self._space == "cosine" and rows:
                x = _normalized(x)
            self._reserve(min(self._count + rows, self._max_elements))
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
            self._cur_l += rows

    def delete_vector(self, label: int) -> None:
        """Remove ``label`` (the last element takes its place); unknown labels are ignored."""
        with self._lock:
            self._check()
            lab = _as_label(label, "delete_vector")
            slot = self._where.pop(lab, None)
            if slot is None:
                return
            last = self._count - 1
            if slot != last:
                moved = int(self._labels[last])
                self._vectors[slot] = self._vectors[last]
                self._labels[slot] = moved
                self._where[moved] = slot
            self._count = last

    def _distances(self, q: F32, xs: F32) -> F32:
        if self._space == "l2":
            qq = np.einsum("ij,ij->i", q, q, dtype=np.float64)[:, None]
            xx = np.einsum("ij,ij->i", xs, xs, dtype=np.float64)[None, :]
            d = qq + xx - 2.0 * (q.astype(np.float64) @ xs.astype(np.float64).T)
            return np.maximum(d, 0.0).astype(np.float32)
        return (1.0 - q.astype(np.float64) @ xs.astype(np.float64).T).astype(np.float32)

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
        with self._lock:
            xs = self._vectors[: self._count].copy()
            labels = self._labels[: self._count].copy()
        if filter is not None:
            admitted = np.array([bool(filter(int(v))) for v in labels], dtype=bool)
            xs, labels = xs[admitted], labels[admitted]
        if labels.shape[0] < k:
            raise RuntimeError(_E_FEW)
        out_l, out_d = _empty_result(rows, k)
        for part in self._chunks(rows):
            d = self._distances(x[part], xs)
            top = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else None
            if top is None:
                top = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
            td = np.take_along_axis(d, top, axis=1)
            order = np.argsort(td, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            out_l[part] = labels[top].astype(np.uint64)
            out_d[part] = np.take_along_axis(td, order, axis=1)
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
        with self._lock:
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
        with self._lock:
            if self._inited:
                log.warning(
                    "Calling load_index for an already inited index. "
                    "Old index is being deallocated."
                )
            self._max_elements = saved_max
            self._vectors = np.ascontiguousarray(vectors, dtype=np.float32).copy()
            self._labels = labels
            self._count = labels.shape[0]
            self._where = {int(v): i for i, v in enumerate(labels.tolist())}
            self._cur_l = self._count
            self._inited = True

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
            state["_vectors"] = self._vectors[: self._count].copy()
            state["_labels"] = self._labels[: self._count].copy()
            state["_where"] = dict(self._where)  # copy.copy() must not share it
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<hnswlib.BFIndex(space='{self._space}', dim={self._dim})>"
