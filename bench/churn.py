"""Churn: a cache's content turned over many times, in each index that claims to handle it.

A live set of ``--n`` entries (default 50k rows of ../shared/data/sgd) goes through
``--cycles`` cycles (default 50); each cycle 10% of the live entries expire and as many new
ones arrive. The schedule is drawn once, up front, so every index sees the same one:

* **hnswcache** — every entry carries its absolute expiry time from the moment it is added
  (the schedule knows it), the clock is injected and set to the cycle number, and the index
  does the rest: expired entries stop being returned, and ``add`` consolidates by itself once
  the dead fraction passes its threshold (``hnswcache``), or ``consolidate()`` is called
  every cycle and timed (``hnswcache-explicit``);
* **hnswlib** ``mark_deleted`` (slots are never freed: capacity grows) and
  ``mark_deleted`` + ``add_items(replace_deleted=True)`` (slots reused);
* **usearch** ``remove`` + ``add``;
* **rebuild** — a fresh hnswcache index of the live set (the reference recall, and the
  rebuild time that consolidation is compared with).

After every cycle: recall@10 over the live set at a fixed ef (exact top-10 of the live set
computed here), single-query QPS, the process's resident memory growth since the data was
loaded, and the library's own size report. Each index runs in its own process.

``--bar`` runs the consolidation bar instead: 100k entries, 10% expire, time
``consolidate()`` against building the surviving 90k afresh.

Usage::

    python bench/churn.py                    # full run, table on stdout, JSON + PNG
    python bench/churn.py --n 5000 --cycles 5 --queries 200   # a quick look
    python bench/churn.py --bar
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from compare_ann import (
    DEFAULT_DATA,
    brute_force_knn,
    cpu_name,
    load_vectors,
    recall_at_k,
    rss_bytes,
    synthetic_vectors,
)

VARIANTS = (
    "hnswcache", "hnswcache-explicit", "hnswlib-mark", "hnswlib-replace", "usearch", "rebuild",
)


# ----------------------------------------------------------------------------- schedule
def make_schedule(n_rows: int, n: int, cycles: int, frac: float, seed: int) -> dict[str, Any]:
    """The churn every index replays.

    Labels are fresh integers; each label points at a row of the base. Each cycle picks
    ``frac`` of the live labels at random to expire (memoryless, like random TTLs) and adds
    as many new labels, taking rows that are not live: never-used rows first, then the
    longest-expired ones, so a row may come back later as a new entry.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_rows)
    live = list(range(n))
    rows = list(order[:n])
    free_rows = list(order[n:])  # queue of rows not live
    next_label = n
    per_cycle = int(round(frac * n))
    expire_at = {}  # label -> cycle at which it expires
    expired, inserted = [], []
    live_arr = np.array(live, dtype=np.int64)
    for c in range(1, cycles + 1):
        pick = rng.choice(live_arr.shape[0], per_cycle, replace=False)
        gone = live_arr[pick]
        for lab in gone.tolist():
            expire_at[lab] = c
            free_rows.append(rows[lab])
        keep = np.ones(live_arr.shape[0], dtype=bool)
        keep[pick] = False
        new = np.arange(next_label, next_label + per_cycle, dtype=np.int64)
        for _ in range(per_cycle):
            rows.append(free_rows.pop(0))
        next_label += per_cycle
        live_arr = np.concatenate([live_arr[keep], new])
        expired.append(gone)
        inserted.append(new)
    rows_arr = np.asarray(rows, dtype=np.int64)
    expiry = np.full(next_label, np.inf)
    for lab, c in expire_at.items():
        # Half a cycle early, so "expired at time c" never hangs on a boundary comparison.
        expiry[lab] = c - 0.5
    return {
        "n": n, "cycles": cycles, "per_cycle": per_cycle, "rows": rows_arr, "expiry": expiry,
        "initial": np.arange(n, dtype=np.int64), "expired": expired, "inserted": inserted,
    }


