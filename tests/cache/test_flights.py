"""Cross-process coalescing of paraphrases (the scope's calls in flight), against a real
server. Two or three caches in one process stand for processes: each has its own
in-process registry, and they meet only through the server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.redis import RedisStore

pytestmark = pytest.mark.server

P0 = "what is the boiling point of water at sea level"
P1 = "what is the boiling point of water at sea level please"
P2 = "please what is the boiling point of water at sea level"
Q = "tell me a joke about cats and dogs"


def caches(url: str, ns: str, n: int) -> list[SemanticCache]:
    return [SemanticCache(HashEmbedder(64), store=url, namespace=ns) for _ in range(n)]


def run_all(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@contextlib.contextmanager
def busy_scope(url: str, key: str) -> Iterator[None]:
    """Another client touching the scope's flight hash (PEXPIRE) as fast as it can: every
    WATCH on the hash fails meanwhile, as in a scope where calls keep registering."""
    stop = threading.Event()

    def churn() -> None:
        other = redis.Redis.from_url(url)
        while not stop.is_set():
            other.pexpire(key, 600_000)

    th = threading.Thread(target=churn)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def flight_fields(r: redis.Redis, ns: str) -> list[bytes]:
    return [f for k in r.keys(f"hc:{{{ns}}}:flight:*") for f in r.hkeys(k)]


def test_one_wait_limit_for_both_waits(valkey_server, ns):
    """A paraphrase's call waits for other processes at most ``wait`` in all: the wait for
    another call in flight and then for its own prompt's lease share the limit (each had a
    whole one: b called 1.9 s after it started, with wait=1). a asks P0 and calls for 3 s;
    b and d ask P1 (one entry: d waits on b's lease once both gave up on a)."""
    a, b, d = caches(valkey_server.url, ns, 3)
    called: dict[str, float] = {}
    started: dict[str, float] = {}

    def run(cache: SemanticCache, tag: str, prompt: str, delay: float) -> None:
        @cache.cached(wait=1.0, name="f")
        def ask(p: str) -> str:
            called[tag] = time.monotonic()
            time.sleep(3)
            return "answer " + tag

        time.sleep(delay)
        started[tag] = time.monotonic()
        ask(prompt)

    threads = [threading.Thread(target=run, args=args) for args in
               ((a, "a", P0, 0.0), (b, "b", P1, 0.2), (d, "d", P1, 0.3))]
    run_all(threads)
    late = {t: called[t] - started[t] for t in called if t != "a"}
    assert late and max(late.values()) < 1.5, late


def test_land_deletes_only_its_own_flight(valkey_server, ns):
    """A call that outlives its wait may find its flight replaced by another process's (its
    deadline passed): ending, it must not delete that one, whose paraphrases then call
    themselves. Three calls were made here; now the paraphrase waits for b's answer."""
    url = valkey_server.url
    a, b, c = caches(url, ns, 3)
    calls: list[str] = []

    def make(cache: SemanticCache, wait: float, seconds: float, answer: bool = True) -> Any:
        @cache.cached(wait=wait, name="f")
        def ask(p: str) -> str | None:
            calls.append(p)
            time.sleep(seconds)
            return "answer to " + p if answer else None
        return ask

    ta = threading.Thread(target=make(a, 0.5, 2.0, answer=False), args=(P0,))
    ta.start()
    time.sleep(0.8)  # a still calls; its flight and lease are past their 0.5 s
    tb = threading.Thread(target=make(b, 30, 3.0), args=(P0,))
    tb.start()
    time.sleep(0.3)
    ta.join()  # a ends: its flight (now b's) must stay
    assert len(flight_fields(redis.Redis.from_url(url), ns)) == 1 and tb.is_alive()
    assert make(c, 30, 0.1)(P1) == "answer to " + P0
    tb.join()
    assert calls == [P0, P0]  # a's and b's; none for the paraphrase


def test_long_dead_flights_are_deleted(valkey_server, ns):
    """Fields of processes that died (deadline long past) are deleted by the next call that
    reads them, instead of being read by every miss for as long as the scope is busy."""
    r = redis.Redis.from_url(valkey_server.url)
    (cache,) = caches(valkey_server.url, ns, 1)

    seen: list[bytes] = []

    @cache.cached(wait=5, name="f")
    def ask(p: str) -> str:
        seen.extend(r.keys(f"hc:{{{ns}}}:flight:*"))  # (the key, while this call flies)
        return "x"

    ask("how many legs does a spider have")
    key = seen[0]
    vec = cache._embed([P0], None)
    assert vec is not None
    now = int(time.time() * 1000)
    for i in range(50):
        r.hset(key, f"{i + 1:016x}",
               RedisStore.flight_value(vec[0], now - 30_000, 1.0, b"d" * 16))
    assert ask("the tallest mountain of africa") == "x"  # a miss: it reads the flights
    assert cache.stats()["hits"] == 0 and r.hlen(key) == 0


def test_async_cancelled_call_withdraws_its_flight(valkey_server, ns):
    """A call cancelled right after its flight was registered (the reply not yet read) must
    not leave it for its wait: a paraphrase would wait for it (2.8 s of a 3 s wait)."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    calls: list[str] = []

    async def run() -> float:
        a = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        b = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        real_fly = a.store.fly  # type: ignore[attr-defined]

        async def slow_reply(*args: Any) -> Any:
            got = await real_fly(*args)
            await asyncio.sleep(0.5)  # registered on the server; cancelled meanwhile
            return got

        a.store.fly = slow_reply  # type: ignore[attr-defined]

        async def llm(p: str) -> str:
            calls.append(p)
            return "answer to " + p

        task = asyncio.create_task(a.cached(wait=3, name="f")(llm)(P0))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert flight_fields(r, ns) == []
        t0 = time.monotonic()
        assert await b.cached(wait=3, name="f")(llm)(P1) == "answer to " + P1
        took = time.monotonic() - t0
        await a.close()
        await b.close()
        return took

    assert asyncio.run(run()) < 1.0
    assert calls == [P1]


def test_no_cycle_through_a_paraphrase_follower(valkey_server, ns):
    """Y's call for P2 asks Q from inside; X's call for Q asks P1 from inside; X's call for
    P0 follows Y's P2 across processes, and X's inner P1 (a paraphrase of P0) would join it
    in-process: each waits on the next, until the wait limit (3.4 s with wait=3). A call
    made from inside another must not join a call that waits on another process."""
    x, y = caches(valkey_server.url, ns, 2)
    t0 = time.monotonic()

    def make(cache: SemanticCache) -> Any:
        @cache.cached(wait=3.0, name="f")
        def f(p: str) -> str:
            time.sleep(0.3)
            if cache is y and p == P2:
                f(Q)
            if cache is x and p == Q:
                f(P1)
            return "answer to " + p
        return f

    fx, fy = make(x), make(y)
    runs = [(fy, P2, 0.0), (fx, Q, 0.05), (fx, P0, 0.1)]
    threads = [threading.Thread(target=lambda f=f, p=p, d=d: (time.sleep(d), f(p)))
               for f, p, d in runs]
    run_all(threads)
    assert time.monotonic() - t0 < 2.0


def test_a_forged_flight_cannot_hand_over_an_unrelated_answer(valkey_server, ns):
    """A flight whose vector matches the prompt but whose entry is another question's
    (forged, or an entry written with another embedding): its answer is not taken."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    (cache,) = caches(url, ns, 1)
    other = cache.set(Q, "an unrelated answer", scope={"fn": "f"})
    vec = cache._embed([P0], None)
    assert vec is not None
    calls: list[str] = []

    @cache.cached(wait=2, name="f")
    def ask(p: str) -> str:
        calls.append(p)
        return "fresh"

    sid = cache._core.key(P0, {"fn": "f"})[1]
    now = int(time.time() * 1000)
    r.hset(f"hc:{{{ns}}}:flight:{sid}", other,
           RedisStore.flight_value(vec[0], now - 1000, 0.3, b"f" * 16))
    assert ask(P0) == "fresh" and calls == [P0]
    assert cache.stats()["coalesced"] == 0


# Found by the second review of the feature (each failed on the code it reviewed).
U = "name the largest planet in the solar system"
W = "who wrote the novel war and peace"


def test_lease_taken_after_following_lives_its_whole_wait(valkey_server, ns):
    """b followed a's call (which failed at 1.9 s), then leads with 0.1 s of its wait left:
    its lease must still live its whole wait, or d, asking the same prompt at 2.3 s, does
    not wait for b and calls too."""
    a, b, d = caches(valkey_server.url, ns, 3)
    called: list[str] = []

    def run(cache: SemanticCache, tag: str, prompt: str, delay: float, seconds: float,
            fail: bool) -> None:
        @cache.cached(wait=2.0, name="f")
        def ask(p: str) -> str:
            called.append(tag)
            time.sleep(seconds)
            if fail:
                raise ValueError("the LLM is down")
            return "answer " + tag

        time.sleep(delay)
        try:
            ask(prompt)
        except ValueError:
            pass

    threads = [threading.Thread(target=run, args=args) for args in
               ((a, "a", P0, 0.0, 1.9, True), (b, "b", P1, 0.1, 1.0, False),
                (d, "d", P1, 2.3, 0.1, False))]
    run_all(threads)
    assert called == ["a", "b"]


def test_no_cycle_through_a_lease_wait_and_a_join_from_inside(valkey_server, ns):
    """A: V (prompt U) holds U's lease and asks W inside. B: W holds W's lease and asks U
    inside, which would join B's plain call F of U in-process, while F waits on U's lease
    (held by V): V -> W -> F -> V, until the wait limit (3.5 s with wait=3)."""
    a, b = caches(valkey_server.url, ns, 2)
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def make(cache: SemanticCache) -> Any:
        @cache.cached(wait=3.0, name="f")
        def f(p: str) -> str:
            time.sleep(0.4)
            if cache is a and p == U:
                f(W)
            if cache is b and p == W:
                f(U)
            return "answer to " + p
        return f

    fa, fb = make(a), make(b)

    def go(tag: str, f: Any, p: str, delay: float) -> None:
        time.sleep(delay)
        f(p)
        done[tag] = time.monotonic() - t0

    threads = [threading.Thread(target=go, args=args) for args in
               (("V", fa, U, 0.0), ("W", fb, W, 0.1), ("F", fb, U, 0.2))]
    run_all(threads)
    assert max(done.values()) < 2.0, done


def test_no_cycle_when_gathered_tasks_share_a_call(valkey_server, ns):
    """Tasks gathered inside one call share its flight, so one sibling's wait could hide
    another's join of a follower from the check (then the cycle held until the wait
    limit): joins from inside are counted on the flight they join instead."""
    url = valkey_server.url
    p2 = np.asarray(HashEmbedder(64)([P2]))[0]
    p2 = p2 / np.linalg.norm(p2)

    async def run() -> float:
        a = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        b = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        real_fly = a.store.fly  # type: ignore[attr-defined]

        async def slow_fly(*args: Any) -> Any:
            got = await real_fly(*args)
            if float(args[2] @ p2) > 0.999:
                await asyncio.sleep(0.4)  # P2's call registers; siblings join it meanwhile
            return got

        a.store.fly = slow_fly  # type: ignore[attr-defined]
        t0 = time.monotonic()

        def make(cache: AsyncSemanticCache) -> Any:
            @cache.cached(wait=3.0, name="f")
            async def f(p: str) -> str:
                if cache is b and p == P0:
                    await asyncio.sleep(0.3)
                    await f(Q)
                elif cache is a and p == Q:
                    await asyncio.sleep(0.15)
                    await asyncio.gather(f(P1), f(W))
                elif cache is a and p == W:
                    await asyncio.sleep(0.2)
                else:
                    await asyncio.sleep(0.1)
                return "answer to " + p
            return f

        fa, fb = make(a), make(b)

        async def after(delay: float, coro: Any) -> Any:
            await asyncio.sleep(delay)
            return await coro

        await asyncio.gather(after(0.0, fb(P0)), after(0.05, fa(Q)), after(0.1, fa(P2)),
                             after(0.1, fa(W)))
        took = time.monotonic() - t0
        await a.close()
        await b.close()
        return took

    assert asyncio.run(run()) < 2.0


def test_a_follower_hands_a_paraphrase_answer_only_to_its_own_paraphrases(valkey_server, ns):
    """J joins F in-process (similarity 0.87), F follows Y across processes (0.87), but J
    and Y are 0.5 apart: J must not get Y's answer (a two-step match is no match)."""
    from .cache_helpers import TableEmbedder

    c30, s30 = np.cos(np.pi / 6), np.sin(np.pi / 6)
    vecs = np.zeros((3, 16), np.float32)
    vecs[0, 0] = 1
    vecs[1, 0], vecs[1, 1] = c30, s30
    vecs[2, 0], vecs[2, 1] = 0.5, c30
    emb = TableEmbedder(["question Y", "question F", "question J"], vecs)
    a = SemanticCache(emb, store=valkey_server.url, namespace=ns)
    b = SemanticCache(emb, store=valkey_server.url, namespace=ns)
    got: dict[str, str] = {}

    def run(cache: SemanticCache, p: str, delay: float, seconds: float) -> None:
        @cache.cached(wait=5.0, name="f")
        def ask(q: str) -> str:
            time.sleep(seconds)
            return "answer to " + q

        time.sleep(delay)
        got[p] = ask(p)

    threads = [threading.Thread(target=run, args=args) for args in
               ((b, "question Y", 0.0, 1.0), (a, "question F", 0.1, 0.1),
                (a, "question J", 0.3, 0.1))]
    run_all(threads)
    assert got["question F"] == "answer to question Y"
    assert got["question J"] == "answer to question J"


def test_land_under_a_busy_scope(valkey_server, ns):
    """Every registration in a scope touches its hash (PEXPIRE), which aborts a land's
    WATCH: with a busy scope 185 of 200 fields stayed. They are deleted now."""
    store = RedisStore.from_url(valkey_server.url, namespace=ns)
    r = redis.Redis.from_url(valkey_server.url)
    vec = np.zeros(64, np.float32)
    vec[0] = 1
    left = 0
    with busy_scope(valkey_server.url, store.fkey("s")):
        for i in range(200):
            token = bytes([i % 256]) * 16
            store.fly("s", 1000 + i, vec, 60, token)
            store.land("s", 1000 + i, token)
            left += r.hexists(store.fkey("s"), f"{1000 + i:016x}")
    assert left == 0


def test_pruning_keeps_a_field_replaced_meanwhile(valkey_server, ns):
    """A reader deletes fields long past their deadline; if that entry's process replaced
    its dead field between the reader's read and its delete, the new field stays."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    pruner = RedisStore.from_url(url, namespace=ns)
    owner = RedisStore.from_url(url, namespace=ns)
    v1 = np.zeros(64, np.float32)
    v1[0] = 1
    v2 = np.zeros(64, np.float32)
    v2[1] = 1
    now = int(time.time() * 1000)
    r.hset(pruner.fkey("s"), f"{7:016x}",
           RedisStore.flight_value(v1, now - 30_000, 1, b"o" * 16))
    real = pruner.parse_flights

    def replaced_meanwhile(*args: Any) -> Any:
        out = real(*args)
        owner.fly("s", 7, v1, 60, b"n" * 16)  # entry 7's next call registers
        return out

    pruner.parse_flights = replaced_meanwhile  # type: ignore[method-assign]
    pruner.fly("s", 8, v2, 60, b"p" * 16)
    value = r.hget(pruner.fkey("s"), f"{7:016x}")
    assert value is not None and RedisStore.flight_owner(value) == b"n" * 16


# Found by the third review (each failed on the code it reviewed).
def test_agents_in_another_process_wait_for_the_tool_call_in_flight(valkey_server, ns):
    """Process A calls tool(P0) (1 s). In process B three agent calls, each a @cached call,
    call tool(P0) from inside: the first of them joins nothing across processes but waits
    for A's lease, the others join it in-process. No cycle: one LLM call in all (a rule
    that made any wait joined from inside call instead made 2)."""
    a, b = caches(valkey_server.url, ns, 2)
    calls: list[str] = []

    def tool_of(cache: SemanticCache, tag: str) -> Any:
        @cache.cached(wait=5.0, name="tool")
        def tool(p: str) -> str:
            calls.append(tag)
            time.sleep(1.0)
            return f"{tag}: {p}"
        return tool

    tool_a, tool_b = tool_of(a, "A"), tool_of(b, "B")

    @b.cached(wait=5.0, name="agent")
    def agent(q: str) -> str:
        return tool_b(P0) + " | " + q

    threads = [threading.Thread(target=tool_a, args=(P0,))]
    threads += [threading.Thread(target=lambda i=i: (time.sleep(0.2), agent(
        f"agent question number {i} about zebras {i * 7}"))) for i in range(3)]
    run_all(threads)
    assert calls == ["A"]


def test_registration_over_a_dead_field_in_a_busy_scope(valkey_server, ns):
    """A call whose entry's field is dead (a call that outlived its wait) replaces it; the
    WATCH that guards the replacement fails whenever any flight of the scope changes, so
    in a busy scope none of 100 calls was registered."""
    store = RedisStore.from_url(valkey_server.url, namespace=ns)
    r = redis.Redis.from_url(valkey_server.url)
    vec = np.zeros(64, np.float32)
    vec[0] = 1
    registered = 0
    with busy_scope(valkey_server.url, store.fkey("s")):
        for i in range(100):
            eid = 5000 + i
            now = int(time.time() * 1000)
            r.hset(store.fkey("s"), f"{eid:016x}",
                   RedisStore.flight_value(vec, now - 2000, 1.0, b"x" * 16))
            token = bytes([i]) * 16
            store.fly("s", eid, vec, 60, token)
            registered += RedisStore.flight_owner(
                r.hget(store.fkey("s"), f"{eid:016x}")) == token
    assert registered == 100


# Found by the fourth review (each failed on the code it reviewed).
def test_no_cycle_through_a_chain_of_joins_from_inside(valkey_server, ns):
    """B: E' holds E's lease and asks X inside (waits on A's X). A: X asks F inside, which
    joins A's F; F asks E inside, which joins A's E; A's E waits on B's E lease. E's wait
    must be marked with F's token and, through F's joiners, with X's: a chain of joins."""
    a, b = caches(valkey_server.url, ns, 2)
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def make(cache: SemanticCache) -> Any:
        @cache.cached(wait=3.0, name="f")
        def f(p: str) -> str:
            if cache is b and p == Q:
                time.sleep(0.5)
                f(U)
            elif cache is a and p == U:
                time.sleep(0.05)
                f(W)
            elif cache is a and p == W:
                time.sleep(0.05)
                f(Q)
            else:
                time.sleep(0.2)
            return "answer to " + p
        return f

    fa, fb = make(a), make(b)

    def go(tag: str, f: Any, p: str, delay: float) -> None:
        time.sleep(delay)
        f(p)
        done[tag] = time.monotonic() - t0

    threads = [threading.Thread(target=go, args=args) for args in
               (("B.E", fb, Q, 0.0), ("A.E", fa, Q, 0.1), ("A.F", fa, W, 0.2),
                ("A.X", fa, U, 0.3))]
    run_all(threads)
    assert max(done.values()) < 2.0, done


def test_no_cycle_through_a_lease_of_the_same_process(valkey_server, ns):
    """One process: M holds M's lease and asks E inside; E holds E's lease and asks M
    inside, which joins M. M's inner E may not join E in-process (the in-process check), so
    it waits on E's lease, held by this process's E, which waits on M. The wait is marked
    with the tokens of every call its context leads and their joiners: the cycle shows."""
    (cache,) = caches(valkey_server.url, ns, 1)
    t0 = time.monotonic()
    done: dict[str, float] = {}
    local = threading.local()

    @cache.cached(wait=3.0, name="f")
    def f(p: str) -> str:
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        try:
            if p == U and depth == 0:
                time.sleep(0.2)
                f(Q)
            elif p == Q and depth == 0:
                time.sleep(0.05)
                f(U)
        finally:
            local.depth = depth
        return "answer to " + p

    def go(tag: str, p: str, delay: float) -> None:
        time.sleep(delay)
        f(p)
        done[tag] = time.monotonic() - t0

    threads = [threading.Thread(target=go, args=args) for args in
               (("M", U, 0.0), ("E", Q, 0.05))]
    run_all(threads)
    assert max(done.values()) < 2.0, done


def test_a_join_that_stopped_waiting_is_no_longer_marked(valkey_server, ns):
    """A: F waits on B's F lease. A: X asks F inside under asyncio.wait_for(0.1): it joins
    F, times out and goes on. B: F' then asks X inside: X waits on nothing, so this is no
    cycle and X must be called once (a joiner's token kept after its wait made F' see a
    cycle and call X again)."""
    url = valkey_server.url
    calls: list[str] = []

    async def run() -> None:
        a = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        b = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)

        def make(cache: AsyncSemanticCache, tag: str) -> Any:
            @cache.cached(wait=5.0, name="f")
            async def f(p: str) -> str:
                calls.append(f"{tag}: {p}")
                if cache is b and p == W:
                    await asyncio.sleep(0.4)
                    await f(U)
                elif cache is a and p == U:
                    try:
                        await asyncio.wait_for(f(W), 0.1)
                    except TimeoutError:
                        pass
                    await asyncio.sleep(1.0)
                else:
                    await asyncio.sleep(0.2)
                return "answer to " + p
            return f

        fa, fb = make(a, "A"), make(b, "B")

        async def after(delay: float, coro: Any) -> Any:
            await asyncio.sleep(delay)
            return await coro

        await asyncio.gather(after(0.0, fb(W)), after(0.1, fa(W)), after(0.2, fa(U)))
        await a.close()
        await b.close()

    asyncio.run(run())
    assert sorted(calls) == [f"A: {U}", f"B: {W}"], calls


