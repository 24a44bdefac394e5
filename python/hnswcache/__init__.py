"""hnswcache: a time-aware HNSW index in C++ and a semantic cache on any Redis or Valkey."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .index import NEVER, Index

if TYPE_CHECKING:  # (typed for checkers; imported lazily at run time, below)
    from .cache import AsyncSemanticCache, Hit, Lookup, SemanticCache, same_text

__version__ = "0.1.0"
__all__ = ["NEVER", "AsyncSemanticCache", "Hit", "Index", "Lookup", "SemanticCache",
           "__version__", "same_text"]


def __getattr__(name: str) -> Any:
    # The cache layer pulls in optional dependencies (redis): import it only when asked.
    if name in ("SemanticCache", "AsyncSemanticCache", "Hit", "Lookup", "same_text"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'hnswcache' has no attribute {name!r}")