def prepare(args: argparse.Namespace, workdir: Path) -> Path:
    """Write the schedule, the vectors and the exact top-k of every cycle to ``workdir``."""
    if args.synthetic:
        base = synthetic_vectors(args.synthetic, args.dim, args.seed)
        queries = synthetic_vectors(args.queries, args.dim, args.seed + 1)
    else:
        d = Path(args.data) if args.data else DEFAULT_DATA
        base = load_vectors(str(d / "base_f16.npy"))
        queries = load_vectors(str(d / "queries.npy"))[: args.queries]
    sch = make_schedule(base.shape[0], args.n, args.cycles, args.frac, args.seed)
    gts = []
    live = set(sch["initial"].tolist())
    for c in range(args.cycles + 1):
        if c:
            live -= set(sch["expired"][c - 1].tolist())
            live |= set(sch["inserted"][c - 1].tolist())
        lab = np.array(sorted(live), dtype=np.int64)
        top = brute_force_knn(base[sch["rows"][lab]], queries, args.k)
        gts.append(lab[top])
    np.save(workdir / "base.npy", base)
    np.save(workdir / "queries.npy", queries)
    np.savez(
        workdir / "schedule.npz", rows=sch["rows"], expiry=sch["expiry"],
        initial=sch["initial"], expired=np.stack(sch["expired"]),
        inserted=np.stack(sch["inserted"]), gt=np.stack(gts),
    )
    return workdir


