"""HnswSemanticLLMCache: langchain-tests' standard cache suites (sync and async), then what
the suites do not cover: scoping by llm_string, semantic hits, chat models through
set_llm_cache, native async, TTL, damaged entries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
pytest.importorskip("pytest_asyncio")

from langchain_core.caches import BaseCache  # noqa: E402
from langchain_core.globals import get_llm_cache, set_llm_cache  # noqa: E402
from langchain_core.language_models import FakeListChatModel, FakeListLLM  # noqa: E402
from langchain_core.load import dumps  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, Generation  # noqa: E402
from langchain_tests.integration_tests import (  # noqa: E402
    AsyncCacheTestSuite,
    SyncCacheTestSuite,
)

from hnswcache import AsyncSemanticCache, SemanticCache  # noqa: E402
from hnswcache.embed import HashEmbedder  # noqa: E402
from hnswcache.integrations.langchain import HnswSemanticLLMCache, prompt_key  # noqa: E402
from hnswcache.store.memory import MemoryStore  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make(threshold: float = 0.8, **kw: object) -> HnswSemanticLLMCache:
    return HnswSemanticLLMCache(
        SemanticCache(HashEmbedder(128), store="memory", threshold=threshold, **kw)  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------- standard suites
# The async suite's tests are coroutines without a marker; its one sync test is then told
# apart by pytest-asyncio with a warning, which is expected here.
def async_suite(cls: type) -> type:
    """Run a class's coroutine tests with pytest-asyncio."""
    cls = pytest.mark.asyncio(cls)
    return pytest.mark.filterwarnings("ignore:The test <Function test_no_overrides")(cls)

class TestStandardSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self) -> BaseCache:
        return make()


@async_suite
class TestStandardAsyncThreaded(AsyncCacheTestSuite):
    """Async twins over a sync SemanticCache (worker thread)."""

    @pytest.fixture
    def cache(self) -> BaseCache:
        return make()


@async_suite
class TestStandardAsyncNative(AsyncCacheTestSuite):
    """Async twins over an AsyncSemanticCache."""

    @pytest.fixture
    def cache(self) -> BaseCache:
        return HnswSemanticLLMCache(
            async_cache=AsyncSemanticCache(HashEmbedder(128), store="memory", threshold=0.8)
        )


# ---------------------------------------------------------------------- behaviour
def test_scoped_by_llm_string() -> None:
    c = make()
    c.update("what is the capital of france", "model=a temperature=0", [Generation(text="Paris")])
    assert c.lookup("what is the capital of france", "model=a temperature=0") == [
        Generation(text="Paris")
    ]
    assert c.lookup("what is the capital of france", "model=a temperature=1") is None
    assert c.lookup("what is the capital of france", "model=b temperature=0") is None
    c.update("what is the capital of france", "model=b temperature=0", [Generation(text="P")])
    c.clear(llm_string="model=a temperature=0")  # one model's answers only
    assert c.lookup("what is the capital of france", "model=a temperature=0") is None
    assert c.lookup("what is the capital of france", "model=b temperature=0") == [
        Generation(text="P")
    ]


def test_semantic_hit_on_a_near_duplicate_prompt() -> None:
    c = make(threshold=0.7)
    c.update("how do I reverse a list in python", "llm", [Generation(text="lst[::-1]")])
    assert c.lookup("how do i reverse a list in python?", "llm") == [Generation(text="lst[::-1]")]
    assert c.lookup("best pizza in naples", "llm") is None


def test_chat_model_answers_from_the_cache() -> None:
    previous = get_llm_cache()
    cache = make()
    set_llm_cache(cache)
    try:
        model = FakeListChatModel(responses=["first answer", "second answer"])
        msg = [SystemMessage(content="be brief"), HumanMessage(content="tell me a joke")]
        assert model.invoke(msg).content == "first answer"
        again = model.invoke(msg)  # served by the cache: the fake model is not called
        assert isinstance(again, AIMessage) and again.content == "first answer"
        other = FakeListChatModel(responses=["other model"], sleep=0.0)
        other_msg = [HumanMessage(content="tell me a joke")]
        assert other.invoke(other_msg).content == "other model"
        hit = cache.lookup(dumps(msg), model._get_llm_string())
        assert hit is not None and isinstance(hit[0], ChatGeneration)
        assert hit[0].message.content == "first answer"
    finally:
        set_llm_cache(previous)


def test_llm_answers_from_the_cache() -> None:
    model = FakeListLLM(responses=["a", "b"], cache=make())
    assert model.invoke("say something") == "a"
    assert model.invoke("say something") == "a"
    assert model.invoke("say something else entirely now") == "b"


