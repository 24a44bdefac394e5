"""Adapters that plug hnswcache into other frameworks.

Each submodule imports its framework; this package imports none of them:

* :mod:`hnswcache.integrations.gptcache` -- a GPTCache ``VectorBase``
  (``pip install 'hnswcache[gptcache]'``).
* :mod:`hnswcache.integrations.langchain` -- a LangChain ``BaseCache``
  (``pip install 'hnswcache[langchain]'``).
"""

from __future__ import annotations

__all__: list[str] = []
