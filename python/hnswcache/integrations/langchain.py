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

Chat models pass their messages serialised as JSON; :func:`prompt_text` turns plain text
messages into ``"human: ..."`` lines so that what is embedded and compared is the
conversation, not the JSON around it (messages with tool calls or non-text content are kept
as they are). Generations are stored as JSON (``ChatGeneration`` messages with
``message_to_dict``), so chat models get their messages back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..cache import AsyncSemanticCache, SemanticCache

try:
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.messages import message_to_dict, messages_from_dict
    from langchain_core.outputs import ChatGeneration, Generation
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hnswcache.integrations.langchain needs langchain-core: "
        "pip install 'hnswcache[langchain]'"
    ) from exc

__all__ = ["HnswSemanticLLMCache", "prompt_text"]

log = logging.getLogger("hnswcache.integrations.langchain")

_PLAIN_MESSAGE_KEYS = {"content", "type", "id"}


def prompt_text(prompt: str) -> str:
    """The text compared for ``prompt``: LangChain's serialised chat messages become one
    ``"<type>: <content>"`` line per message; anything else is returned unchanged."""
    if not prompt.startswith("[{"):
        return prompt
    try:
        items = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(items, list) or not items:
        return prompt
    lines = []
    for item in items:
        if not isinstance(item, dict) or item.get("lc") != 1:
            return prompt
        kwargs = item.get("kwargs")
        if not isinstance(kwargs, dict):
            return prompt
        content = kwargs.get("content")
        extra = {k for k, v in kwargs.items() if v not in (None, "", {}, [])}
        if not isinstance(content, str) or not extra <= _PLAIN_MESSAGE_KEYS:
            return prompt  # tool calls, names, images...: compare the exact JSON
        ids = item.get("id")
        kind = kwargs.get("type") or (ids[-1] if isinstance(ids, list) and ids else "message")
        lines.append(f"{kind}: {content}")
    return "\n".join(lines)


def _dump(generations: Sequence[Generation]) -> str:
    out: list[dict[str, Any]] = []
    for g in generations:
        if isinstance(g, ChatGeneration):
            out.append({"chat": message_to_dict(g.message), "info": g.generation_info})
        else:
            out.append({"text": g.text, "info": g.generation_info})
    return json.dumps(out, default=str)


def _load(payload: str) -> list[Generation] | None:
    try:
        out: list[Generation] = []
        for item in json.loads(payload):
            if "chat" in item:
                message = messages_from_dict([item["chat"]])[0]
                out.append(ChatGeneration(message=message, generation_info=item["info"]))
            else:
                out.append(Generation(text=item["text"], generation_info=item["info"]))
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
        text: maps LangChain's prompt string to the text that is cached and embedded
            (default :func:`prompt_text`).
    """

    def __init__(
        self,
        cache: SemanticCache | None = None,
        *,
        async_cache: AsyncSemanticCache | None = None,
        ttl: float | None = None,
        text: Callable[[str], str] = prompt_text,
        **cache_kwargs: Any,
    ) -> None:
        if cache is not None and cache_kwargs:
            raise TypeError("give a SemanticCache or its arguments, not both")
        if cache is None and async_cache is None:
            cache = SemanticCache(**cache_kwargs)
        self.cache = cache
        self.async_cache = async_cache
        self.ttl = ttl
        self._text = text

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
        hit = self._sync().get(self._text(prompt), scope=self._scope(llm_string))
        return None if hit is None else _load(hit.response)

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Cache ``return_val`` (a list of generations) for ``prompt`` under ``llm_string``."""
        self._sync().set(
            self._text(prompt), _dump(return_val), ttl=self.ttl, scope=self._scope(llm_string)
        )

    def clear(self, **kwargs: Any) -> None:
        """Delete every cached answer (``llm_string=...`` deletes one model's only)."""
        llm_string = kwargs.get("llm_string")
        self._sync().clear(None if llm_string is None else self._scope(llm_string))

    # ------------------------------------------------------------------ async
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        if self.async_cache is None:
            return await asyncio.to_thread(self.lookup, prompt, llm_string)
        hit = await self.async_cache.get(self._text(prompt), scope=self._scope(llm_string))
        return None if hit is None else _load(hit.response)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        if self.async_cache is None:
            await asyncio.to_thread(self.update, prompt, llm_string, return_val)
            return
        await self.async_cache.set(
            self._text(prompt), _dump(return_val), ttl=self.ttl, scope=self._scope(llm_string)
        )

    async def aclear(self, **kwargs: Any) -> None:
        if self.async_cache is None:
            await asyncio.to_thread(self.clear, **kwargs)
            return
        llm_string = kwargs.get("llm_string")
        await self.async_cache.clear(None if llm_string is None else self._scope(llm_string))
