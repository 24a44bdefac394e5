"""@cached coalesces concurrent misses: one call per question, whatever the burst."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder

SAME = ["what is the capital of france", "What is the capital   of France?"]  # one exact key
PARAPHRASE = "what is the capital of france please"  # cosine 0.92 with SAME (HashEmbedder)
OTHER = "how do i bake sourdough bread at home"  # cosine 0.17


class CountingEmbedder:
    def __init__(self) -> None:
        self.inner = HashEmbedder(64)
        self.texts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.texts.extend(texts)
        return self.inner(texts)


def burst(fn: Callable[[str], Any], prompts: list[str]) -> list[Any]:
    """Call fn once per prompt, all threads released together; results in order."""
    out: list[Any] = [None] * len(prompts)
    gate = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(prompts[i])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def scope_of(fn: Callable[..., Any]) -> dict[str, str]:
    """The scope @cached gives calls of ``fn`` with no other arguments."""
    return {"_fn": f"{fn.__module__}.{fn.__qualname__}"}


def cache_with_index(**kw: Any) -> SemanticCache:
    # One stored entry, so the scope has an index and lookups embed (the semantic tier).
    cache = SemanticCache(kw.pop("embedder", HashEmbedder(64)), store="memory", threshold=0.8,
                          **kw)
    return cache


def test_a_burst_of_one_question_and_its_paraphrase_makes_one_call() -> None:
    cache = cache_with_index()
    calls: list[str] = []

    @cache.cached()
    def llm(prompt: str) -> str:
        calls.append(prompt)
        time.sleep(0.5)  # the burst's lookups all happen while this call runs
        return f"answer to {prompt}"

    llm("warm up the scope index with one entry")
    calls.clear()
    prompts = [SAME[i % 2] for i in range(6)] + [PARAPHRASE, PARAPHRASE]
    results = burst(llm, prompts)
    assert len(calls) == 1, calls
    assert len(set(results)) == 1 and results[0] == f"answer to {calls[0]}"
    assert cache.stats()["coalesced"] == 7
    # The answer was stored once, under the leader's prompt (whichever thread led).
    hit = cache.get(calls[0], scope=scope_of(llm))
    assert hit is not None and hit.response == results[0] and hit.tier == "exact"
    assert llm(SAME[1]) == results[0] and len(calls) == 1


def test_different_questions_and_scopes_are_not_coalesced() -> None:
    cache = cache_with_index()
    calls: list[tuple[str, str]] = []

    @cache.cached()
    def llm(prompt: str, model: str = "a") -> str:
        calls.append((prompt, model))
        time.sleep(0.3)
        return f"{prompt} by {model}"

    llm("warm up the scope index with one entry")
    llm("warm up the scope index with one entry", model="b")
    calls.clear()
    results = burst(lambda p: llm(p.split("|")[0], model=p.split("|")[1]),
                    [SAME[0] + "|a", OTHER + "|a", SAME[0] + "|b", OTHER + "|b"])
    assert sorted(calls) == sorted([(SAME[0], "a"), (OTHER, "a"), (SAME[0], "b"), (OTHER, "b")])
    assert results == [f"{SAME[0]} by a", f"{OTHER} by a", f"{SAME[0]} by b", f"{OTHER} by b"]
    assert cache.stats()["coalesced"] == 0


def test_when_the_leading_call_fails_one_waiting_caller_leads_the_retry() -> None:
    """Only the leader's caller sees its error; the others elect a new leader among
    themselves (all 3 called at once before: a burst after a rate-limit error was the
    whole burst again)."""
    cache = cache_with_index()
    calls: list[str] = []
    lock = threading.Lock()

    @cache.cached()
    def llm(prompt: str) -> str:
        with lock:
            calls.append(prompt)
            first = len(calls) == 1
        time.sleep(0.4)
        if first:
            raise RuntimeError("the LLM timed out")
        return "fine"

    results = burst(llm, [SAME[0]] * 4)
    failed = [r for r in results if isinstance(r, RuntimeError)]
    assert len(failed) == 1, "only the leader's caller sees the leader's error"
    assert [r for r in results if not isinstance(r, Exception)] == ["fine"] * 3
    assert len(calls) == 2 and cache.stats()["coalesced"] == 2


def test_waiting_is_bounded_and_results_that_are_not_cached_are_not_shared() -> None:
    cache = cache_with_index()
    calls: list[str] = []

    @cache.cached(wait=0.05)
    def slow(prompt: str) -> str:
        calls.append(prompt)
        time.sleep(0.5)
        return "slow"

    assert burst(slow, [SAME[0]] * 3) == ["slow"] * 3
    assert len(calls) == 3, "callers stop waiting after 0.05 s and call themselves"

    objs: list[str] = []

    @cache.cached()
    def structured(prompt: str) -> dict[str, str]:
        objs.append(prompt)
        time.sleep(0.3)
        return {"text": prompt}  # not a str: neither cached nor handed to others

    results = burst(structured, [OTHER] * 3)
    assert [r["text"] for r in results] == [OTHER] * 3
    assert len({id(r) for r in results}) == 3 and len(objs) == 3
    assert cache.stats()["coalesced"] == 0


def test_coalescing_can_be_turned_off_and_a_recursive_call_does_not_wait_on_itself() -> None:
    cache = cache_with_index()
    calls: list[str] = []

    @cache.cached(coalesce=False)
    def independent(prompt: str) -> str:
        calls.append(prompt)
        time.sleep(0.3)
        return "x"

    assert burst(independent, [SAME[0]] * 3) == ["x"] * 3
    assert len(calls) == 3

    @cache.cached(wait=30)
    def recursive(prompt: str, depth: int = 0) -> str:
        # The inner call has other arguments (another scope) unless key= says otherwise.
        return "done" if depth else recursive(prompt, depth=1) + "!"

    @cache.cached(wait=30, key=lambda prompt, depth=0: prompt)
    def same_key(prompt: str, depth: int = 0) -> str:
        return "inner" if depth else same_key(prompt, depth=1) + " outer"

    t0 = time.monotonic()
    assert recursive(OTHER) == "done!"
    assert same_key(PARAPHRASE) == "inner outer"
    assert time.monotonic() - t0 < 5, "a call must not wait for its own flight"
    with pytest.raises(ValueError, match="wait"):
        cache.cached(wait=-1)
    cache.cached(wait=float("inf"))


def test_a_miss_embeds_the_prompt_once() -> None:
    emb = CountingEmbedder()
    cache = SemanticCache(emb, store="memory", threshold=0.8)

    @cache.cached()
    def llm(prompt: str) -> str:
        return "a:" + prompt

    llm(SAME[0])  # empty scope: the lookup embeds nothing, the write embeds once
    assert emb.texts == [SAME[0]]
    llm(OTHER)  # a semantic miss: embedded for the search, the vector reused for the write
    assert emb.texts == [SAME[0], OTHER]
    assert llm(SAME[1]) == "a:" + SAME[0]  # exact hit: no embedding
    assert llm(PARAPHRASE) == "a:" + SAME[0]  # semantic hit: one embedding
    assert emb.texts == [SAME[0], OTHER, PARAPHRASE]
    # The vector written with the answer is the prompt's own: a paraphrase-free lookup by
    # vector finds it at similarity 1.
    hit = cache.get("not the same words", scope=scope_of(llm), embedding=emb.inner([OTHER])[0])
    assert hit is not None and hit.prompt == OTHER
    assert hit.similarity == pytest.approx(1.0, abs=1e-6)


def test_async_burst_makes_one_call_and_failures_fall_back() -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(64), store="memory", threshold=0.8)
        calls: list[str] = []

        @cache.cached()
        async def llm(prompt: str) -> str:
            calls.append(prompt)
            await asyncio.sleep(0.3)
            if prompt == OTHER and calls.count(OTHER) == 1:
                raise RuntimeError("first try fails")
            return f"answer to {prompt}"

        await llm("warm up the scope index with one entry")
        calls.clear()
        results = await asyncio.gather(*(llm(p) for p in [*SAME, *SAME, PARAPHRASE]))
        assert calls == [SAME[0]] and results == [f"answer to {SAME[0]}"] * 5
        assert cache.stats()["coalesced"] == 4
        got = await asyncio.gather(*(llm(OTHER) for _ in range(3)), return_exceptions=True)
        assert sum(isinstance(g, RuntimeError) for g in got) == 1
        assert [g for g in got if isinstance(g, str)] == [f"answer to {OTHER}"] * 2
        assert calls.count(OTHER) == 2  # (the failure, then one retry for both followers)
        # A leader cancelled (its client went away): one follower leads the retry.
        calls.clear()
        first = asyncio.create_task(llm("a question whose first caller leaves"))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(llm("a question whose first caller leaves"))
                for _ in range(3)]
        await asyncio.sleep(0.05)
        first.cancel()
        out = await asyncio.gather(*rest)
        assert out == ["answer to a question whose first caller leaves"] * 3
        assert len(calls) == 2, calls
        await cache.close()

    asyncio.run(run())


def test_async_waits_for_another_process_lease_on_a_real_server(valkey_server: Any,
                                                                 ns: str) -> None:
    import redis

    url = valkey_server.url
    r = redis.Redis.from_url(url)

    async def run() -> None:
        mine = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        other = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        calls: list[str] = []

        @mine.cached(wait=20)
        async def llm(prompt: str) -> str:
            calls.append(prompt)
            return "mine"

        def lease_key(prompt: str) -> str:
            return mine.store.lkey(mine._core.key(prompt, scope_of(llm))[0])  # type: ignore[attr-defined]

        r.set(lease_key(SAME[0]), "d" * 32, px=10_000)

        async def answer_later() -> None:
            await asyncio.sleep(0.3)
            await other.set(SAME[0], "theirs", scope=scope_of(llm))

        t0 = time.monotonic()
        got, _ = await asyncio.gather(llm(SAME[1]), answer_later())
        assert got == "theirs" and calls == [] and mine.stats()["coalesced"] == 1
        assert time.monotonic() - t0 < 5
        r.set(lease_key(OTHER), "garbage", px=60_000)  # no token: no lease
        assert await llm(OTHER) == "mine" and calls == [OTHER]
        assert r.exists(lease_key(OTHER)) == 1  # not ours: left alone
        assert await llm(PARAPHRASE) == "theirs"  # a semantic hit on the stored answer
        await mine.close()
        await other.close()

    asyncio.run(run())


def test_paraphrases_coalesce_on_a_scope_that_has_no_index_yet() -> None:
    # The first burst of a new scope: the lookup had nothing to search (no embedding), so
    # the miss embeds the prompt before joining; that vector is the one written.
    emb = CountingEmbedder()
    cache = SemanticCache(emb, store="memory", threshold=0.8)
    calls: list[str] = []

    @cache.cached()
    def llm(prompt: str) -> str:
        calls.append(prompt)
        time.sleep(0.5)
        return "first burst"

    results = burst(llm, [SAME[0], SAME[1], PARAPHRASE, PARAPHRASE])
    assert results == ["first burst"] * 4 and len(calls) == 1
    assert cache.stats()["coalesced"] == 3
    assert len(emb.texts) == 4, "one embedding per miss, none again for the write"


def test_async_calls_started_from_inside_the_call_do_not_wait_on_it() -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(HashEmbedder(64), store="memory", threshold=0.8)

        @cache.cached(wait=30, key=lambda prompt, depth=0: prompt)
        async def llm(prompt: str, depth: int = 0) -> str:
            if depth:
                return "inner"
            # Child tasks (same entry, and a paraphrase of it) inherit "inside the call".
            a, b = await asyncio.gather(llm(prompt, depth=1), llm(PARAPHRASE, depth=1))
            return f"{a}+{b}"

        t0 = time.monotonic()
        assert await llm(SAME[0]) == "inner+inner"
        assert time.monotonic() - t0 < 5
        await cache.close()

    asyncio.run(run())


def test_recursion_on_a_real_server_does_not_wait_on_its_own_lease(valkey_server: Any,
                                                                   ns: str) -> None:
    cache = SemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)

    @cache.cached(wait=30, key=lambda prompt, depth=0: prompt)
    def llm(prompt: str, depth: int = 0) -> str:
        return "inner" if depth else llm(prompt, depth=1) + " outer"

    t0 = time.monotonic()
    assert llm(OTHER) == "inner outer"
    assert time.monotonic() - t0 < 5


def test_an_answer_written_between_the_lookup_and_the_lease_is_used(valkey_server: Any,
                                                                    ns: str) -> None:
    mine = SemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
    other = SemanticCache(HashEmbedder(64), store=valkey_server.url, namespace=ns)
    sc = {"_fn": "x"}
    k = mine._core.key(SAME[0], sc)
    assert mine._lead(k, "e" * 32, 5.0) is None  # nothing there: lead (the lease is ours)
    mine._release(k[0], "e" * 32)
    other.set(SAME[0], "written meanwhile", scope=sc)
    assert mine._lead(k, "f" * 32, 5.0) == "written meanwhile"


def test_a_child_forked_during_a_call_does_not_wait_for_it() -> None:
    # The child inherited the call in progress but not the thread finishing it: its calls of
    # the same question waited the whole wait limit (for ever with wait=inf).
    import os

    cache = SemanticCache(HashEmbedder(64), store="memory")
    started = threading.Event()

    @cache.cached(wait=30)
    def ask(q: str) -> str:
        started.set()
        time.sleep(0.5)
        return "answer"

    t = threading.Thread(target=ask, args=("what is a semantic cache",))
    t.start()
    started.wait()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        t0 = time.monotonic()
        ok = ask("what is a semantic cache") == "answer"
        os._exit(0 if ok and time.monotonic() - t0 < 5 else 1)
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_name_tells_apart_functions_made_by_one_factory() -> None:
    # Closures of one factory share module.qualname, so their answers mixed: each now takes
    # its own name= (documented in cached()).
    cache = SemanticCache(HashEmbedder(64), store="memory")

    def make(model: str, name: str | None) -> Callable[[str], str]:
        @cache.cached(name=name)
        def ask(q: str) -> str:
            return f"[{model}] answer to {q}"
        return ask

    big, tiny = make("gpt-x", "assistant:gpt-x"), make("tiny", "assistant:tiny")
    assert big("What is 2+2?") == "[gpt-x] answer to What is 2+2?"
    assert tiny("What is 2+2?") == "[tiny] answer to What is 2+2?"
    same1, same2 = make("a", None), make("b", None)  # the pitfall the docstring names
    assert same1("hello") == "[a] answer to hello" and same2("hello") == "[a] answer to hello"


def mutual(cache: SemanticCache, barrier: threading.Barrier, wait: float
           ) -> Callable[..., str]:
    """A cached ``answer(q, then)`` whose call for ``q`` needs the answer to ``then``, once
    both top-level calls are in flight (``barrier``)."""

    @cache.cached(key=lambda q, then=None: q, wait=wait, name="answer")
    def answer(q: str, then: str | None = None) -> str:
        if then is None:
            time.sleep(0.1)  # the LLM call
            return f"answer to {q}"
        barrier.wait()  # both top-level calls hold their leads now
        return f"{q} (see also: {answer(then)})"

    return answer


def each_asks_the_other(ask: Callable[[str, str], str], limit: float
                        ) -> tuple[dict[str, str], float]:
    """Two threads: one asks A needing B, the other B needing A; their answers and the
    seconds both took (each joined for at most ``limit``)."""
    a, b = "how do I rotate my API key", "how do I revoke a token"
    out: dict[str, str] = {}

    def go(q: str, then: str) -> None:
        out[q] = ask(q, then)

    threads = [threading.Thread(target=go, args=(a, b), daemon=True),
               threading.Thread(target=go, args=(b, a), daemon=True)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), "the two leaders wait for each other"
    assert set(out) == {a, b} and all(v.startswith(k) for k, v in out.items())
    return out, time.monotonic() - t0


@pytest.mark.parametrize("wait", [3.0, float("inf")])
def test_two_leaders_calling_each_others_question_do_not_wait_for_each_other(
    wait: float,
) -> None:
    # Each followed the other's call and neither could finish: both waited the whole wait
    # limit (for ever with wait=inf). Now the second to follow sees the cycle and calls.
    answer = mutual(SemanticCache(HashEmbedder(64), store="memory"), threading.Barrier(2), wait)
    _, took = each_asks_the_other(answer, 10)
    assert took < 2.0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_leaders_in_two_processes_calling_each_others_question_do_not_wait_for_each_other(
    valkey_server: Any, ns: str, kind: str
) -> None:
    # The same cycle across processes: each waited on the other's store lease until its
    # wait limit (600 s, the lease's life, with wait=inf). Two caches on one server stand
    # for the two processes: each has its own registry of calls, so only the store links
    # them, as between processes. Now a wait is marked in the store, and the second to
    # wait follows the lease holders' marks back to itself and calls.
    url = valkey_server.url
    barrier = threading.Barrier(2)
    wait = 8.0

    def run_async(q: str, then: str) -> str:
        async def main() -> str:
            cache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)

            @cache.cached(key=lambda q, then=None: q, wait=wait, name="answer")
            async def answer(q: str, then: str | None = None) -> str:
                if then is None:
                    await asyncio.sleep(0.1)
                    return f"answer to {q}"
                await asyncio.to_thread(barrier.wait)
                return f"{q} (see also: {await answer(then)})"

            try:
                return await answer(q, then)
            finally:
                await cache.close()
        return asyncio.run(main())

    def ask(q: str, then: str) -> str:
        if kind == "async":
            return run_async(q, then)
        cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns)  # one per "process"
        return mutual(cache, barrier, wait)(q, then)

    _, took = each_asks_the_other(ask, wait + 5)
    assert took < wait / 2, "the two leaders waited for each other"
    # No wait mark is left behind.
    import redis

    assert not list(redis.Redis.from_url(url).scan_iter(f"hc:{{{ns}}}:wait:*"))


def test_a_cycle_through_one_of_two_gathered_calls_is_seen(valkey_server: Any, ns: str) -> None:
    # Review (2026-12-05): tasks gathered inside a call inherit its lease token, and each
    # one's wait mark overwrote the other's; the first to finish deleted the mark, so a
    # cycle through the other went unseen and both sides waited the whole limit.
    url = valkey_server.url
    p, y, z = "how do I rotate my API key", "how do I revoke a token", "what is the billing cycle"
    wait = 6.0
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def process(label: str, q: str) -> None:
        async def main() -> None:
            cache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)

            @cache.cached(key=lambda q: q, wait=wait, name="f")
            async def f(q: str) -> str:
                if label == "A" and q == p:  # A's question needs Y and Z, gathered
                    return "P: " + " / ".join(await asyncio.gather(f(y), f(z)))
                if label == "B" and q == y:  # B's Y needs P: a cycle P -> Y -> P
                    await asyncio.sleep(0.8)
                    return "Y: " + await f(p)
                await asyncio.sleep(0.3)  # C's Z: an ordinary call
                return "answer " + q

            try:
                await f(q)
                done[label] = time.monotonic() - t0
            finally:
                await cache.close()

        asyncio.run(main())

    threads = [threading.Thread(target=process, args=("B", y)),
               threading.Thread(target=process, args=("C", z))]
    for t in threads:
        t.start()
    time.sleep(0.1)
    threads.append(threading.Thread(target=process, args=("A", p)))
    threads[-1].start()
    for t in threads:
        t.join(wait + 5)
    assert set(done) == {"A", "B", "C"}
    assert max(done.values()) < wait / 2, done


def test_a_cycle_through_one_of_two_gathered_calls_is_seen_in_one_process() -> None:
    """The same in one process: each flight kept one link to the flight its leader waited
    on, shared by the tasks its call gathers; the second gathered wait overwrote the first,
    so a cycle through the first went unseen (the whole wait, for ever with wait=inf)."""

    async def main() -> tuple[float, list[str]]:
        cache = AsyncSemanticCache(HashEmbedder(64), store="memory", threshold=0.95)

        @cache.cached(key=lambda q, then=(): q, wait=math.inf, name="answer")
        async def llm(q: str, then: tuple[str, ...] = ()) -> str:
            if q == "alpha question" and then:  # L needs B and C, gathered
                return "L(" + ",".join(await asyncio.gather(*(llm(t) for t in then))) + ")"
            if q == "bravo question" and then:  # B needs L: a cycle L -> B -> L
                await asyncio.sleep(0.2)
                return "B(" + await llm("alpha question") + ")"
            await asyncio.sleep(0.6 if q == "charlie question" else 0.05)
            return q.split()[0]

        t0 = time.monotonic()
        tasks = [asyncio.create_task(llm("bravo question", then=("alpha question",))),
                 asyncio.create_task(llm("charlie question"))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(
            llm("alpha question", then=("bravo question", "charlie question"))))
        out = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await cache.close()
        return time.monotonic() - t0, out

    seconds, out = asyncio.run(main())
    assert out == ["B(alpha)", "charlie", "L(B(alpha),charlie)"]
    assert seconds < 5, seconds


def test_flight_locks_are_reentrant_for_finalizers() -> None:
    """A coroutine abandoned in the middle of a call runs its ``finally`` (which ends its
    wait, or its flight) when the garbage collector finds it, and that can happen inside
    this very thread's own join, finish or look at the waits: the locks must let the same
    thread in again (they did not: the thread deadlocked, found in review)."""
    from hnswcache import _flight

    reg = _flight.Flights()
    f, leads = reg.join(1, "s", None, 0.9)
    assert leads

    def finalizer_inside_the_locks() -> None:
        with _flight._WAITS:
            _flight.stop_waiting(f)
            assert _flight.waiting_tokens(f) == frozenset()
        with reg._lock:
            reg.finish(f, None)

    th = threading.Thread(target=finalizer_inside_the_locks, daemon=True)
    th.start()
    th.join(5)
    assert not th.is_alive()
    assert f.done.is_set()


def test_async_call_cancelled_at_every_await_leaves_no_lease_or_flight(valkey_server: Any,
                                                                       ns: str) -> None:
    """anyio's cancel scopes (Starlette, FastAPI task groups) cancel every await inside
    them, the call's cleanup included: its lease and flight must still leave the store, or
    every other process asking the question (or a paraphrase) waits out its ``wait``."""
    import redis

    url = valkey_server.url
    r = redis.Redis.from_url(url)

    async def run() -> None:
        mine = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.8)
        other = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.8)
        started = asyncio.Event()

        @mine.cached(wait=30, name="ask")
        async def slow(prompt: str) -> str:
            started.set()
            await asyncio.sleep(60)
            return "mine"

        @other.cached(wait=30, name="ask")
        async def fast(prompt: str) -> str:
            return "other"

        await fast("warm up the scope index with one entry")  # (paraphrases fly)
        task = asyncio.create_task(slow(SAME[0]))
        await started.wait()
        sid = mine._core.key(SAME[0], {"_fn": "ask"})[1]
        assert r.exists(mine.store.lkey(mine._core.key(SAME[0], {"_fn": "ask"})[0]))  # type: ignore[attr-defined]
        assert r.hlen(mine.store.fkey(sid)) == 1  # type: ignore[attr-defined]
        while not task.done():  # cancelled again at every await, as in a cancel scope
            task.cancel()
            await asyncio.sleep(0)
        assert task.cancelled()
        assert r.hlen(mine.store.fkey(sid)) == 0  # type: ignore[attr-defined]
        assert not r.keys(f"*{ns}*lease*")
        t0 = time.monotonic()
        assert await fast(PARAPHRASE) == "other"
        assert await fast(SAME[1]) == "other"
        assert time.monotonic() - t0 < 5  # (was the whole wait, 30 s)
        await mine.close()
        await other.close()

    asyncio.run(run())
