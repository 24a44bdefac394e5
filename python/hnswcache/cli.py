"""The ``hnswcache`` command: ``demo``, ``bench``, ``calibrate`` and ``inspect``.

    hnswcache demo                       # a stream of questions through a SemanticCache
    hnswcache demo --data my_log.jsonl   # your own log instead
    hnswcache bench --synthetic 20000    # hnswcache vs the ANN libraries installed
    hnswcache calibrate                  # hit / false-hit rate per threshold
    hnswcache inspect redis://host:6379  # what a cache in a server holds

Every subcommand is also a function (``cmd_demo`` ...) taking the parsed arguments; the
library modules it drives log and never print. Progress bars use ``tqdm`` (or ``rich``) when
installed, and nothing otherwise. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from .store.server import ServerStartError, redact_url

__all__ = ["build_parser", "main"]

log = logging.getLogger("hnswcache.cli")


# ----------------------------------------------------------------------------- helpers
def progress(it: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """A progress bar on stderr with tqdm, else rich, else none (only on a terminal, or when
    ``HNSWCACHE_PROGRESS=1``)."""
    want = os.environ.get("HNSWCACHE_PROGRESS")
    if want == "0" or (want != "1" and not sys.stderr.isatty()):
        yield from it
        return
    try:
        from tqdm import tqdm

        yield from tqdm(it, total=total, desc=desc, unit="q", leave=False, file=sys.stderr)
        return
    except ImportError:
        pass
    try:
        from rich.progress import track

        yield from track(it, total=total, description=desc, transient=True)
        return
    except ImportError:
        pass
    yield from it


def _say(msg: str = "", file: TextIO | None = None) -> None:
    print(msg, file=file or sys.stdout, flush=True)


def _int_at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low`` (argparse then says which argument)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float, *, low_open: bool = False) -> Any:
    """An argparse type: a number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value
    return parse


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _load_npy(path: str) -> npt.NDArray[Any]:
    """One array from a .npy file (an .npz archive, or anything else np.load returns,
    is refused with a message; pickled objects are never loaded)."""
    obj = np.load(path, allow_pickle=False)
    if not isinstance(obj, np.ndarray):
        if hasattr(obj, "close"):
            obj.close()
        raise CliError(f"{path}: not a .npy array (an .npz archive? save one array with "
                       f"np.save)")
    return obj


