"""The cache's decisions, with no I/O: keys, validation, the local index replica, change-log
application, hit/miss decisions and stats. :mod:`hnswcache.cache` wraps it in a sync and an
async shell that only move data between this core and a store.

Similarity scale: cosine similarity, a hit when ``similarity >= threshold``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .embed import MINILM_DIM, default_lengths, embedder_dim, embedder_name, embedder_truncates
from .index import Index, check_search_starts
from .store.base import (
    MAX_PROMPT_BYTES,
    MAX_TEXT_BYTES,
    MAX_TTL,
    MAX_VERDICTS,
    VERDICT_MARGIN,
    Cleared,
    Fetched,
    Invalid,
    LogBatch,
    Record,
    Refresh,
    StoreError,
    distinct_rights,
    entry_id,
    format_id,
    normalize_prompt,
    parse_id,
    scope_key,
)

__all__ = ["Hit", "Lookup", "CacheCore", "Stats"]

log = logging.getLogger("hnswcache.cache")

_LATENCY_WINDOW = 10_000
_OWN_POSITIONS_MAX = 200_000
#: Ids whose last change the replica notes for repairs (see CacheCore.gen).
_CHANGED_MAX = 200_000
_EXPIRED_SEEN_MAX = 100_000
_CUT_SEEN_MAX = 200_000

Clock = Callable[[], float]

#: How far the replica's similarity may be from the one recomputed on the stored float32
#: vector, per index dtype: candidates within it of the threshold (or of the best so far)
#: are re-scored. float32: rounding; float16 rows: |error| <= 2**-12 for unit vectors; int8
#: rows (scale = max|x| / 127): |error| <= max|x| / 254 * sum|q|, at most 0.020 on
#: all-MiniLM-L6-v2 vectors (the largest error seen over 20M sgd pairs was 0.003).
SLACK = {"float32": 1e-4, "float16": 1e-3, "int8": 0.02}
#: A search whose nearest entry is below this similarity searches again from the
#: RESCUE_BEAM upper-level nodes nearest the query (``Index.rescue_beam``): the walk may have
#: missed a small cluster of another domain. Among 100k sgd rows holding 499 questions, 14-15
#: paraphrases whose own question brute force finds were missed at ef 24 and 1 with the
#: rescue; far lookups (8 % of the paraphrases, every random vector, no sgd request) take
#: ~1.1x as long (``bench/rescue.py``). 64 nodes, not 128: over 6 graphs both lost 23 of
#: 3,096 paraphrases with an entry at the threshold, 64 ~4 µs faster (32: 25 lost;
#: ``bench/rescue_width.py``).
RESCUE_BELOW = 0.4
RESCUE_BEAM = 64


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Hit:
    """A cached answer.

    Attributes:
        response: the cached response text.
        tier: ``"exact"`` (same normalised prompt) or ``"semantic"`` (nearest neighbour).
        similarity: cosine similarity of the query and the stored prompt (1.0 for exact).
        prompt: the stored prompt that matched.
        key: the entry's key (16 hex digits), for :meth:`SemanticCache.delete`.
        age: seconds since the entry was written.
        expires_at: when it expires (cache clock), or ``None`` for never.
        metadata: what was stored with it.
        scope: the scope it belongs to.
        version: the entry's write token (each write of an entry gets a new one): what
            :meth:`SemanticCache.feedback` judges is this answer, not a later one.
    """

    response: str
    tier: Literal["exact", "semantic"]
    similarity: float
    prompt: str
    key: str
    age: float
    expires_at: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    scope: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    # What makes ref() hard to forge: a keyed hash of key, version and similarity (the
    # key is the namespace's, kept in the store).
    ref_tag: str = field(default="", repr=False)

    def ref(self) -> dict[str, Any]:
        """What :meth:`SemanticCache.feedback` needs to judge this answer later, in another
        request or process: ``{"key", "version", "similarity", "tag"}`` (JSON-ready). The
        tag, a keyed hash under a secret the namespace keeps in its store, makes a ref whose
        similarity (or anything else) was changed fail: a ref may go through a client."""
        out = {"key": self.key, "version": self.version, "similarity": self.similarity}
        if self.ref_tag:
            out["tag"] = self.ref_tag
        return out


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Lookup:
    """What one lookup found: the hit, or how close a miss came (for logging near misses
    and tuning the threshold).

    Attributes:
        hit: the cached answer, or ``None`` for a miss.
        threshold: the similarity threshold the lookup was decided with.
        nearest_similarity: cosine similarity of the nearest entry of the scope: the
            hit's (1.0 for an exact hit); for a miss, the index's similarity of its nearest
            live entry (on ``int8``/``float16`` rows within 0.02/0.005 of the exact one);
            ``None`` when no search ran (an empty scope, the store or the embedder down).
        nearest_key: that entry's key, or ``None``.
        embedding: the vector the prompt was searched with (the embedder's, or the one
            given), or ``None`` when it was not embedded (an exact hit, an outage). Give it
            to ``set(..., embedding=...)`` to store a miss's answer without embedding the
            prompt a second time.
    """

    hit: Hit | None
    threshold: float
    nearest_similarity: float | None
    nearest_key: str | None
    # (not compared: == of two arrays is an array; not in repr: 384 numbers)
    embedding: npt.NDArray[np.float32] | None = field(default=None, compare=False,
                                                       repr=False)

    @property
    def near_miss(self) -> bool:
        """A miss whose nearest entry was at most 0.05 below the threshold (what
        ``stats()["near_misses"]`` counts)."""
        s = self.nearest_similarity
        return (self.hit is None and s is not None
                and self.threshold - NEAR_MISS_BAND <= s < self.threshold)


#: An entry judged wrong at similarity s answers only above s + WRONG_MARGIN.
WRONG_MARGIN = VERDICT_MARGIN

#: A hit on a sliding entry is written back once it moves the expiry by this part of the TTL.
_SLIDE_STEP = 1.0 / 16

#: A miss whose nearest entry is this close below the threshold counts as a near miss.
NEAR_MISS_BAND = 0.05
_MISS_BUCKET = 0.05
_MISS_BUCKETS = 20
#: The upper bounds of the Prometheus histogram's finite buckets, as its text writes them
#: (``le="0.05"`` ... ``le="0.95"``): a value counts in the first bound it does not exceed.
MISS_LE_BOUNDS = tuple(float(f"{(b + 1) * _MISS_BUCKET:.2f}") for b in range(_MISS_BUCKETS - 1))


def _position(value: str) -> tuple[int, int] | None:
    """A change-log position ``"<ms>-<seq>"`` as a comparable pair."""
    ms, _, seq = value.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


#: How far ahead of this process's clock an entry's writer may have been (hosts' clocks
#: differ by seconds) for the entry to count as just written under ``max_age``.
MAX_CLOCK_AHEAD = 300.0


def too_old(rec: Record, now: float, max_age: float) -> bool:
    """Whether ``rec`` is older than ``max_age`` at ``now``. An entry written further in the
    future than :data:`MAX_CLOCK_AHEAD` has no known age: refused by any ``max_age`` (it
    passed every one), used by reads without."""
    age = now - rec.created
    return age > max_age or (age < -MAX_CLOCK_AHEAD and max_age < math.inf)


class Window:
    """The last ``_LATENCY_WINDOW`` durations (seconds) of something timed, and the count
    and sum of all of them."""

    __slots__ = ("values", "count", "total")

    def __init__(self) -> None:
        self.values = np.zeros(_LATENCY_WINDOW, dtype=np.float64)
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.values[self.count % _LATENCY_WINDOW] = seconds
        self.count += 1
        self.total += seconds

    def recent(self) -> npt.NDArray[np.float64]:
        return self.values[: min(self.count, _LATENCY_WINDOW)]


class Stats:
    """Counters, the nearest similarities of misses, and windows of lookup and embedder
    latencies."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(
            ("lookups", "hits_exact", "hits_semantic", "misses", "sets", "deletes",
             "expiries", "evictions", "store_errors", "embed_errors", "invalid_entries",
             "sync_events", "resyncs", "coalesced", "too_old", "near_misses",
             "snapshots_saved", "verdicts_right", "verdicts_wrong", "verdicts_lost",
             "hits_learned", "audits", "exact_only", "unanswered"), 0)
        # Nearest similarity of semantic misses, in buckets of _MISS_BUCKET from 0 (below 0
        # counts in the first).
        self.miss_sims = np.zeros(_MISS_BUCKETS, dtype=np.int64)
        # The same misses in Prometheus' buckets (``le``: at most the bound), which differ
        # from those above for a value exactly on a bound (0.5 is in "0.50" and in le 0.5).
        self.miss_le = np.zeros(_MISS_BUCKETS, dtype=np.int64)
        self.miss_sim_sum = 0.0
        self.lookup_time = Window()  # one get/get_many call each
        self.embed_time = Window()  # one embedder call each (successful ones)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def miss(self, nearest: float, threshold: float) -> None:
        """A semantic miss whose nearest entry had similarity ``nearest``."""
        # (rounded first: 0.6 / 0.05 is 11.999..., which put 0.6 below its bucket's bound)
        b = min(_MISS_BUCKETS - 1, max(0, int(round(nearest / _MISS_BUCKET, 9))))
        self.miss_sims[b] += 1
        self.miss_le[bisect.bisect_left(MISS_LE_BOUNDS, nearest)] += 1
        self.miss_sim_sum += nearest
        if threshold - NEAR_MISS_BAND <= nearest < threshold:
            self.counts["near_misses"] += 1

    def snapshot(self, entries: int) -> dict[str, Any]:
        c: dict[str, Any] = dict(self.counts)
        hits = c["hits_exact"] + c["hits_semantic"]
        c["hits"] = hits
        c["hit_rate"] = hits / (hits + c["misses"]) if hits + c["misses"] else 0.0
        c["entries"] = entries
        c["miss_similarity"] = {f"{b * _MISS_BUCKET:.2f}": int(n)
                                for b, n in enumerate(self.miss_sims) if n}
        for name, w in (("latency", self.lookup_time), ("embed_latency", self.embed_time)):
            window = w.recent()
            for p in (50, 90, 99):
                c[f"{name}_p{p}_us"] = (float(np.percentile(window, p) * 1e6) if window.size
                                        else 0.0)
            c[f"{name}_max_us"] = float(window.max() * 1e6) if window.size else 0.0
        c["embed_calls"] = self.embed_time.count
        return c


