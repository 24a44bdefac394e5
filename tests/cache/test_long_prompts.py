"""Prompts longer than the embedder reads: a transformer embeds only its first tokens
(all-MiniLM-L6-v2: 256), so two long prompts with one context and different questions after
it got one vector, and the second was answered with the first's answer at similarity 1.0.
Such prompts are answered by the exact tier only, and their entries are never semantic
candidates (found by a review of 2026-12-05, ninth session)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.memory import MemoryStore
from hnswcache.store.redis import keys_for

from .cache_helpers import ROOT

CONTEXT = " ".join(f"clause{i} of the supplier contract" for i in range(60))
LONG_A = CONTEXT + " Question: what is the notice period?"
LONG_B = CONTEXT + " Question: who pays for shipping?"


class PrefixEmbedder(HashEmbedder):
    """A bag-of-words embedder that, like a transformer, reads only a text's first
    ``limit`` words, and says so through ``truncated()``."""

    def __init__(self, limit: int = 40) -> None:
        super().__init__(64, name="prefix-40")
        self.limit = limit

    def __call__(self, texts: Any) -> np.ndarray:
        return super().__call__([" ".join(t.split()[: self.limit]) for t in texts])

    def truncated(self, texts: list[str]) -> list[bool]:
        return [len(t.split()) > self.limit for t in texts]


def test_the_embedder_alone_gives_two_long_prompts_one_vector() -> None:
    emb = PrefixEmbedder()
    a, b = emb([LONG_A, LONG_B])
    assert np.array_equal(a, b)  # (what the cache must not take for a paraphrase)
    assert emb.truncated([LONG_A, "a short question"]) == [True, False]


def test_a_long_prompt_is_answered_by_its_own_entry_only(store_url: str, ns: str) -> None:
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    cache = SemanticCache(PrefixEmbedder(), store=store, namespace=ns, threshold=0.9)
    cache.set(LONG_A, "30 days")
    assert cache.get(LONG_B) is None  # was: a semantic hit at 1.0, "30 days"
    hit = cache.get(LONG_A)
    assert hit is not None and hit.tier == "exact" and hit.response == "30 days"
    assert cache.get("  " + LONG_A.upper() + " ") is not None  # (normalised, exact)
    # Short prompts still go both ways, and a short one near the long entry's start does
    # not reach it: the long entry is not in the index.
    cache.set("what is the refund policy", "14 days")
    semantic = cache.get("what is the refund policy please")
    assert semantic is not None and semantic.tier == "semantic"
    assert cache.get(" ".join(CONTEXT.split()[:40])) is None
    assert len(cache) == 1  # (the replica indexes the short entry only)
    assert cache.get(LONG_B) is None  # (the scope has an index now: not searched either)
    # Counted: the long set, and the long exact miss that was not searched (exact hits,
    # and a miss in a scope with no index, search nothing anyway).
    assert cache.stats()["exact_only"] == 2
    # Another process on the store: the same from its warm start, and from the log.
    other = SemanticCache(PrefixEmbedder(), store=store, namespace=ns, threshold=0.9)
    assert other.get(LONG_B) is None and other.get(LONG_A) is not None
    cache.set(LONG_B, "the buyer")
    other.sync()
    assert other.get(LONG_B).response == "the buyer"  # type: ignore[union-attr]
    assert other.get(LONG_A).response == "30 days"  # type: ignore[union-attr]
    assert len(other) == 1
    cache.close()
    other.close()


def test_the_exact_only_mark_is_stored_and_checked(valkey_server: Any, ns: str) -> None:
    url = valkey_server.url
    cache = SemanticCache(PrefixEmbedder(), store=url, namespace=ns)
    key = cache.set(LONG_A, "30 days")
    r = redis.Redis.from_url(url)
    entry = keys_for(ns)["entry"] + key
    assert r.hget(entry, "exact_only") == b"1"
    # An embedder without truncated() on the same store still never indexes it.
    plain = SemanticCache(HashEmbedder(64, name="prefix-40"), store=url, namespace=ns)
    assert plain.get(LONG_A) is not None and len(plain) == 0
    r.hset(entry, "exact_only", "yes")  # garbage: the entry is refused, not half-read
    fresh = SemanticCache(PrefixEmbedder(), store=url, namespace=ns)
    assert fresh.get(LONG_A) is None and fresh.stats()["invalid_entries"] >= 1
    for c in (cache, plain, fresh):
        c.close()


def test_cached_calls_with_long_prompts_get_their_own_answers(store_url: str,
                                                             ns: str) -> None:
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    cache = SemanticCache(PrefixEmbedder(), store=store, namespace=ns, threshold=0.9)
    calls: list[str] = []

    @cache.cached()
    def ask(prompt: str) -> str:
        calls.append(prompt)
        return "answer to " + prompt[-20:]

    assert ask(LONG_A) == "answer to " + LONG_A[-20:]
    assert ask(LONG_B) == "answer to " + LONG_B[-20:]  # was: LONG_A's answer
    assert ask(LONG_A) == "answer to " + LONG_A[-20:]  # (the exact tier)
    assert calls == [LONG_A, LONG_B]
    cache.close()


def test_the_async_cache_answers_long_prompts_exactly_only(valkey_server: Any, ns: str) -> None:
    async def run() -> None:
        cache = AsyncSemanticCache(PrefixEmbedder(), store=valkey_server.url, namespace=ns,
                                   threshold=0.9)
        await cache.set(LONG_A, "30 days")
        assert await cache.get(LONG_B) is None
        hit = await cache.get(LONG_A)
        assert hit is not None and hit.tier == "exact"
        assert len(cache) == 0
        await cache.aclose()

    asyncio.run(run())


def test_the_sentence_transformers_adapter_says_which_texts_it_cuts() -> None:
    """The real all-MiniLM-L6-v2 (the embed extra): it reads 256 tokens, and says so."""
    from hnswcache.embed import default_embedder

    emb = default_embedder()
    assert emb.max_tokens == 256
    texts = ["a short question", LONG_A, "word " * 250, "word " * 260, "日本語" * 90]
    assert emb.truncated(texts) == [False, True, False, True, True]
    a, b = emb([LONG_A, LONG_B])
    assert float(a @ b) > 0.999  # (the review's finding: one vector for both)
    cache = SemanticCache(emb, store="memory", threshold=0.95)
    cache.set(LONG_A, "30 days")
    assert cache.get(LONG_B) is None
    assert cache.get(LONG_A) is not None
    cache.close()


def test_the_default_model_s_tokenizer_alone_cuts_as_the_model_does() -> None:
    """What a cache with the default embedder checks given embeddings, without loading the
    model: the same answers as the loaded model's ``truncated()``."""
    from hnswcache.embed import default_embedder, default_lengths

    texts = ["a short question", LONG_A, "word " * 250, "word " * 253, "word " * 254,
             "日本語" * 90, "é" * 300, "\ud800 half" * 60, "한국어 문장" * 60, ""]
    assert default_lengths.truncated(texts) == default_embedder().truncated(texts)
    assert default_lengths.max_tokens == 256


