"""SemanticCache: an LLM response cache with an exact tier and a semantic (HNSW) tier.

Similarity scale, stated once: **cosine similarity** in ``[-1, 1]``; a semantic hit needs
``similarity >= threshold``. (The index's cosine *distance* is ``1 - similarity``.)

How a lookup runs (``get``):

1. One round trip to the store fetches the entry whose id is the hash of (scope, normalised
   prompt) -- the exact tier, no embedding call -- and, in the same pipeline, the change log
   since this process last read it, which is applied to the local index replica first.
2. On an exact miss, the prompt is embedded and the scope's own HNSW index is searched
   (one index per scope: an entry of one scope cannot answer another). Candidates at or
   above the threshold are fetched from the store and re-checked (present, same scope, not
   expired, similarity recomputed on the stored vector) before one is returned.

Writes go to the store first (one MULTI/EXEC: entry, expiry, LRU score, log event), then to
the local index. Each entry's TTL is enforced twice: by the index clock (no hit at or after
``expires``) and by the server's key expiry.

:class:`SemanticCache` (sync) and :class:`AsyncSemanticCache` (asyncio) are thin I/O shells
around :class:`_CacheCore`, which holds every decision and all local state.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt

from .embed import default_embedder, embedder_dim, embedder_name
from .index import Index
from .store.base import (
    AsyncStore,
    Fetched,
    Invalid,
    LogBatch,
    Record,
    Store,
    StoreError,
    entry_id,
    format_id,
    normalize_prompt,
    parse_id,
    scope_key,
    validate_namespace,
)

__all__ = ["AsyncSemanticCache", "DEFAULT_THRESHOLD", "Hit", "SemanticCache"]

log = logging.getLogger("hnswcache.cache")

#: Default cosine-similarity threshold, calibrated on all-MiniLM-L6-v2 paraphrase pairs
#: (``bench/calibrate_threshold.py``; numbers in ``docs/cache.md``).
DEFAULT_THRESHOLD = 0.85

_HOUSEKEEP_EXPIRED = 1000  # store bookkeeping of expired entries is cleaned past this many
_LATENCY_WINDOW = 10_000
_OWN_POSITIONS_MAX = 200_000

Clock = Callable[[], float]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
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


class _Stats:
    """Counters and a window of lookup latencies."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(
            ("lookups", "hits_exact", "hits_semantic", "misses", "sets", "deletes",
             "expiries", "evictions", "store_errors", "embed_errors", "invalid_entries",
             "sync_events", "resyncs"), 0)
        self._lat = np.zeros(_LATENCY_WINDOW, dtype=np.float64)
        self._n = 0

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def latency(self, seconds: float) -> None:
        self._lat[self._n % _LATENCY_WINDOW] = seconds
        self._n += 1

    def snapshot(self, entries: int) -> dict[str, Any]:
        c: dict[str, Any] = dict(self.counts)
        hits = c["hits_exact"] + c["hits_semantic"]
        c["hits"] = hits
        c["hit_rate"] = hits / (hits + c["misses"]) if hits + c["misses"] else 0.0
        c["entries"] = entries
        window = self._lat[: min(self._n, _LATENCY_WINDOW)]
        for p in (50, 90, 99):
            c[f"latency_p{p}_us"] = float(np.percentile(window, p) * 1e6) if window.size else 0.0
        c["latency_max_us"] = float(window.max() * 1e6) if window.size else 0.0
        return c


