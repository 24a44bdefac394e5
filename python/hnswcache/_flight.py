"""Coalescing of concurrent misses (single-flight) for the ``@cached`` decorators.

A burst of identical or paraphrased questions that all miss would each call the LLM. Here
the first miss of a scope leads: it calls the function, stores the answer and hands it to
every caller that missed meanwhile with the same prompt (the same entry id) or a prompt
whose embedding is at or above the cache's threshold from the leader's (what would have
been a semantic hit had the answer already been stored). Such followers wait for the
leader instead of calling. If the leader's call raises (or is cancelled), its followers
elect a new leader among themselves, within what is left of their wait (a failure used to
send the whole burst to the LLM at once, what a rate limit punishes); if it returns
something that is not a ``str`` (not cached), or takes longer than the wait limit, each
follower calls the function itself.

This registry is one process's; across processes the leaders also take a lease in the
store (cache.py). ``LEADING`` holds the flights the current thread or task (and the tasks
it starts) is leading: a call made from inside the call it would wait for never waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(eq=False)
class Flight:
    """One call in progress: what it answers, and how followers wait."""

    eid: int
    sid: str
    vec: npt.NDArray[np.float32] | None
    loop: asyncio.AbstractEventLoop | None = None
    done: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future[str | None] | None = None
    result: str | None = None
    # Its leader's call raised (or was cancelled): its followers elect a new leader among
    # themselves, within what is left of their wait, instead of all calling at once.
    failed: bool = False
    # The flights its leader is waiting on from inside its own call, a count per flight:
    # the tasks a call gathers share its flights, and each may wait on another (one link
    # per flight was overwritten by the second gathered wait, and a cycle through the
    # first went unseen: two calls waited on each other for their whole wait).
    waits_on: Counter[Flight] = field(default_factory=Counter)
    # The token of the store lease its leader asks for (None: not asked yet).
    token: str | None = None
    # The lease tokens of the calls waiting on it from inside calls of theirs (a count per
    # token: gathered tasks share their call's token): they wait on its leader, so its
    # leader's waits in the store are marked as theirs too (see waiting_tokens).
    inside_tokens: Counter[str] = field(default_factory=Counter)
    # The stored vector of the entry whose answer it hands over, when that entry is not
    # its own prompt's (a paraphrase's, answered in another process): each follower checks
    # its own prompt against it (a two-step match is no match).
    answer_vec: npt.NDArray[np.float32] | None = None


#: The flights the current context leads (inherited by the tasks it creates).
LEADING: contextvars.ContextVar[frozenset[Flight]] = contextvars.ContextVar(
    "hnswcache_leading", default=frozenset())


# Guards every waits_on link, whichever cache's registry the flights are in: a check for a
# wait cycle and the link it allows are one step.
_WAITS = threading.RLock()  # (re-entrant: see Flights.__init__ and waiting_tokens)


def _would_cycle(f: Flight, mine: frozenset[Flight]) -> bool:
    """Whether waiting on ``f`` would wait, through the leaders each flight's leader waits
    on, on a flight the current context leads (two leaders each calling the other's
    question would otherwise wait for each other until their wait limits)."""
    seen: set[int] = set()
    todo = [f]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        if cur in mine:
            return True
        seen.add(id(cur))
        todo.extend(g for g, n in cur.waits_on.items() if n > 0)
    return False


def stop_waiting(joined: Flight | None = None) -> None:
    """The current context's wait on another flight (``joined``; ``None``: every wait of
    the flights it leads) is over."""
    with _WAITS:
        for f in LEADING.get():
            if joined is None:
                f.waits_on.clear()
            elif f.waits_on[joined] > 1:
                f.waits_on[joined] -= 1
            else:
                f.waits_on.pop(joined, None)
        if joined is not None:
            joined.inside_tokens.subtract(_tokens(LEADING.get()))
            joined.inside_tokens += Counter()  # (drops counts down to 0)


def _tokens(flights: frozenset[Flight]) -> list[str]:
    return [t for g in flights if (t := g.token) is not None]


def waiting_tokens(f: Flight | None) -> frozenset[str]:
    """The tokens a wait of the current context on another process's call is marked with:
    the calls it leads (``f``, the call it waits for, among them), and every call waiting
    on one of those in this process from inside a call of its own, and on through the
    calls waiting on those: each of them waits, through this one, for the other process."""
    mine = LEADING.get()
    with _WAITS:
        for _ in range(3):
            try:
                return _closure(mine, f)
            except RuntimeError:  # (changed under us by this very thread: see Flights)
                continue
        return frozenset(_tokens(mine))


def _closure(mine: frozenset[Flight], f: Flight | None) -> frozenset[str]:
    tokens = set(_tokens(mine))
    todo = [*mine, *([f] if f is not None else [])]
    by_token: dict[str, Flight] | None = None  # (built only if a join is to be followed)
    seen: set[int] = set()
    while todo:
        g = todo.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        for t in list(g.inside_tokens):
            if t in tokens:
                continue
            tokens.add(t)
            if by_token is None:
                by_token = {x.token: x for reg in list(_ALL)
                            for flights in list(reg._by_scope.values())
                            for x in list(flights) if x.token is not None}
            if t in by_token:
                todo.append(by_token[t])
    return frozenset(tokens)


def leading_tokens() -> frozenset[str]:
    """The store-lease tokens of the calls the current context leads: a wait in the store
    is marked with them, so that a process whose chain of waits leads back to one of them
    can tell (see the caches' ``_lead``)."""
    return frozenset(f.token for f in LEADING.get() if f.token is not None)


def inside_call(eid: int) -> bool:
    """Whether the current context is inside the call it leads for entry ``eid``."""
    return any(f.eid == eid for f in LEADING.get())


class Flights:
    """The calls in progress of one cache, by scope."""

    def __init__(self) -> None:
        # (re-entrant, as _WAITS: a coroutine abandoned with a call in progress ends,
        # its finally included, when the garbage collector finds it, which can be in the
        # middle of this thread's own join or finish)
        self._lock = threading.RLock()
        self._by_scope: dict[str, list[Flight]] = {}
        with _WAITS:  # (waiting_tokens walks every registry under it)
            _ALL.add(self)

    def _forget_all(self) -> None:
        self._lock = threading.RLock()  # (another thread may have held it at the fork)
        self._by_scope = {}


    def _find(
        self, eid: int, sid: str, vec: npt.NDArray[np.float32] | None, threshold: float,
        loop: asyncio.AbstractEventLoop | None,
    ) -> Flight | None:
        mine = LEADING.get()
        for f in self._by_scope.get(sid, ()):
            if f.loop is not loop or _would_cycle(f, mine):
                continue  # never wait on one's own call (recursion), nor on another loop
            if f.eid == eid or (vec is not None and f.vec is not None
                                and float(f.vec @ vec) >= threshold):
                for led in mine:  # (so that no one waits on this context in a cycle)
                    led.waits_on[f] += 1
                f.inside_tokens.update(_tokens(mine))
                return f
        return None

    def join(
        self, eid: int, sid: str, vec: npt.NDArray[np.float32] | None, threshold: float,
    ) -> tuple[Flight, bool]:
        """The flight this miss follows, or a new one it leads: ``(flight, leads)``.
        ``vec`` is the prompt's unit embedding (``None`` if it was not computed)."""
        with self._lock, _WAITS:
            f = self._find(eid, sid, vec, threshold, None)
            if f is not None:
                return f, False
            f = Flight(eid, sid, vec)
            self._by_scope.setdefault(sid, []).append(f)
            return f, True

    def ajoin(
        self, eid: int, sid: str, vec: npt.NDArray[np.float32] | None, threshold: float,
    ) -> tuple[Flight, bool]:
        """:meth:`join` for a coroutine: followers await the leader's future."""
        loop = asyncio.get_running_loop()
        with self._lock, _WAITS:
            f = self._find(eid, sid, vec, threshold, loop)
            if f is not None:
                return f, False
            f = Flight(eid, sid, vec, loop, future=loop.create_future())
            self._by_scope.setdefault(sid, []).append(f)
            return f, True

    def finish(self, f: Flight, result: str | None) -> None:
        """End a flight; ``result`` is handed to its followers (``None``: they call)."""
        with self._lock, _WAITS:
            flights = self._by_scope.get(f.sid, [])
            if f in flights:
                flights.remove(f)
            if not flights:
                self._by_scope.pop(f.sid, None)
        f.result = result
        f.done.set()
        if f.future is not None and not f.future.done():
            f.future.set_result(result)


# Every registry, so that a forked child can empty them: it inherits the calls in progress
# of its parent but not the threads that would finish them, and its callers of the same
# question would wait for them for the whole wait limit (for ever with wait=inf).
_ALL: weakref.WeakSet[Flights] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _WAITS
    _WAITS = threading.RLock()  # (another thread may have held it at the fork)
    for flights in list(_ALL):
        flights._forget_all()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
