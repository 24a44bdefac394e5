"""Redis / Valkey store through redis-py, with plain commands only.

Works on any Redis-compatible server without modules (Redis OSS, Valkey, ElastiCache,
MemoryDB, Redis Cluster): hashes, PEXPIRE, sorted sets, one stream, SCAN, pipelines and
MULTI/EXEC. All keys of one cache share the hash tag ``{namespace}`` so a cluster keeps
them in one slot. The layout is documented in ``docs/cache.md``::

    hc:{ns}:e:<id>   hash   one entry (fields in base.encode_record), PEXPIRE = its TTL
    hc:{ns}:lru      zset   entry id -> last use (cache clock), for LRU eviction
    hc:{ns}:exp      zset   entry id -> expiry (cache clock), entries with a TTL only
    hc:{ns}:log      stream change log: op=set|del|clear, id=<id>, scope=<scope id>|*
    hc:{ns}:meta     hash   format, dim, embedder

A write is one MULTI/EXEC transaction: DEL + HSET + PEXPIRE of the entry, its LRU and expiry
scores, and its log event, so no entry ever exists without its expiry, and no acknowledged
entry is missing from the log. The sync (:class:`RedisStore`) and async
(:class:`AsyncRedisStore`) stores share every command list and parser; they differ only in
whether ``execute`` is awaited.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import random
import re
import secrets
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .base import (
    MAX_DIM,
    Cleared,
    Fetched,
    Invalid,
    LogBatch,
    LogEvent,
    Record,
    Refresh,
    StoreContended,
    StoreError,
    Verdict,
    WriteResult,
    as_unit_vector,
    decode_record,
    decode_verdicts,
    encode_record,
    encode_verdicts,
    format_id,
    is_residue,
    merge_verdicts,
    parse_id,
    scope_holds,
    validate_namespace,
)

__all__ = ["RedisStore", "AsyncRedisStore", "keys_for"]

log = logging.getLogger("hnswcache.store.redis")


def _wrong_type(reply: Any) -> bool:
    """Whether a pipeline reply is a WRONGTYPE refusal."""
    return isinstance(reply, Exception) and "WRONGTYPE" in str(reply)


_LOG_BATCH = 1000
_WAIT_CHAIN = 16  # lease holders followed before a chain of waits is taken as no cycle
_REFRESH_TRIES = 3  # WATCH/MULTI rounds before an eviction or expiry pass is given up
#: A verdict, whose loss its caller sees, tries this long before it gives up, pausing a
#: random 0-2^n ms after its n-th lost WATCH (3 rounds lost 15 of 24 verdicts given at once
#: on one entry). A sliding-TTL refresh, written inside a lookup and retried by the next
#: hit, tries for _REFRESH_SECONDS (3 rounds made a hot entry's refreshes StoreErrors).
_CONTENDED_SECONDS = 1.0
_REFRESH_SECONDS = 0.1


def _contention_pauses(seconds: float) -> Iterator[float]:
    """The pause before each retry of a write that lost its WATCH: random, growing with
    each lost round, until ``seconds`` would be spent (read lazily, after each try)."""
    end = time.monotonic() + seconds
    n = 0
    while True:
        n += 1
        pause = random.uniform(0, min(0.002 * 2 ** n, 0.05))
        if time.monotonic() + pause > end:
            return
        yield pause


def _contended_tries(seconds: float = _CONTENDED_SECONDS) -> Iterator[int]:
    """Attempt numbers for a write that must get through its WATCH (see
    :func:`_contention_pauses`)."""
    yield 0
    for n, pause in enumerate(_contention_pauses(seconds), 1):
        time.sleep(pause)
        yield n


async def _acontended_tries(seconds: float = _CONTENDED_SECONDS) -> AsyncIterator[int]:
    """:func:`_contended_tries` for the event loop."""
    yield 0
    for n, pause in enumerate(_contention_pauses(seconds), 1):
        await asyncio.sleep(pause)
        yield n
_IDS_PER_EVENT = 500
_SCOPE_RE = re.compile(r"^[0-9a-f]{16}$")
_SCAN_COUNT = 1000
_LOG_EVENTS_PER_READ = 10_000  # ids a log read hands over at most (each is then fetched)
_EXPIRED_BATCH = 1000  # expired ids forgotten per WATCH/MULTI round
_TOKEN_RE = re.compile(rb"[0-9a-f]{32}")
#: A flight's value: its start and deadline (unix ms), its owner's token (16 bytes), then
#: its float32 embedding.
_FLIGHT = struct.Struct("<qq16s")
#: Least life of a scope's flight hash after a registration (longer for a longer wait).
_FLIGHTS_KEY_MS = 600_000
#: A field this long past its deadline is deleted by the reader that finds it (its owner
#: died; a shorter grace could race a process replacing it).
_FLIGHT_PRUNE_MS = 10_000


def _live_lease(value: Any, pttl: Any) -> bool:
    """Whether a lease key holds a lease another process may still be working under: a
    token of ours (32 hex digits) with a time to live. Garbage, or a key without expiry,
    is not one (waiting on it would wait for nothing)."""
    return (isinstance(value, bytes) and _TOKEN_RE.fullmatch(value) is not None
            and type(pttl) is int and pttl > 0)


def keys_for(namespace: str) -> dict[str, str]:
    """The keys (and entry-key prefix) of the cache ``namespace``."""
    p = f"hc:{{{validate_namespace(namespace)}}}:"
    return {"prefix": p, "entry": p + "e:", "lru": p + "lru", "exp": p + "exp",
            "log": p + "log", "meta": p + "meta", "lease": p + "lease:", "wait": p + "wait:",
            "flight": p + "flight:"}


def _errors() -> tuple[type[BaseException], ...]:
    import redis

    # RedisClusterException (e.g. "cluster unreachable") is not a RedisError.
    return (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)


def _stream_id(value: Any) -> tuple[int, int] | None:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    ms, _, seq = value.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None



def _del_events(ids: Sequence[int], positions: Sequence[Any]
                ) -> list[tuple[str, tuple[int, ...]]]:
    """``(log position, ids)`` of each ``del`` event ``queue_log`` wrote for ``ids``, from the
    replies of its XADDs (``_IDS_PER_EVENT`` ids an event, in order)."""
    return [(_id_text(pos), tuple(ids[s * _IDS_PER_EVENT:(s + 1) * _IDS_PER_EVENT]))
            for s, pos in enumerate(positions)]


def _id_text(value: Any) -> str:
    # "replace": a key name is the server's data (garbage included); a non-ASCII one must
    # come out as a bad id, not as an exception.
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace")
    return str(value)


def _refuses_pexpire_gt(exc: BaseException) -> bool:
    """Whether a refused refresh is a server that lacks ``PEXPIRE ... GT`` (Redis < 7.0:
    "wrong number of arguments for 'pexpire'"; a later one that drops the option: "syntax
    error" or "unsupported option")."""
    text = str(exc).lower()
    return "pexpire" in text and any(
        m in text for m in ("wrong number of arguments", "syntax error", "unsupported option"))


def _brief(value: Any) -> str:
    """A bounded repr for a log line: a garbage value may be 512 MB."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def _check_client(client: Any, want_async: bool) -> None:
    if isinstance(client, (str, bytes)) or not hasattr(client, "pipeline"):
        raise TypeError(f"the store needs a redis-py client, got {type(client).__name__} "
                        "(a URL goes to the cache: SemanticCache(store='redis://...'))")
    # (else every call fails later with an obscure TypeError, even with strict=False)
    run = getattr(client, "execute_command", None)
    is_async = inspect.iscoroutinefunction(run)
    if run is not None and is_async != want_async:
        raise TypeError(
            f"{type(client).__module__}.{type(client).__name__} is "
            f"{'an asyncio' if is_async else 'a synchronous'} client: "
            + ("AsyncSemanticCache (AsyncRedisStore) takes redis.asyncio clients"
               if want_async else "SemanticCache (RedisStore) takes redis.Redis clients; "
               "use AsyncSemanticCache with a redis.asyncio client"))
    kwargs: dict[str, Any] = {}
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        kwargs = getattr(pool, "connection_kwargs", {}) or {}
    elif hasattr(client, "get_connection_kwargs"):
        kwargs = client.get_connection_kwargs() or {}
    if kwargs.get("decode_responses"):
        raise ValueError(
            "the Redis client must use decode_responses=False (vectors are stored as bytes); "
            "create a separate client for the cache"
        )


class _Layout:
    """Keys, command lists and response parsers shared by the sync and async stores."""

    #: A log read from a position the stream no longer holds comes back as a reset (see
    #: parse_log): a cache may trust a snapshot taken at a position this store still has.
    checks_log_position = True

    #: Seconds during which, after a connection failure or a timeout, every call fails at
    #: once (a StoreError: a miss, a dropped write) instead of waiting for the server again.
    #: Without it, each store call of an operation waited out its own timeout while the
    #: server was down: a ``@cached`` miss made seven of them, ~7 s.
    outage_cooldown = 1.0

    _is_async = False  # (what kind of client the class takes)

    def __init__(self, client: Any, *, namespace: str = "default", log_maxlen: int = 100_000,
                 owns_client: bool = False) -> None:
        _check_client(client, self._is_async)
        self._client = client
        self._owns = owns_client
        self._errors = _errors()
        import redis

        self._outage_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                               redis.exceptions.RedisClusterException, OSError)
        self._down_until = -math.inf  # monotonic time until which calls fail at once
        self._down_reason = ""

        self._watch_error = redis.exceptions.WatchError
        self._response_error = redis.exceptions.ResponseError
        self.namespace = validate_namespace(namespace)
        k = keys_for(namespace)
        self.k_entry = k["entry"]
        self.k_lru = k["lru"]
        self.k_exp = k["exp"]
        self.k_log = k["log"]
        self.k_meta = k["meta"]
        self.k_lease = k["lease"]
        self.k_wait = k["wait"]
        self.k_flight = k["flight"]
        self.log_maxlen = int(log_maxlen)
        self._cluster = hasattr(client, "get_node_from_key")  # a RedisCluster client
        if self._cluster:
            # redis-py's cluster pipelines raise AttributeError following an ASK to a node
            # their map lacks (a slot moving onto a new, empty node): a get() of a moved
            # key raised it through a non-strict cache. A store error here (the move ends).
            self._errors = (*self._errors, AttributeError)
        self._types_checked = -math.inf  # monotonic time of the last own-type check
        # The calls whose failure is answered by a default (and the repair of foreign key
        # types): an open breaker's StoreError too.
        self._quiet_errors: tuple[type[BaseException], ...] = (*self._errors, StoreError)

    @property
    def client(self) -> Any:
        """The redis-py client; raises :class:`StoreError` at once while an outage lasts
        (for :attr:`outage_cooldown` seconds after a connection failure or a timeout)."""
        if time.monotonic() < self._down_until:
            raise StoreError(f"the server is unreachable ({self._down_reason}); calls fail "
                             f"at once for {self._down_until - time.monotonic():.2f} s more")
        return self._client

    @property
    def outage_left(self) -> float:
        """Seconds until calls reach the server again after an outage (0: they do now)."""
        return max(0.0, self._down_until - time.monotonic())

    def _failure(self, exc: BaseException) -> StoreError:
        """The StoreError for a client error; a connection failure or a timeout opens the
        breaker (see :attr:`client`)."""
        self._note_outage(exc)
        return StoreError(f"{type(exc).__name__}: {exc}")

    def _note_outage(self, exc: BaseException | None) -> None:
        """Open the breaker for a connection failure or a timeout (``exc``): the call that
        met it waited a timeout; the calls after it need not."""
        if (exc is not None and isinstance(exc, self._outage_errors)
                and not _pool_exhausted(exc)):
            self._down_until = time.monotonic() + self.outage_cooldown
            self._down_reason = f"{type(exc).__name__}: {exc}"

    def ekey(self, eid: int) -> str:
        return self.k_entry + format_id(eid)

    # ---------------------------------------------------------------- foreign types
    # The cache's own keys hold one Redis type each. Another type there (a stray SET, a
    # tool writing into the namespace) made every write fail with WRONGTYPE until someone
    # removed it; now the store moves it aside to `<key>:foreign:<ms>-<hex>` and rebuilds
    # the sorted sets from the entries (see _repair_types), once a second at most.
    def own_types(self) -> dict[str, bytes]:
        return {self.k_lru: b"zset", self.k_exp: b"zset", self.k_log: b"stream",
                self.k_meta: b"hash"}

    def types_due(self) -> bool:
        """Whether a WRONGTYPE reply may be checked now (at most once a second)."""
        t = time.monotonic()
        if t < self._types_checked + 1.0:
            return False
        self._types_checked = t
        return True

    @staticmethod
    def is_foreign(want: bytes, got: Any) -> bool:
        """Whether a ``TYPE`` reply names another type than ``want`` (``none`` is fine)."""
        return got not in (b"none", "none", want, want.decode())

    def foreign_keys(self, types: Sequence[Any]) -> list[str]:
        """The own keys whose ``TYPE`` reply (in ``own_types`` order) is another type."""
        return [k for (k, want), got in zip(self.own_types().items(), types)
                if self.is_foreign(want, got)]

    @staticmethod
    def aside_name(key: str) -> str:
        """A fresh name for a foreign value moved out of ``key`` (never overwrites one)."""
        return f"{key}:foreign:{int(time.time() * 1000)}-{secrets.token_hex(4)}"

    def moved_aside(self, key: str, dest: str) -> None:
        log.warning("cache namespace %r: %s held a value of another type; moved to %s "
                    "(the cache rebuilds what it needs there)", self.namespace, key, dest)

    @staticmethod
    def replies(res: list[Any], raise_on_error: bool) -> list[Any]:
        """``res``, or the ``StoreError`` of its first refused command when the caller
        takes no refusal."""
        if raise_on_error:
            for r in res:
                if isinstance(r, Exception):
                    raise StoreError(f"{type(r).__name__}: {r}")
        return res

    @staticmethod
    def merge_retry(first: Sequence[Any], again: Sequence[Any]) -> list[Any]:
        """The replies of a pipeline sent twice around a repair: the first attempt's, but
        the refused commands' from the second. (MULTI/EXEC applies the commands that were
        not refused: a DEL that ran the first time would count 0 the second.)"""
        if len(first) != len(again):
            return list(again)
        return [b if _wrong_type(a) else a for a, b in zip(first, again)]

    def queue_rebuild(self, pipe: Any, batch: Sequence[Fetched], sets: Sequence[str]) -> None:
        """Re-add the live entries of ``batch`` to the rebuilt sorted sets ``sets`` (NX: a
        write meanwhile keeps its own score). The LRU score is the write time."""
        recs = [f for f in batch if f is not None and not isinstance(f, Invalid)]
        if recs and self.k_lru in sets:
            pipe.zadd(self.k_lru, {format_id(r.id): r.created for r in recs}, nx=True)
        timed = {format_id(r.id): r.expires for r in recs if r.expires != math.inf}
        if timed and self.k_exp in sets:
            pipe.zadd(self.k_exp, timed, nx=True)

    # ---------------------------------------------------------------- leases
    # A lease says "a process is calling the LLM for entry eid": @cached misses of other
    # processes wait for that entry instead of calling too (see cache.py). SET NX PX, so a
    # lease of a process that died expires on its own.
    def lkey(self, eid: int) -> str:
        return self.k_lease + format_id(eid)

    def queue_lease(self, pipe: Any, eid: int, token: str, seconds: float) -> None:
        key = self.lkey(eid)
        pipe.set(key, token, nx=True, px=max(1, int(seconds * 1000)))
        pipe.get(key)
        pipe.pttl(key)

    @staticmethod
    def parse_lease(res: Sequence[Any]) -> bool:
        """Whether the caller leads: it took the lease, or the key holds no live lease."""
        return res[0] is True or not _live_lease(res[1], res[2])

    # A wait mark says "the calls holding these tokens wait for entry eid": a process about
    # to wait on a lease follows the marks from that lease's holder, and if the chain comes
    # back to a token of its own, the two (or more) calls wait on each other: it calls
    # instead (the cross-process twin of the cycle check in _flight.py).
    def wkey(self, token: str) -> str:
        return self.k_wait + token

    # A mark is a member `<id>:<wait>` of the set `wait:<token>`: tasks that inherit one
    # token (siblings under asyncio.gather) each add and remove their own.
    def queue_mark_wait(self, pipe: Any, tokens: Sequence[str], eid: int,
                        seconds: float, wait_id: str) -> None:
        for t in tokens:
            pipe.sadd(self.wkey(t), f"{format_id(eid)}:{wait_id}")
            pipe.pexpire(self.wkey(t), max(1, int(seconds * 1000)))

    def queue_unmark_wait(self, pipe: Any, tokens: Sequence[str], eid: int,
                          wait_id: str) -> None:
        for t in tokens:
            pipe.srem(self.wkey(t), f"{format_id(eid)}:{wait_id}")

    @staticmethod
    def marked_ids(members: Any) -> list[int]:
        """The entry ids of a wait set's members (garbage skipped)."""
        out = []
        for m in members if isinstance(members, (set, list, tuple)) else ():
            if isinstance(m, (bytes, str)):
                eid = parse_id(m[:16])
                if eid is not None:
                    out.append(eid)
        return out

    @staticmethod
    def lease_token(value: Any) -> str | None:
        """A lease key's value as a token (32 hex digits), or ``None`` (none, or garbage)."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, (bytes, bytearray)) and _TOKEN_RE.fullmatch(bytes(value)):
            return bytes(value).decode("ascii")
        return None

    # A flight says "a process is calling the LLM for entry eid, whose prompt embeds to this
    # vector": a @cached miss of another process whose prompt is within the threshold of it
    # waits for that entry's answer (cross-process coalescing of paraphrases). One hash per
    # scope, a field per call holding its owner's token; its owner deletes it when the call
    # ends, and readers skip it past its deadline (the owner died) and delete it later.
    def fkey(self, scope_id: str) -> str:
        return self.k_flight + scope_id

    def queue_fly(self, pipe: Any, scope_id: str, eid: int, value: bytes,
                  seconds: float) -> None:
        key = self.fkey(scope_id)
        pipe.hsetnx(key, format_id(eid), value)
        pipe.pexpire(key, max(_FLIGHTS_KEY_MS, int(seconds * 1000) + _FLIGHT_PRUNE_MS))
        pipe.hgetall(key)

    @staticmethod
    def flight_value(vector: Any, start_ms: int, seconds: float, token: bytes) -> bytes:
        vec = np.ascontiguousarray(vector, dtype="<f4")
        deadline = start_ms + max(1, int(seconds * 1000))
        return _FLIGHT.pack(start_ms, deadline, token) + vec.tobytes()

    @staticmethod
    def parse_flight(value: Any, dim: int, now_ms: int) -> tuple[int, bytes, Any] | None:
        """A live flight's ``(start, owner token, vector)``; ``None`` if it is garbage, of
        another dimension, or past its deadline."""
        if not isinstance(value, (bytes, bytearray)) or len(value) != _FLIGHT.size + 4 * dim:
            return None
        start, deadline, token = _FLIGHT.unpack_from(value)
        if deadline <= now_ms or not 0 <= start <= deadline:
            return None
        vec, _ = as_unit_vector(
            np.frombuffer(bytes(value[_FLIGHT.size:]), dtype="<f4").astype(np.float32))
        return None if vec is None else (start, token, vec)

    @staticmethod
    def registered_before(setnx: Any, others: Sequence[tuple[int, int, Any]]
                          ) -> set[int] | None:
        """The ids of the calls registered before this one, when its registration's
        ``HSETNX`` set its field (the transaction's read has exactly those; a later re-read
        also has calls registered since, which may be following this one); ``None`` when
        its field is only written by a later fix, whose read under ``WATCH`` is exact."""
        return {o[1] for o in others} if setnx == 1 else None

    def parse_flights(self, flights: Any, eid: int, dim: int, now_ms: int
                      ) -> tuple[list[tuple[int, int, Any]], list[tuple[bytes, bytes]], Any]:
        """The scope's other live flights ``(start, id, vector)``, the fields long dead
        with their values (to delete), and our entry's field's value."""
        others, dead = [], []
        for field, value in (flights if isinstance(flights, dict) else {}).items():
            fid = parse_id(field)
            if fid is None or fid == eid:
                continue
            got = self.parse_flight(value, dim, now_ms)
            if got is not None:
                others.append((got[0], fid, got[2]))
            elif (isinstance(value, bytes) and len(value) >= _FLIGHT.size
                  and _FLIGHT.unpack_from(value)[1] < now_ms - _FLIGHT_PRUNE_MS):
                dead.append((field, value))
        own = flights.get(format_id(eid).encode()) if isinstance(flights, dict) else None
        return others, dead, own

    def flight_fixes(self, key: str, flights: Any, dead: list[tuple[bytes, bytes]], own: Any,
                     field: str, value: bytes, dim: int, now_ms: int
                     ) -> tuple[list[Any], list[Any], Callable[[Any], Any]] | None:
        """What ``fly`` fixes after its read, if anything: deleting fields long dead, and
        replacing our entry's field when what is there is dead or garbage. ``(fields, their
        values as read, act)``: done in a MULTI/EXEC only if those values are unchanged (a
        process may have replaced a dead field meanwhile: its new one must stay)."""
        if not isinstance(flights, dict):
            return None
        replace = self.parse_flight(own, dim, now_ms) is None
        if not dead and not replace:
            return None
        fields: list[Any] = [f for f, _ in dead] + ([field] if replace else [])
        values: list[Any] = [v for _, v in dead] + ([own] if replace else [])

        def act(p: Any) -> None:
            if dead:
                p.hdel(key, *[f for f, _ in dead])
            if replace:
                p.hset(key, field, value)

        return fields, values, act

    @staticmethod
    def flight_owner(value: Any) -> bytes | None:
        if isinstance(value, (bytes, bytearray)) and len(value) >= _FLIGHT.size:
            return bytes(_FLIGHT.unpack_from(value)[2])
        return None

    def queue_held(self, pipe: Any, eid: int) -> None:
        pipe.get(self.lkey(eid))
        pipe.pttl(self.lkey(eid))

    def scan_owner(self) -> Any:
        """On a cluster client (``RedisCluster``), the node that holds the cache's hash slot
        (every key of the cache is there, but during a migration of that slot)."""
        return self.client.get_node_from_key(self.k_log)

    def migration_target(self, nodes: Any) -> tuple[str, int] | None:
        """Where the cache's slot is being moved, from the owner's ``CLUSTER NODES``
        (``(host, port)``), or ``None``. SCAN has no key, so no ASK redirect: while the
        slot migrates, the keys already moved are on that node alone, and a warm start or
        a clear that scanned the owner only missed them (a review found a replica holding
        half the cache for good, and a clear reporting success with half left)."""
        slot = str(self.client.keyslot(self.k_log))
        info: dict[str, Any]
        if isinstance(nodes, (bytes, str)):
            text = nodes.decode() if isinstance(nodes, bytes) else nodes
            lines = [ln.split() for ln in text.splitlines() if ln.strip()]
            info = {f[1].split("@")[0]: {"node_id": f[0], "flags": f[2], "migrations": [
                {"slot": m[1:-1].split("->-")[0], "node_id": m[1:-1].split("->-")[1],
                 "state": "migrating"} for m in f[8:] if "->-" in m]}
                for f in lines if len(f) >= 8}
        elif isinstance(nodes, dict):
            info = nodes
        else:
            return None
        me = next((v for v in info.values() if "myself" in str(v.get("flags", ""))), None)
        if me is None:
            return None
        dest = next((m.get("node_id") for m in me.get("migrations", ())
                     if m.get("state") == "migrating" and str(m.get("slot")) == slot), None)
        if dest is None:
            return None
        addr = next((a for a, v in info.items() if v.get("node_id") == dest), None)
        if addr is None or ":" not in addr:
            raise StoreError(f"the cache's slot {slot} migrates to node {dest}, whose "
                             f"address the owner does not list")
        host, _, port = addr.rpartition(":")
        return host, int(port)

    def queue_asking(self, pipe: Any, ids: Sequence[int]) -> None:
        """The reads of ``ids`` on the importing node of a slot move: each after ASKING
        (read back with ``parse_entries(ids, replies[1::2])``)."""
        for i in ids:
            pipe.execute_command("ASKING")
            pipe.hgetall(self.ekey(i))

    def node_kwargs(self) -> dict[str, Any]:
        """Connection settings of the cluster client's nodes (auth, TLS, timeouts)."""
        kw = dict(getattr(self.client.nodes_manager, "connection_kwargs", {}))
        for k in ("host", "port"):
            kw.pop(k, None)
        return kw

    @staticmethod
    def scan_cursor(cursor: Any) -> int:
        """SCAN's next cursor; a cluster client reports ``{node name: cursor}``."""
        if isinstance(cursor, dict):
            return int(next(iter(cursor.values()), 0))
        return int(cursor)

    # ---------------------------------------------------------------- read
    def queue_read(
        self, pipe: Any, ids: Sequence[int], log_after: str | None, touch: Sequence[int],
        now: float,
    ) -> None:
        for i in ids:
            pipe.hgetall(self.ekey(i))
        if touch:
            pipe.zadd(self.k_lru, {format_id(t): now for t in touch}, xx=True)
        if log_after is not None:
            # XRANGE from our position itself (its start is inclusive): the entry there
            # comes back first, then the new ones. If it does not, the log no longer holds
            # our position (MAXLEN trimmed past it, which removes the oldest entries first,
            # or the server lost its data): parse_log asks for a rebuild. One command per
            # read checks both. XRANGE, not XREAD: XREAD's keys are "movable", so a cluster
            # client would ask the server for them (COMMAND GETKEYS) before every read.
            pipe.xrange(self.k_log, log_after, "+", count=_LOG_BATCH + 1)

    def refresh_keys(self, refresh: Sequence[Refresh]) -> list[str]:
        return [self.ekey(r.id) for r in refresh]

    @staticmethod
    def refresh_fields(r: Refresh) -> tuple[str, str, str]:
        return ("version", "expires", "until:" + r.version)

    @staticmethod
    def still_held(refresh: Sequence[Refresh], rows: Sequence[Any]) -> list[Refresh]:
        """The refreshes whose entry still holds the version that was hit, and whose expiry
        is later than the one stored (a refresh kept from a failed round trip and written
        late must not shorten a later one that another process wrote meanwhile)."""
        def number(raw: Any) -> float:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                return -math.inf
            return value if value == value else -math.inf

        out = []
        for r, row in zip(refresh, rows):
            version, expires, until = (list(row) + [None] * 3)[:3]
            if version == r.version.encode() and r.until > max(number(expires), number(until)):
                out.append(r)
        return out

    def refresh_failed(self, exc: BaseException | None) -> int:
        """The end of a refresh that did not commit: a command the server refuses (PEXPIRE
        GT before Redis 7.0) is logged and dropped; anything else raises StoreError, and the
        caller keeps the refreshes for its next round trip. ``None``: every try lost its
        WATCH (a write to one of the keys, or a connection lost while watching)."""
        self._note_outage(exc)
        if exc is None:
            raise StoreContended(f"sliding-TTL refresh: other writers of the entry won its "
                                 f"WATCH for {_REFRESH_SECONDS:g} s")
        if isinstance(exc, self._response_error) and _refuses_pexpire_gt(exc):
            log.warning("a sliding-TTL refresh was refused by the server (PEXPIRE GT needs "
                        "Redis >= 7.0 or Valkey); the entry keeps its earlier expiry: %s", exc)
            return 0
        if isinstance(exc, self._response_error) and str(exc).startswith("WRONGTYPE"):
            # Not an outage: an entry key that holds another type has no entry to refresh,
            # and kept for the next round trip the refresh failed on every lookup, for good.
            log.warning("a sliding-TTL refresh was dropped: an entry key holds another type "
                        "(%s)", exc)
            return 0
        # Anything else (OOM, READONLY in a failover, NOPERM...) is an outage: kept, retried.
        raise self._failure(exc) from exc

    def verdict_update(self, version: str, verdict: Verdict, row: Sequence[Any]
                       ) -> bytes | None:
        """The new ``verdicts:<version>`` field of an entry whose ``(version, verdicts)``
        fields read ``row``, or ``None`` if it no longer holds ``version``."""
        cur_version, cur = (list(row) + [None, None])[:2]
        if cur_version != version.encode():
            return None
        try:
            old = decode_verdicts(cur) if cur is not None else ()
        except ValueError:
            old = ()  # (the entry reads as invalid meanwhile; valid verdicts replace it)
        return encode_verdicts(merge_verdicts(old, verdict))

    def verdict_failed(self, exc: BaseException | None) -> bool:
        self._note_outage(exc)
        if exc is None:  # (other writers of the entry won every round: not an outage)
            raise StoreContended(f"a verdict was not recorded: other writers of the entry "
                                 f"won its WATCH for {_CONTENDED_SECONDS:g} s")
        raise self._failure(exc) from exc

    def queue_refresh(self, pipe: Any, refresh: Sequence[Refresh], now: float) -> None:
        """Extend sliding entries (in a MULTI whose keys were WATCHed and found to hold the
        versions that were hit): the later expiry goes into the field of that version, the
        key's own expiry only grows (``PEXPIRE ... GT``: Redis >= 7.0, any Valkey), the
        expiry index follows, and the ``set`` event tells the other processes to re-read
        the entry."""
        for r in refresh:
            key = self.ekey(r.id)
            pipe.hset(key, "until:" + r.version, repr(float(r.until)))
            pipe.pexpire(key, max(1, int(round((r.until - now) * 1000))), gt=True)
            # (not XX: the entry is there, checked under WATCH. A process whose clock runs
            # ahead can take it for expired and drop it from both sets while its key lives;
            # a hit then kept it alive outside the LRU for good, never counted by
            # max_entries nor evicted.)
            pipe.zadd(self.k_exp, {format_id(r.id): r.until}, gt=True)
            pipe.zadd(self.k_lru, {format_id(r.id): now}, gt=True)
        self.queue_log(pipe, "set", [format_id(r.id) for r in refresh])

    def parse_entries(self, ids: Sequence[int], results: Sequence[Any]) -> list[Fetched]:
        out: list[Fetched] = []
        for eid, raw in zip(ids, results):
            if isinstance(raw, Exception):
                out.append(Invalid(eid, f"server error: {raw}"))
            elif not raw or is_residue(raw):
                out.append(None)
            else:
                out.append(decode_record(eid, raw))
        return out

    def parse_read(
        self, ids: Sequence[int], log_after: str | None, touch: Sequence[int],
        results: Sequence[Any],
    ) -> tuple[list[Fetched], LogBatch | None]:
        n = len(ids)
        entries = self.parse_entries(ids, results[:n])
        rest = list(results[n + (1 if touch else 0):])
        if log_after is None:
            return entries, None
        if isinstance(rest[0], Exception):
            raise StoreError(f"reading the change log failed: {rest[0]}")
        return entries, self.parse_log(log_after, rest[0])

    def parse_log(self, after: str, entries: Any) -> LogBatch:
        """The events after ``after`` from an XRANGE that starts at ``after`` itself."""
        pos = _stream_id(after) or (0, 0)
        messages: list[Any] = list(entries or ())
        if pos != (0, 0):  # ("0-0": we started from an empty log, there is no entry to find)
            if not messages or _stream_id(messages[0][0]) != pos:
                # Our position is gone: trimmed past, or the server lost its data.
                return LogBatch([], after, reset=True, after=after)
            messages = messages[1:]
        events: list[LogEvent] = []
        position = after
        for msg_id, fields in messages:
            if len(events) >= _LOG_EVENTS_PER_READ:
                # A reader far behind a bulk load: up to 1,000 entries of 500 ids each would
                # make one fetch of 500k entries. The rest comes with the next read.
                return LogBatch(events, position, more=True, after=after)
            position = _id_text(msg_id)
            events.extend(self.parse_event(fields, position))
        return LogBatch(events, position, more=len(messages) >= _LOG_BATCH, after=after)

    @staticmethod
    def parse_event(fields: Any, pos: str) -> list[LogEvent]:
        """The events of one stream entry: ``op=set|del ids=<id>,<id>...`` or
        ``op=clear scope=<scope id>|*``; garbage is logged and skipped."""
        if not isinstance(fields, dict):
            return []
        op = fields.get(b"op")
        if op in (b"set", b"del"):
            raw = fields.get(b"ids", b"")
            parts = raw.split(b",") if isinstance(raw, bytes) else []
            if len(parts) > _IDS_PER_EVENT:  # (more than any writer puts in one: a forged
                # event of 1M ids made every replica's next lookup fetch them all)
                log.warning("ignoring a change-log event of %d ids (at most %d)", len(parts),
                            _IDS_PER_EVENT)
                return []
            ids = [parse_id(x) for x in parts]
            if not parts or any(i is None for i in ids):
                log.warning("ignoring a change-log event with a bad id: %s", _brief(fields))
            return [LogEvent(op.decode(), i, "", pos) for i in ids if i is not None]
        if op == b"clear":
            scope = fields.get(b"scope", b"")
            text = scope.decode("ascii", "replace") if isinstance(scope, bytes) else ""
            if text != "*" and not _SCOPE_RE.match(text):
                log.warning("ignoring a clear event with a bad scope: %s", _brief(fields))
                return []
            return [LogEvent("clear", None, text, pos)]
        if op != b"noop":
            log.warning("ignoring an unknown change-log event: %s", _brief(fields))
        return []

    # ---------------------------------------------------------------- write
    def queue_write(
        self, pipe: Any, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int],
    ) -> None:
        if touch:
            # (just before this write's entries: the hits came first. Scored at `now`, a
            # hit entry tied with the one written and eviction broke the tie by id: set()
            # could evict the entry it had just written instead of the older one)
            before = math.nextafter(now, -math.inf)
            pipe.zadd(self.k_lru, {format_id(t): before for t in touch}, xx=True)
        exp: dict[str, float] = {}
        no_exp: list[str] = []
        for rec, ttl in zip(records, ttls):
            key = self.ekey(rec.id)
            hid = format_id(rec.id)
            pipe.delete(key)
            pipe.hset(key, mapping=encode_record(rec))  # type: ignore[arg-type]
            if ttl is not None:
                pipe.pexpire(key, max(1, int(round(ttl * 1000))))
                exp[hid] = rec.expires
            else:
                no_exp.append(hid)
        hids = [format_id(r.id) for r in records]
        pipe.zadd(self.k_lru, dict.fromkeys(hids, now))
        if exp:
            pipe.zadd(self.k_exp, exp)
        if no_exp:
            pipe.zrem(self.k_exp, *no_exp)
        self.queue_log(pipe, "set", hids)
        pipe.zcard(self.k_lru)
        pipe.zcount(self.k_exp, "-inf", now)

    def queue_log(self, pipe: Any, op: str, hids: Sequence[str]) -> None:
        for s in range(0, len(hids), _IDS_PER_EVENT):
            pipe.xadd(self.k_log, {"op": op, "ids": ",".join(hids[s:s + _IDS_PER_EVENT])},
                      maxlen=self.log_maxlen, approximate=True)

    @staticmethod
    def parse_write(results: Sequence[Any], n_records: int) -> WriteResult:
        for r in results:
            if isinstance(r, Exception):
                raise StoreError(f"write refused by the server: {r}")
        n_events = -(-n_records // _IDS_PER_EVENT)
        positions = tuple(_id_text(x) for x in results[-2 - n_events:-2])
        return WriteResult(int(results[-2]), int(results[-1]), 0, positions)

    def queue_delete(self, pipe: Any, ids: Sequence[int]) -> None:
        for i in ids:
            pipe.delete(self.ekey(i))
        if ids:
            hids = [format_id(i) for i in ids]
            pipe.zrem(self.k_lru, *hids)
            pipe.zrem(self.k_exp, *hids)
            self.queue_log(pipe, "del", hids)

    @staticmethod
    def parse_delete(n: int, results: Sequence[Any]) -> list[bool]:
        for r in results:
            if isinstance(r, Exception):
                raise StoreError(f"delete refused by the server: {r}")
        return [bool(r) for r in results[:n]]

    def parse_delete_logged(self, n: int, results: Sequence[Any]) -> Cleared:
        """What a queue_delete of ``n`` ids did: how many existed, and its log positions
        (the last XADDs of the transaction)."""
        gone = sum(self.parse_delete(n, results))
        n_events = -(-n // _IDS_PER_EVENT)
        return Cleared(gone, tuple(_id_text(x) for x in results[-n_events:]))

    def parse_ids(self, members: Sequence[Any]) -> list[int]:
        out = []
        for m in members:
            if isinstance(m, (tuple, list)):
                m = m[0]
            eid = parse_id(m)
            if eid is not None:
                out.append(eid)
        return out

    @staticmethod
    def holds(value: Any, token: str) -> bool:
        """Whether a lease key's value is our token."""
        return value == token.encode()

    def queue_noop(self, pipe: Any) -> None:
        """An event that changes nothing (a reader's first position in an empty log)."""
        pipe.xadd(self.k_log, {"op": "noop"}, maxlen=self.log_maxlen, approximate=True)

    # ------------------------------------------------------------------ clear
    @staticmethod
    def scope_filter(scope_id: str | None) -> tuple[str | None, Callable[[Any], bool]]:
        """What a clear of ``scope_id`` deletes (see ``_drop_scanned``): every entry, or
        those whose ``scope`` field is that id."""
        want = (scope_id or "").encode()
        return (None if scope_id is None else "scope"), (lambda v: v == want)

    def queue_drop(self, pipe: Any, keys: Sequence[Any]) -> None:
        """Delete entry keys found by a clear's SCAN (results: deleted, 2 ZREMs, then the
        positions of the del events; key names that are no id are deleted unannounced)."""
        hids = [_id_text(k)[len(self.k_entry):] for k in keys]
        pipe.delete(*keys)
        pipe.zrem(self.k_lru, *hids)
        pipe.zrem(self.k_exp, *hids)
        self.queue_log(pipe, "del", [h for h in hids if parse_id(h) is not None])

    def dropped(self, keys: Sequence[Any], results: Sequence[Any]
                ) -> list[tuple[str, tuple[int, ...]]]:
        """Each del event of a :meth:`queue_drop` of ``keys``: its position and its ids."""
        ids = [i for i in (parse_id(_id_text(k)[len(self.k_entry):]) for k in keys)
               if i is not None]
        return _del_events(ids, results[3:])

    # ------------------------------------------------------------- expired bookkeeping
    # An expired entry leaves its id in ``exp`` and ``lru`` (the server drops the key). They
    # are forgotten in batches: read the expired members, WATCH their entry keys, read them
    # again, and remove in one MULTI only those still expired: an entry written again in
    # between has a later score (not in the second read) or a changed key (EXEC fails), so
    # a live entry never loses its place in the LRU.
    def queue_expired(self, pipe: Any, now: float) -> None:
        pipe.zrangebyscore(self.k_exp, "-inf", now, start=0, num=_EXPIRED_BATCH)

    def expired_keys(self, members: Sequence[Any]) -> list[str]:
        return [self.ekey(i) for i in self.parse_ids(members)]

    @staticmethod
    def expired_to_drop(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
        """Members expired in both reads (garbage members too: they have no key)."""
        if not isinstance(second, (list, tuple)):  # (a pipeline not in immediate mode
            # answers with itself, whose iteration queues GETs for ever)
            raise TypeError(f"expected the members read, got {type(second).__name__}")
        again = set(second)
        return [m for m in first if m in again]

    def victim_keys(self, members: Sequence[Any]) -> list[str]:
        """The entry keys of the LRU members chosen for eviction: watched until they are
        deleted, so that an entry written again meanwhile is not (it is no longer old)."""
        return [self.ekey(i) for i in self.parse_ids(members)]

    @staticmethod
    def still_oldest(first: Sequence[Any], again: Sequence[Any]) -> bool:
        """Whether the oldest members, read again under WATCH, are those chosen (an entry
        written or hit between the two reads moved up the LRU order)."""
        return list(first) == list(again)

    def queue_evict(self, pipe: Any, members: Sequence[Any]) -> list[int]:
        """Queue the eviction of the LRU members chosen; returns their ids, whose DEL
        replies come first. (Garbage members, which name no entry, just leave ``lru``.)"""
        ids = self.parse_ids(members)
        self.queue_delete(pipe, ids)
        if members:
            pipe.zrem(self.k_lru, *members)
        return ids

    def parse_evict(self, ids: Sequence[int], results: Sequence[Any],
                    logged: list[tuple[str, Sequence[int]]] | None) -> list[int]:
        """The ids a queue_evict deleted; appends its del events ``(position, ids)`` to
        ``logged`` (the XADD replies, just before the last ZREM)."""
        gone = [i for i, ok in zip(ids, self.parse_delete(len(ids), results)) if ok]
        if logged is not None and ids:
            n_events = -(-len(ids) // _IDS_PER_EVENT)
            logged.extend(_del_events(ids, results[-1 - n_events:-1]))
        return gone

    def queue_drop_expired(self, pipe: Any, members: Sequence[Any]) -> None:
        if members:
            pipe.zrem(self.k_exp, *members)
            pipe.zrem(self.k_lru, *members)

    def entry_key_id(self, key: Any) -> int | None:
        text = _id_text(key)
        if not text.startswith(self.k_entry):
            return None
        return parse_id(text[len(self.k_entry):])

    def parse_meta(
        self, values: Sequence[Any], dim: int | None, embedder: str
    ) -> tuple[int | None, str]:
        raw_dim, raw_emb = values
        try:
            stored_dim = int(raw_dim) if raw_dim is not None else dim
        except ValueError:
            stored_dim = -1
        if stored_dim is not None and not 1 <= stored_dim <= MAX_DIM:
            log.warning("ignoring a bad dim in %s: %s", self.k_meta, _brief(raw_dim))
            stored_dim = dim
        # (a name, not a text: garbage is cut, as it goes into warnings and errors)
        stored_emb = (bytes(raw_emb[:256]).decode("utf-8", "replace") if raw_emb is not None
                      else embedder)
        return stored_dim, stored_emb

    def queue_ref_secret(self, pipe: Any) -> None:
        pipe.hsetnx(self.k_meta, "ref_secret", secrets.token_hex(32))
        pipe.hget(self.k_meta, "ref_secret")

    def parse_ref_secret(self, raw: Any) -> bytes:
        if not isinstance(raw, (bytes, bytearray)) or not raw:
            raise StoreError(f"no ref_secret in {self.k_meta}")
        # (hashed: whatever is stored, every process derives the same 32-byte key from it)
        return hashlib.blake2b(bytes(raw), digest_size=32, person=b"hc-ref").digest()


#: Connections a store made by ``from_url`` opens at most (``max_connections=`` changes
#: it). More concurrent calls wait for one, up to the store's timeout: redis-py 8's pool
#: raised MaxConnectionsError at the 101st, which opened the outage breaker on a healthy
#: server (150 concurrent gets: 50 errors, then misses for a second; leases left behind).
POOL_SIZE = 100


def _pooled(client_cls: Any, pool_cls: Any, url: str, timeout: float,
            opts: dict[str, Any]) -> Any:
    """``client_cls.from_url(url, **opts)`` over a pool that makes callers wait for a free
    connection (up to ``timeout``) instead of failing."""
    kw = {"max_connections": POOL_SIZE, "timeout": timeout, **opts}
    # (options of the client, not of its connections: from_url takes them off too)
    single = kw.pop("single_connection_client", False)
    kw.pop("auto_close_connection_pool", None)
    client = client_cls(connection_pool=pool_cls.from_url(url, **kw),
                        single_connection_client=single)
    client.auto_close_connection_pool = True  # (as from_url's: closed with the client)
    return client


def _pool_exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` is the client's own pool out of connections (a local queue, not
    the server: no outage). redis-py 8: MaxConnectionsError; a blocking pool's wait
    ending: "No connection available."; redis-py 5: "Too many connections"."""
    import redis

    kind = getattr(redis.exceptions, "MaxConnectionsError", None)
    return ((kind is not None and isinstance(exc, kind))
            or str(exc) in ("No connection available.", "Too many connections"))


def _url_kwargs(timeout: float, asyncio: bool) -> dict[str, Any]:
    if asyncio:
        from redis.asyncio.retry import Retry as ARetry
        from redis.backoff import NoBackoff

        retry: Any = ARetry(NoBackoff(), 1)
    else:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        retry = Retry(NoBackoff(), 1)
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "decode_responses": False,
    }


def _cluster_url(url: str) -> str | None:
    """``redis+cluster://...`` / ``rediss+cluster://...`` as the URL of a seed node of a
    Redis Cluster (``redis://...`` / ``rediss://...``), or ``None`` for any other URL."""
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return scheme.replace("+cluster", "") + url[len(scheme):]
    return None


class RedisStore(_Layout):
    """A synchronous store on a Redis or Valkey server.

    Args:
        client: an existing ``redis.Redis`` (or ``RedisCluster``) with
            ``decode_responses=False``; the store does not close it.
        namespace: the cache's name; every key carries the hash tag ``{namespace}``.
        log_maxlen: approximate length cap of the change log stream.

    Use :meth:`from_url` to connect by URL (``redis://``, ``rediss://`` for TLS, with
    ``user:password@`` for AUTH).
    """

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default", timeout: float = 0.5,
                 log_maxlen: int = 100_000, **kwargs: Any) -> RedisStore:
        """Connect to ``url``; ``timeout`` (seconds) bounds connecting and every reply.
        ``redis+cluster://host:port`` (or ``rediss+cluster://``) makes a Redis Cluster client
        seeded by that node."""
        import redis
        import redis.cluster

        opts = _url_kwargs(timeout, asyncio=False)
        opts.update(kwargs)
        seed = _cluster_url(url)
        client: Any = (redis.cluster.RedisCluster.from_url(seed, **opts) if seed is not None
                       else _pooled(redis.Redis, redis.BlockingConnectionPool, url, timeout,
                                    opts))
        return cls(client, namespace=namespace, log_maxlen=log_maxlen, owns_client=True)

    def _run(self, transaction: bool, queue: Any, raise_on_error: bool = False) -> list[Any]:
        first: list[Any] = []
        for attempt in (0, 1):
            try:
                pipe = self.client.pipeline(transaction=transaction)
                queue(pipe)
                # Replies, errors included, are looked at here (raise_on_error below).
                res = list(pipe.execute(raise_on_error=False))
            except self._errors as exc:
                raise self._failure(exc) from exc
            if attempt == 0 and any(_wrong_type(r) for r in res) and self._repair_types():
                first = res
                continue  # the refused commands again (the others ran: see merge_retry)
            return self.replies(self.merge_retry(first, res) if first else res, raise_on_error)
        raise AssertionError("unreachable")

    def _repair_types(self) -> bool:
        """Move a foreign value at the cache's own keys aside and rebuild the sorted sets
        from the entries (a SCAN); whether a foreign value was found (moved by us or by
        another process meanwhile: either way the refused commands can go again)."""
        if not self.types_due():
            return False
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in self.own_types():
                pipe.type(key)
            foreign = self.foreign_keys(pipe.execute())
            moved = [k for k in foreign if self._move_aside(k, self.own_types()[k])]
            sets = [k for k in moved if k in (self.k_lru, self.k_exp)]
            if sets:
                for batch in self.scan():
                    self._run(False, lambda p, b=batch: self.queue_rebuild(p, b, sets))
        except self._quiet_errors as exc:
            log.warning("cache namespace %r: repairing its keys failed: %s", self.namespace, exc)
            return False
        return bool(foreign)

    def _move_aside(self, key: str, want: bytes) -> bool:
        """RENAME ``key`` to a fresh name if it still holds another type than ``want``
        (WATCH: a process that repaired it since, and rebuilt our own value there, keeps
        it); whether this process moved it."""
        dest = self.aside_name(key)
        if not self._if_unchanged(key, lambda p: p.type(key), lambda t: self.is_foreign(want, t),
                                  lambda p: p.rename(key, dest)):
            return False
        self.moved_aside(key, dest)
        return True

    def _if_unchanged(self, key: str, read: Callable[[Any], Any], ok: Callable[[Any], bool],
                      act: Callable[[Any], Any]) -> bool:
        """WATCH ``key``, ``read`` it, and when ``ok`` of what was read, ``act`` in a
        MULTI/EXEC; whether it acted (not when the check failed, nor when the key changed
        between the read and the EXEC)."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(key)
                if not ok(read(pipe)):
                    pipe.unwatch()
                    return False
                pipe.multi()
                act(pipe)
                pipe.execute()
                return True
        except self._watch_error:
            return False

    def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]:
        res = self._run(False, lambda p: self.queue_read(p, ids, log_after, touch, now))
        return self.parse_read(ids, log_after, touch, res)

    def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
        # WATCH, read the versions, then MULTI/EXEC: a key deleted, expired or rewritten in
        # between makes EXEC fail, and the check runs again (plain commands, no script).
        if not refresh:
            return 0
        keys = self.refresh_keys(refresh)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in _contended_tries(_REFRESH_SECONDS):
                    try:
                        pipe.watch(*keys)
                        live = self.still_held(refresh, [
                            pipe.hmget(k, *self.refresh_fields(r)) for k, r in zip(keys, refresh)])
                        if not live:
                            pipe.unwatch()
                            return 0
                        pipe.multi()
                        self.queue_refresh(pipe, live, now)
                        pipe.execute()
                        return len(live)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            return self.refresh_failed(exc)
        return self.refresh_failed(None)

    def fetch(self, ids: Sequence[int]) -> list[Fetched]:
        if not ids:
            return []
        res = self._run(False, lambda p: self.queue_read(p, ids, None, (), 0.0))
        return self.parse_entries(ids, res)

    def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool:
        # As refresh: WATCH the entry, check its version, HSET in MULTI/EXEC (an HSET on a
        # deleted key would recreate it as a hash without its entry or expiry).
        key, field = self.ekey(eid), "verdicts:" + version
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in _contended_tries():
                    try:
                        pipe.watch(key)
                        new = self.verdict_update(version, verdict,
                                                  pipe.hmget(key, "version", field))
                        if new is None:
                            pipe.unwatch()
                            return False
                        pipe.multi()
                        pipe.hset(key, field, new)
                        pipe.execute()
                        return True
                    except self._watch_error:
                        continue
        except self._errors as exc:
            return self.verdict_failed(exc)
        return self.verdict_failed(None)

    def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult:
        res = self._run(True, lambda p: self.queue_write(p, records, ttls, now, touch))
        return self.parse_write(res, len(records))

    def delete(self, ids: Sequence[int]) -> int:
        return self.delete_logged(ids).deleted

    def delete_logged(self, ids: Sequence[int]) -> Cleared:
        if not ids:
            return Cleared(0)
        res = self._run(True, lambda p: self.queue_delete(p, ids))
        return self.parse_delete_logged(len(ids), res)

    def evict(self, max_entries: int | None, now: float,
              logged: list[tuple[str, Sequence[int]]] | None = None) -> tuple[list[int], int]:
        gone = 0
        while True:
            first = self._run(False, lambda p: self.queue_expired(p, now), raise_on_error=True)[0]
            if not first:
                break
            done = self._drop_expired(first, now)
            gone += done
            if len(first) < _EXPIRED_BATCH or done == 0:
                break
        evicted = [] if max_entries is None else self._evict_lru(max_entries, logged)
        return evicted, gone

    def _evict_lru(self, max_entries: int,
                   logged: list[tuple[str, Sequence[int]]] | None = None) -> list[int]:
        """Delete the least recently used entries past ``max_entries``: chosen by a read,
        deleted in a MULTI/EXEC under WATCH of their keys (see ``victim_keys``). Before
        2026-12-05 a ZPOPMIN took them apart from the delete: an entry written again in
        between was deleted all the same, and two processes evicting at once each took
        their own share."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(_REFRESH_TRIES):
                    try:
                        over = int(self.client.zcard(self.k_lru)) - max_entries
                        if over <= 0:
                            return []
                        first = self.client.zrange(self.k_lru, 0, over - 1)
                        keys = self.victim_keys(first)
                        if not keys:  # garbage members only
                            if first:
                                self.client.zrem(self.k_lru, *first)
                            continue
                        pipe.watch(*keys)
                        # Both again under WATCH: another eviction may have finished between
                        # the reads above (its victims are gone, ours would be extra). More
                        # entries than read is fine: new writes are the newest, not victims
                        # (requiring the same count lost every round to busy writers: 316-477
                        # entries held for max_entries=100 by 3 processes x 24 writing threads,
                        # bench/evict_peak.py; 121-140 since).
                        again = pipe.zrange(self.k_lru, 0, over - 1)
                        if (int(pipe.zcard(self.k_lru)) - max_entries < over
                                or not self.still_oldest(first, again)):
                            pipe.unwatch()
                            continue
                        pipe.multi()
                        ids = self.queue_evict(pipe, first)
                        res = pipe.execute(raise_on_error=False)
                        return self.parse_evict(ids, res, logged)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            raise self._failure(exc) from exc
        return []  # the oldest entries kept changing: the next write's eviction tries again

    def _drop_expired(self, first: Sequence[Any], now: float) -> int:
        """Forget the expired members ``first`` (as read) in ``exp`` and ``lru`` unless
        their entry was written again since (see ``expired_to_drop``)."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(_REFRESH_TRIES):
                    try:
                        keys = self.expired_keys(first)
                        if not keys:  # (members that name no entry: nothing to watch)
                            self._run(False, lambda p: self.queue_drop_expired(p, first))
                            return len(first)
                        pipe.watch(*keys)
                        drop = self.expired_to_drop(first, pipe.zrangebyscore(
                            self.k_exp, "-inf", now, start=0, num=_EXPIRED_BATCH))
                        pipe.multi()
                        self.queue_drop_expired(pipe, drop)
                        pipe.execute()
                        return len(drop)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            raise self._failure(exc) from exc
        return 0  # entries kept being written: the next round tries again

    def _scan_keys(self) -> Iterator[tuple[list[Any], Any]]:
        """The cache's entry keys, batch by batch, each with the client to read them through
        (``None``: the store's own; else a direct connection to a node the cluster client
        does not know, read with ASKING)."""
        if not self._cluster:
            for keys in self._scan_with(self.client.scan, {}, None):
                yield keys, None
            return
        seen: set[Any] = set()
        try:
            owner = self.scan_owner()
            before = self.migration_target(
                self.client.execute_command("CLUSTER NODES", target_nodes=owner))
        except self._errors as exc:
            raise self._failure(exc) from exc
        for keys in self._scan_with(self.client.scan, {"target_nodes": owner}, seen):
            yield keys, None
        # The importing node after the owner (a key moves only towards it), as the owner
        # says now: a move that began during the owner's scan counts too.
        try:
            after = self.migration_target(
                self.client.execute_command("CLUSTER NODES", target_nodes=owner))
        except self._errors as exc:
            raise self._failure(exc) from exc
        for to in dict.fromkeys(t for t in (before, after) if t is not None):
            node = self.client.get_node(host=to[0], port=to[1])
            if node is not None:
                for keys in self._scan_with(self.client.scan, {"target_nodes": node}, seen):
                    yield keys, None
                continue
            # A node that owns no slot yet (the usual scale-out: add an empty node, move
            # slots onto it) is not in the client's map: asked directly.
            direct = self.client.nodes_manager.create_redis_node(
                host=to[0], port=to[1], **self.node_kwargs())
            try:
                for keys in self._scan_with(direct.scan, {}, seen):
                    yield keys, direct
            finally:
                direct.close()

    def _scan_with(self, scan: Callable[..., Any], kw: dict[str, Any],
                   seen: set[Any] | None) -> Iterator[list[Any]]:
        """The cache's entry keys by ``scan`` (a client's, with ``kw``), batch by batch;
        those in ``seen`` skipped and added (a key can be met on two nodes of a move)."""
        cursor = 0
        while True:
            try:
                raw, keys = scan(cursor, match=self.k_entry + "*", count=_SCAN_COUNT, **kw)
            except self._errors as exc:
                raise self._failure(exc) from exc
            if seen is not None:
                keys = [k for k in keys if k not in seen]
                seen.update(keys)
            if keys:
                yield list(keys)
            cursor = self.scan_cursor(raw)
            if cursor == 0:
                break

    def scan(self) -> Iterator[list[Fetched]]:
        for keys, via in self._scan_keys():
            ids = [self.entry_key_id(k) for k in keys]
            good = [i for i in ids if i is not None]
            bad: list[Fetched] = [Invalid(-1, f"bad key name {_id_text(k)!r}")
                                  for k, i in zip(keys, ids) if i is None]
            yield bad + (self.fetch(good) if via is None else self._fetch_asking(via, good))

    def _fetch_asking(self, direct: Any, ids: Sequence[int]) -> list[Fetched]:
        """:meth:`fetch` of keys moved to a node the cluster client does not know (its
        pipelines fail there): ``ASKING`` before each read, on a direct connection."""
        try:
            pipe = direct.pipeline(transaction=False)
            self.queue_asking(pipe, ids)
            res = list(pipe.execute(raise_on_error=False))
        except self._errors as exc:
            raise self._failure(exc) from exc
        return self.parse_entries(ids, res[1::2])

    def clear(self, scope_id: str | None) -> Cleared:
        # Only the del event of each deleted batch is logged, not one clear event: a pass
        # is not atomic, and one cut short (a stall, a timeout, its process killed) left
        # the store holding entries that every replica had dropped for the clear event, for
        # good (until 2026-12-05). Replicas apply del events exactly; an entry written
        # during the pass is deleted with its del event or kept.
        n, batches = self._drop_scanned(*self.scope_filter(scope_id))
        return Cleared(n, tuple(pos for pos, _ in batches), tuple(batches))

    def clear_within(self, fields: Mapping[str, Any]) -> int:
        # No clear event: each deleted batch logs its ids, which every replica (this
        # process's too, at its next read) applies exactly.
        return self._drop_scanned("scope_json", lambda js: scope_holds(js, fields))[0]

    def _drop_scanned(self, field: str | None, wanted: Callable[[Any], bool],
                      ) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
        """Delete the entries whose ``field`` is ``wanted`` (all with ``field=None``), a SCAN
        batch at a time; ``(deleted, [(del event position, its ids)])``."""
        n, batches = 0, []
        for keys, _ in self._scan_keys():
            if field is not None:
                values = self._run(False, lambda p, ks=keys: [p.hget(k, field) for k in ks])
                keys = [k for k, v in zip(keys, values) if wanted(v)]
            if keys:
                res = self._run(True, lambda p, ks=keys: self.queue_drop(p, ks),
                                raise_on_error=True)
                n += int(res[0])
                batches += self.dropped(keys, res)
        return n, batches

    def log_head(self) -> str:
        res = self._run(False, lambda p: p.xrevrange(self.k_log, "+", "-", count=1),
                        raise_on_error=True)
        if res[0]:
            return _id_text(res[0][0][0])
        # An empty log: a position of "0-0" could not tell a later trim past it (the reader
        # would miss those events for good), so start it with an event to stand on.
        return _id_text(self._run(False, self.queue_noop, raise_on_error=True)[0])

    def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]:
        def q(p: Any) -> None:
            if dim is not None:
                p.hsetnx(self.k_meta, "format", "1")
                p.hsetnx(self.k_meta, "dim", str(int(dim)))
                p.hsetnx(self.k_meta, "embedder", embedder)
            p.hmget(self.k_meta, ["dim", "embedder"])

        res = self._run(True, q, raise_on_error=True)
        return self.parse_meta(res[-1], dim, embedder)

    def ref_secret(self) -> bytes:
        """The namespace's key for ref() tags: made once by the first process that asks
        (``HSETNX``), then the same for every process on the store."""
        res = self._run(True, self.queue_ref_secret, raise_on_error=True)
        return self.parse_ref_secret(res[-1])

    def lease(self, eid: int, token: str, seconds: float) -> bool:
        """Take the lease of entry ``eid`` for ``seconds``; whether this process leads
        (also when the server fails: a caller is never held up by the store)."""
        try:
            return self.parse_lease(
                self._run(False, lambda p: self.queue_lease(p, eid, token, seconds)))
        except StoreError:
            return True

    def lease_held(self, eid: int) -> bool:
        """Whether some process holds a live lease on ``eid``."""
        try:
            res = self._run(False, lambda p: self.queue_held(p, eid))
        except StoreError:
            return False
        return _live_lease(res[0], res[1])

    def fly(self, scope_id: str, eid: int, vector: Any, seconds: float, token: bytes
            ) -> tuple[int, list[tuple[int, int, Any]]]:
        """Register this process's call for entry ``eid`` (embedding ``vector``, owner
        ``token``) as in flight for ``seconds``, unless a live flight of that entry is
        there already; its start (unix ms) and the scope's other live flights ``(start ms,
        id, vector)``, read in the same transaction: those registered before this one. A
        failing server: none (the caller lands its flight anyway: the registration may have
        been applied)."""
        now = int(time.time() * 1000)
        value = self.flight_value(vector, now, seconds, token)
        key, field = self.fkey(scope_id), format_id(eid)
        try:
            # In one transaction: of two calls registering at once, exactly one sees the
            # other (the cache follows only calls registered before its own).
            res = self._run(True, lambda p: self.queue_fly(p, scope_id, eid, value, seconds))
            flights = res[2]
            others, dead, own = self.parse_flights(flights, eid, len(vector), now)
            before = self.registered_before(res[0], others)
            for _ in range(3):  # (the WATCH fails when any flight of the scope changes)
                fix = self.flight_fixes(key, flights, dead, own, field, value, len(vector),
                                        now)
                if fix is None or self._if_unchanged(
                        key, lambda p, f=fix[0]: p.hmget(key, f),  # type: ignore[misc]
                        lambda v, e=fix[1]: list(v) == e, fix[2]):  # type: ignore[misc]
                    break
                flights = self.client.hgetall(key)
                others, dead, own = self.parse_flights(flights, eid, len(vector), now)
                if before is not None:  # (the re-read also has calls registered since)
                    others = [o for o in others if o[1] in before]
            else:  # a busy scope: our own field only, checked and set apart; no pruning
                if self.parse_flight(self.client.hget(key, field), len(vector), now) is None:
                    self.client.hset(key, field, value)
        except StoreError:
            return now, []
        except self._quiet_errors as exc:  # (the WATCH of a fix)
            self._note_outage(exc)
            return now, others
        return now, others

    def flights(self, scope_id: str, eid: int, dim: int) -> list[tuple[int, int, Any]]:
        """The scope's live flights other than ``eid``'s (none if the server fails)."""
        try:
            raw = self.client.hgetall(self.fkey(scope_id))
        except self._quiet_errors as exc:
            self._note_outage(exc)
            return []
        return self.parse_flights(raw, eid, dim, int(time.time() * 1000))[0]

    def flight_alive(self, scope_id: str, eid: int, dim: int) -> bool:
        """Whether the flight of entry ``eid`` is still registered and within its deadline."""
        try:
            value = self.client.hget(self.fkey(scope_id), format_id(eid))
        except self._quiet_errors as exc:
            self._note_outage(exc)
            return False
        return self.parse_flight(value, dim, int(time.time() * 1000)) is not None

    def land(self, scope_id: str, eid: int, token: bytes) -> None:
        """End our flight of entry ``eid``: its field, if it still holds our ``token`` (a
        process whose flight outlived its deadline may have been replaced)."""
        key, field = self.fkey(scope_id), format_id(eid)
        try:
            for _ in range(3):  # (WATCH fails when another flight of the scope changes)
                if self._if_unchanged(key, lambda p: p.hget(key, field),
                                      lambda v: self.flight_owner(v) == token,
                                      lambda p: p.hdel(key, field)):
                    return
                if self.flight_owner(self.client.hget(key, field)) != token:
                    return
            # A busy scope: check and delete apart. Only a field past its deadline can be
            # replaced between the two (by its entry's next call), and only then is it lost.
            if self.flight_owner(self.client.hget(key, field)) == token:
                self.client.hdel(key, field)
        except self._quiet_errors as exc:
            self._note_outage(exc)
            pass  # readers skip it once its deadline passes

    def mark_wait(self, tokens: Sequence[str], eid: int, seconds: float,
                  wait_id: str) -> None:
        """Mark that the calls holding ``tokens`` wait for entry ``eid`` (this wait:
        ``wait_id``), for ``seconds`` at most, so a dead process's marks go."""
        try:
            self._run(False, lambda p: self.queue_mark_wait(p, tokens, eid, seconds, wait_id))
        except StoreError:
            pass  # no mark: a cycle through us is then found by no one, and waits it out

    def unmark_wait(self, tokens: Sequence[str], eid: int, wait_id: str) -> None:
        try:
            self._run(False, lambda p: self.queue_unmark_wait(p, tokens, eid, wait_id))
        except StoreError:
            pass  # they expire

    def waits_on(self, eid: int, tokens: frozenset[str]) -> bool:
        """Whether the holder of ``eid``'s lease waits, through the holders of the leases
        it waits for, on one of ``tokens`` (a wait cycle). At most 16 leases are read."""
        todo, seen = [eid], set()
        try:
            for _ in range(_WAIT_CHAIN):
                if not todo:
                    return False
                holder = self.lease_token(self.client.get(self.lkey(todo.pop())))
                if holder is None or holder in seen:
                    continue
                if holder in tokens:
                    return True
                seen.add(holder)
                todo.extend(self.marked_ids(self.client.smembers(self.wkey(holder))))
        except self._quiet_errors as exc:
            self._note_outage(exc)
        return False

    def release(self, eid: int, token: str) -> None:
        """Drop our lease on ``eid`` (not another's: it may have expired and been taken,
        even between our read and our delete, hence WATCH)."""
        key = self.lkey(eid)
        try:  # (a lease that changed hands or expired meanwhile is not ours to drop)
            self._if_unchanged(key, lambda p: p.get(key), lambda v: self.holds(v, token),
                               lambda p: p.delete(key))
        except self._quiet_errors as exc:
            self._note_outage(exc)
            pass  # it expires on its own

    def close(self) -> None:
        if self._owns:
            try:
                self._client.close()
            except self._quiet_errors as exc:
                self._note_outage(exc)


class AsyncRedisStore(_Layout):
    """The asyncio twin of :class:`RedisStore`, on ``redis.asyncio``."""

    _is_async = True

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default", timeout: float = 0.5,
                 log_maxlen: int = 100_000, **kwargs: Any) -> AsyncRedisStore:
        """Connect to ``url``; ``timeout`` (seconds) bounds connecting and every reply.
        ``redis+cluster://host:port`` (or ``rediss+cluster://``) makes a Redis Cluster client
        seeded by that node."""
        import redis.asyncio
        import redis.asyncio.cluster

        opts = _url_kwargs(timeout, asyncio=True)
        opts.update(kwargs)
        seed = _cluster_url(url)

        def connect() -> Any:
            return (redis.asyncio.cluster.RedisCluster.from_url(seed, **opts)
                    if seed is not None
                    else _pooled(redis.asyncio.Redis, redis.asyncio.BlockingConnectionPool,
                                 url, timeout, opts))

        store = cls(connect(), namespace=namespace, log_maxlen=log_maxlen, owns_client=True)
        store._connect = connect
        return store

    #: Makes a new client (a store made by from_url): see :attr:`client`.
    _connect: Callable[[], Any] | None = None
    #: The client of each event loop this store was used on (a store made by from_url).
    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] | None = None

    @property
    def client(self) -> Any:
        """As the sync store's; and a store made by :meth:`from_url` keeps a client per
        event loop: a client's connections belong to the loop they were made on, and a
        second ``asyncio.run`` (a notebook cell, a test) got "Event loop is closed" out of
        every call, not a miss. (One client per loop, not one made again at each switch:
        two loops in turn leaked a connection per call.)"""
        client = _Layout.client.fget(self)  # type: ignore[attr-defined]
        if self._connect is None:
            return client
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return client
        if self._clients is None:  # (the first loop: the client from_url made is its)
            self._clients = weakref.WeakKeyDictionary({loop: client})
            return client
        mine = self._clients.get(loop)
        if mine is None:
            mine = self._clients[loop] = self._connect()
        self._client = mine
        return mine

    async def _run(self, transaction: bool, queue: Any, raise_on_error: bool = False
                   ) -> list[Any]:
        first: list[Any] = []
        for attempt in (0, 1):
            try:
                if transaction and self._cluster:
                    # redis-py 8.1's async cluster transaction, if it finds the client not
                    # yet initialised, initialises it on a private event loop in another
                    # thread, leaving connections that fail on ours ("attached to a
                    # different loop").
                    await self.client.initialize()  # a no-op once initialised
                pipe = self.client.pipeline(transaction=transaction)
                queue(pipe)
                res = list(await pipe.execute(raise_on_error=False))
            except self._errors as exc:
                raise self._failure(exc) from exc
            if (attempt == 0 and any(_wrong_type(r) for r in res)
                    and await self._repair_types()):
                first = res
                continue
            return self.replies(self.merge_retry(first, res) if first else res, raise_on_error)
        raise AssertionError("unreachable")

    async def _repair_types(self) -> bool:
        # As RedisStore._repair_types.
        if not self.types_due():
            return False
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in self.own_types():
                pipe.type(key)
            foreign = self.foreign_keys(await pipe.execute())
            moved = [k for k in foreign if await self._move_aside(k, self.own_types()[k])]
            sets = [k for k in moved if k in (self.k_lru, self.k_exp)]
            if sets:
                async for batch in self.scan():
                    await self._run(False, lambda p, b=batch: self.queue_rebuild(p, b, sets))
        except self._quiet_errors as exc:
            log.warning("cache namespace %r: repairing its keys failed: %s", self.namespace, exc)
            return False
        return bool(foreign)

    async def _move_aside(self, key: str, want: bytes) -> bool:
        # As RedisStore._move_aside.
        dest = self.aside_name(key)
        if not await self._if_unchanged(key, lambda p: p.type(key),
                                        lambda t: self.is_foreign(want, t),
                                        lambda p: p.rename(key, dest)):
            return False
        self.moved_aside(key, dest)
        return True

    async def _if_unchanged(self, key: str, read: Callable[[Any], Any],
                            ok: Callable[[Any], bool], act: Callable[[Any], Any]) -> bool:
        """See :meth:`RedisStore._if_unchanged` (``read`` returns an awaitable)."""
        try:
            if self._cluster:
                await self.client.initialize()  # (see _run)
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                if not ok(await read(pipe)):
                    await pipe.unwatch()
                    return False
                pipe.multi()
                act(pipe)
                await pipe.execute()
                return True
        except self._watch_error:
            return False

    async def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]:
        res = await self._run(False, lambda p: self.queue_read(p, ids, log_after, touch, now))
        return self.parse_read(ids, log_after, touch, res)

    async def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
        # As RedisStore.refresh: WATCH, check the versions, MULTI/EXEC.
        if not refresh:
            return 0
        keys = self.refresh_keys(refresh)
        try:
            if self._cluster:
                await self.client.initialize()  # (see _run)
            async with self.client.pipeline(transaction=True) as pipe:
                async for _ in _acontended_tries(_REFRESH_SECONDS):
                    try:
                        await pipe.watch(*keys)
                        live = self.still_held(refresh, [
                            await pipe.hmget(k, *self.refresh_fields(r))
                            for k, r in zip(keys, refresh)])
                        if not live:
                            await pipe.unwatch()
                            return 0
                        pipe.multi()
                        self.queue_refresh(pipe, live, now)
                        await pipe.execute()
                        return len(live)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            return self.refresh_failed(exc)
        return self.refresh_failed(None)

    async def fetch(self, ids: Sequence[int]) -> list[Fetched]:
        if not ids:
            return []
        res = await self._run(False, lambda p: self.queue_read(p, ids, None, (), 0.0))
        return self.parse_entries(ids, res)

    async def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool:
        # As RedisStore.add_verdict.
        key, field = self.ekey(eid), "verdicts:" + version
        try:
            if self._cluster:
                await self.client.initialize()  # (see _run)
            async with self.client.pipeline(transaction=True) as pipe:
                async for _ in _acontended_tries():
                    try:
                        await pipe.watch(key)
                        new = self.verdict_update(version, verdict,
                                                  await pipe.hmget(key, "version", field))
                        if new is None:
                            await pipe.unwatch()
                            return False
                        pipe.multi()
                        pipe.hset(key, field, new)
                        await pipe.execute()
                        return True
                    except self._watch_error:
                        continue
        except self._errors as exc:
            return self.verdict_failed(exc)
        return self.verdict_failed(None)

    async def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult:
        res = await self._run(True, lambda p: self.queue_write(p, records, ttls, now, touch))
        return self.parse_write(res, len(records))

    async def delete(self, ids: Sequence[int]) -> int:
        return (await self.delete_logged(ids)).deleted

    async def delete_logged(self, ids: Sequence[int]) -> Cleared:
        if not ids:
            return Cleared(0)
        res = await self._run(True, lambda p: self.queue_delete(p, ids))
        return self.parse_delete_logged(len(ids), res)

    async def evict(self, max_entries: int | None, now: float,
                    logged: list[tuple[str, Sequence[int]]] | None = None
                    ) -> tuple[list[int], int]:
        gone = 0
        while True:
            first = (await self._run(False, lambda p: self.queue_expired(p, now),
                                     raise_on_error=True))[0]
            if not first:
                break
            done = await self._drop_expired(first, now)
            gone += done
            if len(first) < _EXPIRED_BATCH or done == 0:
                break
        evicted = [] if max_entries is None else await self._evict_lru(max_entries, logged)
        return evicted, gone

    async def _evict_lru(self, max_entries: int,
                         logged: list[tuple[str, Sequence[int]]] | None = None) -> list[int]:
        # As RedisStore._evict_lru.
        try:
            if self._cluster:
                await self.client.initialize()  # (see _run)
            async with self.client.pipeline(transaction=True) as pipe:
                for _ in range(_REFRESH_TRIES):
                    try:
                        over = int(await self.client.zcard(self.k_lru)) - max_entries
                        if over <= 0:
                            return []
                        first = await self.client.zrange(self.k_lru, 0, over - 1)
                        keys = self.victim_keys(first)
                        if not keys:
                            if first:
                                await self.client.zrem(self.k_lru, *first)
                            continue
                        await pipe.watch(*keys)
                        again = await pipe.zrange(self.k_lru, 0, over - 1)
                        if (int(await pipe.zcard(self.k_lru)) - max_entries < over
                                or not self.still_oldest(first, again)):
                            await pipe.unwatch()
                            continue
                        pipe.multi()
                        ids = self.queue_evict(pipe, first)
                        res = await pipe.execute(raise_on_error=False)
                        return self.parse_evict(ids, res, logged)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            raise self._failure(exc) from exc
        return []

    async def _drop_expired(self, first: Sequence[Any], now: float) -> int:
        # As RedisStore._drop_expired.
        try:
            if self._cluster:
                await self.client.initialize()  # (see _run)
            async with self.client.pipeline(transaction=True) as pipe:
                for _ in range(_REFRESH_TRIES):
                    try:
                        keys = self.expired_keys(first)
                        if not keys:  # (as RedisStore._drop_expired)
                            await self._run(False, lambda p: self.queue_drop_expired(p, first))
                            return len(first)
                        await pipe.watch(*keys)
                        drop = self.expired_to_drop(first, await pipe.zrangebyscore(
                            self.k_exp, "-inf", now, start=0, num=_EXPIRED_BATCH))
                        pipe.multi()
                        self.queue_drop_expired(pipe, drop)
                        await pipe.execute()
                        return len(drop)
                    except self._watch_error:
                        continue
        except self._errors as exc:
            raise self._failure(exc) from exc
        return 0

    async def _scan_keys(self) -> AsyncIterator[tuple[list[Any], Any]]:
        """See :meth:`RedisStore._scan_keys`."""
        if not self._cluster:
            async for keys in self._scan_with(self.client.scan, {}, None):
                yield keys, None
            return
        seen: set[Any] = set()
        try:
            owner = self.scan_owner()
            before = self.migration_target(
                await self.client.execute_command("CLUSTER NODES", target_nodes=owner))
        except self._errors as exc:
            raise self._failure(exc) from exc
        async for keys in self._scan_with(self.client.scan, {"target_nodes": owner}, seen):
            yield keys, None
        try:
            after = self.migration_target(
                await self.client.execute_command("CLUSTER NODES", target_nodes=owner))
        except self._errors as exc:
            raise self._failure(exc) from exc
        for to in dict.fromkeys(t for t in (before, after) if t is not None):
            node = self.client.get_node(host=to[0], port=to[1])
            if node is not None:
                async for keys in self._scan_with(self.client.scan, {"target_nodes": node},
                                                  seen):
                    yield keys, None
                continue
            import redis.asyncio

            kw = self.node_kwargs()
            kw.pop("response_callbacks", None)  # (a ClusterNode's own, not a connection's)
            kw.pop("max_connections", None)
            cls = kw.pop("connection_class", None)
            pool = redis.asyncio.ConnectionPool(
                host=to[0], port=to[1], **({"connection_class": cls} if cls else {}), **kw)
            direct = redis.asyncio.Redis(connection_pool=pool)
            try:
                async for keys in self._scan_with(direct.scan, {}, seen):
                    yield keys, direct
            finally:
                await direct.aclose()
                await pool.aclose()

    async def _scan_with(self, scan: Callable[..., Any], kw: dict[str, Any],
                         seen: set[Any] | None) -> AsyncIterator[list[Any]]:
        """See :meth:`RedisStore._scan_with`."""
        cursor = 0
        while True:
            try:
                raw, keys = await scan(cursor, match=self.k_entry + "*", count=_SCAN_COUNT,
                                       **kw)
            except self._errors as exc:
                raise self._failure(exc) from exc
            if seen is not None:
                keys = [k for k in keys if k not in seen]
                seen.update(keys)
            if keys:
                yield list(keys)
            cursor = self.scan_cursor(raw)
            if cursor == 0:
                break

    async def scan(self) -> AsyncIterator[list[Fetched]]:
        async for keys, via in self._scan_keys():
            ids = [self.entry_key_id(k) for k in keys]
            good = [i for i in ids if i is not None]
            bad: list[Fetched] = [Invalid(-1, f"bad key name {_id_text(k)!r}")
                                  for k, i in zip(keys, ids) if i is None]
            yield bad + (await self.fetch(good) if via is None
                         else await self._fetch_asking(via, good))

    async def _fetch_asking(self, direct: Any, ids: Sequence[int]) -> list[Fetched]:
        """See :meth:`RedisStore._fetch_asking`."""
        try:
            pipe = direct.pipeline(transaction=False)
            self.queue_asking(pipe, ids)
            res = list(await pipe.execute(raise_on_error=False))
        except self._errors as exc:
            raise self._failure(exc) from exc
        return self.parse_entries(ids, res[1::2])

    async def clear(self, scope_id: str | None) -> Cleared:
        # As RedisStore.clear: each deleted batch with its del event, nothing else logged.
        n, batches = await self._drop_scanned(*self.scope_filter(scope_id))
        return Cleared(n, tuple(pos for pos, _ in batches), tuple(batches))

    async def clear_within(self, fields: Mapping[str, Any]) -> int:
        # As RedisStore.clear_within.
        return (await self._drop_scanned("scope_json", lambda js: scope_holds(js, fields)))[0]

    async def _drop_scanned(self, field: str | None, wanted: Callable[[Any], bool],
                            ) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
        """See :meth:`RedisStore._drop_scanned`."""
        n, batches = 0, []
        async for keys, _ in self._scan_keys():
            if field is not None:
                values = await self._run(
                    False, lambda p, ks=keys: [p.hget(k, field) for k in ks])
                keys = [k for k, v in zip(keys, values) if wanted(v)]
            if keys:
                res = await self._run(True, lambda p, ks=keys: self.queue_drop(p, ks),
                                      raise_on_error=True)
                n += int(res[0])
                batches += self.dropped(keys, res)
        return n, batches

    async def log_head(self) -> str:
        res = await self._run(False, lambda p: p.xrevrange(self.k_log, "+", "-", count=1),
                              raise_on_error=True)
        if res[0]:
            return _id_text(res[0][0][0])
        # (as RedisStore.log_head)
        return _id_text((await self._run(False, self.queue_noop, raise_on_error=True))[0])

    async def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]:
        def q(p: Any) -> None:
            if dim is not None:
                p.hsetnx(self.k_meta, "format", "1")
                p.hsetnx(self.k_meta, "dim", str(int(dim)))
                p.hsetnx(self.k_meta, "embedder", embedder)
            p.hmget(self.k_meta, ["dim", "embedder"])

        res = await self._run(True, q, raise_on_error=True)
        return self.parse_meta(res[-1], dim, embedder)

    async def ref_secret(self) -> bytes:
        """See :meth:`RedisStore.ref_secret`."""
        res = await self._run(True, self.queue_ref_secret, raise_on_error=True)
        return self.parse_ref_secret(res[-1])

    async def lease(self, eid: int, token: str, seconds: float) -> bool:
        """See :meth:`RedisStore.lease`."""
        try:
            return self.parse_lease(
                await self._run(False, lambda p: self.queue_lease(p, eid, token, seconds)))
        except StoreError:
            return True

    async def lease_held(self, eid: int) -> bool:
        """See :meth:`RedisStore.lease_held`."""
        try:
            res = await self._run(False, lambda p: self.queue_held(p, eid))
        except StoreError:
            return False
        return _live_lease(res[0], res[1])

    async def fly(self, scope_id: str, eid: int, vector: Any, seconds: float, token: bytes
                  ) -> tuple[int, list[tuple[int, int, Any]]]:
        """See :meth:`RedisStore.fly`."""
        now = int(time.time() * 1000)
        value = self.flight_value(vector, now, seconds, token)
        key, field = self.fkey(scope_id), format_id(eid)
        try:
            res = await self._run(True, lambda p: self.queue_fly(p, scope_id, eid, value,
                                                                 seconds))
            flights = res[2]
            others, dead, own = self.parse_flights(flights, eid, len(vector), now)
            before = self.registered_before(res[0], others)
            for _ in range(3):  # (see RedisStore.fly)
                fix = self.flight_fixes(key, flights, dead, own, field, value, len(vector),
                                        now)
                if fix is None or await self._if_unchanged(
                        key, lambda p, f=fix[0]: p.hmget(key, f),  # type: ignore[misc]
                        lambda v, e=fix[1]: list(v) == e, fix[2]):  # type: ignore[misc]
                    break
                flights = await self.client.hgetall(key)
                others, dead, own = self.parse_flights(flights, eid, len(vector), now)
                if before is not None:
                    others = [o for o in others if o[1] in before]
            else:
                if self.parse_flight(await self.client.hget(key, field), len(vector),
                                     now) is None:
                    await self.client.hset(key, field, value)
        except StoreError:
            return now, []
        except self._quiet_errors as exc:  # (the WATCH of a fix)
            self._note_outage(exc)
            return now, others
        return now, others

    async def flights(self, scope_id: str, eid: int, dim: int
                      ) -> list[tuple[int, int, Any]]:
        """See :meth:`RedisStore.flights`."""
        try:
            raw = await self.client.hgetall(self.fkey(scope_id))
        except self._quiet_errors as exc:
            self._note_outage(exc)
            return []
        return self.parse_flights(raw, eid, dim, int(time.time() * 1000))[0]

    async def flight_alive(self, scope_id: str, eid: int, dim: int) -> bool:
        """See :meth:`RedisStore.flight_alive`."""
        try:
            value = await self.client.hget(self.fkey(scope_id), format_id(eid))
        except self._quiet_errors as exc:
            self._note_outage(exc)
            return False
        return self.parse_flight(value, dim, int(time.time() * 1000)) is not None

    async def land(self, scope_id: str, eid: int, token: bytes) -> None:
        """See :meth:`RedisStore.land`."""
        key, field = self.fkey(scope_id), format_id(eid)
        try:
            for _ in range(3):
                if await self._if_unchanged(key, lambda p: p.hget(key, field),
                                            lambda v: self.flight_owner(v) == token,
                                            lambda p: p.hdel(key, field)):
                    return
                if self.flight_owner(await self.client.hget(key, field)) != token:
                    return
            if self.flight_owner(await self.client.hget(key, field)) == token:
                await self.client.hdel(key, field)
        except self._quiet_errors as exc:
            self._note_outage(exc)

    async def mark_wait(self, tokens: Sequence[str], eid: int, seconds: float,
                        wait_id: str) -> None:
        """See :meth:`RedisStore.mark_wait`."""
        try:
            await self._run(False, lambda p: self.queue_mark_wait(p, tokens, eid, seconds,
                                                                  wait_id))
        except StoreError:
            pass

    async def unmark_wait(self, tokens: Sequence[str], eid: int, wait_id: str) -> None:
        try:
            await self._run(False, lambda p: self.queue_unmark_wait(p, tokens, eid, wait_id))
        except StoreError:
            pass

    async def waits_on(self, eid: int, tokens: frozenset[str]) -> bool:
        """See :meth:`RedisStore.waits_on`."""
        todo, seen = [eid], set()
        try:
            for _ in range(_WAIT_CHAIN):
                if not todo:
                    return False
                holder = self.lease_token(await self.client.get(self.lkey(todo.pop())))
                if holder is None or holder in seen:
                    continue
                if holder in tokens:
                    return True
                seen.add(holder)
                todo.extend(self.marked_ids(await self.client.smembers(self.wkey(holder))))
        except self._quiet_errors as exc:
            self._note_outage(exc)
        return False

    async def release(self, eid: int, token: str) -> None:
        """See :meth:`RedisStore.release`."""
        key = self.lkey(eid)
        try:
            await self._if_unchanged(key, lambda p: p.get(key),
                                     lambda v: self.holds(v, token), lambda p: p.delete(key))
        except self._quiet_errors as exc:
            self._note_outage(exc)

    async def close(self) -> None:
        if not self._owns:
            return
        here = asyncio.get_running_loop()
        clients = list(self._clients.items()) if self._clients is not None else [
            (here, self._client)]
        self._clients = None
        for loop, client in clients:
            if loop is here:
                try:
                    await client.aclose()
                except self._quiet_errors:
                    pass
                except RuntimeError:  # (a loop that has ended)
                    pass
            elif loop.is_running():  # another thread's loop: closed there
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            # (a loop that has ended took its connections with it)
