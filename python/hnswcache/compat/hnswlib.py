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
working. Labels must be below ``2**63 - 1`` (hnswlib allows the full ``uint64`` range).

Deliberate differences: a row with NaN or infinity, or under ``l2``/``ip`` one whose
squared norm passes 8.5e37 (its distances would overflow float32), refuses the whole batch
with :class:`InvalidVectorsError` (both a ``ValueError`` and a ``RuntimeError``), naming
the row: in ``add_items`` (nothing of the batch is inserted, where hnswlib stores the row
and answers with NaN distances) and in ``knn_query`` (no row is answered, where hnswlib
returns meaningless distances for that row). ``load_index`` refuses a file of hnswlib's
holding such an element (unless marked deleted) with the same error, naming its labels;
a failed load leaves the index as it was. ``M`` is at most 2048. ``BFIndex`` under
``cosine`` normalises the query, so its distances are ``Index``'s ``1 - cos`` (hnswlib
0.8.0's ``BFIndex`` returns ``1 - |q| cos``: the same labels, other distances), and it can
be copied and pickled. hnswlib cannot read this module's files.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from ..index import _MAX_EF
from ..index import Index as _NativeIndex
from ._hnswlib_bf import BFIndex
from ._hnswlib_common import (
    _E_CORRUPT,
    _E_DELETED,
    _E_FEW,
    _E_FULL,
    _E_INITED,
    _E_NO_REPLACE,
    _E_NOT_DELETED,
    _E_NOT_FOUND,
    _E_NOT_INIT,
    _E_RESIZE,
    _E_UPDATE_DELETED,
    _MAGIC_HNSW,
    _MAX_LABEL,
    F32,
    U64,
    Filter,
    _as_data,
    _as_ids,
    _as_label,
    _as_label_array,
    _as_size,
    _as_threads,
    _check_space,
    _default_threads,
    _empty_result,
    _last_occurrence,
    _normalized,
    _pack,
    _read_file,
    _read_hnswlib_file,
    _unpack,
    _write_file,
    log,
)

__all__ = ["BFIndex", "Index", "InvalidVectorsError"]


# ---------------------------------------------------------------------- Index
class InvalidVectorsError(ValueError, RuntimeError):
    """A batch holds a row the index refuses (NaN, infinity, or distances that would
    overflow): nothing of it was inserted. Caught as ``RuntimeError`` too, as hnswlib's
    errors are."""


def _add(native: _NativeIndex, x: Any, labels: Any, nt: int) -> None:
    try:
        native.add(x, labels, num_threads=nt)
    except ValueError as exc:
        raise InvalidVectorsError(str(exc)) from None


def _refused_rows(x: F32) -> npt.NDArray[np.bool_]:
    """Rows the core refuses under ``l2`` and ``ip`` (cosine runs as ``ip`` here): NaN or
    infinity, or a squared norm above float32's largest / 4, summed in double as it does."""
    finite = np.asarray(np.isfinite(x).all(axis=1))
    x64 = np.where(finite[:, None], x, 0).astype(np.float64)
    norm2 = np.einsum("ij,ij->i", x64, x64)
    return ~finite | (norm2 > float(np.finfo(np.float32).max) / 4)