async def _native_async_roundtrip(clock: Clock) -> None:
    cache = HnswSemanticLLMCache(
        async_cache=AsyncSemanticCache(HashEmbedder(64), store="memory", clock=clock),
        ttl=30,
    )
    gens = [ChatGeneration(message=AIMessage(content="hi")), Generation(text="t")]
    await cache.aupdate("hello", "llm", gens)
    assert await cache.alookup("hello", "llm") == gens
    clock.t += 31
    assert await cache.alookup("hello", "llm") is None  # expired
    await cache.aupdate("hello", "llm", gens)
    await cache.aclear()
    assert await cache.alookup("hello", "llm") is None
    with pytest.raises(TypeError, match="AsyncSemanticCache"):
        cache.lookup("hello", "llm")


@pytest.mark.asyncio
async def test_native_async_with_ttl() -> None:
    await _native_async_roundtrip(Clock())


def test_ttl_expires_answers() -> None:
    clock = Clock()
    c = HnswSemanticLLMCache(
        SemanticCache(HashEmbedder(64), store="memory", clock=clock), ttl=10
    )
    c.update("p", "llm", [Generation(text="x")])
    clock.t += 9
    assert c.lookup("p", "llm") == [Generation(text="x")]
    clock.t += 2
    assert c.lookup("p", "llm") is None


def test_damaged_entry_is_a_miss() -> None:
    c = make()
    assert c.cache is not None
    c.cache.set("p", "not json", scope={"llm_string": "llm"})
    assert c.lookup("p", "llm") is None


def test_prompt_key_matches_the_last_question_within_its_conversation() -> None:
    msgs = [SystemMessage(content="be brief"), HumanMessage(content="hello")]
    text, scope = prompt_key(dumps(msgs))
    assert text == "hello" and set(scope) == {"chat"}
    assert prompt_key(dumps([HumanMessage(content="hello")]))[1] != scope  # no system
    assert prompt_key("plain prompt") == ("plain prompt", {})
    assert prompt_key("[{not json") == ("[{not json", {})
    # Ids and response/usage metadata are not part of the key; tool calls are.
    ai = AIMessage(content="hi!", id="run-1", response_metadata={"model": "m"},
                   usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3})
    ai2 = AIMessage(content="hi!", id="run-2", response_metadata={"model": "m", "x": 1})
    q = HumanMessage(content="and now?")
    assert prompt_key(dumps([ai, q])) == prompt_key(dumps([ai2, q]))
    tool = AIMessage(content="", tool_calls=[{"name": "f", "args": {}, "id": "1"}])
    assert prompt_key(dumps([tool, q]))[1] != prompt_key(dumps([ai, q]))[1]


