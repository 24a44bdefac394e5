"""A LangChain LLM cache on :class:`hnswcache.SemanticCache`.

::

    from langchain_core.globals import set_llm_cache
    from hnswcache import SemanticCache
    from hnswcache.integrations.langchain import HnswSemanticLLMCache

    set_llm_cache(HnswSemanticLLMCache(SemanticCache(store="redis://localhost:6379")))

Every entry is scoped by LangChain's ``llm_string`` (the model and its parameters), so an
answer cached for one model or temperature never answers another. Within a scope a lookup
is exact first (same normalised prompt), then semantic (nearest cached prompt at or above
the cache's cosine-similarity threshold).

Chat models pass their messages serialised as JSON. :func:`prompt_key` reads them the way
:func:`hnswcache.chat.chat_key` reads a chat request: the last human message is the text
matched semantically, and everything before it (system messages, earlier turns, tool
calls) goes into a fingerprint in the scope, a hard wall. An answer is then reused only for
a paraphrase of the last question asked after the same conversation. (Until 2026-12-05 the
whole conversation was one text: two conversations that shared a long history matched each
other whatever their last questions, and an AI message with metadata made the raw JSON the
text.) Message ids and response/usage metadata are not part of the key. Generations are
stored as JSON (``ChatGeneration`` messages with ``message_to_dict``), so chat models get
their messages back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

from .._cache_core import CacheCore, Lookup
from ..cache import AsyncSemanticCache, SemanticCache
from ..chat import chat_key

try:
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.messages import BaseMessageChunk, message_to_dict, messages_from_dict
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        Generation,
        GenerationChunk,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hnswcache.integrations.langchain needs langchain-core: "
        "pip install 'hnswcache[langchain]'"
    ) from exc

__all__ = ["HnswSemanticLLMCache", "prompt_key"]

log = logging.getLogger("hnswcache.integrations.langchain")

# Misses whose vectors wait for their update() (see HnswSemanticLLMCache._vectors).
_MEMO_SIZE = 256

# LangChain message types -> chat roles.
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool",
          "function": "function"}
# Fields that say nothing of what was asked or answered: ids, token counts, provider data.
_METADATA = {"id", "type", "response_metadata", "usage_metadata", "example"}


def _message(item: Any) -> dict[str, Any] | None:
    """A serialised LangChain message as ``{"role", "content", ...}`` (what the answer
    depends on, metadata dropped); ``None`` if it is not one."""
    if not isinstance(item, dict) or item.get("lc") != 1:
        return None
    kwargs = item.get("kwargs")
    ids = item.get("id")
    if not isinstance(kwargs, dict) or not isinstance(ids, list) or not ids:
        return None
    kind = kwargs.get("type") or str(ids[-1]).removesuffix("Chunk").removesuffix("Message")
    kind = str(kind).lower()
    role = kwargs.get("role") if kind == "chat" else _ROLES.get(kind, kind)
    if not isinstance(role, str):
        return None
    out = {"role": role, "content": kwargs.get("content")}
    out.update({k: v for k, v in kwargs.items()
                if k not in _METADATA and k not in out and v not in (None, "", {}, [])})
    return out


def prompt_key(prompt: str) -> tuple[str, dict[str, Any]]:
    """``(text, scope)`` for LangChain's prompt string: for serialised chat messages, the
    last human message and a ``chat`` fingerprint of the rest (:func:`chat_key`); for
    anything else (an LLM prompt), the prompt itself and no scope."""
    if not prompt.startswith("[{"):
        return prompt, {}
    try:
        items = json.loads(prompt)
    except ValueError:
        return prompt, {}
    messages = [_message(i) for i in items] if isinstance(items, list) else [None]
    if not messages or any(m is None for m in messages):
        return prompt, {}
    msgs = cast(list[dict[str, Any]], messages)
    try:
        return chat_key(msgs)
    except (TypeError, ValueError):  # no human message, or content of another shape
        pass
    # No human message (a system-only prompt): match on the last message's text, the rest
    # fingerprinted, and the last one's role too (so it never answers a user turn). The
    # whole JSON as the text, in one shared scope, let its boilerplate carry similarity:
    # "Translate into French: the invoice is overdue" got "...: good morning"'s answer.
    last = {**msgs[-1], "role": "user", "hc_role": msgs[-1]["role"]}
    try:
        return chat_key([*msgs[:-1], last])
    except (TypeError, ValueError):  # content of another shape: only the same request
        digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16)
        return prompt, {"chat": "whole-" + digest.hexdigest()}


def _storable(text: str, value: str) -> bool:
    """Whether an answer is stored: not one longer than the cache's readers accept (the
    model call is done; LangChain gets its result, uncached, not an error)."""
    why = CacheCore.too_long(text, value)
    if why is not None:
        log.info("an answer is not cached: %s", why)
    return why is None


def _refused(cache: SemanticCache | AsyncSemanticCache, exc: ValueError) -> None:
    """A write the cache refused after the model answered: logged, or raised if strict."""
    if cache.strict:
        raise exc
    log.error("an answer is not cached: %s", exc)


def _clear_scope(kwargs: dict[str, Any]) -> str | None:
    """``clear(**kwargs)``'s ``llm_string`` (``None``: every answer)."""
    unknown = sorted(set(kwargs) - {"llm_string"})
    if unknown:
        raise TypeError(f"clear() takes only llm_string=, got {', '.join(unknown)}")
    llm_string = kwargs.get("llm_string")
    if llm_string is not None and not isinstance(llm_string, str):
        raise TypeError(f"llm_string must be a str, got {type(llm_string).__name__}")
    return llm_string


