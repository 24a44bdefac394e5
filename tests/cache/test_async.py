"""The asyncio twin keeps the same promises (memory store and a real server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.server import EmbeddedServer

from .cache_helpers import FakeClock, Paraphrases, past_outage


@pytest.fixture(params=["memory", "valkey"])
def async_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue("valkey_server").url)


def test_async_tiers_ttl_scopes(
    async_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    px = paraphrases

    async def run() -> None:
        cache = AsyncSemanticCache(px.embedder(), store=async_url, namespace=ns, clock=clock)
        await cache.set(px.q[0], "a0", ttl=10, scope={"m": 1})
        await cache.aset_many([(px.q[i], f"a{i}") for i in range(1, 20)])
        hit = await cache.get(px.q[0], scope={"m": 1})
        assert hit is not None and hit.tier == "exact"
        hit = await cache.aget(px.p[0], scope={"m": 1})
        assert hit is not None and hit.tier == "semantic" and hit.response == "a0"
        assert await cache.get(px.p[0], scope={"m": 2}) is None
        hits = await cache.get_many([px.p[i] for i in range(1, 20)])
        assert sum(h is not None for h in hits) >= 14
        clock.advance(10)
        assert await cache.get(px.q[0], scope={"m": 1}) is None
        key = hits[0].key if hits[0] else (await cache.get(px.q[1])).key  # type: ignore[union-attr]
        assert await cache.delete(key)
        assert await cache.get(px.q[1]) is None or (await cache.get(px.q[1])).key != key  # type: ignore[union-attr]
        assert await cache.clear() in (18, 19)  # the expired one may not be purged yet
        s = cache.stats()
        assert s["hits_exact"] >= 1 and s["hits_semantic"] >= 1
        await cache.close()

    asyncio.run(run())


def test_async_decorator_and_concurrency(async_url: str, ns: str) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(32), store=async_url, namespace=ns)
        calls = []

        @cache.cached(ttl=60)
        async def llm(prompt: str) -> str:
            calls.append(prompt)
            await asyncio.sleep(0)
            return prompt.upper()

        assert await llm("hello there") == "HELLO THERE"
        results = await asyncio.gather(*(llm("hello there") for _ in range(20)))
        assert results == ["HELLO THERE"] * 20 and calls == ["hello there"]
        await asyncio.gather(*(cache.set(f"p{i}", f"r{i}") for i in range(30)))
        got = await asyncio.gather(*(cache.get(f"p{i}") for i in range(30)))
        assert [h.response for h in got] == [f"r{i}" for i in range(30)]  # type: ignore[union-attr]
        await cache.close()

    asyncio.run(run())



def test_async_lookup(async_url: str, ns: str) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(32), store=async_url, namespace=ns)
        vecs = np.eye(32, dtype=np.float32)
        key = await cache.set("first", "one", embedding=vecs[0])
        probe = (0.6 * vecs[0] + 0.8 * vecs[1]).astype(np.float32)  # similarity 0.6
        miss = await cache.alookup("probe", embedding=probe)
        assert miss.hit is None and miss.nearest_key == key
        assert miss.nearest_similarity == pytest.approx(0.6, abs=0.02) and not miss.near_miss
        both = await cache.lookup_many(["first", "probe"], embeddings=np.stack([vecs[0], probe]),
                                       threshold=0.5)
        assert both[0].hit is not None and both[0].nearest_similarity == 1.0
        assert both[1].hit is not None and both[1].hit.similarity == pytest.approx(0.6, abs=1e-5)
        await cache.close()

    asyncio.run(run())


def test_async_and_sync_share_one_server(valkey_server: EmbeddedServer, ns: str) -> None:
    url = valkey_server.url
    sync_cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns, threshold=0.5)
    sync_cache.set("written by the sync cache one two", "sync")

    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(32), store=url, namespace=ns, threshold=0.5)
        hit = await cache.get("written by the sync cache one two three")
        assert hit is not None and hit.response == "sync"
        await cache.set("written by the async cache", "async")
        await cache.close()

    asyncio.run(run())
    assert sync_cache.get("written by the async cache").response == "async"  # type: ignore[union-attr]


def test_async_server_down_is_a_miss(fresh_server: EmbeddedServer, ns: str) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(16), store=fresh_server.url, namespace=ns,
                                   timeout=0.3)
        await cache.set("p", "r")
        fresh_server.kill()
        assert await cache.get("p") is None
        await cache.set("q", "dropped")
        assert cache.stats()["store_errors"] >= 2
        fresh_server.start()
        past_outage(cache)
        assert (await cache.get("p")).response == "r"  # type: ignore[union-attr]
        await cache.close()

    asyncio.run(run())


def test_async_embedder_is_awaited(ns: str) -> None:
    class AsyncEmb:
        dim = 8

        async def __call__(self, texts: list[str]) -> np.ndarray:
            await asyncio.sleep(0)
            return np.ones((len(texts), 8), dtype=np.float32)

    async def run() -> None:
        cache = AsyncSemanticCache(AsyncEmb(), store="memory", namespace=ns)
        await cache.set("a", "b")
        hit = await cache.get("something else")
        assert hit is not None and hit.response == "b"

    asyncio.run(run())


def test_async_max_age(async_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
                       ) -> None:
    px = paraphrases

    async def run() -> None:
        cache = AsyncSemanticCache(px.embedder(), store=async_url, namespace=ns, clock=clock,
                                   threshold=0.5)
        await cache.set(px.q[0], "old")
        clock.advance(100)
        await cache.set(px.p[0], "new")
        hit = await cache.get(px.q[0], max_age=50)
        assert hit is not None and hit.tier == "semantic" and hit.response == "new"
        assert (await cache.get(px.q[0])).response == "old"  # type: ignore[union-attr]
        clock.advance(20)  # old: 120 s, new: 20 s
        assert (await cache.get_many([px.q[0]], max_age=10)) == [None]
        assert (await cache.get_many([px.q[0]], max_age=30))[0].response == "new"  # type: ignore[union-attr]
        calls: list[str] = []

        @cache.cached(max_age=5)
        async def answer(prompt: str) -> str:
            calls.append(prompt)
            return f"v{len(calls)}"

        assert await answer(px.q[5]) == "v1" and await answer(px.q[5]) == "v1"
        clock.advance(6)
        assert await answer(px.q[5]) == "v2" and len(calls) == 2
        with pytest.raises(ValueError):
            await cache.get(px.q[0], max_age=-1)
        await cache.close()

    asyncio.run(run())


def test_async_an_entry_set_after_a_clear_stays_in_the_semantic_tier(ns: str) -> None:
    # (As the sync test in test_cache.py.)
    rng = np.random.default_rng(1)
    base = rng.standard_normal(16).astype(np.float32)
    near = base + 0.05 * rng.standard_normal(16).astype(np.float32)

    async def run() -> None:
        cache = AsyncSemanticCache(None, store="memory", namespace=ns, threshold=0.9)
        await cache.set("seed", "x", embedding=rng.standard_normal(16).astype(np.float32))
        await cache.clear()
        await cache.set("What is the capital of France?", "Paris", embedding=base)
        for _ in range(2):
            hit = await cache.get("Capital city of France", embedding=near)
            assert hit is not None and hit.response == "Paris"
        assert len(cache) == 1

    asyncio.run(run())


def test_an_embedder_that_returns_a_coroutine(ns: str) -> None:
    # Only coroutine functions were awaited: a lambda (or wrapper) returning a coroutine ran
    # in a thread, and its coroutine failed as an array: every set was an embedding error.
    # A sync cache given one now says so instead of storing nothing.
    emb = HashEmbedder(32)

    async def embed(texts: list[str]) -> np.ndarray:
        return emb(texts)

    async def run() -> None:
        cache = AsyncSemanticCache(lambda texts: embed(texts), store="memory", namespace=ns)
        await cache.set("hello there", "hi")
        hit = await cache.get("hello there")
        assert hit is not None and hit.response == "hi"
        assert cache.stats()["embed_errors"] == 0

    asyncio.run(run())
    sync = SemanticCache(lambda texts: embed(texts), store="memory", namespace=ns)
    with pytest.raises(TypeError, match="AsyncSemanticCache"):
        sync.set("hello there", "hi")


def test_a_sentence_transformer_is_never_entered_by_two_threads() -> None:
    # The async cache embeds in worker threads; a Hugging Face fast tokenizer shared by
    # threads fails with "Already borrowed". A stand-in model that refuses to be entered
    # twice at once (as that tokenizer does) behind the adapter, under an async cache.
    import time as _time

    from hnswcache.embed import SentenceTransformerEmbedder

    class OneAtATime:
        inside = 0

        def get_sentence_embedding_dimension(self) -> int:
            return 16

        def encode(self, texts: list[str], **_: Any) -> np.ndarray:
            OneAtATime.inside += 1
            try:
                if OneAtATime.inside > 1:
                    raise RuntimeError("Already borrowed")
                _time.sleep(0.01)
                return HashEmbedder(16)(texts)
            finally:
                OneAtATime.inside -= 1

    emb = SentenceTransformerEmbedder(OneAtATime())

    async def run() -> None:
        cache = AsyncSemanticCache(emb, store="memory")
        await asyncio.gather(*(cache.set(f"question {i}", "a") for i in range(16)))
        assert cache.stats()["embed_errors"] == 0 and len(cache) == 16

    asyncio.run(run())


def test_an_async_cache_serves_a_second_event_loop(valkey_server: EmbeddedServer,
                                                     ns: str) -> None:
    """asyncio.run twice (notebook cells, a test per loop): the store's connections belong
    to the first loop, and every call on the second raised "Event loop is closed", even
    with strict off."""
    cache = AsyncSemanticCache(HashEmbedder(16), store=valkey_server.url, namespace=ns)

    async def first() -> None:
        await cache.set("what is the capital of france", "Paris")

    async def second() -> Any:
        return await cache.get("what is the capital of france")

    asyncio.run(first())
    hit = asyncio.run(second())
    assert hit is not None and hit.response == "Paris"
    assert cache.stats()["store_errors"] == 0
    asyncio.run(cache.close())


def test_the_documented_async_aliases_are_the_methods() -> None:
    """docs/cache.md lists them; `aclose` (the name asyncio code reaches for) was missing."""
    for alias, name in (("aget", "get"), ("aset", "set"), ("aget_many", "get_many"),
                        ("aset_many", "set_many"), ("alookup", "lookup"),
                        ("alookup_many", "lookup_many"), ("adelete", "delete"),
                        ("aclear", "clear"), ("afeedback", "feedback"), ("aclose", "close"),
                        ("async_sync", "sync")):
        assert getattr(AsyncSemanticCache, alias) is getattr(AsyncSemanticCache, name), alias


def test_two_live_event_loops_share_one_client_each(valkey_server: EmbeddedServer,
                                                    ns: str) -> None:
    """Calls from two running loops in turn (a server's loop and a worker's) made a new
    client, a new connection, at every switch (272 for 400 calls), none closed."""
    import threading

    import redis

    from hnswcache.store.redis import AsyncRedisStore

    before = redis.Redis.from_url(valkey_server.url).info("clients")["connected_clients"] - 1
    store = AsyncRedisStore.from_url(valkey_server.url, namespace=ns)
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=lp.run_forever, daemon=True) for lp in loops]
    for th in threads:
        th.start()
    try:
        for i in range(40):
            asyncio.run_coroutine_threadsafe(store.fetch([i + 1]), loops[i % 2]).result(10)
        admin = redis.Redis.from_url(valkey_server.url)
        assert store._clients is not None and len(store._clients) == 2
        asyncio.run_coroutine_threadsafe(store.close(), loops[0]).result(10)
        time.sleep(0.2)  # (the other loop's client closes on its own loop)
        assert admin.info("clients")["connected_clients"] <= 1 + before
        admin.close()
    finally:
        for lp in loops:
            lp.call_soon_threadsafe(lp.stop)
        for th in threads:
            th.join(10)


def test_one_async_cache_serves_event_loops_in_turn(valkey_server, ns: str) -> None:
    """The cache's asyncio locks were made once and bound to the first loop that waited on
    one: in a second asyncio.run(), 19 of 20 concurrent @cached calls raised "bound to a
    different event loop" (and judges' verdicts were dropped)."""
    url = valkey_server.url
    # (threshold near 1: the prompts differ by a number, which the hash embedder barely sees)
    cache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.999)
    calls = 0

    @cache.cached(coalesce=False)
    async def llm(prompt: str) -> str:
        nonlocal calls
        calls += 1
        return "answer to " + prompt

    async def session(tag: str) -> list[Any]:
        other = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        await other.set_many([(f"{tag} other {i}", "x") for i in range(200)])  # (a log to
        # apply: the calls below wait on the cache's lock for it)
        out = await asyncio.gather(*(llm(f"{tag} question number {i}") for i in range(20)),
                                   return_exceptions=True)
        await other.close()
        return out

    for tag in ("a", "b", "c"):
        out = asyncio.run(session(tag))
        assert out == [f"answer to {tag} question number {i}" for i in range(20)], tag
    assert calls == 60

    assert asyncio.run(llm("b question number 3")) == "answer to b question number 3"
    assert calls == 60  # (a hit, in a fourth loop)
    asyncio.run(cache.close())


