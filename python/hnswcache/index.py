"""The native HNSW index as Python sees it: argument checking, time, and typed results.

All graph work happens in :mod:`hnswcache._core` (C++). This module converts Python
arguments (seconds, lists, float64 arrays) into what the core takes (C-contiguous
float32 rows, int64 labels, absolute expiry times in integer nanoseconds) and back.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core

_log = logging.getLogger(__name__)

__all__ = ["Index", "NEVER"]

#: Expiry value meaning "never expires" (also what ``expires_at=None`` means).
NEVER: float = float("inf")

_NEVER_NS = np.iinfo(np.int64).max
# The most entries an index can hold (2**28): the largest ``capacity`` and ``k``.
_MAX_SLOTS: int = int(_core.max_slots)
_MAX_LABEL = 2**63 - 2
_MAX_EF = 2**20
_SIZE_MAX = 2**64 - 1
_METRICS = ("cosine", "ip", "l2")
_DTYPES = ("float32", "float16", "int8")
#: The pruning slack of a new index with ``M >= 8`` (see :class:`Index`).
DEFAULT_ALPHA = 1.2

ArrayLike = npt.ArrayLike | Iterable[float]

Clock = Callable[[], float]


def check_search_starts(value: Any) -> int:
    """``value`` as a valid :attr:`Index.search_starts` (an integer in [1, 64])."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or not 1 <= value <= 64:
        raise ValueError(f"search_starts must be an integer in [1, 64], got {value!r}")
    return int(value)


_F32 = np.dtype(np.float32)


def _threads(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _SIZE_MAX:
        raise ValueError(f"num_threads must be an integer >= 0 (0 = all cores), got {n!r}")
    return int(n)


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    """``int(value)`` if it lies in ``[lo, hi]``; else ``ValueError`` (the core's integer
    arguments would otherwise answer with pybind11's "incompatible function arguments")."""
    try:
        v = int(value)
    except OverflowError:  # int(inf)
        v = None
    if v is None or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return v


def _ns(t: Any, what: str) -> int:
    """Seconds ``t`` as integer nanoseconds, which must fit an int64 (years 1677 to 2262)."""
    try:
        ns = round(float(t) * 1e9)
    except (OverflowError, ValueError):  # inf, NaN
        ns = None
    # INT64_MAX is "never", INT64_MIN "deleted": neither is a time.
    if ns is None or not -_NEVER_NS <= ns < _NEVER_NS:
        raise ValueError(
            f"{what} must be a finite time in seconds between the years 1677 and 2262 "
            f"(integer nanoseconds), got {t!r}")
    return ns


def _search_argument_problem(
    k: int, ef: int, t: Any, from_clock: bool, num_threads: int
) -> ValueError | None:
    """The error an out-of-range argument of :meth:`Index.search` deserves, if any."""
    if k > _MAX_SLOTS:
        return ValueError(f"k must be a positive integer at most 2**28, got {k!r}")
    if ef > _SIZE_MAX:
        return ValueError(f"ef must be a positive integer, got {ef!r}")
    try:
        _threads(num_threads)
        _ns(t, "the clock's time" if from_clock else "now")
    except ValueError as e:
        return e
    return None


def _fs_path(path: Any) -> str:
    """A path argument (str, bytes or os.PathLike) as a str, refused with ``ValueError`` if
    it holds a NUL: the core takes a C string, which would end at the NUL and name another
    file (``load('real.hnsw\\0x')`` loaded real.hnsw; a save truncated it)."""
    p = os.fsdecode(os.fspath(path))
    if "\0" in p:
        raise ValueError(f"path contains a NUL character: {p!r}")
    return p


def _create_temp(target: str) -> tuple[int, str]:
    """A new, unique file beside ``target`` (``O_EXCL``, as ``tempfile.mkstemp`` makes
    one, but with the permissions ``open()`` gives, not 0600): its descriptor and path."""
    directory, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name[:64]}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:  # named after the target (the temporary name is ours)
            raise type(e)(e.errno, e.strerror, target) from None
    raise FileExistsError(f"no unique temporary name for {target!r}")


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _as_labels(labels: Any, what: str = "labels") -> npt.NDArray[np.int64]:
    arr = np.asarray(labels)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} must fit in a signed 64-bit integer")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.size and int(out.min()) < 0:
        raise ValueError(f"{what} must be >= 0 (-1 is reserved for padding in search results)")
    return out


