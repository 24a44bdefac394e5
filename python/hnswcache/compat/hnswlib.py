"""hnswlib 0.8.0's Python API, over :class:`hnswcache.Index`.

``import hnswcache.compat.hnswlib as hnswlib`` is the whole migration: ``Index`` and
``BFIndex`` take the same arguments, return the same shapes and dtypes (``uint64`` labels,
``float32`` distances), count elements by the same rules and raise the same exception types
(mostly ``RuntimeError``, with hnswlib's messages) as the ``hnswlib`` package.

Behaviour kept from hnswlib, on purpose:

* Distances: ``l2`` is the squared Euclidean distance, ``ip`` is ``1 - dot``, ``cosine`` is
  ``1 - cos`` (vectors are normalised on the way in, as hnswlib does, zero vectors included).
* ``knn_query`` raises ``RuntimeError`` when fewer than ``k`` elements can be returned
  (the native index would pad instead).
* Counting: ``element_count`` / ``get_current_count()`` include elements marked deleted;
  ``max_elements`` is a hard limit (``RuntimeError`` once reached, after the rows that fit
  were inserted); ids given by no one come from a running counter that advances by the batch
  size on every successful ``add_items`` call, and restarts at ``element_count`` after a
  load or an unpickle.
* ``mark_deleted`` hides an element but keeps it counted and listed by ``get_ids_list``;
  ``unmark_deleted`` brings it back; ``add_items(..., replace_deleted=True)`` on an index
  built with ``allow_replace_deleted=True`` reuses the place of a deleted element.

Where hnswlib crashes the interpreter (any method but the properties before ``init_index``,
a query of the wrong dimension), this module raises ``RuntimeError`` instead.

``load_index`` reads this module's files and also files written by hnswlib's own
``save_index`` (the graph is rebuilt from the stored vectors), so existing index files keep
working. Labels must be below ``2**63`` (hnswlib allows the full ``uint64`` range).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ..index import Index as _NativeIndex

__all__ = ["BFIndex", "Index"]

log = logging.getLogger("hnswcache.compat.hnswlib")

_SPACES = ("l2", "ip", "cosine")
_MAX_LABEL = int(np.iinfo(np.int64).max)

_E_SPACE = "Space name must be one of l2, ip, or cosine."
_E_NOT_INIT = "Index is not initialized: call init_index() or load_index() first"
_E_INITED = "The index is already initiated."
_E_DIM = "Wrong dimensionality of the vectors"
_E_FULL = "The number of elements exceeds the specified limit"
_E_FEW = "Cannot return the results in a contiguous 2D array. Probably ef or M is too small"
_E_NOT_FOUND = "Label not found"
_E_DELETED = "The requested to delete element is already deleted"
_E_NOT_DELETED = "The requested to undelete element is not deleted"
_E_NO_REPLACE = "Replacement of deleted elements is disabled in constructor"
_E_UPDATE_DELETED = (
    "Can't use addPoint to update deleted elements if replacement of deleted elements is enabled."
)
_E_RESIZE = "Cannot resize, max element is less than the current number of elements"
_E_CORRUPT = "Index seems to be corrupted or unsupported"

_MAGIC_HNSW = b"HNSWCACHE-COMPAT-HNSW\x00"
_MAGIC_BF = b"HNSWCACHE-COMPAT-BF\x00\x00\x00"
_FORMAT_VERSION = 1

Filter = Callable[[int], bool]
F32 = npt.NDArray[np.float32]
U64 = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------- argument conversion
def _check_space(space: str) -> str:
    if space not in _SPACES:
        raise RuntimeError(_E_SPACE)
    return space


def _as_data(data: Any, dim: int) -> F32:
    """hnswlib's ``py::array_t<float, forcecast>`` plus its shape checks: ``(rows, dim)``."""
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (1, 2):
        raise RuntimeError(
            f"Input vector data wrong shape. Number of dimensions {arr.ndim}. "
            "Data must be a 1D or 2D array."
        )
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.shape[1] != dim:
        raise RuntimeError(_E_DIM)
    return np.ascontiguousarray(arr)