def test_a_long_cached_miss_is_tokenized_once() -> None:
    """A ``@cached`` miss asks whether its prompt is cut at its lookup, when deciding to
    coalesce, and at its write: a long prompt was tokenized up to three times. The adapter now
    remembers its last answers."""
    from hnswcache.embed import default_embedder

    emb = default_embedder()
    emb.truncated([LONG_A])  # (makes the adapter's own tokenizer)
    real = emb._tok
    asked: list[int] = []

    def counting(texts: Any, **kwargs: Any) -> Any:
        asked.append(len(texts))
        return real(texts, **kwargs)

    prompt = CONTEXT.replace("supplier", "carrier") + " Question: who signs the delivery?"
    emb._tok = counting
    try:
        cache = SemanticCache(emb, store="memory", threshold=0.95)
        calls = []

        @cache.cached()
        def answer(p: str) -> str:
            calls.append(p)
            return "the driver"

        assert answer(prompt) == "the driver" and calls == [prompt]
        assert asked == [1]  # was [1, 1] (and a third ask on a store that coalesces)
        assert answer(prompt) == "the driver" and len(calls) == 1  # (exact: not asked)
        assert cache.stats()["exact_only"] >= 1 and asked == [1]
        cache.close()
    finally:
        emb._tok = real


def test_the_wordpiece_bound_never_says_a_text_fits_when_it_does_not() -> None:
    """``wordpiece_fits`` spares tokenizing (~110 µs for 300 characters) the texts that
    surely fit the default model's 256 tokens; it must never say so of a text that does not.
    Checked at the tightest limit each text can fail (its own token count - 1) on real
    requests and on random text of every script, Hangul, combining marks and characters
    with the longest canonical decompositions."""
    from hnswcache.embed import default_lengths, wordpiece_fits

    assert default_lengths.truncated(["warm up", LONG_A]) == [False, True]
    tok = default_lengths._tok  # (loaded for LONG_A: "warm up" surely fits)
    rng = np.random.default_rng(7)
    texts = [CONTEXT, LONG_A, "word " * 300, "a" * 400, ""]
    sgd = ROOT.parent / "shared" / "data" / "sgd" / "texts_base.txt"
    if sgd.exists():
        texts += sgd.read_text().splitlines()[:3000]
    special = [0x1F82, 0x0F73, 0x0F75, 0x0F81, 0x1E9B, 0xFB2C, 0xFDFA, 0x3300, 0xFB01, 0x2028]
    for _ in range(4000):
        cps = []
        for _ in range(int(rng.integers(1, 60))):
            r = rng.random()
            cps.append(int(rng.integers(0x20, 0x7F)) if r < 0.3
                       else int(rng.integers(0xAC00, 0xD7A4)) if r < 0.5
                       else int(rng.integers(0x0300, 0x0370)) if r < 0.6
                       else special[int(rng.integers(len(special)))] if r < 0.7
                       else int(rng.integers(0xA0, 0x30000)))
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    for t in texts:
        n = len(tok.encode(t, add_special_tokens=True).ids)
        assert not wordpiece_fits(t, n - 1), (n, t[:60])
    # What it spares: a 300-character English prompt, and up to 254 non-space characters.
    prompt = ("How do I reset the password of my account when the email it was registered "
              "with no longer exists? ") * 3
    assert len(prompt) > 250 and wordpiece_fits(prompt, 256)
    assert wordpiece_fits("x" * 254, 256) and not wordpiece_fits("x" * 255, 256)


