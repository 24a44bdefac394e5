"""chat_key: a paraphrase of the last user turn hits only in the same chat context."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.chat import chat_key

from .cache_helpers import Paraphrases


def close_pair(px: Paraphrases, skip: int = 0) -> int:
    """The index of a question/paraphrase pair well above the default threshold."""
    sims = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(px.qv, px.pv)]
    return [i for i, v in enumerate(sims) if v >= 0.92][skip]


def convo(question: str, system: str = "You are terse.", before: int = 1) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i in range(before):
        msgs += [{"role": "user", "content": f"earlier question {i}"},
                 {"role": "assistant", "content": f"earlier answer {i}"}]
    return msgs + [{"role": "user", "content": question}]


def test_the_prompt_is_the_last_user_turn_and_the_rest_is_a_fingerprint() -> None:
    p, s = chat_key(convo("What is HNSW?"), model="m1", params={"temperature": 0, "top_p": 1})
    assert p == "What is HNSW?"
    assert s["model"] == "m1" and len(s["chat"]) == 32
    # Same context, any parameter order: same scope.
    assert chat_key(convo("other words"), model="m1",
                    params={"top_p": 1, "temperature": 0})[1] == s
    differs = [
        chat_key(convo("What is HNSW?", system="You are verbose."), model="m1",
                 params={"temperature": 0, "top_p": 1}),
        chat_key(convo("What is HNSW?", before=2), model="m1",
                 params={"temperature": 0, "top_p": 1}),
        chat_key(convo("What is HNSW?"), model="m2", params={"temperature": 0, "top_p": 1}),
        chat_key(convo("What is HNSW?"), model="m1", params={"temperature": 1, "top_p": 1}),
        chat_key(convo("What is HNSW?"), model="m1", params={"temperature": 0, "top_p": 1},
                 tools=[{"type": "function", "function": {"name": "search"}}]),
        chat_key(convo("What is HNSW?") + [{"role": "assistant", "content": "Prefill:"}],
                 model="m1", params={"temperature": 0, "top_p": 1}),
    ]
    assert all(d[0] == "What is HNSW?" for d in differs)
    assert len({d[1]["chat"] for d in differs} | {s["chat"]}) == len(differs) + 1


def test_history_and_system_options() -> None:
    a = convo("q", before=1)
    b = convo("q", before=3)
    assert chat_key(a)[1] != chat_key(b)[1]
    assert chat_key(a, history=0)[1] == chat_key(b, history=0)[1]
    # history=2 keeps the last exchange only: the same in a and in c, an older start of it.
    c = a[:1] + [{"role": "user", "content": "first"},
                 {"role": "assistant", "content": "reply"}] + a[1:]
    assert chat_key(a)[1] != chat_key(c)[1]
    assert chat_key(a, history=2)[1] == chat_key(c, history=2)[1]
    assert chat_key(a, history=3)[1] != chat_key(c, history=3)[1]
    x, y = convo("q", system="A"), convo("q", system="B")
    assert chat_key(x)[1] != chat_key(y)[1]
    assert chat_key(x, include_system=False)[1] == chat_key(y, include_system=False)[1]
    assert chat_key(a, scope={"tenant": "t1"})[1]["tenant"] == "t1"


def test_content_parts() -> None:
    def with_image(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [
            {"type": "text", "text": "What is in"}, {"type": "text", "text": "this picture?"},
            {"type": "image_url", "image_url": {"url": url}}]}]

    p, s1 = chat_key(with_image("https://x/a.png"))
    assert p == "What is in\nthis picture?"
    _, s2 = chat_key(with_image("https://x/b.png"))
    assert s1 != s2, "two different images must not share answers"


@pytest.mark.parametrize("bad, err", [
    ("hello", TypeError),
    ([{"content": "no role"}], TypeError),
    (["not a mapping"], TypeError),
    ([{"role": "system", "content": "only system"}], ValueError),
    ([{"role": "user", "content": 42}], TypeError),
])
def test_bad_messages(bad: Any, err: type[Exception]) -> None:
    with pytest.raises(err):
        chat_key(bad)


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        chat_key(convo("q"), history=-1)
    with pytest.raises(TypeError):
        chat_key(convo("q"), params={"x": object()})
    with pytest.raises(TypeError):
        chat_key(convo("q"), params={"x": math.nan})
    # From a review: a mapping of tools kept only its names (two schemas, one scope); a
    # scope's own 'chat' or 'model' was overwritten (two conversations, one scope); a deep
    # nesting raised RecursionError.
    with pytest.raises(TypeError, match="tools"):
        chat_key(convo("q"), tools={"search": {"parameters": {"q": "string"}}})
    with pytest.raises(TypeError, match="params"):
        chat_key(convo("q"), params=[("temperature", 0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chat"):
        chat_key(convo("q"), scope={"chat": "conversation-1"})
    with pytest.raises(ValueError, match="model"):
        chat_key(convo("q"), model="m1", scope={"model": "m2"})
    assert chat_key(convo("q"), model="m1", scope={"model": "m1"})[1]["model"] == "m1"
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deeply"):
        chat_key(convo("q"), params={"x": deep})


def test_a_paraphrase_hits_in_the_same_context_only(
    store_url: str, ns: str, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    cache = SemanticCache(px.embedder(), store=store_url, namespace=ns)
    i = close_pair(px)
    p, s = chat_key(convo(px.q[i]), model="m1")
    cache.set(p, "the answer", scope=s)
    p2, s2 = chat_key(convo(px.p[i]), model="m1")
    hit = cache.get(p2, scope=s2)
    assert hit is not None and hit.tier == "semantic" and hit.response == "the answer"
    for other in (chat_key(convo(px.p[i]), model="m2"),
                  chat_key(convo(px.p[i], system="Answer in French."), model="m1"),
                  chat_key(convo(px.p[i], before=0), model="m1")):
        assert cache.get(other[0], scope=other[1]) is None
    cache.close()


def test_cached_with_a_chat_key(paraphrases: Paraphrases) -> None:
    px = paraphrases
    cache = SemanticCache(px.embedder(), store="memory")
    calls: list[str] = []

    @cache.cached(key=lambda messages, model, **params: chat_key(
        messages, model=model, params=params))
    def complete(messages: list[dict[str, Any]], model: str, **params: Any) -> str:
        calls.append(model)
        return f"{model} answer"

    i = close_pair(px, 1)
    assert complete(convo(px.q[i]), "m1", temperature=0) == "m1 answer"
    assert complete(convo(px.p[i]), "m1", temperature=0) == "m1 answer"  # paraphrase: cached
    assert len(calls) == 1
    assert complete(convo(px.p[i]), "m2", temperature=0) == "m2 answer"
    assert complete(convo(px.p[i]), "m1", temperature=0.7) == "m1 answer"
    assert len(calls) == 3, "another model or other parameters must call again"

    @cache.cached(key=lambda messages: 42)
    def broken(messages: list[dict[str, Any]]) -> str:
        return "x"

    with pytest.raises(TypeError, match="key="):
        broken(convo("q"))


def test_async_cached_with_a_chat_key(paraphrases: Paraphrases) -> None:
    px = paraphrases

    async def run() -> None:
        cache = AsyncSemanticCache(px.embedder(), store="memory")
        calls: list[str] = []

        @cache.cached(key=lambda messages, model: chat_key(messages, model=model))
        async def complete(messages: list[dict[str, Any]], model: str) -> str:
            calls.append(model)
            return "a"

        i = close_pair(px, 2)
        await complete(convo(px.q[i]), "m1")
        await complete(convo(px.p[i]), "m1")
        await complete(convo(px.p[i]), "m2")
        assert calls == ["m1", "m2"]
        await cache.close()

    asyncio.run(run())


def test_a_history_longer_than_asked_keeps_every_turn_and_the_last_turn_counts_whole() -> None:
    # history=N with N above the turns there were kept only some of them (a negative slice
    # start): conversations that differed in their first turns shared a key.
    a = [{"role": "user", "content": "write a poem about dogs"},
         {"role": "assistant", "content": "..."},
         {"role": "user", "content": "now in German"}]
    b = [{"role": "user", "content": "what is my name? it is Alice"},
         {"role": "assistant", "content": "..."},
         {"role": "user", "content": "now in German"}]
    for h in (2, 3, 4, 5, 100):
        assert chat_key(a, history=h) != chat_key(b, history=h), h
    assert chat_key(a, history=5) == chat_key(a)
    # The last user turn's other fields (its author's name) count, as earlier turns' do.
    alice = [{"role": "user", "content": "what is my name?", "name": "alice"}]
    bob = [{"role": "user", "content": "what is my name?", "name": "bob"}]
    assert chat_key(alice)[1] != chat_key(bob)[1]