# ----------------------------------------------------------------------------- variants
class Clock:
    """The injected clock of hnswcache: time is the cycle number."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Variant:
    """One way of living through the schedule. ``cycle`` applies one cycle's expiries and
    insertions and returns what it timed; ``search_one`` is one query at the fixed ef."""

    def __init__(self, dim: int, M: int, efc: int, ef: int, threads: int, seed: int):
        self.dim, self.M, self.efc, self.ef, self.threads, self.seed = (
            dim, M, efc, ef, threads, seed)

    def start(self, x: np.ndarray, labels: np.ndarray, expiry: np.ndarray) -> None:
        raise NotImplementedError

    def cycle(self, c: int, gone: np.ndarray, x: np.ndarray, labels: np.ndarray,
              expiry: np.ndarray, live_x: np.ndarray | None, live_labels: np.ndarray
              ) -> dict[str, float]:
        raise NotImplementedError

    def search_one(self, q: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def reported_bytes(self) -> int | None:
        return None

    def extra(self) -> dict[str, Any]:
        return {}


class HnswcacheVariant(Variant):
    explicit = False

    def start(self, x, labels, expiry):
        import hnswcache

        self.clock = Clock()
        self.index = hnswcache.Index(
            self.dim, M=self.M, ef_construction=self.efc, ef_search=self.ef,
            capacity=labels.shape[0], seed=self.seed, clock=self.clock,
            auto_consolidate=None if self.explicit else 0.10,
        )
        self.index.add(x, labels, expires_at=expiry, num_threads=self.threads)

    def cycle(self, c, gone, x, labels, expiry, live_x, live_labels):
        self.clock.now = float(c)  # this cycle's expiries happen by themselves
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.explicit:
            info = self.index.consolidate(num_threads=self.threads)
            out["consolidate_s"] = time.perf_counter() - t0
            out["removed"] = float(info.get("removed", 0))
        t1 = time.perf_counter()
        self.index.add(x, labels, expires_at=expiry, num_threads=self.threads)
        out["add_s"] = time.perf_counter() - t1
        out["update_s"] = time.perf_counter() - t0
        return out

    def search_one(self, q, k):
        return self.index.search(q, k, num_threads=1)[0][0]

    def reported_bytes(self):
        from hnswcache.benchmark import _memory_from_stats

        return _memory_from_stats(self.index.stats())

    def extra(self):
        s = self.index.stats()
        keep = {}
        for key, v in s.items():
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                keep[key] = float(v)
        return {"stats": keep}


class HnswcacheExplicitVariant(HnswcacheVariant):
    explicit = True


class HnswlibVariant(Variant):
    replace = False

    def start(self, x, labels, expiry):
        import hnswlib

        self.index = hnswlib.Index(space="cosine", dim=self.dim)
        self.index.init_index(
            max_elements=labels.shape[0], M=self.M, ef_construction=self.efc,
            random_seed=self.seed, allow_replace_deleted=self.replace,
        )
        self.index.set_ef(self.ef)
        self.index.add_items(x, labels, num_threads=self.threads)

    def cycle(self, c, gone, x, labels, expiry, live_x, live_labels):
        t0 = time.perf_counter()
        for lab in gone.tolist():
            self.index.mark_deleted(lab)
        if self.replace:
            self.index.add_items(x, labels, num_threads=self.threads, replace_deleted=True)
        else:
            need = self.index.element_count + labels.shape[0]
            if need > self.index.max_elements:
                # Deleted slots are never freed: the index has to grow (hnswlib users do
                # this by hand; 10% steps keep the waste small, as a careful user would).
                self.index.resize_index(max(need, int(self.index.max_elements * 1.1)))
            self.index.add_items(x, labels, num_threads=self.threads)
        return {"update_s": time.perf_counter() - t0}

    def search_one(self, q, k):
        return self.index.knn_query(q, k=k, num_threads=1)[0][0]

    def reported_bytes(self):
        return int(self.index.index_file_size())

    def extra(self):
        return {"max_elements": int(self.index.max_elements),
                "element_count": int(self.index.element_count)}


class HnswlibReplaceVariant(HnswlibVariant):
    replace = True


class UsearchVariant(Variant):
    def start(self, x, labels, expiry):
        from usearch.index import Index

        self.index = Index(ndim=self.dim, metric="cos", dtype="f32", connectivity=self.M,
                           expansion_add=self.efc, expansion_search=self.ef)
        self.index.add(labels, x, threads=self.threads)

    def cycle(self, c, gone, x, labels, expiry, live_x, live_labels):
        t0 = time.perf_counter()
        self.index.remove(gone)
        self.index.add(labels, x, threads=self.threads)
        return {"update_s": time.perf_counter() - t0}

    def search_one(self, q, k):
        return self.index.search(q, k, threads=1).keys

    def reported_bytes(self):
        return int(self.index.memory_usage)

    def extra(self):
        return {"size": len(self.index), "capacity": int(self.index.capacity)}


class RebuildVariant(Variant):
    """A fresh hnswcache index of the live set every cycle: what churn should not lose."""

    def start(self, x, labels, expiry):
        self.index = None
        self._build(x, labels)

    def _build(self, x, labels) -> float:
        import hnswcache

        self.index = None  # free the old one first, so memory shows one index
        t0 = time.perf_counter()
        self.index = hnswcache.Index(
            self.dim, M=self.M, ef_construction=self.efc, ef_search=self.ef,
            capacity=labels.shape[0], seed=self.seed, auto_consolidate=None,
        )
        self.index.add(x, labels, num_threads=self.threads)
        return time.perf_counter() - t0

    def cycle(self, c, gone, x, labels, expiry, live_x, live_labels):
        return {"update_s": self._build(live_x, live_labels)}

    def search_one(self, q, k):
        return self.index.search(q, k, num_threads=1)[0][0]

    def reported_bytes(self):
        from hnswcache.benchmark import _memory_from_stats

        return _memory_from_stats(self.index.stats())


IMPORTS = {
    "hnswcache": "hnswcache", "hnswcache-explicit": "hnswcache", "rebuild": "hnswcache",
    "hnswlib-mark": "hnswlib", "hnswlib-replace": "hnswlib", "usearch": "usearch.index",
}

VARIANT_CLASSES: dict[str, type[Variant]] = {
    "hnswcache": HnswcacheVariant,
    "hnswcache-explicit": HnswcacheExplicitVariant,
    "hnswlib-mark": HnswlibVariant,
    "hnswlib-replace": HnswlibReplaceVariant,
    "usearch": UsearchVariant,
    "rebuild": RebuildVariant,
}


def measure(v: Variant, queries: np.ndarray, gt: np.ndarray, k: int) -> dict[str, float]:
    """Recall@k over the live set and single-query QPS (best of two passes)."""
    for q in queries[:50]:
        v.search_one(q, k)
    best = float("inf")
    found = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for _ in range(2):
        t0 = time.perf_counter()
        out = [v.search_one(q, k) for q in queries]
        best = min(best, time.perf_counter() - t0)
    for i, row in enumerate(out):
        row = np.asarray(row).reshape(-1)[:k]
        found[i, : row.shape[0]] = row
    return {"recall": recall_at_k(found, gt, k), "qps": queries.shape[0] / best}


def worker(name: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = np.load(workdir / "base.npy")
    queries = np.load(workdir / "queries.npy")
    s = np.load(workdir / "schedule.npz")
    rows, expiry, gt = s["rows"], s["expiry"], s["gt"]
    v = VARIANT_CLASSES[name](base.shape[1], args.M, args.ef_construction, args.ef,
                              args.threads, args.seed)
    live = set(s["initial"].tolist())
    # Import the library before the memory baseline: only what the index holds counts.
    __import__(IMPORTS[name])
    lab0 = s["initial"]
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    v.start(base[rows[lab0]], lab0, expiry[lab0])
    build_s = time.perf_counter() - t0
    per_cycle = []

    def snapshot(c: int, timing: dict[str, float]) -> None:
        if name == "rebuild" and c % args.rebuild_every and c != args.cycles:
            return
        m = measure(v, queries, gt[c], args.k)
        rec = {"cycle": c, **m, **timing, "rss_growth": rss_bytes() - rss0,
               "reported_bytes": v.reported_bytes(), **v.extra()}
        per_cycle.append(rec)
        print(f"[{name}] cycle {c}: recall {m['recall']:.4f} qps {m['qps']:,.0f} "
              f"rss +{rec['rss_growth'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)

    snapshot(0, {"update_s": build_s})
    for c in range(1, args.cycles + 1):
        gone = s["expired"][c - 1]
        new = s["inserted"][c - 1]
        live -= set(gone.tolist())
        live |= set(new.tolist())
        if name == "rebuild" and c % args.rebuild_every and c != args.cycles:
            continue  # only rebuilt (and measured) every few cycles: it is the slow one
        live_lab = np.array(sorted(live), dtype=np.int64)
        # Only the rebuild needs the whole live set: a copy made for every variant would
        # sit in this process's memory figure.
        live_x = base[rows[live_lab]] if name == "rebuild" else None
        timing = v.cycle(c, gone, base[rows[new]], new, expiry[new], live_x, live_lab)
        del live_x
        snapshot(c, timing)
    return {"variant": name, "build_s": build_s, "cycles": per_cycle}


# ----------------------------------------------------------------------------- bar
def consolidation_bar(args: argparse.Namespace) -> dict[str, Any]:
    """Consolidating 10% of 100k entries against rebuilding the survivors (same threads)."""
    import hnswcache

    d = Path(args.data) if args.data else DEFAULT_DATA
    base = (synthetic_vectors(args.bar_n, args.dim, args.seed) if args.synthetic
            else load_vectors(str(d / "base_f16.npy"))[: args.bar_n])
    n = base.shape[0]
    rng = np.random.default_rng(args.seed)
    expiry = np.full(n, np.inf)
    dead = rng.choice(n, int(round(args.frac * n)), replace=False)
    expiry[dead] = 0.5
    labels = np.arange(n, dtype=np.int64)
    runs = []
    for r in range(args.bar_repeats):
        clock = Clock()
        idx = hnswcache.Index(base.shape[1], M=args.M, ef_construction=args.ef_construction,
                              capacity=n, seed=args.seed, clock=clock, auto_consolidate=None)
        t0 = time.perf_counter()
        idx.add(base, labels, expires_at=expiry, num_threads=args.threads)
        full_build = time.perf_counter() - t0
        clock.now = 1.0
        t0 = time.perf_counter()
        info = idx.consolidate(num_threads=args.threads)
        cons = time.perf_counter() - t0
        integ = idx.check_integrity()
        del idx
        keep = np.setdiff1d(labels, dead)
        idx2 = hnswcache.Index(base.shape[1], M=args.M, ef_construction=args.ef_construction,
                               capacity=keep.shape[0], seed=args.seed, auto_consolidate=None)
        t0 = time.perf_counter()
        idx2.add(base[keep], keep, num_threads=args.threads)
        rebuild = time.perf_counter() - t0
        del idx2
        runs.append({"full_build_s": full_build, "consolidate_s": cons, "rebuild_s": rebuild,
                     "ratio": cons / rebuild, "info": _jsonable(info),
                     "unreachable_live": _jsonable(integ).get("unreachable_live")})
        print(f"[bar] run {r + 1}: consolidate {cons:.2f} s, rebuild {rebuild:.2f} s, "
              f"ratio {cons / rebuild:.3f}", file=sys.stderr, flush=True)
    return {"n": n, "dead": int(dead.shape[0]), "threads": args.threads, "runs": runs,
            "best_ratio": min(r["ratio"] for r in runs),
            "median_ratio": float(np.median([r["ratio"] for r in runs]))}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        elif not isinstance(v, (int, float, str, bool, type(None))):
            v = str(v)
        out[key] = v
    return out


# ----------------------------------------------------------------------------- report
def summary_table(results: dict[str, Any]) -> str:
    """Per variant: recall and QPS at the first and last cycle, memory after the first and
    last cycle, and the mean time of one cycle's update."""
    rebuild = results["variants"].get("rebuild")
    ref = {r["cycle"]: r["recall"] for r in rebuild["cycles"]} if rebuild else {}
    head = ["index", "recall@10 c1 → last", "Δ vs fresh build (last)", "QPS c1 → last",
            "memory c1 → last (RSS MiB)", "last/c1 memory", "reported MiB c1 → last",
            "update s/cycle (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["variants"].items():
        cyc = [c for c in r["cycles"] if c["cycle"] > 0]
        if not cyc:
            continue
        first, last = cyc[0], cyc[-1]
        delta = last["recall"] - ref[last["cycle"]] if last["cycle"] in ref else None
        mem1, memn = first["rss_growth"] / 2**20, last["rss_growth"] / 2**20
        upd = float(np.mean([c["update_s"] for c in cyc]))
        lines.append("| " + " | ".join([
            name,
            f"{first['recall']:.4f} → {last['recall']:.4f}",
            "—" if delta is None or name == "rebuild" else f"{delta:+.4f}",
            f"{first['qps']:,.0f} → {last['qps']:,.0f}",
            f"{mem1:.0f} → {memn:.0f}",
            f"{memn / mem1:.2f}" if mem1 > 0 else "—",
            "—" if not first.get("reported_bytes") else
            f"{first['reported_bytes'] / 2**20:.0f} → {last['reported_bytes'] / 2**20:.0f}",
            f"{upd:.2f}",
        ]) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in results["variants"].items():
        cyc = r["cycles"]
        xs = [c["cycle"] for c in cyc]
        style = dict(marker="o" if name == "rebuild" else None, ms=3,
                     ls="--" if name == "rebuild" else "-")
        axes[0].plot(xs, [c["recall"] for c in cyc], label=name, **style)
        axes[1].plot(xs, [c["rss_growth"] / 2**20 for c in cyc], label=name, **style)
        axes[2].plot(xs, [c["qps"] for c in cyc], label=name, **style)
    m = results["meta"]
    axes[0].set_ylabel(f"recall@10 over the live set (ef={m['ef']})")
    axes[1].set_ylabel("memory: RSS growth of the process (MiB)")
    axes[2].set_ylabel("single-query QPS")
    for ax in axes:
        ax.set_xlabel("cycle (10% expire, 10% arrive)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"churn on {m['dataset']}: {m['n']} live entries, {m['cycles']} cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder with base_f16.npy and queries.npy (default sgd)")
    p.add_argument("--synthetic", type=int, default=0, metavar="ROWS")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--n", type=int, default=50_000, help="live entries")
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--frac", type=float, default=0.10, help="expired and added per cycle")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ef", type=int, default=64, help="fixed search ef")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="insert/build threads")
    p.add_argument("--rebuild-every", type=int, default=5, help="cycles between rebuilds")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--json", default="bench/results/churn.json")
    p.add_argument("--plot", default="bench/results/churn.png")
    p.add_argument("--bar", action="store_true", help="only the consolidation-vs-rebuild bar")
    p.add_argument("--bar-n", type=int, default=100_000)
    p.add_argument("--bar-repeats", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        out = worker(args.worker, Path(args.workdir), args)
        Path(args.workdir, f"result-{args.worker}.json").write_text(json.dumps(out))
        return 0
    if args.bar:
        res = consolidation_bar(args)
        res["cpu"] = cpu_name()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"consolidating {res['dead']} of {res['n']} entries vs rebuilding the "
              f"{res['n'] - res['dead']} survivors ({res['threads']} threads):")
        for r in res["runs"]:
            print(f"  consolidate {r['consolidate_s']:.2f} s, rebuild {r['rebuild_s']:.2f} s,"
                  f" ratio {r['ratio']:.3f}, unreachable live {r['unreachable_live']}")
        print(f"median ratio {res['median_ratio']:.3f} (bar: < 0.100)")
        return 0
    import shutil
    import tempfile

    names = [s for s in args.variants.split(",") if s]
    unknown = set(names) - set(VARIANT_CLASSES)
    if unknown:
        raise SystemExit(f"unknown variants: {sorted(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="hnswcache-churn-"))
    try:
        t0 = time.perf_counter()
        prepare(args, workdir)
        print(f"schedule and exact top-{args.k} per cycle: {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        results: dict[str, Any] = {"variants": {}}
        passthrough = argv if argv is not None else sys.argv[1:]
        failed = {}
        for name in names:
            # One process per index: memory is the process's own, and nothing one library
            # left behind (allocator state, threads) weighs on the next.
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *passthrough, "--worker", name,
                 "--workdir", str(workdir)],
                check=False,
            )
            out = workdir / f"result-{name}.json"
            if proc.returncode != 0 or not out.exists():
                # One broken variant must not throw away the others' twenty minutes.
                failed[name] = f"worker exited {proc.returncode}"
                continue
            results["variants"][name] = json.loads(out.read_text())
        results["failed"] = failed
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["meta"] = {
        "dataset": f"synthetic-{args.synthetic}" if args.synthetic else "sgd",
        "n": args.n, "cycles": args.cycles, "frac": args.frac, "ef": args.ef, "k": args.k,
        "M": args.M, "ef_construction": args.ef_construction, "threads": args.threads,
        "queries": args.queries, "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/churn.py " + " ".join(passthrough),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    plotted = bool(args.plot) and plot(results, args.plot)
    print(summary_table(results))
    for name, why in results["failed"].items():
        print(f"- {name}: FAILED ({why})")
    if plotted:
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
