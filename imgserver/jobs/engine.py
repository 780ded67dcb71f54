"""The job engine: every road's requests become jobs here, and only here is it decided
what happens to a job.

    HTTP API ---+    Intake                                  +--> Runner --> executor
    drop folder +--> validate -> admit -> store the request  |    (a fair queue of images,
    imgserver run    -> accept ----------------------------->+     retries, time limits)
                                                             |
    GET /jobs, wait, cancel <-- Ledger: status documents <---+<-- outcomes: settle, finish
                                (live jobs, the outbox)       --> subscribers (events)

Everything here is decided holding one condition, on whichever thread has news (the
``Pump`` says when: a submitting thread hands a new job's first image to a free worker at
once; the executor's thread settles a finished image and hands its worker the next; the
engine thread keeps time). A job that finishes is written (its final status file, then its
index row) by that same thread once it has let go of the condition, and only then is anyone
waiting told (``Ledger.write_finished``). On start, every job whose request is kept and
whose status is not final is queued again: an accepted job is never lost. A cancelled job's
images that have not started never start, and a restart does not resume it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from imgserver.errors import CapacityError
from imgserver.jobs import rescan
from imgserver.jobs.entry import Entry
from imgserver.jobs.events import (
    Announcer,
    ImageFinished,
    JobAccepted,
    JobFinished,
    Listener,
    StateChanged,
)
from imgserver.jobs.intake import Intake
from imgserver.jobs.job import (
    ANYONE,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    Job,
    Notification,
    Owner,
)
from imgserver.jobs.ledger import Ledger
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.pump import Pump
from imgserver.jobs.recovery import recover
from imgserver.jobs.request import Request
from imgserver.jobs.runner import Outcome, Runner, Work
from imgserver.jobs.storage import Storage
from imgserver.settings import Settings

logger = logging.getLogger("imgserver.jobs.engine")


class Engine:
    """Accepts requests, keeps them durable, and runs their images on an executor."""

    def __init__(self, settings: Settings, executor: Executor, *, concurrency: int | None = None,
                 lock_jobs: bool = False) -> None:
        """An engine for ``settings`` on ``executor``; ``concurrency`` overrides its capacity.

        ``lock_jobs``: hold a lock on each job's request file while it runs (``imgserver
        run``), so that a server starting meanwhile leaves the job to this process.
        """
        self.settings = settings
        self.outbox = Outbox(settings.outbox)
        self._cond = threading.Condition()
        self._storage = Storage(self.outbox)
        self._intake = Intake(settings, self.outbox, self._cond, self, self._storage,
                              lock_jobs=lock_jobs)
        self._ledger = Ledger(self.outbox, settings.keep_finished, self._cond, self._storage)
        self._events = Announcer()
        self._runner = Runner(executor, self._cond, image_timeout=settings.image_timeout,
                              capacity=concurrency or (0 if hasattr(executor, "capacity")
                                                       else settings.workers))
        self._open_images = 0
        self._owners: Counter[str] = Counter()  # open images by owner
        self._accepting = False
        self._pump = Pump(self._cond, self._runner, self._ledger, settle=self._settle,
                          started=self._started, dispatching=lambda: self._accepting)
        self._scanner = threading.Thread(
            target=rescan.rebuild, name="imgserver-index-scan", daemon=True,
            args=(self.outbox, self.resume, lambda: self._pump.closing))

    # -- public interface -------------------------------------------------------------

    def start(self, *, recover: bool = True) -> None:
        """Queue the jobs an earlier run left unfinished, then start taking work.

        Jobs the index does not know (it is new, or was damaged) are found by a scan of the
        outbox in the background: until it ends, listing jobs answers CapacityError.
        """
        if recover:
            self.outbox.open()
            self.outbox.remove_stale_temps()
            for job_id in self.outbox.unfinished():
                self.resume(job_id)
            if self.outbox.index.needs_scan:
                self._scanner.start()
        with self._cond:
            self._accepting = True
        self._pump.start()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` for every event (``jobs.events``), holding the engine's lock."""
        self._events.subscribe(listener)

    def submit(self, body: bytes, *, source: str, name: str | None = None,
               owner: Owner = ANYONE, waiter: Future | None = None) -> dict:
        """Accept ``owner``'s request; its job's status document (``Intake.submit``).
        ``waiter``, if given, resolves to the job's final status document (as ``wait``)."""
        try:
            return self._intake.submit(body, source=source, name=name, owner=owner,
                                       waiter=waiter)
        finally:
            self._ledger.write_finished()  # a job refused as invalid, or finished meanwhile

    def submit_once(self, body: bytes, key: str, *, source: str, owner: Owner = ANYONE,
                    waiter: Future | None = None) -> tuple[dict, bool]:
        """Accept a request once per idempotency key (``Intake.submit_once``); ``waiter``
        as for ``submit``, for a job it creates."""
        try:
            return self._intake.submit_once(body, key, source=source, owner=owner,
                                            waiter=waiter)
        finally:
            self._ledger.write_finished()

    def take(self, path: Path, *, name: str | None, peek: bytes, source: str = "inbox") -> dict:
        """Take a drop-folder file as a job (``Intake.take``)."""
        try:
            return self._intake.take(path, name=name, peek=peek, source=source)
        finally:
            self._ledger.write_finished()

    def status(self, job_id: str, view: str | None = None) -> dict:
        """The status document of ``job_id``; JobNotFound if there is no such job, or (with
        a ``view``) it is not of that folder."""
        return self._ledger.status(job_id, view)

    def folder(self, job_id: str) -> str:
        """The folder ``job_id``'s paths are relative to ("": the root)."""
        return self._ledger.owner(job_id).folder

    def snapshot(self, job_id: str) -> tuple[dict, int]:
        """The status document of ``job_id`` and the ``seq`` of the last event it reflects
        (every later event of the job changes it); JobNotFound if there is no such job."""
        with self._cond:
            return self._ledger.status(job_id), self._events.seq

    def unfinished(self, since: int | None = None, view: str | None = None
                   ) -> tuple[list[dict], int]:
        """Summaries of the jobs not finished, and of those finished since the event
        ``since`` (``Ledger.unfinished``); and the ``seq`` of the last event they reflect."""
        with self._cond:  # the index is written under it: a job is in one list or the other
            return self._ledger.unfinished(since, view), self._events.seq

    def jobs(self, *, states: Sequence[str] = (), source: str | None = None, limit: int = 50,
             cursor: str | None = None, view: str | None = None
             ) -> tuple[list[dict], str | None]:
        """A page of job summaries, newest first, and the next cursor (``Ledger.page``)."""
        return self._ledger.page(states=states, source=source, limit=limit, cursor=cursor,
                                 view=view)

    def written(self, job_id: str) -> None:
        """Return once the finished job ``job_id``'s status file and index row are written
        (at once for a job that is not finishing)."""
        with self._cond:
            self._ledger.await_written(job_id)

    def note_delivery(self, job_id: str, index: int, notification: Notification) -> None:
        """Record how the job's notification ``index`` went (the webhooks' progress)."""
        self._ledger.note_delivery(job_id, index, notification)

    def run_now(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker at once, outside the jobs' queue (a thumbnail);
        CapacityError when the workers cannot take it."""
        return self._runner.run_now(fn, *args)

    def stats(self) -> dict[str, Any]:
        """What the engine is doing now: images queued and running, workers, restarts."""
        with self._cond:
            running = self._runner.running
            return {"queued": self._open_images - running, "running": running,
                    "workers": self._runner.capacity, "restarts": dict(self._runner.restarts)}

    def wait(self, job_id: str) -> Future:
        """A future that resolves to the job's final status document."""
        with self._cond:
            return self._ledger.wait(job_id, None if self._accepting else _shutting_down)

    def cancel(self, job_id: str, view: str | None = None) -> tuple[dict, bool]:
        """Cancel a job: its images not started never start, running ones finish.

        Returns the status document and whether the job was cancelled before (False: by
        this call). JobNotFound for no such job (or one not of ``view``), JobConflict for a
        job already done or failed. The cancel is on disk before this returns.
        """
        try:
            return self._cancel(job_id, view)
        finally:
            self._ledger.write_finished()

    def _cancel(self, job_id: str, view: str | None) -> tuple[dict, bool]:
        with self._cond:
            entry = self._ledger.get(job_id)
            if entry is None or (view is not None and entry.job.owner.folder != view):
                return self._ledger.cancelled_before(job_id, view), True
            job = entry.job
            if not job.cancelling:
                self.outbox.request_cancel(job_id)
                withdrawn = self._runner.withdraw(job.owner.name, job_id)
                self._open_images -= len(withdrawn)
                self._owners[job.owner.name] -= len(withdrawn)
                job.cancel([work.index for work in withdrawn])
                for work in sorted(withdrawn, key=lambda work: work.index):
                    self._image_event(entry, work.index)
                if job.finish_if_complete(self.settings.keep_finished):
                    self._finish(entry)
                else:
                    self._ledger.write(entry)
                # What it withdrew may have held up the queue (a retried image runs alone):
                # the engine thread looks at the queue now, not at its next look.
                self._cond.notify_all()
            return job.to_document(), False

    def resume(self, job_id: str) -> None:
        """Queue the unfinished job ``job_id`` found in the outbox (an earlier run's)."""
        with self._cond:
            if self._ledger.holds(job_id):
                return  # this process has it, or finished it and is still writing it
            recovered = recover(self.outbox, job_id, self._intake, self.settings.keep_finished)
            if recovered is None:
                return
            job, request = recovered
            entry = self._register(job, request, None)
            if not job.finished:
                self._ledger.write(entry)
            self._cond.notify_all()
        self._ledger.write_finished()  # a job whose every image had ended already
        logger.info("resuming job %s (%d of %d images left)", job_id,
                    sum(i.state not in FINAL_STATES for i in job.images), len(job.images))

    @property
    def healthy(self) -> bool:
        """Whether the engine can run work: its thread is alive and the executor takes tasks."""
        return self.health_reason is None

    @property
    def health_reason(self) -> str | None:
        """Why the engine cannot run work, or None when it can."""
        if not self._accepting:
            return "the server is not accepting work (starting or shutting down)"
        if not self._pump.alive:
            return "the engine thread has stopped"
        return self._storage.problem or self._runner.problem

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (not while starting or stopping)."""
        return self._accepting

    @property
    def active_jobs(self) -> int:
        """Jobs accepted and not finished (finished jobs live on in their status files)."""
        return len(self._ledger)

    @property
    def open_images(self) -> int:
        """Images accepted and not yet finished, all jobs together."""
        return self._open_images

    def open_images_of(self, owner: str) -> int:
        """Images accepted and not yet finished of ``owner``'s jobs."""
        return self._owners[owner]

    def stop_accepting(self) -> None:
        """Refuse new requests and release everyone waiting; running images go on."""
        with self._cond:
            self._accepting = False
            self._ledger.release_waiters(_shutting_down)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop: let running images finish, write every status file, keep queued images queued.

        Jobs not finished stay on disk and resume at the next start.
        """
        self.stop_accepting()
        self._pump.stop()
        if self._scanner.is_alive():
            self._scanner.join()
        self.outbox.close()

    # -- what the intake hands over (holding the condition) -----------------------------

    def accept(self, job: Job, request: Request, lock_fd: int | None, *, write: bool,
               waiter: Future | None = None) -> dict:
        """Take a stored, valid request on as a queued job; its status document. ``waiter``
        resolves to its final status document: attached now, so that a short job does not
        end before anyone waits for it (its document would then be read back from disk)."""
        entry = self._register(job, request, lock_fd)
        if waiter is not None:
            self._ledger.attach(job.id, waiter)
        if write:
            self._ledger.write(entry)
        else:
            # Written by the engine thread with its next flush, off the request's path: a
            # short job is done before, and only its final status is written. Until then the
            # request file is the job's record (a restart makes the job from it).
            entry.dirty, entry.written_at = True, time.monotonic()
        self._events.emit(JobAccepted, job.id, job.summary(), folder=job.owner.folder)
        document = job.to_document()  # as accepted: queued
        self._pump.advance()  # a free worker starts it now, not when the engine thread wakes
        self._pump.nudge()
        return document

    def refuse(self, job: Job) -> dict:
        """Record a stored request that is invalid as the failed job ``job``."""
        self._events.emit(JobAccepted, job.id, job.summary(), folder=job.owner.folder)
        self._finish(Entry(job))
        return job.to_document()

    def _register(self, job: Job, request: Request, lock_fd: int | None) -> Entry:
        entry = Entry(job, lock_fd)
        self._ledger.add(entry)
        for index, (spec, image) in enumerate(zip(request.images, job.images, strict=False)):
            if image.state in FINAL_STATES:
                continue
            image.state, image.outputs, image.error = QUEUED, [], None
            task = self._intake.task(spec, request, job.owner)
            self._runner.queue.push(job.owner.name, job.id,
                                    Work(job.id, index, task, job.owner.name))
            self._open_images += 1
            self._owners[job.owner.name] += 1
        if job.finish_if_complete(self.settings.keep_finished):
            self._finish(entry)
        return entry

    def _started(self, work: Work) -> None:
        entry = self._ledger[work.job_id]
        entry.job.images[work.index].state = RUNNING
        if entry.job.state == QUEUED:
            entry.job.start()
            self._events.emit(StateChanged, entry.job.id, RUNNING, entry.job.progress(),
                              folder=entry.job.owner.folder)
            # Written with the next flush: a short job is often done before, and its final
            # status (written at once) says running's times too.
            entry.dirty = True

    def _settle(self, outcome: Outcome) -> None:
        work = outcome.work
        entry = self._ledger[work.job_id]
        image = entry.job.images[work.index]
        image.state, image.outputs, image.error = (outcome.state, list(outcome.outputs),
                                                   outcome.error)
        self._open_images -= 1
        self._owners[work.owner] -= 1
        entry.dirty = True
        waited = None if work.started_at is None else work.started_at - work.queued_at
        self._image_event(entry, work.index, waited, outcome.seconds)
        if entry.job.finish_if_complete(self.settings.keep_finished):
            self._finish(entry)

    def _image_event(self, entry: Entry, index: int, waited: float | None = None,
                     seconds: float | None = None) -> None:
        progress = entry.job.progress()
        self._events.emit(ImageFinished, entry.job.id, index,
                          dataclasses.replace(entry.job.images[index]), progress["done"],
                          progress["total"], waited, seconds, folder=entry.job.owner.folder)

    def _finish(self, entry: Entry) -> None:
        # Its status file is written once the finishing thread lets go of the lock
        # (``Ledger.write_finished``): every public method that can finish a job calls it.
        document = self._ledger.retire(entry)
        job = entry.job
        folder = job.owner.folder
        self._events.emit(StateChanged, job.id, job.state, job.progress(), folder=folder)
        self._events.emit(JobFinished, job.id, document, folder=folder)


def _shutting_down(job_id: str) -> CapacityError:
    return CapacityError(f"the server is shutting down; job {job_id} resumes at the next start",
                         retry_after=5)