def _dump(generations: Sequence[Generation]) -> str:
    out: list[dict[str, Any]] = []
    for g in generations:
        item: dict[str, Any]
        if isinstance(g, ChatGeneration):
            item = {"chat": message_to_dict(g.message), "info": g.generation_info}
        else:
            item = {"text": g.text, "info": g.generation_info}
        if isinstance(g, (ChatGenerationChunk, GenerationChunk)):
            item["chunk"] = True  # (a streamed answer comes back as the chunk it was)
        out.append(item)
    return json.dumps(out, default=str)


def _load(payload: str) -> list[Generation] | None:
    try:
        out: list[Generation] = []
        for item in json.loads(payload):
            chunk = item.get("chunk") is True
            if "chat" in item:
                message = messages_from_dict([item["chat"]])[0]
                if chunk:  # (stored from a chunk: its message is the chunk class too)
                    out.append(ChatGenerationChunk(message=cast(BaseMessageChunk, message),
                                                   generation_info=item["info"]))
                else:
                    out.append(ChatGeneration(message=message, generation_info=item["info"]))
            else:
                plain = GenerationChunk if chunk else Generation
                out.append(plain(text=item["text"], generation_info=item["info"]))
    except Exception as exc:  # a foreign or damaged entry is a miss, never an error
        log.warning("ignoring a cache entry that is not a list of generations: %s", exc)
        return None
    return out