def test_a_call_registered_earlier_is_followed_whatever_its_clock_says(valkey_server, ns):
    """"Earlier" is the server's order of registration, not the starts: those are each
    process's clock, read before its request. Another process's call registered first with
    a start 2 s ahead (a clock ahead, or a process descheduled before its request) was
    taken for a later one, and both called (the burst of three processes saw it under
    load). Now the paraphrase waits for that call's answer."""
    url = valkey_server.url
    a, b = caches(url, ns, 2)
    r = redis.Redis.from_url(url)
    scope = {"_fn": "f"}
    eid, sid = a._core.key(P0, scope)[:2]
    vec = HashEmbedder(64)([P0])[0]
    vec /= np.linalg.norm(vec)  # (the cache registers unit vectors)
    ahead = int(time.time() * 1000) + 2000
    r.hset(b.store.fkey(sid), f"{eid:016x}",  # type: ignore[attr-defined]
           RedisStore.flight_value(vec, ahead, 30, b"a" * 16))
    calls: list[str] = []

    @b.cached(wait=30, name="f")
    def ask(p: str) -> str:
        calls.append(p)
        return "answer from b"

    def answer_later() -> None:
        time.sleep(0.5)
        a.set(P0, "answer from a", scope=scope)

    th = threading.Thread(target=answer_later)
    th.start()
    assert ask(P1) == "answer from a"
    th.join()
    assert calls == [] and b.stats()["coalesced"] == 1


