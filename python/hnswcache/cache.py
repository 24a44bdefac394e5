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
around :class:`CacheCore`, which holds every decision and all local state.
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
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from . import _judges, _snapshot
from ._cache_core import RESCUE_BELOW, CacheCore, Hit, Lookup
from ._flight import (
    LEADING,
    Flight,
    Flights,
    inside_call,
    leading_tokens,
    stop_waiting,
    waiting_tokens,
)
from ._judges import JudgeRunner
from .embed import default_embedder, embedder_name
from .store.base import (
    AsyncStore,
    Cleared,
    Fetched,
    LogBatch,
    Store,
    StoreContended,
    StoreError,
    format_id,
    parse_id,
    scope_key,
    validate_namespace,
)

__all__ = ["AsyncSemanticCache", "DEFAULT_THRESHOLD", "Hit", "Lookup", "SemanticCache",
           "same_text"]

log = logging.getLogger("hnswcache.cache")

#: Default cosine-similarity threshold, calibrated on all-MiniLM-L6-v2 paraphrase pairs
#: (``bench/calibrate_threshold.py``; numbers in ``docs/cache.md``).
DEFAULT_THRESHOLD = 0.85

#: Seconds a URL store waits for the server (connect and each reply) unless ``timeout=``.
DEFAULT_TIMEOUT = 0.5

#: The replica index's search settings and storage, chosen from ``bench/cache_ef.py`` (hits
#: lost against an exact search) and ``bench/bench_cache.py`` (numbers in ``docs/cache.md``).
DEFAULT_EF_SEARCH = 24
DEFAULT_SEARCH_STARTS = 4
DEFAULT_DTYPE = "int8"

#: Seconds between two snapshots of a replica that keeps changing (``snapshot_interval``).
DEFAULT_SNAPSHOT_INTERVAL = 300.0

#: A warm start whose log replay applied at least this many events (or a tenth of the
#: entries) leaves a fresh snapshot: the next start then replays less.
_RESAVE_AFTER_EVENTS = 1000
_HOUSEKEEP_EXPIRED = 1000  # store bookkeeping of expired entries is cleaned past this many
#: Life of a cross-process @cached lease when the wait is unbounded (seconds).
_LEASE_UNBOUNDED = 600.0
_CYCLE_CHECK = 0.5  # seconds between two looks for a wait cycle while waiting on a lease

Clock = Callable[[], float]
F = TypeVar("F", bound=Callable[..., Any])


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
    key: Callable[..., Any] | None, scope: Mapping[str, Any] | None, name: str | None = None,
    sig: inspect.Signature | None = None,
) -> tuple[str, dict[str, Any]]:
    """The prompt and scope of a call of a ``@cached`` function.

    The prompt is ``key(*args, **kwargs)`` or the function's first parameter (given by
    position or by name); its other arguments become part of the scope (with the function's
    name), so calls with different arguments -- or of different functions -- never answer
    each other, while calls that bind the same arguments do (``f(p, 0.5)``, ``f(p, t=0.5)``;
    an argument equal to its default is as if left out). A ``key`` that returns ``(prompt,
    scope)`` (as :func:`hnswcache.chat.chat_key` does) chooses the scope itself; one that
    returns a prompt alone leaves the other arguments out of it. ``sig``: ``fn``'s
    signature, computed once by the decorator.
    """
    sc: dict[str, Any] = dict(scope or {})
    sc["_fn"] = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"
    if key is not None:
        got = key(*args, **kwargs)
        if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], Mapping):
            sc.update(got[1])
            got = got[0]
        if not isinstance(got, str):
            raise TypeError("a @cached key= must return the prompt (a str) or (prompt, scope), "
                            f"got {type(got).__name__}")
        return got, sc
    if len(args) == 1 and not kwargs:  # the common call: no binding needed
        prompt, extra = args[0], cast(dict[str, Any], {})
    else:
        prompt, extra = _bind(fn, args, kwargs, sig)
    if not isinstance(prompt, str):
        raise TypeError("a @cached function takes the prompt (a str) as its first argument, "
                        "or give key=lambda *args, **kwargs: prompt")
    if extra:
        try:
            sc["_args"] = json.dumps(_typed(extra), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            raise TypeError("extra arguments of a @cached function must be JSON-serialisable "
                            "(str, numbers, bool, None, lists, tuples, dicts), or give "
                            "key=...") from None
    return prompt, sc


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # (some builtins have none)
        return None


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
          sig: inspect.Signature | None) -> tuple[Any, dict[str, Any]]:
    """(the first parameter's value, the other arguments by name, those equal to their
    default left out) of a call of ``fn``."""
    try:
        if sig is None:
            raise ValueError("no signature")
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):  # (no signature, or a call that does not fit it: the
        # function itself says so when called; keep the arguments as they were given)
        if not args:
            return None, {}
        return args[0], ({"*": list(args[1:]), "**": kwargs} if len(args) > 1 or kwargs
                         else {})
    params = list(sig.parameters.values())
    first = params[0].name if params else None
    extra: dict[str, Any] = {}
    for pname, value in bound.arguments.items():
        if pname == first:
            continue
        default = sig.parameters[pname].default
        try:
            same = type(value) is type(default) and bool(value == default)
        except Exception:  # (numpy arrays and other values without a plain ==)
            same = False
        if not same:
            extra[pname] = value
    return bound.arguments.get(first) if first else None, extra


def _typed(value: Any) -> Any:
    """``value`` as JSON that keeps what JSON alone would merge: a dict with keys that are
    not strings (``{2: "a"}`` and ``{"2": "a"}`` were one scope) and a tuple (one with the
    list of the same items) are tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_typed(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _typed(v) for k, v in value.items()}
        items = [[json.dumps(_typed(k), sort_keys=True, allow_nan=False), _typed(v)]
                 for k, v in value.items()]
        return {"__dict__": sorted(items, key=lambda kv: kv[0])}
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


class _WaitMarks:
    """The marks of one wait of this process for entry ``eid``, whose call runs in another
    process: "the calls holding these tokens wait for eid". They are the calls the current
    context leads, and those that joined the call it leads from inside theirs (they wait
    on it): marks are added as such calls join. Marking first, then following the holder's
    marks, the second of two processes each waiting on the other sees the cycle
    (:meth:`cycle`, again every ``_CYCLE_CHECK`` seconds: a lease may change hands into
    one)."""

    def __init__(self, store: Any, eid: int, seconds: float, flight: Flight | None) -> None:
        self.store = store if hasattr(store, "mark_wait") else None
        self.eid, self.flight = eid, flight
        # (One life for every mark of a token: a shorter wait must not cut a sibling's. A
        # mark is read only through its call's live lease, so a dead process's marks are
        # harmless until they expire.)
        self.life = max(seconds, _LEASE_UNBOUNDED)
        self.marked: frozenset[str] = frozenset()
        self.wait_id = secrets.token_hex(4)
        self.checked = -math.inf

    def _changes(self) -> tuple[frozenset[str], frozenset[str]]:
        """The tokens to mark now and those to unmark (a joiner whose wait ended)."""
        want = waiting_tokens(self.flight)
        new, gone = want - self.marked, self.marked - want
        if new:
            self.checked = -math.inf  # (look at once)
        self.marked = want
        return new, gone

    def _due(self) -> bool:
        if not self.marked or time.monotonic() < self.checked + _CYCLE_CHECK:
            return False
        self.checked = time.monotonic()
        return True

    def cycle(self) -> bool:
        """Whether the holder of ``eid``'s lease waits, through other calls, on ours."""
        if self.store is None:
            return False
        new, gone = self._changes()
        if gone:
            self.store.unmark_wait(sorted(gone), self.eid, self.wait_id)
        if new:
            self.store.mark_wait(sorted(new), self.eid, self.life, self.wait_id)
        return self._due() and bool(self.store.waits_on(self.eid, self.marked))

    def clear(self) -> None:
        if self.store is not None and self.marked:
            self.store.unmark_wait(sorted(self.marked), self.eid, self.wait_id)

    async def acycle(self) -> bool:
        """:meth:`cycle` on an async store."""
        if self.store is None:
            return False
        new, gone = self._changes()
        if gone:
            await self.store.unmark_wait(sorted(gone), self.eid, self.wait_id)
        if new:
            await self.store.mark_wait(sorted(new), self.eid, self.life, self.wait_id)
        return self._due() and bool(await self.store.waits_on(self.eid, self.marked))

    async def aclear(self) -> None:
        if self.store is not None and self.marked:
            await self.store.unmark_wait(sorted(self.marked), self.eid, self.wait_id)


def same_text(new: str, cached: str) -> bool:
    """The default judge of ``@cached`` (see ``learn_floor``): the new answer is the cached
    one up to case and whitespace. Strict: an answer in other words is judged wrong, which
    never lowers an entry's threshold (pass a judge that compares meaning to learn more).
    (Not the prompts' normal form: its NFKC and its dropped final '?!.' judged 'x = 2³'
    the same as 'x = 23', and 'Yes!' as 'yes?'.)"""
    return " ".join(new.casefold().split()) == " ".join(cached.casefold().split())


def _check_audit(audit: float) -> float:
    if isinstance(audit, bool) or not isinstance(audit, (int, float)) or \
            not 0.0 <= audit <= 1.0:
        raise ValueError(f"audit is the share of semantic hits to check, in [0, 1], "
                         f"got {audit!r}")
    return float(audit)


def _verdict(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"a judge returns a bool, got {type(value).__name__}")
    return bool(value)


def _cancel_mark() -> int:
    """How many cancellations the current task has been asked for (see
    :func:`_raise_if_cancelled`)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _raise_if_cancelled(mark: int) -> None:
    """Raise the cancellation a callee swallowed since ``mark``. Python 3.11's
    ``asyncio.wait_for``, which redis-py wraps around every send when a socket timeout is
    set, returns the inner result and drops a cancel that arrives as the inner await ends
    (fixed in 3.12): the cancelled task went on, and a ``@cached`` call under
    ``asyncio.timeout`` ran its whole LLM call, 6 of 30 times in a review."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > mark:
        raise asyncio.CancelledError


def _honours_cancel(fn: F) -> F:
    """``fn`` (a coroutine method) raising a cancellation that arrived during it and was
    swallowed below it (:func:`_raise_if_cancelled`)."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark = _cancel_mark()
        out = await fn(*args, **kwargs)
        _raise_if_cancelled(mark)
        return out

    return cast(F, wrapper)


async def _to_thread_to_the_end(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread, awaited until it ends even if the caller is
    cancelled meanwhile (the cancellation is raised then): a caller that returned at once
    would release the cache's locks while the thread still changes the replica or writes
    a snapshot."""
    return await _to_the_end(asyncio.to_thread(fn, *args))


async def _to_the_end(aw: Awaitable[Any]) -> Any:
    """``aw`` run as a task and awaited until it ends, however often the caller is
    cancelled meanwhile (anyio's cancel scopes cancel every await inside them, cleanup
    included); the cancellation is raised then. For cleanup that must reach the store: a
    lease or flight left there makes other processes wait out their ``wait``."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.cancelled():
                raise
            cancelled = True
    if cancelled:
        if not fut.cancelled():
            fut.exception()  # (retrieved: the caller is gone, its error with it)
        raise asyncio.CancelledError
    return fut.result()


def _storable(cache: Any, prompt: str, result: str) -> bool:
    """Whether ``@cached`` stores a call's result: not when the pair is longer than readers
    accept (the call is paid for; its result is returned uncached, not an error)."""
    why = CacheCore.too_long(prompt, result)
    if why is not None:
        log.info("hnswcache %r: a call's result is not cached: %s", cache.namespace, why)
    return why is None


def _answers(flight: Flight, vec: Any, threshold: float) -> bool:
    """Whether ``flight``'s answer answers a follower whose prompt embeds to ``vec``: always
    when it is the answer to the flight's own prompt, which the follower matched; when it
    is a paraphrase's from another process, only at or above the threshold from it."""
    a = flight.answer_vec
    return a is None or (vec is not None and float(np.dot(a, vec)) >= threshold)


def _rest(limit: float | None, t0: float) -> float | None:
    """What is left at ``time.monotonic()`` of a wait ``limit`` started at ``t0``."""
    return None if limit is None else max(0.0, limit - (time.monotonic() - t0))


def _check_wait(wait: float) -> float | None:
    """``@cached(wait=...)`` as a timeout: seconds, or ``None`` for no limit (``inf``, or
    more than the OS can wait for)."""
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    return None if wait >= threading.TIMEOUT_MAX else float(wait)



#: The caches that write periodic snapshots in a thread (see _before_fork).
_FORK_SAFE: weakref.WeakSet[SemanticCache] = weakref.WeakSet()
_FORK_HELD: list[SemanticCache] = []
#: Judgments (see _judge_later) queued or running per cache, past which one is skipped.
_MAX_JUDGING = 64
#: Seconds close() waits for a judgment under way (its verdict is then written or lost).
_JUDGE_CLOSE_WAIT = 2.0


def _before_fork() -> None:
    """A child forked while a snapshot thread saves would inherit the index's writer lock
    (or the cache's lock) held by a thread it does not have: its first write would wait for
    ever. Each such cache's lock and save lock are held across the fork (a save under way
    ends first)."""
    for cache in list(_FORK_SAFE):
        cache._lock.acquire()
        cache._save_mu.acquire()
        _FORK_HELD.append(cache)


def _after_fork_in_parent() -> None:
    while _FORK_HELD:
        cache = _FORK_HELD.pop()
        cache._save_mu.release()
        cache._lock.release()


def _after_fork_in_child() -> None:
    _judges.after_fork_in_child()  # (the parent's judge threads are not here)
    while _FORK_HELD:
        cache = _FORK_HELD.pop()
        cache._save_mu.release()
        cache._lock.release()
        # (the parent's snapshot thread, gone here, may have held or claimed these)
        cache._snapshot_mu = threading.Lock()
        cache._snapshot_thread = None
        cache._snapshot_saving = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _lend_clock(store: Any, clock: Clock) -> None:
    """A memory store without a clock of its own expires entries by its first cache's (a
    server expires keys by its own)."""
    from .store.memory import MemoryStore

    target = getattr(store, "sync", store)
    if isinstance(target, MemoryStore) and target.clock is None:
        target.clock = clock


