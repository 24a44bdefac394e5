"""Sliding TTLs: a hit extends an entry's life, in this process and in the others."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest
import redis

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.base import Record, Refresh, StoreError
from hnswcache.store.memory import MemoryStore
from hnswcache.store.redis import keys_for

from .cache_helpers import FakeClock, Paraphrases


def shared(store_url: str, ns: str) -> object:
    """A store two caches can share: the server's URL, or one MemoryStore object."""
    return MemoryStore(ns) if store_url == "memory" else store_url


def test_hits_extend_a_sliding_entry_and_it_expires_a_ttl_after_the_last(
    store_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    store = shared(store_url, ns)
    a = SemanticCache(px.embedder(), store=store, namespace=ns, clock=clock, threshold=0.5)
    b = SemanticCache(px.embedder(), store=store, namespace=ns, clock=clock, threshold=0.5,
                      sync_interval=0)
    a.set(px.q[0], "sliding", ttl=100, sliding=True)
    a.set(px.q[1], "fixed", ttl=100)
    assert b.get(px.q[0]) is not None  # b is warm: its replica holds both
    for _ in range(5):  # 300 s in all, three times the TTL
        clock.advance(60)
        hit = a.get(px.q[0]) or a.get(px.p[0])
        assert hit is not None and hit.response == "sliding"
        assert hit.expires_at == pytest.approx(clock() + 100)
    assert a.get(px.q[1]) is None, "an absolute TTL must not slide"
    # Another process: its exact tier reads the stored expiry, and its own index was
    # extended from the change log, so its semantic tier finds the entry too.
    clock.advance(90)
    hit = b.get(px.p[0])
    assert hit is not None and hit.tier == "semantic" and hit.response == "sliding"
    b.sync()
    # A new process warm-starts with the extended expiry.
    c = SemanticCache(px.embedder(), store=store, namespace=ns, clock=clock, threshold=0.5)
    assert c.get(px.p[0]) is not None
    c.sync()
    b.sync()
    # No hit for a whole TTL after the last one (b's, at +90): gone everywhere.
    clock.advance(100)
    for cache in (a, b, c):
        assert cache.get(px.q[0]) is None and cache.get(px.p[0]) is None
    for cache in (a, b, c):
        cache.close()


def test_each_hit_is_written_back_at_once_and_at_most_16_times_a_ttl(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    """The store holds a hit's later expiry when get() returns, so the exact tier of every
    process reads it: hits 0.6 TTL apart, alternating between two processes, never find
    the entry expired. (The write-back once rode the next read, after its HGETALL: the
    store trailed by two hits and the server deleted an entry hit every 0.6 TTL.)"""
    store = shared(store_url, ns)
    a = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    b = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    a.set("capital of france", "Paris", ttl=100, sliding=True)
    for i in range(6):
        clock.advance(60)
        hit = (a if i % 2 == 0 else b).get("capital of france")
        assert hit is not None and hit.tier == "exact" and hit.response == "Paris"
        assert hit.expires_at == pytest.approx(clock() + 100)
    assert a.stats()["expiries"] == 0 and b.stats()["expiries"] == 0
    # Hits every second for one TTL: a write-back only when it moves the expiry by 1/16
    # of the TTL. b counts the set events a logs.
    b.sync()
    before = b.stats()["sync_events"]
    for _ in range(100):
        clock.advance(1)
        assert a.get("capital of france") is not None
    b.sync()
    writes = b.stats()["sync_events"] - before
    assert 12 <= writes <= 16, writes
    a.close()
    b.close()


def test_a_late_refresh_never_extends_a_newer_write_nor_recreates_a_deleted_entry(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    """A refresh names the version that was hit and is checked against the store in the
    same transaction (WATCH, then MULTI/EXEC on a server)."""
    store = shared(store_url, ns)
    a = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    raw = None if store_url == "memory" else redis.Redis.from_url(store_url)
    k = keys_for(ns)

    def stored(key: str) -> Record:
        rec = a.store.fetch([int(key, 16)])[0]
        assert isinstance(rec, Record)
        return rec

    key = a.set("sliding question", "old answer", ttl=100, sliding=True)
    old = stored(key)
    clock.advance(50)
    late = Refresh(old.id, old.version, clock() + 100)  # a hit on it, not yet written
    a.set("sliding question", "new answer", ttl=10)  # replaced meanwhile
    assert a.store.refresh([late], clock()) == 0
    new = stored(key)
    assert new.response == "new answer" and new.expires == pytest.approx(clock() + 10)
    if raw is not None:  # nor the expiry index (a late score there hid it from eviction)
        assert raw.zscore(k["exp"], key) == pytest.approx(clock() + 10)
    clock.advance(20)
    assert a.get("sliding question") is None, "the refresh extended a newer write"
    # Deleted before the refresh lands: nothing is recreated (a hash without a TTL once was).
    key = a.set("another one", "x", ttl=100, sliding=True)
    gone = stored(key)
    assert a.delete(key)
    assert a.store.refresh([Refresh(gone.id, gone.version, clock() + 100)], clock()) == 0
    if raw is not None:
        assert not raw.exists(k["entry"] + key)
    fresh = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    assert fresh.get("another one") is None
    assert len(fresh) == 0 and fresh.stats()["invalid_entries"] == 0
    # The version held is extended.
    key = a.set("a third", "y", ttl=100, sliding=True)
    held = stored(key)
    assert a.store.refresh([Refresh(held.id, held.version, clock() + 150)], clock()) == 1
    assert stored(key).expires == pytest.approx(clock() + 150)
    if raw is not None:
        assert raw.zscore(k["exp"], key) == pytest.approx(clock() + 150)
        assert raw.pttl(k["entry"] + key) > 120_000
    for cache in (a, fresh):
        cache.close()


def test_a_refresh_whose_write_failed_is_written_later(ns: str, clock: FakeClock) -> None:
    class FailingOnce(MemoryStore):
        """The real memory store, whose next refresh write fails (a dropped connection)."""

        fail = 0

        def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
            if self.fail:
                self.fail -= 1
                raise StoreError("ConnectionError: connection reset")
            return super().refresh(refresh, now)

    store = FailingOnce(ns)
    cache = SemanticCache(HashEmbedder(16), store=store, namespace=ns, clock=clock)
    key = cache.set("q", "r", ttl=100, sliding=True)
    clock.advance(50)
    store.fail = 1
    hit = cache.get("q")
    assert hit is not None and hit.expires_at == pytest.approx(clock() + 100)
    assert cache.stats()["store_errors"] == 1
    assert store.fetch([int(key, 16)])[0].expires == pytest.approx(clock() + 50)  # type: ignore[union-attr]
    cache.sync()  # (or the next lookup): the kept refresh is written
    assert store.fetch([int(key, 16)])[0].expires == pytest.approx(clock() + 100)  # type: ignore[union-attr]
    other = SemanticCache(HashEmbedder(16), store=store, namespace=ns, clock=clock)
    clock.advance(90)
    assert other.get("q") is not None


def test_sliding_needs_a_ttl_and_the_default_ttl_can_slide(clock: FakeClock) -> None:
    cache = SemanticCache(HashEmbedder(16), store="memory", clock=clock)
    with pytest.raises(ValueError, match="ttl"):
        cache.set("p", "r", sliding=True)
    with pytest.raises(ValueError, match="ttl"):
        cache.cached(sliding=True)
    with pytest.raises(ValueError, match="ttl"):  # inf is no TTL: refused before any call
        cache.cached(ttl=math.inf, sliding=True)
    with_default = SemanticCache(HashEmbedder(16), store="memory", clock=clock, ttl=30)
    calls: list[str] = []

    @with_default.cached(sliding=True)
    def answer(prompt: str) -> str:
        calls.append(prompt)
        return "a"

    for _ in range(10):  # 200 s of hits every 20 s: never called again
        answer("the question")
        clock.advance(20)
    assert calls == ["the question"]
    clock.advance(31)
    answer("the question")
    assert len(calls) == 2, "it must expire a TTL after the last hit"


def test_async_sliding(clock: FakeClock) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(16), store="memory", clock=clock)
        await cache.set("p", "r", ttl=10, sliding=True)
        for _ in range(5):
            clock.advance(8)
            hit = await cache.get("p")
            assert hit is not None and hit.expires_at == pytest.approx(clock() + 10)
        clock.advance(10)
        assert await cache.get("p") is None
        with pytest.raises(ValueError):
            await cache.set("q", "r", sliding=True)
        await cache.close()

    asyncio.run(run())


def test_a_late_refresh_never_shortens_a_later_one(valkey_server, ns: str,
                                                   clock: FakeClock) -> None:
    # A refresh kept from a failed round trip and written late replaced the later expiry
    # another process had written meanwhile: the entry expired before a TTL after its last
    # hit. (The memory store already refused it.)
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    a = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=clock)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=clock)
    a.set("what is the capital of france", "Paris", ttl=100, sliding=True)  # expires t0+100
    clock.advance(20)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # b's write-back (until t0+120) fails and is kept
    try:
        assert b.get("what is the capital of france") is not None
    finally:
        r.config_set("maxmemory", "0")
        r.config_set("maxmemory-policy", policy)
    assert len(b._core.refreshes) == 1
    clock.advance(60)
    assert a.get("what is the capital of france") is not None  # writes until t0+180
    clock.advance(1)
    b.sync()  # b's kept refresh (t0+120) goes out now
    clock.advance(49)  # t0+130: 50 s after the last hit
    fresh = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=clock)
    for c in (a, b, fresh):
        hit = c.get("what is the capital of france")
        assert hit is not None and hit.response == "Paris"