def test_a_registration_that_prunes_a_dead_flight_keeps_the_servers_order(valkey_server, ns):
    """A call whose registration also deletes a long-dead field reads the flights again
    after that fix; the re-read has calls registered since, which see this one: it
    followed one of them while that one followed it (two calls, found in review). Only
    the calls its registration's transaction saw count as before it."""
    url = valkey_server.url
    a = RedisStore.from_url(url, namespace=ns)
    b = RedisStore.from_url(url, namespace=ns)
    r = redis.Redis.from_url(url)
    sid = "0" * 16
    v = np.zeros(8, np.float32)
    v[0] = 1
    w = v.copy()
    w[1] = 0.05
    w /= np.linalg.norm(w)
    dead_start = int(time.time() * 1000) - 60_000  # (a process that died a minute ago)
    r.hset(a.fkey(sid), f"{0xdead:016x}", RedisStore.flight_value(v, dead_start, 1, b"z" * 16))
    real = a._if_unchanged
    seen_by_b: list[Any] = []

    def b_registers_first(*args: Any, **kw: Any) -> Any:  # (the real fix, after b's call)
        if not seen_by_b:
            seen_by_b.append(b.fly(sid, 0xB, w, 30, b"b" * 16)[1])
        return real(*args, **kw)

    a._if_unchanged = b_registers_first  # type: ignore[method-assign]
    a_others = a.fly(sid, 0xA, v, 30, b"a" * 16)[1]
    assert [o[1] for o in seen_by_b[0]] == [0xA]  # b registered after a: it sees a
    assert a_others == []  # a registered first: it sees nobody, and leads
    assert not r.hexists(a.fkey(sid), f"{0xdead:016x}")  # (the dead field was pruned)