def _turns(*texts: str) -> str:
    """A conversation of alternating human and AI messages (AI ones with a model's
    metadata, as real models return them)."""
    out = []
    for i, t in enumerate(texts):
        out.append(HumanMessage(content=t) if i % 2 == 0 else AIMessage(
            content=t, id=f"run-{i}-{t[:3]}", response_metadata={"model_name": "m"},
            usage_metadata={"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}))
    return dumps(out)


def test_a_later_turn_never_gets_the_answer_to_another_question() -> None:
    # With the AI message's metadata the whole conversation's JSON was the text: two
    # conversations sharing their start matched at 0.94, whatever the last question.
    c = make(threshold=0.8)
    c.update(_turns("hi", "hello! how can I help?", "how do I delete a file in git"), "llm",
             [Generation(text="git rm <file>")])
    assert c.lookup(_turns("hi", "hello! how can I help?", "what is the capital of peru"),
                    "llm") is None
    # The same question after the same exchange (another run: other ids) is a hit.
    hit = c.lookup(_turns("hi", "hello! how can I help?", "How do I delete a file in git?"),
                   "llm")
    assert hit == [Generation(text="git rm <file>")]
    # ... but not after another exchange, nor alone.
    assert c.lookup(_turns("hey", "hi there", "how do I delete a file in git"), "llm") is None
    assert c.lookup(_turns("how do I delete a file in git"), "llm") is None


def test_one_message_never_collides_with_a_conversation() -> None:
    # "human: ..." lines joined by newlines, whose whitespace the exact tier collapses: one
    # message holding the markers was the same text as the conversation.
    c = make()
    plain = [HumanMessage(content="what is 2+2"), AIMessage(content="4"),
             HumanMessage(content="and 3+3")]
    c.update(dumps(plain), "llm", [Generation(text="6")])
    assert c.lookup(dumps([HumanMessage(content="what is 2+2 ai: 4 human: and 3+3")]),
                    "llm") is None


def test_clear_of_one_llm_string_reaches_every_conversation() -> None:
    c = make()
    for llm in ("a", "b"):
        c.update(_turns("hi", "hello", "tell me a joke"), llm, [Generation(text=llm)])
        c.update("plain prompt", llm, [Generation(text=llm)])
    c.clear(llm_string="a")
    assert c.lookup(_turns("hi", "hello", "tell me a joke"), "a") is None
    assert c.lookup("plain prompt", "a") is None
    assert c.lookup(_turns("hi", "hello", "tell me a joke"), "b") == [Generation(text="b")]
    assert c.lookup("plain prompt", "b") == [Generation(text="b")]


def test_constructor_arguments() -> None:
    c = HnswSemanticLLMCache(embedder=HashEmbedder(32), store="memory")
    assert isinstance(c.cache, SemanticCache)
    with pytest.raises(TypeError):
        HnswSemanticLLMCache(SemanticCache(HashEmbedder(32), store="memory"), store="memory")
    # Checked when built, not at the first update() (after the model was paid for), and
    # arguments a given cache would ignore are refused (they were dropped silently).
    with pytest.raises(ValueError, match="ttl"):
        HnswSemanticLLMCache(SemanticCache(HashEmbedder(32), store="memory"), ttl=0)
    ac = AsyncSemanticCache(HashEmbedder(32), store="memory")
    with pytest.raises(TypeError, match="threshold"):
        HnswSemanticLLMCache(async_cache=ac, threshold=0.99)
    with pytest.raises(TypeError, match="async_cache"):
        HnswSemanticLLMCache(ac)  # type: ignore[arg-type]


def test_a_prompt_without_a_human_message_matches_on_its_own_text() -> None:
    """A system-only prompt was matched as its whole JSON, in one scope shared by all such
    prompts: the boilerplate carried the similarity, and one task got another's answer
    (0.938 with MiniLM for two translation requests whose texts score 0.478)."""
    def system_only(text: str) -> str:
        return dumps([SystemMessage(content=text)])

    text, scope = prompt_key(system_only("Translate into French: good morning"))
    assert text == "Translate into French: good morning"
    # never the scope of a user turn of the same text
    assert scope != prompt_key(dumps([HumanMessage(content=text)]))[1]
    c = make(threshold=0.8)
    c.update(system_only("Translate into French: good morning"), "llm",
             [Generation(text="bonjour")])
    assert c.lookup(system_only("Translate into French: the invoice is overdue"),
                    "llm") is None
    assert c.lookup(system_only("translate into french: good morning"), "llm") == [
        Generation(text="bonjour")]
    assert c.lookup(dumps([HumanMessage(content="Translate into French: good morning")]),
                    "llm") is None


def test_a_lone_surrogate_in_the_history_keeps_its_conversation_apart() -> None:
    """Half an emoji cut upstream made chat_key raise, and the prompt fell back to the
    shared scope, where it got another conversation's answer."""
    def chat(history: str, question: str) -> str:
        return dumps([HumanMessage(content=history), AIMessage(content="ok"),
                      HumanMessage(content=question)])

    text, scope = prompt_key(chat("trip to Portugal \ud83c", "When should I go?"))
    assert text == "When should I go?" and set(scope) == {"chat"}
    assert scope != prompt_key(chat("trip to Norway", "When should I go?"))[1]


@pytest.fixture(autouse=True)
def _no_global_cache() -> Iterator[None]:
    previous = get_llm_cache()
    yield
    set_llm_cache(previous)


def test_streamed_generations_come_back_as_the_chunks_they_were() -> None:
    # They came back as their base types (ChatGeneration, Generation): a caller that
    # concatenates chunks (chunk + chunk) failed on a cache hit.
    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk, GenerationChunk

    cache = make()
    llm = "fake-llm"
    cache.update("stream this please", llm, [ChatGenerationChunk(message=AIMessageChunk(
        content="part one"))])
    cache.update("and stream that", llm, [GenerationChunk(text="text part")])
    cache.update("no streaming here", llm, [ChatGeneration(message=AIMessage(content="whole"))])
    (chat,) = cache.lookup("stream this please", llm) or []
    (plain,) = cache.lookup("and stream that", llm) or []
    (whole,) = cache.lookup("no streaming here", llm) or []
    assert type(chat) is ChatGenerationChunk and type(chat.message) is AIMessageChunk
    assert (chat + ChatGenerationChunk(message=AIMessageChunk(content=" two"))).text == (
        "part one two")
    assert type(plain) is GenerationChunk and (plain + GenerationChunk(text="!")).text == (
        "text part!")
    assert type(whole) is ChatGeneration and type(whole.message) is AIMessage


def test_half_an_emoji_in_the_question_is_cached_and_never_breaks_the_call() -> None:
    """A lone surrogate in the prompt an LLM or chat model is asked (text cut mid-emoji
    upstream) made lookup() raise UnicodeEncodeError: the model was never called."""
    llm = FakeListLLM(responses=["a", "b"], cache=make())
    assert llm.invoke("tell me about \ud83c") == "a"
    assert llm.invoke("tell me about \ud83c") == "a"  # (cached)
    chat = FakeListChatModel(responses=["c", "d"], cache=make())
    assert chat.invoke([HumanMessage("tell me about \ud83c")]).content == "c"
    assert chat.invoke([HumanMessage("tell me about \ud83c")]).content == "c"


def test_a_miss_embeds_its_prompt_once() -> None:
    """update() embedded the prompt again although lookup() had just embedded it: a paid
    embedding API was charged twice for every miss (1, 3, 5 calls for three misses)."""
    emb = HashEmbedder(128)
    c = HnswSemanticLLMCache(SemanticCache(emb, store="memory", threshold=0.99))
    llm = FakeListLLM(responses=[f"answer {i}" for i in range(6)], cache=c)
    llm.invoke("the first question")  # (an empty cache: the lookup needs no vector)
    calls = emb.calls
    for i, q in enumerate(["what is the capital of France", "how do I sort a list",
                           "tell me a joke about cats"]):
        assert llm.invoke(q) == f"answer {i + 1}"
        assert emb.calls == calls + i + 1, "one embedding per miss"
    assert llm.invoke("how do I sort a list") == "answer 2"  # (exact: no embedding)
    assert emb.calls == calls + 3


@pytest.mark.asyncio
async def test_a_miss_embeds_its_prompt_once_async() -> None:
    emb = HashEmbedder(128)
    c = HnswSemanticLLMCache(async_cache=AsyncSemanticCache(emb, store="memory",
                                                            threshold=0.99))
    await c.aupdate("seed question", "llm", [Generation(text="seed")])
    calls = emb.calls
    assert await c.alookup("another question entirely", "llm") is None
    await c.aupdate("another question entirely", "llm", [Generation(text="x")])
    assert emb.calls == calls + 1
    assert await c.alookup("another question entirely", "llm") == [Generation(text="x")]
    # the vector kept is the one the prompt was searched with: a paraphrase finds it
    found = await c.async_cache.lookup("another question entirely!!", scope={"llm_string": "llm"})
    assert found.hit is not None and found.hit.tier == "exact"
    sem = await c.async_cache.lookup("another question entirely now",
                                     scope={"llm_string": "llm"}, threshold=0.5)
    assert sem.hit is not None and sem.hit.prompt == "another question entirely"
    assert sem.embedding is not None and sem.embedding.shape == (128,)


def test_clear_refuses_a_keyword_it_does_not_know() -> None:
    """clear(llm="a") (a misspelt llm_string) emptied every model's answers."""
    c = make()
    c.update("plain prompt", "a", [Generation(text="a")])
    c.update("plain prompt", "b", [Generation(text="b")])
    with pytest.raises(TypeError, match="llm_string"):
        c.clear(llm="a")
    with pytest.raises(TypeError, match="llm_string"):
        asyncio.run(c.aclear(llmstring="a"))
    assert c.lookup("plain prompt", "a") == [Generation(text="a")]
    c.clear(llm_string="a")
    assert c.lookup("plain prompt", "a") is None
    assert c.lookup("plain prompt", "b") == [Generation(text="b")]


def test_a_write_the_cache_refuses_after_the_model_answered_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """Entries of another embedder's dimension: lookup() misses (logged), and update()
    raised ValueError after the model was paid, so every call failed."""
    store = MemoryStore()
    SemanticCache(HashEmbedder(64), store=store).set("an old question", "old")
    c = HnswSemanticLLMCache(SemanticCache(HashEmbedder(128), store=store))
    llm = FakeListLLM(responses=["new"], cache=c)
    with caplog.at_level("ERROR", logger="hnswcache.integrations.langchain"):
        assert llm.invoke("a new question") == "new"
    assert "not cached" in caplog.text and "dim" in caplog.text
    strict = HnswSemanticLLMCache(SemanticCache(HashEmbedder(128), store=store, strict=True))
    with pytest.raises(ValueError, match="dim"):
        strict.update("a new question", "llm", [Generation(text="new")])
