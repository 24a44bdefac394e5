"""Stores: where a :class:`~hnswcache.cache.SemanticCache` keeps its entries.

``MemoryStore`` (in-process, no persistence), ``RedisStore`` / ``AsyncRedisStore`` (any
Redis-compatible server, plain commands only) and ``EmbeddedServer`` (a private
valkey-server). The Redis modules import ``redis`` only when a Redis store is created.
"""

from __future__ import annotations

from typing import Any

from .base import (
    AsyncStore,
    Invalid,
    LogBatch,
    LogEvent,
    Record,
    Store,
    StoreError,
    WriteResult,
)
from .memory import AsyncMemoryStore, MemoryStore

__all__ = [
    "AsyncMemoryStore",
    "AsyncRedisStore",
    "AsyncStore",
    "EmbeddedServer",
    "Invalid",
    "LogBatch",
    "LogEvent",
    "MemoryStore",
    "Record",
    "RedisStore",
    "Store",
    "StoreError",
    "WriteResult",
]


def __getattr__(name: str) -> Any:
    if name in ("RedisStore", "AsyncRedisStore"):
        from . import redis as _redis

        return getattr(_redis, name)
    if name == "EmbeddedServer":
        from .server import EmbeddedServer

        return EmbeddedServer
    raise AttributeError(f"module 'hnswcache.store' has no attribute {name!r}")