def test_a_sliding_entry_dropped_from_the_bookkeeping_by_a_clock_ahead_comes_back(
        valkey_server, ns) -> None:
    """From a review: a process whose clock ran 5 s ahead took a live sliding entry for
    expired and dropped it from `exp` and `lru` (its key lived on); a hit refreshed the key
    but re-added it to neither set (ZADD XX), so it lived on outside the LRU for good: never
    counted by max_entries, never evicted (4 entries under a cap of 3)."""
    url = valkey_server.url
    k = keys_for(ns)
    r = redis.Redis.from_url(url)
    ca, cb = FakeClock(1_000_000.0), FakeClock(1_000_005.0)  # B's clock runs 5 s ahead
    a = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=ca, max_entries=3)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=cb, max_entries=3)
    key = a.set("hot sliding question", "hot", ttl=60, sliding=True)
    a.set("filler 0", "f0")
    a.set("filler 1", "f1")
    ca.advance(56)
    cb.advance(56)  # A: 4 s left; B thinks it expired 1 s ago
    b.set("b write 0", "b0")  # over the cap: B's housekeeping drops the "expired" entry
    assert r.zscore(k["lru"], key) is None
    hit = a.get("hot sliding question")
    assert hit is not None and hit.response == "hot"
    assert r.zscore(k["exp"], key) == 1_000_116.0 and r.zscore(k["lru"], key) == 1_000_056.0
    for j in range(1, 30):
        ca.advance(10)
        cb.advance(10)
        a.get("hot sliding question")
        b.set(f"b write {j}", f"b{j}")
    assert r.zcard(k["lru"]) == 3 and len(list(r.scan_iter(k["entry"] + "*"))) == 3
    for c in (a, b):
        c.close()