def test_the_async_warm_start_indexes_the_entries_off_the_event_loop(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """The warm start builds the replica in a worker thread: other coroutines run while the
    entries are indexed (the loop was blocked for each batch: 4.3 of a 4.9 s warm start of
    30k entries in a review)."""
    url = valkey_server.url
    writer = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    writer.set_many([(f"question number {i} about topic {i % 97}", f"answer {i}")
                     for i in range(3000)])
    writer.close()

    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(32), store=url, namespace=ns)
        core = cache._core
        real_load = core.load
        loading = [0]
        ticks_while_loading = [0]

        def load(batch: Any) -> None:  # the real load, marked while it runs
            loading[0] += 1
            try:
                real_load(batch)
            finally:
                loading[0] -= 1

        core.load = load  # type: ignore[method-assign]
        stop = False

        async def ticker() -> None:
            while not stop:
                if loading[0]:
                    ticks_while_loading[0] += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        hit = await cache.get("question number 7 about topic 7")
        stop = True
        await t
        assert hit is not None and hit.response == "answer 7"
        assert ticks_while_loading[0] > 0
        await cache.close()

    asyncio.run(run())


def test_a_client_or_store_of_the_wrong_kind_is_refused_at_construction(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """Each cache refuses the other kind's client or store when it is built: accepted, every
    call raised TypeError from inside the store, even with strict=False."""
    import redis
    import redis.asyncio

    from hnswcache.store.redis import AsyncRedisStore, RedisStore

    url = valkey_server.url
    sync_client = redis.Redis.from_url(url)
    with pytest.raises(TypeError, match="synchronous client"):
        AsyncSemanticCache(HashEmbedder(32), store=sync_client, namespace=ns)
    with pytest.raises(TypeError, match="synchronous client"):
        AsyncRedisStore(sync_client, namespace=ns)

    async def run() -> None:
        async_client = redis.asyncio.Redis.from_url(url)
        with pytest.raises(TypeError, match="asyncio client"):
            SemanticCache(HashEmbedder(32), store=async_client, namespace=ns)
        with pytest.raises(TypeError, match="asyncio client"):
            RedisStore(async_client, namespace=ns)
        with pytest.raises(TypeError, match="AsyncSemanticCache"):
            SemanticCache(HashEmbedder(32), store=AsyncRedisStore(async_client, namespace=ns),
                          namespace=ns)
        # The right kinds still work.
        cache = AsyncSemanticCache(HashEmbedder(32), store=async_client, namespace=ns)
        await cache.set("a question", "an answer")
        assert (await cache.get("a question")) is not None
        await cache.close()
        await async_client.aclose()

    asyncio.run(run())
    cache = SemanticCache(HashEmbedder(32), store=sync_client, namespace=ns)
    assert cache.get("a question") is not None
    cache.close()
    sync_client.close()


def test_len_and_stats_during_the_async_warm_start_do_not_raise() -> None:
    """The warm start indexes in a worker thread while the loop serves: len() and stats()
    iterated the scopes' dict as it grew ('dictionary changed size during iteration', 165
    of 886 polls in a review)."""
    from hnswcache.store.memory import MemoryStore

    store = MemoryStore("ns")
    writer = SemanticCache(HashEmbedder(8), store=store, namespace="ns")
    for s in range(3000):
        writer.set_many([(f"q {s} {j}", "a") for j in range(3)], scope={"s": s})

    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(8), store=store, namespace="ns")
        errors: list[str] = []
        polls = [0]
        stop = False

        async def poll() -> None:
            while not stop:
                try:
                    len(cache)
                    cache.stats()
                except Exception as e:  # noqa: BLE001 - what the test looks for
                    errors.append(repr(e))
                polls[0] += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(poll())
        hit = await cache.get("q 7 1", scope={"s": 7})
        stop = True
        await t
        assert hit is not None and polls[0] > 0
        assert errors == [], errors[:3]
        assert len(cache) == 9000
        await cache.close()

    asyncio.run(run())


