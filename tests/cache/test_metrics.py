"""The Prometheus text of the cache's statistics: parsed by prometheus_client's own parser,
every figure equals what stats() says."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.metrics import CONTENT_TYPE, prometheus_text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def used(ns: str) -> SemanticCache:
    cache = SemanticCache(HashEmbedder(64), store="memory", namespace=ns, threshold=0.9)
    cache.set_many([(f"how do I reset password number {i}", f"answer {i}") for i in range(20)])
    for i in range(5):
        assert cache.get(f"how do I reset password number {i}") is not None  # exact
    assert cache.get("how do I reset password number 3 please") is not None  # semantic
    for q in ("the weather in paris", "a recipe for bread", "who wrote hamlet"):
        assert cache.get(q) is None
    return cache


def test_metrics_equal_stats(ns: str) -> None:
    cache = used(ns)
    st = cache.stats()
    got = samples(prometheus_text(cache))
    lab = (("namespace", ns),)

    def one(name: str, extra: tuple[tuple[str, str], ...] = ()) -> float:
        return got[(name, tuple(sorted(lab + extra)))]

    assert one("hnswcache_hits_total", (("tier", "exact"),)) == st["hits_exact"] == 5
    assert one("hnswcache_hits_total", (("tier", "semantic"),)) == st["hits_semantic"] == 1
    for key in ("lookups", "misses", "sets", "deletes", "expiries", "evictions",
                "store_errors", "embed_errors", "invalid_entries", "sync_events", "resyncs",
                "coalesced", "too_old", "near_misses", "snapshots_saved"):
        assert one(f"hnswcache_{key}_total") == st[key], key
    assert one("hnswcache_entries") == st["entries"] == 20
    assert one("hnswcache_embed_calls_total") == st["embed_calls"] > 0
    assert one("hnswcache_lookup_seconds_count") == 9  # one per get()
    assert one("hnswcache_lookup_seconds", (("quantile", "0.5"),)) == pytest.approx(
        st["latency_p50_us"] / 1e6)
    assert one("hnswcache_embed_seconds", (("quantile", "0.99"),)) == pytest.approx(
        st["embed_latency_p99_us"] / 1e6)
    # The misses' nearest similarities: cumulative buckets that end in the count.
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in got.items()
                     if k[0] == "hnswcache_miss_similarity_bucket")
    assert len(buckets) == 20 and buckets[-1][0] == float("inf")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert buckets[-1][1] == one("hnswcache_miss_similarity_count") == sum(
        st["miss_similarity"].values()) == 3
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_several_caches_in_one_text(ns: str) -> None:
    a, b = used(ns + "a"), used(ns + "b")
    text = prometheus_text(a, b)
    assert text.count("# TYPE hnswcache_entries gauge") == 1  # one family, two samples
    got = samples(text)
    assert got[("hnswcache_entries", (("namespace", ns + "a"),))] == 20
    assert got[("hnswcache_entries", (("namespace", ns + "b"),))] == 20
    with pytest.raises(ValueError, match="two caches of namespace"):
        prometheus_text(a, SemanticCache(HashEmbedder(64), store="memory", namespace=ns + "a"))
    with pytest.raises(TypeError, match="not a SemanticCache"):
        prometheus_text(object())


def test_async_cache_and_an_unused_cache(ns: str) -> None:
    async def run() -> str:
        cache = AsyncSemanticCache(HashEmbedder(64), store="memory", namespace=ns)
        await cache.set("a question", "an answer")
        assert (await cache.get("a question")) is not None
        return prometheus_text(cache, SemanticCache(HashEmbedder(8), store="memory",
                                                    namespace=ns + "idle"))

    got = samples(asyncio.run(run()))
    assert got[("hnswcache_hits_total", (("namespace", ns), ("tier", "exact")))] == 1
    idle = (("namespace", ns + "idle"), ("quantile", "0.5"))
    assert math.isnan(got[("hnswcache_lookup_seconds", idle)])  # no lookup yet
    assert got[("hnswcache_lookup_seconds_count", (("namespace", ns + "idle"),))] == 0


def test_a_similarity_on_a_bucket_bound_counts_in_the_bucket_it_starts() -> None:
    """0.6 / 0.05 is 11.999... in floats: 0.6 fell in the 0.55 bucket while 0.5 fell in
    the 0.50 one, so the histogram's bounds held values inconsistently."""
    from hnswcache._cache_core import Stats

    for sim in (0.05, 0.3, 0.5, 0.6, 0.7, 0.85, 0.9, 0.95):
        st = Stats()
        st.miss(sim, 0.99)
        assert st.snapshot(0)["miss_similarity"] == {f"{sim:.2f}": 1}, sim


def test_stats_never_show_more_answers_than_lookups_while_threads_look_up() -> None:
    """Hits and misses were counted before their lookup was: a stats() read between the
    two (a Prometheus scrape beside busy threads) showed hits + misses > lookups (192 reads
    in a review's run). Lookups are now counted when they start."""
    cache = SemanticCache(HashEmbedder(32), store="memory")
    cache.set_many([(f"question {i}", f"answer {i}") for i in range(200)])
    stop = threading.Event()

    def work(seed: int) -> None:
        k = seed
        while not stop.is_set():
            cache.get(f"question {k % 300}")  # hits and misses
            cache.get_many([f"question {k % 250}", f"other {k}"])
            k += 7

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    bad = []
    deadline = time.monotonic() + 3.0
    reads = 0
    while time.monotonic() < deadline:
        st = cache.stats()
        reads += 1
        if st["hits"] + st["misses"] > st["lookups"]:
            bad.append((st["lookups"], st["hits"], st["misses"]))
    stop.set()
    for t in threads:
        t.join()
    st = cache.stats()
    assert reads > 100 and not bad, (reads, bad[:5])
    assert st["hits"] + st["misses"] == st["lookups"] > 1000