def _normalise(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    if x.dtype.kind not in "biuf":
        raise CliError(f"embeddings must be numbers, got {x.dtype}")
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise CliError(f"expected a 2-D array of embeddings, got shape {a.shape}")
    n = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.isfinite(a).all() or not n.all():
        raise CliError("embeddings contain NaN, infinity or zero vectors")
    return a / n


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Replay a question stream (or ``--data`` log) through a SemanticCache; print the report."""
    if args.json and Path(args.json).is_dir():  # (found after the whole run before)
        raise CliError(f"--json {args.json} is a folder: give a file name")
    from .demo import (
        DemoError,
        format_report,
        load_embedder,
        load_log,
        load_questions,
        make_stream,
        questions_path,
        run_demo,
    )

    try:
        questions = load_questions(args.questions) if not args.data else (
            load_questions(args.questions) if args.questions else None)
        if args.data:
            events = load_log(args.data)
            source = f"log {args.data}"
        else:
            assert questions is not None
            events = make_stream(questions, n_events=args.events, seed=args.seed)
            n_int = len({q.intent for q in questions})
            src = args.questions or questions_path().name
            source = (f"drawn from {len(questions)} questions in {n_int} intent groups, "
                      f"{src}, seed {args.seed}")
        hook = os.environ.get("HNSWCACHE_DEMO_EMBEDDER")
        which = f"HNSWCACHE_DEMO_EMBEDDER={hook}" if hook else args.embedder
        _say(f"hnswcache demo: loading the embedder ({which})...", sys.stderr)
        t0 = time.perf_counter()
        embedder = load_embedder(args.embedder)
        if args.embedder == "hash" and not hook:
            _say("NOTE: --embedder hash is a word-hash stand-in with no notion of meaning: "
                 "paraphrases with other words miss and the semantic figures say nothing "
                 "about a real model.", sys.stderr)
        _say(f"  loaded in {time.perf_counter() - t0:.1f} s; starting the store "
             f"({redact_url(args.store)})", sys.stderr)
        result = run_demo(
            events, embedder=embedder, questions=questions, source=source, store=args.store,
            data_dir=args.data_dir, namespace=args.namespace, threshold=args.threshold,
            speed=args.speed, seed=args.seed, probes=args.probes, keep=args.keep,
            restart=not args.no_restart, progress=progress,
        )
    except DemoError as exc:
        _say(f"hnswcache demo: {exc}", sys.stderr)
        return 2
    _say(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_demo_json(result), indent=1))
        _say(f"\nfigures: {args.json}")
    if args.data_dir:
        _say(f"\nThe cache stays in {args.data_dir}: hnswcache inspect --data-dir "
             f"{args.data_dir} --namespace {args.namespace}")
    return 0


def _demo_json(r: Any) -> dict[str, Any]:
    n = len(r.lookups)
    out = {
        "lookups": n, "hits": r.hits, "hits_exact": r.count("exact"),
        "hits_semantic": r.count("semantic"), "misses": r.count("miss"),
        "hit_rate": r.hits / n if n else 0.0, "false_hits": len(r.false_hits),
        "llm_calls": r.llm_calls, "llm_seconds_spent": r.llm_seconds_spent,
        "llm_seconds_saved": r.llm_seconds_saved, "answers_with_ttl": r.answers_with_ttl,
        "expired_by_end": r.expired_by_end, "threshold": r.threshold, "embedder": r.embedder,
        "cache_stats": r.cache_stats,
    }
    if r.restart is not None:
        p = r.restart.probes
        out["restart"] = {
            "entries_loaded": r.restart.entries_loaded,
            "warm_seconds": r.restart.warm_seconds,
            "texts_embedded_for_warm_start": r.restart.texts_embedded_for_warm_start,
            "probes": len(p), "probe_hits": sum(1 for lk in p if lk.tier != "miss"),
            "probe_false_hits": sum(1 for lk in p if lk.false_hit),
        }
    return out


# ----------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """The ANN comparison (``hnswcache.benchmark``) against the peers that are installed."""
    import importlib.util

    from . import benchmark as bm

    if args.libs:
        libs = tuple(s for s in args.libs.split(",") if s)
        unknown = set(libs) - set(bm.ADAPTERS)
        if unknown:
            raise CliError(f"unknown libraries {sorted(unknown)}; known: {', '.join(bm.LIBRARIES)}")
    else:
        module = {"hnswcache": "hnswcache", "hnswlib": "hnswlib", "faiss": "faiss",
                  "usearch": "usearch"}
        libs = tuple(lib for lib in bm.LIBRARIES
                     if importlib.util.find_spec(module[lib]) is not None)
        missing = [lib for lib in bm.LIBRARIES if lib not in libs]
        if missing:
            _say(f"not installed, skipped: {', '.join(missing)} "
                 f"(pip install 'hnswcache[bench]' for all)", sys.stderr)
    if not args.base and not args.data and not args.synthetic:
        args.synthetic = 20000
        _say("no data given: --synthetic 20000 (clustered random vectors); pass --base/"
             "--queries .npy files or --data DIR for real embeddings", sys.stderr)
    try:
        spec = bm.prepare_dataset(
            args.data, base=args.base, queries=args.queries, gt=args.gt,
            synthetic=args.synthetic, dim=args.dim, n_queries=args.n_queries,
            limit=args.limit, k=args.k, seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    try:
        efs = tuple(int(e) for e in args.efs.split(",")) if args.efs else bm.DEFAULT_EFS
    except ValueError:
        efs = ()
    if not efs or min(efs) < 1:
        raise CliError(f"--efs must be positive integers, got {args.efs!r}")
    try:
        results = bm.run_comparison(
            spec, libs, efs=efs, M=args.M, ef_construction=args.ef_construction,
            build_threads=args.threads, build_repeats=args.build_repeats,
            repeats=args.repeats, min_seconds=args.min_seconds, k=args.k, seed=args.seed,
            log=sys.stderr,
        )
    except RuntimeError as exc:  # (a worker refused the settings, or died)
        raise CliError(str(exc)) from None
    finally:
        if spec.tmpdir:
            import shutil

            shutil.rmtree(spec.tmpdir, ignore_errors=True)
    results["meta"]["command"] = "hnswcache " + " ".join(args.argv)  # (argv holds "bench")
    rows = bm.summarize(results)
    results["summary"] = rows
    meta = results["meta"]
    _say(f"{meta['dataset']}: {meta['n']} x {meta['dim']}, {meta['queries']} queries, "
         f"M={meta['M']}, ef_construction={meta['ef_construction']}, {meta['date']}, "
         f"{meta['cpu']}\n")
    _say(bm.markdown_table(rows, build_threads=int(meta["build_threads"])))
    _say()
    _say(bm.interpolated_table(rows))
    _say()
    failed = []
    for lib, r in results["libraries"].items():
        i = r["info"]
        _say(f"- {lib} {i.get('version', '')}: isa {i.get('isa', '')}")
        if "error" in r:
            _say(f"  FAILED during the sweep ({r['error']})")
            failed.append(lib)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        _say(f"\nsweep: {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        if bm.plot_sweep(results, args.plot):
            _say(f"plot: {args.plot}")
        else:
            _say("no plot: matplotlib is not installed (pip install 'hnswcache[plot]')")
    if failed:
        _say(f"hnswcache bench: the sweep failed for {', '.join(failed)}", sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- calibrate
DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.50, 0.991, 0.01))


def bank_pairs(path: str | os.PathLike[str] | None = None) -> tuple[list[str], list[str],
                                                                      list[int], list[str]]:
    """Labelled pairs from a question bank: every two texts of one intent (label 1) and every
    text against every text of its hard-negative intent (label 0)."""
    from .demo import load_questions

    qs = load_questions(path)
    by: dict[str, list[str]] = {}
    neg: set[tuple[str, str]] = set()
    for q in qs:
        by.setdefault(q.intent, []).append(q.text)
        if q.negative_of:
            neg.add((q.intent, q.negative_of))
    a: list[str] = []
    b: list[str] = []
    y: list[int] = []
    kind: list[str] = []
    for texts in by.values():
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                a.append(texts[i])
                b.append(texts[j])
                y.append(1)
                kind.append("paraphrase")
    for x, z in sorted(neg):
        for s in by.get(x, []):
            for t in by.get(z, []):
                a.append(s)
                b.append(t)
                y.append(0)
                kind.append("hard negative")
    return a, b, y, kind


_PAIR_KEYS = (("a", "b"), ("text1", "text2"), ("sentence1", "sentence2"), ("q", "paraphrase"),
              ("query", "candidate"), ("left", "right"))


def read_pairs(path: str | os.PathLike[str]) -> tuple[list[str], list[str], list[int]]:
    """Pairs from a jsonl: two texts (``a``/``b``, ``text1``/``text2``, ``sentence1``/
    ``sentence2``, ``q``/``paraphrase``...) and ``label`` (1 same, 0 not; default 1)."""
    a: list[str] = []
    b: list[str] = []
    y: list[int] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
                raise CliError(f"{path}:{n}: not JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(row, dict):
                raise CliError(f"{path}:{n}: expected a JSON object per line")
            keys = next((k for k in _PAIR_KEYS if k[0] in row and k[1] in row), None)
            if keys is None:
                raise CliError(f"{path}:{n}: no pair of text fields (one of "
                               f"{', '.join('/'.join(k) for k in _PAIR_KEYS)})")
            a.append(str(row[keys[0]]))
            b.append(str(row[keys[1]]))
            y.append(_pair_label(row.get("label", 1), f"{path}:{n}"))
    if not a:
        raise CliError(f"{path}: no pairs")
    return a, b, y


def _pair_label(label: Any, where: str) -> int:
    """1 (same meaning) or 0 from a pair's ``label``: a bool, a number (>= 0.5 is same:
    scores in [0, 1] are accepted), or text ("1", "0.8", "true", "same", "yes", "match")."""
    if isinstance(label, str):
        text = label.strip().lower()
        try:
            label = float(text)  # "1.0", "0.8": a number written as text
        except ValueError:
            return int(text in ("true", "same", "yes", "match"))
    if isinstance(label, bool):
        return int(label)
    if not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
        raise CliError(f"{where}: label must be 0 or 1 (or a score in [0, 1], true, false), "
                       f"got {str(label)[:40]}")
    return int(label >= 0.5)


def threshold_table(sims: npt.NDArray[np.float64], labels: npt.NDArray[np.int64],
                    thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Per threshold t: hit rate (positives with sim >= t), false-hit rate (negatives with
    sim >= t) and precision (of the pairs at or above t, the share that are positives)."""
    pos, neg = sims[labels == 1], sims[labels == 0]
    rows = []
    for t in thresholds:
        tp = int((pos >= t - 1e-9).sum())
        fp = int((neg >= t - 1e-9).sum())
        rows.append({
            "threshold": float(t), "hit_rate": tp / len(pos) if len(pos) else math.nan,
            "false_hit_rate": fp / len(neg) if len(neg) else math.nan,
            # (no pair at or above t: no precision, NaN; it was 1.0, and a threshold no
            # pair reaches got recommended, with a hit rate of 0)
            "precision": tp / (tp + fp) if tp + fp else math.nan, "hits": tp,
            "false_hits": fp,
        })
    return rows


