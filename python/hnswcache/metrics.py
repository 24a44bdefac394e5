"""The cache's statistics in the Prometheus text exposition format, without a dependency.

    from hnswcache.metrics import prometheus_text
    body = prometheus_text(cache)            # serve it at /metrics (text/plain; version=0.0.4)

Each metric carries a ``namespace`` label, so several caches of one process (one call with
all of them) or of several processes (each scraped) stay apart. What each metric means is
:meth:`hnswcache.SemanticCache.stats`; the names are in ``docs/cache.md`` ("Metrics").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._cache_core import _MISS_BUCKETS, MISS_LE_BOUNDS, Stats, Window

#: Media type of the text this module writes (the Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX = "hnswcache_"

#: Counters: stats() name -> (metric name without prefix and _total, help text).
_COUNTERS = {
    "lookups": ("lookups", "Prompts looked up (get, get_many, lookup, @cached)."),
    "misses": ("misses", "Lookups that found no answer."),
    "unanswered": ("unanswered", "Lookups whose call raised or was cancelled before "
                   "answering them (not hits, not misses)."),
    "sets": ("sets", "Entries written."),
    "deletes": ("deletes", "Entries deleted by delete()."),
    "expiries": ("expiries", "Expired entries an exact lookup found (each written version "
                            "once)."),
    "evictions": ("evictions", "Entries evicted by max_entries (LRU)."),
    "store_errors": ("store_errors", "Calls the store failed (a miss, or a dropped write)."),
    "embed_errors": ("embed_errors", "Embedder calls that failed."),
    "invalid_entries": ("invalid_entries", "Stored entries refused by validation."),
    "sync_events": ("sync_events", "Change-log events of other processes applied."),
    "resyncs": ("resyncs", "Rebuilds of the replica from the store after a lost log."),
    "coalesced": ("coalesced", "@cached calls saved by coalescing."),
    "too_old": ("too_old", "Matches refused by a read's max_age."),
    "exact_only": ("exact_only", "Prompts longer than the embedder reads, kept to the exact "
                   "tier (sets, and lookups not searched)."),
    "near_misses": ("near_misses", "Misses whose nearest entry was just below the threshold."),
    "snapshots_saved": ("snapshots_saved", "Snapshots of the replica written."),
    "verdicts_right": ("verdicts_right", "Verdicts recorded that a cached answer was right."),
    "verdicts_wrong": ("verdicts_wrong", "Verdicts recorded that a cached answer was wrong."),
    "verdicts_lost": ("verdicts_lost", "Verdicts not recorded: other writers of the entry "
                      "kept winning its WATCH for a second."),
    "hits_learned": ("hits_learned", "Semantic hits below the threshold, by an entry's "
                                     "learned threshold."),
    "audits": ("audits", "Semantic hits @cached(audit=) checked by calling the function."),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Writer:
    """Samples grouped by family (the format wants each family's samples together, after
    its HELP and TYPE, however many caches are written)."""

    def __init__(self) -> None:
        self.families: dict[str, list[str]] = {}
        self.current = ""

    def family(self, name: str, kind: str, text: str) -> None:
        self.current = name
        if name not in self.families:
            self.families[name] = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.families[self.current].append(f"{name}{{{inner}}} {_num(value)}")

    def text(self) -> str:
        return "".join(line + "\n" for lines in self.families.values() for line in lines)


def _summary(w: _Writer, name: str, text: str, ns: str, window: Window) -> None:
    w.family(name, "summary", text)
    recent = window.recent()
    for q in (0.5, 0.9, 0.99):
        value = float(np.quantile(recent, q)) if recent.size else math.nan
        w.sample(name, {"namespace": ns, "quantile": str(q)}, value)
    w.sample(name + "_sum", {"namespace": ns}, window.total)
    w.sample(name + "_count", {"namespace": ns}, window.count)


def _write(w: _Writer, ns: str, stats: Stats, entries: int) -> None:
    counts = stats.counts
    name = _PREFIX + "hits_total"
    w.family(name, "counter", "Lookups answered, by tier (exact: the prompt's hash; "
                              "semantic: a similar prompt).")
    for tier in ("exact", "semantic"):
        w.sample(name, {"namespace": ns, "tier": tier}, counts[f"hits_{tier}"])
    for key, (metric, text) in _COUNTERS.items():
        name = f"{_PREFIX}{metric}_total"
        w.family(name, "counter", text)
        w.sample(name, {"namespace": ns}, counts[key])
    name = _PREFIX + "embed_calls_total"
    w.family(name, "counter", "Successful embedder calls.")
    w.sample(name, {"namespace": ns}, stats.embed_time.count)
    name = _PREFIX + "entries"
    w.family(name, "gauge", "Live entries in this process's index replica.")
    w.sample(name, {"namespace": ns}, entries)
    _summary(w, _PREFIX + "lookup_seconds", "Lookup latency (quantiles over the last "
             "10,000 calls; embedding included when the cache embeds).", ns,
             stats.lookup_time)
    _summary(w, _PREFIX + "embed_seconds", "Embedder call latency (quantiles over the last "
             "10,000 calls).", ns, stats.embed_time)
    name = _PREFIX + "miss_similarity"
    w.family(name, "histogram", "Nearest entry's cosine similarity of each semantic miss "
                                "(buckets of 0.05).")
    total = 0
    for b in range(_MISS_BUCKETS):
        total += int(stats.miss_le[b])
        le = "+Inf" if b == _MISS_BUCKETS - 1 else f"{MISS_LE_BOUNDS[b]:.2f}"
        w.sample(name + "_bucket", {"namespace": ns, "le": le}, total)
    w.sample(name + "_sum", {"namespace": ns}, stats.miss_sim_sum)
    w.sample(name + "_count", {"namespace": ns}, total)


def prometheus_text(*caches: Any) -> str:
    """The statistics of ``caches`` (:class:`~hnswcache.SemanticCache` or
    :class:`~hnswcache.AsyncSemanticCache`) as Prometheus text (``CONTENT_TYPE``).

    Counters end in ``_total``; ``hnswcache_entries`` is a gauge; lookup and embedder
    latencies are summaries (quantiles over the last 10,000 calls, with the sum and count
    of all); the nearest similarity of semantic misses is a histogram."""
    w = _Writer()
    seen: set[str] = set()
    for cache in caches:
        if not hasattr(cache, "_core") or not hasattr(cache, "namespace"):
            raise TypeError(f"not a SemanticCache or AsyncSemanticCache: "
                            f"{type(cache).__name__}")
        ns = str(cache.namespace)
        if ns in seen:
            raise ValueError(f"two caches of namespace {ns!r}: their metrics would clash")
        seen.add(ns)
        core = cache._core
        _write(w, ns, core.stats, core.size())
    return w.text()