def test_more_concurrent_calls_than_pooled_connections_wait_for_one(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """redis-py 8's pool has 100 connections and raised MaxConnectionsError at the 101st,
    which the store took for an outage: 150 concurrent gets of a stored prompt gave 50
    store errors and then a second of misses (and @cached calls left their leases). Calls
    beyond the pool now wait for a connection, and pool exhaustion is not an outage."""
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        await cache.set("what is the capital of france", "Paris")
        hits = await asyncio.gather(
            *(cache.get("what is the capital of france") for _ in range(400)))
        assert all(h is not None and h.response == "Paris" for h in hits)
        keys = await asyncio.gather(*(cache.set(f"question {i} here", "a") for i in range(400)))
        assert len(set(keys)) == 400
        assert cache.stats()["store_errors"] == 0 and cache.store.outage_left == 0
        await cache.sync()
        assert len(cache) == 401
        await cache.close()

    asyncio.run(run())


def test_pool_exhaustion_is_not_an_outage(valkey_server: EmbeddedServer, ns: str) -> None:
    """Also for a caller's own client with a small pool: its MaxConnectionsError (or a
    blocking pool's wait running out) is a failed call, not a down server."""
    import redis.asyncio

    async def run() -> None:
        client = redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool.from_url(
            valkey_server.url, max_connections=2))
        cache = AsyncSemanticCache(HashEmbedder(64), store=client, namespace=ns)
        await cache.set("what is the capital of france", "Paris")
        await asyncio.gather(*(cache.get("what is the capital of france") for _ in range(50)))
        assert cache.stats()["store_errors"] > 0  # (this client's own pool ran out)
        assert cache.store.outage_left == 0  # ... but the server is up
        assert (await cache.get("what is the capital of france")) is not None
        await cache.close()
        await client.aclose()

    asyncio.run(run())


