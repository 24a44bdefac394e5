"""SemanticCache at 100k entries: get latency and throughput, set throughput, warm start.

    python bench/bench_cache.py [--n 100000] [--queries 5000] [--rounds 3] [--stores memory,valkey]

Embeddings are precomputed (the embedder is excluded from every figure): the SGD user
requests of ``../shared/data/sgd`` (all-MiniLM-L6-v2, 384-d) when present, else random
unit vectors. ``get`` is measured one call at a time, as an application calls it, for
three kinds of lookup:

- ``exact``: a stored prompt (exact tier: one store round trip, no index search);
- ``semantic``: another request of the same source (exact miss, index search, candidate
  fetch; hit or miss by the default threshold);
- ``miss``: a random vector (exact miss, index search, nothing above the threshold).

``set`` is measured with ``set_many`` batches of 1,000 (one pipelined transaction each).
The valkey stores are a private valkey-server (the ``server`` extra) reached over TCP
loopback (``valkey``) or its unix socket (``valkey-unix``, what the embedded default uses).
For them a ``floor`` row gives what one plain round trip costs on this host: a redis-py
HGETALL of one stored entry, timed between the semantic lookups. A lookup makes one round
trip, so its latency is that floor plus the cache's own work. The ``host`` row times the
same pure-Python loop over and over: its p99 / p50 is the spread this machine adds to any
latency of that size, whatever the code does; the ``pauses`` row says why: how often per
second the process loses the CPU for 20 µs or more (a loop that only reads the clock).
With ``--rounds R`` > 1 the lookups run R times: the main rows are the first pass (every
call), and a "fastest of R rounds" row per kind takes each query's fastest pass, which a
pause rarely hits twice: the lookup's own spread, the host's pauses apart.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hnswcache import SemanticCache
from hnswcache.store.base import normalize_prompt
from hnswcache.store.server import EmbeddedServer

log = logging.getLogger("bench_cache")
SGD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sgd"


def no_embedder(texts: list[str]) -> np.ndarray:
    raise RuntimeError("the benchmark passes precomputed embeddings")


def load(n: int, nq: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray, str]:
    if (SGD / "base_f16.npy").exists():
        base = np.load(SGD / "base_f16.npy", mmap_mode="r")[:n].astype(np.float32)
        texts = (SGD / "texts_base.txt").read_text().splitlines()[:n]
        q = np.load(SGD / "queries.npy").astype(np.float32)
        qt = (SGD / "texts_queries.txt").read_text().splitlines()
        reps = -(-nq // len(q))
        qv = np.tile(q, (reps, 1))[:nq]
        qtexts = [f"{t} #{i // len(q)}" for i, t in enumerate(qt * reps)][:nq]
        # Repeated texts would be exact hits after the first call: keep each text unique.
        if len(base) < n:
            extra = n - len(base)
            rng = np.random.default_rng(1)
            noise = rng.standard_normal((extra, base.shape[1])).astype(np.float32) * 0.3
            base = np.concatenate([base, base[:extra] + noise])
            texts += [f"{t} (variant)" for t in texts[:extra]]
        # One entry per text: the cache keys entries by the normalised prompt ("Yes." and
        # "yes" are one entry), so number the texts that normalise alike.
        seen: dict[str, int] = {}
        uniq = []
        for t in texts:
            norm = normalize_prompt(t)
            seen[norm] = seen.get(norm, 0) + 1
            uniq.append(t if seen[norm] == 1 else f"{t} [{seen[norm]}]")
        return uniq, base, qtexts, qv, "sgd (all-MiniLM-L6-v2, 384-d)"
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, 384)).astype(np.float32)
    qv = base[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, 384)).astype(np.float32)
    return ([f"prompt {i}" for i in range(n)], base, [f"query {i}" for i in range(nq)],
            qv.astype(np.float32), "random 384-d (../shared/data/sgd absent)")


def pct(lat: list[float]) -> tuple[float, float, float]:
    a = np.asarray(lat) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), len(a) / (a.sum() / 1e6)


def index_params(args: argparse.Namespace) -> dict[str, Any]:
    """The HNSW parameters given on the command line (the cache's defaults otherwise)."""
    params = {k: v for k, v in (("M", args.M), ("ef_construction", args.ef_construction),
                                ("ef_search", args.ef_search), ("dtype", args.dtype),
                                ("search_starts", args.search_starts), ("alpha", args.alpha))
              if v is not None}
    if args.rescue_below is not None:  # ("off": None, the rescue turned off)
        params["rescue_below"] = None if args.rescue_below == "off" else args.rescue_below
    return params


def rescue_below(text: str) -> float | str:
    """``--rescue-below``: a similarity in [-1, 1], or ``"off"``."""
    if text.strip().lower() == "off":
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a similarity in [-1, 1] or 'off', got {text!r}")
    return value


def host_pauses(seconds: float = 2.0, at_least: float = 20e-6) -> tuple[float, list[float]]:
    """How often this process loses the CPU for at least ``at_least`` seconds: a loop that
    only reads the clock, timing the gaps between reads. A call that takes ``d`` seconds is
    hit by one with probability ~ ``rate * d``; above 1 % its p99 carries a pause."""
    clock = time.perf_counter_ns
    limit = int(at_least * 1e9)
    prev = clock()
    end = prev + int(seconds * 1e9)
    gaps = []
    while prev < end:
        t = clock()
        if t - prev >= limit:
            gaps.append((t - prev) / 1e9)
        prev = t
    return len(gaps) / seconds, gaps


def bench_store(name: str, store: Any, data: tuple[Any, ...], args: argparse.Namespace,
                rows: list[tuple[Any, ...]]) -> None:
    texts, base, qtexts, qv, _ = data
    cache = SemanticCache(no_embedder, store=store, namespace=f"bench{int(time.time())}",
                          **index_params(args))
    t0 = time.perf_counter()
    for s in range(0, len(texts), 1000):
        cache.set_many([(t, f"response {s + i}") for i, t in enumerate(texts[s:s + 1000])],
                       embeddings=base[s:s + 1000])
    dt = time.perf_counter() - t0
    rows.append((name, f"set (set_many x1000, {len(cache)} entries)", "-", "-",
                 len(texts) / dt))
    log.info("%s: %d sets in %.1f s", name, len(texts), dt)
    rng = np.random.default_rng(2)
    nq = args.queries
    kinds: dict[str, list[tuple[str, np.ndarray]]] = {
        "exact": [(texts[i], base[i]) for i in rng.integers(0, len(texts), nq)],
        "semantic": list(zip(qtexts, qv)),
        "miss": [(f"random {i}", v) for i, v in
                 enumerate(rng.standard_normal((nq, base.shape[1])).astype(np.float32))],
    }
    # The floor of a server store: one plain HGETALL of a stored entry by redis-py over the
    # same kind of connection, timed between the semantic lookups (so both see the same host).
    raw: Any = None
    floor: list[float] = []
    if name != "memory":
        import redis

        raw = redis.Redis.from_url(store)
        floor_key = cache.store.ekey(cache._core.key(texts[0], None)[0])  # type: ignore[attr-defined]
    for kind, items in kinds.items():
        for p, v in items[:200]:  # warm-up
            cache.get(p + " warmup", embedding=v)
        lat = []
        hits = 0
        fastest = np.full(len(items), np.inf)
        for r in range(args.rounds):
            for i, (p, v) in enumerate(items):
                t = time.perf_counter()
                h = cache.get(p, embedding=v)
                d = time.perf_counter() - t
                fastest[i] = min(fastest[i], d)
                if r:
                    continue
                lat.append(d)
                hits += h is not None
                if raw is not None and kind == "semantic":
                    t = time.perf_counter()
                    raw.hgetall(floor_key)
                    floor.append(time.perf_counter() - t)
        p50, p99, qps = pct(lat)
        rows.append((name, f"get {kind} (hit rate {hits / len(items):.2f})", p50, p99, qps))
        if args.rounds > 1:
            # The same lookups with the host's pauses mostly filtered out: a pause hits a
            # given call rarely, so each query's fastest round is its cost without one.
            p50, p99, _ = pct(fastest.tolist())
            rows.append((name, f"get {kind}, each query's fastest of {args.rounds} rounds",
                         p50, p99, "-"))
    if raw is not None and floor:
        p50, p99, qps = pct(floor)
        rows.append((name, "floor: one HGETALL of an entry (plain redis-py)", p50, p99, qps))
        raw.close()
    if name == "memory":
        # The host's own spread: the same pure-Python work (~the lookup's median) every call.
        # Its p99 / p50 is what the machine adds to any latency of that size.
        def fixed() -> int:
            s = 0
            for i in range(1500):
                s += i * i
            return s

        lat = []
        for _ in range(args.queries):
            t = time.perf_counter()
            fixed()
            lat.append(time.perf_counter() - t)
        p50, p99, qps = pct(lat)
        rows.append((name, "host: the same Python loop every call", p50, p99, qps))
        rate, lengths = host_pauses()
        if lengths:
            p50, p99, _ = pct(lengths)
            rows.append((name, "host: pauses >= 20 µs (their length; per second)", p50, p99,
                         rate))
    if name != "memory":
        t0 = time.perf_counter()
        warm = SemanticCache(no_embedder, store=store, namespace=cache.namespace,
                             **index_params(args))
        warm.sync()
        rows.append((name, f"warm start ({len(warm)} entries)", "-", "-",
                     len(warm) / (time.perf_counter() - t0)))
        warm.close()
        # The same from a local snapshot: load the graph, then read the log since.
        with tempfile.TemporaryDirectory() as snap:
            first = SemanticCache(no_embedder, store=store, namespace=cache.namespace,
                                  snapshot_dir=snap, **index_params(args))
            first.sync()
            t0 = time.perf_counter()
            first.save_snapshot()
            saved = time.perf_counter() - t0
            first.close()
            t0 = time.perf_counter()
            warm = SemanticCache(no_embedder, store=store, namespace=cache.namespace,
                                 snapshot_dir=snap, **index_params(args))
            warm.sync()
            rows.append((name, f"warm start from a snapshot ({len(warm)} entries; saving it "
                         f"took {saved:.2f} s)", "-", "-",
                         len(warm) / (time.perf_counter() - t0)))
            warm._snapshot_dir = None  # (the timing is done: no second save on close)
            warm.close()
    cache.close()


def bench_gptcache(data: tuple[Any, ...], args: argparse.Namespace,
                   rows: list[tuple[Any, ...]]) -> None:
    """GPTCache 0.1.x on the same workload: its sqlite scalar store + its default faiss
    vector store (exact ``IndexFlatL2``), the same precomputed embeddings, the threshold
    converted to the same cosine similarity (0.85 -> L2^2 <= 0.3). (Its hnswlib store
    returns numpy uint64 ids that its sqlite store never finds here: every get misses.)"""
    try:
        from gptcache import Cache, Config
        from gptcache.adapter import api
        from gptcache.manager import CacheBase, VectorBase, get_data_manager
        from gptcache.processor.pre import get_prompt
        from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation
    except ImportError:
        log.warning("gptcache is not installed: no comparison")
        return
    from hnswcache.cache import DEFAULT_THRESHOLD

    texts, base, qtexts, qv, _ = data
    rng = np.random.default_rng(2)
    nq = args.queries
    rand = rng.standard_normal((nq, base.shape[1])).astype(np.float32)
    table: dict[str, np.ndarray] = {}
    for t, v in zip(texts, base):
        table[t] = v / np.linalg.norm(v)
    for t, v in zip(qtexts, qv):
        table[t] = v / np.linalg.norm(v)
    for i, v in enumerate(rand):
        table[f"random {i}"] = v / np.linalg.norm(v)

    def embed(text: str, **_: Any) -> np.ndarray:
        return table[text]

    # GPTCache flushes its faiss index at exit (atexit): the folder must outlive it, so it
    # is removed by an atexit hook registered before GPTCache's (they run last-in first-out).
    d = tempfile.mkdtemp(prefix="bench-gptcache-")
    atexit.register(shutil.rmtree, d, True)
    dm = get_data_manager(
        CacheBase("sqlite", sql_url=f"sqlite:///{d}/gptcache.db"),
        VectorBase("faiss", dimension=base.shape[1], index_path=f"{d}/faiss.index",
                   top_k=1),
        max_size=len(texts) + 10,
    )
    cache = Cache()
    # GPTCache hit: 4.0 - L2^2 >= threshold * 4.0 on unit vectors; L2^2 = 2 - 2 cos.
    gthr = (4.0 - (2.0 - 2.0 * DEFAULT_THRESHOLD)) / 4.0
    cache.init(pre_embedding_func=get_prompt, embedding_func=embed, data_manager=dm,
               similarity_evaluation=SearchDistanceEvaluation(),
               config=Config(similarity_threshold=gthr))
    t0 = time.perf_counter()
    for s in range(0, len(texts), 1000):
        cache.import_data(texts[s:s + 1000], [f"response {s + i}" for i in
                                              range(len(texts[s:s + 1000]))])
    rows.append(("gptcache", "set (import_data x1000)", "-", "-",
                 len(texts) / (time.perf_counter() - t0)))
    nq = min(nq, args.gptcache_queries)
    kinds = {
        "exact": [texts[i] for i in rng.integers(0, len(texts), nq)],
        "semantic": list(qtexts[:nq]),
        "miss": [f"random {i}" for i in range(nq)],
    }
    for kind, prompts in kinds.items():
        lat = []
        hits = 0
        for p in prompts:
            t = time.perf_counter()
            r = api.get(p, cache_obj=cache)
            lat.append(time.perf_counter() - t)
            hits += r is not None
        p50, p99, qps = pct(lat)
        rows.append(("gptcache", f"get {kind} (hit rate {hits / len(prompts):.2f})",
                     p50, p99, qps))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over the lookups: the first gives the p50/p99 of every "
                         "call, all of them each query's fastest (the host's pauses apart)")
    ap.add_argument("--gptcache-queries", type=int, default=300,
                    help="queries per kind for GPTCache (its lookups take milliseconds)")
    ap.add_argument("--stores", default="memory,valkey,valkey-unix,gptcache",
                    help="memory, valkey (TCP loopback), valkey-unix (unix socket), gptcache "
                         "(GPTCache with sqlite + hnswlib on the same data, for comparison)")
    ap.add_argument("--M", type=int, help="HNSW M of the cache's index (default: the cache's)")
    ap.add_argument("--ef-construction", type=int, help="(default: the cache's)")
    ap.add_argument("--ef-search", type=int, help="(default: the cache's)")
    ap.add_argument("--dtype", choices=("float32", "float16", "int8"),
                    help="the replica index's storage (default: the cache's)")
    ap.add_argument("--search-starts", type=int, help="(default: the cache's)")
    ap.add_argument("--alpha", type=float, help="pruning slack of the graph (default: the cache's)")
    ap.add_argument("--rescue-below", type=rescue_below,
                    help="the cache's rescue_below, or 'off' (default: the cache's; not "
                         "for gptcache)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    data = load(args.n, args.queries)
    log.info("data: %s, %d entries, %d queries", data[4], len(data[0]), args.queries)
    rows: list[tuple[Any, ...]] = []
    for name in args.stores.split(","):
        if name == "memory":
            bench_store("memory", "memory", data, args, rows)
        elif name == "gptcache":
            bench_gptcache(data, args, rows)
        else:
            with tempfile.TemporaryDirectory() as d, EmbeddedServer(d) as srv:
                bench_store(name, srv.unix_url if name.endswith("unix") else srv.url,
                            data, args, rows)
    log.info("")
    log.info("| store | operation | p50 µs | p99 µs | per second |")
    log.info("|---|---|---:|---:|---:|")
    for store, op, p50, p99, rate in rows:
        p50s, p99s, rates = (f"{x:.0f}" if isinstance(x, float) else x for x in (p50, p99, rate))
        log.info("| %s | %s | %s | %s | %s |", store, op, p50s, p99s, rates)


if __name__ == "__main__":
    main()
