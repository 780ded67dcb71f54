"""The runner: hands queued images to the executor and tells what became of each.

    FairQueue --pop--> dispatch --submit(run_image, task)--> executor (pool or Dask)
                                                                      |
    outcomes: done / failed  <--- collect, enforce_deadlines <-------+
    or back into the queue:    lost by the executor through no fault of its own (LostWork)
    or retried alone:          its worker died (a second death fails it)

An image is handed over only when the executor has room (its ``capacity``), so it starts
when it is handed over: that is when its time limit starts (but see ``backlog`` below). The
executor is any ``concurrent.futures.Executor``; a pool may also offer ``capacity`` (images
it runs at once; otherwise one per worker), ``problem`` (why no image can run now: the queue
waits and /healthz says it) and ``reset(futures)`` (end these images: they ran over their
time limit; an image it drops beside them ends with ``LostWork``, and runs again).
``DaskPool`` offers all three, ``LocalPool`` the first and the last.

A pool may also offer ``backlog``: images it takes beyond its capacity, to start the moment a
worker is free (``LocalPool``) or to wait inside it for a batch (``DaskPool``). Its futures
then say when their image really starts (``add_start_callback(fn)``, ``fn(future, moment)``),
and the time limit starts then, so an image's limit never counts its wait behind others.

The runner has no thread and no lock of its own: the engine calls it on its thread, holding
the condition it was given, which the executor's callbacks notify.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from typing import Any

from imgserver.errors import CapacityError, ImageError, LostWork
from imgserver.images.pipeline import ImageTask, ping, remove_partial, run_image
from imgserver.jobs.fairqueue import FairQueue
from imgserver.jobs.job import DONE, FAILED

logger = logging.getLogger("imgserver.jobs.runner")

#: After the executor refused work, try again after this many seconds.
RETRY_DELAY = 1.0
#: Workers dying this many times in a row, without an image finishing, make the runner
#: unhealthy (and slow down its dispatch, so a broken pool does not burn through the queue).
CRASH_STREAK = 3
#: Images waiting for a free worker start when one frees (the executor's callback hands
#: them over); the engine thread looks at them again this often (seconds) anyway, for a
#: pool that grew without finishing anything (a Dask worker that joined).
WAITING_LOOK = 0.25


@dataclass(eq=False)
class Work:
    """One image of a job on its way through the executor."""

    job_id: str
    index: int
    task: ImageTask
    owner: str = ""            # whose job: fair share goes round the owners first
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    retried: bool = False      # its worker died once: it now runs alone
    deadline: float = 0.0
    abandoned: bool = False    # already failed (timed out); waiting for its worker to end


@dataclass(frozen=True)
class Outcome:
    """What became of an image: done with its outputs, or failed with the reason."""

    work: Work
    state: str
    outputs: tuple[str, ...] = ()
    error: str | None = None
    seconds: float | None = None  # the worker's time on the image, as it reported it


class Runner:
    """Runs queued images on an executor, fairly between jobs, within its capacity."""

    def __init__(self, executor: Executor, condition: threading.Condition, *,
                 image_timeout: float, capacity: int) -> None:
        """``capacity``: images to run at once when the executor does not say (0: ask it)."""
        self.queue: FairQueue[Work] = FairQueue()
        self._executor = executor
        self._cond = condition
        self._timeout = image_timeout
        self._capacity = capacity
        self._retries: deque[Work] = deque()
        self._running: dict[Future, Work] = {}
        self._completed: list[Future] = []
        self._refused = ""             # why the executor last refused work, until it takes some
        self._crash_streak = 0
        self._probing: Future | None = None
        self._retry_at = 0.0
        #: Worker processes ended by the runner's doing, by reason ("died", "timeout").
        self.restarts: Counter[str] = Counter()
        #: Called on the executor's thread, holding the condition, when an image finishes
        #: (the engine settles it at once there, rather than waking its own thread).
        self.on_complete: Callable[[], None] | None = None
        #: Called on the executor's thread after that, once it has let go of the condition
        #: (the engine writes what finished there, outside its lock).
        self.after_complete: Callable[[], None] | None = None
        #: Called holding the condition when an image's time limit is set, once it really
        #: starts: the engine wakes its thread only if that limit comes before its plan.
        self.on_deadline: Callable[[], None] = condition.notify_all

    # -- state --------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Whether no image is in the executor."""
        return not self._running

    @property
    def running(self) -> int:
        """Images in the executor now."""
        return len(self._running)

    @property
    def problem(self) -> str | None:
        """Why images cannot run now, or None."""
        problem = getattr(self._executor, "problem", None)  # a pool may say what is wrong
        if problem:
            return problem
        if self._refused:
            return f"the executor refuses work: {self._refused}"
        if self._crash_streak >= CRASH_STREAK:
            return (f"worker processes keep dying: {self._crash_streak} in a row without "
                    f"finishing an image")
        return None

    @property
    def capacity(self) -> int:
        """Images the executor runs at once (its workers)."""
        # A pool may know its size (a Dask cluster's changes); else, as many as workers.
        return self._capacity or int(getattr(self._executor, "capacity", 1))

    def next_wakeup(self) -> float | None:
        """The next moment (time.monotonic) the runner has something to do, if any."""
        moments = [work.deadline for work in self._running.values()
                   if not work.abandoned and work.deadline < math.inf]
        if self._crash_streak >= CRASH_STREAK and self._probing is None:
            moments.append(self._retry_at)
        if self.queue or self._retries:
            # Not now: they wait for a worker to free, or for the retry after a refusal.
            moments.append(max(self._retry_at, time.monotonic() + WAITING_LOOK))
        if self._completed:
            # Finished, not collected: now. An image can finish before its hand-over returns
            # (the engine's thread lost the CPU in between); its callback then runs inside the
            # engine's own dispatch, past the collect, and leaves it to the engine's thread,
            # which would otherwise sleep until the image's time limit and fail it.
            moments.append(time.monotonic())
        return min(moments) if moments else None

    def run_now(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the executor at once, outside the queue (a thumbnail);
        CapacityError when the executor refuses it."""
        try:
            return self._executor.submit(fn, *args)
        except (BrokenExecutor, RuntimeError, OSError) as exc:
            raise CapacityError(f"the workers cannot take work now: {exc}", retry_after=5) \
                from None

    def withdraw(self, owner: str, job_id: str) -> list[Work]:
        """Take the images of ``owner``'s job ``job_id`` that wait (queued or to be
        retried) out; them."""
        works = self.queue.remove(owner, job_id)
        retries = [work for work in self._retries if work.job_id == job_id]
        if retries:
            self._retries = deque(work for work in self._retries if work.job_id != job_id)
        return works + retries

    # -- handing over -------------------------------------------------------------------

    def dispatch(self) -> list[Work]:
        """Hand over as many waiting images as the executor has room for; those handed."""
        started: list[Work] = []
        if time.monotonic() < self._retry_at:
            return started
        if getattr(self._executor, "problem", None):
            self._retry_at = time.monotonic() + RETRY_DELAY  # the queue waits for the pool
            return started
        if any(work.retried for work in self._running.values()):
            return started  # an image whose worker died runs alone, so a second death is its own
        if self._retries:
            if not self._running and self._hand_over(self._retries[0]):
                started.append(self._retries.popleft())
            return started
        while self.queue and len(self._running) < self._room():
            work = self.queue.pop()
            if not self._hand_over(work):
                self.queue.push_front(work.owner, work.job_id, work)
                break
            started.append(work)
        return started

    def _room(self) -> int:
        # Images to hand over at once: a pool that batches takes a backlog beyond them.
        if self._capacity:
            return self._capacity
        return self.capacity + int(getattr(self._executor, "backlog", 0))

    def _hand_over(self, work: Work) -> bool:
        try:
            future = self._executor.submit(run_image, work.task)
        except (BrokenExecutor, RuntimeError, OSError) as exc:
            logger.error("the executor refused work: %s", exc)
            self._refused = str(exc) or type(exc).__name__
            self._retry_at = time.monotonic() + RETRY_DELAY
            return False
        self._refused = ""
        work.started_at = work.started_at or time.monotonic()
        self._running[future] = work
        on_start = getattr(future, "add_start_callback", None)
        if on_start is None:
            work.deadline = time.monotonic() + self._timeout
        else:  # it may wait inside the pool: its time limit starts when the image does
            work.deadline = math.inf
            on_start(self._on_start)
        future.add_done_callback(self._on_done)
        return True

    def _on_start(self, future: Future, moment: float) -> None:
        with self._cond:
            work = self._running.get(future)
            if work is not None and work.deadline == math.inf:
                work.deadline = moment + self._timeout
                self.on_deadline()

    def _on_done(self, future: Future) -> None:
        try:
            with self._cond:
                self._completed.append(future)
                if self.on_complete is not None:
                    self.on_complete()  # settles it now, wakes the engine thread if it must
                else:
                    self._cond.notify_all()
        finally:  # what finished before a failure is still written
            if self.after_complete is not None:
                self.after_complete()

    # -- outcomes -----------------------------------------------------------------------

    def collect(self) -> list[Outcome]:
        """The outcomes of the images the executor finished since the last call."""
        outcomes: list[Outcome] = []
        completed, self._completed = self._completed, []
        for future in completed:
            work = self._running.pop(future)
            error = future.exception()
            if work.abandoned:
                if error is not None:
                    remove_partial(work.task.outputs)
                continue
            if error is None:
                self._crash_streak = 0
                processed = future.result()
                outcomes.append(Outcome(work, DONE, outputs=tuple(processed.outputs),
                                        seconds=processed.seconds))
            elif isinstance(error, ImageError):
                self._crash_streak = 0
                outcomes.append(Outcome(work, FAILED, error=str(error),
                                        seconds=getattr(error, "seconds", None)))
            elif isinstance(error, LostWork):
                # Not the image's fault: run it again.
                self.queue.push_front(work.owner, work.job_id, work)
            elif isinstance(error, BrokenExecutor):
                remove_partial(work.task.outputs)
                outcomes += self._worker_died(work)
            else:
                logger.error("image %s of job %s failed unexpectedly", work.index, work.job_id,
                             exc_info=error)
                outcomes.append(Outcome(work, FAILED, error=f"internal error: {error!r}"))
        return outcomes

    def _worker_died(self, work: Work) -> list[Outcome]:
        self.restarts["died"] += 1
        self._crash_streak += 1
        if self._crash_streak >= CRASH_STREAK:
            self._retry_at = time.monotonic() + RETRY_DELAY
        if work.retried:
            return [Outcome(work, FAILED, error=(
                "the worker process died while processing this image, twice "
                "(a crash or the out-of-memory killer); the image was not retried again"))]
        logger.warning("a worker died while processing %s; retrying it alone", work.task.input)
        work.retried = True
        self._retries.append(work)
        return []

    def enforce_deadlines(self) -> list[Outcome]:
        """Fail the images running past their time limit and stop their workers."""
        moment = time.monotonic()
        expired = [w for w in self._running.values() if not w.abandoned and w.deadline <= moment]
        if not expired:
            return []
        for work in expired:
            work.abandoned = True
        reset = getattr(self._executor, "reset", None)
        if reset is not None:  # the workers it stops, which may each run several images
            self.restarts["timeout"] += reset(
                [future for future, work in self._running.items() if work in expired]) or 0
        return [Outcome(work, FAILED, error=(
            f"processing took longer than the limit of {self._timeout:g} s "
            f"(--image-timeout); its worker was stopped")) for work in expired]

    def probe(self) -> None:
        """After workers kept dying, check with an empty task that the pool runs again.

        Without it, /healthz would stay 503 until the next image happened to succeed.
        """
        if (self._crash_streak < CRASH_STREAK or self._running or self._probing is not None
                or time.monotonic() < self._retry_at):
            return
        try:
            self._probing = self._executor.submit(ping)
        except (BrokenExecutor, RuntimeError, OSError):
            self._retry_at = time.monotonic() + RETRY_DELAY
            return
        self._probing.add_done_callback(self._probed)

    def _probed(self, future: Future) -> None:
        with self._cond:
            if future.exception() is None:
                self._crash_streak = 0
            else:
                self._retry_at = time.monotonic() + RETRY_DELAY
            self._probing = None
            self._cond.notify_all()