def test_a_very_long_prompt_is_judged_on_its_start() -> None:
    """A 1 MiB prompt was tokenized whole to learn it is cut (~0.9 s, on an async cache's
    event loop: a review). Its first 8 KiB, cut at whitespace, already have too many
    tokens; the whole text is tokenized only when they do not. The answers equal the
    whole text's token count, from the tokenizer itself, on long texts of each kind."""
    from hnswcache.embed import _RecentCuts, default_lengths, wordpiece_cuts

    assert default_lengths.truncated([LONG_A]) == [True]
    tok = default_lengths._tok

    def count(batch: list[str]) -> list[int]:
        sizes.extend(len(t) for t in batch)
        return [len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=True)]

    texts = [
        "word " * 200_000,  # 1 MiB: judged on its start
        ("x" * 5000 + " ") * 3,  # 15k characters, 3 words of [UNK]: fits
        "y" * 9000,  # one word, no whitespace to cut at: counted whole
        "日本語の文章です。" * 1000,  # no whitespace either
        "ab\n" * 4000 + "end",  # cut at a newline
        ("z" * 8000 + " ") + "word " * 300,  # its start fits, the rest does not
        "mot\xa0" * 100_000,  # no-break spaces
        "語" * 300_000,  # CJK without spaces: each ideograph a word
        "a\u3000b\u2028" * 100_000,  # ideographic space, line separator
        "x\x1cy " * 2000,  # (U+001C: a space to Python, dropped by BERT)
    ]
    sizes: list[int] = []
    got = wordpiece_cuts(texts, 256, count)
    big = [t for t in texts if len(t) > 100_000]
    assert len(big) == 4 and not any(len(t) in sizes for t in big)  # (never whole)
    truth = [len(tok.encode(t, add_special_tokens=True).ids) > 256 for t in texts]
    assert got == truth == [True, False, False, True, True, True, True, True, True, True]
    default_lengths._recent = _RecentCuts()
    assert default_lengths.truncated(texts) == truth


def test_the_default_embedder_checks_long_prompts_given_embeddings_without_loading(
        store_url: str, ns: str) -> None:
    """A cache with the default embedder, given the vectors (computed elsewhere), took every
    prompt as read whole, since the model was not loaded to ask: two long prompts with one
    context and the same (cut) vector answered each other at similarity 1.0. It now asks the
    default model's tokenizer alone."""
    rng = np.random.default_rng(5)
    v, w = rng.standard_normal((2, 384)).astype(np.float32)
    store: Any = MemoryStore(ns) if store_url == "memory" else store_url
    cache = SemanticCache(store=store, namespace=ns, threshold=0.9)
    cache.set("what is the refund policy", "14 days", embedding=w)
    cache.set(LONG_A, "30 days", embedding=v)
    assert cache.get(LONG_B, embedding=v) is None  # was: a semantic hit at 1.0
    hit = cache.get(LONG_A, embedding=v)
    assert hit is not None and hit.tier == "exact" and hit.response == "30 days"
    semantic = cache.get("what is the refund policy please", embedding=w)
    assert semantic is not None and semantic.tier == "semantic"
    assert cache.stats()["exact_only"] == 2  # the set and the lookup of LONG_B
    assert cache._core.embedder is None  # (the model was not loaded for it)
    cache.close()