def test_a_cancelled_call_ends_cancelled_even_when_redis_py_swallowed_it(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """Python 3.11's asyncio.wait_for (redis-py wraps each send in one when a socket
    timeout is set, as the store does) drops a cancel that arrives as the send ends: a
    cancelled get() returned its hit for most cancel points, and a @cached call under
    asyncio.timeout() ran its whole LLM call (a review: 6 of 30)."""
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        await cache.set("a stored question", "yes")
        returned = []
        for k in range(16):
            task = asyncio.create_task(cache.get("a stored question"))
            for _ in range(k):
                await asyncio.sleep(0)
            if task.done() or not task.cancel():
                continue
            try:
                await task
                returned.append(k)
            except asyncio.CancelledError:
                pass
        assert returned == [], f"cancelled at these steps, the get returned: {returned}"
        llm_calls_ended = 0

        @cache.cached(name="ask")
        async def ask(prompt: str) -> str:
            nonlocal llm_calls_ended
            await asyncio.sleep(0.5)  # the model
            llm_calls_ended += 1
            return "answer"

        await ask("warm up")
        overran = 0
        for i in range(30):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.0002 + 0.0001 * i):
                    await ask(f"question number {i}")
            overran += time.monotonic() - t0 > 0.25
        assert overran == 0 and llm_calls_ended == 1
        await cache.close()

    asyncio.run(run())


