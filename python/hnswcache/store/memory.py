"""An in-process store: no persistence, no server. For tests and throwaway caches.

It keeps the same contract as the Redis store (records, LRU order, a change log), so several
caches in one process that share a :class:`MemoryStore` converge exactly as processes sharing
a server do.
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from .base import (
    Cleared,
    Fetched,
    LogBatch,
    LogEvent,
    Record,
    Refresh,
    Verdict,
    WriteResult,
    merge_verdicts,
    scope_holds,
    validate_namespace,
)

__all__ = ["MemoryStore", "AsyncMemoryStore"]

_BATCH = 1000


class MemoryStore:
    """A thread-safe in-memory store.

    Args:
        namespace: a label (the memory store holds one cache).
        log_maxlen: how many change-log events are kept at least (up to an eighth more
            before the oldest are dropped); a reader further behind rebuilds.
        clock: the time entries expire by (seconds), as a server's own clock expires its
            keys: an expired entry is not counted by ``delete``/``clear`` nor given a
            verdict. ``None``: the clock of the first cache that uses the store (with
            none, entries go at the writes and evictions, by the ``now`` they pass).
    """

    def __init__(self, namespace: str = "default", *, log_maxlen: int = 100_000,
                 clock: Callable[[], float] | None = None) -> None:
        self.namespace = validate_namespace(namespace)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, Record] = OrderedDict()  # LRU order: oldest first
        self._expiry: list[tuple[float, int, str]] = []  # heap of (expires, id, version)
        self._log: list[LogEvent] = []
        self._log_base = 0  # sequence number of self._log[0] is _log_base + 1
        self._log_maxlen = int(log_maxlen)
        self._meta: tuple[int, str] | None = None
        self._ref_secret = secrets.token_bytes(32)
        self._head_pos = "0-0"  # position of the newest log event, as a reader holds it

    # ------------------------------------------------------------------ log
    def _append(self, events: Sequence[LogEvent]) -> tuple[str, ...]:
        start = self._head()
        events = [
            LogEvent(e.op, e.id, e.scope, f"{start + k + 1}-0") for k, e in enumerate(events)
        ]
        self._log.extend(events)
        over = len(self._log) - self._log_maxlen
        # Trimmed in steps of an eighth: deleting from a list's front moves all it keeps,
        # which once the log was full cost every write ~20 µs at the default 100k events.
        if over > self._log_maxlen // 8:
            del self._log[:over]
            self._log_base += over
        self._head_pos = f"{self._head()}-0"
        return tuple(e.pos for e in events)

    def _head(self) -> int:
        return self._log_base + len(self._log)

    def _read_log(self, after: str) -> LogBatch:
        if after == self._head_pos:  # nothing new: the common case of a lookup
            return LogBatch([], after, after=after)
        try:
            pos = int(after.split("-", 1)[0])
        except ValueError:
            pos = -1
        head = self._head()
        if pos < 0 or pos > head or pos < self._log_base:
            return LogBatch([], f"{head}-0", reset=True, after=after)
        start = pos - self._log_base
        events = self._log[start : start + _BATCH]
        new_pos = pos + len(events)
        return LogBatch(list(events), f"{new_pos}-0", more=new_pos < head, after=after)

    def _purge(self) -> None:
        """Drop what has expired by the store's clock (a server's keys are gone at their
        TTL: not deleted again, not counted, not given a verdict). Under the lock. (Writes
        and evictions drop by the ``now`` their cache passes, as before.)"""
        if self._expiry and self.clock is not None:
            now = float(self.clock())
            if self._expiry[0][0] <= now:
                self._drop_expired(now)

    # ------------------------------------------------------------------ protocol
    def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]:
        with self._lock:
            for t in touch:
                if t in self._entries:
                    self._entries.move_to_end(t)
            get = self._entries.get
            out: list[Fetched] = [get(i) for i in ids]
            batch = self._read_log(log_after) if log_after is not None else None
        return out, batch

    def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
        done = []
        with self._lock:
            for r in refresh:
                cur = self._entries.get(r.id)
                # (an expired entry not purged yet is gone: no revival)
                if (cur is not None and cur.version == r.version and cur.expires > now
                        and r.until > cur.expires):
                    self._entries[r.id] = dataclasses.replace(cur, expires=r.until)
                    heapq.heappush(self._expiry, (r.until, r.id, r.version))
                    done.append(LogEvent("set", r.id))
            if done:
                self._append(done)
        return len(done)

    def fetch(self, ids: Sequence[int]) -> list[Fetched]:
        with self._lock:
            return [self._entries.get(i) for i in ids]

    def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool:
        with self._lock:
            self._purge()
            cur = self._entries.get(eid)
            if cur is None or cur.version != version:
                return False
            # (assigning an existing key keeps its place in the LRU order)
            self._entries[eid] = dataclasses.replace(
                cur, verdicts=merge_verdicts(cur.verdicts, verdict))
            return True

    def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult:
        with self._lock:
            for t in touch:
                if t in self._entries:
                    self._entries.move_to_end(t)
            for rec in records:
                self._entries[rec.id] = rec
                self._entries.move_to_end(rec.id)
                if rec.expires != float("inf"):
                    heapq.heappush(self._expiry, (rec.expires, rec.id, rec.version))
            positions = self._append([LogEvent("set", rec.id) for rec in records])
            removed = self._drop_expired(now)
            return WriteResult(len(self._entries), 0, removed, positions)

    def _drop_expired(self, now: float) -> int:
        removed = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, eid, version = heapq.heappop(self._expiry)
            cur = self._entries.get(eid)
            # (A refreshed entry leaves its earlier expiry in the heap: not due yet.)
            if cur is not None and cur.version == version and cur.expires <= now:
                del self._entries[eid]
                removed += 1
        return removed

    def delete(self, ids: Sequence[int]) -> int:
        return self.delete_logged(ids).deleted

    def delete_logged(self, ids: Sequence[int]) -> Cleared:
        with self._lock:
            self._purge()
            n = 0
            for i in ids:
                if self._entries.pop(i, None) is not None:
                    n += 1
            return Cleared(n, self._append([LogEvent("del", i) for i in ids]))

    def evict(self, max_entries: int | None, now: float,
              logged: list[tuple[str, Sequence[int]]] | None = None) -> tuple[list[int], int]:
        with self._lock:
            removed = self._drop_expired(now)
            evicted: list[int] = []
            if max_entries is not None:
                while len(self._entries) > max_entries:
                    eid, _ = self._entries.popitem(last=False)
                    evicted.append(eid)
                positions = self._append([LogEvent("del", i) for i in evicted])
                if logged is not None:
                    logged.extend((pos, (i,)) for pos, i in zip(positions, evicted))
            return evicted, removed

    def clear(self, scope_id: str | None) -> Cleared:
        with self._lock:
            self._purge()
            if scope_id is None:
                n = len(self._entries)
                self._entries.clear()
                self._expiry.clear()
            else:
                doomed = [i for i, r in self._entries.items() if r.scope_id == scope_id]
                for i in doomed:
                    del self._entries[i]
                n = len(doomed)
            return Cleared(n, self._append([LogEvent("clear", None, scope_id or "*")]))

    def clear_within(self, fields: Mapping[str, Any]) -> int:
        with self._lock:
            self._purge()
            doomed = [i for i, r in self._entries.items() if scope_holds(r.scope_json, fields)]
            for i in doomed:
                del self._entries[i]
            self._append([LogEvent("del", i) for i in doomed])
            return len(doomed)

    def scan(self) -> Iterator[list[Fetched]]:
        with self._lock:
            snapshot: list[Fetched] = list(self._entries.values())
        for i in range(0, len(snapshot), _BATCH):
            yield snapshot[i : i + _BATCH]

    def log_head(self) -> str:
        with self._lock:
            return f"{self._head()}-0"

    def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]:
        with self._lock:
            if self._meta is None:
                if dim is None:
                    return None, embedder
                self._meta = (int(dim), embedder)
            return self._meta

    def ref_secret(self) -> bytes:
        """The key for ref() tags: this store's own (made with it)."""
        return self._ref_secret

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._entries)


