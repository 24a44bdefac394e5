"""Drop-in faces of other libraries' APIs over :class:`hnswcache.Index`.

``import hnswcache.compat.hnswlib as hnswlib`` is the whole migration from hnswlib 0.8.0.
"""

from __future__ import annotations

__all__ = ["hnswlib"]