def _has_duplicates(labels: npt.NDArray[np.int64]) -> bool:
    """Whether a 1-D integer array repeats a value.

    Sorted neighbours, not ``np.unique``: NumPy >= 2.3 takes the GIL back inside a C++
    frame of its hash-based unique, and on Python <= 3.13 a daemon thread that does so
    while the interpreter exits is ended by a forced unwind that aborts the process there
    ("terminate called without an active exception"). Sorting takes the GIL back in C.
    """
    if labels.shape[0] < 2:
        return False
    s = np.sort(labels)
    return bool((s[1:] == s[:-1]).any())


class Index:
    """A layered HNSW graph whose entries can expire.

    Args:
        dim: vector dimension (>= 1).
        metric: ``"cosine"`` (distance ``1 - cos``; vectors are normalised on insert),
            ``"ip"`` (distance ``1 - dot``) or ``"l2"`` (squared Euclidean distance).
        M: links per node on the upper layers (``2 * M`` on layer 0).
        ef_construction: candidate list size while inserting.
        ef_search: default candidate list size while searching (raised to ``k`` if smaller).
        capacity: a hint of how many entries will be stored, at most 2**28 (the most an
            index holds); the index grows past it. Memory is allocated
            as entries arrive, not for the hint.
        seed: seed of the random level generator (builds with one thread are reproducible).
        clock: returns the current time in seconds (default :func:`time.time`); every call
            reads it once, so a test can control time exactly.
        auto_consolidate: when the fraction of dead (expired or deleted) slots passes this
            value, ``add`` removes them first; ``None`` turns it off.
        background_consolidation: the automatic pass runs in a thread of its own instead
            of inside the ``add`` that finds it due (see :attr:`background_consolidation`).
        dtype: how vectors are stored. ``"float32"`` is exact: the graph walk reads the high
            16 bits of each value (bfloat16) and the final candidates are re-ranked with the
            full float32, so results, distances and ``get()`` are exact. ``"float16"`` halves
            the memory (11 significant bits: ample for normalised embeddings; queries and
            arithmetic stay float32; values beyond 65504 are rejected under ip/l2).
            ``"int8"`` keeps a quarter of float32's bytes: each vector as one float32 scale
            and 8-bit codes (``x ~= scale * code``, ``|code| <= 127``). The graph walk then
            gathers half the bytes of float32's walk, but distances and ``get()`` are those
            of the quantised vector (for unit vectors the cosine is typically off by ~1e-3):
            for users that re-score their hits on the exact vectors, as the cache does.
        alpha: pruning slack of the neighbour selection, in [1, 2]. ``1`` is the HNSW
            paper's heuristic (hnswlib's); above it, a node keeps some longer links (the
            ``alpha`` of DiskANN's RobustPrune), which keeps small clusters far from the
            bulk of the data reachable. Default (``None``): 1.2, or 1 when ``M < 8`` (lists
            that short lose more by it than they gain). Measured in
            ``docs/architecture.md`` ("Pruning slack"): on 100k real embeddings 1.2 raises
            recall at equal ``ef`` and finds a foreign cluster's entries that ``alpha=1``
            loses, for 19-30% longer builds. Saved with the index.
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        M: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        capacity: int = 0,
        seed: int = 100,
        clock: Clock | None = None,
        auto_consolidate: float | None = 0.10,
        dtype: str = "float32",
        alpha: float | None = None,
        background_consolidation: bool = False,
    ) -> None:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        dim = _int_in(dim, "dim", 1, 65536)
        M = _int_in(M, "M", 2, 2048)  # noqa: N806 - the name of the HNSW parameter
        ef_construction = _int_in(ef_construction, "ef_construction", 1, _MAX_EF)
        capacity = _int_in(capacity, "capacity", 0, _MAX_SLOTS)
        seed = _int_in(seed, "seed", 0, _SIZE_MAX)
        if auto_consolidate is not None and not 0.0 < auto_consolidate <= 1.0:
            raise ValueError("auto_consolidate must be in (0, 1] or None")
        self._clock: Clock = clock if clock is not None else time.time
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if alpha is None:
            alpha = DEFAULT_ALPHA if M >= 8 else 1.0
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
            raise TypeError(f"alpha must be a number in [1, 2], got {alpha!r}")
        try:
            ok = 1.0 <= float(alpha) <= 2.0  # (NaN fails too)
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise ValueError(f"alpha must be in [1, 2], got {alpha!r}")
        self._native = _core.Index(
            dim, metric, M, ef_construction, capacity, seed, dtype, float(alpha),
        )
        self.ef_search = ef_search
        self._native.auto_consolidate = float(auto_consolidate or 0.0)
        self._init_background()
        self.background_consolidation = background_consolidation

    # ------------------------------------------------------------------ time
    def _now_ns(self, now: float | None = None) -> int:
        if now is None:
            return _ns(self._clock(), "the clock's time")
        return _ns(now, "now")

    def _expiry_ns(
        self, n: int, ttl: Any, expires_at: Any, now_ns: int
    ) -> npt.NDArray[np.int64]:
        if ttl is not None and expires_at is not None:
            raise ValueError("give ttl or expires_at, not both")
        if ttl is None and expires_at is None:
            return np.full(n, _NEVER_NS, dtype=np.int64)
        value = np.asarray(ttl if ttl is not None else expires_at, dtype=np.float64)
        if value.ndim == 0:
            value = np.full(n, float(value))
        if value.shape != (n,):
            raise ValueError(f"ttl/expires_at must be a number or have shape ({n},)")
        if np.isnan(value).any():
            raise ValueError("ttl/expires_at must not be NaN")
        if ttl is not None and (value < 0).any():
            raise ValueError("ttl must be >= 0 seconds")
        # Whole nanoseconds, added in integers: a float64 sum with a wall-clock now_ns
        # (about 1.8e18) would be off by up to 128 ns.
        delta = np.rint(value * 1e9)
        if ttl is not None:
            delta[(value > 0) & (delta < 1)] = 1  # a positive ttl never expires on the spot
            limit = float(_NEVER_NS - now_ns)
        else:
            limit = float(_NEVER_NS)
        delta = np.maximum(delta, -float(2**62))  # far past, never the deletion mark
        out = np.full(n, _NEVER_NS, dtype=np.int64)
        finite = delta < limit
        out[finite] = delta[finite].astype(np.int64) + (now_ns if ttl is not None else 0)
        return out

    def _as_vectors(self, vectors: ArrayLike, what: str) -> npt.NDArray[np.float32]:
        arr = np.asarray(vectors)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{what} must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be 1-D or 2-D, got {arr.ndim}-D")
        if arr.shape[1] != self.dim:
            raise ValueError(f"{what} have dimension {arr.shape[1]}, the index has {self.dim}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    # ------------------------------------------------------------------ writes
    def add(
        self,
        vectors: ArrayLike,
        labels: Any = None,
        *,
        ttl: float | npt.ArrayLike | None = None,
        expires_at: float | npt.ArrayLike | None = None,
        num_threads: int = 0,
    ) -> npt.NDArray[np.int64]:
        """Insert or replace (upsert) vectors; returns their labels.

        ``labels`` (each in ``0 .. 2**63 - 2``) default to a running counter. ``ttl``
        (seconds from now) or ``expires_at`` (absolute, seconds on the index clock) set when
        each entry expires; a scalar applies to all rows. ``num_threads=0`` uses all cores.
        The batch is validated whole before anything is inserted: ``ValueError`` for NaN or
        infinity, a zero row under cosine, or under ip and l2 a row whose squared norm
        exceeds 8.5e37 (its distances would overflow float32).
        """
        x = self._as_vectors(vectors, "vectors")
        n = x.shape[0]
        lab = None
        if labels is not None:
            lab = _as_labels(labels)
            if lab.shape[0] != n:
                raise ValueError(f"got {n} vectors but {lab.shape[0]} labels")
            if _has_duplicates(lab):
                raise ValueError("duplicate labels in one batch")
        now_ns = self._now_ns()
        exp = self._expiry_ns(n, ttl, expires_at, now_ns)
        # Without labels the core takes them from its counter once the batch is valid: a
        # refused batch consumes none.
        with _GATE:
            out = self._native.add(x, lab, exp, now_ns, _threads(num_threads))
        if self._native.take_consolidation_due():
            self._consolidate_in_background()
        return out

    def delete(self, labels: Any) -> int:
        """Delete entries now; returns how many distinct entries were live (an expired one
        is removed too, but not counted). Unknown labels are ignored."""
        return int(self._native.delete(_as_labels(labels), self._now_ns()))

    def touch(
        self,
        labels: Any,
        *,
        ttl: float | npt.ArrayLike | None = None,
        expires_at: float | npt.ArrayLike | None = None,
    ) -> int:
        """Set a new expiry (``ttl`` from now, ``expires_at`` absolute, or neither = never)
        for live entries; returns how many distinct entries were live and changed."""
        lab = _as_labels(labels)
        now_ns = self._now_ns()
        exp = self._expiry_ns(lab.shape[0], ttl, expires_at, now_ns)
        return int(self._native.touch(lab, exp, now_ns))

    def consolidate(self, *, now: float | None = None, num_threads: int = 0) -> dict[str, Any]:
        """Physically remove dead entries and repair the graph around them.

        Returns ``removed``, ``repaired`` (link lists rewritten), ``distances`` computed,
        ``reconnected`` (orphans relinked), ``seconds``, ``blocked_seconds`` (the part of it
        during which searches had to wait), ``inserts_blocked_seconds`` (the same for
        inserts), ``merged`` (repaired lists that kept links an insert made meanwhile) and
        ``pruned`` (lists of entries inserted meanwhile cleared of links to removed ones).
        Searches and inserts go on while repairs are computed: searches wait only while
        they are published, inserts also while the dead entries are counted. One pass runs
        at a time; a second call waits for the first.
        """
        now_ns = self._now_ns(now)
        with _GATE:
            return dict(self._native.consolidate(now_ns, _threads(num_threads)))

    # ------------------------------------------------------------------ background pass
    def _init_background(self) -> None:
        self._bg_thread: threading.Thread | None = None

    @property
    def background_consolidation(self) -> bool:
        """Whether the automatic pass (``auto_consolidate``) runs in a daemon thread.

        Off (the default), the ``add`` that finds the dead share past the threshold runs
        the pass itself and returns after it (1.5 s for 100k int8 rows with 12.5% expired,
        ``bench/consolidate_stall.py``). On, that ``add`` returns at once and a thread runs
        the pass with one core (one background pass at a time in the process, whatever
        the number of indexes: a cache has one per scope); other adds wait only while the
        pass counts the dead and publishes its repairs (tens of ms). Memory is then
        reclaimed a little later: see :meth:`wait_for_consolidation`. Not saved with the
        index.
        """
        return bool(self._native.defer_consolidation)

    @background_consolidation.setter
    def background_consolidation(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"background_consolidation must be a bool, got {on!r}")
        self._native.defer_consolidation = on

    def wait_for_consolidation(self, timeout: float | None = None) -> bool:
        """Wait for a background pass under way; True when none runs any more."""
        t = self._bg_thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def _consolidate_in_background(self) -> None:
        with _GATE.cv:  # (a lock of the module's: a fork renews it in the child)
            if self._bg_thread is not None and self._bg_thread.is_alive():
                return  # (it counts the dead again when done: due again on a later add)
            t = threading.Thread(target=self._background_pass, name="hnswcache-consolidate",
                                 daemon=True)
            self._bg_thread = t
            t.start()

    def _background_pass(self) -> None:
        try:
            # One core: the pass is background work, the other cores serve.
            with _ONE_BACKGROUND_PASS:  # (many scopes crossing at once: one core, not all)
                now_ns = self._now_ns()
                with _GATE:
                    rep = self._native.consolidate(now_ns, 1)
            _log.debug("background consolidation: %s", rep)
        except Exception:  # (a clock that raises, memory): the next due add tries again
            _log.exception("background consolidation failed")

    # ------------------------------------------------------------------ reads
    def search(
        self,
        queries: ArrayLike,
        k: int = 10,
        *,
        ef: int | None = None,
        now: float | None = None,
        num_threads: int = 0,
        filter: Any = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The ``k`` nearest live entries of each query.

        Returns ``(labels, distances)``, both shaped ``(n, k)``, best first. Rows are padded
        with label ``-1`` and distance ``inf`` when fewer than ``k`` entries are live. An entry
        expired at ``now`` (default: the clock) or deleted is never returned.

        ``filter``, a sequence of labels, restricts the results to those labels: the search
        walks through the others as it does through expired entries, and answers exactly from
        the allowed entries when they are few.
        """
        # This is the hot path of a single query (about 1 µs of Python on top of the core's
        # own call): the common case is decided with identity tests only; everything else
        # (shape, contiguity, NaN, zero vectors) is checked by the core.
        if type(k) is not int or k <= 0:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
                raise ValueError(f"k must be a positive integer, got {k!r}")
            k = int(k)
        if ef is None:
            ef = 0
        elif type(ef) is not int or ef <= 0:
            if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef <= 0:
                raise ValueError(f"ef must be a positive integer, got {ef!r}")
            ef = int(ef)
        q = queries
        if type(q) is not np.ndarray or q.dtype is not _F32:
            q = self._as_vectors(queries, "queries")
        t = self._clock() if now is None else now
        if type(num_threads) is not int or num_threads < 0:
            num_threads = _threads(num_threads)
        allowed = None if filter is None else _as_labels(filter, "filter")
        try:
            # _now_ns, inlined (hot path); round() of a float is already an int.
            ns = round(t * 1e9) if type(t) is float else _ns(t, "now" if now is not None
                                                                else "the clock's time")
            return self._native.search(q, k, ef, ns, num_threads, allowed)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError):
            # Out-of-range numbers reach here (not checked above, to keep the hot path
            # short): pybind11 refuses an int beyond 64 bits with a TypeError, round(inf)
            # raises OverflowError. Say which argument it was; else the error stands.
            problem = _search_argument_problem(k, ef, t, now is None, num_threads)
            if problem is None:
                raise
            raise problem from None

    def get(self, labels: Any) -> npt.NDArray[np.float32]:
        """Stored vectors of live entries, shaped ``(n, dim)`` (normalised under cosine).

        Raises ``KeyError`` for a label that is unknown, deleted or expired.
        """
        return self._native.get(_as_labels(labels), self._now_ns())

    def expiry(self, labels: Any) -> npt.NDArray[np.float64]:
        """Absolute expiry time (seconds) of live entries; ``inf`` for never."""
        ns = self._native.expiry(_as_labels(labels), self._now_ns())
        never = ns == _NEVER_NS
        out = ns.astype(np.float64) / 1e9
        # The nearest float can fall below the stored nanoseconds (float64 steps are 238 ns
        # at today's 1.7e9 s): step up to the first float that is the expiry itself, so an
        # entry is dead at ``now=expiry()`` as at its expiry (half of 2,000 were still live).
        for _ in range(4):
            # (compared as integers: a comparison with floats rounds ns too; what a ``now``
            # of that float becomes, as search() rounds it, clipped into int64)
            as_ns = np.clip(np.rint(out * 1e9), -9.2e18, 9.2e18).astype(np.int64)
            early = ~never & (as_ns < ns)
            if not early.any():
                break
            out[early] = np.nextafter(out[early], np.inf)
        out[never] = np.inf
        return out

    def labels(self) -> npt.NDArray[np.int64]:
        """Labels of all live entries, in no particular order."""
        return self._native.live_labels(self._now_ns())

    def __len__(self) -> int:
        """The number of live entries. Constant time while no entry can have expired since
        the last count; otherwise one pass over the entries (until consolidation frees the
        expired ones), so a hot path should not ask for it on every call."""
        return int(self._native.size(self._now_ns()))

    def __contains__(self, label: object) -> bool:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            return False
        lab = int(label)
        if not 0 <= lab <= _MAX_LABEL:  # (never a label, and beyond what the core takes)
            return False
        return bool(self._native.contains(lab, self._now_ns()))

    def stats(self) -> dict[str, Any]:
        """Counts (live, dead, free, allocated), levels, memory bytes and the kernel in use."""
        return dict(self._native.stats(self._now_ns()))

    def check_integrity(self) -> dict[str, Any]:
        """Check every graph invariant; raises ``RuntimeError`` on a violation.

        Returns counts including ``unreachable_live`` (live nodes not reachable from the
        entry point at level 0) and the level-0 degree range.
        """
        return dict(self._native.check_integrity(self._now_ns()))

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self._native.dim)

    @property
    def metric(self) -> str:
        return str(self._native.metric)

    @property
    def dtype(self) -> str:
        """How vectors are stored: ``"float32"``, ``"float16"`` or ``"int8"``."""
        return str(self._native.dtype)

    @property
    def M(self) -> int:  # noqa: N802 - the name of the HNSW parameter
        return int(self._native.M)

    @property
    def ef_construction(self) -> int:
        return int(self._native.ef_construction)

    @property
    def alpha(self) -> float:
        """Pruning slack the graph is built with (see the class docstring)."""
        return float(self._native.alpha)

    @property
    def ef_search(self) -> int:
        return int(self._native.ef_search)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._native.ef_search = _int_in(value, "ef_search", 1, _MAX_EF)

    @property
    def search_starts(self) -> int:
        """How many nodes of the level-1 beam start each level-0 search (1..64, default 2).

        More starts reach a small, isolated cluster (say, a few hundred entries of another
        domain among 100k) at a lower ``ef``, for a few distances on cached 8-bit copies.
        A runtime setting: not saved with the index.
        """
        return int(self._native.search_starts)

    @search_starts.setter
    def search_starts(self, value: int) -> None:
        self._native.search_starts = check_search_starts(value)

    @property
    def rescue_beam(self) -> int:
        """How many level-1 nodes a far search ranks to start again from (0..4096; 0, the
        default, turns the rescue off; it only acts when wider than ``search_starts``).
        Set :attr:`rescue_distance` with it (its default, infinity, rescues nothing).

        A search whose nearest result lies farther than :attr:`rescue_distance` walked into
        the wrong part of the graph or has nothing near it. It walks level 0 again from the
        best ``search_starts`` of that many level-1 nodes and answers the merge of both
        walks (never worse than the first). Under cosine they are the nearest by sign bits
        of a scan of every node of level >= 1 (one bit a dimension), ranked again on their
        8-bit copies, while the scan is the cheaper (from ``M * rescue_beam`` rows, when the
        sign bits start being kept, up to ``32 * M * rescue_beam`` upper nodes, ~520k rows
        at M 16 and 64); otherwise the best of a level-1 beam this wide.
        On 100k sgd rows holding 499 questions of another domain, 128 found 13-14 of the
        14-15 paraphrases whose own question the plain walk missed at ``ef`` 24, and a
        random vector's search took ~2x a plain one (the beam: ~4x), ~1.1x since 2026-12-06's
        fifteenth session (``bench/rescue.py``).
        :class:`~hnswcache.SemanticCache` sets 64: as few lost as 128 over 6 graphs, ~4 µs
        faster (``bench/rescue_width.py``).
        With a rescue set, a walk whose results are full and still farther than
        :attr:`rescue_distance` at its 8th expansion keeps only its ``k`` (at least 4)
        nearest from there, is rescued wherever it ends, and the rescue walks 16 (at least
        ``k``) wide, 8 when even its nearest start is below similarity 0.25 (cosine); never
        wider than ``ef``. A far search's answer is coarser, its nearest included (on
        synthetic 64-d data a reviewer found the nearest of 27 % of random queries farther,
        recall@10 0.27 -> 0.22, while queries near a small cluster gained: recall@1 0.878 ->
        0.951); on 100k sgd rows a random vector's search p50 fell from ~65 to ~34 µs (a
        plain walk ~31), with no paraphrase lost and no sgd request's answer changed. For
        exact answers to far queries, leave the rescue off.
        A runtime setting: not saved with the index.
        """
        return int(self._native.rescue_beam)

    @rescue_beam.setter
    def rescue_beam(self, value: int) -> None:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not ok or not 0 <= value <= 4096:
            raise ValueError(f"rescue_beam must be an integer in [0, 4096], got {value!r}")
        self._native.rescue_beam = int(value)

    @property
    def rescue_distance(self) -> float:
        """The distance past which a search's nearest result starts a rescue (see
        :attr:`rescue_beam`), in the metric's units: ``1 - cos`` under cosine, so 0.6 means
        "nothing found at similarity 0.4 or more". Default infinity (never)."""
        return float(self._native.rescue_distance)

    @rescue_distance.setter
    def rescue_distance(self, value: float) -> None:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_))
        try:
            v = float(value) if ok else math.nan
        except OverflowError:  # (an int past float's range: 10**400)
            v = math.nan
        if math.isnan(v):
            raise ValueError(f"rescue_distance must be a number, got {value!r}")
        self._native.rescue_distance = v

    @property
    def isa(self) -> str:
        """The distance kernel in use: ``avx512``, ``avx2``, ``neon`` or ``scalar``."""
        return str(self._native.isa)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> None:
        """Write the index to ``path``: to a new temporary file beside it, synced to disk, then
        renamed over it, so ``path`` holds the old index or the new one, never a part (also
        when threads or processes save to one path at once)."""
        target = _fs_path(path)
        # A unique name: f"{target}.tmp{pid}" was shared by the threads of one process, and
        # one renamed the file another was still writing.
        fd, tmp = _create_temp(target)
        try:
            try:
                with _GATE:
                    self._native.save(os.fsencode(tmp))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(os.path.dirname(target))

    @classmethod
    def load(
        cls,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        clock: Clock | None = None,
        auto_consolidate: float | None = 0.10,
    ) -> Index:
        """Read an index written by :meth:`save`. Expiry times are absolute, so an entry that
        expired while the index was on disk is dead after loading. Raises ``ValueError`` for a
        truncated, corrupted or foreign file (checked from its header before the rest is
        read), and ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``...) for a file
        that cannot be read."""
        native = _core.Index.load(os.fsencode(_fs_path(path)))
        return cls._wrap(native, clock, auto_consolidate)

    def to_bytes(self) -> bytes:
        """The same format as :meth:`save`, in memory."""
        with _GATE:
            return bytes(self._native.to_bytes())

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        clock: Clock | None = None,
        auto_consolidate: float | None = 0.10,
    ) -> Index:
        """Read an index from what :meth:`to_bytes` (or a file written by :meth:`save`) holds;
        ``ValueError`` as :meth:`load`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # (bytes(10) would be ten zero bytes)
            raise TypeError(
                f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")
        return cls._wrap(_core.Index.from_bytes(bytes(data)), clock, auto_consolidate)

    @classmethod
    def _wrap(cls, native: Any, clock: Clock | None, auto_consolidate: float | None) -> Index:
        self = cls.__new__(cls)
        self._clock = clock if clock is not None else time.time
        self._native = native
        self._native.auto_consolidate = float(auto_consolidate or 0.0)
        self._init_background()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = {"index": self.to_bytes(), "auto_consolidate": self._native.auto_consolidate,
                 "search_starts": self._native.search_starts,
                 "rescue_beam": self._native.rescue_beam,
                 "rescue_distance": self._native.rescue_distance,
                 "background_consolidation": self.background_consolidation}
        if self._clock is not time.time:
            state["clock"] = self._clock
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._clock = state.get("clock", time.time)
        self._native = _core.Index.from_bytes(state["index"])
        self._native.auto_consolidate = float(state["auto_consolidate"])
        self._native.search_starts = int(state.get("search_starts", 2))
        self._native.rescue_beam = int(state.get("rescue_beam", 0))
        self._native.rescue_distance = float(state.get("rescue_distance", math.inf))
        self._init_background()
        self.background_consolidation = bool(state.get("background_consolidation", False))

    def __repr__(self) -> str:
        return (
            f"Index(dim={self.dim}, metric={self.metric!r}, M={self.M}, "
            f"ef_construction={self.ef_construction}, dtype={self.dtype!r}, live={len(self)}, "
            f"isa={self.isa!r})"
        )


class _ForkGate:
    """The native calls that hold an index's locks for long (adds, which may run a
    consolidation; consolidations; saves) pass through here, and a fork waits until none
    is under way, none starting meanwhile. A child inherits the native locks as they were,
    held by threads it does not have: its first insert, pass or save would wait for ever
    (a fork during a background pass hung the child). Searches, deletes and touches are
    short: the native module's own gate (``_core.fork_gate_close``) waits for those, and for
    every other call into the core, once this one has let the long ones end with the GIL
    free (a fork while another thread searched left the child's next pass or save waiting
    for ever)."""

    def __init__(self) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.busy = 0
        self.forking = False

    def __enter__(self) -> None:
        with self.cv:
            while self.forking:
                self.cv.wait()
            self.busy += 1

    def __exit__(self, *exc: object) -> None:
        with self.cv:
            self.busy -= 1
            if self.busy == 0:
                self.cv.notify_all()

    def before_fork(self) -> None:
        self.cv.acquire()  # (held across the fork)
        self.forking = True
        while self.busy:
            self.cv.wait()

    def after_fork_in_parent(self) -> None:
        self.forking = False
        self.cv.notify_all()
        self.cv.release()

    def after_fork_in_child(self) -> None:
        self.cv = threading.Condition(threading.Lock())  # (the parent's, held, is not ours)
        self.busy = 0
        self.forking = False


_GATE = _ForkGate()
#: Background passes run one at a time in the process (see background_consolidation).
_ONE_BACKGROUND_PASS = threading.Lock()


def _after_fork_in_child() -> None:
    global _ONE_BACKGROUND_PASS
    _GATE.after_fork_in_child()
    _ONE_BACKGROUND_PASS = threading.Lock()  # (a parent's pass may have held it)


if hasattr(os, "register_at_fork"):
    # Registered first, so its `before` runs last: after Python's gate is closed, no long
    # call can be waiting at the native gate (which it would then wait for, for ever).
    os.register_at_fork(before=_core.fork_gate_close,
                        after_in_parent=lambda: _core.fork_gate_open(child=False),
                        after_in_child=lambda: _core.fork_gate_open(child=True))
    os.register_at_fork(before=_GATE.before_fork, after_in_parent=_GATE.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
