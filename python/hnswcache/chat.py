"""Cache keys for chat requests: match the last user turn, fingerprint the rest.

A chat completion depends on more than its last question: the system prompt, the tools, the
model and its parameters, and what was said before. Caching on the whole conversation text
makes paraphrases miss; caching on the last turn alone lets an answer leak into a
conversation it does not fit (which is why LiteLLM tells users to turn semantic caching off
for multi-turn traffic). :func:`chat_key` splits a request the way vLLM Semantic Router and
Azure's semantic cache policy do (research notes, gap 8): the last user turn is the prompt
the cache matches semantically; everything else goes into a fingerprint in the scope, and
scopes are hard walls. So an answer is reused only for a paraphrase asked in the same
context::

    prompt, scope = chat_key(messages, model="gpt-4o", params={"temperature": 0})
    hit = cache.get(prompt, scope=scope)

or, for a function ``complete(messages, model, **params)``::

    @cache.cached(key=lambda messages, model, **params: chat_key(
        messages, model=model, params=params))
    def complete(messages, model, **params): ...
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["chat_key"]

_SYSTEM_ROLES = ("system", "developer")


def _canonical(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None
    except RecursionError:
        raise TypeError(f"{what} is nested too deeply to fingerprint") from None


def _split_content(content: Any, i: int) -> tuple[str, list[Any]]:
    """``(text, other parts)`` of a message's content: a string, or a list of parts in the
    OpenAI style (``{"type": "text", "text": ...}``; images and the like are kept whole)."""
    if isinstance(content, str):
        return content, []
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts: list[str] = []
        other: list[Any] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif (isinstance(part, Mapping) and part.get("type") == "text"
                  and isinstance(part.get("text"), str)):
                texts.append(part["text"])
            else:
                other.append(part)
        return "\n".join(texts), other
    raise TypeError(f"messages[{i}]['content'] must be a str or a list of parts, "
                    f"got {type(content).__name__}")


def chat_key(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str | None = None,
    params: Mapping[str, Any] | None = None,
    tools: Sequence[Any] | None = None,
    history: int | None = None,
    include_system: bool = True,
    scope: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(prompt, scope)`` for a chat request, for :meth:`SemanticCache.get` and ``set``.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]`` (OpenAI style; ``content`` a str
            or a list of parts). The last ``user`` message is the prompt.
        model: the model name: part of the scope (readable) and of the fingerprint.
        params: generation parameters the answer depends on (temperature, max_tokens,
            response format...), in any key order.
        tools: the tool or function definitions offered to the model.
        history: how many messages before the last user turn count (system messages
            aside); ``None`` (default) all of them, ``0`` none: a follow-up question then
            matches across conversations.
        include_system: whether system (and ``developer``) messages count.
        scope: more scope of your own (tenant, ...); kept as it is. It may not hold
            ``chat``, nor a ``model`` other than ``model`` (they were overwritten: two
            conversations whose scopes differed there shared their answers).

    Returns:
        The text of the last user turn, and a scope holding ``model`` (if given) and
        ``chat``: a 32-hex-digit BLAKE2b fingerprint of everything else (the system
        messages, the history, non-text parts of the last turn such as images, messages
        after it, the model, params and tools).

    Raises:
        ValueError: no user message, a negative ``history``, or a ``scope`` holding
            ``chat`` or another ``model``.
        TypeError: a malformed message, ``tools`` not a list or ``params`` not a mapping,
            or values that are not JSON-serialisable.
    """
    if tools is not None and (isinstance(tools, (str, bytes, Mapping))
                              or not isinstance(tools, Sequence)):
        # (a mapping of tools kept only its names: two different schemas, one scope)
        raise TypeError(f"tools must be a list of tool definitions, got "
                        f"{type(tools).__name__}")
    if params is not None and not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    if scope is not None and ("chat" in scope or
                              ("model" in scope and model is not None
                               and scope["model"] != model)):
        raise ValueError("scope may not hold 'chat' (the fingerprint's), nor a 'model' other "
                         "than model=")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} mappings")
    if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                or history < 0):
        raise ValueError(f"history must be a non-negative int or None, got {history!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"messages[{i}] must be a mapping with a str 'role'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("a chat request needs a user message to match on")
    prompt, extra = _split_content(messages[last].get("content"), last)
    # Whole messages: every field counts (names, tool calls, tool results' ids...).
    system = [dict(m) for m in messages[:last] if m["role"] in _SYSTEM_ROLES]
    before = [dict(m) for m in messages[:last] if m["role"] not in _SYSTEM_ROLES]
    if history is not None:  # (max: a history longer than asked keeps all of it)
        before = before[max(0, len(before) - history):] if history else []
    context = {
        "system": system if include_system else None,
        "history": before,
        "parts": extra,
        # the last user turn's other fields (a name...) count as the earlier turns' do
        "turn": {k: v for k, v in messages[last].items() if k != "content"},
        "after": [dict(m) for m in messages[last + 1:]],
        "model": model,
        "params": dict(params) if params else {},
        "tools": list(tools) if tools else [],
    }
    # (surrogatepass: a lone surrogate, half an emoji cut upstream, is still a distinct text)
    text = _canonical(context, "the chat request").encode("utf-8", "surrogatepass")
    fp = hashlib.blake2b(text, digest_size=16, person=b"hc-chat").hexdigest()
    out: dict[str, Any] = dict(scope or {})
    if model is not None:
        out["model"] = model
    out["chat"] = fp
    return prompt, out