def test_the_histogram_counts_a_similarity_on_a_bound_at_that_bound(ns: str) -> None:
    """Prometheus' ``le`` is "at most": a miss at exactly 0.5 belongs in ``le="0.50"``. The
    text reused stats()'s buckets (each holds its lower bound), which put it in 0.55."""
    cache = SemanticCache(HashEmbedder(8), store="memory", namespace=ns)
    sims = [0.5, 0.25, 0.75, 1.0, 0.6, 0.05, -0.2, 0.500001, float(np.float32(0.85))]
    for s in sims:  # (the misses' nearest similarities, as the lookups record them)
        cache._core.stats.miss(s, 0.99)
    got = samples(prometheus_text(cache))
    buckets = [(float(dict(k[1])["le"]), v) for k, v in got.items()
               if k[0] == "hnswcache_miss_similarity_bucket"]
    assert len(buckets) == 20
    for le, n in buckets:
        assert n == sum(s <= le for s in sims), (le, n)


def _balance(st: dict[str, Any]) -> tuple[int, int]:
    return st["lookups"], st["hits"] + st["misses"] + st["unanswered"]


def test_lookups_that_raise_count_as_unanswered() -> None:
    """A lookup that raised (here a strict embedder failure) answered nothing; it was
    counted in ``lookups`` and in neither ``hits`` nor ``misses``, so dashboards could not
    reconcile the three. It counts in ``unanswered``. A call refused for its arguments (a
    wrong dimension) is no lookup at all."""
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("embedding service down")

    cache = SemanticCache(broken, store="memory", strict=True)
    cache.set("a question", "an answer", embedding=HashEmbedder(32)(["a question"])[0])
    assert cache.get("a question") is not None  # exact: no embedding needed
    with pytest.raises(RuntimeError, match="service down"):
        cache.get_many(["a question", "another question", "a third"])
    with pytest.raises(ValueError, match="dimension"):
        cache.get("something else", embedding=np.ones(7, dtype=np.float32))
    st = cache.stats()
    # (the failed call's exact hit was found, but never answered: the call raised)
    assert st["hits_exact"] == 1 and st["misses"] == 0
    assert st["unanswered"] == 3 and _balance(st) == (4, 4)
    text = prometheus_text(cache)
    assert samples(text)[("hnswcache_unanswered_total", (("namespace", "default"),))] == 3


def test_a_cancelled_async_lookup_counts_its_unanswered_prompts() -> None:
    """A get_many cancelled while it embeds counted its exact hit and never its other
    prompt: lookups exceeded hits + misses for good. Both prompts are now unanswered (the
    exact hit was found but never returned)."""
    started, release = threading.Event(), threading.Event()
    emb = HashEmbedder(32)

    def slow(texts: list[str]) -> np.ndarray:
        started.set()
        release.wait(10)
        return emb(texts)

    async def run() -> dict[str, Any]:
        cache = AsyncSemanticCache(slow, store="memory")
        await cache.set("a question", "an answer", embedding=emb(["a question"])[0])
        task = asyncio.create_task(cache.get_many(["a question", "a new question"]))
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        st = cache.stats()
        await cache.close()
        return st

    st = asyncio.run(run())
    assert st["hits_exact"] == 0 and st["misses"] == 0 and st["unanswered"] == 2
    assert _balance(st) == (2, 2)


def test_a_set_cancelled_after_its_store_write_is_counted() -> None:
    """A set cancelled between the store's write and its local apply (waiting for the
    cache's lock) was in the store, and read back by every process, but not in
    ``sets``. It is counted once written; the replica gets it from the change log."""
    async def run() -> tuple[dict[str, Any], int, Any]:
        cache = AsyncSemanticCache(HashEmbedder(32), store="memory")
        await cache.set("warm", "up")
        written = asyncio.Event()
        real_write = cache.store.write

        async def write(*args: Any, **kwargs: Any) -> Any:
            res = await real_write(*args, **kwargs)
            written.set()
            return res

        cache.store.write = write  # type: ignore[method-assign]
        async with cache._lock:  # (a log apply holding it)
            task = asyncio.create_task(cache.set("a question", "an answer"))
            await asyncio.wait_for(written.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        st = cache.stats()
        await cache.sync()
        size = len(cache)
        hit = await cache.get("a question")
        await cache.close()
        return st, size, hit

    st, size, hit = asyncio.run(run())
    assert st["sets"] == 2
    assert size == 2 and hit is not None and hit.response == "an answer"


def test_an_interrupted_lookup_is_counted_once() -> None:
    """A hit was counted as it was found, so an interrupt (Ctrl-C) landing before its call
    returned counted that prompt as a hit and as unanswered (a review: lookups - hits -
    misses - unanswered reached -17,429 under a stream of interrupts). Hits and misses are
    now counted as the call returns."""
    cache = SemanticCache(HashEmbedder(32), store="memory")
    cache.set_many([(f"question {i}", f"answer {i}") for i in range(20)])
    real = cache._core.answer_read

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # (the exact hits are found...)
        raise KeyboardInterrupt  # (...and the call is interrupted before it returns)

    cache._core.answer_read = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        cache.get_many(["question 1", "question 2", "something new"])
    cache._core.answer_read = real  # type: ignore[method-assign]
    assert cache.get("question 3") is not None
    st = cache.stats()
    assert (st["hits_exact"], st["misses"], st["unanswered"]) == (1, 0, 3)
    assert _balance(st) == (4, 4)
    cache.close()
