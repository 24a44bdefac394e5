"""Sliding TTLs: a hit extends an entry's life, in this process and in the others."""

from __future__ import annotations

import asyncio

import pytest

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.memory import MemoryStore

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
    a.sync()  # write the last refresh back (any later read of a would too)
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


def test_a_refresh_never_extends_a_newer_write_nor_revives_a_deleted_entry(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    store = shared(store_url, ns)
    a = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    b = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    a.set("sliding question", "old answer", ttl=100, sliding=True)
    clock.advance(50)
    assert a.get("sliding question") is not None  # a refresh is now pending in a
    b.set("sliding question", "new answer", ttl=10)  # replaced before a writes it back
    a.sync()
    clock.advance(20)
    assert a.get("sliding question") is None, "the refresh extended a newer write"
    assert b.get("sliding question") is None
    # Deleted before the refresh lands: it stays deleted, and what the refresh leaves behind
    # is neither an entry nor counted as garbage.
    key = a.set("another one", "x", ttl=100, sliding=True)
    clock.advance(50)
    assert a.get("another one") is not None
    assert b.delete(key)
    a.sync()
    assert a.get("another one") is None and b.get("another one") is None
    fresh = SemanticCache(HashEmbedder(64), store=store, namespace=ns, clock=clock)
    assert fresh.get("another one") is None
    assert len(fresh) == 0 and fresh.stats()["invalid_entries"] == 0
    for cache in (a, b, fresh):
        cache.close()


def test_sliding_needs_a_ttl_and_the_default_ttl_can_slide(clock: FakeClock) -> None:
    cache = SemanticCache(HashEmbedder(16), store="memory", clock=clock)
    with pytest.raises(ValueError, match="ttl"):
        cache.set("p", "r", sliding=True)
    with pytest.raises(ValueError, match="ttl"):
        cache.cached(sliding=True)
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
