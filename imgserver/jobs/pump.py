"""The pump: what keeps images moving through the runner, holding the engine's condition.

    executor's thread:  an image finished --> settle it, hand its worker the next image
                        (at once, without waking the engine thread)
    engine thread:      keeps time: time limits, status files due, probes of a broken
                        pool, storage that failed; sleeps until the next of those
    submitting thread:  a new job's first image goes to a free worker at once (``advance``)

The engine thread is woken only when it must act sooner than it planned to, not for every
image. What happens to a job is decided by the engine's callbacks (``settle``, ``started``),
never here: the pump only says when.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from imgserver.jobs.ledger import Ledger
from imgserver.jobs.runner import Outcome, Runner, Work

logger = logging.getLogger("imgserver.jobs.engine")


class Pump:
    """Drives a runner from the engine's thread and the executor's callbacks."""

    def __init__(self, lock: threading.Condition, runner: Runner, ledger: Ledger, *,
                 settle: Callable[[Outcome], None], started: Callable[[Work], None],
                 dispatching: Callable[[], bool]) -> None:
        """A pump of ``runner`` under ``lock``, writing ``ledger``'s status files when due:
        ``settle(outcome)`` for each image that ended, ``started(work)`` for each handed to
        a worker while ``dispatching()`` says images may start."""
        self._lock = lock
        self._runner = runner
        self._ledger = ledger
        self._settle = settle
        self._started = started
        self._dispatching = dispatching
        self.closing = False
        self._advancing = False
        self._sleeping_until = 0.0  # when the engine thread wakes by itself (monotonic)
        runner.on_complete = self._completed
        runner.after_complete = ledger.write_finished
        runner.on_deadline = self.nudge
        self._thread = threading.Thread(target=self._loop, name="imgserver-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Let running images finish, then end the engine thread (call without the lock)."""
        with self._lock:
            self.closing = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def advance(self) -> None:
        """Settle the images that finished; hand images to free workers (holding the lock)."""
        self._advancing = True
        try:
            for outcome in self._runner.collect():
                self._settle(outcome)
            if self._dispatching() and not self.closing:  # once stopping, images wait
                for work in self._runner.dispatch():
                    self._started(work)
        finally:
            self._advancing = False

    def _loop(self) -> None:
        with self._lock:
            while True:
                try:
                    if self._step():
                        break
                except Exception:  # a bug must not stop every job: log it and go on
                    logger.exception("the engine loop failed; going on")
                    self._lock.wait(1.0)
            self._ledger.flush(force=True)
            self._ledger.write_finished()
            self._ledger.await_written()  # by the threads that finished the last jobs
            self._ledger.release_all()

    def _step(self) -> bool:
        """One turn of the engine thread; True once it is closing and nothing runs."""
        self._advancing = True  # a reset's callbacks fire on this thread: not into this
        try:
            expired = self._runner.enforce_deadlines()
        finally:
            self._advancing = False
        for outcome in expired:
            self._settle(outcome)
        self.advance()
        self._ledger.write_finished()  # what this thread finished (holding the lock)
        self._runner.probe()
        if self.closing and self._runner.idle:
            return True
        self._ledger.flush()
        timeout = self._next_wakeup()
        self._sleeping_until = math.inf if timeout is None else time.monotonic() + timeout
        self._lock.wait(timeout)
        self._sleeping_until = 0.0
        return False

    def _completed(self) -> None:
        """An image finished (on the executor's thread, holding the lock): settle it and
        hand its worker the next image now, without waking the engine thread."""
        if self._advancing:
            # On this thread, mid-collect or mid-dispatch (a reset's callbacks, or an image
            # finished before its hand-over returned): the engine thread settles it at
            # once (Runner.next_wakeup).
            return
        self.advance()
        self.nudge()

    def nudge(self) -> None:
        """Wake the engine thread if it must act sooner than it planned to (a status to
        write, a time limit, the end at closing): not for every image or job (holding the
        lock)."""
        timeout = self._next_wakeup()
        if self.closing or (timeout is not None
                            and time.monotonic() + timeout < self._sleeping_until):
            self._lock.notify_all()

    def _next_wakeup(self) -> float | None:
        moments = [moment for moment in (self._ledger.next_write(), self._runner.next_wakeup())
                   if moment is not None]
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic()) + 0.001