class _Base:
    """Constructor arguments shared by both shells."""

    def _setup(
        self, embedder: Any, threshold: float, ttl: float | None, max_entries: int | None,
        namespace: str, strict: bool, clock: Clock | None, sync_interval: float,
        candidates: int, M: int, ef_construction: int, ef_search: int, dtype: str,
        search_starts: int, ttl_jitter: float = 0.0, alpha: float | None = None,
        learn_floor: float | None = None, learn_after: int = 3,
        rescue_below: float | None = RESCUE_BELOW,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self._core = CacheCore(
            embedder=embedder, threshold=threshold, ttl=ttl, max_entries=max_entries,
            strict=strict, clock=clock, sync_interval=sync_interval, candidates=candidates,
            M=M, ef_construction=ef_construction, ef_search=ef_search, dtype=dtype,
            search_starts=search_starts, ttl_jitter=ttl_jitter, alpha=alpha,
            learn_floor=learn_floor, learn_after=learn_after, rescue_below=rescue_below,
        )
        self._server: Any = None  # the embedded server this process owns, if any
        self._data_dir: Path | None = None  # where the embedded server keeps its data
        self._embedded_url = ""
        self._takeover_at = 0.0  # (monotonic) no takeover attempt before then
        self._ref_retry_at = 0.0  # (monotonic) no new read of the ref() key before then
        self._flights = Flights()
        self._auditing: set[int] = set()  # entry ids of @cached audits under way
        self._closed = False
        self._warm: dict[str, Any] = {}  # how the last warm start went (stats())
        self._snapshot_skipped: str | None = None

    @property
    def threshold(self) -> float:
        """The cosine-similarity threshold of the semantic tier."""
        return self._core.threshold

    @property
    def strict(self) -> bool:
        """Whether store and embedder failures raise (``strict=True``) instead of
        degrading to misses and dropped writes."""
        return self._core.strict

    def _embedder(self) -> Any:
        if self._core.embedder is None:
            self._core.embedder = default_embedder()
        return self._core.embedder

    def stats(self) -> dict[str, Any]:
        """Counters (hits per tier, misses, hit rate, sets, expiries, evictions, store and
        embedder errors, invalid entries seen, ``@cached`` calls saved by coalescing, matches
        refused by a read's ``max_age``; ``lookups`` = hits + misses + ``unanswered``, the
        prompts of calls that raised or were cancelled) and lookup latency percentiles (µs,
        over the last 10,000 lookups). ``warm_start`` says how the replica was last loaded:
        ``source`` (``"snapshot"`` or ``"store"``), ``seconds``, ``entries``, and
        ``snapshot_skipped`` (why a snapshot in ``snapshot_dir`` was not used)."""
        out = self._core.stats.snapshot(self._core.size())
        out["warm_start"] = dict(self._warm)
        return out

    def _replayed_much(self, events_before: int) -> bool:
        """Whether the log replay after a snapshot applied enough to save a fresh one."""
        c = self._core
        done = c.stats.counts["sync_events"] - events_before
        return done >= max(_RESAVE_AFTER_EVENTS, len(c.where) // 10)

    def _note_warm(self, source: str, t0: float) -> None:
        self._warm = {"source": source, "seconds": time.monotonic() - t0,
                      "entries": self._core.size()}
        if self._snapshot_skipped is not None:
            self._warm["snapshot_skipped"] = self._snapshot_skipped

    def __len__(self) -> int:
        """Live entries in this process's index replica (entries kept to the exact tier,
        ``exact_only``, are in the store, not in the replica)."""
        return self._core.size()

    def _snapshot_folder(self, snapshot_dir: str | os.PathLike[str] | None,
                         store: Any, interval: float | None) -> None:
        """Where snapshots go: ``snapshot_dir``, else beside the embedded server's data.
        Only a store whose log read tells a position it no longer holds (the Redis stores)
        can say whether a snapshot fits it: the in-memory store's positions are counts,
        which another store of as many events would take for its own."""
        if interval is not None and (
                isinstance(interval, bool) or not isinstance(interval, (int, float))
                or not math.isfinite(interval) or interval <= 0):
            raise ValueError(f"snapshot_interval must be a positive number of seconds or "
                             f"None (no periodic snapshots), got {interval!r}")
        self._snapshot_every = None if interval is None else float(interval)
        self._snapshot_next = time.monotonic() + (self._snapshot_every or 0.0)
        self._snapshot_saving = False  # a periodic snapshot is being written
        # Saves copy the replica under the cache's lock and write it under the save lock:
        # each copy is numbered, so an older copy never replaces a newer one's snapshot.
        self._copies_taken = 0
        self._copy_written = 0
        self._snapshot_dir: Path | None = None
        if snapshot_dir is None and self._data_dir is None:
            return
        if not getattr(store, "checks_log_position", False):
            if snapshot_dir is not None:
                raise ValueError("snapshot_dir needs a Redis or Valkey store (this store "
                                 "cannot tell whether a snapshot fits it)")
            return
        self._snapshot_dir = (Path(snapshot_dir) if snapshot_dir is not None
                              else cast(Path, self._data_dir) / "snapshots")

    def _adopt(self, loaded: _snapshot.Loaded) -> str:
        """Put a loaded snapshot into the (empty) replica; its log position."""
        c = self._core
        c.indexes.update(loaded.indexes)
        c.where.update(loaded.where)
        return loaded.position

    @staticmethod
    def _check_replay(batch: LogBatch | None, position: str) -> None:
        """The first log read from a snapshot's position must find it (else: not used)."""
        if batch is None or batch.reset:
            raise _snapshot.SnapshotError(f"the store's change log no longer holds its "
                                          f"position {position}")

    @staticmethod
    def _check_sample(problem: str | None) -> None:
        """A loaded snapshot whose sample the store contradicts is not used."""
        if problem is not None:
            raise _snapshot.SnapshotError(problem)

    def _drop_snapshot(self, exc: BaseException) -> None:
        """Undo a warm start from a snapshot that failed with ``exc``; re-raise it unless
        the snapshot is to blame (a store error is an outage, not a bad snapshot)."""
        c = self._core
        c.clear_local(None)
        c.position = None
        if isinstance(exc, StoreError) or not isinstance(exc, Exception):
            raise exc
        self._snapshot_failed(exc)

    def _snapshot_not_saved(self, exc: BaseException) -> None:
        log.warning("hnswcache %r: no snapshot saved in %s: %s", self.namespace,
                    self._snapshot_dir, exc)

    def _ref_retry_due(self) -> bool:
        """Whether to read the key of ref() tags again now (at most every 5 s): one failed
        read at the warm start left every later hit of the process untagged, and its
        refs refused by every other process, for good."""
        now = time.monotonic()
        if now < self._ref_retry_at:
            return False
        self._ref_retry_at = now + 5.0
        return True

    def _follows_paraphrases(self, vec: Any, limit: float | None) -> bool:
        """Whether a leading @cached call looks for paraphrases in flight in other processes
        (and registers its own): a store that keeps flights, an embedding, some time to
        wait, and not from inside another call (it holds what others may wait for)."""
        store = getattr(self, "store", None)  # (each shell's, sync or async)
        return (hasattr(store, "fly") and vec is not None and not leading_tokens()
                and (limit is None or limit > 0))

    def _snapshot_due(self) -> bool:
        """Whether to start a periodic snapshot now; called where the replica just changed
        (so an idle replica, whose last snapshot is still current, writes none). Claims it:
        the caller must start the save, which clears ``_snapshot_saving``."""
        if self._snapshot_every is None or self._snapshot_dir is None or \
                self._snapshot_saving or self._closed:
            return False
        t = time.monotonic()
        if t < self._snapshot_next:
            return False
        self._snapshot_next = t + self._snapshot_every
        self._snapshot_saving = True
        return True

    def _copy(self, position: str | None
              ) -> tuple[int, str | None, dict[int, tuple[str, str]]]:
        """What a snapshot saves, numbered: the entry list at the log ``position`` (the
        caller holds the cache's lock, so no log batch is applied between the two)."""
        self._copies_taken += 1
        return self._copies_taken, position, dict(self._core.where)

    def _snapshot_saved(self) -> None:
        self._core.stats.add("snapshots_saved")
        if self._snapshot_every is not None:
            self._snapshot_next = time.monotonic() + self._snapshot_every

    def _snapshot_failed(self, exc: BaseException) -> None:
        self._snapshot_skipped = str(exc)
        (log.info if isinstance(exc, _snapshot.SnapshotError) and str(exc) == "no snapshot"
         else log.warning)("hnswcache %r: warm start from the store, not the snapshot in %s: "
                           "%s", self.namespace, self._snapshot_dir, exc)

    def _open_embedded(self, data_dir: str | os.PathLike[str] | None) -> str:
        from .store.server import shared_server

        self._data_dir = Path(data_dir or default_data_dir(self.namespace))
        # A server still loading a large file counts as started: lookups miss until it has
        # loaded, rather than the constructor blocking (or a start timeout killing it).
        url, server = shared_server(self._data_dir, wait_loaded=False)
        self._server = server
        self._embedded_url = url
        self._core.on_store_error = self._take_over
        return url

    def _take_over(self) -> None:
        """After a store failure on the embedded server: if its process is gone (its owner
        exited or was killed, or it crashed), start it again on the same data, owned by this
        process from now on. Of several processes sharing it, the first to fail restarts it
        and the others reconnect to it (shared_server serialises them on a file lock). The
        call that failed stays a miss (or raises, strict); the next one finds the server.
        At most one attempt a second; a server process that still lives (slow, paused) is
        never replaced."""
        now = time.monotonic()
        if now < self._takeover_at or self._data_dir is None:
            return
        self._takeover_at = now + 1.0
        old = self._server
        if old is not None and old.running:
            return  # our own server is up: the failure is something else
        self._restart_server(old, self._data_dir)

    def _restart_server(self, old: Any, data_dir: Path) -> None:
        """The takeover itself: blocks while a server starts (~0.1 s), not while it loads
        its file (until then lookups miss)."""
        from .store.server import shared_server

        try:
            url, server = shared_server(data_dir, wait_loaded=False)
        except Exception as exc:  # ServerStartError, OSError: stay degraded, try again later
            log.warning("hnswcache %r: the embedded server is gone and could not be "
                        "restarted: %s", self.namespace, exc)
            return
        if server is not None:
            if old is not None:
                old.stop()  # reap the dead process (the new server.json is not its own)
            self._server = server
            log.warning("hnswcache %r: the embedded server in %s was gone; restarted it "
                        "(pid %s), owned by this process now", self.namespace, data_dir,
                        server.pid)
        # Ours or another process's (restarted on a new port: TCP only, no unix socket):
        # the store follows the server's URL.
        if url != self._embedded_url:
            self._embedded_url = url
            self._reopen(url)

    def _reopen(self, url: str) -> None:
        raise NotImplementedError


def _carry_settings(old: Any, new: Any) -> Any:
    """``new``, a store reopened on a restarted server, with the settings a user gave the
    old one (they fell back to the defaults: an ``outage_cooldown`` set was lost)."""
    for name in ("outage_cooldown", "log_maxlen"):
        if name in vars(old):
            setattr(new, name, getattr(old, name))
    return new


class SemanticCache(_Base):
    """A semantic LLM-response cache on Redis/Valkey (or in memory).

    Args:
        embedder: callable ``list[str] -> (n, dim)``; default: offline all-MiniLM-L6-v2
            (loaded on first use; needs the ``embed`` extra).
        threshold: cosine similarity at or above which a semantic match is a hit.
        ttl: default seconds an entry lives (``None``: until evicted or deleted).
        ttl_jitter: shorten each entry's TTL by a random part of it, up to this fraction
            (0 to 1; e.g. 0.1: each entry lives 90-100% of its TTL), so answers cached in
            one burst do not all expire, and go back to the LLM, in the same second.
        max_entries: cap on entries in the namespace; least recently used go first.
        store: ``None`` (a private valkey-server with data in ``data_dir``), ``"memory"``,
            a ``redis://`` / ``rediss://`` URL, ``redis+cluster://host:port`` (Redis
            Cluster, seeded by any node), a ``redis.Redis`` or ``RedisCluster`` client, or a
            :class:`~hnswcache.store.base.Store`.
        namespace: the cache's name in the store (its keys carry the hash tag ``{namespace}``).
        strict: raise store and embedder errors instead of degrading to misses.
        clock: seconds, default :func:`time.time` (tests pass a controllable one).
        sync_interval: read other processes' changes at most this often (seconds); 0 reads
            them before every operation.
        candidates: neighbours fetched per semantic lookup.
        timeout: seconds to wait for the server (URL stores; default ``DEFAULT_TIMEOUT``,
            0.5): past it a lookup is a miss and a write is dropped.
        dtype: how the in-process index stores vectors: ``"int8"`` (default: a third of
            float32's memory), ``"float16"`` or ``"float32"``. The store always keeps
            float32 and every candidate near the threshold is re-scored on the stored
            vector, so the decisions are those of a float32 replica.
        M, ef_construction, ef_search: the HNSW parameters of each scope's index.
            ``ef_search=24`` with 4 starts and ``alpha=1.2`` loses 4 of 697 hits against an
            exact search at 100k entries (as ef 32 did with ``alpha=1``, at the same cost)
            and, with the rescue below, 85.0% of rare-topic paraphrases (brute force:
            85.2%; 82.4% without it, and ef 32 83.6%: ``bench/cache_ef.py``,
            ``bench/rescue.py``, ``docs/cache-history.md``).
        search_starts: level-0 starting points of each search (``Index.search_starts``;
            default 4: with ``alpha=1.2`` 8 find no more hits and cost ~8% more search
            time, 2 lose 3 more of the 697 sgd hits).
        alpha: the pruning slack of each scope's graph (``Index(alpha=)``; default 1.2, 1
            for ``M < 8``): keeps the entries of a rare topic reachable among many of
            another (paraphrase hits among 100k rows 0.836 instead of 0.796 at ef 32), for
            ~16% fewer sets a second and ~10% more search time at the same ef.
        snapshot_dir: a local folder for snapshots of the replica (default: beside the
            embedded server's data; none for other stores; Redis/Valkey stores only).
            :meth:`close`, :meth:`save_snapshot` and a warm start that read the store
            write one; the warm start loads it and applies the store's changes since,
            instead of rebuilding every scope's graph from the stored entries. A snapshot
            that does not fit the store is not used.
        snapshot_interval: seconds between two snapshots while the replica changes
            (default 300; ``None``: only the snapshots above). Due at the first change
            after the interval, it is written in the background (a thread; a task of the
            async cache) while lookups and writes go on (an insert waits while the save
            copies its scope's graph, ~20 ms per 100k entries). A process killed
            without :meth:`close` then restarts from a snapshot at most about one
            interval (plus the changes since) old. Unused without a snapshot folder.
        learn_floor: let each entry learn its own threshold, down to this similarity
            (``None``, the default: every entry answers at ``threshold``). An entry
            answers below ``threshold`` once its answer was judged right ``learn_after``
            times for prompts at that similarity or farther, and none wrong at or above
            them; verdicts come from ``@cached(judge=...)`` on misses near an entry and
            from :meth:`feedback`. Verdicts that an answer was wrong apply without it.
        learn_after: right verdicts an entry needs to answer below ``threshold``.
        rescue_below: a search whose nearest entry is below this similarity searches again
            from the 64 upper-level nodes nearest the query (``Index.rescue_beam``): the
            walk may have missed a few entries of a rare topic among many of another.
            Default 0.4: rare-topic paraphrases among 100k rows are answered in 85.0% of
            cases instead of 82.4% (brute force 85.2%), no in-domain lookup is slowed, and
            a lookup with nothing near it (a miss) takes ~1.1x as long in the index, ~2-3
            µs more at 100k entries (``bench/rescue.py``). ``None`` turns it off.
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
        timeout: float | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int = DEFAULT_EF_SEARCH,
        dtype: str = DEFAULT_DTYPE,
        search_starts: int = DEFAULT_SEARCH_STARTS,
        ttl_jitter: float = 0.0,
        alpha: float | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_interval: float | None = DEFAULT_SNAPSHOT_INTERVAL,
        learn_floor: float | None = None,
        learn_after: int = 3,
        rescue_below: float | None = RESCUE_BELOW,
    ) -> None:
        self._setup(embedder, threshold, ttl, max_entries, namespace, strict, clock,
                    sync_interval, candidates, M, ef_construction, ef_search, dtype,
                    search_starts, ttl_jitter, alpha, learn_floor, learn_after,
                    rescue_below)
        self._lock = threading.RLock()
        self._core.replica_lock = self._lock  # (lookups' repairs of the replica: under it)
        self._owns_store = not _is_store(store)
        if store is None:
            store = self._open_embedded(data_dir)
        if store == "memory":
            from .store.memory import MemoryStore

            store = MemoryStore(self.namespace)
        elif isinstance(store, str):
            from .store.redis import RedisStore

            store = RedisStore.from_url(store, namespace=self.namespace,
                                        timeout=timeout or DEFAULT_TIMEOUT)
        elif not _is_store(store):
            from .store.redis import RedisStore

            store = RedisStore(store, namespace=self.namespace)
        elif inspect.iscoroutinefunction(store.read):
            raise TypeError(f"SemanticCache needs a synchronous store, got the asyncio "
                            f"{type(store).__name__}: use AsyncSemanticCache with it")
        if store.namespace != self.namespace:
            raise ValueError(f"the store is for namespace {store.namespace!r}, "
                             f"the cache for {self.namespace!r}")
        _lend_clock(store, self._core.clock)
        self.store: Store = cast(Store, store)
        self._timeout = timeout or DEFAULT_TIMEOUT
        self._snapshot_folder(snapshot_dir, store, snapshot_interval)
        self._snapshot_thread: threading.Thread | None = None  # a periodic snapshot
        self._snapshot_mu = threading.Lock()
        # One save at a time. Taken after _lock, never the other way: a save holds _lock
        # only while it copies the replica's entry list and log position, not while it
        # writes (that held lookups applying others' changes, and writes, ~0.3 s per 100k).
        self._save_mu = threading.Lock()
        self._judges = JudgeRunner("hnswcache-judge", _MAX_JUDGING)  # (see _judge_later)
        if self._snapshot_every is not None and self._snapshot_dir is not None:
            _FORK_SAFE.add(self)

    def _reopen(self, url: str) -> None:
        from .store.redis import RedisStore

        old = self.store
        self.store = _carry_settings(old, RedisStore.from_url(
            url, namespace=self.namespace, timeout=self._timeout))
        old.close()

    # ------------------------------------------------------------------ plumbing
    def _ready(self) -> bool:
        """Warm start once (rebuild the replica from the store); False if the store is down."""
        c = self._core
        if c.position is not None:
            if c.ref_secret is None and self._ref_retry_due():
                self._learn_ref_secret(quiet=True)
            return True
        with self._lock:
            if c.position is not None:
                return True
            if time.monotonic() < c.retry_at and not c.strict:
                c.stats.add("store_errors")  # (a call the outage degraded, as failed() counts)
                return False
            try:
                self._rebuild()
            except StoreError as exc:
                c.retry_at = time.monotonic() + 1.0
                c.failed("warm start", exc)
                return False
            self._learn_ref_secret()
            return True

    def _learn_ref_secret(self, quiet: bool = False) -> None:
        """The namespace's key for ref() tags (until it is known, hits have no tag and refs
        cannot be checked: a failure here is no failure of the warm start). ``quiet`` (a
        lookup's retry): a failure is logged, not counted nor raised (a strict lookup that
        worked raised every 5 s)."""
        c = self._core
        if c.ref_secret is not None:
            return
        get = getattr(self.store, "ref_secret", None)
        try:
            c.ref_secret = secrets.token_bytes(32) if get is None else get()
        except StoreError as exc:
            if quiet:
                log.debug("hnswcache %r: the key of ref() tags is still unread: %s",
                          self.namespace, exc)
            else:
                c.failed("reading the key of ref() tags", exc)

    def _rebuild(self, snapshot: bool = True) -> None:
        c = self._core
        t0 = time.monotonic()
        if snapshot:  # (a rebuild inside the replay of a snapshot keeps its reason)
            self._snapshot_skipped = None
        resyncs, events = c.stats.counts["resyncs"], c.stats.counts["sync_events"]
        if snapshot and self._snapshot_dir is not None and self._from_snapshot():
            if c.stats.counts["resyncs"] == resyncs:  # (else the replay rebuilt: noted)
                if self._replayed_much(events):
                    self._save_unpublished()
                self._note_warm("snapshot", t0)
                log.info("hnswcache %r: %d live entries loaded from the snapshot in %s",
                         self.namespace, c.size(), self._snapshot_dir)
            return
        head = self.store.log_head()
        if c.dim is None:
            c.dim = self.store.check_meta(None, "")[0]
        c.clear_local(None)
        batches: Iterable[list[Fetched]] = self.store.scan()
        if c.dim is None:  # the entries decide the dimension: all of them, not one batch's
            batches = [[f for b in batches for f in b]]
        for batch in batches:
            c.load(batch)
        c.position = head
        if self._snapshot_dir is not None and c.where:
            # That was the slow way: leave a snapshot for the next start now (a process
            # that is killed never reaches close()).
            self._save_unpublished()
        self._note_warm("store", t0)
        log.info("hnswcache %r: %d live entries loaded", self.namespace, c.size())

    def _save_unpublished(self) -> None:
        """Save a snapshot during the warm start (the caller holds the lock), with the
        position unset meanwhile, so calls wait for it as they wait for the warm start
        instead of writing to the replica while it is saved."""
        c = self._core
        position, c.position = c.position, None
        try:
            if self._write_copy(self._copy(position)):
                self._snapshot_saved()
        except (OSError, _snapshot.SnapshotError) as exc:
            self._snapshot_not_saved(exc)
        finally:
            c.position = position

    def _from_snapshot(self) -> bool:
        """Warm start from the local snapshot: load it, then apply the store's changes
        since it was taken. False (and an empty replica) if there is none that fits."""
        c = self._core
        assert self._snapshot_dir is not None
        if c.dim is None:
            c.dim = self.store.check_meta(None, "")[0]
        c.clear_local(None)
        try:
            position = self._adopt(_snapshot.load(c, self._snapshot_dir, self.namespace))
            _, batch = self.store.read([], log_after=position, touch=(), now=c.now())
            self._check_replay(batch, position)
            c.position = position
            self._apply_locked(batch)
            sample = c.snapshot_sample()
            self._check_sample(c.snapshot_disagrees(sample, self.store.fetch(sample)))
        except BaseException as exc:  # (anything but a store error: the store decides)
            self._drop_snapshot(exc)
            return False
        return True

    def save_snapshot(self) -> bool:
        """Write a snapshot of the replica to ``snapshot_dir`` now (:meth:`close` does it
        too); False if there is nothing to save yet (the replica was never loaded).
        Lookups and writes go on while the index files are written (inserts into the
        index wait while each scope's graph is copied: ~30 ms per 100k entries)."""
        if self._snapshot_dir is None:
            raise ValueError("this cache has no snapshot_dir")
        if self._core.position is None:
            return False  # (not loaded: no warm start only to save what the store has)
        self.sync()  # (the log position then covers this process's own writes)
        return self._write_snapshot()

    def _write_snapshot(self) -> bool:
        c = self._core
        with self._lock:  # (no log batch is applied between the copies)
            if c.position is None:
                return False
            copy = self._copy(c.position)
        if self._write_copy(copy):
            self._snapshot_saved()
        return True

    def _write_copy(self, copy: tuple[int, str | None, dict[int, tuple[str, str]]]) -> bool:
        """Write a copy of the replica taken by :meth:`_copy` as the snapshot, unless a
        newer copy was written meanwhile; whether it was written."""
        n, position, where = copy
        with self._save_mu:
            if n < self._copy_written:
                return False
            _snapshot.save(self._core, cast(Path, self._snapshot_dir), self.namespace,
                           position, where)
            self._copy_written = n
            return True

    def _maybe_snapshot(self) -> None:
        """Start the periodic snapshot in a thread if one is due."""
        with self._snapshot_mu:  # (the claim, the start and close() in one order)
            if not self._snapshot_due():
                return
            # Not a daemon: the interpreter waits for a save under way at exit (~0.3 s per
            # 100k entries), so the snapshot is finished rather than cut off.
            th = threading.Thread(target=self._periodic_snapshot, name="hnswcache-snapshot")
            try:
                th.start()
            except RuntimeError as exc:  # (can't start new thread: the write itself is done)
                self._snapshot_saving = False
                self._snapshot_not_saved(exc)
                return
            self._snapshot_thread = th

    def _periodic_snapshot(self) -> None:
        try:
            try:
                self.sync()  # (as save_snapshot: the position then covers our own writes)
            except StoreError:
                pass  # (strict: the replica as applied is still a snapshot of its position)
            self._write_snapshot()
        except (OSError, _snapshot.SnapshotError) as exc:
            self._snapshot_not_saved(exc)
        except Exception:  # (a background thread: nobody else would see it)
            log.exception("hnswcache %r: periodic snapshot failed", self.namespace)
        finally:
            self._snapshot_saving = False

    def _apply(self, batch: LogBatch | None) -> None:
        if self._core.brings_nothing(batch):
            return
        with self._lock:
            self._apply_locked(batch)
        self._maybe_snapshot()

    def _apply_locked(self, batch: LogBatch | None) -> None:
        c = self._core
        while batch is not None:
            if c.stale(batch):
                batch = c.unapplied(batch)  # (what it holds beyond the other read)
                if batch is None:
                    return
            if batch.reset:
                c.stats.add("resyncs")
                log.warning("hnswcache %r: change log lost our position; rebuilding",
                            self.namespace)
                c.position = None
                self._rebuild(snapshot=False)
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

    def _semantic_rows(self, prompts: Sequence[str], rows: list[int],
                       known: dict[int, bool] | None, count: bool = True) -> list[int]:
        """``rows`` but those whose prompt is longer than the embedder reads (asked of the
        embedder for the rows ``known`` does not answer; with ``known`` None, embeddings
        were not given: the embedder is loaded here, these rows are embedded next);
        counted."""
        if known is None:
            self._embedder()
            known = {}
        long = self._core.cut_rows(prompts, rows, known)
        if count and long:
            self._core.stats.add("exact_only", len(long))
        return [i for i in rows if i not in long] if long else rows

    def _embed(self, texts: list[str], given: Any) -> npt.NDArray[np.float32] | None:
        """Vectors for ``texts``: ``given`` (already checked by ``c.vectors``) or the
        embedder's; ``None`` (counted) if the embedder failed, or the store could not be
        asked which embedder the namespace holds, and the cache is not strict."""
        c = self._core
        if given is None:
            # Loading the default model outside the try: its absence (ImportError) is a
            # setup error, raised, not an outage counted as a miss for ever.
            embedder = self._embedder()
            try:
                t0 = time.perf_counter()
                raw = embedder(texts)
                if not inspect.isawaitable(raw):
                    seconds = time.perf_counter() - t0
                    given = c.vectors(raw, len(texts))
                    c.stats.embed_time.add(seconds)  # (a call whose output is refused is
                    # an embed error, not a call)
            except Exception as exc:
                c.failed("embedding", exc, "embed_errors")
                return None
            if given is None:  # an awaitable: a caller's mistake, not an outage: raised
                if inspect.iscoroutine(raw):
                    raw.close()  # (never awaited: no warning)
                raise TypeError("the embedder returned an awaitable: use "
                                "AsyncSemanticCache for an async embedder")
        try:
            self._check_meta()
        except StoreError as exc:  # (checked again by the next call that gets this far)
            c.failed("embedder check", exc)
            return None
        return cast(npt.NDArray[np.float32], given)

    def sync(self) -> None:
        """Apply every change other processes made (normally done before each operation)."""
        c = self._core
        if not self._ready():
            return
        touch = c.take_touches()
        try:
            _, batch = self.store.read([], log_after=c.position, touch=touch, now=c.now())
            self._apply(batch)
        except StoreError as exc:
            c.put_back_touches(touch)
            c.failed("sync", exc)
        self._write_refreshes()

    # ------------------------------------------------------------------ reads
    def get(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> Hit | None:
        """The cached answer for ``prompt`` in ``scope``, or ``None``.

        ``embedding`` skips the embedder (a precomputed vector for ``prompt``); ``threshold``
        overrides the cache's for this call. ``max_age`` (seconds) refuses entries written
        longer ago than that, for this call only: they stay cached, and an exact entry that
        is too old lets a younger paraphrase answer (``stats()["too_old"]`` counts refusals).
        """
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return self.get_many([prompt], scope=scope, threshold=threshold, embeddings=emb,
                             max_age=max_age)[0]

    def get_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> list[Hit | None]:
        """:meth:`get` for several prompts of one scope: one store round trip for the exact
        tier, one embedder call and one index search for the rest."""
        return self._get_many(prompts, scope, threshold, embeddings, None, max_age)

    def lookup(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> Lookup:
        """:meth:`get` that also says how close a miss came: a :class:`Lookup` with the
        hit (or ``None``) and the similarity and key of the scope's nearest entry. Same
        arguments, same cost (the search already finds the nearest entry)."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return self.lookup_many([prompt], scope=scope, threshold=threshold, embeddings=emb,
                                max_age=max_age)[0]

    def lookup_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> list[Lookup]:
        """:meth:`lookup` for several prompts of one scope (as :meth:`get_many`)."""
        near: dict[int, tuple[float, int]] = {}
        used: list[Any] = [None] * len(prompts)
        out = self._get_many(prompts, scope, threshold, embeddings, used, max_age, near)
        c = self._core
        return c.lookups(out, near, c.threshold_for(threshold),
                         c.given_rows(used, embeddings, out))

    def _get_many(
        self, prompts: Sequence[str], scope: Mapping[str, Any] | None, threshold: float | None,
        embeddings: npt.ArrayLike | None, used: list[Any] | None,
        max_age: float | None = None, near_out: dict[int, tuple[float, int]] | None = None,
    ) -> list[Hit | None]:
        """get_many; fills ``used[i]`` with the embedding prompt ``i`` was searched with."""
        out = self._lookup(prompts, scope, threshold, embeddings, used, max_age, near_out)
        if self._core.refreshes:
            self._write_refreshes()
        return out

    def _write_refreshes(self) -> None:
        """Write back the sliding entries' later expiries now (one transaction; at most 16
        per entry and TTL), so the store and every other process have them at once."""
        c = self._core
        refs = c.take_refreshes()
        if not refs:
            return
        try:
            self.store.refresh(refs, c.now())
        except StoreContended as exc:  # (a hot entry: others refreshed it meanwhile)
            c.put_back_refreshes(refs)
            log.debug("hnswcache %r: %s", self.namespace, exc)
        except StoreError as exc:
            c.put_back_refreshes(refs)  # the next hit or sync() tries again
            c.failed("sliding-TTL refresh", exc)

    def _lookup(
        self, prompts: Sequence[str], scope: Mapping[str, Any] | None, threshold: float | None,
        embeddings: npt.ArrayLike | None, used: list[Any] | None,
        max_age: float | None = None, near_out: dict[int, tuple[float, int]] | None = None,
    ) -> list[Hit | None]:
        t0 = time.perf_counter()
        c = self._core
        c.check_prompts(prompts)
        thr = c.threshold_for(threshold)
        age = c.check_max_age(max_age)
        keys = [c.key(p, scope) for p in prompts]
        given_all = (None if embeddings is None
                     else c.vectors(embeddings, len(prompts), copy=False))
        out: list[Hit | None] = [None] * len(prompts)
        # row -> nearest (similarity, id) in the index: the miss statistics, lookup()
        near: dict[int, tuple[float, int]] = {} if near_out is None else near_out
        # Counted before it is answered: counted after, a scrape between a hit's count and
        # its lookup's showed more hits and misses than lookups (a hit rate above 1).
        c.stats.add("lookups", len(prompts))
        try:
            if not prompts or not self._ready():
                return self._answered(out)
            c.check_dim(given_all)  # (the warm start may just have learnt the dimension)
            sid = keys[0][1]
            ids = [k[0] for k in keys]
            # With embeddings given, search first and fetch the candidates in the same round
            # trip as the exact tier; valid unless changes were applied since the search, by
            # this read or by another thread's (then redo).
            before = c.stats.counts["sync_events"] + c.stats.counts["resyncs"]
            # (embeddings given: which prompts the embedder would cut, see lengths_ahead)
            known, not_ahead = c.lengths_ahead(prompts, ids, given_all)
            ahead, want_ahead = c.search_ahead(ids, given_all, sid, thr, near, not_ahead)
            touch = c.take_touches()
            gen = c.gen  # (what this lookup may repair: see CacheCore.gen)
            try:
                fetched, batch = self.store.read(
                    ids + want_ahead, log_after=c.sync_due(), touch=touch, now=c.now())
                self._apply(batch)
                if before != c.stats.counts["sync_events"] + c.stats.counts["resyncs"]:
                    ahead = None  # the replica changed: search again below
            except StoreError as exc:
                c.put_back_touches(touch)
                c.failed("get", exc)
                return self._answered(out)
            todo = c.answer_read(fetched, [k[3] for k in keys], ids + want_ahead, ahead,
                                 given_all, sid, thr, out, age, gen)
            if todo and sid in c.indexes:
                todo = self._semantic_rows(prompts, todo, known)
            if not todo or sid not in c.indexes:
                c.record_misses(out, near, thr)
                return self._answered(out)
            given = None if given_all is None else given_all[todo]
            vecs = self._embed([prompts[i] for i in todo], given)
            if vecs is None:
                return self._answered(out)
            if used is not None:
                for j, i in enumerate(todo):
                    used[i] = vecs[j]
            nearest: list[tuple[float, int]] = []
            cands = c.candidates(vecs, sid, thr, nearest)
            near.update(zip(todo, nearest))
            want = list(dict.fromkeys(e for row in cands for e, _ in row))
            if want:
                gen = c.gen
                try:
                    got = dict(zip(want, self.store.fetch(want)))
                except StoreError as exc:
                    c.failed("get", exc)
                    return self._answered(out)
                now = c.now()
                for j, i in enumerate(todo):
                    if cands[j]:
                        out[i] = c.semantic(vecs[j], cands[j], got, sid, thr, now, age, gen)
            c.record_misses(out, near, thr)
            return self._answered(out)
        except BaseException:
            # (a strict failure, a cancellation, an interrupt: hits and misses are counted
            # as the call returns, so lookups == hits + misses + unanswered)
            c.stats.add("unanswered", len(prompts))
            raise
        finally:
            c.stats.lookup_time.add(time.perf_counter() - t0)

    def _answered(self, out: list[Hit | None]) -> list[Hit | None]:
        self._core.answered(out)
        return out

    def _answer_of(self, k: tuple[int, str, str, str], max_age: float = math.inf
                   ) -> str | None:
        """The stored answer of key ``k`` (a live, valid entry of that scope and normalised
        prompt, at most ``max_age`` old), or ``None`` (also when the store fails)."""
        try:
            f = self.store.fetch([k[0]])[0]
        except StoreError:
            return None
        rec = self._core.exact_record(f, k[1], k[3], self._core.now(), max_age)
        return None if rec is None else rec.response

    def _lead(self, k: tuple[int, str, str, str], token: str, limit: float | None,
              max_age: float = math.inf, flight: Flight | None = None,
              wait_left: float | None = None) -> str | None:
        """Lead the call for entry ``k`` across processes: take the store's lease on it
        (``token``, for ``limit``: how long others wait for this call). While another
        process holds it, wait for that process's answer (at most ``wait_left``, default
        ``limit``) and return it; if its lease ends without one, try to take it again.
        ``None``: call (the lease is ours, the store has none, the wait is over, or the
        holder's call waits, through other calls, on this one)."""
        lease = getattr(self.store, "lease", None)
        if lease is None:
            return self._answer_of(k, max_age)  # (answered between our lookup and now?)
        seconds = _LEASE_UNBOUNDED if limit is None else limit
        left = seconds if wait_left is None else wait_left
        deadline = time.monotonic() + left
        store: Any = self.store
        marks = _WaitMarks(store, k[0], seconds, flight)
        try:
            while True:
                if lease(k[0], token, max(seconds, 0.001)):
                    return self._answer_of(k, max_age)
                delay = 0.005
                while True:  # poll the entry while the other lease lives
                    if marks.cycle():
                        return None  # the holder waits on us: call
                    time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    answer = self._answer_of(k, max_age)
                    if answer is not None:
                        return answer
                    if time.monotonic() >= deadline:
                        return None
                    if not store.lease_held(k[0]):
                        break  # that call failed or its process died: lead, unless answered
                    delay = min(delay * 2, 0.1)
        finally:
            marks.clear()

    def _release(self, eid: int, token: str) -> None:
        release = getattr(self.store, "release", None)
        if release is not None:
            release(eid, token)

    def _follow_flight(self, k: tuple[int, str, str, str], vec: Any, limit: float | None,
                       max_age: float, flight: Flight, token: str) -> str | None:
        """Cross-process coalescing of paraphrases: register this call's embedding among
        the scope's calls in flight; while another process's call, started earlier, with a
        prompt at or above the threshold from this one's, is in flight, wait for its answer
        (if it ends without one, the next such call's). ``None``: lead (registered again if
        it followed one; the caller lands it). The answer's entry vector is left in
        ``flight.answer_vec`` for this process's followers to check their own prompts."""
        store: Any = self.store
        c = self._core
        seconds = _LEASE_UNBOUNDED if limit is None else limit
        deadline = time.monotonic() + seconds
        owner = bytes.fromhex(token)
        _, others = store.fly(k[1], k[0], vec, seconds, owner)
        before = {o[1] for o in others}  # (registered before this call: see flight_leader)
        tried: set[int] = set()
        while True:
            leader = c.flight_leader(
                [o for o in others if o[1] in before and o[1] not in tried], vec, c.threshold)
            if leader is None or time.monotonic() >= deadline:
                if tried:  # (it withdrew to follow: it leads now, for the rest to see)
                    store.fly(k[1], k[0], vec, seconds, owner)
                return None
            tried.add(leader)
            store.land(k[1], k[0], owner)  # (following: other paraphrases follow that one)
            marks = _WaitMarks(store, leader, seconds, flight)  # (its leader holds its lease)
            cycle = False
            try:
                delay = 0.005
                while True:
                    got = self._entry_answer(leader, k[1], vec, max_age)
                    if got is not None:
                        flight.answer_vec = got[1]
                        return got[0]
                    if time.monotonic() >= deadline or (cycle := marks.cycle()):
                        break
                    if not store.flight_alive(k[1], leader, len(vec)):
                        got = self._entry_answer(leader, k[1], vec, max_age)
                        if got is not None:
                            flight.answer_vec = got[1]
                            return got[0]
                        break  # ended without one: maybe another call of the burst flies
                    time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 0.1)
            finally:
                marks.clear()
            if cycle:  # (that call waits on this one: lead)
                store.fly(k[1], k[0], vec, seconds, owner)
                return None
            others = store.flights(k[1], k[0], len(vec))

    def _entry_answer(self, eid: int, sid: str, vec: Any, max_age: float
                      ) -> tuple[str, Any] | None:
        try:
            f = self.store.fetch([eid])[0]
        except StoreError:
            return None
        return self._core.entry_answer(f, sid, vec, self._core.now(), max_age)

    # ------------------------------------------------------------------ writes
    def set(
        self, prompt: str, response: str, *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
        embedding: npt.ArrayLike | None = None, sliding: bool = False,
    ) -> str:
        """Store ``response`` for ``prompt`` in ``scope``; returns the entry's key.

        ``ttl`` (seconds) overrides the cache default. ``sliding=True`` makes it a sliding
        TTL: every hit extends the entry's life to ``ttl`` from then (see
        ``docs/cache.md``; bound the total age with ``get(..., max_age=)``). If the store is
        unreachable the write is dropped (counted, logged) unless the cache is strict.
        """
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return self.set_many([(prompt, response)], ttl=ttl, scope=scope,
                             metadata=[metadata], embeddings=emb,
                             sliding=sliding)[0]

    def set_many(
        self, items: Iterable[tuple[str, str]], *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: npt.ArrayLike | None = None, sliding: bool = False,
    ) -> list[str]:
        """Store several ``(prompt, response)`` pairs of one scope in one transaction."""
        c = self._core
        pairs = list(items)
        prompts = [p for p, _ in pairs]
        kk = [c.key(p, scope) for p in prompts]
        keys = [format_id(k[0]) for k in kk]
        if not pairs:
            return keys
        eff_ttl = c.check_ttl(ttl) if ttl is not None else c.ttl
        c.check_sliding(sliding, eff_ttl)
        metas = c.check_pairs(pairs, list(metadata) if metadata is not None
                              else [None] * len(pairs))
        given = None if embeddings is None else c.vectors(embeddings, len(pairs))
        vecs = self._embed(prompts, given)
        if vecs is None:
            return keys
        now = c.now()
        recs = c.records(kk, pairs, vecs, eff_ttl, metas, now, sliding,
                         c.exact_only_rows(prompts, count=True))
        if not self._ready():  # (counted there)
            return keys
        touch = c.take_touches()
        try:
            res = self.store.write(recs, c.ttls(recs, now), now, touch)
        except StoreError as exc:
            c.put_back_touches(touch)
            c.failed("set", exc)
            return keys
        c.stats.add("sets", len(recs))  # (stored: counted even if the local apply is cut)
        with self._lock:
            if not c.applied_past(res.log_positions):
                c.remember_own(res.log_positions, [r.id for r in recs])
                c.add_records(recs)
        self._maybe_snapshot()
        if (c.max_entries is not None and res.count > c.max_entries) or \
                res.expired_pending >= _HOUSEKEEP_EXPIRED:
            logged: list[tuple[str, Sequence[int]]] = []
            try:
                evicted, _ = self.store.evict(c.max_entries, now, logged)
            except StoreError as exc:
                c.failed("eviction", exc)
            else:
                with self._lock:
                    c.own_evicted(evicted, logged)
                c.stats.add("evictions", len(evicted))
        return keys

    def feedback(self, hit: Hit | Mapping[str, Any], correct: bool) -> bool:
        """Tell the cache whether ``hit``'s answer was right for the prompt that got it
        (a user's thumbs down, a judge's verdict). ``hit`` is the :class:`Hit`, or its
        :meth:`Hit.ref` kept with the response (JSON) for a verdict that comes later, in
        another request or process.

        Wrong: its entry answers no prompt at ``hit.similarity`` or farther again, in
        every process that shares the store (an exact hit judged wrong: no prompt at all,
        until the entry is written again). Right: with ``learn_floor`` set, one of the
        verdicts that let an entry answer below the threshold. A verdict belongs to the
        answer that was given: a new write of the entry starts with none. True if it was
        recorded; False if the entry was deleted or written again since, or the store
        failed (counted in ``stats()["store_errors"]``; raised if strict), or other writers
        of the entry kept winning for a second (``stats()["verdicts_lost"]``)."""
        if self._ready():
            self._learn_ref_secret()  # (a ref is checked with it)
        if self._core.unchecked_ref(hit):
            return False
        eid, version, verdict = self._core.verdict_of(hit, correct)
        return self._add_verdict(eid, version, verdict)

    def _add_verdict(self, eid: int, version: str, verdict: tuple[float, bool]) -> bool:
        c = self._core
        try:
            done = self.store.add_verdict(eid, version, verdict)
        except StoreContended as exc:  # (not an outage, but the caller's verdict is lost)
            c.stats.add("verdicts_lost")
            log.warning("hnswcache %r: %s", self.namespace, exc)
            return False
        except StoreError as exc:
            c.failed("feedback", exc)
            return False
        if done:
            c.stats.add("verdicts_right" if verdict[1] else "verdicts_wrong")
        return done

    def _learn(self, k: tuple[int, str, str, str], vec: Any, answer: str,
               judge: Callable[[str, str], Any]) -> None:
        """After ``@cached`` called ``fn`` on a miss: if the nearest entry lies in the
        band where verdicts teach, judge its answer against the new one, and record it."""
        c = self._core
        if c.learn_floor is None or vec is None:
            return
        with self._judges.native():  # (an exit waits for it to return)
            ids = c.learn_ids(k, vec)
        if not ids:
            return
        try:
            fetched = self.store.fetch(ids)
        except StoreError as exc:
            c.failed("fetch", exc)
            return
        target = c.learn_target(fetched, vec, k[1], c.now())
        if target is None:
            return
        rec, sim = target
        right = self._ask_judge(judge, answer, rec.response)
        if right is not None:
            self._add_verdict(rec.id, rec.version, (sim, right))

    def _ask_judge(self, judge: Callable[[str, str], Any], new: str, cached: str
                   ) -> bool | None:
        """``judge(new, cached)`` as a verdict; ``None`` (logged) if it failed."""
        try:
            return _verdict(judge(new, cached))
        except Exception:
            log.exception("hnswcache %r: the judge failed", self.namespace)
            return None

    def _judge_later(self, k: tuple[int, str, str, str], vec: Any, answer: str,
                     judge: Callable[[str, str], Any]) -> None:
        """Run :meth:`_learn` in the cache's judge thread (``_judges.py``: one judgment at
        a time, at most ``_MAX_JUDGING`` waiting, past that one is skipped): the caller of
        ``@cached``, and the calls that wait for it, do not wait for a judge (an LLM judge
        takes as long as the call it judges)."""
        if not self._closed:
            self._judges.submit(functools.partial(self._learn, k, vec, answer, judge))

    def wait_for_verdicts(self, timeout: float | None = None) -> bool:
        """Wait until the judges ``@cached(judge=...)`` started have recorded their verdicts
        (they run in the background, one at a time, after the call returned); True if none
        is left, False if ``timeout`` seconds passed first (or when called from a judge)."""
        return self._judges.wait(timeout)

    def _judge_hit(self, hit: Hit, answer: str, judge: Callable[[str, str], Any]) -> None:
        """An audit's judgment (in the judge thread): was ``hit`` right, given ``answer``?"""
        right = self._ask_judge(judge, answer, hit.response)
        if right is not None:
            self._add_verdict(*self._core.verdict_of(hit, right))

    def delete(self, key: str) -> bool:
        """Delete the entry with this key (from :class:`Hit` or :meth:`set`); True if it
        existed."""
        c = self._core
        eid = parse_id(key)
        if eid is None:
            raise ValueError(f"not a cache key: {key!r}")
        self._ready()
        try:
            logged = getattr(self.store, "delete_logged", None)
            res = logged([eid]) if logged is not None else Cleared(self.store.delete([eid]))
        except StoreError as exc:
            c.failed("delete", exc)
            return False
        with self._lock:
            # (as a write: if another thread read the log past this deletion, it applied
            # it, and maybe another process's new write of the entry after it)
            if not c.applied_past(res.log_positions):
                c.remove([eid])
        n = res.deleted
        c.stats.add("deletes", n)
        if n:
            self._maybe_snapshot()
        return n > 0

    def clear(self, scope: Mapping[str, Any] | None = None, *, within: bool = False) -> int:
        """Delete every entry (``scope=None``) or every entry of one scope (pass ``{}`` for
        the default scope); returns how many the store deleted.

        ``within=True`` deletes the entries of every scope that holds all of ``scope``'s
        fields, and maybe more: ``clear({"tenant": "a"}, within=True)`` also deletes
        ``{"tenant": "a", "model": "m"}``'s. (Each deleted entry is logged: slower than a
        whole scope's one event, for a whole scan either way.)"""
        c = self._core
        if within:
            fields = c.within_fields(scope)
            try:
                return self.store.clear_within(fields)
            except StoreError as exc:
                c.failed("clear", exc)
                return 0
        sid = scope_key(scope)[0] if scope is not None else None
        self._ready()
        try:
            res = self.store.clear(sid)
        except StoreError as exc:
            c.failed("clear", exc)
            return 0
        with self._lock:
            # Its own events are applied here: read back from the log later, a clear event
            # would also drop what this process wrote after it.
            c.own_cleared(sid, res)
        left = c.held_in(sid) if res.batches is not None else []
        if left:
            # What the pass did not delete, the store no longer held (another process's
            # delete, a TTL), or was written meanwhile: as the store holds it now (len()
            # right after a clear counted entries the server had dropped).
            gen = c.gen
            try:
                fetched = self.store.fetch(left)
            except StoreError:
                pass  # (the next log read settles them)
            else:
                c.reconcile_repair(left, fetched, gen)
        if res.deleted:
            self._maybe_snapshot()
        return res.deleted

    # ------------------------------------------------------------------ decorator
    def cached(
        self, *, scope: Mapping[str, Any] | None = None, ttl: float | None = None,
        key: Callable[..., Any] | None = None, coalesce: bool = True, wait: float = 60.0,
        max_age: float | None = None, sliding: bool = False, name: str | None = None,
        judge: Callable[[str, str], bool] | None = None, audit: float = 0.0,
    ) -> Callable[[F], F]:
        """Decorate ``fn(prompt, ...) -> str`` so answers come from the cache when they can.

        Other arguments and the function's name (``module.qualname``, or ``name=``) become
        part of the scope. Functions made by one factory, or two lambdas of one module,
        share a qualname and would answer each other: give each its own ``name=``. A miss
        embeds the prompt once, for the lookup and for storing the answer.

        With ``coalesce`` (default), a miss while another thread is already calling ``fn``
        for the same prompt, or for a prompt at or above the threshold from it, waits for
        that call (at most ``wait`` seconds) and returns its answer instead of calling ``fn``
        again: a burst of paraphrases costs one LLM call (``stats()["coalesced"]`` counts
        the calls saved). If that call raises, one of the waiting callers calls ``fn``
        again and the others wait for it; if it does not return a ``str``, or takes longer
        than ``wait``, the waiting callers call ``fn`` themselves. Across processes sharing a
        Redis/Valkey store, misses of the same prompt wait likewise for the process holding
        the store's lease on it, and misses of a paraphrase for the earliest call in flight
        in another process whose prompt is at or above the threshold from theirs. A call
        made from inside the call it would wait for (the same thread, or a task it starts)
        never waits (``docs/cache.md``).

        ``max_age`` (seconds) makes a cached answer older than that a miss: ``fn`` is called
        and its answer replaces the old one (see :meth:`get`). ``sliding`` stores answers
        with a sliding ``ttl`` (see :meth:`set`).

        With the cache's ``learn_floor`` set, a miss whose nearest entry lies between it and
        that entry's threshold teaches the entry: ``judge(new answer, cached answer)`` says
        whether the cached answer would have done (default :func:`same_text`), and the
        verdict is recorded at the prompts' similarity (see :meth:`feedback`). After each
        call of ``fn`` a search and a store read find that entry, and the judge runs in the
        background (one judge at a time per cache; :meth:`wait_for_verdicts` waits for
        them): no extra call of ``fn``, and nobody waits for the judge.

        ``audit`` (0 to 1, default 0) checks that share of the semantic hits: ``fn`` is
        called although the cache had an answer, its answer is returned and stored, and
        ``judge(new answer, cached answer)`` records a verdict on the entry that hit (in
        the background, as above): an entry found wrong stops answering at that similarity
        or farther, with no user's feedback (see :meth:`feedback`). It costs that share of
        the semantic hits in calls of ``fn`` (one at a time per prompt in a process; a
        call that fails returns the cached answer). Audited lookups count as hits in
        :meth:`stats`. It needs no ``learn_floor``.
        """
        if judge is not None and (_is_async_callable(judge) or not callable(judge)):
            raise TypeError("judge must be a function (new answer, cached answer) -> bool; "
                            "an async judge needs AsyncSemanticCache")
        audit = _check_audit(audit)
        limit = _check_wait(wait)
        age = self._core.check_max_age(max_age)
        self._core.check_sliding(
            sliding, self._core.check_ttl(ttl) if ttl is not None else self._core.ttl)

        def deco(fn: F) -> F:
            if _is_async_callable(fn):  # (its coroutine is not a str: nothing was cached)
                raise TypeError("SemanticCache.cached decorates plain functions; an async "
                                "function needs AsyncSemanticCache")
            sig = _signature(fn)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                prompt, sc = _call_key(fn, args, kwargs, key, scope, name, sig)
                used: list[Any] = [None]
                hit = self._get_many([prompt], sc, None, None, used, max_age)[0]
                if hit is not None:
                    if not (audit and hit.tier == "semantic" and self._core.draw(audit)):
                        return hit.response
                    k = self._core.key(prompt, sc)
                    if k[0] in self._auditing:
                        return hit.response  # (one audit of a prompt at a time: a burst
                    self._auditing.add(k[0])  # of it costs one extra call, not one each)
                    try:
                        result = fn(*args, **kwargs)  # an audit: the answer is checked
                    except Exception:
                        log.warning("hnswcache %r: an audit's call failed; the cached "
                                    "answer is returned", self.namespace, exc_info=True)
                        return hit.response
                    finally:
                        self._auditing.discard(k[0])
                    if isinstance(result, str) and _storable(self, prompt, result):
                        self.set(prompt, result, ttl=ttl, scope=sc, embedding=used[0],
                                 sliding=sliding)
                        self._core.stats.add("audits")
                        if not self._closed:
                            self._judges.submit(functools.partial(
                                self._judge_hit, hit, result, judge or same_text))
                    return result

                def call() -> Any:
                    result = fn(*args, **kwargs)
                    if isinstance(result, str) and _storable(self, prompt, result):
                        self.set(prompt, result, ttl=ttl, scope=sc, embedding=used[0],
                                 sliding=sliding)
                        if self._core.learn_floor is not None:
                            self._judge_later(self._core.key(prompt, sc), used[0], result,
                                              judge or same_text)
                    return result

                if not coalesce:
                    return call()
                c = self._core
                k = c.key(prompt, sc)
                if inside_call(k[0]):
                    return call()  # made by the call for this entry: waiting would be on itself
                # (the scope had no index: nothing was embedded; a prompt longer than the
                # embedder reads has no vector worth comparing: it follows its own key only)
                if used[0] is None and self._semantic_rows([prompt], [0], None, count=False):
                    vecs = self._embed([prompt], None)
                    used[0] = None if vecs is None else vecs[0]
                t_wait = time.monotonic()
                while True:
                    flight, leads = self._flights.join(k[0], k[1], used[0], c.threshold)
                    if leads:
                        break
                    try:
                        got = flight.done.wait(_rest(limit, t_wait))
                    finally:
                        stop_waiting(flight)
                    if got and flight.failed and _rest(limit, t_wait) != 0.0:
                        continue  # its call failed: one of the waiting leads the retry
                    if got and flight.result is not None and _answers(flight, used[0],
                                                                      c.threshold):
                        c.stats.add("coalesced")
                        return flight.result
                    return call()
                token = secrets.token_hex(16)
                flight.token = token
                fly = self._follows_paraphrases(used[0], limit)
                ctx = LEADING.set(LEADING.get() | {flight})
                result = None
                t0 = time.monotonic()
                try:
                    answer = None
                    if fly:
                        answer = self._follow_flight(k, used[0], limit, age, flight, token)
                    if answer is None:  # (one wait limit for both waits)
                        answer = self._lead(k, token, limit, age, flight, _rest(limit, t0))
                    if answer is not None:
                        c.stats.add("coalesced")
                        result = answer
                        return answer
                    result = call()
                except BaseException:
                    flight.failed = True
                    raise
                finally:
                    LEADING.reset(ctx)
                    try:
                        self._flights.finish(flight, result if isinstance(result, str) else None)
                    finally:
                        try:
                            if fly:  # (its field, if still ours; also after an error)
                                self.store.land(  # type: ignore[attr-defined]
                                    k[1], k[0], bytes.fromhex(token))
                        finally:
                            self._release(k[0], token)
                return result

            return cast(F, wrapper)

        return deco

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Save a snapshot (with a ``snapshot_dir``), close the store connection (if the
        cache opened it) and stop its own server. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        c = self._core
        c.on_store_error = None  # (closing: no restart of the embedded server now)
        with self._snapshot_mu:  # (_closed is set: no snapshot thread starts after this)
            th, self._snapshot_thread = self._snapshot_thread, None
        if th is not None and th is not threading.current_thread():
            th.join()  # (the snapshot below comes after it)
        # (_closed is set: no judgment is queued after this) Those not started are dropped;
        # one under way has a moment to record its verdict.
        self._judges.stop(_JUDGE_CLOSE_WAIT)
        refs = c.take_refreshes()  # hits whose write-back failed so far
        if refs:
            try:
                self.store.refresh(refs, c.now())
            except StoreError as exc:
                log.warning("hnswcache: sliding-TTL refreshes lost on close: %s", exc)
        # Hits not yet sent to the LRU: they ride on the next store call, and a short-lived
        # cache makes none (its entries' LRU places were as if never hit).
        touch = c.take_touches()
        if touch and c.position is not None:
            try:
                self.store.read([], log_after=None, touch=touch, now=c.now())
            except StoreError as exc:
                log.warning("hnswcache: %d LRU touches lost on close: %s", len(touch), exc)
        if self._snapshot_dir is not None and c.position is not None:
            try:
                self.sync()
            except StoreError:
                pass  # (strict: the replica as applied is still a snapshot of its position)
            try:
                self._write_snapshot()
            except (OSError, _snapshot.SnapshotError) as exc:
                self._snapshot_not_saved(exc)
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
        timeout: float | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int = DEFAULT_EF_SEARCH,
        dtype: str = DEFAULT_DTYPE,
        search_starts: int = DEFAULT_SEARCH_STARTS,
        ttl_jitter: float = 0.0,
        alpha: float | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_interval: float | None = DEFAULT_SNAPSHOT_INTERVAL,
        learn_floor: float | None = None,
        learn_after: int = 3,
        rescue_below: float | None = RESCUE_BELOW,
    ) -> None:
        self._setup(embedder, threshold, ttl, max_entries, namespace, strict, clock,
                    sync_interval, candidates, M, ef_construction, ef_search, dtype,
                    search_starts, ttl_jitter, alpha, learn_floor, learn_after,
                    rescue_below)
        # One lock of each kind per event loop: an asyncio.Lock that ever waited is bound to
        # its loop, and the next asyncio.run() of a program got "bound to a different event
        # loop" from every call (as the store keeps one client per loop).
        self._alocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
            weakref.WeakKeyDictionary()
        self._asave_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._judge_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._closing: asyncio.Task[None] | None = None  # (see close)
        # The warm start under way on each loop (see _ready).
        self._warmups: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Task[bool]] = weakref.WeakKeyDictionary()
        self._saving = False  # a snapshot's index files are being written (see _insert)
        self._judge_tasks: set[asyncio.Task[None]] = set()  # @cached's judges
        self._owns_store = not _is_store(store)
        if store is None:
            store = self._open_embedded(data_dir)
        if store == "memory":
            from .store.memory import AsyncMemoryStore

            store = AsyncMemoryStore(namespace=self.namespace)
        elif isinstance(store, str):
            from .store.redis import AsyncRedisStore

            store = AsyncRedisStore.from_url(store, namespace=self.namespace,
                                             timeout=timeout or DEFAULT_TIMEOUT)
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
        _lend_clock(store, self._core.clock)
        self.store: AsyncStore = cast(AsyncStore, store)
        self._timeout = timeout or DEFAULT_TIMEOUT
        self._snapshot_folder(snapshot_dir, store, snapshot_interval)
        self._takeover: asyncio.Future[None] | None = None  # a server restart in progress
        self._snapshot_task: asyncio.Task[None] | None = None  # a periodic snapshot

    def _restart_server(self, old: Any, data_dir: Path) -> None:
        # Never block the event loop: the server starts in a worker thread; the calls made
        # meanwhile are misses, as they were since the server went away. One at a time:
        # another process may hold the folder's lock for as long as its server loads.
        if self._takeover is not None and not self._takeover.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return super()._restart_server(old, data_dir)
        self._takeover = loop.run_in_executor(None, super()._restart_server, old, data_dir)

    def _reopen(self, url: str) -> None:
        from .store.redis import AsyncRedisStore

        # (the old store's connections are to a dead server: nothing to close cleanly)
        self.store = _carry_settings(self.store, AsyncRedisStore.from_url(
            url, namespace=self.namespace, timeout=self._timeout))

    @staticmethod
    def _loop_lock(locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
                   ) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = locks.get(loop)
        if lock is None:
            lock = locks[loop] = asyncio.Lock()
        return lock

    @property
    def _lock(self) -> asyncio.Lock:
        return self._loop_lock(self._alocks)

    @property
    def _save_lock(self) -> asyncio.Lock:
        """One snapshot save at a time (taken after _lock, never the other way)."""
        return self._loop_lock(self._asave_locks)

    async def _ready(self) -> bool:
        """Whether the replica is loaded; the warm start if not. The warm start is a task
        of its own that the callers wait for: one whose caller is cancelled (a request's
        timeout) goes on, and the next caller waits for the same one. It ran in the caller,
        and a cancelled one was thrown away: with per-request timeouts shorter than a warm
        start (3.8 s for 30,000 entries), a cache never loaded (a review: 15 requests)."""
        c = self._core
        if c.position is not None:
            if c.ref_secret is None and self._ref_retry_due():
                await self._learn_ref_secret(quiet=True)
            return True
        loop = asyncio.get_running_loop()
        task = self._warmups.get(loop)
        if task is None or task.done():
            if time.monotonic() < c.retry_at and not c.strict:
                c.stats.add("store_errors")  # (a call the outage degraded, as failed() counts)
                return False
            task = self._warmups[loop] = loop.create_task(self._warm_start())
            task.add_done_callback(self._warm_start_ended)
        mark = _cancel_mark()
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and _cancel_mark() == mark:
                return False  # (close() cancelled the warm start, not this caller: a miss)
            raise

    def _warm_start_ended(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled():
            task.exception()  # (one nobody waits for any more is logged by failed())
        loop = task.get_loop()
        if self._warmups.get(loop) is task:  # (a task holds its loop: not kept for ever)
            del self._warmups[loop]

    async def _warm_start(self) -> bool:
        c = self._core
        async with self._lock:
            if c.position is not None:
                return True
            try:
                await self._rebuild()
            except StoreError as exc:
                c.retry_at = time.monotonic() + 1.0
                c.failed("warm start", exc)
                return False
            await self._learn_ref_secret()
            return True

    async def _learn_ref_secret(self, quiet: bool = False) -> None:
        """See :meth:`SemanticCache._learn_ref_secret`."""
        c = self._core
        if c.ref_secret is not None:
            return
        get = getattr(self.store, "ref_secret", None)
        try:
            c.ref_secret = secrets.token_bytes(32) if get is None else await get()
        except StoreError as exc:
            if quiet:
                log.debug("hnswcache %r: the key of ref() tags is still unread: %s",
                          self.namespace, exc)
            else:
                c.failed("reading the key of ref() tags", exc)

    async def _rebuild(self, snapshot: bool = True) -> None:
        c = self._core
        t0 = time.monotonic()
        if snapshot:  # (a rebuild inside the replay of a snapshot keeps its reason)
            self._snapshot_skipped = None
        resyncs, events = c.stats.counts["resyncs"], c.stats.counts["sync_events"]
        if snapshot and self._snapshot_dir is not None and await self._from_snapshot():
            if c.stats.counts["resyncs"] == resyncs:  # (else the replay rebuilt: noted)
                if self._replayed_much(events):
                    await self._save_unpublished()
                self._note_warm("snapshot", t0)
                log.info("hnswcache %r: %d live entries loaded from the snapshot in %s",
                         self.namespace, c.size(), self._snapshot_dir)
            return
        head = await self.store.log_head()
        if c.dim is None:
            c.dim = (await self.store.check_meta(None, ""))[0]
        c.clear_local(None)
        # Indexed in a worker thread: the loop goes on serving meanwhile (with the position
        # unset, no call passes the lock and changes the replica).
        if c.dim is None:  # the entries decide the dimension: all of them, not one batch's
            await _to_thread_to_the_end(c.load, [f async for b in self.store.scan() for f in b])
        else:
            async for batch in self.store.scan():
                await _to_thread_to_the_end(c.load, batch)
        c.position = head
        if self._snapshot_dir is not None and c.where:
            await self._save_unpublished()  # (see SemanticCache._rebuild)
        self._note_warm("store", t0)
        log.info("hnswcache %r: %d live entries loaded", self.namespace, c.size())

    async def _save_unpublished(self) -> None:
        """See :meth:`SemanticCache._save_unpublished` (written in a worker thread; with
        the position unset no call passes the lock and writes to the replica meanwhile)."""
        c = self._core
        position, c.position = c.position, None
        try:
            if await self._write_copy(self._copy(position)):
                self._snapshot_saved()
        except (OSError, _snapshot.SnapshotError) as exc:
            self._snapshot_not_saved(exc)
        finally:
            c.position = position

    async def _from_snapshot(self) -> bool:
        """See :meth:`SemanticCache._from_snapshot` (the files are read in a worker
        thread)."""
        c = self._core
        assert self._snapshot_dir is not None
        if c.dim is None:
            c.dim = (await self.store.check_meta(None, ""))[0]
        c.clear_local(None)
        try:
            # (read in a thread that does not touch the replica: a warm start cancelled
            # part-way, by close(), leaves nothing behind)
            position = self._adopt(await asyncio.to_thread(
                _snapshot.load, c, self._snapshot_dir, self.namespace))
            _, batch = await self.store.read([], log_after=position, touch=(), now=c.now())
            self._check_replay(batch, position)
            c.position = position
            await self._apply_locked(batch)
            sample = c.snapshot_sample()
            self._check_sample(c.snapshot_disagrees(sample, await self.store.fetch(sample)))
        except BaseException as exc:  # (anything but a store error: the store decides)
            self._drop_snapshot(exc)
            return False
        return True

    @_honours_cancel
    async def save_snapshot(self) -> bool:
        """See :meth:`SemanticCache.save_snapshot` (written in a worker thread)."""
        if self._snapshot_dir is None:
            raise ValueError("this cache has no snapshot_dir")
        if self._core.position is None:
            return False  # (not loaded: no warm start only to save what the store has)
        await self.sync()  # (the log position then covers this process's own writes)
        return await self._write_snapshot()

    async def _write_snapshot(self) -> bool:
        c = self._core
        async with self._lock:  # (see SemanticCache._write_snapshot)
            if c.position is None:
                return False
            copy = self._copy(c.position)
        if await self._write_copy(copy):
            self._snapshot_saved()
        return True

    async def _write_copy(self, copy: tuple[int, str | None, dict[int, tuple[str, str]]]
                          ) -> bool:
        """See :meth:`SemanticCache._write_copy` (written in a worker thread)."""
        n, position, where = copy
        async with self._save_lock:
            if n < self._copy_written:
                return False
            self._saving = True
            try:
                await _to_thread_to_the_end(_snapshot.save, self._core,
                                            cast(Path, self._snapshot_dir), self.namespace,
                                            position, where)
            finally:
                self._saving = False
            self._copy_written = n
            return True

    async def _insert(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)``, which inserts into the replica's graphs: in a worker thread while
        a snapshot is written, since an insert then waits while the save copies the graph
        (~20 ms per 100k rows), which on the event loop's thread would stall every task."""
        if self._saving:
            self._core.offloaded += 1  # (no lookup repairs meanwhile: see CacheCore.gen)
            try:
                await _to_thread_to_the_end(fn, *args)
            finally:
                self._core.offloaded -= 1
        else:
            fn(*args)

    def _maybe_snapshot(self) -> None:
        """Start the periodic snapshot as a task if one is due."""
        if self._snapshot_due():
            task = asyncio.get_running_loop().create_task(self._periodic_snapshot())
            # (a callback, not a finally: a task cancelled before it ran runs no finally)
            task.add_done_callback(lambda _: setattr(self, "_snapshot_saving", False))
            self._snapshot_task = task

    async def _periodic_snapshot(self) -> None:
        try:
            try:
                await self.sync()  # (see SemanticCache._periodic_snapshot)
            except StoreError:
                pass
            await self._write_snapshot()
        except (OSError, _snapshot.SnapshotError) as exc:
            self._snapshot_not_saved(exc)
        except Exception:  # (a background task: nobody awaits its result)
            log.exception("hnswcache %r: periodic snapshot failed", self.namespace)

    async def _apply(self, batch: LogBatch | None) -> None:
        if self._core.brings_nothing(batch):
            return
        async with self._lock:
            await self._apply_locked(batch)
        self._maybe_snapshot()

    async def _apply_locked(self, batch: LogBatch | None) -> None:
        c = self._core
        while batch is not None:
            if c.stale(batch):
                batch = c.unapplied(batch)  # (what it holds beyond the other read)
                if batch is None:
                    return
            if batch.reset:
                c.stats.add("resyncs")
                log.warning("hnswcache %r: change log lost our position; rebuilding",
                            self.namespace)
                c.position = None
                await self._rebuild(snapshot=False)
                return
            ids = c.apply_log(batch)
            if ids:
                await self._insert(c.reconcile, ids, await self.store.fetch(ids))
            c.position = batch.position
            if not batch.more:
                return
            _, batch = await self.store.read([], log_after=c.position, touch=(), now=c.now())

    async def _check_meta(self) -> None:
        c = self._core
        if not c.meta_checked and c.dim is not None:
            name = embedder_name(c.embedder) if c.embedder is not None else "unknown"
            c.check_meta(await self.store.check_meta(c.dim, name))

    async def _semantic_rows(self, prompts: Sequence[str], rows: list[int],
                             known: dict[int, bool] | None, count: bool = True) -> list[int]:
        """See :meth:`SemanticCache._semantic_rows` (the model is loaded in a thread)."""
        if known is None:
            if self._core.embedder is None:
                await asyncio.to_thread(self._embedder)
            known = {}
        long = self._core.cut_rows(prompts, rows, known)
        if count and long:
            self._core.stats.add("exact_only", len(long))
        return [i for i in rows if i not in long] if long else rows

    async def _embed(self, texts: list[str], given: Any) -> npt.NDArray[np.float32] | None:
        c = self._core
        if given is None:
            emb = c.embedder
            if emb is None:  # (as in SemanticCache._embed: a missing model raises)
                emb = await asyncio.to_thread(self._embedder)
            try:
                t0 = time.perf_counter()
                if _is_async_callable(emb):
                    raw = await cast(Callable[[list[str]], Awaitable[Any]], emb)(texts)
                else:
                    raw = await asyncio.to_thread(emb, texts)
                    if inspect.isawaitable(raw):  # (a lambda or wrapper of an async one)
                        raw = await raw
                seconds = time.perf_counter() - t0
                given = c.vectors(raw, len(texts))
                c.stats.embed_time.add(seconds)  # (as SemanticCache._embed)
            except Exception as exc:
                c.failed("embedding", exc, "embed_errors")
                return None
        try:
            await self._check_meta()
        except StoreError as exc:  # (as SemanticCache._embed)
            c.failed("embedder check", exc)
            return None
        return cast(npt.NDArray[np.float32], given)

    @_honours_cancel
    async def sync(self) -> None:
        """Apply every change other processes made (normally done before each operation)."""
        c = self._core
        if not await self._ready():
            return
        touch = c.take_touches()
        try:
            _, batch = await self.store.read([], log_after=c.position, touch=touch,
                                             now=c.now())
            await self._apply(batch)
        except StoreError as exc:
            c.put_back_touches(touch)
            c.failed("sync", exc)
        await self._write_refreshes()

    async def get(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> Hit | None:
        """See :meth:`SemanticCache.get`."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return (await self.get_many([prompt], scope=scope, threshold=threshold,
                                    embeddings=emb, max_age=max_age))[0]

    @_honours_cancel
    async def get_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> list[Hit | None]:
        """See :meth:`SemanticCache.get_many`."""
        return await self._get_many(prompts, scope, threshold, embeddings, None, max_age)

    async def lookup(
        self, prompt: str, *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embedding: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> Lookup:
        """See :meth:`SemanticCache.lookup`."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return (await self.lookup_many([prompt], scope=scope, threshold=threshold,
                                       embeddings=emb, max_age=max_age))[0]

    @_honours_cancel
    async def lookup_many(
        self, prompts: Sequence[str], *, scope: Mapping[str, Any] | None = None,
        threshold: float | None = None, embeddings: npt.ArrayLike | None = None,
        max_age: float | None = None,
    ) -> list[Lookup]:
        """See :meth:`SemanticCache.lookup_many`."""
        near: dict[int, tuple[float, int]] = {}
        used: list[Any] = [None] * len(prompts)
        out = await self._get_many(prompts, scope, threshold, embeddings, used, max_age,
                                   near)
        c = self._core
        return c.lookups(out, near, c.threshold_for(threshold),
                         c.given_rows(used, embeddings, out))

    async def _get_many(
        self, prompts: Sequence[str], scope: Mapping[str, Any] | None, threshold: float | None,
        embeddings: npt.ArrayLike | None, used: list[Any] | None,
        max_age: float | None = None, near_out: dict[int, tuple[float, int]] | None = None,
    ) -> list[Hit | None]:
        """See :meth:`SemanticCache._get_many`."""
        out = await self._lookup(prompts, scope, threshold, embeddings, used, max_age,
                                 near_out)
        if self._core.refreshes:
            await self._write_refreshes()
        return out

    async def _write_refreshes(self) -> None:
        """See :meth:`SemanticCache._write_refreshes`."""
        c = self._core
        refs = c.take_refreshes()
        if not refs:
            return
        try:
            await self.store.refresh(refs, c.now())
        except StoreContended as exc:  # (a hot entry: others refreshed it meanwhile)
            c.put_back_refreshes(refs)
            log.debug("hnswcache %r: %s", self.namespace, exc)
        except StoreError as exc:
            c.put_back_refreshes(refs)
            c.failed("sliding-TTL refresh", exc)
        except asyncio.CancelledError:
            # (maybe another task's hits among them: the next call writes them; one
            # written already is written again, which changes nothing)
            c.put_back_refreshes(refs)
            raise

    async def _lookup(
        self, prompts: Sequence[str], scope: Mapping[str, Any] | None, threshold: float | None,
        embeddings: npt.ArrayLike | None, used: list[Any] | None,
        max_age: float | None = None, near_out: dict[int, tuple[float, int]] | None = None,
    ) -> list[Hit | None]:
        t0 = time.perf_counter()
        c = self._core
        c.check_prompts(prompts)
        thr = c.threshold_for(threshold)
        age = c.check_max_age(max_age)
        keys = [c.key(p, scope) for p in prompts]
        given_all = (None if embeddings is None
                     else c.vectors(embeddings, len(prompts), copy=False))
        out: list[Hit | None] = [None] * len(prompts)
        # row -> nearest (similarity, id) in the index: the miss statistics, lookup()
        near: dict[int, tuple[float, int]] = {} if near_out is None else near_out
        c.stats.add("lookups", len(prompts))  # (before it is answered: see the sync twin)
        try:
            if not prompts or not await self._ready():
                return self._answered(out)
            c.check_dim(given_all)  # (as in SemanticCache._lookup)
            sid = keys[0][1]
            ids = [k[0] for k in keys]
            # (as in SemanticCache._lookup; other tasks may apply changes while it waits)
            before = c.stats.counts["sync_events"] + c.stats.counts["resyncs"]
            # (embeddings given: which prompts the embedder would cut, see lengths_ahead)
            known, not_ahead = c.lengths_ahead(prompts, ids, given_all)
            ahead, want_ahead = c.search_ahead(ids, given_all, sid, thr, near, not_ahead)
            touch = c.take_touches()
            gen = c.gen  # (what this lookup may repair: see CacheCore.gen)
            try:
                fetched, batch = await self.store.read(
                    ids + want_ahead, log_after=c.sync_due(), touch=touch, now=c.now())
                await self._apply(batch)
                if before != c.stats.counts["sync_events"] + c.stats.counts["resyncs"]:
                    ahead = None  # the replica changed: search again below
            except StoreError as exc:
                c.put_back_touches(touch)
                c.failed("get", exc)
                return self._answered(out)
            todo = c.answer_read(fetched, [k[3] for k in keys], ids + want_ahead, ahead,
                                 given_all, sid, thr, out, age, gen)
            if todo and sid in c.indexes:
                todo = await self._semantic_rows(prompts, todo, known)
            if not todo or sid not in c.indexes:
                c.record_misses(out, near, thr)
                return self._answered(out)
            given = None if given_all is None else given_all[todo]
            vecs = await self._embed([prompts[i] for i in todo], given)
            if vecs is None:
                return self._answered(out)
            if used is not None:
                for j, i in enumerate(todo):
                    used[i] = vecs[j]
            nearest: list[tuple[float, int]] = []
            cands = c.candidates(vecs, sid, thr, nearest)
            near.update(zip(todo, nearest))
            want = list(dict.fromkeys(e for row in cands for e, _ in row))
            if want:
                gen = c.gen
                try:
                    got = dict(zip(want, await self.store.fetch(want)))
                except StoreError as exc:
                    c.failed("get", exc)
                    return self._answered(out)
                now = c.now()
                for j, i in enumerate(todo):
                    if cands[j]:
                        out[i] = c.semantic(vecs[j], cands[j], got, sid, thr, now, age, gen)
            c.record_misses(out, near, thr)
            return self._answered(out)
        except BaseException:
            # (a strict failure, a cancellation, an interrupt: hits and misses are counted
            # as the call returns, so lookups == hits + misses + unanswered)
            c.stats.add("unanswered", len(prompts))
            raise
        finally:
            c.stats.lookup_time.add(time.perf_counter() - t0)

    def _answered(self, out: list[Hit | None]) -> list[Hit | None]:
        self._core.answered(out)
        return out

    async def _answer_of(self, k: tuple[int, str, str, str], max_age: float = math.inf
                         ) -> str | None:
        """See :meth:`SemanticCache._answer_of`."""
        try:
            f = (await self.store.fetch([k[0]]))[0]
        except StoreError:
            return None
        rec = self._core.exact_record(f, k[1], k[3], self._core.now(), max_age)
        return None if rec is None else rec.response

    async def _lead(self, k: tuple[int, str, str, str], token: str, limit: float | None,
                    max_age: float = math.inf, flight: Flight | None = None,
                    wait_left: float | None = None) -> str | None:
        """See :meth:`SemanticCache._lead`."""
        lease = getattr(self.store, "lease", None)
        if lease is None:
            return await self._answer_of(k, max_age)
        seconds = _LEASE_UNBOUNDED if limit is None else limit
        deadline = time.monotonic() + (seconds if wait_left is None else wait_left)
        store: Any = self.store
        marks = _WaitMarks(store, k[0], seconds, flight)
        try:
            while True:
                if await lease(k[0], token, max(seconds, 0.001)):
                    return await self._answer_of(k, max_age)
                delay = 0.005
                while True:
                    if await marks.acycle():
                        return None
                    await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    answer = await self._answer_of(k, max_age)
                    if answer is not None:
                        return answer
                    if time.monotonic() >= deadline:
                        return None
                    if not await store.lease_held(k[0]):
                        break
                    delay = min(delay * 2, 0.1)
        finally:
            await _to_the_end(marks.aclear())

    async def _release(self, eid: int, token: str) -> None:
        release = getattr(self.store, "release", None)
        if release is not None:
            await release(eid, token)

    async def _land_and_release(self, k: tuple[int, str, str, str], token: str,
                                fly: bool) -> None:
        """A call's end in the store: its flight field (also when cancelled: it may be
        registered) and its lease."""
        try:
            if fly:
                await self.store.land(k[1], k[0], bytes.fromhex(token))  # type: ignore[attr-defined]
        finally:
            await self._release(k[0], token)

    async def _follow_flight(self, k: tuple[int, str, str, str], vec: Any,
                             limit: float | None, max_age: float, flight: Flight,
                             token: str) -> str | None:
        """See :meth:`SemanticCache._follow_flight`."""
        store: Any = self.store
        c = self._core
        seconds = _LEASE_UNBOUNDED if limit is None else limit
        deadline = time.monotonic() + seconds
        owner = bytes.fromhex(token)
        _, others = await store.fly(k[1], k[0], vec, seconds, owner)
        before = {o[1] for o in others}  # (see SemanticCache._follow_flight)
        tried: set[int] = set()
        while True:
            leader = c.flight_leader(
                [o for o in others if o[1] in before and o[1] not in tried], vec, c.threshold)
            if leader is None or time.monotonic() >= deadline:
                if tried:
                    await store.fly(k[1], k[0], vec, seconds, owner)
                return None
            tried.add(leader)
            await store.land(k[1], k[0], owner)
            marks = _WaitMarks(store, leader, seconds, flight)
            cycle = False
            try:
                delay = 0.005
                while True:
                    got = await self._entry_answer(leader, k[1], vec, max_age)
                    if got is not None:
                        flight.answer_vec = got[1]
                        return got[0]
                    if time.monotonic() >= deadline or (cycle := await marks.acycle()):
                        break
                    if not await store.flight_alive(k[1], leader, len(vec)):
                        got = await self._entry_answer(leader, k[1], vec, max_age)
                        if got is not None:
                            flight.answer_vec = got[1]
                            return got[0]
                        break
                    await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 0.1)
            finally:
                await _to_the_end(marks.aclear())
            if cycle:
                await store.fly(k[1], k[0], vec, seconds, owner)
                return None
            others = await store.flights(k[1], k[0], len(vec))

    async def _entry_answer(self, eid: int, sid: str, vec: Any, max_age: float
                            ) -> tuple[str, Any] | None:
        try:
            f = (await self.store.fetch([eid]))[0]
        except StoreError:
            return None
        return self._core.entry_answer(f, sid, vec, self._core.now(), max_age)

    async def set(
        self, prompt: str, response: str, *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
        embedding: npt.ArrayLike | None = None, sliding: bool = False,
    ) -> str:
        """See :meth:`SemanticCache.set`."""
        emb = None if embedding is None else np.asarray(embedding).reshape(1, -1)
        return (await self.set_many([(prompt, response)], ttl=ttl, scope=scope,
                                    metadata=[metadata], embeddings=emb,
                                    sliding=sliding))[0]

    @_honours_cancel
    async def set_many(
        self, items: Iterable[tuple[str, str]], *, ttl: float | None = None,
        scope: Mapping[str, Any] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: npt.ArrayLike | None = None, sliding: bool = False,
    ) -> list[str]:
        """See :meth:`SemanticCache.set_many`."""
        c = self._core
        pairs = list(items)
        prompts = [p for p, _ in pairs]
        kk = [c.key(p, scope) for p in prompts]
        keys = [format_id(k[0]) for k in kk]
        if not pairs:
            return keys
        eff_ttl = c.check_ttl(ttl) if ttl is not None else c.ttl
        c.check_sliding(sliding, eff_ttl)
        metas = c.check_pairs(pairs, list(metadata) if metadata is not None
                              else [None] * len(pairs))
        given = None if embeddings is None else c.vectors(embeddings, len(pairs))
        vecs = await self._embed(prompts, given)
        if vecs is None:
            return keys
        now = c.now()
        recs = c.records(kk, pairs, vecs, eff_ttl, metas, now, sliding,
                         c.exact_only_rows(prompts, count=True))
        if not await self._ready():  # (counted there)
            return keys
        touch = c.take_touches()
        try:
            res = await self.store.write(recs, c.ttls(recs, now), now, touch)
        except StoreError as exc:
            c.put_back_touches(touch)
            c.failed("set", exc)
            return keys
        # Stored: counted now, as a set cancelled while it waits for the lock below is in
        # the store all the same (its own log event brings it into the replica later).
        c.stats.add("sets", len(recs))
        async with self._lock:  # (as the sync cache: not amid a log batch's apply)
            if not c.applied_past(res.log_positions):
                c.remember_own(res.log_positions, [r.id for r in recs])
                await self._insert(c.add_records, recs)
        self._maybe_snapshot()
        if (c.max_entries is not None and res.count > c.max_entries) or \
                res.expired_pending >= _HOUSEKEEP_EXPIRED:
            logged: list[tuple[str, Sequence[int]]] = []
            try:
                evicted, _ = await self.store.evict(c.max_entries, now, logged)
            except StoreError as exc:
                c.failed("eviction", exc)
            else:
                async with self._lock:
                    c.own_evicted(evicted, logged)
                c.stats.add("evictions", len(evicted))
        return keys

    @_honours_cancel
    async def feedback(self, hit: Hit | Mapping[str, Any], correct: bool) -> bool:
        """See :meth:`SemanticCache.feedback`."""
        if await self._ready():
            await self._learn_ref_secret()
        if self._core.unchecked_ref(hit):
            return False
        eid, version, verdict = self._core.verdict_of(hit, correct)
        return await self._add_verdict(eid, version, verdict)

    async def _add_verdict(self, eid: int, version: str, verdict: tuple[float, bool]
                           ) -> bool:
        c = self._core
        try:
            done = await self.store.add_verdict(eid, version, verdict)
        except StoreContended as exc:  # (not an outage, but the caller's verdict is lost)
            c.stats.add("verdicts_lost")
            log.warning("hnswcache %r: %s", self.namespace, exc)
            return False
        except StoreError as exc:
            c.failed("feedback", exc)
            return False
        if done:
            c.stats.add("verdicts_right" if verdict[1] else "verdicts_wrong")
        return done

    async def _learn(self, k: tuple[int, str, str, str], vec: Any, answer: str,
                     judge: Callable[[str, str], Any]) -> None:
        """See :meth:`SemanticCache._learn` (``judge`` may be async)."""
        c = self._core
        if c.learn_floor is None or vec is None:
            return
        ids = c.learn_ids(k, vec)
        if not ids:
            return
        try:
            fetched = await self.store.fetch(ids)
        except StoreError as exc:
            c.failed("fetch", exc)
            return
        target = c.learn_target(fetched, vec, k[1], c.now())
        if target is None:
            return
        rec, sim = target
        right = await self._ask_judge(judge, answer, rec.response)
        if right is not None:
            await self._add_verdict(rec.id, rec.version, (sim, right))

    async def _ask_judge(self, judge: Callable[[str, str], Any], new: str, cached: str
                         ) -> bool | None:
        """See :meth:`SemanticCache._ask_judge` (an async judge awaited, a sync one in a
        worker thread: it may be slow, and not on the event loop's thread)."""
        try:
            if judge is same_text or inspect.iscoroutinefunction(judge):
                right = judge(new, cached)
            else:
                right = await asyncio.to_thread(judge, new, cached)
            if inspect.isawaitable(right):
                right = await right
            return _verdict(right)
        except Exception:
            log.exception("hnswcache %r: the judge failed", self.namespace)
            return None

    def _judge_later(self, k: tuple[int, str, str, str], vec: Any, answer: str,
                     judge: Callable[[str, str], Any]) -> None:
        """See :meth:`SemanticCache._judge_later`: a task of the event loop per judgment,
        at most ``_MAX_JUDGING``, run one at a time (a lock), a sync judge in a worker
        thread. The end of the event loop (``asyncio.run``) cancels those not done."""
        self._start_judge(self._learn(k, vec, answer, judge))

    def _start_judge(self, judgment: Awaitable[None]) -> None:
        """Run ``judgment`` as a task, after the ones before it (a lock); dropped (closed)
        if the cache is closed or ``_MAX_JUDGING`` wait already."""
        coro = self._judged(judgment)
        if self._closed or len(self._judge_tasks) >= _MAX_JUDGING:
            coro.close()
            if inspect.iscoroutine(judgment):
                judgment.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._judge_tasks.add(task)
        task.add_done_callback(self._judge_tasks.discard)
        if inspect.iscoroutine(judgment):  # (a task cancelled before it ran never awaits
            task.add_done_callback(lambda _: judgment.close())  # it: no warning then)

    async def _judged(self, judgment: Awaitable[None]) -> None:
        try:
            async with self._loop_lock(self._judge_locks):
                if self._closed:
                    if inspect.iscoroutine(judgment):
                        judgment.close()
                    return
                await judgment
        except Exception:  # (a background task: nobody awaits it)
            log.exception("hnswcache %r: recording a verdict failed", self.namespace)

    async def _judge_hit(self, hit: Hit, answer: str, judge: Callable[[str, str], Any]
                         ) -> None:
        """See :meth:`SemanticCache._judge_hit`."""
        right = await self._ask_judge(judge, answer, hit.response)
        if right is not None:
            await self._add_verdict(*self._core.verdict_of(hit, right))

    async def wait_for_verdicts(self, timeout: float | None = None) -> bool:
        """See :meth:`SemanticCache.wait_for_verdicts` (from a judge: False at once)."""
        me = asyncio.current_task()
        if me in self._judge_tasks:
            return False
        tasks = set(self._judge_tasks)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    @_honours_cancel
    async def delete(self, key: str) -> bool:
        """See :meth:`SemanticCache.delete`."""
        c = self._core
        eid = parse_id(key)
        if eid is None:
            raise ValueError(f"not a cache key: {key!r}")
        await self._ready()
        try:
            logged = getattr(self.store, "delete_logged", None)
            res = (await logged([eid]) if logged is not None
                   else Cleared(await self.store.delete([eid])))
        except StoreError as exc:
            c.failed("delete", exc)
            return False
        async with self._lock:  # (see SemanticCache.delete)
            if not c.applied_past(res.log_positions):
                c.remove([eid])
        n = res.deleted
        c.stats.add("deletes", n)
        if n:
            self._maybe_snapshot()
        return n > 0

    @_honours_cancel
    async def clear(self, scope: Mapping[str, Any] | None = None, *,
                    within: bool = False) -> int:
        """See :meth:`SemanticCache.clear`."""
        c = self._core
        if within:
            fields = c.within_fields(scope)
            try:
                return await self.store.clear_within(fields)
            except StoreError as exc:
                c.failed("clear", exc)
                return 0
        sid = scope_key(scope)[0] if scope is not None else None
        await self._ready()
        try:
            res = await self.store.clear(sid)
        except StoreError as exc:
            c.failed("clear", exc)
            return 0
        async with self._lock:  # (see SemanticCache.clear)
            c.own_cleared(sid, res)
        left = c.held_in(sid) if res.batches is not None else []
        if left:
            gen = c.gen
            try:
                fetched = await self.store.fetch(left)
            except StoreError:
                pass
            else:
                async with self._lock:
                    await self._insert(c.reconcile_repair, left, fetched, gen)
        if res.deleted:
            self._maybe_snapshot()
        return res.deleted

    def cached(
        self, *, scope: Mapping[str, Any] | None = None, ttl: float | None = None,
        key: Callable[..., Any] | None = None, coalesce: bool = True, wait: float = 60.0,
        max_age: float | None = None, sliding: bool = False, name: str | None = None,
        judge: Callable[[str, str], Any] | None = None, audit: float = 0.0,
    ) -> Callable[[F], F]:
        """Decorate ``async fn(prompt, ...) -> str``; see :meth:`SemanticCache.cached`
        (coalescing joins the calls of other tasks on the same event loop; ``judge`` may
        be a coroutine function; judges run as tasks of the event loop)."""
        if judge is not None and not callable(judge):
            raise TypeError("judge must be a function (new answer, cached answer) -> bool")
        audit = _check_audit(audit)
        limit = _check_wait(wait)
        age = self._core.check_max_age(max_age)
        self._core.check_sliding(
            sliding, self._core.check_ttl(ttl) if ttl is not None else self._core.ttl)

        def deco(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError("AsyncSemanticCache.cached decorates async functions")
            sig = _signature(fn)

            @functools.wraps(fn)
            @_honours_cancel
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                mark = _cancel_mark()
                prompt, sc = _call_key(fn, args, kwargs, key, scope, name, sig)
                used: list[Any] = [None]
                hit = (await self._get_many([prompt], sc, None, None, used, max_age))[0]
                _raise_if_cancelled(mark)
                if hit is not None:
                    if not (audit and hit.tier == "semantic" and self._core.draw(audit)):
                        return hit.response
                    k = self._core.key(prompt, sc)
                    if k[0] in self._auditing:
                        return hit.response  # (see SemanticCache.cached)
                    self._auditing.add(k[0])
                    try:
                        result = await fn(*args, **kwargs)  # an audit (see SemanticCache)
                    except Exception:
                        log.warning("hnswcache %r: an audit's call failed; the cached "
                                    "answer is returned", self.namespace, exc_info=True)
                        return hit.response
                    finally:
                        self._auditing.discard(k[0])
                    if isinstance(result, str) and _storable(self, prompt, result):
                        await self.set(prompt, result, ttl=ttl, scope=sc, embedding=used[0],
                                       sliding=sliding)
                        self._core.stats.add("audits")
                        self._start_judge(self._judge_hit(hit, result, judge or same_text))
                    return result

                async def call() -> Any:
                    _raise_if_cancelled(mark)  # (before the model is paid)
                    result = await fn(*args, **kwargs)
                    if isinstance(result, str) and _storable(self, prompt, result):
                        await self.set(prompt, result, ttl=ttl, scope=sc, embedding=used[0],
                                       sliding=sliding)
                        if self._core.learn_floor is not None:
                            self._judge_later(self._core.key(prompt, sc), used[0], result,
                                              judge or same_text)
                    return result

                if not coalesce:
                    return await call()
                c = self._core
                k = c.key(prompt, sc)
                if inside_call(k[0]):
                    return await call()
                if used[0] is None and await self._semantic_rows(  # (as in the sync one)
                        [prompt], [0], None, count=False):
                    vecs = await self._embed([prompt], None)
                    used[0] = None if vecs is None else vecs[0]
                t_wait = time.monotonic()
                while True:
                    flight, leads = self._flights.ajoin(k[0], k[1], used[0], c.threshold)
                    if leads:
                        break
                    assert flight.future is not None
                    try:
                        answer = await asyncio.wait_for(asyncio.shield(flight.future),
                                                        _rest(limit, t_wait))
                    except TimeoutError:
                        answer = None
                    finally:
                        stop_waiting(flight)
                    if flight.failed and _rest(limit, t_wait) != 0.0:
                        continue  # its call failed (or was cancelled): one of the waiting
                        # leads the retry
                    if answer is not None and _answers(flight, used[0], c.threshold):
                        c.stats.add("coalesced")
                        return answer
                    return await call()
                token = secrets.token_hex(16)
                flight.token = token
                fly = self._follows_paraphrases(used[0], limit)
                ctx = LEADING.set(LEADING.get() | {flight})
                result = None
                t0 = time.monotonic()
                try:
                    answer = None
                    if fly:
                        answer = await self._follow_flight(k, used[0], limit, age, flight,
                                                           token)
                    if answer is None:
                        answer = await self._lead(k, token, limit, age, flight,
                                                  _rest(limit, t0))
                    if answer is not None:
                        c.stats.add("coalesced")
                        result = answer
                        return answer
                    result = await call()
                except BaseException:
                    flight.failed = True
                    raise
                finally:
                    LEADING.reset(ctx)
                    try:
                        self._flights.finish(flight, result if isinstance(result, str) else None)
                    finally:
                        await _to_the_end(self._land_and_release(k, token, fly))
                return result

            return cast(F, wrapper)

        return deco

    async def close(self) -> None:
        """See :meth:`SemanticCache.close`. The closing runs as a task of its own: a caller
        cancelled meanwhile (a shutdown timeout) leaves it going, and a second ``close()``
        waits for the same one (it returned at once, with the embedded server still
        running, the connections open and no snapshot saved)."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(self._close())
        elif self._closing.done() and self._closing.cancelled():
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        c = self._core
        c.on_store_error = None  # (closing: no restart of the embedded server now)
        if self._takeover is not None:
            await self._takeover  # (a server it starts is ours to stop below)
            self._takeover = None
        task, self._snapshot_task = self._snapshot_task, None
        if task is not None:
            # Waited for, not awaited: a task cancelled by the application's shutdown must
            # not end this close() half done (the loop may close after us: not left pending).
            await asyncio.wait({task})
        # (_closed is set: no judge starts after this) Judgments not recorded yet are
        # dropped (a judge that called close() too: this closing is a task of its own).
        judging = set(self._judge_tasks)
        for t in judging:
            t.cancel()
        if judging:
            await asyncio.wait(judging)
        warming = self._warmups.get(asyncio.get_running_loop())
        if warming is not None and not warming.done():  # (a warm start nobody waits for)
            warming.cancel()
            await asyncio.wait({warming})
        refs = c.take_refreshes()  # hits whose write-back failed so far
        if refs:
            try:
                await self.store.refresh(refs, c.now())
            except StoreError as exc:
                log.warning("hnswcache: sliding-TTL refreshes lost on close: %s", exc)
        touch = c.take_touches()  # (as SemanticCache.close)
        if touch and c.position is not None:
            try:
                await self.store.read([], log_after=None, touch=touch, now=c.now())
            except StoreError as exc:
                log.warning("hnswcache: %d LRU touches lost on close: %s", len(touch), exc)
        if self._snapshot_dir is not None and c.position is not None:
            try:
                await self.sync()
            except StoreError:
                pass  # (strict: the replica as applied is still a snapshot of its position)
            try:
                await self._write_snapshot()
            except (OSError, _snapshot.SnapshotError) as exc:
                self._snapshot_not_saved(exc)
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
    alookup = lookup
    alookup_many = lookup_many
    aset = set
    aset_many = set_many
    adelete = delete
    aclear = clear
    afeedback = feedback
    aclose = close  # (the name asyncio code reaches for first: it raised AttributeError)
    async_sync = sync