def test_a_warm_start_outlives_the_requests_that_time_out_waiting_for_it(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """The warm start ran in the caller's task and a cancelled one was thrown away: with
    every request under a timeout shorter than the warm start, the cache never loaded
    (a review: 15 requests, 0 hits). It is now a task the requests wait for."""
    async def run() -> None:
        writer = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        for s in range(0, 8000, 2000):
            await writer.set_many([(f"stored question {i} text", f"a{i}")
                                   for i in range(s, s + 2000)])
        await writer.close()
        probe = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        t0 = time.monotonic()
        await probe.sync()
        full = time.monotonic() - t0
        await probe.close()
        cache = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        timed_out, answered = 0, 0
        for i in range(12):
            try:
                async with asyncio.timeout(full / 3):
                    hit = await cache.get(f"stored question {i} text")
                    answered += hit is not None and hit.response == f"a{i}"
            except TimeoutError:
                timed_out += 1
        assert timed_out >= 1 and answered >= 12 - 6, (timed_out, answered, full)
        assert len(cache) == 8000
        await cache.close()

    asyncio.run(run())


def test_a_close_cut_short_is_finished_by_the_next(tmp_path: Any, ns: str) -> None:
    """close() under a shutdown timeout: the second close() returned at once (the first
    had set the flag), leaving the embedded server running and no snapshot saved."""
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(64), data_dir=tmp_path, namespace=ns)
        await cache.set_many([(f"question number {i} here", "a") for i in range(3000)])
        server = cache._server
        assert server is not None and server.running
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cache.close(), 0.001)
        await cache.close()
        assert not server.running
        assert cache.stats()["snapshots_saved"] == 1

    asyncio.run(run())