def recommend(rows: Sequence[dict[str, float]], target: float) -> dict[str, float] | None:
    """The lowest threshold whose precision -- and every higher threshold's -- meets
    ``target`` (the most hits at that precision); ``None`` if none does."""
    best = None
    for row in sorted(rows, key=lambda r: -r["threshold"]):
        if math.isnan(row["precision"]):
            continue  # (nothing that high: no evidence either way)
        if row["precision"] >= target:
            best = row
        else:
            break
    return best


def plot_calibration(rows: Sequence[dict[str, float]], rec: dict[str, float] | None,
                     path: str | os.PathLike[str], title: str) -> bool:
    """Hit rate and false-hit rate against the threshold; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(t, [r["hit_rate"] for r in rows], label="hit rate (same-meaning pairs)", lw=2)
    ax.plot(t, [r["false_hit_rate"] for r in rows], label="false-hit rate (different meaning)",
            lw=2)
    ax.plot(t, [r["precision"] for r in rows], label="precision", lw=1, ls="--")
    if rec is not None:
        ax.axvline(rec["threshold"], color="grey", ls=":",
                   label=f"recommended {rec['threshold']:.2f}")
    ax.set_xlabel("threshold (cosine similarity; hit when >= threshold)")
    ax.set_ylabel("share of pairs")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _npy_labels(path: str) -> npt.NDArray[np.int64]:
    """Labels from a .npy: 0/1, booleans, or scores in [0, 1] (>= 0.5 is same meaning, as
    in a jsonl; a cast to int made 0.9 a 0)."""
    raw = _load_npy(path).reshape(-1)
    if raw.dtype.kind not in "biuf":
        raise CliError(f"{path}: labels must be numbers, got {raw.dtype}")
    val = raw.astype(np.float64)
    if len(val) and not (np.isfinite(val).all() and val.min() >= 0 and val.max() <= 1):
        raise CliError(f"{path}: labels must be 0 or 1 (or scores in [0, 1]), got values "
                       f"from {val.min()} to {val.max()}")
    return (val >= 0.5).astype(np.int64)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Hit rate and false-hit rate per threshold on labelled pairs; the recommended one."""
    kinds: list[str] | None = None
    if args.a or args.b:
        if not (args.a and args.b):
            raise CliError("--a and --b go together (two .npy files of embeddings, row i a pair)")
        va, vb = _normalise(_load_npy(args.a)), _normalise(_load_npy(args.b))
        if va.shape != vb.shape:
            raise CliError(f"--a and --b shapes differ: {va.shape} vs {vb.shape}")
        labels = (_npy_labels(args.labels) if args.labels
                  else np.ones(len(va), dtype=np.int64))
        if len(labels) != len(va):
            raise CliError(f"{len(labels)} labels for {len(va)} pairs")
        source = f"{args.a} / {args.b}"
    else:
        from .demo import DemoError, load_embedder

        if args.pairs:
            a, b, y = read_pairs(args.pairs)
            source = str(args.pairs)
        else:
            a, b, y, kinds = bank_pairs(args.questions)
            source = ("the demo question bank: every two questions of one intent, and every "
                      "question against its hard-negative intent")
        try:
            emb = load_embedder(args.embedder)
        except DemoError as exc:
            _say(f"hnswcache calibrate: {exc}\n(or pass embeddings: --a A.npy --b B.npy "
                 f"[--labels L.npy])", sys.stderr)
            return 2
        texts = list(dict.fromkeys(a + b))
        vecs: dict[str, npt.NDArray[np.float64]] = {}
        batch = 256
        chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
        for chunk in progress(chunks, len(chunks), "embedding"):
            for t, v in zip(chunk, _normalise(emb(chunk))):
                vecs[t] = v
        va = np.stack([vecs[t] for t in a])
        vb = np.stack([vecs[t] for t in b])
        labels = np.asarray(y, dtype=np.int64)
    n_pos = int((labels == 1).sum())
    if args.shuffled_negatives:
        pos = np.flatnonzero(labels == 1)
        rng = np.random.default_rng(args.seed)
        shift = rng.integers(1, len(pos), size=len(pos)) if len(pos) > 1 else np.zeros(0, int)
        if len(shift):
            va = np.concatenate([va, va[pos]])
            vb = np.concatenate([vb, vb[pos[(np.arange(len(pos)) + shift) % len(pos)]]])
            labels = np.concatenate([labels, np.zeros(len(pos), dtype=np.int64)])
            if kinds is not None:
                kinds = kinds + ["shuffled negative"] * len(pos)
    sims = np.einsum("ij,ij->i", va, vb)
    n_neg = int((labels == 0).sum())
    if n_pos == 0:
        raise CliError("no positive pairs (label 1): nothing to calibrate hits on")
    thresholds = ([float(t) for t in args.thresholds.split(",")] if args.thresholds
                  else list(DEFAULT_THRESHOLDS))
    if not thresholds or not all(-1.0 <= t <= 1.0 for t in thresholds):
        raise CliError(f"--thresholds must be cosine similarities in [-1, 1], got "
                       f"{args.thresholds!r}")
    rows = threshold_table(sims, labels, thresholds)
    rec = recommend(rows, args.target_precision)
    _say(f"{n_pos} same-meaning pairs, {n_neg} different-meaning pairs, from {source}")
    pos_s, neg_s = sims[labels == 1], sims[labels == 0]
    _say(f"cosine similarity: same-meaning mean {pos_s.mean():.3f} (p5 "
         f"{np.percentile(pos_s, 5):.3f}, min {pos_s.min():.3f})"
         + (f"; different-meaning mean {neg_s.mean():.3f} (p95 {np.percentile(neg_s, 95):.3f},"
            f" max {neg_s.max():.3f})" if n_neg else ""))
    if kinds is not None and n_neg:
        ka = np.asarray(kinds)
        for k in sorted(set(kinds) - {"paraphrase"}):
            s = sims[ka == k]
            _say(f"  {k}: {len(s)} pairs, similarity mean {s.mean():.3f}, max {s.max():.3f}")
    _say()
    _say("threshold  hit rate  false-hit rate  precision")
    shown = [r for r in rows if args.all_rows or abs(r["threshold"] * 100 % 5) < 1e-6
             or (rec is not None and r["threshold"] == rec["threshold"])]
    for r in shown:
        mark = "  <- recommended" if rec is not None and r["threshold"] == rec["threshold"] else ""
        fh = "-" if math.isnan(r["false_hit_rate"]) else f"{r['false_hit_rate']:.3f}"
        pr = "-" if math.isnan(r["precision"]) else f"{r['precision']:.3f}"
        _say(f"   {r['threshold']:.2f}     {r['hit_rate']:.3f}      {fh:>7s}       "
             f"{pr:>5s}{mark}")
    _say()
    if n_neg == 0:
        _say("No different-meaning pairs (label 0): precision is 1 wherever a pair scores. "
             "Add negatives (label 0 lines, or --shuffled-negatives) for a meaningful "
             "recommendation.")
    if rec is None and not any(r["hits"] + r["false_hits"] for r in rows):
        _say(f"No pair scores at or above any threshold tried (the highest similarity is "
             f"{sims.max():.3f}): lower the range with --thresholds.")
    elif rec is None:
        _say(f"No threshold in the range reaches precision {args.target_precision:.3f}: "
             f"the data has different-meaning pairs that score as high as same-meaning "
             f"ones; scopes or exact keys must separate those.")
    else:
        _say(f"Recommended threshold: {rec['threshold']:.2f} -- the lowest with precision >= "
             f"{args.target_precision:.3f} ({rec['precision']:.3f}): hit rate "
             f"{rec['hit_rate']:.3f}, false-hit rate "
             + ("-" if math.isnan(rec["false_hit_rate"]) else f"{rec['false_hit_rate']:.3f}")
             + f". Use it as SemanticCache(threshold={rec['threshold']:.2f}).")
        if rec["threshold"] == min(thresholds):
            _say("(That is the lowest threshold tried: the negatives here are easy. Add "
                 "look-alike pairs of your own, or lower the range with --thresholds.)")
        _say("Precision depends on the mix of pairs: a mix with more look-alike questions "
             "than your traffic has makes it pessimistic, and the reverse optimistic.")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"source": source, "rows": rows,
                                               "recommended": rec}, indent=1))
        _say(f"table: {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        title = f"{n_pos} same / {n_neg} different pairs" + (
            f", target precision {args.target_precision:.2f}")
        if plot_calibration(rows, rec, args.plot, title):
            _say(f"plot: {args.plot}")
        else:
            _say("no plot: matplotlib is not installed (pip install 'hnswcache[plot]')")
    return 0