def _normalized(x: F32) -> F32:
    """hnswlib's ``normalize_vector``: ``x / (|x| + 1e-30)`` (a zero vector stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    inv = np.float32(1.0) / (norms + np.float32(1e-30))
    return np.ascontiguousarray(x * inv[:, None], dtype=np.float32)


def _as_label_array(ids: Any) -> npt.NDArray[np.int64]:
    """Labels as hnswlib reads them (``py::array_t<size_t, forcecast>``), any shape."""
    arr = np.array(ids, dtype=np.uint64)  # negative Python ints raise OverflowError here
    if arr.size and int(arr.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63")
    return arr.astype(np.int64)


def _as_ids(ids: Any, rows: int) -> npt.NDArray[np.int64] | None:
    if ids is None:
        return None
    arr = _as_label_array(ids)
    if not ((arr.ndim == 1 and arr.shape[0] == rows) or (arr.ndim == 0 and rows == 1)):
        raise RuntimeError(
            f"The input label shape {arr.ndim} does not match the input data vector shape {rows}"
        )
    return arr.reshape(-1)


def _as_label(label: Any, method: str) -> int:
    """One label, as pybind11 converts a ``size_t`` argument (no floats, no negatives)."""
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: label must be an int")
    value = int(label)
    if value < 0:
        raise TypeError(f"{method}(): incompatible function arguments: label must be >= 0")
    if value > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63")
    return value


def _as_size(value: Any, method: str, name: str) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: {name} must be an int")
    if int(value) < 0:
        raise TypeError(f"{method}(): incompatible function arguments: {name} must be >= 0")
    return int(value)


def _as_threads(value: Any, method: str) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: num_threads must be int")
    return int(value)


def _last_occurrence(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """Row indices keeping the last row of each label, in row order."""
    _, first_in_reversed = np.unique(labels[::-1], return_index=True)
    return np.sort(labels.shape[0] - 1 - first_in_reversed)


def _empty_result(rows: int, k: int) -> tuple[U64, F32]:
    return np.empty((rows, k), dtype=np.uint64), np.empty((rows, k), dtype=np.float32)


def _default_threads() -> int:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------- file container
def _pack(magic: bytes, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    out = io.BytesIO()
    out.write(magic)
    out.write(struct.pack("<IQ", _FORMAT_VERSION, len(head)))
    out.write(head)
    for blob in blobs:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
    return out.getvalue()


def _unpack(magic: bytes, data: bytes, nblobs: int) -> tuple[dict[str, Any], list[bytes]]:
    try:
        pos = len(magic)
        version, hlen = struct.unpack_from("<IQ", data, pos)
        if version > _FORMAT_VERSION:
            raise RuntimeError(f"{_E_CORRUPT}: format version {version} is newer than this one")
        pos += 12
        header = json.loads(data[pos : pos + hlen])
        pos += hlen
        blobs = []
        for _ in range(nblobs):
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8
            if pos + n > len(data):
                raise ValueError("truncated")
            blobs.append(data[pos : pos + n])
            pos += n
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise RuntimeError(f"{_E_CORRUPT}: {exc}") from exc
    if not isinstance(header, dict):
        raise RuntimeError(_E_CORRUPT)
    return header, blobs


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RuntimeError("Cannot open file") from exc


def _write_file(path: str | os.PathLike[str], data: bytes) -> None:
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise RuntimeError(f"Cannot open file {os.fspath(path)!r} for writing: {exc}") from exc


def _read_hnswlib_file(
    data: bytes, dim: int
) -> tuple[dict[str, int], npt.NDArray[np.int64], F32, npt.NDArray[np.bool_]]:
    """Parse a file written by hnswlib's ``HierarchicalNSW::saveIndex``.

    Returns the header (``max_elements``, ``M``, ``ef_construction``), and per element the
    label, the stored vector and the deleted mark. The graph itself is not reused.
    """
    try:
        (offset_level0, max_elements, count, size_data, label_offset, offset_data) = (
            struct.unpack_from("<6Q", data, 0)
        )
        _maxlevel, _entry = struct.unpack_from("<iI", data, 48)
        _max_m, _max_m0, m, _mult, ef_construction = struct.unpack_from("<3QdQ", data, 56)
    except struct.error as exc:
        raise RuntimeError(_E_CORRUPT) from exc
    body = 96
    if (
        offset_level0 != 0
        or count > max_elements
        or label_offset != offset_data + 4 * dim
        or size_data != label_offset + 8
        or body + count * size_data > len(data)
    ):
        raise RuntimeError(
            f"{_E_CORRUPT} (not an hnswlib file of dimension {dim}, or damaged)"
        )
    rows = np.frombuffer(data, dtype=np.uint8, count=count * size_data, offset=body)
    rows = rows.reshape(count, size_data)
    vectors = np.ascontiguousarray(rows[:, offset_data:label_offset]).view(np.float32)
    labels = np.ascontiguousarray(rows[:, label_offset : label_offset + 8]).view(np.uint64)
    deleted = (rows[:, 2] & 1).astype(bool)
    lab = labels.reshape(-1)
    if lab.size and int(lab.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63")
    header = {"max_elements": max_elements, "M": m, "ef_construction": ef_construction}
    return header, lab.astype(np.int64), vectors.reshape(count, dim).copy(), deleted


def _read_hnswlib_bf_file(data: bytes, dim: int) -> tuple[int, npt.NDArray[np.int64], F32]:
    """Parse a file written by hnswlib's ``BruteforceSearch::saveIndex``."""
    try:
        max_elements, size_per_element, count = struct.unpack_from("<3Q", data, 0)
    except struct.error as exc:
        raise RuntimeError(_E_CORRUPT) from exc
    size = 24 + count * size_per_element
    if size_per_element != 4 * dim + 8 or count > max_elements or size > len(data):
        raise RuntimeError(f"{_E_CORRUPT} (not an hnswlib file of dimension {dim}, or damaged)")
    rows = np.frombuffer(data, dtype=np.uint8, count=count * size_per_element, offset=24)
    rows = rows.reshape(count, size_per_element)
    vectors = np.ascontiguousarray(rows[:, : 4 * dim]).view(np.float32).reshape(count, dim)
    labels = np.ascontiguousarray(rows[:, 4 * dim :]).view(np.uint64).reshape(-1)
    if labels.size and int(labels.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63")
    return int(max_elements), labels.astype(np.int64), vectors.copy()


# ---------------------------------------------------------------------- Index
class Index:
    """hnswlib's ``Index``: an HNSW index of ``dim``-dimensional vectors in ``space``.

    ``Index(space, dim)`` creates it; ``Index(other)`` / ``Index(index=other)`` copies one.
    Call :meth:`init_index` (or :meth:`load_index`) before anything else.
    """

    def __init__(
        self,
        space: str | Index | None = None,
        dim: int | None = None,
        *,
        index: Index | None = None,
    ) -> None:
        if isinstance(space, Index):
            index, space = space, None
        if index is not None:
            self.__setstate__(index.__getstate__())
            return
        if space is None or dim is None:
            raise TypeError("__init__(): incompatible constructor arguments: give space and dim")
        self._space = _check_space(space)
        self._dim = _as_size(dim, "__init__", "dim")
        self._ef = 10
        self._num_threads = _default_threads()
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._native: _NativeIndex | None = None
        self._max_elements = 0
        self._M = 0
        self._ef_construction = 0
        self._seed = 100
        self._allow_replace_deleted = False
        self._cur_l = 0
        self._deleted: dict[int, F32] = {}
        self._ghosts = 0  # places hnswlib would keep for an element it can no longer reach

    # ------------------------------------------------------------------ helpers
    @property
    def _normalize(self) -> bool:
        return self._space == "cosine"

    def _new_native(self, capacity: int) -> _NativeIndex:
        # cosine runs as ip on vectors normalised here, like hnswlib: zero vectors allowed.
        return _NativeIndex(
            self._dim,
            metric="l2" if self._space == "l2" else "ip",
            M=self._M,
            ef_construction=self._ef_construction,
            capacity=capacity,
            seed=self._seed,
        )

    def _idx(self) -> _NativeIndex:
        if self._native is None:
            raise RuntimeError(_E_NOT_INIT)
        return self._native

    def _threads(self, num_threads: int) -> int:
        n = num_threads if num_threads > 0 else self._num_threads
        return n if n > 0 else 0

    def _count(self) -> int:
        return len(self._idx()) + len(self._deleted) + self._ghosts

    # ------------------------------------------------------------------ building
    def init_index(
        self,
        max_elements: int,
        M: int = 16,  # noqa: N803 - hnswlib's parameter name
        ef_construction: int = 200,
        random_seed: int = 100,
        allow_replace_deleted: bool = False,
    ) -> None:
        """Create an empty index holding at most ``max_elements`` elements."""
        with self._lock:
            if self._native is not None:
                raise RuntimeError(_E_INITED)
            max_elements = _as_size(max_elements, "init_index", "max_elements")
            m = _as_size(M, "init_index", "M")
            efc = _as_size(ef_construction, "init_index", "ef_construction")
            seed = _as_size(random_seed, "init_index", "random_seed")
            self._reset()
            self._max_elements = max_elements
            self._M, self._ef_construction, self._seed = m, efc, seed
            self._allow_replace_deleted = bool(allow_replace_deleted)
            self._native = self._new_native(min(max_elements, 1 << 20))

    def add_items(
        self,
        data: Any,
        ids: Any = None,
        num_threads: int = -1,
        replace_deleted: bool = False,
    ) -> None:
        """Insert vectors (or update those whose label exists).

        ``ids`` default to a running counter. Rows are inserted in order; a label repeated
        in one batch keeps its last row. When ``max_elements`` is reached, the rows before
        are inserted and ``RuntimeError`` is raised.
        """
        with self._lock:
            native = self._idx()
            x = _as_data(data, self._dim)
            rows = x.shape[0]
            given = _as_ids(ids, rows)
            nt = self._threads(_as_threads(num_threads, "add_items"))
            if rows == 0:
                return
            if replace_deleted and not self._allow_replace_deleted:
                raise RuntimeError(_E_NO_REPLACE)
            labels = (
                given
                if given is not None
                else np.arange(self._cur_l, self._cur_l + rows, dtype=np.int64)
            )
            if self._cur_l + rows > _MAX_LABEL and given is None:
                raise OverflowError("hnswcache labels must be below 2**63")
            if self._normalize:
                x = _normalized(x)
            if not self._deleted and self._count() + rows <= self._max_elements:
                keep = _last_occurrence(labels) if rows > 1 else np.arange(rows)
                if keep.shape[0] != rows:
                    native.add(x[keep], labels[keep], num_threads=nt)
                else:
                    native.add(x, labels, num_threads=nt)
            else:
                self._add_rows(x, labels, nt, bool(replace_deleted))
            self._cur_l += rows

    def _add_rows(
        self, x: F32, labels: npt.NDArray[np.int64], nt: int, replace_deleted: bool
    ) -> None:
        """Row by row: capacity, deleted elements and replacement, as hnswlib decides them."""
        native = self._idx()
        used = self._count()
        pending: dict[int, int] = {}
        error: str | None = None
        for row, lab in enumerate(labels.tolist()):
            if lab in self._deleted:
                if not replace_deleted and self._allow_replace_deleted:
                    error = _E_UPDATE_DELETED
                    break
                del self._deleted[lab]  # its own place is reused: the count is unchanged
            elif lab in pending or lab in native:
                if replace_deleted and self._deleted:
                    # hnswlib moves the label into a deleted element's place and leaves the
                    # old place counted but unreachable.
                    self._deleted.pop(next(iter(self._deleted)))
                    self._ghosts += 1
            elif replace_deleted and self._deleted:
                self._deleted.pop(next(iter(self._deleted)))
            elif used >= self._max_elements:
                error = _E_FULL
                break
            else:
                used += 1
            pending[lab] = row
        if pending:
            rows = np.fromiter(pending.values(), dtype=np.intp, count=len(pending))
            native.add(x[rows], labels[rows], num_threads=nt)
        if error is not None:
            raise RuntimeError(error)

    # ------------------------------------------------------------------ queries
    def knn_query(
        self, data: Any, k: int = 1, num_threads: int = -1, filter: Filter | None = None
    ) -> tuple[U64, F32]:
        """The ``k`` nearest elements of each row: ``(labels uint64, distances float32)``,
        both ``(rows, k)``, nearest first. ``filter(label) -> bool`` admits labels.

        Raises ``RuntimeError`` when fewer than ``k`` elements can be returned.
        """
        native = self._idx()
        k = _as_size(k, "knn_query", "k")
        nt = self._threads(_as_threads(num_threads, "knn_query"))
        x = _as_data(data, self._dim)
        rows = x.shape[0]
        if rows == 0 or k == 0:
            return _empty_result(rows, k)
        if self._normalize:
            x = _normalized(x)
        ef = max(self._ef, k, 1)
        if filter is None:
            labels, dist = native.search(x, k, ef=ef, num_threads=nt)
            if (labels < 0).any():
                raise RuntimeError(_E_FEW)
            return labels.astype(np.uint64), dist
        out_l, out_d = _empty_result(rows, k)
        for r in range(rows):
            out_l[r], out_d[r] = self._filtered(native, x[r : r + 1], k, ef, filter)
        return out_l, out_d

    @staticmethod
    def _filtered(
        native: _NativeIndex, q: F32, k: int, ef: int, filter: Filter
    ) -> tuple[U64, F32]:
        """Widen the search until ``k`` admitted labels are found or the index is exhausted
        (the native index has no filter: see docs/requests-compat.md)."""
        live = len(native)
        kk = min(max(2 * k, 16), max(live, 1))
        while True:
            labels, dist = native.search(q, kk, ef=max(ef, kk), num_threads=1)
            lab, d = labels[0], dist[0]
            valid = lab >= 0
            admitted = np.array([bool(filter(int(v))) for v in lab[valid]], dtype=bool)
            if admitted.sum() >= k:
                take = np.flatnonzero(admitted)[:k]
                return lab[valid][take].astype(np.uint64), d[valid][take]
            if kk >= live or not valid.all():
                raise RuntimeError(_E_FEW)
            kk = min(kk * 4, live)

    def get_items(self, ids: Any = None, return_type: str = "numpy") -> Any:
        """Stored vectors of ``ids`` (normalised under ``cosine``): a ``float32`` array of
        shape ``(n, dim)``, or a list of lists with ``return_type="list"``.

        Raises ``RuntimeError`` for an unknown or deleted label."""
        if return_type not in ("numpy", "list"):
            raise ValueError('return_type should be "numpy" or "list"')
        native = self._idx()
        if ids is None:
            labels = np.empty(0, dtype=np.int64)
        else:
            arr = _as_label_array(ids)
            if arr.ndim == 0:
                raise ValueError(
                    "get_items accepts a list of indices and returns a list of vectors"
                )
            labels = arr.reshape(arr.shape[0], -1)[:, 0]
        if labels.size == 0:
            return [] if return_type == "list" else np.array([], dtype=np.float32)
        if any(int(v) in self._deleted for v in labels):
            raise RuntimeError(_E_NOT_FOUND)
        try:
            vectors = native.get(labels)
        except KeyError as exc:
            raise RuntimeError(_E_NOT_FOUND) from exc
        return vectors.tolist() if return_type == "list" else vectors

    def get_ids_list(self) -> list[int]:
        """Labels of all elements, the ones marked deleted included."""
        native = self._idx()
        return [int(v) for v in native.labels()] + list(self._deleted)

    # ------------------------------------------------------------------ deletion
    def mark_deleted(self, label: int) -> None:
        """Hide ``label`` from queries; it still counts and can be unmarked."""
        with self._lock:
            native = self._idx()
            lab = _as_label(label, "mark_deleted")
            if lab in self._deleted:
                raise RuntimeError(_E_DELETED)
            try:
                vec = native.get([lab])[0]
            except KeyError as exc:
                raise RuntimeError(_E_NOT_FOUND) from exc
            native.delete([lab])
            self._deleted[lab] = vec.copy()

    def unmark_deleted(self, label: int) -> None:
        """Make a deleted ``label`` visible again."""
        with self._lock:
            native = self._idx()
            lab = _as_label(label, "unmark_deleted")
            vec = self._deleted.get(lab)
            if vec is None:
                raise RuntimeError(_E_NOT_DELETED if lab in native else _E_NOT_FOUND)
            native.add(vec[None, :], [lab], num_threads=1)
            del self._deleted[lab]

    # ------------------------------------------------------------------ sizes and settings
    def resize_index(self, new_size: int) -> None:
        """Change ``max_elements`` (not below the current count)."""
        with self._lock:
            self._idx()
            size = _as_size(new_size, "resize_index", "new_size")
            if size < self._count():
                raise RuntimeError(_E_RESIZE)
            self._max_elements = size

    def set_ef(self, ef: int) -> None:
        """Candidate list size of queries (raised to ``k`` when smaller)."""
        self._ef = _as_size(ef, "set_ef", "ef")

    def set_num_threads(self, num_threads: int) -> None:
        """Default thread count of ``add_items`` and ``knn_query``."""
        self._num_threads = _as_threads(num_threads, "set_num_threads")

    def get_max_elements(self) -> int:
        self._idx()
        return self._max_elements

    def get_current_count(self) -> int:
        """Elements in the index, those marked deleted included."""
        return self._count()

    @property
    def space(self) -> str:
        return self._space

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def M(self) -> int:  # noqa: N802 - hnswlib's name
        return self._M if self._native is not None else 0

    @property
    def ef_construction(self) -> int:
        return self._ef_construction if self._native is not None else 0

    @property
    def max_elements(self) -> int:
        return self._max_elements if self._native is not None else 0

    @property
    def element_count(self) -> int:
        return self._count() if self._native is not None else 0

    @property
    def ef(self) -> int:
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        self.set_ef(value)

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self.set_num_threads(value)

    # ------------------------------------------------------------------ persistence
    def _to_bytes(self) -> bytes:
        native = self._idx()
        header = {
            "space": self._space,
            "dim": self._dim,
            "max_elements": self._max_elements,
            "M": self._M,
            "ef_construction": self._ef_construction,
            "seed": self._seed,
            "ghosts": self._ghosts,
            "deleted": len(self._deleted),
        }
        deleted_labels = np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted))
        deleted_vectors = (
            np.stack(list(self._deleted.values())).astype(np.float32)
            if self._deleted
            else np.empty((0, self._dim), dtype=np.float32)
        )
        return _pack(
            _MAGIC_HNSW,
            header,
            [native.to_bytes(), deleted_labels.tobytes(), deleted_vectors.tobytes()],
        )

    def _from_bytes(
        self, data: bytes, max_elements: int | None, allow_replace_deleted: bool
    ) -> None:
        """Load our own format; ``max_elements=None`` keeps the stored limit (unpickling)."""
        header, (core, dl, dv) = _unpack(_MAGIC_HNSW, data, 3)
        if header.get("space") != self._space or header.get("dim") != self._dim:
            raise RuntimeError(
                f"{_E_CORRUPT}: the file holds a {header.get('space')!r} index of dimension "
                f"{header.get('dim')}, this index is {self._space!r} of dimension {self._dim}"
            )
        try:
            native = _NativeIndex.from_bytes(core)
            labels = np.frombuffer(dl, dtype=np.int64)
            vectors = np.frombuffer(dv, dtype=np.float32).reshape(labels.shape[0], self._dim)
        except ValueError as exc:
            raise RuntimeError(f"{_E_CORRUPT}: {exc}") from exc
        self._reset()
        self._native = native
        self._M = int(header["M"])
        self._ef_construction = int(header["ef_construction"])
        self._seed = int(header["seed"])
        self._ghosts = int(header["ghosts"])
        self._deleted = {int(lab): vectors[i].copy() for i, lab in enumerate(labels)}
        saved_max = int(header["max_elements"])
        self._finish_load(
            saved_max, saved_max if max_elements is None else max_elements, allow_replace_deleted
        )

    def _from_hnswlib(self, data: bytes, max_elements: int, allow_replace_deleted: bool) -> None:
        header, labels, vectors, deleted = _read_hnswlib_file(data, self._dim)
        self._reset()
        self._M = header["M"]
        self._ef_construction = header["ef_construction"]
        native = self._new_native(labels.shape[0])
        keep = _last_occurrence(labels) if labels.size else np.empty(0, dtype=np.intp)
        live = keep[~deleted[keep]]
        if live.size:
            native.add(vectors[live], labels[live])
        self._native = native
        self._deleted = {int(labels[i]): vectors[i] for i in keep[deleted[keep]]}
        self._ghosts = labels.shape[0] - keep.shape[0]
        self._finish_load(header["max_elements"], max_elements, allow_replace_deleted)
        log.info("rebuilt an hnswlib index file: %d elements", labels.shape[0])

    def _finish_load(self, saved_max: int, max_elements: int, allow_replace_deleted: bool) -> None:
        count = self._count()
        self._max_elements = max_elements if max_elements >= count else saved_max
        self._allow_replace_deleted = bool(allow_replace_deleted)
        self._cur_l = count
        self._ef = 10  # hnswlib's loaded index starts again from ef = 10

    def save_index(self, path_to_index: str | os.PathLike[str]) -> None:
        """Write the index to a file (deleted elements included)."""
        with self._lock:
            data = self._to_bytes()
        _write_file(path_to_index, data)

    def load_index(
        self,
        path_to_index: str | os.PathLike[str],
        max_elements: int = 0,
        allow_replace_deleted: bool = False,
    ) -> None:
        """Replace this index by one read from a file written by :meth:`save_index` or by
        hnswlib's own ``save_index``. ``max_elements`` below the stored count keeps the
        stored limit."""
        max_elements = _as_size(max_elements, "load_index", "max_elements")
        data = _read_file(path_to_index)
        with self._lock:
            if self._native is not None:
                log.warning(
                    "Calling load_index for an already inited index. "
                    "Old index is being deallocated."
                )
            if data.startswith(_MAGIC_HNSW):
                self._from_bytes(data, max_elements, allow_replace_deleted)
            else:
                self._from_hnswlib(data, max_elements, allow_replace_deleted)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {
                "space": self._space,
                "dim": self._dim,
                "ef": self._ef,
                "num_threads": self._num_threads,
                "allow_replace_deleted": self._allow_replace_deleted,
                "index": self._to_bytes() if self._native is not None else None,
            }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._space = _check_space(state["space"])
        self._dim = int(state["dim"])
        self._num_threads = int(state["num_threads"])
        self._lock = threading.RLock()
        self._reset()
        if state["index"] is not None:
            self._from_bytes(state["index"], None, bool(state["allow_replace_deleted"]))
        self._ef = int(state["ef"])

    def __repr__(self) -> str:
        return f"<hnswlib.Index(space='{self._space}', dim={self._dim})>"


# ---------------------------------------------------------------------- BFIndex
class BFIndex:
    """hnswlib's ``BFIndex``: exact (brute-force) search, in NumPy.

    Deleting an element frees its place (``get_current_count`` drops), unlike
    :meth:`Index.mark_deleted`.
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

    def knn_query(self, data: Any, k: int = 1, filter: Filter | None = None) -> tuple[U64, F32]:
        """The exact ``k`` nearest elements of each row: ``(labels uint64, distances
        float32)``, nearest first. Raises ``RuntimeError`` when fewer than ``k`` are
        admitted."""
        self._check()
        k = _as_size(k, "knn_query", "k")
        x = _as_data(data, self._dim)
        rows = x.shape[0]
        if rows == 0 or k == 0:
            return _empty_result(rows, k)
        if self._space == "cosine":
            x = _normalized(x)
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
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<hnswlib.BFIndex(space='{self._space}', dim={self._dim})>"