def test_an_exact_hit_given_its_embedding_is_not_tokenized() -> None:
    """A lookup given embeddings asked whether each prompt was cut before its store read,
    exact hits included (~120 µs for a first-seen 500-character prompt, more than the
    lookup: a review). A prompt the replica holds under its exact key is asked only if
    that read misses."""
    from hnswcache.embed import _RecentCuts, default_lengths, wordpiece_fits

    v = np.random.default_rng(8).standard_normal(384).astype(np.float32)
    # ~120 tokens: read whole, but too long for the bound to tell without tokenizing
    prompt = " ".join(f"term{i} of the vendor contract" for i in range(20)) + "?"
    assert not wordpiece_fits(prompt, 256) and default_lengths.truncated([prompt]) == [False]
    store = MemoryStore("exact")
    cache = SemanticCache(store=store, namespace="exact", threshold=0.9)
    other = SemanticCache(store=store, namespace="exact", threshold=0.9)
    cache.set(prompt, "each May", embedding=v)
    real, asked = default_lengths._tok, []

    class Counting:
        def encode_batch(self, texts: Any, **kwargs: Any) -> Any:
            asked.append(len(texts))
            return real.encode_batch(texts, **kwargs)

    default_lengths._tok, default_lengths._recent = Counting(), _RecentCuts()
    try:
        hit = cache.get(prompt, embedding=v)  # (as another process would: nothing known)
        assert hit is not None and hit.tier == "exact" and asked == []  # was [1]
        assert other.delete(hit.key)  # (this replica still holds it: predicted a hit...)
        assert cache.get(prompt, embedding=v) is None  # (...its exact read missed: asked)
        assert asked == [1]
    finally:
        default_lengths._tok = real
    cache.close()
    other.close()


def test_a_first_lookup_of_other_sized_vectors_is_not_checked_with_the_default_model(
        ) -> None:
    """Before the replica knew its dimension, a lookup given 768-d vectors was checked
    against MiniLM's limit (the rule for 384-d ones) until a read taught it the size:
    the same prompt missed, then hit (a review). The vectors' own size decides."""
    store = MemoryStore("dims")
    reader = SemanticCache(store=store, namespace="dims", threshold=0.9)
    assert reader.get("warm up", embedding=np.ones(768, np.float32)) is None  # (empty)
    writer = SemanticCache(store=store, namespace="dims", threshold=0.9)
    v = np.random.default_rng(9).standard_normal(768).astype(np.float32)
    writer.set(LONG_A, "30 days", embedding=v)
    first = reader.get(LONG_B, embedding=v)  # (its read brings the writer's entry)
    assert first is not None and first.tier == "semantic"
    assert reader.stats()["exact_only"] == 0
    writer.close()
    reader.close()


def test_vectors_of_another_size_are_not_checked_with_the_default_model() -> None:
    """Given 768-d vectors, the default embedder (384-d) did not make them: its tokenizer
    says nothing about what made them, so prompts are taken as read whole, as before."""
    v = np.random.default_rng(6).standard_normal(768).astype(np.float32)
    cache = SemanticCache(store="memory", threshold=0.9)
    cache.set(LONG_A, "30 days", embedding=v)
    hit = cache.get(LONG_B, embedding=v)
    assert hit is not None and hit.tier == "semantic"
    assert cache.stats()["exact_only"] == 0
    cache.close()


def test_a_long_entry_written_without_the_mark_answers_no_other_prompt(
    valkey_server: Any, ns: str
) -> None:
    """An entry written before the mark existed (or by a process whose embedder does not
    say what it cuts) has no exact_only field: its prompt is asked of this cache's
    embedder when it comes up as a candidate (a review: a short prompt got such a long
    entry's answer at 0.89 with the real model)."""
    url = valkey_server.url
    writer = SemanticCache(PrefixEmbedder(), store=url, namespace=ns, threshold=0.9)
    key = writer.set(LONG_A, "30 days")
    r = redis.Redis.from_url(url)
    r.hdel(keys_for(ns)["entry"] + key, "exact_only")  # (as an older version wrote it)
    reader = SemanticCache(PrefixEmbedder(), store=url, namespace=ns, threshold=0.9)
    head = " ".join(CONTEXT.split()[:40])  # (the long prompt's vector is this text's)
    assert reader.get(head) is None
    assert reader.get(LONG_A) is not None  # (its own prompt: the exact tier)
    for c in (writer, reader):
        c.close()