# ----------------------------------------------------------------------------- inspect
def _decode(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


TTL_BUCKETS = ((60, "< 1 min"), (3600, "< 1 h"), (86400, "< 1 day"), (7 * 86400, "< 1 week"),
               (math.inf, ">= 1 week"))


#: No entry was written before this (2020-01-01): an earlier `created` is forged.
_FIRST_WRITE = 1577836800.0


def _valid_namespace(name: str) -> bool:
    from .store.base import validate_namespace

    try:
        validate_namespace(name)
    except ValueError:
        return False
    return True


def _shown(text: Any) -> str:
    """A value read from the server, as printable text: control characters escaped (a
    stored escape sequence must not drive the user's terminal)."""
    t = _decode(text)
    return t if t.isprintable() else repr(t)[1:-1]


def inspect_server(client: Any, *, namespace: str | None = None, last: int = 10,
                   sample: int = 2000) -> dict[str, Any]:
    """What the hnswcache caches in a server hold (read-only: SCAN, HMGET, PTTL, XREVRANGE,
    MEMORY USAGE on a sample, INFO). Returns a JSON-able dict."""
    from .store.redis import keys_for

    foreign: list[str] = []
    if namespace:
        namespaces = [namespace]
    else:
        found: set[str] = set()
        for k in client.scan_iter(match="hc:{*}:*", count=1000):
            key = _decode(k)
            end = key.find("}:", 4)
            if key.startswith("hc:{") and end > 0:
                found.add(key[4:end])
        # (a key shaped like ours whose namespace is no valid name is not a cache's: listed
        # apart, not an error that ended the whole report)
        namespaces = sorted(n for n in found if _valid_namespace(n))
        foreign = sorted(n for n in found if not _valid_namespace(n))
    cluster = hasattr(client, "get_node_from_key")  # (a RedisCluster: SCAN covers every
    # primary, keyed commands go to their slot's node)
    if cluster:
        per = client.info(target_nodes=client.PRIMARIES)
        infos = ([per] if "redis_version" in per or "valkey_version" in per
                 else [v for v in per.values() if isinstance(v, dict)])
    else:
        infos = [client.info()]
    info = infos[0]
    server = {
        "version": info.get("valkey_version") or info.get("redis_version"),
        "kind": "valkey" if "valkey_version" in info else "redis",
        "used_memory": sum(int(i.get("used_memory") or 0) for i in infos),
        "maxmemory": info.get("maxmemory"),
        "maxmemory_policy": info.get("maxmemory_policy"),
        "keys_total": sum(v.get("keys", 0) for i in infos for k, v in i.items()
                          if k.startswith("db") and isinstance(v, dict)),
    }
    warnings = []
    if cluster:
        server["nodes"] = len(infos)
    elif info.get("cluster_enabled") in (1, "1"):
        # (the other nodes' caches were left out, and one whose slot is elsewhere was
        # reported empty: its reads got MOVED)
        warnings.append("this server is a node of a Redis Cluster: only its own keys are "
                        "read; give redis+cluster://host:port for the whole cluster")
    out: dict[str, Any] = {"server": server, "namespaces": {}, "foreign": foreign,
                           "warnings": warnings}
    for ns in namespaces:
        k = keys_for(ns)
        ids = [_decode(x)[len(k["entry"]):]
               for x in client.scan_iter(match=k["entry"] + "*", count=1000)]
        fields = ("scope_json", "created", "expires", "prompt", "metadata")
        scopes: Counter[str] = Counter()
        ttl_hist: Counter[str] = Counter()
        no_ttl = 0
        created: list[tuple[float, str, str]] = []
        mem_sample: list[int] = []
        bad = 0
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            pipe = client.pipeline(transaction=False)
            for i in chunk:
                pipe.hmget(k["entry"] + i, *fields)
                pipe.pttl(k["entry"] + i)
            res = pipe.execute(raise_on_error=False)  # (a key of another type: unreadable)
            for j, i in enumerate(chunk):
                vals, pttl = res[2 * j], res[2 * j + 1]
                if not isinstance(vals, list) or vals[0] is None:
                    bad += 1
                    continue
                if not isinstance(pttl, int):
                    pttl = None
                try:
                    at = float(_decode(vals[1]))
                except (TypeError, ValueError):
                    at = math.nan
                if not _FIRST_WRITE <= at <= time.time() + 86400 * 365:  # (forged: an
                    bad += 1  # unreadable entry, counted in no scope or TTL either)
                    continue
                created.append((at, i, _decode(vals[3])))
                scopes[_decode(vals[0])] += 1
                if pttl is None or pttl < 0:
                    no_ttl += 1
                else:
                    secs = pttl / 1000
                    ttl_hist[next(lbl for lim, lbl in TTL_BUCKETS if secs < lim)] += 1
            if len(mem_sample) < sample:
                pipe = client.pipeline(transaction=False)
                for i in chunk[: sample - len(mem_sample)]:
                    pipe.memory_usage(k["entry"] + i)
                try:
                    mem_sample += [int(m) for m in pipe.execute() if m]
                except Exception:  # MEMORY USAGE may be disabled on managed servers
                    sample = 0
        try:
            raw_meta = client.hgetall(k["meta"]) or {}
        except Exception:  # (another type at the key: no meta to show)
            raw_meta = {}
        meta = {_decode(a): _decode(b) for a, b in raw_meta.items()
                if _decode(a) != "ref_secret"}  # (the key of ref() tags: never shown)
        sizes = {}
        for name in ("lru", "exp"):
            try:
                sizes[name] = int(client.zcard(k[name]))
            except Exception:
                sizes[name] = 0
        try:
            log_len = int(client.xlen(k["log"]))
        except Exception:  # (another type at the key)
            log_len = 0
        try:
            tail = client.xrevrange(k["log"], count=last) if last > 0 and log_len else []
        except Exception:
            tail = []
        events = []
        for pos, f in tail:
            f = {_decode(a): _decode(b) for a, b in f.items()}
            ms = int(_decode(pos).split("-")[0])
            events.append({"at": ms / 1000, "op": f.get("op"), "id": f.get("id"),
                           "scope": f.get("scope")})
        created.sort(reverse=True)
        est = (float(np.mean(mem_sample)) * len(ids)) if mem_sample else None
        out["namespaces"][ns] = {
            "entries": len(ids), "invalid": bad, "meta": meta,
            "scopes": dict(scopes.most_common()), "no_ttl": no_ttl,
            "ttl_remaining": {lbl: ttl_hist[lbl] for _, lbl in TTL_BUCKETS if ttl_hist[lbl]},
            "entry_bytes_mean": float(np.mean(mem_sample)) if mem_sample else None,
            "entry_bytes_estimate": est, "memory_sampled": len(mem_sample),
            "lru_size": sizes["lru"], "exp_size": sizes["exp"], "log_length": log_len,
            "last_writes": [{"created": c, "id": i, "prompt": p}
                            for c, i, p in created[:last] if last > 0],
            "last_log_events": events,
        }
    return out


def format_inspect(rep: dict[str, Any], where: str) -> str:
    s = rep["server"]
    L = [f"{where}: {s['kind']} {s['version']}, {s['keys_total']} keys, used memory "
         f"{_human_bytes(s['used_memory'] or 0)}"
         + (f" (maxmemory {_human_bytes(s['maxmemory'])}, policy {s['maxmemory_policy']})"
            if s.get("maxmemory") else "")
         + (f", {s['nodes']} primaries" if s.get("nodes") else "")]
    L += [f"warning: {w}" for w in rep.get("warnings", ())]
    if not rep["namespaces"]:
        L.append("no hnswcache cache here (no hc:{namespace}:* keys)")
    if rep.get("foreign"):
        L.append("keys shaped like a cache's, of no valid namespace (not read): "
                 + ", ".join(repr(n) for n in rep["foreign"][:10])
                 + (f" and {len(rep['foreign']) - 10} more" if len(rep["foreign"]) > 10
                    else ""))
    now = time.time()
    for ns, r in rep["namespaces"].items():
        L.append("")
        meta = r["meta"]
        held = ((f", {_shown(meta['dim'])}-d vectors" if "dim" in meta else "")
                + (f" from {_shown(meta['embedder'])}" if meta.get("embedder") else ""))
        empty = not (r["entries"] or meta or r["log_length"] or r["lru_size"])
        L.append(f"namespace {ns!r}: {r['entries']} entries" + held
                 + (f", {r['invalid']} unreadable" if r["invalid"] else "")
                 + (" (nothing is stored under this namespace)" if empty else ""))
        if r["entry_bytes_mean"] is not None:
            L.append(f"  memory       ~{_human_bytes(r['entry_bytes_estimate'])} in entries "
                     f"({_human_bytes(r['entry_bytes_mean'])} each, MEMORY USAGE of "
                     f"{r['memory_sampled']} sampled)")
        L.append(f"  bookkeeping  lru {r['lru_size']}, expiry index {r['exp_size']}, change "
                 f"log {r['log_length']} events")
        L.append(f"  scopes       {len(r['scopes'])}")
        for sc, c in list(r["scopes"].items())[:10]:
            text = _shown(sc) if sc not in ("{}", "") else "(default scope)"
            L.append(f"    {c:7d}  {text[:120]}" + (f"... ({len(text)} characters)"
                                                    if len(text) > 120 else ""))
        if len(r["scopes"]) > 10:
            L.append(f"    ... {len(r['scopes']) - 10} more")
        ttl = ", ".join(f"{lbl}: {c}" for lbl, c in r["ttl_remaining"].items())
        L.append(f"  TTL left     no expiry: {r['no_ttl']}" + (f"; {ttl}" if ttl else ""))
        if r["last_writes"]:
            L.append("  last writes (entry created, cache clock)")
            for w in r["last_writes"]:
                age = now - w["created"]
                at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w["created"]))
                ago = f" ({_human_seconds(age)} ago)" if age >= 0 else ""
                L.append(f"    {at}{ago}  {_shown(w['id'])}  {w['prompt'][:60]!r}")
        if r["last_log_events"]:
            ops = Counter(e["op"] for e in r["last_log_events"])
            L.append(f"  last {len(r['last_log_events'])} log events: "
                     + ", ".join(f"{_shown(op)} {c}" for op, c in ops.items()))
        if "snapshots" in r:
            if not r["snapshots"]:
                missing = ("" if rep.get("snapshot_dir_exists", True) else
                           f"; no folder {_shown(rep.get('snapshot_dir'))}")
                L.append(f"  snapshot     none (the next start reads the server{missing})")
            for snap in r["snapshots"]:
                L.append("  snapshot     " + _format_snapshot(snap, now))
    return "\n".join(L)


