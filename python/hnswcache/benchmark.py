"""hnswcache against hnswlib, faiss (IndexHNSWFlat) and usearch on one dataset.

Every library gets the same vectors (L2-normalised float32), the same graph parameters
(M=16, ef_construction=200), two build threads, and is searched one query per call from
Python on one thread while ef is swept. Each library lives in its own worker process:

* memory is honest: bytes per vector is the growth of that process's resident set from
  "data loaded, library imported" to "index built", so nothing one library allocates is
  charged to another (each library's own size report is shown beside it);
* noise is fair: all workers are alive at once and the parent asks them in turn (rotating
  the order every repeat) for one timed pass at one ef, so a burst of load from the other
  tenants of this shared machine hits every library alike, and the best of the repeats is
  kept.

Usage::

    python bench/compare_ann.py                       # ../shared/data/sgd
    python bench/compare_ann.py --synthetic 20000     # no data needed
    python bench/compare_ann.py --base b.npy --queries q.npy [--gt gt.npy]

This module is the shared code of ``bench/compare_ann.py`` (a thin wrapper that keeps its
command line) and of the ``hnswcache bench`` command. The functions are importable
(``run_comparison``, ``summarize``, ``markdown_table``, ``plot_sweep``). Progress goes to the
``log`` stream given to :func:`run_comparison`; nothing is printed otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LIBRARIES = ("hnswcache", "hnswlib", "faiss", "usearch")
# Every ef at the low end: on sgd recall@10 passes 0.90-0.95 within ef 10-20, and a coarse
# grid would charge a library for the step it happens to fall in.
DEFAULT_EFS = (10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 22, 24, 28, 32, 40, 48, 56, 64, 80, 96,
               128, 192, 256, 400)
THRESHOLDS = (0.90, 0.95, 0.99)
#: Default dataset folder (the project's ../shared/data/sgd when run from a clone);
#: ``bench/compare_ann.py`` sets it, an installed package has no default.
DEFAULT_DATA: Path | None = None


# ----------------------------------------------------------------------------- data
@dataclass
class DatasetSpec:
    """Where a worker finds its data: plain .npy paths, so no array crosses a pipe."""

    name: str
    base: str
    queries: str
    gt: str
    n: int = 0
    dim: int = 0
    n_queries: int = 0
    tmpdir: str | None = field(default=None, repr=False)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32, C order (cosine == inner product after this)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def load_vectors(path: str) -> np.ndarray:
    """A .npy of any float dtype as normalised float32 (sgd's base is stored as float16)."""
    return normalise(np.load(path).astype(np.float32))


def brute_force_knn(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact top-k rows of ``base`` by inner product (both normalised), best first."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        sims = queries[s : s + chunk] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
        out[s : s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def synthetic_vectors(n: int, dim: int, seed: int, clusters: int = 0) -> np.ndarray:
    """Clustered Gaussian data on the sphere: uniform random vectors make every HNSW look
    alike, while clusters (as real embeddings have) reward good neighbour selection."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(8, n // 500)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    x = centres[which] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return normalise(x)


def prepare_dataset(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    base: str | None = None,
    queries: str | None = None,
    gt: str | None = None,
    synthetic: int = 0,
    dim: int = 384,
    n_queries: int = 1000,
    limit: int = 0,
    k: int = 10,
    seed: int = 0,
) -> DatasetSpec:
    """Resolve the data options into files a worker can load.

    A synthetic set, a ``limit`` on the base, or missing ground truth are materialised in a
    temporary folder (``spec.tmpdir``; the caller removes it) with exact top-k computed here.
    """
    tmp: str | None = None

    def scratch() -> str:
        nonlocal tmp
        if tmp is None:
            tmp = tempfile.mkdtemp(prefix="hnswcache-bench-")
        return tmp

    if synthetic:
        xb = synthetic_vectors(synthetic, dim, seed)
        xq = synthetic_vectors(n_queries, dim, seed + 1)
        # Queries drawn near base points, like a cache's repeated questions.
        rng = np.random.default_rng(seed + 2)
        xq = normalise(xb[rng.integers(0, synthetic, n_queries)] + 0.3 * xq)
        name = f"synthetic-{synthetic}x{dim}"
        base_p = os.path.join(scratch(), "base.npy")
        q_p = os.path.join(scratch(), "queries.npy")
        np.save(base_p, xb)
        np.save(q_p, xq)
        gt_p = os.path.join(scratch(), "gt.npy")
        np.save(gt_p, brute_force_knn(xb, xq, k))
    else:
        if base is None:
            d = Path(data_dir) if data_dir else DEFAULT_DATA
            if d is None or not d.is_dir():
                raise FileNotFoundError(f"no dataset folder {d}; use --synthetic N or --base")
            # (base.npy too, as the --data help says: base_f16.npy was the only one looked
            # for)
            base_p = str(d / "base_f16.npy") if (d / "base_f16.npy").exists() else str(
                d / "base.npy")
            q_p = str(d / "queries.npy")
            gt_p = gt or str(d / "gt.npy")
            name = d.name
        else:
            if queries is None:
                raise ValueError("--base needs --queries")
            base_p, q_p, gt_p = base, queries, gt or ""
            name = Path(base).stem
        if limit:
            # A prefix of the base changes the true neighbours: recompute them.
            xb = load_vectors(base_p)[:limit]
            base_p = os.path.join(scratch(), "base.npy")
            np.save(base_p, xb)
            gt_p = ""
            name = f"{name}[:{limit}]"
        if not gt_p:
            xb, xq = load_vectors(base_p), load_vectors(q_p)
            _check_vectors(xb, xq, k)
            gt_p = os.path.join(scratch(), "gt.npy")
            np.save(gt_p, brute_force_knn(xb, xq, k))
    b = np.load(base_p, mmap_mode="r")
    q = np.load(q_p, mmap_mode="r")
    _check_vectors(b, q, k)
    _check_truth(np.load(gt_p, mmap_mode="r"), q.shape[0], b.shape[0], k)
    return DatasetSpec(name, base_p, q_p, gt_p, b.shape[0], b.shape[1], q.shape[0], tmp)


def _check_vectors(base: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Base and queries must fit together (queries of another dimension gave a numpy error
    from the brute force)."""
    if base.ndim != 2 or queries.ndim != 2 or base.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"base and queries must be non-empty 2-d arrays, got shapes "
                         f"{base.shape} and {queries.shape}")
    if queries.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the base "
                         f"{base.shape[1]}")
    if k > base.shape[0]:
        raise ValueError(f"k={k} is more than the base's {base.shape[0]} rows")


def _check_truth(gt: np.ndarray, n_queries: int, n_base: int, k: int) -> None:
    """The ground truth must be k row numbers of the base per query: one of other queries,
    or of fewer neighbours, gave a recall of 0 (rows past the shorter file were not
    compared)."""
    if gt.ndim != 2 or gt.shape[0] != n_queries or gt.shape[1] < k:
        raise ValueError(f"the ground truth must have a row of at least k={k} neighbours "
                         f"per query ({n_queries}), got shape {gt.shape}")
    if gt.dtype.kind not in "iu":
        raise ValueError(f"the ground truth must hold row numbers (integers), got {gt.dtype}")
    top = gt[:, :k]
    if int(top.min()) < 0 or int(top.max()) >= n_base:
        raise ValueError(f"the ground truth names rows outside the base's {n_base}")


def recall_at_k(found: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = 0
    for row, truth in zip(found[:, :k], gt[:, :k]):
        hits += len(set(row.tolist()) & set(truth.tolist()))
    return hits / (k * found.shape[0])


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set of this process (Linux), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- adapters
class Adapter:
    """One library behind the same small interface. ``prepare_queries`` converts queries to
    the form each library's single-query call takes natively, outside the timed loop."""

    name = ""

    def build(self, base: np.ndarray, labels: np.ndarray, threads: int) -> None:
        raise NotImplementedError

    def set_ef(self, ef: int) -> None:
        raise NotImplementedError

    def prepare_queries(self, queries: np.ndarray) -> list[Any]:
        return [queries[i] for i in range(queries.shape[0])]

    def search_one(self, q: Any, k: int) -> np.ndarray:
        raise NotImplementedError

    def reported_bytes(self) -> int | None:
        """The library's own idea of its size (memory or serialised), where it has one."""
        return None

    def info(self) -> dict[str, Any]:
        return {}


class HnswcacheAdapter(Adapter):
    name = "hnswcache"

    def __init__(self, dim: int, M: int, ef_construction: int, seed: int, n_hint: int = 0):
        import hnswcache

        self._mod = hnswcache
        self.index = hnswcache.Index(
            dim, metric="cosine", M=M, ef_construction=ef_construction,
            capacity=n_hint, seed=seed,
        )
        self.ef = 64

    def build(self, base, labels, threads):
        self.index.add(base, labels, num_threads=threads)

    def set_ef(self, ef):
        self.ef = ef

    def search_one(self, q, k):
        return self.index.search(q, k, ef=self.ef, num_threads=1)[0][0]

    def reported_bytes(self):
        return _memory_from_stats(self.index.stats())

    def info(self):
        return {
            "version": getattr(self._mod, "__version__", "dev"),
            "isa": self.index.isa,
            "flags": "portable baseline + per-kernel -mavx2/-mavx512*, chosen at load time",
            "reported": "stats() memory",
        }


def _memory_from_stats(stats: dict[str, Any]) -> int | None:
    """hnswcache's stats() memory figure, whatever the exact key ends up being called."""
    for key in ("memory_bytes", "memory", "bytes", "allocated_bytes"):
        if isinstance(stats.get(key), (int, np.integer)):
            return int(stats[key])
    keys = [k for k in stats if "bytes" in k or "memory" in k]
    if keys and isinstance(stats[keys[0]], dict):
        return int(sum(stats[keys[0]].values()))
    return int(stats[keys[0]]) if keys else None


class HnswlibAdapter(Adapter):
    name = "hnswlib"

    def __init__(self, dim, M, ef_construction, seed, n_hint=0):
        import hnswlib

        self._mod = hnswlib
        self.index = hnswlib.Index(space="cosine", dim=dim)
        self._init = dict(ef_construction=ef_construction, M=M, random_seed=seed)

    def build(self, base, labels, threads):
        # hnswlib cannot grow by itself; sizing it exactly is the fairest memory figure.
        self.index.init_index(max_elements=base.shape[0], **self._init)
        self.index.add_items(base, labels, num_threads=threads)

    def set_ef(self, ef):
        self.index.set_ef(ef)

    def search_one(self, q, k):
        return self.index.knn_query(q, k=k, num_threads=1)[0][0]

    def reported_bytes(self):
        return int(self.index.index_file_size())

    def info(self):
        return {
            "version": getattr(self._mod, "__version__", "0.8.0"),
            "isa": _hnswlib_isa(),
            "flags": "sdist built here: -O3 -march=native (setup.py), so AVX-512 on this CPU",
            "reported": "index_file_size()",
        }


def _hnswlib_isa() -> str:
    # hnswlib's setup.py compiles with -march=native when the compiler takes it, and its
    # space_ip.h then picks AVX-512 where __AVX512F__ is defined: the build machine's ISA.
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512 (-march=native)"
    if "avx2" in flags:
        return "avx2 (-march=native)"
    return "sse/scalar (-march=native)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class FaissAdapter(Adapter):
    name = "faiss"

    def __init__(self, dim, M, ef_construction, seed, n_hint=0):
        import faiss

        self._mod = faiss
        # Inner product on normalised vectors is cosine; faiss has no cosine metric.
        self.index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction

    def build(self, base, labels, threads):
        self._mod.omp_set_num_threads(threads)
        self.index.add(base)  # faiss labels are row numbers, the same as ours
        self._mod.omp_set_num_threads(1)

    def set_ef(self, ef):
        self.index.hnsw.efSearch = ef

    def prepare_queries(self, queries):
        return [queries[i : i + 1] for i in range(queries.shape[0])]

    def search_one(self, q, k):
        return self.index.search(q, k)[1][0]

    def reported_bytes(self):
        # No memory report in faiss: the serialised size is the closest (vectors + links).
        return int(self._mod.serialize_index(self.index).nbytes)

    def info(self):
        level = ""
        try:
            level = self._mod.SIMDConfig.get_level_name()
        except Exception:  # older faiss: no SIMDConfig
            level = self._mod.get_compile_options()
        return {
            "version": self._mod.__version__,
            "isa": str(level).lower(),
            "flags": "PyPI wheel, dynamic dispatch: " + self._mod.get_compile_options().strip(),
            "reported": "serialize_index() size",
        }


class UsearchAdapter(Adapter):
    name = "usearch"

    def __init__(self, dim, M, ef_construction, seed, n_hint=0):
        import usearch
        from usearch.index import Index

        self._ver = usearch.__version__
        self.index = Index(
            ndim=dim, metric="cos", dtype="f32", connectivity=M,
            expansion_add=ef_construction, expansion_search=64,
        )

    def build(self, base, labels, threads):
        self.index.add(labels, base, threads=threads)

    def set_ef(self, ef):
        self.index.expansion_search = ef

    def search_one(self, q, k):
        return self.index.search(q, k, threads=1).keys

    def reported_bytes(self):
        return int(self.index.memory_usage)

    def info(self):
        return {
            "version": self._ver,
            "isa": str(self.index.hardware_acceleration),
            "flags": "PyPI wheel, SimSIMD/NumKong dynamic dispatch",
            "reported": "memory_usage",
        }


ADAPTERS: dict[str, Any] = {
    "hnswcache": HnswcacheAdapter,
    "hnswlib": HnswlibAdapter,
    "faiss": FaissAdapter,
    "usearch": UsearchAdapter,
}


def make_adapter(name: str, dim: int, M: int = 16, ef_construction: int = 200,
                 seed: int = 100, n_hint: int = 0) -> Adapter:
    return ADAPTERS[name](dim, M, ef_construction, seed, n_hint)


def timed_pass(adapter: Adapter, queries: list[Any], k: int, warmup: int = 50,
               min_seconds: float = 0.3) -> tuple[float, int, np.ndarray]:
    """One query per call over all queries (after a short warm-up), looping over the query
    set again until ``min_seconds`` have passed so that a pass at low ef (a few ms) is not
    one scheduler tick's worth of noise. Returns seconds, queries run, and the labels found
    in the first loop (rows padded with -1 if a library returned fewer than k)."""
    for q in queries[:warmup]:
        adapter.search_one(q, k)
    found = np.full((len(queries), k), -1, dtype=np.int64)
    t0 = time.perf_counter()
    out = [adapter.search_one(q, k) for q in queries]
    done = len(queries)
    while time.perf_counter() - t0 < min_seconds:
        for q in queries:
            adapter.search_one(q, k)
        done += len(queries)
    dt = time.perf_counter() - t0
    for i, row in enumerate(out):
        row = np.asarray(row).reshape(-1)[:k]
        found[i, : row.shape[0]] = row
    return dt, done, found


# ----------------------------------------------------------------------------- worker
def worker_main(lib: str, spec_json: str, M: int, efc: int, seed: int, k: int) -> None:
    """A worker process: builds one library's index, then answers commands, one JSON per
    line, on the stdout it was started with (library chatter is sent to stderr)."""
    import faulthandler

    faulthandler.enable()  # a crash in native code leaves a Python traceback on stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = DatasetSpec(**json.loads(spec_json))
    adapter_cls = ADAPTERS[lib]
    base = load_vectors(spec.base)
    queries = load_vectors(spec.queries)
    gt = np.load(spec.gt)[:, :k]
    labels = np.arange(base.shape[0], dtype=np.int64)
    adapter: Adapter | None = None
    prepared: list[Any] = []

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")

    reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "build":
                # A repeated build (for its time only) first drops the previous index.
                rebuild = adapter is not None
                adapter = None
                if rebuild:
                    import gc

                    gc.collect()
                # Import, construct and touch the library before the baseline, so only
                # what the index holds counts.
                adapter = adapter_cls(spec.dim, M, efc, seed, spec.n)
                prepared = adapter.prepare_queries(queries)
                rss0 = rss_bytes()
                t0 = time.perf_counter()
                adapter.build(base, labels, int(cmd["threads"]))
                build_s = time.perf_counter() - t0
                rss1 = rss_bytes()
                reply({
                    "build_s": build_s,
                    "rss_growth": rss1 - rss0,
                    "bytes_per_vector": (rss1 - rss0) / spec.n,
                    "reported_bytes": adapter.reported_bytes(),
                    "info": adapter.info(),
                })
            elif cmd["cmd"] == "search":
                assert adapter is not None, "build first"
                adapter.set_ef(int(cmd["ef"]))
                dt, done, found = timed_pass(adapter, prepared, k,
                                             min_seconds=float(cmd.get("min_seconds", 0.3)))
                reply({"seconds": dt, "qps": done / dt,
                       "recall": recall_at_k(found, gt, k)})
            elif cmd["cmd"] == "quit":
                reply({"bye": True})
                return
        except Exception as e:  # report, keep the protocol alive
            reply({"error": f"{type(e).__name__}: {e}"})


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, lib: str, spec: DatasetSpec, M: int, efc: int, seed: int, k: int,
                 env: dict[str, str] | None = None):
        self.lib = lib
        spec_json = json.dumps({k_: v for k_, v in spec.__dict__.items() if k_ != "tmpdir"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hnswcache.benchmark", "--worker", lib, "--spec", spec_json,
             "--M", str(M), "--ef-construction", str(efc), "--seed", str(seed), "--k", str(k)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=env,
        )
        self._read()  # wait until the data is loaded

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.lib} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"{self.lib}: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.call(cmd="quit")
        except Exception:
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- driver
def run_comparison(
    spec: DatasetSpec,
    libraries: tuple[str, ...] = LIBRARIES,
    *,
    efs: tuple[int, ...] = DEFAULT_EFS,
    M: int = 16,
    ef_construction: int = 200,
    build_threads: int = 2,
    build_repeats: int = 1,
    repeats: int = 3,
    min_seconds: float = 0.3,
    k: int = 10,
    seed: int = 100,
    log: Any = None,
) -> dict[str, Any]:
    """Build every library (one after another, each alone on the machine), then sweep ef
    with the timed passes interleaved across libraries. Returns a JSON-able dict."""

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    env = dict(os.environ)
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    results: dict[str, Any] = {"libraries": {}}
    try:
        order = list(libraries)
        for _ in range(build_repeats):
            # Builds run one at a time (each has the two cores to itself) and are repeated
            # in rotation: the best time is kept, the memory of the first build (in a fresh
            # process) is the one reported.
            for lib in order:
                if lib not in workers:
                    say(f"[{lib}] loading data")
                    workers[lib] = Worker(lib, spec, M, ef_construction, seed, k, env=env)
                say(f"[{lib}] building {spec.n} x {spec.dim} with {build_threads} threads")
                b = workers[lib].call(cmd="build", threads=build_threads)
                say(f"[{lib}] built in {b['build_s']:.1f} s, "
                    f"{b['bytes_per_vector']:.0f} B/vector")
                if lib not in results["libraries"]:
                    results["libraries"][lib] = {**b, "build_runs": [], "sweep": {}}
                entry = results["libraries"][lib]
                entry["build_runs"].append(b["build_s"])
                entry["build_s"] = min(entry["build_runs"])
            order = order[1:] + order[:1]
        order = list(libraries)
        for r in range(repeats):
            for ef in efs:
                for lib in order:
                    if lib in failed:
                        continue
                    try:
                        out = workers[lib].call(cmd="search", ef=ef, min_seconds=min_seconds)
                    except RuntimeError as e:
                        # A crashed library is a result too: keep what it measured so far.
                        failed[lib] = f"repeat {r + 1}, ef {ef}: {e}"
                        results["libraries"][lib]["error"] = failed[lib]
                        say(f"[{lib}] FAILED at {failed[lib]}")
                        continue
                    sweep = results["libraries"][lib]["sweep"].setdefault(
                        str(ef), {"ef": ef, "recall": out["recall"], "qps_runs": []}
                    )
                    sweep["qps_runs"].append(out["qps"])
                    sweep["qps"] = max(sweep["qps_runs"])
                order = order[1:] + order[:1]  # rotate who goes first
            say(f"repeat {r + 1}/{repeats} done")
    finally:
        for lib, w in workers.items():
            if lib in failed:
                w.proc.kill()
                w.proc.wait()
            else:
                w.close()
    results["meta"] = {
        "dataset": spec.name, "n": spec.n, "dim": spec.dim, "queries": spec.n_queries,
        "k": k, "M": M, "ef_construction": ef_construction, "build_threads": build_threads,
        "build_repeats": build_repeats, "repeats": repeats, "min_seconds": min_seconds,
        "efs": list(efs),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "python": platform.python_version(),
    }
    return results


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(
            (a.strip(), b.strip()) for a, b in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)
        )
        return (f"{fields.get('Model name', '?')} (family {fields.get('CPU family', '?')}, "
                f"model {fields.get('Model', '?')}), {os.cpu_count()} cores")
    except OSError:
        return platform.processor() or "unknown"


