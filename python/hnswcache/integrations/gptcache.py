"""A GPTCache vector store backed by :class:`hnswcache.Index`.

Use it wherever GPTCache takes a ``VectorBase``::

    from gptcache.manager import CacheBase, get_data_manager
    from hnswcache.integrations.gptcache import HnswCacheVectorStore

    data_manager = get_data_manager(CacheBase("sqlite"), HnswCacheVectorStore(dimension=384))

GPTCache normalises embeddings before it stores or searches them and scores hits by distance
(``SearchDistanceEvaluation``: smaller is closer, at most 4), so this store indexes with the
squared L2 metric: on unit vectors that is ``2 - 2 cos``, in ``[0, 4]``, the distance GPTCache's
own hnswlib and faiss stores return. ``search`` returns ``[(distance, id), ...]`` with plain
Python ``float`` and ``int``, nearest first.

What hnswcache adds: entries can expire (``ttl=`` for every entry, or :meth:`set_ttl` per id);
an expired entry is never returned by ``search``, so GPTCache treats the question as a miss and
stores a fresh answer. The index persists to ``index_path`` on ``flush``/``close`` and is read
back when the store is created again.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..index import Clock, Index, _has_duplicates

try:
    from gptcache.manager.vector_data.base import VectorBase, VectorData
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hnswcache.integrations.gptcache needs GPTCache: pip install 'hnswcache[gptcache]'"
    ) from exc

__all__ = ["HnswCacheVectorStore"]

log = logging.getLogger("hnswcache.integrations.gptcache")


class HnswCacheVectorStore(VectorBase):  # type: ignore[misc]
    """GPTCache ``VectorBase`` over an in-process, TTL-aware HNSW index.

    Args:
        dimension: embedding dimension.
        top_k: results of ``search`` when GPTCache asks for the default (``top_k=-1``).
        index_path: file the index is saved to by ``flush``/``close`` and loaded from at
            creation when it exists; ``None`` keeps it in memory only.
        ttl: seconds each added entry lives (``None``: no expiry).
        M, ef_construction, ef_search: HNSW parameters (see :class:`hnswcache.Index`;
            defaults 16, 200, 64). An index loaded from ``index_path`` keeps the ``M`` and
            ``ef_construction`` it was built with (a different value given is logged).
        clock: the index clock (seconds), for tests.
        alpha: the graph's pruning slack (``Index(alpha=)``; default 1.2, 1 for ``M < 8``);
            like ``M``, a loaded index keeps its own.
    """

    def __init__(
        self,
        dimension: int,
        *,
        top_k: int = 1,
        index_path: str | os.PathLike[str] | None = None,
        ttl: float | None = None,
        M: int | None = None,  # noqa: N803 - the name of the HNSW parameter
        ef_construction: int | None = None,
        ef_search: int = 64,
        clock: Clock | None = None,
        alpha: float | None = None,
    ) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self._dimension = int(dimension)
        self._top_k = int(top_k)
        self._ttl = ttl
        self._path = os.fspath(index_path) if index_path is not None else None
        self._lock = threading.Lock()
        if self._path is not None and os.path.isfile(self._path):
            self._index = Index.load(self._path, clock=clock)
            if self._index.dim != self._dimension or self._index.metric != "l2":
                raise ValueError(
                    f"{self._path} holds a {self._index.metric} index of dimension "
                    f"{self._index.dim}, expected l2 of dimension {self._dimension}"
                )
            # The file keeps its graph (M, ef_construction, alpha); the search effort is
            # ours. Given values that differ are said, not silently dropped.
            self._index.ef_search = ef_search
            given = {"M": M, "ef_construction": ef_construction, "alpha": alpha}
            ignored = {name: value for name, value in given.items()
                       if value is not None and value != getattr(self._index, name)}
            if ignored:
                log.warning("%s keeps the graph it was built with: %s ignored (%s)",
                            self._path, ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
                            ", ".join(f"{k}={getattr(self._index, k)!r}" for k in ignored))
            log.info("loaded %d vectors from %s", len(self._index), self._path)
        else:
            self._index = Index(
                self._dimension, metric="l2", M=16 if M is None else M,
                ef_construction=200 if ef_construction is None else ef_construction,
                ef_search=ef_search, clock=clock, alpha=alpha,
            )

    # ------------------------------------------------------------------ helpers
    def _vectors(self, rows: Sequence[Any]) -> npt.NDArray[np.float32]:
        x = np.asarray(np.stack([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]))
        if x.shape[1] != self._dimension:
            raise ValueError(
                f"embeddings have dimension {x.shape[1]}, the store has {self._dimension}"
            )
        return x

    @staticmethod
    def _ids(ids: Iterable[Any]) -> npt.NDArray[np.int64]:
        # (an integer, or its decimal text; a float id was truncated: 1.5 replaced id 1)
        return np.array([int(i) if isinstance(i, str) else operator.index(i) for i in ids],
                        dtype=np.int64)

    # ------------------------------------------------------------------ VectorBase
    def mul_add(self, datas: list[VectorData]) -> None:
        """Insert (or replace) vectors under their GPTCache ids, with the store's TTL.

        A row that is not finite (GPTCache normalises a zero embedding into NaN) is left
        out and logged; the others are added (one such row lost a whole import_data)."""
        if not datas:
            return
        x = self._vectors([d.data for d in datas])
        ids = self._ids(d.id for d in datas)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            log.warning("mul_add: %d of %d vectors are not finite and are not added "
                        "(ids %s)", int((~finite).sum()), len(ids),
                        ids[~finite][:10].tolist())
            x, ids = x[finite], ids[finite]
            if not len(ids):
                return
        if _has_duplicates(ids):
            keep = {int(i): n for n, i in enumerate(ids)}  # the last vector of an id wins
            rows = np.fromiter(keep.values(), dtype=np.intp, count=len(keep))
            x, ids = x[rows], ids[rows]
        with self._lock:
            self._index.add(x, ids, ttl=self._ttl)

    def search(self, data: Any, top_k: int = -1) -> list[tuple[float, int]]:
        """``[(squared L2 distance, id), ...]`` of the nearest live entries, nearest first
        (fewer than ``top_k`` when fewer entries are live; empty on an empty store)."""
        k = self._top_k if top_k is None or top_k <= 0 else int(top_k)
        q = np.asarray(data, dtype=np.float32).reshape(1, -1)
        if not np.isfinite(q).all():
            # (GPTCache normalises a zero embedding into NaN: a miss, as it would be for
            # its own stores, not an error out of cache.get)
            return []
        # (No len() check for an empty store: with entries that may have expired it scans
        # every one, 0.8 ms a call at 100k rows; an empty index answers with padding.)
        labels, dist = self._index.search(q, k, ef=max(k, self._index.ef_search))
        return [
            (float(d), int(lab)) for lab, d in zip(labels[0], dist[0]) if lab >= 0
        ]

    def rebuild(self, ids: Iterable[Any] | None = None) -> bool:
        """Keep only ``ids`` (all live entries when ``None``) and compact the index."""
        with self._lock:
            if ids is not None:
                keep = set(self._ids(ids).tolist())
                drop = [lab for lab in self._index.labels().tolist() if lab not in keep]
                if drop:
                    self._index.delete(drop)
            stats = self._index.consolidate()
        log.debug("rebuild: %s", stats)
        return True

    def delete(self, ids: Iterable[Any]) -> bool:
        """Remove entries by id (unknown ids are ignored)."""
        arr = self._ids(ids)
        if arr.size:
            with self._lock:
                self._index.delete(arr)
        return True

    def flush(self) -> None:
        """Save the index to ``index_path`` (nothing to do without one)."""
        if self._path is not None:
            with self._lock:
                self._index.save(self._path)

    def close(self) -> None:
        self.flush()

    def count(self) -> int:
        """Number of live (not deleted, not expired) entries."""
        return len(self._index)

    def get_embeddings(self, data_id: int | str) -> npt.NDArray[np.float32] | None:
        """The stored vector of ``data_id``, or ``None`` when it is unknown or expired."""
        try:
            return self._index.get(self._ids([data_id]))[0]
        except KeyError:
            return None

    def update_embeddings(self, data_id: int | str, emb: Any) -> None:
        """Replace the vector of a live ``data_id``, keeping its expiry. An unknown or
        expired id is left alone: re-adding it with a fresh TTL brought an expired entry
        back (GPTCache calls this after a hit, which may have expired since)."""
        label = int(self._ids([data_id])[0])
        x = self._vectors([emb])
        with self._lock:
            try:
                expires: Any = self._index.expiry([label])
            except KeyError:
                log.debug("update_embeddings: %d is not live, left alone", label)
                return
            self._index.add(x, [label], expires_at=expires)

    # ------------------------------------------------------------------ TTL
    def set_ttl(self, ids: Iterable[Any], ttl: float | None) -> int:
        """Give live entries a new lifetime from now (``None``: never expire); returns how
        many were live."""
        arr = self._ids(ids)
        with self._lock:
            return self._index.touch(arr, ttl=ttl)

    @property
    def index(self) -> Index:
        """The underlying :class:`hnswcache.Index`."""
        return self._index