class _CacheCore:
    """Everything a cache decides, with no I/O: keys, validation, the local index replica,
    log application, hit/miss decisions and stats. Shared by the sync and async shells."""

    def __init__(
        self, *, embedder: Any, threshold: float, ttl: float | None, max_entries: int | None,
        strict: bool, clock: Clock | None, sync_interval: float, candidates: int,
        M: int, ef_construction: int, ef_search: int,
    ) -> None:
        self.embedder = embedder
        self.threshold = self.check_threshold(threshold)
        self.ttl = self.check_ttl(ttl)
        if max_entries is not None and (not isinstance(max_entries, int) or max_entries < 1):
            raise ValueError(f"max_entries must be a positive integer or None, got {max_entries!r}")
        self.max_entries = max_entries
        self.strict = bool(strict)
        self.clock: Clock = clock if clock is not None else time.time
        if sync_interval < 0:
            raise ValueError("sync_interval must be >= 0")
        self.sync_interval = float(sync_interval)
        if candidates < 1:
            raise ValueError("candidates must be >= 1")
        self.k = int(candidates)
        self.index_params = {"M": int(M), "ef_construction": int(ef_construction),
                             "ef_search": int(ef_search)}
        self.dim: int | None = embedder_dim(embedder) if embedder is not None else None
        self.meta_checked = False
        self.indexes: dict[str, Index] = {}
        self.where: dict[int, tuple[str, str]] = {}  # id -> (scope id, version)
        self.position: str | None = None  # change-log position; None until warmed
        self.next_sync = 0.0
        self.retry_at = 0.0  # after a failed warm start, when to try again (monotonic)
        self.touches: set[int] = set()
        self.own_positions: set[str] = set()
        self.stats = _Stats()
        self._last_error_log = 0.0
        self._suppressed = 0

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

    @staticmethod
    def check_ttl(ttl: float | None) -> float | None:
        if ttl is None:
            return None
        t = float(ttl)
        if not t > 0 or math.isnan(t):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        return None if math.isinf(t) else t

    def now(self) -> float:
        return float(self.clock())

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
    def vectors(self, raw: Any, n: int) -> npt.NDArray[np.float32]:
        """Validate and unit-normalise embedder output (or given embeddings) to ``(n, dim)``."""
        arr = np.asarray(raw, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"embeddings must have shape ({n}, dim), got {arr.shape}")
        if self.dim is None:
            self.dim = int(arr.shape[1])
        elif arr.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {arr.shape[1]}, the cache has {self.dim}")
        norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))[:, None]
        if not np.isfinite(norms).all():
            raise ValueError("embeddings contain NaN or infinity")
        if not norms.all():
            raise ValueError("an embedding is the zero vector")
        return np.ascontiguousarray(arr / norms, dtype=np.float32)

    def check_meta(self, stored: tuple[int | None, str]) -> None:
        dim, name = stored
        self.meta_checked = True
        if dim is None:
            return
        if self.dim is not None and dim != self.dim:
            raise ValueError(
                f"this cache namespace holds {dim}-d vectors (embedder {name!r}) but the "
                f"embedder gives {self.dim}-d: use another namespace, or clear() it"
            )
        mine = embedder_name(self.embedder) if self.embedder is not None else name
        if name != mine:
            log.warning("cache namespace was written with embedder %r, now read with %r: "
                        "similarities are only meaningful within one model", name, mine)

    # ------------------------------------------------------------------ replica
    def _index(self, sid: str) -> Index:
        idx = self.indexes.get(sid)
        if idx is None:
            assert self.dim is not None
            idx = Index(self.dim, metric="cosine", clock=self.clock, **self.index_params)
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

    def add_records(self, records: Sequence[Record]) -> None:
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
        for eid in ids:
            w = self.where.pop(eid, None)
            if w is not None and w[0] in self.indexes:
                self.indexes[w[0]].delete([eid])

    def clear_local(self, sid: str | None) -> None:
        if sid is None or sid == "*":
            self.indexes.clear()
            self.where.clear()
            return
        self.indexes.pop(sid, None)
        for eid in [e for e, w in self.where.items() if w[0] == sid]:
            del self.where[eid]

    def reconcile(self, ids: Sequence[int], fetched: Sequence[Fetched]) -> None:
        """Make the replica match the store for ``ids`` (their current stored state)."""
        now = self.now()
        add: list[Record] = []
        gone: list[int] = []
        for eid, f in zip(ids, fetched):
            rec = self.usable(f, now)
            if rec is None:
                gone.append(eid)
            elif self.where.get(eid) != (rec.scope_id, rec.version):
                add.append(rec)
        self.remove(gone)
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
                self.clear_local(ev.scope)
            elif ev.id is not None:
                ids[ev.id] = None
        self.own_positions -= own
        return list(ids)

    def remember_own(self, positions: Iterable[str]) -> None:
        if len(self.own_positions) > _OWN_POSITIONS_MAX:
            self.own_positions.clear()  # only costs re-fetching our own writes
        self.own_positions.update(positions)

    def take_touches(self) -> list[int]:
        if not self.touches:
            return []
        out = list(self.touches)
        self.touches.clear()
        return out

    def size(self) -> int:
        return sum(len(i) for i in self.indexes.values())

    # ------------------------------------------------------------------ decisions
    def hit(self, rec: Record, tier: Literal["exact", "semantic"], sim: float, now: float) -> Hit:
        self.stats.add("hits_exact" if tier == "exact" else "hits_semantic")
        self.touches.add(rec.id)
        return Hit(
            response=rec.response, tier=tier, similarity=sim, prompt=rec.prompt,
            key=format_id(rec.id), age=max(0.0, now - rec.created),
            expires_at=None if math.isinf(rec.expires) else rec.expires,
            metadata=rec.metadata, scope=rec.scope,
        )

    def exact(self, f: Fetched, sid: str, norm: str, now: float) -> Hit | None:
        if f is None:
            return None
        if not isinstance(f, Invalid) and f.expired(now):
            self.stats.add("expiries")
        rec = self.usable(f, now)
        if rec is None or rec.scope_id != sid or normalize_prompt(rec.prompt) != norm:
            return None
        if self.where.get(rec.id) != (rec.scope_id, rec.version):
            self.add_records([rec])  # written elsewhere, not yet seen in the log
        return self.hit(rec, "exact", 1.0, now)

    def candidates(
        self, vecs: npt.NDArray[np.float32], sid: str, threshold: float
    ) -> list[list[tuple[int, float]]]:
        idx = self.indexes.get(sid)
        if idx is None:  # (len(idx) is O(n) in the core: not on this path)
            return [[] for _ in range(vecs.shape[0])]
        labels, dists = idx.search(vecs, k=self.k, num_threads=1 if len(vecs) < 64 else 0)
        out: list[list[tuple[int, float]]] = []
        for lab_row, dist_row in zip(labels, dists):
            row = [(int(lab), 1.0 - float(d)) for lab, d in zip(lab_row, dist_row)
                   if lab >= 0 and 1.0 - float(d) >= threshold - 1e-4]
            out.append(row)
        return out

    def semantic(
        self, vec: npt.NDArray[np.float32], cands: Sequence[tuple[int, float]],
        fetched: Mapping[int, Fetched], sid: str, threshold: float, now: float,
    ) -> Hit | None:
        best: tuple[float, Record] | None = None
        stale: list[int] = []
        for eid, _ in cands:
            rec = self.usable(fetched.get(eid), now)
            if rec is None or rec.scope_id != sid:
                stale.append(eid)
                continue
            if self.where.get(eid) != (rec.scope_id, rec.version):
                self.add_records([rec])
            sim = float(np.dot(rec.vector, vec))  # authoritative: the stored vector
            if sim >= threshold and (best is None or sim > best[0]):
                best = (sim, rec)
        self.remove(stale)
        if best is None:
            return None
        return self.hit(best[1], "semantic", min(1.0, best[0]), now)

    def records(
        self, prompts: Sequence[str], responses: Sequence[str], vecs: npt.NDArray[np.float32],
        scope: Mapping[str, Any] | None, ttl: float | None, metadata: Sequence[Any], now: float,
    ) -> list[Record]:
        out = []
        for p, r, v, m in zip(prompts, responses, vecs, metadata):
            if not isinstance(r, str):
                raise TypeError(f"response must be a str, got {type(r).__name__}")
            eid, sid, sjson, _ = self.key(p, scope)
            try:
                mjson = json.dumps(dict(m or {}), sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metadata must be a JSON-serialisable mapping: {exc}") from None
            out.append(Record(
                id=eid, prompt=p, response=r, vector=v, scope_id=sid, scope_json=sjson,
                metadata_json=mjson, created=now,
                expires=now + ttl if ttl is not None else math.inf,
                version=secrets.token_hex(8),
            ))
        return out


# ---------------------------------------------------------------------- store resolution
def default_data_dir(namespace: str) -> Path:
    """Where the embedded server keeps its data: ``$HNSWCACHE_HOME`` or
    ``~/.cache/hnswcache``, one folder per namespace."""
    base = os.environ.get("HNSWCACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "hnswcache")
    return Path(base) / namespace


def _is_async_callable(obj: Any) -> bool:
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        inspect.getattr_static(type(obj), "__call__", None))


def _is_store(obj: Any) -> bool:
    return all(hasattr(obj, m) for m in ("read", "fetch", "write", "scan", "log_head"))


def _call_key(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    key: Callable[..., str] | None, scope: Mapping[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """The prompt and scope of a call of a ``@cached`` function.

    The prompt is ``key(*args, **kwargs)`` or the first positional argument; any other
    arguments become part of the scope (with the function's name), so calls with different
    arguments -- or of different functions -- never answer each other.
    """
    sc: dict[str, Any] = dict(scope or {})
    sc["_fn"] = f"{fn.__module__}.{fn.__qualname__}"
    if key is not None:
        return key(*args, **kwargs), sc
    if not args or not isinstance(args[0], str):
        raise TypeError("a @cached function takes the prompt (a str) as its first argument, "
                        "or give key=lambda *args, **kwargs: prompt")
    if len(args) > 1 or kwargs:
        try:
            sc["_args"] = json.dumps([list(args[1:]), kwargs], sort_keys=True)
        except TypeError:
            raise TypeError("extra arguments of a @cached function must be JSON-serialisable, "
                            "or give key=...") from None
    return args[0], sc


class _Base:
    """Constructor arguments shared by both shells."""

    def _setup(
        self, embedder: Any, threshold: float, ttl: float | None, max_entries: int | None,
        namespace: str, strict: bool, clock: Clock | None, sync_interval: float,
        candidates: int, M: int, ef_construction: int, ef_search: int,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self._core = _CacheCore(
            embedder=embedder, threshold=threshold, ttl=ttl, max_entries=max_entries,
            strict=strict, clock=clock, sync_interval=sync_interval, candidates=candidates,
            M=M, ef_construction=ef_construction, ef_search=ef_search,
        )
        self._server: Any = None

    @property
    def threshold(self) -> float:
        """The cosine-similarity threshold of the semantic tier."""
        return self._core.threshold

    def _embedder(self) -> Any:
        if self._core.embedder is None:
            self._core.embedder = default_embedder()
        return self._core.embedder

    def stats(self) -> dict[str, Any]:
        """Counters (hits per tier, misses, hit rate, sets, expiries, evictions, store and
        embedder errors, invalid entries seen) and lookup latency percentiles (µs, over the
        last 10,000 lookups)."""
        return self._core.stats.snapshot(self._core.size())

    def __len__(self) -> int:
        """Live entries in this process's index replica."""
        return self._core.size()

    def _open_embedded(self, data_dir: str | os.PathLike[str] | None) -> str:
        from .store.server import shared_server

        url, server = shared_server(data_dir or default_data_dir(self.namespace))
        self._server = server
        return url


class SemanticCache(_Base):
    """A semantic LLM-response cache on Redis/Valkey (or in memory).

    Args:
        embedder: callable ``list[str] -> (n, dim)``; default: offline all-MiniLM-L6-v2
            (loaded on first use; needs the ``embed`` extra).
        threshold: cosine similarity at or above which a semantic match is a hit.
        ttl: default seconds an entry lives (``None``: until evicted or deleted).
        max_entries: cap on entries in the namespace; least recently used go first.
        store: ``None`` (a private valkey-server with data in ``data_dir``), ``"memory"``,
            a ``redis://`` / ``rediss://`` URL, a ``redis.Redis`` client, or a
            :class:`~hnswcache.store.base.Store`.
        namespace: the cache's name in the store (its keys carry the hash tag ``{namespace}``).
        strict: raise store and embedder errors instead of degrading to misses.
        clock: seconds, default :func:`time.time` (tests pass a controllable one).
        sync_interval: read other processes' changes at most this often (seconds); 0 reads
            them before every operation.
        candidates: neighbours fetched per semantic lookup.
        timeout: seconds to wait for the server (URL stores).
    """

    def __init__(
        self,
        embedder: Any = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        ttl: float | None = None,
        max_entries: int | None = None,
        store: Any = None,
        namespace: str = "default",
        strict: bool = False,
        clock: Clock | None = None,
        sync_interval: float = 0.0,
        candidates: int = 4,
        timeout: float = 0.5,
        data_dir: str | os.PathLike[str] | None = None,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int = 64,
    ) -> None:
        self._setup(embedder, threshold, ttl, max_entries, namespace, strict, clock,
                    sync_interval, candidates, M, ef_construction, ef_search)
        self._lock = threading.RLock()
        self._owns_store = not _is_store(store)
        if store is None:
            store = self._open_embedded(data_dir)
        if store == "memory":
            from .store.memory import MemoryStore

            store = MemoryStore(self.namespace)
        elif isinstance(store, str):
            from .store.redis import RedisStore

            store = RedisStore.from_url(store, namespace=self.namespace, timeout=timeout)
        elif not _is_store(store):
            from .store.redis import RedisStore

            store = RedisStore(store, namespace=self.namespace)
        if store.namespace != self.namespace:
            raise ValueError(f"the store is for namespace {store.namespace!r}, "
                             f"the cache for {self.namespace!r}")
        self.store: Store = cast(Store, store)

    # ------------------------------------------------------------------ plumbing
    def _ready(self) -> bool:
        """Warm start once (rebuild the replica from the store); False if the store is down."""
        c = self._core
        if c.position is not None:
            return True
        with self._lock:
            if c.position is not None:
                return True
            if time.monotonic() < c.retry_at and not c.strict:
                return False
            try:
                self._rebuild()
            except StoreError as exc:
                c.retry_at = time.monotonic() + 1.0
                c.failed("warm start", exc)
                return False
            return True

    def _rebuild(self) -> None:
        c = self._core
        head = self.store.log_head()
        if c.dim is None:
            c.dim = self.store.check_meta(None, "")[0]
        c.clear_local(None)
        for batch in self.store.scan():
            c.load(batch)
        c.position = head
        log.info("hnswcache %r: %d live entries loaded", self.namespace, c.size())

    def _apply(self, batch: LogBatch | None) -> None:
        c = self._core
        with self._lock:
            while batch is not None:
                if batch.reset:
                    c.stats.add("resyncs")
                    log.warning("hnswcache %r: change log lost our position; rebuilding",
                                self.namespace)
                    c.position = None
                    self._rebuild()
                    return
                ids = c.apply_log(batch)
                if ids:
                    c.reconcile(ids, self.store.fetch(ids))
                c.position = batch.position
                if not batch.more:
                    return
                _, batch = self.store.read([], log_after=c.position, touch=(), now=c.now())

    def _check_meta(self) -> None:
        c = self._core
        if not c.meta_checked and c.dim is not None:
            c.check_meta(self.store.check_meta(c.dim, embedder_name(self._embedder())
                                                if c.embedder is not None else "unknown"))

    def _embed(self, texts: list[str], given: Any) -> npt.NDArray[np.float32] | None:
        """Vectors for ``texts``: ``given`` (already checked by ``c.vectors``) or the
        embedder's; ``None`` (counted) if the embedder failed and the cache is not strict."""
        c = self._core
        if given is None:
            try:
                given = c.vectors(self._embedder()(texts), len(texts))
            except Exception as exc:
                c.failed("embedding", exc, "embed_errors")
                return None
        self._check_meta()
        return cast(npt.NDArray[np.float32], given)

    def sync(self) -> None:
        """Apply every change other processes made (normally done before each operation)."""
        c = self._core
        if not self._ready():
            return
        try:
            _, batch = self.store.read([], log_after=c.position, touch=c.take_touches(),
                                       now=c.now())
            self._apply(batch)
        except StoreError as exc:
            c.failed("sync", exc)

    # ------------------------------------------------------------------ reads
    def get(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
    ) -> Hit | None:
        """The cached answer for ``prompt`` in ``scope``, or ``None``.

        ``embedding`` skips the embedder (a precomputed vector for ``prompt``); ``threshold``
        overrides the cache's for this call.
        """
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return self.get_many([prompt], scope=scope, threshold=threshold, embeddings=emb)[0]

    def get_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
    ) -> list[Hit | None]:
        """:meth:`get` for several prompts of one scope: one store round trip for the exact
        tier, one embedder call and one index search for the rest."""
        t0 = time.perf_counter()
        c = self._core
        thr = c.threshold if threshold is None else c.check_threshold(threshold)
        keys = [c.key(p, scope) for p in prompts]
        given_all = None if embeddings is None else c.vectors(embeddings, len(prompts))
        out: list[Hit | None] = [None] * len(prompts)
        try:
            if not prompts or not self._ready():
                return self._misses(out)
            sid = keys[0][1]
            ids = [k[0] for k in keys]
            try:
                fetched, batch = self.store.read(ids, log_after=c.sync_due(),
                                                 touch=c.take_touches(), now=c.now())
                self._apply(batch)
            except StoreError as exc:
                c.failed("get", exc)
                return self._misses(out)
            now = c.now()
            todo = []
            for i, (f, k) in enumerate(zip(fetched, keys)):
                out[i] = c.exact(f, sid, k[3], now)
                if out[i] is None:
                    todo.append(i)
            if not todo or sid not in c.indexes:
                return self._misses(out)
            given = None if given_all is None else given_all[todo]
            vecs = self._embed([prompts[i] for i in todo], given)
            if vecs is None:
                return self._misses(out)
            cands = c.candidates(vecs, sid, thr)
            want = list(dict.fromkeys(e for row in cands for e, _ in row))
            if want:
                try:
                    got = dict(zip(want, self.store.fetch(want)))
                except StoreError as exc:
                    c.failed("get", exc)
                    return self._misses(out)
                now = c.now()
                for j, i in enumerate(todo):
                    if cands[j]:
                        out[i] = c.semantic(vecs[j], cands[j], got, sid, thr, now)
            return self._misses(out)
        finally:
            c.stats.add("lookups", len(prompts))
            c.stats.latency(time.perf_counter() - t0)

    def _misses(self, out: list[Hit | None]) -> list[Hit | None]:
        self._core.stats.add("misses", sum(1 for h in out if h is None))
        return out

    # ------------------------------------------------------------------ writes
    def set(
        self, prompt: str, response: str, *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
        embedding: npt.ArrayLike | None = None,
    ) -> str:
        """Store ``response`` for ``prompt`` in ``scope``; returns the entry's key.

        ``ttl`` (seconds) overrides the cache default. If the store is unreachable the write
        is dropped (counted, logged) unless the cache is strict.
        """
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return self.set_many([(prompt, response)], ttl=ttl, scope=scope,
                             metadata=[metadata], embeddings=emb)[0]

    def set_many(
        self, items: Iterable[tuple[str, str]], *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: npt.ArrayLike | None = None,
    ) -> list[str]:
        """Store several ``(prompt, response)`` pairs of one scope in one transaction."""
        c = self._core
        pairs = list(items)
        prompts = [p for p, _ in pairs]
        keys = [format_id(c.key(p, scope)[0]) for p in prompts]
        if not pairs:
            return keys
        eff_ttl = c.check_ttl(ttl) if ttl is not None else c.ttl
        metas = list(metadata) if metadata is not None else [None] * len(pairs)
        if len(metas) != len(pairs):
            raise ValueError("metadata must have one item per pair")
        given = None if embeddings is None else c.vectors(embeddings, len(pairs))
        vecs = self._embed(prompts, given)
        if vecs is None:
            return keys
        now = c.now()
        recs = c.records(prompts, [r for _, r in pairs], vecs, scope, eff_ttl, metas, now)
        if not self._ready():
            c.stats.add("store_errors")
            return keys
        try:
            res = self.store.write(recs, [eff_ttl] * len(recs), now,
                                        c.take_touches())
        except StoreError as exc:
            c.failed("set", exc)
            return keys
        with self._lock:
            c.remember_own(res.log_positions)
            c.add_records(recs)
        c.stats.add("sets", len(recs))
        c.stats.add("expiries", res.expired_removed)
        if (c.max_entries is not None and res.count > c.max_entries) or \
                res.expired_pending >= _HOUSEKEEP_EXPIRED:
            try:
                evicted, expired = self.store.evict(c.max_entries, now)
            except StoreError as exc:
                c.failed("eviction", exc)
            else:
                with self._lock:
                    c.remove(evicted)
                c.stats.add("evictions", len(evicted))
                c.stats.add("expiries", expired)
        return keys

    def delete(self, key: str) -> bool:
        """Delete the entry with this key (from :class:`Hit` or :meth:`set`); True if it
        existed."""
        c = self._core
        eid = parse_id(key)
        if eid is None:
            raise ValueError(f"not a cache key: {key!r}")
        self._ready()
        try:
            n = self.store.delete([eid])
        except StoreError as exc:
            c.failed("delete", exc)
            return False
        with self._lock:
            c.remove([eid])
        c.stats.add("deletes", n)
        return n > 0

    def clear(self, scope: Mapping[str, Any] | None = None) -> int:
        """Delete every entry (``scope=None``) or every entry of one scope (pass ``{}`` for
        the default scope); returns how many the store deleted."""
        c = self._core
        sid = scope_key(scope)[0] if scope is not None else None
        self._ready()
        try:
            n = self.store.clear(sid)
        except StoreError as exc:
            c.failed("clear", exc)
            return 0
        with self._lock:
            c.clear_local(sid)
        return n

    # ------------------------------------------------------------------ decorator
    def cached(
        self, *, scope: Mapping[str, Any] | None = None, ttl: float | None = None,
        key: Callable[..., str] | None = None,
    ) -> Callable[[F], F]:
        """Decorate ``fn(prompt, ...) -> str`` so answers come from the cache when they can.

        Other arguments and the function's name become part of the scope.
        """
        def deco(fn: F) -> F:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                prompt, sc = _call_key(fn, args, kwargs, key, scope)
                hit = self.get(prompt, scope=sc)
                if hit is not None:
                    return hit.response
                result = fn(*args, **kwargs)
                if isinstance(result, str):
                    self.set(prompt, result, ttl=ttl, scope=sc)
                return result

            return cast(F, wrapper)

        return deco

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the store connection (if the cache opened it) and stop its own server."""
        if self._owns_store:
            self.store.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncSemanticCache(_Base):
    """The asyncio twin of :class:`SemanticCache` (same arguments, awaitable methods;
    ``aget``/``aset``/... are aliases). Store I/O uses ``redis.asyncio``; a synchronous
    embedder runs in a worker thread, an ``async`` one is awaited."""

    def __init__(
        self,
        embedder: Any = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        ttl: float | None = None,
        max_entries: int | None = None,
        store: Any = None,
        namespace: str = "default",
        strict: bool = False,
        clock: Clock | None = None,
        sync_interval: float = 0.0,
        candidates: int = 4,
        timeout: float = 0.5,
        data_dir: str | os.PathLike[str] | None = None,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int = 64,
    ) -> None:
        self._setup(embedder, threshold, ttl, max_entries, namespace, strict, clock,
                    sync_interval, candidates, M, ef_construction, ef_search)
        self._alock: asyncio.Lock | None = None
        self._owns_store = not _is_store(store)
        if store is None:
            store = self._open_embedded(data_dir)
        if store == "memory":
            from .store.memory import AsyncMemoryStore

            store = AsyncMemoryStore(namespace=self.namespace)
        elif isinstance(store, str):
            from .store.redis import AsyncRedisStore

            store = AsyncRedisStore.from_url(store, namespace=self.namespace, timeout=timeout)
        elif _is_store(store) and not inspect.iscoroutinefunction(store.read):
            from .store.memory import AsyncMemoryStore, MemoryStore

            if not isinstance(store, MemoryStore):
                raise TypeError("AsyncSemanticCache needs an async store (AsyncRedisStore)")
            store = AsyncMemoryStore(store)
        elif not _is_store(store):
            from .store.redis import AsyncRedisStore

            store = AsyncRedisStore(store, namespace=self.namespace)
        if store.namespace != self.namespace:
            raise ValueError(f"the store is for namespace {store.namespace!r}, "
                             f"the cache for {self.namespace!r}")
        self.store: AsyncStore = cast(AsyncStore, store)

    @property
    def _lock(self) -> asyncio.Lock:
        if self._alock is None:
            self._alock = asyncio.Lock()
        return self._alock

    async def _ready(self) -> bool:
        c = self._core
        if c.position is not None:
            return True
        async with self._lock:
            if c.position is not None:
                return True
            if time.monotonic() < c.retry_at and not c.strict:
                return False
            try:
                await self._rebuild()
            except StoreError as exc:
                c.retry_at = time.monotonic() + 1.0
                c.failed("warm start", exc)
                return False
            return True

    async def _rebuild(self) -> None:
        c = self._core
        head = await self.store.log_head()
        if c.dim is None:
            c.dim = (await self.store.check_meta(None, ""))[0]
        c.clear_local(None)
        async for batch in self.store.scan():
            c.load(batch)
        c.position = head
        log.info("hnswcache %r: %d live entries loaded", self.namespace, c.size())

    async def _apply(self, batch: LogBatch | None) -> None:
        c = self._core
        async with self._lock:
            while batch is not None:
                if batch.reset:
                    c.stats.add("resyncs")
                    log.warning("hnswcache %r: change log lost our position; rebuilding",
                                self.namespace)
                    c.position = None
                    await self._rebuild()
                    return
                ids = c.apply_log(batch)
                if ids:
                    c.reconcile(ids, await self.store.fetch(ids))
                c.position = batch.position
                if not batch.more:
                    return
                _, batch = await self.store.read([], log_after=c.position, touch=(),
                                                 now=c.now())

    async def _check_meta(self) -> None:
        c = self._core
        if not c.meta_checked and c.dim is not None:
            name = embedder_name(c.embedder) if c.embedder is not None else "unknown"
            c.check_meta(await self.store.check_meta(c.dim, name))

    async def _embed(self, texts: list[str], given: Any) -> npt.NDArray[np.float32] | None:
        c = self._core
        if given is None:
            try:
                emb = c.embedder
                if emb is None:
                    emb = await asyncio.to_thread(self._embedder)
                if _is_async_callable(emb):
                    raw = await cast(Callable[[list[str]], Awaitable[Any]], emb)(texts)
                else:
                    raw = await asyncio.to_thread(emb, texts)
                given = c.vectors(raw, len(texts))
            except Exception as exc:
                c.failed("embedding", exc, "embed_errors")
                return None
        await self._check_meta()
        return cast(npt.NDArray[np.float32], given)

    async def sync(self) -> None:
        """Apply every change other processes made (normally done before each operation)."""
        c = self._core
        if not await self._ready():
            return
        try:
            _, batch = await self.store.read([], log_after=c.position,
                                             touch=c.take_touches(), now=c.now())
            await self._apply(batch)
        except StoreError as exc:
            c.failed("sync", exc)

    async def get(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
    ) -> Hit | None:
        """See :meth:`SemanticCache.get`."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return (await self.get_many([prompt], scope=scope, threshold=threshold,
                                    embeddings=emb))[0]

    async def get_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
    ) -> list[Hit | None]:
        """See :meth:`SemanticCache.get_many`."""
        t0 = time.perf_counter()
        c = self._core
        thr = c.threshold if threshold is None else c.check_threshold(threshold)
        keys = [c.key(p, scope) for p in prompts]
        given_all = None if embeddings is None else c.vectors(embeddings, len(prompts))
        out: list[Hit | None] = [None] * len(prompts)
        try:
            if not prompts or not await self._ready():
                return self._misses(out)
            sid = keys[0][1]
            ids = [k[0] for k in keys]
            try:
                fetched, batch = await self.store.read(ids, log_after=c.sync_due(),
                                                       touch=c.take_touches(), now=c.now())
                await self._apply(batch)
            except StoreError as exc:
                c.failed("get", exc)
                return self._misses(out)
            now = c.now()
            todo = []
            for i, (f, k) in enumerate(zip(fetched, keys)):
                out[i] = c.exact(f, sid, k[3], now)
                if out[i] is None:
                    todo.append(i)
            if not todo or sid not in c.indexes:
                return self._misses(out)
            given = None if given_all is None else given_all[todo]
            vecs = await self._embed([prompts[i] for i in todo], given)
            if vecs is None:
                return self._misses(out)
            cands = c.candidates(vecs, sid, thr)
            want = list(dict.fromkeys(e for row in cands for e, _ in row))
            if want:
                try:
                    got = dict(zip(want, await self.store.fetch(want)))
                except StoreError as exc:
                    c.failed("get", exc)
                    return self._misses(out)
                now = c.now()
                for j, i in enumerate(todo):
                    if cands[j]:
                        out[i] = c.semantic(vecs[j], cands[j], got, sid, thr, now)
            return self._misses(out)
        finally:
            c.stats.add("lookups", len(prompts))
            c.stats.latency(time.perf_counter() - t0)

    def _misses(self, out: list[Hit | None]) -> list[Hit | None]:
        self._core.stats.add("misses", sum(1 for h in out if h is None))
        return out

    async def set(
        self, prompt: str, response: str, *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
        embedding: npt.ArrayLike | None = None,
    ) -> str:
        """See :meth:`SemanticCache.set`."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return (await self.set_many([(prompt, response)], ttl=ttl, scope=scope,
                                    metadata=[metadata], embeddings=emb))[0]

    async def set_many(
        self, items: Iterable[tuple[str, str]], *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: npt.ArrayLike | None = None,
    ) -> list[str]:
        """See :meth:`SemanticCache.set_many`."""
        c = self._core
        pairs = list(items)
        prompts = [p for p, _ in pairs]
        keys = [format_id(c.key(p, scope)[0]) for p in prompts]
        if not pairs:
            return keys
        eff_ttl = c.check_ttl(ttl) if ttl is not None else c.ttl
        metas = list(metadata) if metadata is not None else [None] * len(pairs)
        if len(metas) != len(pairs):
            raise ValueError("metadata must have one item per pair")
        given = None if embeddings is None else c.vectors(embeddings, len(pairs))
        vecs = await self._embed(prompts, given)
        if vecs is None:
            return keys
        now = c.now()
        recs = c.records(prompts, [r for _, r in pairs], vecs, scope, eff_ttl, metas, now)
        if not await self._ready():
            c.stats.add("store_errors")
            return keys
        try:
            res = await self.store.write(recs, [eff_ttl] * len(recs), now,
                                        c.take_touches())
        except StoreError as exc:
            c.failed("set", exc)
            return keys
        c.remember_own(res.log_positions)
        c.add_records(recs)
        c.stats.add("sets", len(recs))
        c.stats.add("expiries", res.expired_removed)
        if (c.max_entries is not None and res.count > c.max_entries) or \
                res.expired_pending >= _HOUSEKEEP_EXPIRED:
            try:
                evicted, expired = await self.store.evict(c.max_entries, now)
            except StoreError as exc:
                c.failed("eviction", exc)
            else:
                c.remove(evicted)
                c.stats.add("evictions", len(evicted))
                c.stats.add("expiries", expired)
        return keys

    async def delete(self, key: str) -> bool:
        """See :meth:`SemanticCache.delete`."""
        c = self._core
        eid = parse_id(key)
        if eid is None:
            raise ValueError(f"not a cache key: {key!r}")
        await self._ready()
        try:
            n = await self.store.delete([eid])
        except StoreError as exc:
            c.failed("delete", exc)
            return False
        c.remove([eid])
        c.stats.add("deletes", n)
        return n > 0

    async def clear(self, scope: Mapping[str, Any] | None = None) -> int:
        """See :meth:`SemanticCache.clear`."""
        c = self._core
        sid = scope_key(scope)[0] if scope is not None else None
        await self._ready()
        try:
            n = await self.store.clear(sid)
        except StoreError as exc:
            c.failed("clear", exc)
            return 0
        c.clear_local(sid)
        return n

    def cached(
        self, *, scope: Mapping[str, Any] | None = None, ttl: float | None = None,
        key: Callable[..., str] | None = None,
    ) -> Callable[[F], F]:
        """Decorate ``async fn(prompt, ...) -> str``; see :meth:`SemanticCache.cached`."""
        def deco(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError("AsyncSemanticCache.cached decorates async functions")

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                prompt, sc = _call_key(fn, args, kwargs, key, scope)
                hit = await self.get(prompt, scope=sc)
                if hit is not None:
                    return hit.response
                result = await fn(*args, **kwargs)
                if isinstance(result, str):
                    await self.set(prompt, result, ttl=ttl, scope=sc)
                return result

            return cast(F, wrapper)

        return deco

    async def close(self) -> None:
        """Close the store connection (if the cache opened it) and stop its own server."""
        if self._owns_store:
            await self.store.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    async def __aenter__(self) -> AsyncSemanticCache:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    aget = get
    aget_many = get_many
    aset = set
    aset_many = set_many
    adelete = delete
    aclear = clear
    async_sync = sync
