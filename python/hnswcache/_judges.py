"""Where ``@cached``'s judges run in a :class:`~hnswcache.SemanticCache`: one background
thread per cache, one judgment at a time, a few waiting.

A judge may be an LLM call, as slow as the call it judges, so neither the caller nor the
calls coalesced with it wait for one. The thread is a daemon: a process that exits, or a
cache that is closed, drops the judgments not started instead of running them first, and
does not wait long for a judge that hangs. The cache's judgment enters the native index
only through :meth:`JudgeRunner.native`, which a stopped runner refuses and an exit (or
:meth:`JudgeRunner.stop`) waits out, so nothing is written after ``close()``; a judge that
calls the cache itself is given a second to end. (A daemon thread still inside the index
as the interpreter finalises is parked by the native module, not aborted: see
``nogil`` in ``cpp/src/bindings.cpp``.)
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("hnswcache.cache")

#: Seconds an idle judge thread waits for work before it ends (a new one starts on demand).
_IDLE = 30.0
#: Seconds an exit or stop() waits for a judgment to leave the native index.
_NATIVE_WAIT = 2.0
#: Seconds an exit without close() waits for a judgment under way to end.
_EXIT_WAIT = 1.0

_RUNNERS: weakref.WeakSet[JudgeRunner] = weakref.WeakSet()


class Stopped(Exception):
    """The runner was stopped: the judgment must not go on into native code."""


class JudgeRunner:
    """Runs jobs one at a time in a daemon thread, at most ``limit`` queued or running."""

    def __init__(self, name: str, limit: int) -> None:
        self._name = name
        self._limit = limit
        self._init_state()
        _RUNNERS.add(self)

    def _init_state(self) -> None:
        self._cv = threading.Condition()
        self._queue: deque[Callable[[], None]] = deque()
        self._busy = False
        self._native = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (dropped) if stopped, full, or no thread can start."""
        with self._cv:
            if self._stopped or len(self._queue) + self._busy >= self._limit:
                return False
            self._queue.append(job)
            if self._thread is None:
                th = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    th.start()
                except RuntimeError:  # (can't start new thread; at interpreter shutdown)
                    self._queue.pop()
                    return False
                self._thread = th
            self._cv.notify_all()
            return True

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                if not self._queue and not self._stopped:
                    self._cv.wait(_IDLE)
                if self._stopped or not self._queue:
                    if self._thread is me:
                        self._thread = None  # (idle or stopped: a later submit starts one)
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                job()
            except Stopped:
                pass
            except BaseException:  # (a background thread: nobody else would see it; and
                # SystemExit or a stray CancelledError must not end the thread for good)
                log.exception("hnswcache: recording a verdict failed")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    @contextmanager
    def native(self) -> Iterator[None]:
        """Around a judgment's calls into the native index: raises :class:`Stopped` once
        the runner is stopped, and lets an exit wait until the call has returned."""
        with self._cv:
            if self._stopped:
                raise Stopped
            self._native = True
        try:
            yield
        finally:
            with self._cv:
                self._native = False
                self._cv.notify_all()

    def in_runner(self) -> bool:
        return self._thread is threading.current_thread()

    def wait(self, timeout: float | None) -> bool:
        """Wait until no judgment is queued or running (from a judgment itself: False at
        once); whether none is."""
        if self.in_runner():
            return False
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self, wait: float) -> None:
        """Drop the jobs not started, then wait up to ``wait`` seconds for the running one
        (not when called from it), and in any case until it is out of the native index."""
        with self._cv:
            self._stopped = True
            self._queue.clear()
            self._cv.notify_all()
            th = self._thread
        if th is not None and th is not threading.current_thread() and wait > 0:
            th.join(wait)
        with self._cv:
            self._cv.wait_for(lambda: not self._native, _NATIVE_WAIT)

    def after_fork_in_child(self) -> None:
        """The parent's thread is not in a forked child: start afresh (stopped stays)."""
        stopped = self._stopped
        self._init_state()
        self._stopped = stopped


@atexit.register
def _stop_all() -> None:
    # (atexit runs after the non-daemon threads are joined, before the interpreter
    # finalises: the last moment a judge thread can leave the native index safely). A
    # judgment under way gets a moment to end: a judge that calls the cache itself
    # enters the native index outside native().
    for runner in list(_RUNNERS):
        runner.stop(wait=_EXIT_WAIT)


def after_fork_in_child() -> None:
    for runner in list(_RUNNERS):
        runner.after_fork_in_child()