def summarize(results: dict[str, Any], thresholds: tuple[float, ...] = THRESHOLDS,
              reference: str = "hnswlib") -> list[dict[str, Any]]:
    """Per library: build time, bytes/vector and, per recall threshold, the QPS at the
    smallest ef that reaches it (None if no ef did), plus ratios against ``reference``."""
    rows = []
    for lib, r in results["libraries"].items():
        points = sorted(r["sweep"].values(), key=lambda p: p["ef"])
        row: dict[str, Any] = {
            "library": lib, "build_s": r["build_s"], "bytes_per_vector": r["bytes_per_vector"],
            "reported_bytes_per_vector": (
                r["reported_bytes"] / results["meta"]["n"] if r.get("reported_bytes") else None
            ),
            "isa": r["info"].get("isa", ""), "version": r["info"].get("version", ""),
        }
        for t in thresholds:
            hit = next((p for p in points if p["recall"] >= t), None)
            row[f"qps@{t:.2f}"] = hit["qps"] if hit else None
            row[f"ef@{t:.2f}"] = hit["ef"] if hit else None
            row[f"qps~{t:.2f}"] = interpolated_qps(points, t)
            # (the lowest ef already past it: that point's QPS, a lower bound, not a crossing)
            row[f"qps~{t:.2f}:floor"] = bool(points) and points[0]["recall"] >= t
        row["max_recall"] = max((p["recall"] for p in points), default=0.0)
        rows.append(row)
    ref = next((row for row in rows if row["library"] == reference), None)
    for row in rows:
        keys = ["build_s", "bytes_per_vector"] + [f"qps@{t:.2f}" for t in thresholds]
        for key in keys + [f"qps~{t:.2f}" for t in thresholds]:
            a, b = row.get(key), ref.get(key) if ref else None
            row[f"{key}/ref"] = a / b if a and b else None
    return rows