def test_lookups_waiting_for_a_warm_start_that_close_cancels_get_misses(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """close() cancels a warm start nobody else will finish; the lookups waiting for it
    were not cancelled themselves and get a miss (a CancelledError there reads, to a
    TaskGroup or a request handler, as their own cancellation)."""
    async def run() -> None:
        writer = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        await writer.set_many([(f"stored question {i}", "a") for i in range(10)])
        await writer.close()
        cache = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        # The warm start is held in its first read until close() cancels it. (It used to be
        # 8,000 entries still loading 20 ms later: 1 run in 6 had loaded them by then.)
        entered = asyncio.Event()
        log_head = cache.store.log_head

        async def held() -> str:
            entered.set()
            await asyncio.Event().wait()
            return await log_head()

        cache.store.log_head = held  # type: ignore[method-assign]
        waiting = [asyncio.create_task(cache.get(f"stored question {i}")) for i in range(3)]
        await entered.wait()
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in waiting)
        await cache.close()
        assert await asyncio.gather(*waiting) == [None, None, None]
        done = AsyncSemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
        assert (await done.get("stored question 5")) is not None
        assert not done._warmups  # (an ended warm start holds no event loop)
        await done.close()

    asyncio.run(run())


def test_lookup_says_the_given_embedding_it_searched_with(ns: str) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(16), store="memory", namespace=ns)
        await cache.set("a stored question", "a")
        v = np.ones(16, dtype=np.float32)
        miss = await cache.lookup("another question", embedding=v)
        assert miss.hit is None and miss.embedding is not None
        np.testing.assert_allclose(miss.embedding, v / 4.0, rtol=1e-6)
        exact = await cache.lookup("a stored question", embedding=v)
        assert exact.hit is not None and exact.hit.tier == "exact" and exact.embedding is None
        await cache.close()

    asyncio.run(run())