def test_a_hot_sliding_entry_hit_at_once_by_many_processes_raises_nothing(
    valkey_server, ns: str
) -> None:
    """Twelve strict caches hitting one sliding entry at the same moment contend for its
    WATCH: after three lost rounds a refresh was a StoreError (counted, raised by strict
    caches: 4 of 60 hits in a review) on a healthy server. Lost rounds now pause and retry;
    one lost for a second waits for the next hit, and is no error."""
    import threading

    # (the real clock: each hit's later expiry is later than the one just written, so
    # every contender still has a refresh to write after losing a round)
    caches = [SemanticCache(HashEmbedder(32), store=valkey_server.url, namespace=ns,
                            strict=True) for _ in range(12)]
    caches[0].set("hot question", "hot answer", ttl=1.6, sliding=True)
    for c in caches:
        c.sync()
    raised: list[BaseException] = []
    for _ in range(20):
        time.sleep(0.12)  # (> TTL/16: every hit moves the expiry enough to be written)
        bar = threading.Barrier(len(caches))

        def hit(c: SemanticCache, bar: threading.Barrier = bar) -> None:
            bar.wait()
            try:
                got = c.get("hot question")
                assert got is not None and got.response == "hot answer"
            except BaseException as exc:  # noqa: BLE001 (collected: the test asserts none)
                raised.append(exc)

        threads = [threading.Thread(target=hit, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert raised == [] and sum(c.stats()["store_errors"] for c in caches) == 0, raised[:2]
    r = redis.Redis.from_url(valkey_server.url)
    assert r.pttl(keys_for(ns)["entry"] + caches[0].get("hot question").key) > 0  # type: ignore[union-attr]
    for c in caches:
        c.close()


def test_a_hit_whose_lookup_is_cancelled_still_slides_its_entry(valkey_server, ns: str,
                                                                 clock: FakeClock) -> None:
    """A lookup cancelled while it wrote the pending refreshes dropped them (its own hit's,
    and other tasks'): the entry expired on its old schedule (a review of the async cache
    under cancellation). Now they are put back for the next call."""
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(32), store=valkey_server.url, namespace=ns,
                                   clock=clock)
        later = FakeClock(clock())
        reader = AsyncSemanticCache(HashEmbedder(32), store=valkey_server.url, namespace=ns,
                                    clock=later)
        hit_and_cancelled, lost = 0, []
        for k in range(40):
            prompt = f"sliding question {k}"
            await cache.set(prompt, "r", ttl=100, sliding=True)
            clock.advance(50)
            hits = cache.stats()["hits_exact"]
            task = asyncio.create_task(cache.get(prompt))
            for _ in range(k):
                await asyncio.sleep(0)
            if task.done() or not task.cancel():
                continue
            with pytest.raises(asyncio.CancelledError):
                await task
            if cache.stats()["hits_exact"] == hits:
                continue  # (cancelled before the hit)
            hit_and_cancelled += 1
            await cache.sync()  # (the next call: writes what is pending)
            later.t = clock() + 70  # (past the entry's first expiry, before the slid one)
            await reader.sync()
            if await reader.get(prompt) is None:
                lost.append(k)
        assert hit_and_cancelled
        assert lost == [], f"hit, then cancelled at these steps, and not extended: {lost}"
        await reader.close()
        await cache.close()

    asyncio.run(run())


def test_a_hit_that_brings_an_entry_into_the_replica_also_slides_it_there(
        valkey_server, ns: str, clock: FakeClock, paraphrases: Paraphrases) -> None:
    """A sliding entry written by another process and not yet read from the log: the
    exact hit that adds it to this replica must also give it the hit's later expiry, or
    a paraphrase asked after the first expiry misses here until the log is read."""
    px = paraphrases
    writer = SemanticCache(px.embedder(), store=valkey_server.url, namespace=ns, clock=clock,
                           threshold=0.5)
    reader = SemanticCache(px.embedder(), store=valkey_server.url, namespace=ns, clock=clock,
                           threshold=0.5, sync_interval=3600)  # (no log read after the first)
    reader.sync()
    writer.set(px.q[0], "r", ttl=100, sliding=True)
    clock.advance(60)
    hit = reader.get(px.q[0])  # exact: fetched, added here, and slid to now + 100
    assert hit is not None and hit.expires_at == pytest.approx(clock() + 100)
    clock.advance(60)  # past the first expiry, before the slid one
    hit = reader.get(px.p[0])
    assert hit is not None and hit.tier == "semantic" and hit.prompt == px.q[0]
    writer.close()
    reader.close()
