"""Does learning per-entry thresholds from verdicts pay on a stream of real questions?

    python bench/learn_thresholds.py [--events 3000] [--seeds 3]

Replays streams drawn from the demo's question bank (``hnswcache.demo.make_stream``:
intents by popularity, exact repeats, paraphrases, and hard negatives: look-alike questions
of another intent) through a ``@cached`` function, with all-MiniLM-L6-v2 embeddings (the
``embed`` extra). The stand-in LLM answers every question of an intent with that intent's
one text, so the default judge (``same_text``) is a perfect one here; a real LLM's answers
vary and need a judge that compares meaning. Each configuration runs the same streams on an
in-memory cache; with ``feedback``, every false hit served is reported (a user's thumbs
down) through ``cache.feedback(hit, False)``; with ``audit``, ``@cached(audit=...)`` checks
that share of the semantic hits by calling the LLM and judging its answer against the
cached one (an audited request counts as an LLM call, not a hit).

Printed per configuration (summed over the seeds): requests, hits, false hits (a hit
whose answer is another intent's), hit rate, the false hits' share of hits, LLM calls,
verdicts recorded, hits answered by a learned threshold, and entries at the end (those
whose verdicts lowered their own threshold in brackets).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnswcache import SemanticCache
from hnswcache.demo import load_questions, make_stream
from hnswcache.embed import MiniLMEmbedder


@dataclass
class Config:
    label: str
    threshold: float = 0.85
    learn_floor: float | None = None
    learn_after: int = 3
    feedback: bool = False
    audit: float = 0.0


CONFIGS = [
    Config("static 0.85 (default)"),
    Config("static 0.80", threshold=0.80),
    Config("static 0.75", threshold=0.75),
    Config("static 0.85 + feedback", feedback=True),
    Config("learn: floor 0.70, after 2", learn_floor=0.70, learn_after=2),
    Config("learn: floor 0.70, after 3", learn_floor=0.70, learn_after=3),
    Config("learn: floor 0.70, after 3 + feedback", learn_floor=0.70, learn_after=3,
           feedback=True),
    Config("learn: floor 0.60, after 3 + feedback", learn_floor=0.60, learn_after=3,
           feedback=True),
    Config("static 0.85 + audit 5%", audit=0.05),
    Config("static 0.85 + audit 20%", audit=0.20),
    Config("static 0.80 + audit 20%", threshold=0.80, audit=0.20),
]


class Table:
    def __init__(self, vecs: dict[str, np.ndarray]) -> None:
        self.vecs = vecs
        self.dim = next(iter(vecs.values())).shape[0]
        self.name = "all-MiniLM-L6-v2"

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vecs[t] for t in texts])


def run(cfg: Config, events: list[Any], emb: Table) -> dict[str, int]:
    cache = SemanticCache(emb, store="memory", threshold=cfg.threshold,
                          learn_floor=cfg.learn_floor, learn_after=cfg.learn_after,
                          snapshot_interval=None)
    answer = {ev.text: f"The answer for {ev.intent}." for ev in events}
    calls = [0]

    @cache.cached(coalesce=False, name="llm", audit=cfg.audit)
    def llm(prompt: str) -> str:
        calls[0] += 1
        return answer[prompt]

    out = {"requests": 0, "hits": 0, "false_hits": 0}
    for ev in events:
        out["requests"] += 1
        if not cfg.feedback:  # (through the decorator alone, audits included)
            before = calls[0]
            got = llm(ev.text)
            cache.wait_for_verdicts()  # (a judge's verdict before the next request)
            if calls[0] == before:
                out["hits"] += 1
                out["false_hits"] += got != answer[ev.text]
            continue
        hit = cache.get(ev.text, scope={"_fn": "llm"})
        if hit is None:
            llm(ev.text)
            continue
        out["hits"] += 1
        if hit.response != answer[ev.text]:
            out["false_hits"] += 1
            if cfg.feedback:
                cache.feedback(hit, False)
    st = cache.stats()
    out["llm_calls"] = calls[0]
    out["verdicts"] = st["verdicts_right"] + st["verdicts_wrong"]
    out["audits"] = st["audits"]
    records = [r for batch in cache.store.scan() for r in batch if r is not None]
    out["entries"] = len(records)
    out["lowered"] = sum(cache._core.entry_threshold(r, cfg.threshold) < cfg.threshold
                         for r in records)
    out["hits_learned"] = st["hits_learned"]
    cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    questions = load_questions()
    streams = [make_stream(questions, n_events=args.events, seed=s) for s in range(args.seeds)]
    texts = sorted({ev.text for evs in streams for ev in evs})
    model = MiniLMEmbedder()
    vecs = np.asarray(model(texts), dtype=np.float32)
    emb = Table(dict(zip(texts, vecs)))
    print(f"{len(questions)} questions, {len({q.intent for q in questions})} intents; "
          f"{args.seeds} streams of {args.events} requests ({len(texts)} distinct texts)")
    print()
    print("| configuration | hits | false hits | hit rate | false share of hits | LLM calls "
          "| audits | verdicts | learned hits | entries (lowered) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg in CONFIGS:
        tot: dict[str, int] = {}
        for evs in streams:
            for k, v in run(cfg, evs, emb).items():
                tot[k] = tot.get(k, 0) + v
        print(f"| {cfg.label} | {tot['hits']} | {tot['false_hits']} | "
              f"{tot['hits'] / tot['requests']:.3f} | "
              f"{tot['false_hits'] / max(1, tot['hits']):.3f} | {tot['llm_calls']} | "
              f"{tot['audits']} | {tot['verdicts']} | {tot['hits_learned']} | "
              f"{tot['entries']} ({tot['lowered']}) |", flush=True)


if __name__ == "__main__":
    main()