class HnswSemanticLLMCache(BaseCache):  # type: ignore[misc]
    """LangChain ``BaseCache`` over :class:`~hnswcache.SemanticCache`.

    Args:
        cache: the semantic cache used by ``lookup``/``update``/``clear`` (and by their async
            twins when ``async_cache`` is not given, in a worker thread). Built from
            ``cache_kwargs`` (``SemanticCache(**cache_kwargs)``) when neither is given.
        async_cache: an :class:`~hnswcache.AsyncSemanticCache` used natively by
            ``alookup``/``aupdate``/``aclear``. Given alone, the sync methods raise.
        ttl: seconds a cached answer lives (``None``: the cache's default).
        key: maps LangChain's prompt string to the text that is cached and embedded and
            the scope it is cached in, next to ``llm_string`` (default :func:`prompt_key`).
    """

    def __init__(
        self,
        cache: SemanticCache | None = None,
        *,
        async_cache: AsyncSemanticCache | None = None,
        ttl: float | None = None,
        key: Callable[[str], tuple[str, dict[str, Any]]] = prompt_key,
        **cache_kwargs: Any,
    ) -> None:
        if (cache is not None or async_cache is not None) and cache_kwargs:
            raise TypeError("give a cache or its arguments, not both (unused: "
                            f"{', '.join(sorted(cache_kwargs))})")
        if cache is not None and not isinstance(cache, SemanticCache):
            raise TypeError(f"cache must be a SemanticCache, got {type(cache).__name__} "
                            "(an AsyncSemanticCache goes in async_cache=)")
        if async_cache is not None and not isinstance(async_cache, AsyncSemanticCache):
            raise TypeError("async_cache must be an AsyncSemanticCache, got "
                            f"{type(async_cache).__name__}")
        if ttl is not None:  # (checked now: at update() the model has been paid already)
            CacheCore.check_ttl(ttl)
        if cache is None and async_cache is None:
            cache = SemanticCache(**cache_kwargs)
        self.cache = cache
        self.async_cache = async_cache
        self.ttl = ttl
        self._key = key
        # A miss's vector, kept from lookup() for the update() that follows it (LangChain
        # calls the model in between): the prompt is embedded once, not twice (a paid
        # embedding API charged every miss twice). A few hundred at most, oldest dropped.
        self._vectors: OrderedDict[bytes, Any] = OrderedDict()
        self._vectors_lock = threading.Lock()

    @staticmethod
    def _memo_key(prompt: str, llm_string: str) -> bytes:
        h = hashlib.blake2b(digest_size=16, person=b"hc-lc-miss")
        h.update(llm_string.encode("utf-8", "surrogatepass") + b"\0")
        h.update(prompt.encode("utf-8", "surrogatepass"))
        return h.digest()

    def _remember(self, prompt: str, llm_string: str, found: Lookup) -> RETURN_VAL_TYPE | None:
        """A lookup's answer; a miss's vector kept for its update()."""
        if found.hit is not None:
            return _load(found.hit.response)
        if found.embedding is not None:
            with self._vectors_lock:
                self._vectors[self._memo_key(prompt, llm_string)] = found.embedding
                while len(self._vectors) > _MEMO_SIZE:
                    self._vectors.popitem(last=False)
        return None

    def _recall(self, prompt: str, llm_string: str) -> Any:
        """The vector a lookup of this prompt embedded, if one was kept (taken)."""
        with self._vectors_lock:
            return self._vectors.pop(self._memo_key(prompt, llm_string), None)

    def _lookup_key(self, prompt: str, llm_string: str) -> tuple[str, dict[str, Any]]:
        text, scope = self._key(prompt)
        return text, {**scope, "llm_string": llm_string}

    @staticmethod
    def _scope(llm_string: str) -> dict[str, Any]:
        return {"llm_string": llm_string}

    def _sync(self) -> SemanticCache:
        if self.cache is None:
            raise TypeError(
                "this HnswSemanticLLMCache has only an AsyncSemanticCache: use the async "
                "methods, or give a SemanticCache too"
            )
        return self.cache

    # ------------------------------------------------------------------ sync
    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """Cached generations for ``prompt`` under ``llm_string``, or ``None``."""
        text, scope = self._lookup_key(prompt, llm_string)
        return self._remember(prompt, llm_string, self._sync().lookup(text, scope=scope))

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Cache ``return_val`` (a list of generations) for ``prompt`` under ``llm_string``.

        Called after the model: a write the cache refuses (an embedder of another
        dimension than the stored entries', say) is logged, and LangChain gets its answer;
        with ``strict=True`` it raises."""
        text, scope = self._lookup_key(prompt, llm_string)
        value = _dump(return_val)
        if not _storable(text, value):
            return
        cache = self._sync()
        vec = self._recall(prompt, llm_string)
        try:
            cache.set(text, value, ttl=self.ttl, scope=scope, embedding=vec)
        except ValueError as exc:
            _refused(cache, exc)

    def clear(self, **kwargs: Any) -> None:
        """Delete every cached answer (``llm_string=...`` deletes one model's only, in
        every conversation). Another keyword is refused (a misspelt ``llm_string`` emptied
        every model's answers)."""
        llm_string = _clear_scope(kwargs)
        if llm_string is None:
            self._sync().clear()
        else:
            self._sync().clear(self._scope(llm_string), within=True)

    # ------------------------------------------------------------------ async
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        if self.async_cache is None:
            return await asyncio.to_thread(self.lookup, prompt, llm_string)
        text, scope = self._lookup_key(prompt, llm_string)
        return self._remember(prompt, llm_string,
                              await self.async_cache.lookup(text, scope=scope))

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        if self.async_cache is None:
            await asyncio.to_thread(self.update, prompt, llm_string, return_val)
            return
        text, scope = self._lookup_key(prompt, llm_string)
        value = _dump(return_val)
        if not _storable(text, value):
            return
        vec = self._recall(prompt, llm_string)
        try:
            await self.async_cache.set(text, value, ttl=self.ttl, scope=scope, embedding=vec)
        except ValueError as exc:
            _refused(self.async_cache, exc)

    async def aclear(self, **kwargs: Any) -> None:
        if self.async_cache is None:
            await asyncio.to_thread(self.clear, **kwargs)
            return
        llm_string = _clear_scope(kwargs)
        if llm_string is None:
            await self.async_cache.clear()
        else:
            await self.async_cache.clear(self._scope(llm_string), within=True)