def test_no_lookup_repairs_the_replica_while_an_insert_runs_in_a_worker_thread(ns: str) -> None:
    """While a snapshot is written the async cache inserts into its replica in a worker
    thread; a lookup on the loop's thread must not repair the replica meanwhile (its
    changes are not yet counted: ``CacheCore.gen``). The guard, held open in that thread."""
    import threading

    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(16), store="memory", namespace=ns)
        await cache.set("a question", "an answer")
        core = cache._core
        gen = core.gen
        assert core.repairable((12345,), gen)  # nothing changed since: a repair may go on
        started, release = threading.Event(), threading.Event()

        def slow_insert() -> None:
            started.set()
            release.wait(10)

        cache._saving = True  # (as while a snapshot is written)
        task = asyncio.create_task(cache._insert(slow_insert))
        assert await asyncio.to_thread(started.wait, 10)
        assert core.offloaded == 1 and not core.repairable((12345,), gen)
        release.set()
        await task
        cache._saving = False
        assert core.offloaded == 0 and core.repairable((12345,), gen)
        await cache.close()

    asyncio.run(run())


def test_clear_s_re_read_does_not_bring_back_an_entry_deleted_meanwhile(
        valkey_server: EmbeddedServer, ns: str) -> None:
    """clear() reads again what its pass left in the replica (entries written meanwhile);
    an entry deleted while that read was under way stays out of the replica (the read
    is a repair, guarded as lookups' are: ``CacheCore.gen``). Unguarded, it came back."""
    async def run() -> None:
        scope = {"t": "a"}
        cache = AsyncSemanticCache(HashEmbedder(32), store=valkey_server.url, namespace=ns)
        await cache.set("question a", "a", scope=scope)
        real_clear, real_fetch = cache.store.clear, cache.store.fetch
        entered, release, keys = asyncio.Event(), asyncio.Event(), []

        async def held_fetch(ids: Any) -> Any:  # the re-read, held once it has read
            cache.store.fetch = real_fetch  # type: ignore[method-assign]
            out = await real_fetch(ids)
            entered.set()
            await release.wait()
            return out

        async def clear_then_write(sid: Any) -> Any:  # a write right after the pass
            res = await real_clear(sid)
            keys.append(await cache.set("question y", "y", scope=scope))
            cache.store.fetch = held_fetch  # type: ignore[method-assign]
            return res

        cache.store.clear = clear_then_write  # type: ignore[method-assign]
        task = asyncio.create_task(cache.clear(scope))
        await asyncio.wait_for(entered.wait(), 10)
        eid = int(keys[0], 16)
        assert eid in cache._core.where
        assert await cache.delete(keys[0])
        assert eid not in cache._core.where
        release.set()
        await task
        assert eid not in cache._core.where
        assert cache._core.held_in(None) == []
        assert await cache.get("question y", scope=scope) is None
        await cache.close()

    asyncio.run(run())
