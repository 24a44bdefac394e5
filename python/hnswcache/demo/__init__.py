"""``hnswcache demo``: a stream of user questions replayed through a :class:`SemanticCache`.

The question bank (``questions.jsonl`` beside this file, written for this project) holds
questions in *intent* groups: each line is ``{"intent", "text"}``, optionally ``"ttl"``
(seconds: answers that go stale, like the weather) and ``"negative_of"`` (an intent it is a
hard negative of: same words, another question, e.g. "open" vs "close on Sunday"). The intent
ids are the ground truth: a hit whose stored answer has another intent is a *false hit*.

:func:`make_stream` draws a realistic stream from the bank (popular intents asked often,
exact repeats, paraphrases, first-time questions); :func:`load_log` reads a user's own log.
:func:`run_demo` replays either through a cache, answering misses with :class:`StandInLLM`,
then closes the cache (and its embedded server), opens a new one on the same data and checks
that it is still warm. :func:`format_report` turns the result into the text the CLI prints.
"""

from .replay import (
    DemoError,
    DemoResult,
    Event,
    Question,
    SimClock,
    StandInLLM,
    TimedEmbedder,
    format_report,
    load_embedder,
    load_log,
    load_questions,
    make_stream,
    questions_path,
    run_demo,
)

__all__ = [
    "DemoError",
    "DemoResult",
    "Event",
    "Question",
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