def _format_snapshot(snap: dict[str, Any], now: float) -> str:
    if "error" in snap:
        return (f"unusable ({snap['error']}; {_human_bytes(snap['bytes'])}): a start "
                "reads the server")
    written = snap["written"]
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written))
            + (f" ({_human_seconds(now - written)} ago)" if now >= written else ""))
    raw_idx = snap.get("index")
    idx: dict[str, Any] = raw_idx if isinstance(raw_idx, dict) else {}
    settings = ", ".join(f"{k} {_shown(str(idx[k]))}"
                         for k in ("M", "ef_construction", "alpha", "dtype") if k in idx)
    fits = ("its log position is still in the server: a cache of these settings starting "
            "now loads it" if snap.get("position_held") else
            "its log position is gone from the server: a start reads the server")
    return (f"{snap['entries']} entries in {snap['scopes']} scope(s), "
            f"{_human_bytes(snap['bytes'])}, written {when}"
            + (f" ({settings})" if settings else "") + f"; {fits}")


def _inspect_snapshot(client: Any, root: str | os.PathLike[str], ns: str
                      ) -> list[dict[str, Any]]:
    """The namespace's snapshots (one per variant of the index settings), each with
    whether the server's change log still holds its position: a cache of those settings
    starting now loads it; if not, it reads the server."""
    import redis

    from . import _snapshot
    from .store.redis import RedisStore

    snaps = _snapshot.describe(root, ns)
    log_key = RedisStore(client, namespace=ns).k_log
    for info in snaps:
        if "position" in info:
            pos = info["position"]
            try:
                info["position_held"] = bool(client.xrange(log_key, pos, pos, count=1))
            except redis.exceptions.ResponseError as exc:
                info["position_held"] = False
                info["error"] = f"the server refused its position: {exc}"
    return snaps


