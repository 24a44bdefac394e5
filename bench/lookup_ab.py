"""The cost of one in-memory lookup with its embedding given, measured without the host's
pauses: 100k sgd entries, 2,000 exact and 2,000 semantic lookups, five passes, each
query's fastest pass, the median over queries. Run it alternately against two builds
(their python/ folders) to compare lookup code:

    PYTHONPATH=python python bench/lookup_ab.py
    PYTHONPATH=/tmp/old/python python bench/lookup_ab.py
"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import numpy as np
from bench_cache import load, no_embedder
from hnswcache import SemanticCache
texts, base, qtexts, qv, _ = load(100000, 2000)
cache = SemanticCache(no_embedder, store="memory")
for s in range(0, len(texts), 1000):
    cache.set_many([(t, f"r{s+i}") for i, t in enumerate(texts[s:s+1000])], embeddings=base[s:s+1000])
rng = np.random.default_rng(2)
ex = [(texts[i], base[i]) for i in rng.integers(0, len(texts), 2000)]
se = list(zip(qtexts, qv))
for name, items in (("exact", ex), ("semantic", se)):
    best = np.full(len(items), np.inf)
    for r in range(5):
        for i, (p, v) in enumerate(items):
            t = time.perf_counter_ns(); cache.get(p, embedding=v); d = time.perf_counter_ns() - t
            if d < best[i]: best[i] = d
    print(name, "median of per-query min µs", round(float(np.median(best)) / 1e3, 2))