def interpolated_qps(points: list[dict[str, Any]], target: float) -> float | None:
    """QPS where the curve crosses ``target`` recall: log(QPS) interpolated linearly between
    the last ef below and the first ef at or above it. The ef grid is coarse at the low end
    (one step of ef moves recall by ~0.005 on sgd), so this compares libraries at the same
    recall rather than at whichever grid point each happened to land on."""
    prev = None
    for p in points:
        if p["recall"] >= target:
            if prev is None or p["recall"] == prev["recall"]:
                return float(p["qps"]) if prev is None else None
            w = (target - prev["recall"]) / (p["recall"] - prev["recall"])
            return float(np.exp((1 - w) * np.log(prev["qps"]) + w * np.log(p["qps"])))
        prev = p
    return None


def interpolated_table(rows: list[dict[str, Any]],
                       thresholds: tuple[float, ...] = THRESHOLDS) -> str:
    """QPS at exactly each recall (interpolated on the curve), ratios against the reference.
    A library whose lowest ef is already past a recall shows that ef's QPS as ">= q": the
    curve does not cross there, and its QPS at that recall is at least this."""
    head = ["library"] + [f"QPS @ R@10={t:.2f} (interpolated)" for t in thresholds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["library"]]
        for t in thresholds:
            q, ratio = row[f"qps~{t:.2f}"], row[f"qps~{t:.2f}/ref"]
            mark = ">= " if row.get(f"qps~{t:.2f}:floor") else ""
            cells.append("—" if q is None else
                         f"{mark}{q:,.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], thresholds: tuple[float, ...] = THRESHOLDS,
                   reference: str = "hnswlib", build_threads: int = 2) -> str:
    """One table; ratios in brackets are against ``reference`` (QPS: higher is better;
    build time and bytes: lower is better)."""

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    def ratio(v: float | None) -> str:
        return "" if v is None else f" ({v:.2f}x)"

    head = ["library", f"build s ({build_threads} thr)", "bytes/vector (RSS)",
            "bytes/vector (reported)"]
    head += [f"QPS @ R@10>={t:.2f} (ef)" for t in thresholds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["library"],
            num(row["build_s"], ".1f") + ratio(row["build_s/ref"]),
            num(row["bytes_per_vector"], ".0f") + ratio(row["bytes_per_vector/ref"]),
            num(row["reported_bytes_per_vector"], ".0f"),
        ]
        for t in thresholds:
            q = row[f"qps@{t:.2f}"]
            cells.append(
                f"not reached (max {row['max_recall']:.3f})" if q is None
                else f"{q:,.0f}{ratio(row[f'qps@{t:.2f}/ref'])} (ef {row[f'ef@{t:.2f}']})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict[str, Any]) -> str:
    """The whole sweep, one line per (library, ef): recall@10 and best QPS."""
    lines = ["| library | ef | recall@10 | QPS |", "|---|---|---|---|"]
    for lib, r in results["libraries"].items():
        for p in sorted(r["sweep"].values(), key=lambda p: p["ef"]):
            lines.append(f"| {lib} | {p['ef']} | {p['recall']:.4f} | {p['qps']:,.0f} |")
    return "\n".join(lines)


def plot_sweep(results: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """Recall@10 against single-query QPS (log scale), one curve per library. Returns False
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lib, r in results["libraries"].items():
        pts = sorted(r["sweep"].values(), key=lambda p: p["ef"])
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], marker="o", ms=3,
                label=f"{lib} ({r['info'].get('isa', '')})")
    meta = results["meta"]
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (1 query/call, 1 thread)")
    ax.set_yscale("log")
    ax.set_title(f"{meta['dataset']} {meta['n']}x{meta['dim']}, M={meta['M']}, "
                 f"efC={meta['ef_construction']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("data (default: ../shared/data/sgd)")
    src.add_argument("--data", help="a folder with base_f16.npy (or base.npy), queries.npy, "
                                    "gt.npy")
    src.add_argument("--base", help="base vectors .npy")
    src.add_argument("--queries", help="query vectors .npy")
    src.add_argument("--gt", help="ground truth .npy (computed by brute force if absent)")
    src.add_argument("--synthetic", type=int, default=0, metavar="N",
                     help="N clustered random vectors instead of files")
    src.add_argument("--dim", type=int, default=384, help="dimension of --synthetic")
    src.add_argument("--limit", type=int, default=0, help="use only the first N base rows")
    p.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated subset")
    p.add_argument("--efs", default=",".join(map(str, DEFAULT_EFS)))
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="build threads")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per (library, ef)")
    p.add_argument("--build-repeats", type=int, default=2, help="builds per library")
    p.add_argument("--min-seconds", type=float, default=0.3,
                   help="each timed pass loops over the queries for at least this long")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--json", default="bench/results/compare_ann.json")
    p.add_argument("--plot", default="bench/results/compare_ann.png")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "python bench/compare_ann.py") -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.M, args.ef_construction, args.seed, args.k)
        return 0
    libs = tuple(s for s in args.libs.split(",") if s)
    unknown = set(libs) - set(ADAPTERS)
    if unknown:
        raise SystemExit(f"unknown libraries: {sorted(unknown)}")
    spec = prepare_dataset(
        args.data, base=args.base, queries=args.queries, gt=args.gt,
        synthetic=args.synthetic, dim=args.dim, limit=args.limit, k=args.k, seed=args.seed,
    )
    try:
        results = run_comparison(
            spec, libs, efs=tuple(int(e) for e in args.efs.split(",")), M=args.M,
            ef_construction=args.ef_construction, build_threads=args.threads,
            build_repeats=args.build_repeats, repeats=args.repeats,
            min_seconds=args.min_seconds, k=args.k, seed=args.seed,
            log=sys.stderr,
        )
    finally:
        if spec.tmpdir:
            import shutil

            shutil.rmtree(spec.tmpdir, ignore_errors=True)
    results["meta"]["command"] = prog + " " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    rows = summarize(results)
    results["summary"] = rows
    for path in (args.json, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    plotted = bool(args.plot) and plot_sweep(results, args.plot)
    meta = results["meta"]
    print(f"{meta['dataset']}: {meta['n']} x {meta['dim']}, {meta['queries']} queries, "
          f"M={meta['M']}, ef_construction={meta['ef_construction']}, {meta['date']}, "
          f"{meta['cpu']}\n")
    print(markdown_table(rows, build_threads=int(meta["build_threads"])))
    print()
    print(interpolated_table(rows))
    print()
    for lib, r in results["libraries"].items():
        i = r["info"]
        print(f"- {lib} {i.get('version', '')}: isa {i.get('isa', '')}; {i.get('flags', '')}")
        if "error" in r:
            print(f"  FAILED during the sweep ({r['error']}); its figures cover the passes "
                  "before the failure")
    if args.json:
        print(f"\nsweep: {args.json}" + (f", plot: {args.plot}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