def cmd_inspect(args: argparse.Namespace) -> int:
    """Read-only report of the caches in a Redis/Valkey server."""
    try:
        import redis
        import redis.cluster
    except ImportError:
        raise CliError("inspect needs redis-py: pip install 'hnswcache[redis]'") from None
    server = None
    if args.data_dir:
        from .store.server import shared_server

        if not (Path(args.data_dir) / "server.json").exists() and not any(
                Path(args.data_dir).glob("appendonly*")):
            raise CliError(f"{args.data_dir} holds no embedded cache (no server.json and no "
                           "append-only file)")
        url, server = shared_server(args.data_dir)
        where = f"{args.data_dir} ({redact_url(url)})"
    elif args.url:
        url, where = args.url, redact_url(args.url)
    else:
        raise CliError("give a URL (redis://host:6379/0) or --data-dir of an embedded cache")
    snapshots = (args.snapshot_dir if args.snapshot_dir
                 else Path(args.data_dir) / "snapshots" if args.data_dir else None)
    try:
        from .store.redis import _cluster_url

        seed = _cluster_url(url)
        client: Any = (redis.cluster.RedisCluster.from_url(seed, socket_timeout=args.timeout)
                       if seed is not None else
                       redis.Redis.from_url(url, socket_timeout=args.timeout))
        try:
            rep = inspect_server(client, namespace=args.namespace, last=args.last)
            if snapshots is not None:
                rep["snapshot_dir"] = str(snapshots)
                rep["snapshot_dir_exists"] = Path(snapshots).is_dir()
                for ns, r in rep["namespaces"].items():
                    r["snapshots"] = _inspect_snapshot(client, snapshots, ns)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise CliError(f"{where}: {exc}") from None
        finally:
            client.close()
    finally:
        if server is not None:
            server.stop()
    if args.json:
        _say(json.dumps(rep, indent=1))
    else:
        _say(format_inspect(rep, where))
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hnswcache`` command."""
    from . import __version__

    p = argparse.ArgumentParser(
        prog="hnswcache",
        description="hnswcache: a time-aware HNSW index and a semantic LLM cache on any "
                    "Redis or Valkey.")
    p.add_argument("--version", action="version", version=f"hnswcache {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log the library's messages (-vv: debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="replay a stream of user questions through a cache",
                       description=cmd_demo.__doc__)
    d.add_argument("--data", metavar="FILE.jsonl",
                   help="replay your own log: one {'text', ['intent'], ['ttl'], ['scope'], "
                        "['t'], ['response']} per line, in order")
    d.add_argument("--questions", metavar="FILE.jsonl",
                   help="another question bank ({'intent', 'text', ['ttl'], ['negative_of']})")
    d.add_argument("--events", type=_int_at_least(1), default=300,
                   help="questions in the stream (300)")
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    d.add_argument("--speed", type=_float_in(0, 1e6), default=5.0,
                   help="the stand-in LLM sleeps 1/SPEED of its modelled 0.3-1.5 s (5; "
                        "1 = real time, 0 = no sleep)")
    d.add_argument("--embedder", choices=("minilm", "hash"), default="minilm",
                   help="minilm: offline all-MiniLM-L6-v2 (the 'demo' extra); hash: a "
                        "meaning-blind stand-in")
    d.add_argument("--store", default="embedded",
                   help="embedded (a private valkey-server, default), memory, or a "
                        "redis:// URL")
    d.add_argument("--data-dir", help="folder of the embedded server (default: a temporary "
                                      "one, removed at the end)")
    d.add_argument("--namespace", default="demo")
    d.add_argument("--threshold", type=float, default=None,
                   help="cosine-similarity threshold (default: the cache's)")
    d.add_argument("--probes", type=_int_at_least(0), default=60,
                   help="questions asked again after the restart (60)")
    d.add_argument("--keep", action="store_true",
                   help="do not clear what the namespace already holds")
    d.add_argument("--no-restart", action="store_true", help="skip the restart check")
    d.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="compare with hnswlib, faiss, usearch (those installed)",
                       description=cmd_bench.__doc__)
    src = b.add_argument_group("data (default: --synthetic 20000)")
    src.add_argument("--data", help="a folder with base_f16.npy (or base.npy), queries.npy, "
                                    "gt.npy")
    src.add_argument("--base", help="base vectors .npy (n x dim)")
    src.add_argument("--queries", help="query vectors .npy")
    src.add_argument("--gt", help="ground-truth neighbours .npy (brute force if absent)")
    src.add_argument("--synthetic", type=_int_at_least(0), default=0, metavar="N",
                     help="N clustered random vectors")
    src.add_argument("--dim", type=_int_at_least(1), default=384, help="dimension of --synthetic")
    src.add_argument("--n-queries", type=_int_at_least(1), default=1000,
                     help="queries of --synthetic")
    src.add_argument("--limit", type=_int_at_least(0), default=0, help="only the first N base rows")
    b.add_argument("--libs", default="", help="comma-separated (default: all installed)")
    b.add_argument("--efs", default="", help="comma-separated ef sweep")
    b.add_argument("--M", type=_int_at_least(2), default=16)
    b.add_argument("--ef-construction", type=_int_at_least(1), default=200)
    b.add_argument("--threads", type=_int_at_least(1), default=2, help="build threads (2)")
    b.add_argument("--repeats", type=_int_at_least(1), default=3)
    b.add_argument("--build-repeats", type=_int_at_least(1), default=1)
    b.add_argument("--min-seconds", type=_float_in(0, 3600), default=0.3)
    b.add_argument("--k", type=_int_at_least(1), default=10)
    b.add_argument("--seed", type=int, default=100)
    b.add_argument("--json", default="hnswcache-bench.json", help="sweep JSON ('' for none)")
    b.add_argument("--plot", default="hnswcache-bench.png",
                   help="recall-vs-QPS PNG ('' for none; needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="hit and false-hit rate per threshold",
                       description=(cmd_calibrate.__doc__ or "") + " Default data: the "
                       "demo's question bank (needs the model).")
    c.add_argument("pairs", nargs="?", metavar="PAIRS.jsonl",
                   help="text pairs: {'a', 'b', 'label'} per line (label 1 = same meaning)")
    c.add_argument("--a", help="embeddings .npy, row i = first text of pair i")
    c.add_argument("--b", help="embeddings .npy, row i = second text of pair i")
    c.add_argument("--labels", help="labels .npy (1 same, 0 different; default all 1)")
    c.add_argument("--questions", help="a question bank to draw pairs from (default: the "
                                       "demo's)")
    c.add_argument("--shuffled-negatives", action="store_true",
                   help="add one mismatched pair per positive (easy negatives)")
    c.add_argument("--embedder", choices=("minilm", "hash"), default="minilm")
    c.add_argument("--target-precision", type=_float_in(0, 1, low_open=True), default=0.95,
                   help="recommend the lowest threshold with this precision (0.95)")
    c.add_argument("--thresholds", default="", help="comma-separated (default 0.50..0.99)")
    c.add_argument("--all-rows", action="store_true", help="print every threshold")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", help="write the table as JSON")
    c.add_argument("--plot", default="hnswcache-calibrate.png",
                   help="PNG plot ('' for none; needs matplotlib)")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="what a cache in a Redis/Valkey server holds",
                       description=cmd_inspect.__doc__)
    i.add_argument("url", nargs="?", help="redis://[user:pass@]host:port/db or rediss://")
    i.add_argument("--data-dir", help="instead of a URL: the folder of an embedded server")
    i.add_argument("--snapshot-dir", help="the caches' snapshot_dir, to report on their "
                   "snapshots (default with --data-dir: its snapshots folder)")
    i.add_argument("--namespace", help="only this cache namespace (default: all found)")
    i.add_argument("--last", type=_int_at_least(0), default=10, help="last writes shown (10)")
    i.add_argument("--timeout", type=_float_in(0, 3600, low_open=True), default=5.0)
    i.add_argument("--json", action="store_true", help="JSON instead of text")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hnswcache`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.WARNING if not args.verbose else
        (logging.INFO if args.verbose == 1 else logging.DEBUG),
        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except CliError as exc:
        _say(f"hnswcache {args.command}: {exc}", sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of the input. Python would report
        # it again when flushing stdout at exit: stdout goes to /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError, ServerStartError) as exc:
        # Bad input (a missing or unreadable file, a number that is not one, no server
        # binary): a message and status 2, not a traceback.
        _say(f"hnswcache {args.command}: {exc}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