def _search(
    native: _NativeIndex,
    q: F32,
    k: int,
    ef: int,
    nt: int,
    allowed: list[int] | None = None,
) -> tuple[npt.NDArray[np.int64], F32]:
    # k, ef and the shape are checked before: the core's ValueError is a refused query row.
    try:
        return native.search(q, k, ef=ef, num_threads=nt, filter=allowed)
    except ValueError as exc:
        raise InvalidVectorsError(str(exc)) from None


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

    def _new_native(self, capacity: int, m: int, ef_construction: int, seed: int) -> _NativeIndex:
        # cosine runs as ip on vectors normalised here, like hnswlib: zero vectors allowed.
        return _NativeIndex(
            self._dim,
            metric="l2" if self._space == "l2" else "ip",
            M=m,
            ef_construction=ef_construction,
            capacity=capacity,
            seed=seed,
            alpha=1.0,  # hnswlib's heuristic (hnswcache.Index defaults to a pruning slack)
        )

    def _idx(self) -> _NativeIndex:
        if self._native is None:
            raise RuntimeError(_E_NOT_INIT)
        return self._native

    def _threads(self, num_threads: int) -> int:
        n = num_threads if num_threads > 0 else self._num_threads
        return n if n > 0 else 0

    def _count(self) -> int:
        # (under the lock: mark_deleted moves an element from the core to _deleted in two
        # steps, and a reader between them counted it twice or not at all)
        with self._lock:
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
            # hnswlib builds with max(ef_construction, M), and reports that value
            efc = max(_as_size(ef_construction, "init_index", "ef_construction"), m)
            seed = _as_size(random_seed, "init_index", "random_seed")
            self._reset()
            self._max_elements = max_elements
            self._M, self._ef_construction, self._seed = m, efc, seed
            self._allow_replace_deleted = bool(allow_replace_deleted)
            self._native = self._new_native(min(max_elements, 1 << 20), m, efc, seed)

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
                raise OverflowError("hnswcache labels must be below 2**63 - 1")
            if self._normalize:
                x = _normalized(x)
            if not self._deleted and self._count() + rows <= self._max_elements:
                keep = _last_occurrence(labels) if rows > 1 else np.arange(rows)
                if keep.shape[0] != rows:
                    _add(native, x[keep], labels[keep], nt)
                else:
                    _add(native, x, labels, nt)
            else:
                self._add_rows(x, labels, nt, bool(replace_deleted))
            self._cur_l += rows

    def _add_rows(
        self, x: F32, labels: npt.NDArray[np.int64], nt: int, replace_deleted: bool
    ) -> None:
        """Row by row: capacity, deleted elements and replacement, as hnswlib decides them.

        The bookkeeping is planned first and applied only once the core has taken the rows:
        a batch the core refuses (a NaN row) must leave deleted elements and vacancies as
        they were."""
        native = self._idx()
        used = self._count()
        deleted = self._deleted
        taken: set[int] = set()  # deleted labels this batch revives or whose place it reuses
        vacancies = iter(deleted)  # reused oldest mark first, as the dict's order has them
        ghosts = 0
        pending: dict[int, int] = {}
        error: str | None = None

        def take_vacancy() -> bool:
            if len(taken) == len(deleted):
                return False
            # Labels not yet yielded include every one not taken, so this finds one.
            for lab in vacancies:
                if lab not in taken:
                    taken.add(lab)
                    return True
            return False  # pragma: no cover - unreachable, see above

        for row, lab in enumerate(labels.tolist()):
            if lab in deleted and lab not in taken:
                if not replace_deleted and self._allow_replace_deleted:
                    error = _E_UPDATE_DELETED
                    break
                taken.add(lab)  # its own place is reused: the count is unchanged
            elif lab in pending or lab in native:
                # hnswlib moves the label into a deleted element's place and leaves the
                # old place counted but unreachable.
                if replace_deleted and take_vacancy():
                    ghosts += 1
            elif replace_deleted and take_vacancy():
                pass
            elif used >= self._max_elements:
                error = _E_FULL
                break
            else:
                used += 1
            pending[lab] = row
        if pending:
            rows = np.fromiter(pending.values(), dtype=np.intp, count=len(pending))
            _add(native, x[rows], labels[rows], nt)
        for lab in taken:
            del deleted[lab]
        self._ghosts += ghosts
        if error is not None:
            raise RuntimeError(error)

    # ------------------------------------------------------------------ queries
    def knn_query(
        self, data: Any, k: int = 1, num_threads: int = -1, filter: Filter | None = None
    ) -> tuple[U64, F32]:
        """The ``k`` nearest elements of each row: ``(labels uint64, distances float32)``,
        both ``(rows, k)``, nearest first. ``filter(label) -> bool`` admits labels.

        Raises ``RuntimeError`` when fewer than ``k`` elements can be returned, and
        :class:`InvalidVectorsError` (a ``RuntimeError``) naming the first row with NaN or
        infinity, or under ``l2``/``ip`` a squared norm above 8.5e37 (hnswlib answers such a
        row with meaningless distances).
        """
        native = self._idx()
        k = _as_size(k, "knn_query", "k")
        nt = self._threads(_as_threads(num_threads, "knn_query"))
        x = _as_data(data, self._dim)
        rows = x.shape[0]
        if rows == 0 or k == 0:
            return _empty_result(rows, k)
        if k > len(native):
            # (fewer live elements than k: hnswlib's error, before the core's own bound
            # on k, which named the query's vectors)
            raise RuntimeError(_E_FEW)
        if self._normalize:
            x = _normalized(x)
        # (an ef above the core's bound searches as the bound does: past the count, a
        # larger ef changes nothing)
        ef = max(min(self._ef, _MAX_EF), k, 1)
        if filter is None:
            labels, dist = _search(native, x, k, ef, nt)
            if (labels < 0).any():
                raise RuntimeError(_E_FEW)
            return labels.astype(np.uint64), dist
        # The first pass runs on the whole batch: the core checks every row (naming the
        # batch's row) before the filter is ever called, and it uses the threads asked for.
        live = len(native)
        kk = min(max(2 * k, 16), max(live, 1))
        first_l, first_d = _search(native, x, kk, max(ef, kk), nt)
        out_l, out_d = _empty_result(rows, k)
        for r in range(rows):
            out_l[r], out_d[r] = self._filtered(
                native, x[r : r + 1], first_l[r], first_d[r], k, ef, live, filter
            )
        return out_l, out_d

    @staticmethod
    def _filtered(
        native: _NativeIndex,
        q: F32,
        lab: npt.NDArray[np.int64],
        d: F32,
        k: int,
        ef: int,
        live: int,
        filter: Filter,
    ) -> tuple[U64, F32]:
        """The ``k`` nearest admitted elements of one query, given its first candidates
        (``lab``, ``d``: a search for ``len(lab)`` at ``ef`` at least).

        hnswlib keeps ``ef`` admitted candidates, so it explores about ``ef / rate``
        elements, ``rate`` being the share the filter admits; with the rate seen so far,
        the search is redone that wide, and for at least ``k / rate`` results (doubling
        while fewer than ``k`` pass). Past an eighth of the live elements a wider search
        would cost more than asking the filter once per live label, so the core then
        searches with that allow-list (it walks the graph through the others and answers
        exactly from the allowed entries when they are few). The filter is asked about
        each label once per query."""
        verdicts: dict[int, bool] = {}

        def admits(label: int) -> bool:
            v = verdicts.get(label)
            if v is None:
                v = verdicts[label] = bool(filter(label))
            return v

        cap = live // 8
        kk = lab.shape[0]
        wide = max(ef, kk)
        while True:
            valid = lab >= 0
            lab, d = lab[valid], d[valid]
            seen = lab.shape[0]
            admitted = np.fromiter(map(admits, lab.tolist()), dtype=bool, count=seen)
            passed = int(admitted.sum())
            # rate ~ passed / seen; with none passed it is at most about 1 / seen.
            per = max(passed, 1)
            need_wide = -(-ef * seen // per)
            # (fewer candidates than asked: the graph has no more to give)
            if passed >= k and (4 * wide >= 3 * need_wide or seen < kk or wide >= cap):
                take = np.flatnonzero(admitted)[:k]
                return lab[take].astype(np.uint64), d[take]
            if seen < kk or wide >= cap:
                break
            want = -(-5 * k * seen // (4 * per))  # k / rate, with a margin
            kk = min(max(want, 2 * kk if passed < k else kk), live)
            # A rate seen on a few admitted labels is rough: one try at the cap before the
            # allow-list, whatever the estimate.
            wide = min(max(need_wide, kk), cap)
            kk = min(kk, wide)
            labels, dist = _search(native, q, kk, wide, 1)
            lab, d = labels[0], dist[0]
        allowed = [v for v in native.labels().tolist() if admits(v)]
        if len(allowed) < k:
            raise RuntimeError(_E_FEW)
        labels, dist = _search(native, q, k, ef, 1, allowed)
        if (labels < 0).any():
            raise RuntimeError(_E_FEW)
        return labels[0].astype(np.uint64), dist[0]

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
            # (hnswlib reads the first len(ids) values of the flattened array)
            labels = arr.reshape(-1)[: arr.shape[0]]
        if labels.size == 0:
            return [] if return_type == "list" else np.array([], dtype=np.float32)
        with self._lock:  # (see _count)
            if any(int(v) in self._deleted for v in labels):
                raise RuntimeError(_E_NOT_FOUND)
            try:
                vectors = native.get(labels)
            except KeyError as exc:
                raise RuntimeError(_E_NOT_FOUND) from exc
        return vectors.tolist() if return_type == "list" else vectors

    def get_ids_list(self) -> list[int]:
        """Labels of all elements, the ones marked deleted included."""
        with self._lock:  # (see _count)
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
            _add(native, vec[None, :], [lab], 1)  # refused (a NaN row from a file): stays deleted
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

    def index_file_size(self) -> int:
        """The size in bytes of what ``save_index`` writes."""
        with self._lock:
            return len(self._to_bytes())

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
        """Load our own format; ``max_elements=None`` keeps the stored limit (unpickling).
        Everything is read before this index changes: a file that fails leaves it as it
        was."""
        header, (core, dl, dv) = _unpack(_MAGIC_HNSW, data, 3)
        if header.get("space") != self._space or header.get("dim") != self._dim:
            raise RuntimeError(
                f"{_E_CORRUPT}: the file holds a {header.get('space')!r} index of dimension "
                f"{header.get('dim')}, this index is {self._space!r} of dimension {self._dim}"
            )
        try:
            m, efc, seed, ghosts, saved_max = (
                int(header[key])
                for key in ("M", "ef_construction", "seed", "ghosts", "max_elements")
            )
            native = _NativeIndex.from_bytes(core)
            labels = np.frombuffer(dl, dtype=np.int64)
            vectors = np.frombuffer(dv, dtype=np.float32).reshape(labels.shape[0], self._dim)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise RuntimeError(f"{_E_CORRUPT}: {exc!r}") from exc
        deleted = {int(lab): vectors[i].copy() for i, lab in enumerate(labels)}
        self._install(native, m, efc, seed, deleted, ghosts)
        self._finish_load(
            saved_max, saved_max if max_elements is None else max_elements, allow_replace_deleted
        )

    def _from_hnswlib(self, data: bytes, max_elements: int, allow_replace_deleted: bool) -> None:
        """Rebuild an index saved by hnswlib: the new graph is complete before it replaces
        this one, so a file that fails leaves this index as it was."""
        header, labels, vectors, deleted = _read_hnswlib_file(data, self._dim)
        keep = _last_occurrence(labels) if labels.size else np.empty(0, dtype=np.intp)
        live = keep[~deleted[keep]]
        # hnswlib stores NaN rows; the core refuses them. Name them rather than drop them:
        # a load that silently loses elements would go unnoticed.
        bad = live[_refused_rows(vectors[live])]
        if bad.size:
            shown = labels[bad[:10]].tolist()
            more = f" and {bad.size - 10} more" if bad.size > 10 else ""
            raise InvalidVectorsError(
                f"the hnswlib file holds {bad.size} element(s) with NaN or infinity, or a "
                f"squared norm above 8.5e37, which this index refuses: labels {shown}{more}; "
                "nothing was loaded"
            )
        m, efc = header["M"], header["ef_construction"]
        try:
            native = self._new_native(labels.shape[0], m, efc, 100)
        except ValueError as exc:  # parameters the core does not take (M above 2048)
            raise RuntimeError(f"{_E_CORRUPT}: {exc}") from exc
        if live.size:
            _add(native, vectors[live], labels[live], 0)
        dead = {int(labels[i]): vectors[i] for i in keep[deleted[keep]]}
        self._install(native, m, efc, 100, dead, labels.shape[0] - keep.shape[0])
        self._finish_load(header["max_elements"], max_elements, allow_replace_deleted)
        log.info("rebuilt an hnswlib index file: %d elements", labels.shape[0])

    def _install(
        self,
        native: _NativeIndex,
        m: int,
        ef_construction: int,
        seed: int,
        deleted: dict[int, F32],
        ghosts: int,
    ) -> None:
        """Swap in a loaded index (nothing here can fail half-way)."""
        self._reset()
        self._native = native
        self._M, self._ef_construction, self._seed = m, ef_construction, seed
        self._deleted = deleted
        self._ghosts = ghosts

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
        stored limit. A load that fails leaves this index as it was; a file of hnswlib's
        holding an element with NaN or infinity (not marked deleted) is refused with
        :class:`InvalidVectorsError` naming its labels."""
        max_elements = _as_size(max_elements, "load_index", "max_elements")
        data = _read_file(path_to_index)
        with self._lock:
            replaced = self._native is not None
            if data.startswith(_MAGIC_HNSW):
                self._from_bytes(data, max_elements, allow_replace_deleted)
            else:
                self._from_hnswlib(data, max_elements, allow_replace_deleted)
            if replaced:  # only once loaded: a load that fails keeps the old index
                log.warning(
                    "Calling load_index for an already inited index. "
                    "Old index is being deallocated."
                )

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