class CacheCore:
    """Everything a cache decides, with no I/O: keys, validation, the local index replica,
    log application, hit/miss decisions and stats. Shared by the sync and async shells."""

    def __init__(
        self, *, embedder: Any, threshold: float, ttl: float | None, max_entries: int | None,
        strict: bool, clock: Clock | None, sync_interval: float, candidates: int,
        M: int, ef_construction: int, ef_search: int, dtype: str = "float32",
        search_starts: int = 2, ttl_jitter: float = 0.0, alpha: float | None = None,
        learn_floor: float | None = None, learn_after: int = 3,
        rescue_below: float | None = None,
    ) -> None:
        self.embedder = embedder
        self.threshold = self.check_threshold(threshold)
        if learn_floor is not None:
            learn_floor = self.check_threshold(learn_floor)
            if learn_floor > self.threshold:
                raise ValueError(f"learn_floor ({learn_floor}) is the lowest threshold an "
                                 f"entry may learn: at most threshold ({self.threshold})")
        self.learn_floor = learn_floor
        if isinstance(learn_after, bool) or not isinstance(learn_after, int) or \
                not 1 <= learn_after < MAX_VERDICTS:
            raise ValueError(f"learn_after must be an integer in [1, {MAX_VERDICTS - 1}], "
                             f"got {learn_after!r}")
        self.learn_after = learn_after
        self.ttl = self.check_ttl(ttl)
        if max_entries is not None and (not isinstance(max_entries, int) or max_entries < 1):
            raise ValueError(f"max_entries must be a positive integer or None, got {max_entries!r}")
        self.max_entries = max_entries
        if isinstance(ttl_jitter, bool) or not 0.0 <= ttl_jitter < 1.0:
            raise ValueError(f"ttl_jitter is a fraction of the TTL in [0, 1), got {ttl_jitter!r}")
        self.ttl_jitter = float(ttl_jitter)
        self._rng = random.SystemRandom()  # (a seeded one repeats in forked workers)
        self.strict = bool(strict)
        # The namespace's key for ref() tags, read from the store at the warm start (a store
        # without one: this process's own, so refs check only here).
        self.ref_secret: bytes | None = None
        self.clock: Clock = clock if clock is not None else time.time
        if sync_interval < 0:
            raise ValueError("sync_interval must be >= 0")
        self.sync_interval = float(sync_interval)
        if candidates < 1:
            raise ValueError("candidates must be >= 1")
        self.k = int(candidates)
        self.index_params: dict[str, Any] = {
            "M": int(M), "ef_construction": int(ef_construction), "ef_search": int(ef_search),
            "alpha": alpha}
        # Parameters are checked now, not at the first write of a scope: a throwaway index.
        Index(4, M=int(M), ef_construction=int(ef_construction), ef_search=int(ef_search),
              alpha=alpha, auto_consolidate=None)
        if dtype not in SLACK:
            raise ValueError(f"dtype must be one of {tuple(SLACK)}, got {dtype!r}")
        self.search_starts = check_search_starts(search_starts)
        if rescue_below is not None and (
                isinstance(rescue_below, bool)
                or not isinstance(rescue_below, (int, float, np.integer, np.floating))
                or not -1.0 <= rescue_below <= 1.0):
            raise ValueError(f"rescue_below is a cosine similarity in [-1, 1] or None, got "
                             f"{rescue_below!r}")
        self.rescue_below = None if rescue_below is None else float(rescue_below)
        self.dtype = dtype
        self.slack = SLACK[dtype]
        self.dim: int | None = embedder_dim(embedder) if embedder is not None else None
        self.meta_checked = False
        self.indexes: dict[str, Index] = {}
        self.where: dict[int, tuple[str, str]] = {}  # id -> (scope id, version)
        # Lookups repair the replica from the records they fetched (an entry written
        # elsewhere, not yet in the log; a candidate the store no longer holds). A repair
        # must not undo a change applied after its fetch was sent: a delete or eviction read
        # from the log meanwhile came back for good, a rewrite was dropped. So every change
        # applied here bumps `gen` and notes it per id (`_changed`; past `_CHANGED_MAX` ids
        # the notes are dropped and `_floor` refuses every repair begun before), and a
        # repair runs under `replica_lock` only for ids unchanged since its lookup's `gen`.
        self.gen = 0
        self._changed: dict[int, int] = {}
        self._floor = 0
        self.replica_lock: Any = contextlib.nullcontext()  # (the sync cache's own lock)
        # Inserts the async cache runs in a worker thread (while a snapshot is written): no
        # repair meanwhile (its check and change on the loop's thread could fall between
        # the worker's note and change).
        self.offloaded = 0
        self.position: str | None = None  # change-log position; None until warmed
        self.next_sync = 0.0
        self.retry_at = 0.0  # after a failed warm start, when to try again (monotonic)
        self.touches: set[int] = set()
        self.refreshes: dict[int, Refresh] = {}  # sliding entries hit, to write back
        self._cut_seen: dict[int, tuple[str, bool]] = {}  # cut_entry's answers by version
        self._pending = threading.Lock()
        # Log positions of this process's own writes not yet read back (applied here
        # already: apply_log skips them).
        self.own_positions: set[str] = set()
        # Each entry this process wrote -> the log position of its latest write, kept as
        # the writes are made. (Recomputed from every unread position on every eviction, it
        # cost positions x batch size: one event per entry, each mapped to its whole batch,
        # so after a bulk load of 50k entries with no lookup each evicting set() took ~6 s.)
        # An entry already read back may linger: its position is at or before the
        # replica's, and every own clear or delete it is compared with is after it.
        self.own_last: dict[int, tuple[int, int]] = {}
        self._expired: dict[tuple[int, str], None] = {}  # versions counted in expiries
        self.stats = Stats()
        self._create = threading.Lock()
        self._last_error_log = 0.0
        self._suppressed = 0
        # Called after each store failure (the cache's server may be gone: see the
        # embedded server's takeover in cache.py); never raises.
        self.on_store_error: Callable[[], None] | None = None

    # ------------------------------------------------------------------ arguments
    @staticmethod
    def check_threshold(threshold: float) -> float:
        t = float(threshold)
        if not -1.0 <= t <= 1.0 or math.isnan(t):
            raise ValueError(
                f"threshold is a cosine similarity in [-1, 1] (hit when similarity >= "
                f"threshold), got {threshold!r}"
            )
        return t

    def threshold_for(self, threshold: float | None) -> float:
        """A call's threshold: its own (checked), or the cache's."""
        return self.threshold if threshold is None else self.check_threshold(threshold)

    @staticmethod
    def check_sliding(sliding: bool, ttl: float | None) -> None:
        """A sliding TTL needs a TTL: the one given, or the cache's default."""
        if sliding and ttl is None:
            raise ValueError("sliding=True needs a ttl (given here or the cache's default)")

    @staticmethod
    def check_max_age(max_age: float | None) -> float:
        """A read's ``max_age`` in seconds (``None``: any age, as ``inf``)."""
        if max_age is None:
            return math.inf
        if isinstance(max_age, bool) or not isinstance(max_age, (int, float)):
            raise TypeError(f"max_age must be a number of seconds or None, got {max_age!r}")
        if math.isnan(max_age) or max_age < 0:
            raise ValueError(f"max_age must be >= 0 seconds or None, got {max_age!r}")
        return float(max_age)

    @staticmethod
    def check_ttl(ttl: float | None) -> float | None:
        if ttl is None:
            return None
        t = float(ttl)
        if not t > 0 or math.isnan(t):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if math.isinf(t):
            return None
        if t > MAX_TTL:
            raise ValueError(f"ttl must be at most {MAX_TTL:.4g} seconds (100 years), got "
                             f"{ttl!r}; None (or inf) stores without expiry")
        return t

    def now(self) -> float:
        return float(self.clock())

    @staticmethod
    def within_fields(scope: Mapping[str, Any] | None) -> dict[str, Any]:
        """The fields ``clear(scope, within=True)`` matches: the scope, checked and in its
        canonical JSON form (as stored)."""
        if not scope:
            raise ValueError("clear(within=True) needs the fields to match in scope")
        return dict(json.loads(scope_key(scope)[1]))

    @staticmethod
    def check_prompts(prompts: Sequence[str]) -> None:
        """A batch of prompts must be a sequence, not one str (its characters would be
        looked up one by one)."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of str, got a single "
                            f"{type(prompts).__name__}: use get() for one prompt")

    @staticmethod
    def key(prompt: str, scope: Mapping[str, Any] | None) -> tuple[int, str, str, str]:
        """``(entry id, scope id, scope json, normalised prompt)``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        sid, sjson = scope_key(scope)
        norm = normalize_prompt(prompt)
        return entry_id(sid, norm), sid, sjson, norm

    # ------------------------------------------------------------------ failures
    def failed(self, what: str, exc: BaseException, counter: str = "store_errors") -> None:
        """Count and log (rate-limited) a store or embedder failure; raise if strict."""
        self.stats.add(counter)
        if counter == "store_errors" and self.on_store_error is not None:
            self.on_store_error()
        if self.strict:
            raise exc
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("hnswcache %s failed, degrading to a miss/dropped write: %s%s",
                        what, exc, extra)
            self._last_error_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    # ------------------------------------------------------------------ vectors
    def vectors(self, raw: Any, n: int, *, copy: bool = True) -> npt.NDArray[np.float32]:
        """Validate and unit-normalise embedder output (or given embeddings) to ``(n, dim)``.

        ``copy=False`` (lookups, which keep nothing) returns a single float32 row that is
        already of unit length (within float32 rounding) as it is, without a copy, and does
        not decide the cache's dimension when it is still unknown (a lookup runs before the
        warm start, which takes it from the store: see :meth:`check_dim`)."""
        kind = getattr(raw, "dtype", np.dtype(np.float32)).kind
        if kind not in "biuf":  # (complex parts were dropped with a warning; text raised late)
            raise ValueError(f"embeddings must be real numbers, got dtype {raw.dtype}")
        arr = np.asarray(raw, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"embeddings must have shape ({n}, dim), got {arr.shape}")
        if arr.shape[1] < 2:  # (one number per text: every unit vector is +1 or -1, and
            # every lookup a hit at 1.0)
            raise ValueError(f"embeddings must have at least 2 dimensions, got {arr.shape[1]}")
        self.check_dim(arr)
        out = None
        if arr.shape[0] == 1:  # the common single-lookup case, without array temporaries
            n2 = float(np.dot(arr[0], arr[0]))
            # Outside this range the float32 squared norm may have overflowed (values of
            # ~1e19) or underflowed (~1e-19), or is NaN: the float64 path below decides.
            if 1e-30 < n2 < 1e30:
                if not copy and abs(n2 - 1.0) <= 1e-6 and arr.flags.c_contiguous:
                    return arr  # similarity error <= 5e-7: not worth a copy on the lookup path
                out = np.ascontiguousarray(arr * np.float32(1.0 / math.sqrt(n2)))
        if out is None:
            wide = arr.astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))[:, None]
            if not np.isfinite(norms).all():
                raise ValueError("embeddings contain NaN or infinity")
            if not norms.all():
                raise ValueError("an embedding is the zero vector")
            out = np.ascontiguousarray(wide / norms, dtype=np.float32)
        if self.dim is None and copy:  # only valid vectors that will be stored decide it
            self.dim = int(arr.shape[1])
        return out

    def check_dim(self, vecs: npt.NDArray[np.float32] | None) -> None:
        """Refuse vectors of another dimension than the cache's (when it is known)."""
        if vecs is not None and self.dim is not None and vecs.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {vecs.shape[1]}, the cache has "
                             f"{self.dim}")

    def check_meta(self, stored: tuple[int | None, str]) -> None:
        dim, name = stored
        self.meta_checked = True
        if dim is None:
            return
        if self.dim is not None and dim != self.dim:
            if self.embedder is None:  # the dimension came from this call's vectors: forget it
                self.dim = None
            raise ValueError(
                f"this cache namespace holds {dim}-d vectors (embedder {name!r}) but the "
                f"embedder gives {self.dim}-d: use another namespace (clear() deletes its "
                f"entries, not its dimension)"
            )
        mine = embedder_name(self.embedder) if self.embedder is not None else name
        if name != mine:
            log.warning("cache namespace was written with embedder %r, now read with %r: "
                        "similarities are only meaningful within one model", name, mine)

    # ------------------------------------------------------------------ replica
    def tune(self, idx: Index) -> None:
        """The runtime settings of a scope's index (new or loaded from a snapshot)."""
        idx.search_starts = self.search_starts
        if self.rescue_below is not None:
            idx.rescue_beam, idx.rescue_distance = RESCUE_BEAM, 1.0 - self.rescue_below
        # A lookup or a write must not wait for the removal of the dead.
        idx.background_consolidation = True

    def _index(self, sid: str) -> Index:
        idx = self.indexes.get(sid)
        if idx is None:
            with self._create:  # two threads must not each create the scope's index
                idx = self.indexes.get(sid)
                if idx is None:
                    assert self.dim is not None
                    p = self.index_params
                    idx = Index(self.dim, metric="cosine", clock=self.clock, M=p["M"],
                                ef_construction=p["ef_construction"],
                                ef_search=p["ef_search"], dtype=self.dtype,
                                alpha=p["alpha"])
                    self.tune(idx)
                    self.indexes[sid] = idx
        return idx

    def usable(self, f: Fetched, now: float) -> Record | None:
        """``f`` if it is a valid, live record of the right dimension; counts the rest."""
        if f is None:
            return None
        if isinstance(f, Invalid):
            self.stats.add("invalid_entries")
            log.warning("ignoring invalid cache entry %s: %s",
                        format_id(f.id) if f.id >= 0 else "?", f.reason)
            return None
        if self.dim is None:
            self.dim = int(f.vector.shape[0])
        if f.vector.shape[0] != self.dim:
            self.stats.add("invalid_entries")
            log.warning("ignoring cache entry %s: dimension %d, the cache has %d",
                        format_id(f.id), f.vector.shape[0], self.dim)
            return None
        if f.expired(now):
            return None
        return f

    def _note(self, ids: Iterable[int]) -> None:
        """A change of ``ids`` applied to the replica (see ``gen``)."""
        self.gen += 1
        gen, changed = self.gen, self._changed
        for eid in ids:
            changed[eid] = gen
        if len(changed) > _CHANGED_MAX:
            changed.clear()
            self._floor = gen

    def _note_all(self) -> None:
        """A change of every id (a scope or the whole replica dropped, a rebuild)."""
        self.gen += 1
        self._changed.clear()
        self._floor = self.gen

    def repairable(self, ids: Iterable[int], gen: int | None) -> bool:
        """Whether a lookup that began at ``gen`` may repair ``ids`` from what it fetched:
        none of them changed here since. Under ``replica_lock``."""
        if gen is None or gen < self._floor or self.offloaded:
            return False
        changed = self._changed
        return all(changed.get(eid, -1) < gen for eid in ids)

    def repair_add(self, rec: Record, gen: int | None) -> None:
        """A lookup's fetched ``rec``, newer than the replica's, into it (unless changed
        since the lookup began, see ``gen``)."""
        with self.replica_lock:
            if self.repairable((rec.id,), gen):
                self.add_records([rec])

    def repair_remove(self, ids: Sequence[int], gen: int | None) -> None:
        """Ids a lookup found gone from the store (or unusable), out of the replica (each
        unless changed since the lookup began)."""
        with self.replica_lock:
            self.remove([e for e in ids if self.repairable((e,), gen)])

    def reconcile_repair(self, ids: Sequence[int], fetched: Sequence[Fetched],
                         gen: int | None) -> None:
        """:meth:`reconcile` of what a fetch sent at ``gen`` read, for the ids unchanged
        here since (a delete applied by another thread meanwhile stays applied)."""
        with self.replica_lock:
            keep = [(i, f) for i, f in zip(ids, fetched) if self.repairable((i,), gen)]
            if keep:
                self.reconcile([i for i, _ in keep], [f for _, f in keep])

    def add_records(self, records: Sequence[Record]) -> None:
        self._note(r.id for r in records)
        exact = [r.id for r in records if r.exact_only]
        if exact:  # (answered by the exact tier only: never indexed, an older write unindexed)
            self.remove(exact)
            records = [r for r in records if not r.exact_only]
        by_scope: dict[str, list[Record]] = {}
        for r in records:
            by_scope.setdefault(r.scope_id, []).append(r)
        for sid, recs in by_scope.items():
            if len(recs) > 1:  # keep the last write of an id within one batch
                recs = list({r.id: r for r in recs}.values())
            idx = self._index(sid)
            idx.add(
                np.stack([r.vector for r in recs]),
                np.array([r.id for r in recs], dtype=np.int64),
                expires_at=np.array([r.expires for r in recs], dtype=np.float64),
                num_threads=1 if len(recs) < 256 else 0,
            )
            for r in recs:
                self.where[r.id] = (sid, r.version)

    def remove(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self._note(ids)
        by_scope: dict[str, list[int]] = {}  # (one native call per scope: a clear's batches)
        for eid in ids:
            w = self.where.pop(eid, None)
            if w is not None:
                by_scope.setdefault(w[0], []).append(eid)
        for sid, eids in by_scope.items():
            idx = self.indexes.get(sid)
            if idx is not None:
                idx.delete(eids)

    def held_in(self, sid: str | None) -> list[int]:
        """The ids the replica holds in scope ``sid`` (``None`` or ``"*"``: every scope; a
        copy, as lookups in other threads add and remove entries meanwhile)."""
        every = sid is None or sid == "*"
        return [e for e, w in list(self.where.items()) if every or w[0] == sid]

    def clear_local(self, sid: str | None, keep: Iterable[int] = ()) -> None:
        """Forget every entry of scope ``sid`` (``None`` or ``"*"``: all) but ``keep``."""
        kept = set(keep)
        self._note_all()
        if kept:
            self.remove([e for e in self.held_in(sid) if e not in kept])
        elif sid is None or sid == "*":
            self.indexes.clear()
            self.where.clear()
        else:
            self.indexes.pop(sid, None)
            for eid in self.held_in(sid):  # (pop: other threads' lookups change `where`)
                self.where.pop(eid, None)

    def reconcile(self, ids: Sequence[int], fetched: Sequence[Fetched]) -> None:
        """Make the replica match the store for ``ids`` (their current stored state)."""
        now = self.now()
        add: list[Record] = []
        gone: list[int] = []
        slid: list[Record] = []
        for eid, f in zip(ids, fetched):
            rec = self.usable(f, now)
            if rec is None:
                gone.append(eid)
            elif self.where.get(eid) != (rec.scope_id, rec.version):
                add.append(rec)
            elif rec.slide > 0:
                slid.append(rec)  # the same write, refreshed: a later expiry
        self.remove(gone)
        self._slide_local(slid)
        if add:
            self.add_records(add)

    def load(self, batch: Sequence[Fetched]) -> None:
        """Warm start: add one scanned batch to the replica."""
        now = self.now()
        if self.dim is None:  # nothing says the dimension: the batch's most common one
            dims = [f.vector.shape[0] for f in batch if isinstance(f, Record)]
            if dims:
                self.dim = max(set(dims), key=dims.count)
        recs = [r for r in (self.usable(f, now) for f in batch) if r is not None]
        if recs:
            self.add_records(recs)

    def brings_nothing(self, batch: LogBatch | None) -> bool:
        """Whether a change-log read changes nothing here (most lookups): no lock needed."""
        return batch is None or (not batch.events and not batch.reset and not batch.more
                                 and batch.position == self.position)

    def stale(self, batch: LogBatch) -> bool:
        """Whether ``batch`` was read from a position the replica has left since: another
        thread applied a read from there first. Applying it again would redo its events
        (refetching every entry they name) and take its own writes for others'."""
        return batch.after is not None and batch.after != self.position

    def unapplied(self, batch: LogBatch) -> LogBatch | None:
        """Of a stale ``batch`` (read from a position the replica has since left), the
        events past the replica's position, as a batch from there; ``None`` if it brings
        nothing new. Dropped whole, as it was, an event acknowledged before this read but
        after the other thread's was left for the next read: a paraphrase asked right after
        another process's write missed (3-5 of 400 with 16 threads looking up)."""
        here = _position(self.position or "")
        start = _position(batch.after or "")
        end = _position(batch.position)
        if batch.reset or here is None or start is None or end is None \
                or not start < here < end:
            return None
        events = [e for e in batch.events
                  if (q := _position(e.pos or "")) is not None and q > here]
        return LogBatch(events, batch.position, more=batch.more, after=self.position)

    def sync_due(self) -> str | None:
        """The log position to read from if a log read is due now, else ``None``."""
        if self.position is None:
            return None
        t = time.monotonic()
        if t < self.next_sync:
            return None
        self.next_sync = t + self.sync_interval
        return self.position

    def apply_log(self, batch: LogBatch) -> list[int]:
        """Apply clear events; return the ids whose state must be fetched and reconciled."""
        ids: dict[int, None] = {}
        own: set[str] = set()
        for ev in batch.events:
            if ev.pos and ev.pos in self.own_positions:
                own.add(ev.pos)  # one log entry may carry many events
                continue
            self.stats.add("sync_events")
            if ev.op == "clear":
                # Not dropped on the event's word: every entry of the scope held here is
                # fetched and kept or dropped as the store says. No Redis writer logs one
                # since 2026-12-05 (a clear logs its del batches): one read there is forged
                # or an older version's, and dropping on it emptied every replica while the
                # store kept the entries (the semantic tier missed them for good).
                ids.update(dict.fromkeys(self.held_in(ev.scope)))
            elif ev.id is not None and (ev.op != "del" or ev.id in self.where):
                ids[ev.id] = None  # (a del of an entry not held here changes nothing)
        for pos in own:
            self.own_positions.discard(pos)
        return list(ids)

    def applied_past(self, positions: Sequence[str]) -> bool:
        """Whether the replica has applied the log past every one of ``positions`` (those
        of a write of this process): another thread read them before this write's local
        apply, as others' changes, and reconciled their entries to the store's state, which
        may already be a newer write than this one's. The local apply must then be skipped,
        or it would put this write's vectors back (and a snapshot could keep them)."""
        if self.position is None or not positions:
            return False
        here = _position(self.position)
        return here is not None and all((q := _position(p)) is not None and q <= here
                                        for p in positions)

    def own_clear(self, sid: str | None, positions: Sequence[str]) -> None:
        """Apply this process's own clear of scope ``sid`` (logged at ``positions``, the
        clear event first), ahead of the log. Writes of other threads logged after the
        clear event stay; if the replica already applied the log past the clear event (as
        another process's, by another thread), that apply was right and nothing is done."""
        if positions and self.applied_past(positions[:1]):
            return
        start = _position(positions[0]) if positions else None
        keep = [] if start is None else [i for i, q in self.own_last.items() if q > start]
        self.remember_own(positions)
        self.clear_local(sid, keep)

    def own_cleared(self, sid: str | None, res: Cleared) -> None:
        """Apply this process's own clear of scope ``sid`` as the store did it: one clear
        event, or batches of deletions (see :class:`Cleared`)."""
        if res.batches is None:
            self.own_clear(sid, res.log_positions)
        else:
            self.own_deletes(res.batches)

    def snapshot_sample(self, n: int = 32) -> list[int]:
        """Up to ``n`` entry ids of the replica, at random: to check a loaded snapshot."""
        ids = list(self.where)
        return ids if len(ids) <= n else self._rng.sample(ids, n)

    def snapshot_disagrees(self, ids: Sequence[int], fetched: Sequence[Fetched]) -> str | None:
        """Why a snapshot just loaded and replayed is not to be trusted, from the store's
        records of a sample of its entries, or ``None``. An entry's id is its scope's (a
        hash of scope and prompt, checked on every read), so a stored record of another
        scope than the snapshot lists proves it wrong: well-formed but wrong content
        (scopes swapped, an id listed in the wrong one) passed every format check, and lost
        those entries from the semantic tier. (A record missing from the store proves
        nothing: it may have expired.)"""
        for eid, f in zip(ids, fetched):
            w = self.where.get(eid)
            if isinstance(f, Record) and w is not None and w[0] != f.scope_id:
                return f"entry {eid:016x} is listed in another scope than the store's"
        return None

    def own_deletes(self, batches: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Apply this process's own deletions, each batch of ids deleted with its ``del``
        event at a log position, ahead of the log (as :meth:`own_clear`): skipped where the
        replica already read past it, and an entry this process wrote again after it (its
        write logged later, not read yet) stays."""
        last = self.own_last
        for pos, ids in batches:
            if self.applied_past([pos]):
                continue
            start = _position(pos)
            if start is None:
                continue
            self.remove([i for i in ids if not (i in last and last[i] > start)])

    def own_evicted(self, evicted: Sequence[int],
                    logged: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Apply this process's own eviction: as its own deletes when the store said where
        it logged them (an entry written again since, by this process or by another whose
        write this replica has read, stays: removing it unconditionally dropped a newer
        write from this replica for good), else as it was (a store that does not say)."""
        if logged:
            self.own_deletes(logged)
        else:
            self.remove(evicted)

    def remember_own(self, positions: Iterable[str], ids: Sequence[int] = ()) -> None:
        """Log positions of this process's own write of ``ids`` (or clear: no ids)."""
        if len(self.own_last) > _OWN_POSITIONS_MAX:
            # Entries read back are of no more use (see own_last). Unread ones are forgotten
            # only with their positions: an own delete logged before such a write and
            # applied after this would drop the entry here, and the log read that follows
            # would skip the write as ours: lost from the replica for good. Without their
            # positions they are read back as others' writes and fetched.
            here = None if self.position is None else _position(self.position)
            kept = {} if here is None else {i: q for i, q in self.own_last.items() if q > here}
            if here is None or len(kept) > _OWN_POSITIONS_MAX // 2:
                kept = {}
                self.own_positions.clear()
            self.own_last = kept
        if len(self.own_positions) > _OWN_POSITIONS_MAX:
            self.own_positions.clear()  # only costs re-fetching our own writes
        latest: tuple[int, int] | None = None
        for pos in positions:
            self.own_positions.add(pos)
            q = _position(pos)
            if q is not None and (latest is None or q > latest):
                latest = q
        if latest is None or not ids:
            return
        last = self.own_last
        for i in ids:
            if i not in last or latest > last[i]:
                last[i] = latest

    def take_refreshes(self) -> list[Refresh]:
        if not self.refreshes:
            return []
        with self._pending:  # (hit() may add one from another thread meanwhile)
            out = list(self.refreshes.values())
            self.refreshes.clear()
        return out

    def put_back_refreshes(self, refs: Sequence[Refresh]) -> None:
        """Refreshes whose write failed: kept for the next attempt (unless a later hit of
        the same entry replaced them meanwhile)."""
        with self._pending:
            for r in refs:
                cur = self.refreshes.get(r.id)
                if cur is None or (cur.version == r.version and cur.until < r.until):
                    self.refreshes[r.id] = r

    def _slide_local(self, recs: Sequence[Record]) -> None:
        """Give this replica's index the (later) expiry of sliding records."""
        again = []
        for r in recs:
            idx = self.indexes.get(r.scope_id)
            # touch() changes live entries only: one that expired here before the news of
            # its refresh arrived is inserted again.
            if idx is None or idx.touch([r.id], expires_at=r.expires) == 0:
                again.append(r)
        if again:
            self.add_records(again)

    def take_touches(self) -> list[int]:
        """The entries hit since the last store call, for it to mark recently used."""
        if not self.touches:
            return []
        with self._pending:  # (a hit in another thread must not fall between copy and clear)
            out = list(self.touches)
            self.touches.clear()
        return out

    def put_back_touches(self, ids: Sequence[int]) -> None:
        """Touches whose store call failed: sent with the next one, so LRU eviction still
        sees those hits."""
        if ids:
            with self._pending:
                self.touches.update(ids)

    def size(self) -> int:
        # (list() copies in one step: a warm start in another thread, or the async one in
        # a worker, adds scopes meanwhile, and iterating the dict itself then raised)
        return sum(len(i) for i in list(self.indexes.values()))

    # ------------------------------------------------------------------ decisions
    def entry_threshold(self, rec: Record, threshold: float) -> float:
        """The similarity at or above which ``rec`` answers, given the lookup's threshold
        and the verdicts on its answer (``docs/cache.md``, "Verdicts"):

        - never at or below a similarity where its answer was judged wrong (nor within
          ``WRONG_MARGIN`` above it);
        - with ``learn_floor`` set and the cache's own threshold, down to the similarity
          ``s`` at or below which its answer was judged right ``learn_after`` times (with
          none wrong at or above them): each of those questions was farther from it than
          one at ``s``, and its answer was still right; never below ``learn_floor``."""
        if not rec.verdicts:
            return threshold
        wrong = max((s for s, ok in rec.verdicts if not ok), default=-math.inf)
        t = threshold
        if self.learn_floor is not None and threshold == self.threshold:
            # (distinct on reading too: a field written by hand, or by an older version,
            # may repeat one)
            rights = distinct_rights(s for s, ok in rec.verdicts
                                     if ok and s > wrong + WRONG_MARGIN)
            if len(rights) >= self.learn_after:
                t = min(t, max(self.learn_floor, rights[self.learn_after - 1]))
        # (a margin: one prompt's similarity differs in its last float32 bits between
        # lookup paths and hosts, and must still be refused)
        return max(t, wrong + WRONG_MARGIN)

    def unchecked_ref(self, hit: Hit | Mapping[str, Any]) -> bool:
        """Whether ``hit`` is a ref that cannot be checked, the store having failed to say
        the namespace's key (counted as a store error, raised if strict)."""
        if isinstance(hit, Hit) or self.ref_secret is not None:
            return False
        self.failed("feedback", StoreError("the store could not be asked for the key that "
                                           "checks a ref()"))
        return True

    def verdict_of(self, hit: Hit | Mapping[str, Any], correct: bool
                   ) -> tuple[int, str, tuple[float, bool]]:
        """The entry id, version and verdict of a :meth:`SemanticCache.feedback` call on
        a :class:`Hit` or its :meth:`Hit.ref` (read back from a request, a queue: checked
        as untrusted input)."""
        key: Any
        version: Any
        sim: Any
        tag: Any = None
        if isinstance(hit, Hit):
            key, version, sim = hit.key, hit.version, hit.similarity
        elif isinstance(hit, Mapping):
            key, version, sim = hit.get("key"), hit.get("version"), hit.get("similarity")
            tag = hit.get("tag")
        else:
            raise TypeError(f"feedback judges a Hit or its ref(), got {type(hit).__name__}")
        if not isinstance(correct, (bool, np.bool_)):
            raise TypeError(f"correct must be a bool, got {type(correct).__name__}")
        eid = parse_id(key) if isinstance(key, str) else None
        if eid is None or not isinstance(version, str) or not 0 < len(version) <= 64:
            raise ValueError("feedback needs a Hit returned by a cache lookup (or its ref(): "
                             "its key, version and similarity)")
        if isinstance(sim, bool) or not isinstance(sim, (int, float)) or \
                not -1.0 <= float(sim) <= 1.0:  # (NaN too)
            raise ValueError(f"the hit's similarity is not a number in [-1, 1]: {sim!r}")
        if not isinstance(hit, Hit):  # (a ref read back from a request: maybe a client's)
            want = self.ref_tag(key, version, float(sim))
            if not want or not isinstance(tag, str) or not hmac.compare_digest(tag, want):
                raise ValueError("this ref's tag does not match: it was changed, or made by "
                                 "another namespace or store (or before refs had tags); "
                                 "a verdict needs the ref() a lookup returned, unchanged")
        return eid, version, (float(sim), bool(correct))

    def learn_ids(self, k: tuple[int, str, str, str], vec: Any) -> list[int]:
        """The entries of ``k``'s scope near enough to a missed prompt embedded as ``vec``
        to learn from it (see :meth:`learn_target`), ``k``'s own entry apart."""
        found = self.candidates(np.asarray(vec)[None], k[1], self.threshold)[0]
        return [eid for eid, _ in found if eid != k[0]]

    def learn_target(
        self, fetched: Sequence[Fetched], vec: npt.NDArray[np.float32], sid: str, now: float,
    ) -> tuple[Record, float] | None:
        """Of the entries a missed prompt was searched near (their records ``fetched``), the
        nearest one if it lies in the band where verdicts teach: at or above ``learn_floor``
        and below its own threshold. ``(record, similarity)``."""
        if self.learn_floor is None:
            return None
        best: tuple[Record, float] | None = None
        for f in fetched:  # (not usable(): the lookup counted invalid ones already)
            rec = (f if isinstance(f, Record) and not f.expired(now)
                   and f.vector.shape[0] == self.dim else None)
            if rec is None or rec.scope_id != sid:
                continue
            sim = min(1.0, float(rec.vector @ vec))
            if best is None or sim > best[1]:
                best = (rec, sim)
        if best is None:
            return None
        rec, sim = best
        return best if self.learn_floor <= sim < self.entry_threshold(rec, self.threshold) \
            else None

    def draw(self, share: float) -> bool:
        """True with probability ``share`` (which hits ``@cached(audit=)`` checks)."""
        return self._rng.random() < share

    def lowest_threshold(self, threshold: float) -> float:
        """The lowest threshold any entry may answer at in a lookup with ``threshold``."""
        if self.learn_floor is not None and threshold == self.threshold:
            return self.learn_floor
        return threshold

    def hit(self, rec: Record, tier: Literal["exact", "semantic"], sim: float, now: float
            ) -> Hit:
        """The :class:`Hit` of ``rec``: touched, a sliding entry's later expiry noted
        (counted by :meth:`answered` when its lookup returns it)."""
        with self._pending:
            self.touches.add(rec.id)
        exp = rec.expires
        if rec.slide > 0:
            until = now + rec.slide
            # Refresh once the hit moves the expiry by 1/16 of the TTL: an entry expires at
            # least 15/16 of its TTL after its last hit, for at most 16 writes per TTL.
            if until - exp >= rec.slide * _SLIDE_STEP:
                with self._pending:
                    self.refreshes[rec.id] = Refresh(rec.id, rec.version, until)
                exp = until
            # The local index takes the stored expiry (refreshed elsewhere, maybe not yet
            # seen in the log) or this hit's, if it holds this very write (under the lock:
            # a deleted entry put back here stayed for good). (Not `repairable`: the
            # lookup's own log read may have added this write meanwhile, and the hit must
            # still slide it.)
            with self.replica_lock:
                if self.where.get(rec.id) == (rec.scope_id, rec.version):
                    self._slide_local([rec if exp == rec.expires
                                       else dataclasses.replace(rec, expires=exp)])
        # positional: response, tier, similarity, prompt, key, age, expires_at, metadata, scope
        key = format_id(rec.id)
        return Hit(rec.response, tier, sim, rec.prompt, key,
                   max(0.0, now - rec.created), None if exp == math.inf else exp,
                   rec.metadata, rec.scope, rec.version, self.ref_tag(key, rec.version, sim))

    def answered(self, out: Sequence[Hit | None]) -> None:
        """Count what one lookup call returns: its hits per tier and its misses (all at
        once, as it returns: a call that raises counts its prompts in ``unanswered``)."""
        exact = semantic = 0
        for h in out:
            if h is not None:
                if h.tier == "exact":
                    exact += 1
                else:
                    semantic += 1
        counts = self.stats.counts
        counts["hits_exact"] += exact
        counts["hits_semantic"] += semantic
        counts["misses"] += len(out) - exact - semantic

    def ref_tag(self, key: str, version: str, similarity: float) -> str:
        """The tag of a hit's ref() ("" while the namespace's secret is unknown)."""
        if self.ref_secret is None:
            return ""
        msg = f"{key}:{version}:{float(similarity)!r}".encode()
        return hashlib.blake2b(msg, key=self.ref_secret, digest_size=16).hexdigest()

    def expired_seen(self, eid: int, version: str) -> None:
        """Count an expired entry a lookup found: each written version once (lookups of it
        until the store drops it would count it again and again)."""
        key = (eid, version)
        if key in self._expired:
            return
        if len(self._expired) >= _EXPIRED_SEEN_MAX:
            self._expired.clear()  # (a very old one may then count twice)
        self._expired[key] = None
        self.stats.add("expiries")

    def _expired_and_gone(self, eid: int, sid: str) -> None:
        """An exact miss whose entry the store no longer has: if the replica still holds
        it, dead by the index's clock, it expired (a server drops an expired key by its own
        TTL, so a lookup on a Redis store never met an expired record: ``expiries`` stayed
        0 there with a real clock)."""
        w = self.where.get(eid)
        if w is None or w[0] != sid:
            return
        idx = self.indexes.get(sid)
        if idx is not None and eid not in idx:
            self.expired_seen(eid, w[1])

    def exact_record(self, f: Fetched, sid: str, norm: str, now: float,
                     max_age: float = math.inf) -> Record | None:
        """``f`` if it is a usable entry of scope ``sid`` for the normalised prompt ``norm``,
        written at most ``max_age`` seconds ago."""
        rec = self.usable(f, now)
        if rec is None or rec.scope_id != sid or normalize_prompt(rec.prompt) != norm:
            return None
        if rec.verdicts and self.entry_threshold(rec, 1.0) > 1.0:
            return None  # its answer was judged wrong for its own prompt
        return None if too_old(rec, now, max_age) else rec

    def exact(self, f: Fetched, sid: str, norm: str, now: float,
              max_age: float = math.inf, gen: int | None = None) -> Hit | None:
        if f is None:
            return None
        if not isinstance(f, Invalid) and f.expired(now):
            self.expired_seen(f.id, f.version)
        rec = self.exact_record(f, sid, norm, now)
        if rec is None:
            return None
        if too_old(rec, now, max_age):
            self.stats.add("too_old")  # kept: a later read without max_age may use it
            return None
        if self.where.get(rec.id) != (rec.scope_id, rec.version):
            self.repair_add(rec, gen)  # written elsewhere, not yet seen in the log
        return self.hit(rec, "exact", 1.0, now)

    def candidates(
        self, vecs: npt.NDArray[np.float32], sid: str, threshold: float,
        nearest: list[tuple[float, int]] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Each row's entries near enough to be a hit, best first; appends each row's
        nearest ``(similarity, id)`` (the index's; ``(NaN, -1)`` for none) to ``nearest``."""
        idx = self.indexes.get(sid)
        if idx is None:  # (len(idx) is O(n) in the core: not on this path)
            if nearest is not None:
                nearest.extend([(math.nan, -1)] * vecs.shape[0])
            return [[] for _ in range(vecs.shape[0])]
        labels, dists = idx.search(vecs, k=self.k, num_threads=1 if len(vecs) < 64 else 0)
        lab_rows, dist_rows = labels.tolist(), dists.tolist()
        if nearest is not None:
            nearest.extend((1.0 - d[0], lab[0]) if lab[0] >= 0 else (math.nan, -1)
                           for lab, d in zip(lab_rows, dist_rows))
        # Best first; distance is 1 - similarity, so keep distances <= 1 - threshold + slack
        # (the lowest threshold an entry may have learned). (Padding: label -1, distance inf.)
        top = 1.0 - self.lowest_threshold(threshold) + self.slack
        return [[(lab, 1.0 - d) for lab, d in zip(lab_row, dist_row) if d <= top]
                for lab_row, dist_row in zip(lab_rows, dist_rows)]

    def given_rows(self, used: list[Any], embeddings: Any, out: Sequence[Hit | None]
                   ) -> list[Any]:
        """``used`` (the vectors rows were embedded with), with the given ``embeddings``'
        rows (normalised, as searched) for the rows not embedded here but searched (a
        semantic hit or miss found by the search ahead), not for exact hits."""
        if embeddings is None or all(u is not None for u in used):
            return used
        try:
            given = self.vectors(embeddings, len(used), copy=False)
        except (TypeError, ValueError):
            return used
        return [u if u is not None or (h is not None and h.tier == "exact") else given[i]
                for i, (u, h) in enumerate(zip(used, out))]

    @staticmethod
    def lookups(out: Sequence[Hit | None], near: Mapping[int, tuple[float, int]],
                threshold: float, used: Sequence[Any]) -> list[Lookup]:
        """:class:`Lookup` of each row of one lookup: its hit, or its nearest entry, and
        the vector it was searched with (``used``)."""
        res = []
        for i, h in enumerate(out):
            vec = used[i]
            if h is not None:
                res.append(Lookup(h, threshold, h.similarity, h.key, vec))
                continue
            sim, eid = near.get(i, (math.nan, -1))
            if sim != sim or eid < 0:
                res.append(Lookup(None, threshold, None, None, vec))
            else:
                res.append(Lookup(None, threshold, max(-1.0, min(1.0, sim)), format_id(eid),
                                  vec))
        return res

    def record_misses(self, out: Sequence[Hit | None], nearest: Mapping[int, tuple[float, int]],
                      threshold: float) -> None:
        """Count the semantic misses among ``out`` by their nearest similarity."""
        for i, (sim, _) in nearest.items():
            if out[i] is None and sim == sim:  # (NaN: the scope's index was empty)
                self.stats.miss(sim, threshold)

    def search_ahead(
        self, ids: Sequence[int], vecs: npt.NDArray[np.float32] | None, sid: str,
        threshold: float, near: dict[int, tuple[float, int]], exact_only: set[int],
    ) -> tuple[dict[int, list[tuple[int, float]]] | None, list[int]]:
        """With embeddings given, search before the store round trip (so candidates ride
        along with the exact tier) for the prompts the replica predicts to be exact misses,
        but the rows of ``exact_only``; ``(row index -> candidates, ids to fetch)`` or
        ``(None, [])``. Fills ``near`` with the rows' nearest ``(similarity, id)``."""
        if vecs is None or sid not in self.indexes:
            return None, []
        nearest: list[tuple[float, int]] = []
        if len(ids) == 1:  # get(): no list juggling
            if ids[0] in self.where or exact_only:
                return None, []
            found = self.candidates(vecs, sid, threshold, nearest)
            near[0] = nearest[0]
            return {0: found[0]}, [e for e, _ in found[0] if e != ids[0]]
        rows = [i for i, eid in enumerate(ids) if eid not in self.where and i not in exact_only]
        if not rows:
            return None, []
        found = self.candidates(vecs[rows], sid, threshold, nearest)
        near.update(zip(rows, nearest))
        have = set(ids)
        want = list(dict.fromkeys(e for r in found for e, _ in r if e not in have))
        return dict(zip(rows, found)), want

    def answer_read(
        self, fetched: Sequence[Fetched], norms: Sequence[str], fetched_ids: Sequence[int],
        ahead: dict[int, list[tuple[int, float]]] | None,
        vecs: npt.NDArray[np.float32] | None, sid: str, threshold: float,
        out: list[Hit | None], max_age: float = math.inf, gen: int | None = None,
    ) -> list[int]:
        """Fill ``out`` from one store read: exact hits first, then the semantic hits whose
        candidates were searched ahead; returns the rows still unanswered. The sync and async
        caches share this between their I/O. ``gen``: the replica's ``gen`` before the read
        was sent (what the lookup may repair)."""
        now = self.now()
        todo = []
        for i, norm in enumerate(norms):
            out[i] = self.exact(fetched[i], sid, norm, now, max_age, gen)
            if out[i] is None:
                todo.append(i)
                if fetched[i] is None:
                    self._expired_and_gone(fetched_ids[i], sid)
        if ahead is None or vecs is None:
            return todo
        got_ahead = dict(zip(fetched_ids, fetched))
        rest = []
        for i in todo:
            if i not in ahead:
                rest.append(i)  # predicted an exact hit, but it missed
            elif ahead[i]:
                out[i] = self.semantic(vecs[i], ahead[i], got_ahead, sid, threshold, now,
                                       max_age, gen)
        return rest

    def semantic(
        self, vec: npt.NDArray[np.float32], cands: Sequence[tuple[int, float]],
        fetched: Mapping[int, Fetched], sid: str, threshold: float, now: float,
        max_age: float = math.inf, gen: int | None = None,
    ) -> Hit | None:
        """The best of ``cands`` (index similarities) re-scored on their fetched records, if
        one is a hit; the replica repaired from what was fetched, where nothing changed it
        since ``gen`` (the replica's ``gen`` before the fetch was sent)."""
        best: tuple[float, Record] | None = None
        stale: list[int] = []
        old = False
        for eid, index_sim in cands:  # best first
            if best is not None and index_sim < best[0] - self.slack:
                break  # no later candidate can beat the best one
            rec = self.usable(fetched.get(eid), now)
            if rec is None or rec.scope_id != sid or self.cut_entry(rec):
                stale.append(eid)
                continue
            w = self.where.get(eid)
            if w is None or w[1] != rec.version or w[0] != sid:
                self.repair_add(rec, gen)
            sim = min(1.0, float(rec.vector @ vec))  # authoritative: the stored vector
            if sim >= (threshold if not rec.verdicts else self.entry_threshold(rec, threshold)) \
                    and (best is None or sim > best[0]):
                if too_old(rec, now, max_age):
                    old = True  # a match, but too old for this read: not a hit, not stale
                    continue
                best = (sim, rec)
        if stale:
            self.repair_remove(stale, gen)
        if best is None:
            if old:
                self.stats.add("too_old")
            return None
        if best[0] < threshold:
            self.stats.add("hits_learned")
        return self.hit(best[1], "semantic", best[0], now)

    @staticmethod
    def flight_leader(before: Sequence[tuple[int, int, Any]],
                      vec: npt.NDArray[np.float32], threshold: float) -> int | None:
        """Of other processes' calls in flight in a scope that registered before this one
        (``(start, id, vector)``, as its registration read them), the one a call with
        embedding ``vec`` waits for: the earliest (by start, then id) whose prompt is at or
        above ``threshold`` from this one's.

        "Before" is the server's order, not the starts: they are each process's clock, read
        before its request, and a process descheduled in between registered after a call
        with a later start. Comparing starts, each of the two then led (one LLM call too
        many, seen under load); of two registrations only the later one sees the other."""
        best: tuple[int, int] | None = None
        for s, fid, v in before:
            if best is None or (s, fid) < best:
                sim = float(np.dot(v, vec))
                if sim >= threshold:
                    best = (s, fid)
        return None if best is None else best[1]

    def entry_answer(self, f: Fetched, sid: str, vec: npt.NDArray[np.float32], now: float,
                     max_age: float = math.inf
                     ) -> tuple[str, npt.NDArray[np.float32]] | None:
        """The answer of ``f`` for a prompt embedded as ``vec``, and its stored vector: if it
        is a usable entry of scope ``sid``, at or above the threshold from ``vec`` (what a
        semantic hit needs: a forged flight cannot hand over an unrelated answer), at most
        ``max_age`` old."""
        rec = self.usable(f, now)
        if (rec is None or rec.scope_id != sid or too_old(rec, now, max_age)
                or not min(1.0, float(rec.vector @ vec)) >= self.entry_threshold(
                    rec, self.threshold)):
            return None
        return rec.response, rec.vector

    @staticmethod
    def too_long(prompt: str, response: str) -> str | None:
        """Why a pair is too long to store (readers refuse it), or ``None``: a prompt of
        more than 1 MiB, a response of more than 16 MiB, in UTF-8."""
        if len(prompt) > MAX_PROMPT_BYTES // 4 and \
                len(prompt.encode("utf-8", "surrogatepass")) > MAX_PROMPT_BYTES:
            return f"prompt longer than {MAX_PROMPT_BYTES} UTF-8 bytes"
        if len(response) > MAX_TEXT_BYTES // 4 and \
                len(response.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
            return f"response longer than {MAX_TEXT_BYTES} UTF-8 bytes"
        return None

    @staticmethod
    def check_pairs(
        pairs: Sequence[tuple[str, str]], metadata: Sequence[Any]
    ) -> list[str]:
        """Validate responses and metadata before anything is embedded or written; the
        metadata as JSON."""
        if len(metadata) != len(pairs):
            raise ValueError("metadata must have one item per pair")
        out = []
        for (p, r), m in zip(pairs, metadata):
            if not isinstance(r, str):
                raise TypeError(f"response must be a str, got {type(r).__name__}")
            why = CacheCore.too_long(p, r) if isinstance(p, str) else None
            if why is not None:  # (what readers refuse as garbage is not written)
                raise ValueError(why)
            if not m:
                out.append("{}")
                continue
            try:
                out.append(json.dumps(dict(m), sort_keys=True, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metadata must be a JSON-serialisable mapping: {exc}") from None
        return out

    def cut_entry(self, rec: Record) -> bool:
        """Whether ``rec`` must not answer other prompts: stored ``exact_only``, or a prompt
        this cache's embedder cuts, written by a version before the flag or by a process
        whose embedder did not say (asked once per entry version; a review found such a
        long entry answering a short prompt at 0.89)."""
        if rec.exact_only:
            return True
        if self._length_checker() is None:  # (the replica knows its dimension here)
            return False
        known = self._cut_seen.get(rec.id)
        if known is not None and known[0] == rec.version:
            return known[1]
        cut = bool(self.exact_only_rows([rec.prompt]))
        if len(self._cut_seen) >= _CUT_SEEN_MAX:
            self._cut_seen.clear()  # (only costs asking again)
        self._cut_seen[rec.id] = (rec.version, cut)
        return cut

    def _length_checker(self, dim: int | None = None) -> Any:
        """What says which prompts the embedder cuts: the embedder, if it has
        ``truncated()``; with the default embedder not loaded yet (embeddings given), the
        default model's tokenizer alone, unless the vectors (``dim``, before the replica
        knows its dimension) are not the default model's size; else ``None`` (every prompt
        taken as read whole)."""
        if self.embedder is not None:
            return self.embedder if hasattr(self.embedder, "truncated") else None
        size = self.dim if self.dim is not None else dim
        return default_lengths if size in (None, MINILM_DIM) else None

    def lengths_ahead(self, prompts: Sequence[str], ids: Sequence[int],
                      vecs: npt.NDArray[np.float32] | None
                      ) -> tuple[dict[int, bool] | None, set[int]]:
        """For a lookup given embeddings (``vecs``): which prompts the embedder cuts, asked
        of those the replica does not hold under their exact key (the others are asked only
        if that read misses, by :meth:`cut_rows` with the ``known`` returned), and the rows
        not to search ahead of the read: all but those asked about and read whole (another
        thread may change the replica's exact keys meanwhile). ``(None, set())`` without
        embeddings."""
        if vecs is None:
            return None, set()
        known: dict[int, bool] = {}
        dim = int(vecs.shape[1])
        if self._length_checker(dim) is None:  # (nothing to ask: every prompt read whole)
            return known, set()
        rows = [i for i, e in enumerate(ids) if e not in self.where]
        if rows:
            self.cut_rows(prompts, rows, known, dim=dim)
        if len(rows) == len(ids) and not any(known.values()):
            return known, set()
        return known, {i for i in range(len(ids)) if known.get(i, True)}

    def cut_rows(self, prompts: Sequence[str], rows: Sequence[int], known: dict[int, bool],
                 dim: int | None = None) -> set[int]:
        """The rows of ``rows`` whose prompt the embedder cuts (see
        :meth:`exact_only_rows`), asking only about those ``known`` does not hold yet,
        which this fills (a lookup asks once per prompt, and only about the prompts it may
        search)."""
        ask = [i for i in rows if i not in known]
        if ask:
            cut = self.exact_only_rows([prompts[i] for i in ask], dim=dim)
            for j, i in enumerate(ask):
                known[i] = j in cut
        return {i for i in rows if known[i]}

    def exact_only_rows(self, prompts: Sequence[str], count: bool = False,
                        dim: int | None = None) -> set[int]:
        """The rows of ``prompts`` longer than the embedder reads (``truncated()``, see
        ``embed.py``): their vectors stand for their start only, so they neither answer
        other prompts nor are answered by them (two long prompts with one context and two
        questions after it got one vector: a hit at similarity 1.0 with the other's answer).
        Counted in ``stats()["exact_only"]`` with ``count``."""
        checker = self._length_checker(dim)
        if checker is None:
            return set()
        try:
            cuts = embedder_truncates(checker, prompts)
        except Exception as exc:  # (as a failed embedding: counted, raised if strict; the
            # prompts are then taken as cut, the safe side)
            self.failed("the embedder's truncated()", exc, "embed_errors")
            cuts = [True] * len(prompts)
        rows = {i for i, cut in enumerate(cuts) if cut}
        if rows and count:
            self.stats.add("exact_only", len(rows))
        return rows

    def records(
        self, keys: Sequence[tuple[int, str, str, str]], pairs: Sequence[tuple[str, str]],
        vecs: npt.NDArray[np.float32], ttl: float | None, metadata_json: Sequence[str],
        now: float, sliding: bool = False, exact_only: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> list[Record]:
        out = []
        for n, (k, (p, r), v, m) in enumerate(zip(keys, pairs, vecs, metadata_json)):
            t = ttl
            if t is not None and self.ttl_jitter:  # each entry its own share of the jitter
                t *= 1.0 - self.ttl_jitter * self._rng.random()
            out.append(Record(
                id=k[0], prompt=p, response=r, vector=v, scope_id=k[1], scope_json=k[2],
                metadata_json=m, created=now, expires=now + t if t is not None else math.inf,
                version=secrets.token_hex(8), slide=float(t) if sliding and t is not None
                else 0.0, exact_only=n in exact_only))
        return out

    @staticmethod
    def ttls(records: Sequence[Record], now: float) -> list[float | None]:
        """Each record's TTL from ``now`` for the store (``None``: never expires)."""
        return [None if r.expires == math.inf else r.expires - now for r in records]