class FlakyTruncation(PrefixEmbedder):
    def truncated(self, texts: list[str]) -> list[bool]:
        raise ConnectionError("tokenizer service down")


def test_a_failing_truncated_is_an_embedder_failure_not_an_exception() -> None:
    """It escaped get/get_many/set of a non-strict cache; now counted as an embedder error,
    and the prompts are taken as cut (the exact tier only: the safe side)."""
    store = MemoryStore("flaky")
    SemanticCache(PrefixEmbedder(), store=store, namespace="flaky").set(
        "what is the refund policy", "14 days")  # (an indexed entry: lookups search)
    cache = SemanticCache(FlakyTruncation(), store=store, namespace="flaky", threshold=0.9)
    assert cache.get("what is the refund policy") is not None  # (exact)
    assert cache.get("what is the refund policy please") is None  # (not searched)
    assert cache.get_many(["a", "b"]) == [None, None]
    cache.set("another question", "kept for its own prompt")
    assert cache.get("another question") is not None
    assert cache.stats()["embed_errors"] == 3  # (two lookups that would search, one set)
    strict = SemanticCache(FlakyTruncation(), store="memory", strict=True)
    with pytest.raises(ConnectionError):
        strict.set("q", "a")


def test_the_async_cache_checks_a_long_prompt_while_another_task_embeds(ns: str) -> None:
    """The length check used the model's lock, held by a whole encode: an async lookup of
    a long prompt waited on the event loop for another task's embedding (5 s in a review).
    The check has a tokenizer of its own."""
    import time

    from hnswcache.embed import default_embedder

    emb = default_embedder()

    async def run() -> float:
        cache = AsyncSemanticCache(emb, store="memory", namespace=ns)
        await cache.set("seed question", "seed")
        many = [(f"question number {i} about the supplier contract", "a") for i in range(600)]
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        writing = asyncio.create_task(cache.set_many(many))  # (encodes in a worker thread)
        await asyncio.sleep(0.2)
        assert await cache.get(LONG_A) is None
        await writing
        tick.cancel()
        await cache.aclose()
        return max(gaps)

    assert asyncio.run(run()) < 0.5


def test_a_row_checked_as_an_exact_hit_is_not_searched_ahead_if_another_thread_drops_it(
        ) -> None:
    """A lookup given embeddings asks about the length of the prompts the replica does not
    hold under their exact key, then searches those ahead of its store read. A prompt held
    there (not asked about), whose entry another thread's repair dropped meanwhile, was
    searched ahead unchecked: LONG_A, written unmarked by an older writer, then answered
    with SHORT's answer at 1.0 (a review's reproduction). Rows not asked about wait for the
    read."""
    class Hooked(PrefixEmbedder):
        report, hook = True, None

        def truncated(self, texts: list[str]) -> list[bool]:
            if self.hook is not None:
                hook, self.hook = self.hook, None
                hook()
            return [self.report and cut for cut in super().truncated(texts)]

    store, emb = MemoryStore("race"), Hooked()
    other = SemanticCache(emb, store=store, namespace="race")
    cache = SemanticCache(emb, store=store, namespace="race", threshold=0.9, sync_interval=60)
    short = " ".join(LONG_A.split()[:40])  # read whole; the vector of LONG_A's start
    emb.report = False
    key_a = other.set(LONG_A, "LONG_A's own answer")  # (unmarked: an older writer)
    emb.report = True
    other.set(short, "the short prompt's answer")
    cache.sync()
    core = cache._core
    cid = core.key(LONG_A, None)[0]
    assert cid in core.where
    cache.get("warm up")  # (its log read done: the next lookup's read is not due for 60 s)
    cache.set("an unrelated prompt", "r")
    other.delete(key_a)

    def another_thread_repairs() -> None:  # (a lookup that found LONG_A gone)
        core.repair_remove([cid], core.gen)

    emb.hook = another_thread_repairs
    hits = cache.get_many([LONG_A, LONG_B], embeddings=emb([LONG_A, LONG_B]))
    assert emb.hook is None and cid not in core.where  # (the repair ran mid-lookup)
    assert hits == [None, None]  # was: LONG_A answered with the short prompt's answer
    other.close()
    cache.close()