class AsyncMemoryStore:
    """:class:`MemoryStore` behind the :class:`~hnswcache.store.base.AsyncStore` protocol
    (its operations never block, so they run inline)."""

    def __init__(self, store: MemoryStore | None = None, **kwargs: object) -> None:
        self.sync = store if store is not None else MemoryStore(**kwargs)  # type: ignore[arg-type]
        self.namespace = self.sync.namespace

    async def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]:
        return self.sync.read(ids, log_after=log_after, touch=touch, now=now)

    async def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
        return self.sync.refresh(refresh, now)

    async def fetch(self, ids: Sequence[int]) -> list[Fetched]:
        return self.sync.fetch(ids)

    async def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool:
        return self.sync.add_verdict(eid, version, verdict)

    async def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult:
        return self.sync.write(records, ttls, now, touch)

    async def delete(self, ids: Sequence[int]) -> int:
        return self.sync.delete(ids)

    async def delete_logged(self, ids: Sequence[int]) -> Cleared:
        return self.sync.delete_logged(ids)

    async def evict(self, max_entries: int | None, now: float,
                    logged: list[tuple[str, Sequence[int]]] | None = None
                    ) -> tuple[list[int], int]:
        return self.sync.evict(max_entries, now, logged)

    async def clear(self, scope_id: str | None) -> Cleared:
        return self.sync.clear(scope_id)

    async def clear_within(self, fields: Mapping[str, Any]) -> int:
        return self.sync.clear_within(fields)

    async def scan(self) -> AsyncIterator[list[Fetched]]:
        for batch in self.sync.scan():
            yield batch

    async def log_head(self) -> str:
        return self.sync.log_head()

    async def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]:
        return self.sync.check_meta(dim, embedder)

    async def ref_secret(self) -> bytes:
        return self.sync.ref_secret()

    async def close(self) -> None:
        self.sync.close()
