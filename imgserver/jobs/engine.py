"""The job engine: every road's requests become jobs here, and only here is it decided
what happens to a job.

    HTTP API ---+                                           +--> Runner --> executor
    drop folder +--> submit / take: validate -> admit ->    |    (a fair queue of images,
    imgserver run    store the request -> queue ----------->+     retries, time limits)
                                                            |
    GET /jobs, wait, cancel <-- status documents <----------+<-- outcomes
                                (the outbox: files + index)  --> subscribers (events)

``submit`` validates the request (nothing is written for an invalid one), checks that its
images fit in the queue, stores the request in the outbox and only then accepts it. Images
go to the executor through the ``Runner`` (round-robin between jobs). Everything here
happens holding one condition, on whichever thread has news: a submitting thread hands a
new job's first image to a free worker at once; the executor's thread settles a finished
image and hands its worker the next; the engine thread keeps time (time limits, status
files rewritten at most every STATUS_INTERVAL, probes of a broken pool). On start, every
job whose request is kept and whose status is not final is queued again: an accepted job
is never lost. A cancelled job's images that have not started never start; a restart does
not resume it either.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgserver.errors import CapacityError, JobConflict, JobNotFound, RequestError
from imgserver.images.pipeline import ImageTask
from imgserver.jobs.events import (
    Event,
    ImageFinished,
    JobAccepted,
    JobEvent,
    JobFinished,
    Listener,
    StateChanged,
)
from imgserver.jobs.job import (
    CANCELLED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    ImageStatus,
    Job,
    Notification,
    served,
    summary,
    timestamp,
)
from imgserver.jobs.keys import check_key
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.recovery import recover
from imgserver.jobs.request import Request, RequestLimits, parse_request
from imgserver.jobs.runner import Outcome, Runner, Work
from imgserver.settings import Settings
from imgserver.urls import redacted

logger = logging.getLogger("imgserver.jobs.engine")

#: A running job's status file is rewritten at most this often (and at every state change).
STATUS_INTERVAL = 0.5
#: A client back on the all-jobs stream after its events are gone hears of at most this
#: many jobs that finished meanwhile.
RECENTLY_FINISHED = 1000


@dataclass(eq=False)
class _Active:
    """A job the engine is working on."""

    job: Job
    lock_fd: int | None = None
    dirty: bool = False
    written_at: float = 0.0
    waiters: list[Future] = field(default_factory=list)


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
        self._lock_jobs = lock_jobs
        self._limits = RequestLimits(settings.max_body_bytes, settings.max_images,
                                     settings.notify_allow)
        self._cond = threading.Condition()
        self._runner = Runner(executor, self._cond, image_timeout=settings.image_timeout,
                              capacity=concurrency or (0 if hasattr(executor, "capacity")
                                                       else settings.workers))
        self._active: dict[str, _Active] = {}
        self._open_images = 0
        self._accepting = False
        self._closing = False
        self._storage_error: str | None = None
        self._listeners: list[Listener] = []
        self._advancing = False
        self._sleeping_until = 0.0  # when the engine thread wakes by itself (monotonic)
        self._runner.on_complete = self._completed
        # Event numbers start from the clock, so that they keep growing across restarts.
        self._seq = time.time_ns() // 1000
        self._thread = threading.Thread(target=self._loop, name="imgserver-engine", daemon=True)
        self._scanner = threading.Thread(target=self.outbox.rebuild, name="imgserver-index-scan",
                                         args=(self.resume, lambda: self._closing), daemon=True)

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
        self._thread.start()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` for every event (``jobs.events``), holding the engine's lock."""
        self._listeners.append(listener)

    def submit(self, body: bytes, *, source: str, name: str | None = None) -> dict:
        """Accept a request; return its job's status document.

        An invalid request raises RequestError and leaves no trace; CapacityError when the
        queue is full or the request cannot be stored.
        """
        request = parse_request(body, self.settings.root, self._limits)
        return self._create(body, request, source=source, name=name)[0]

    def submit_once(self, body: bytes, key: str, *, source: str) -> tuple[dict, bool]:
        """``submit`` with an idempotency key: the document, and whether a job was created.

        A key used in the last 24 hours answers with that key's job (its current status)
        and creates nothing; RequestError if that job's request differs from ``body``.
        """
        check_key(key)
        with self._cond:
            earlier = self._replay(key, body)
        if earlier is not None:
            return earlier, False
        request = parse_request(body, self.settings.root, self._limits)
        return self._create(body, request, source=source, name=uuid.uuid4().hex, key=key)

    def _replay(self, key: str, body: bytes) -> dict | None:
        """The status of the job ``key`` created, if it exists; RequestError if that job's
        request is not ``body``."""
        earlier = self.outbox.keyed(key)
        if earlier is None:
            return None
        job_id, request = earlier
        if request != body:
            raise RequestError.single("Idempotency-Key", (
                f"was used for another request (job {job_id}) in the last 24 hours; "
                f"use a new key for a new request"))
        return self.status(job_id)

    def take(self, path: Path, *, name: str | None, peek: bytes, source: str = "inbox") -> dict:
        """Take the drop-folder file ``path`` as a job; return its status document.

        ``peek`` is the file's content as read a moment ago: it decides whether the queue has
        room (CapacityError leaves the file where it is). The file is then moved into the
        outbox as the job's request (``Outbox.claim``: exactly that file, once, even if it
        was replaced meanwhile) and what was moved is what is validated and run. An invalid
        request becomes a failed job, since nobody is there to answer.
        """
        try:
            peeked: Request | None = self._parse(peek)
        except RequestError:
            peeked = None  # it will be recorded as failed once taken
        with self._cond:
            # Room for what it asks (at most a full queue: more fails below, once taken).
            self._admit(min(len(peeked.images), self.settings.max_queue) if peeked else 0)
            placeholder = Job(id="", source=source, operations=[], images=[])

            def reserved(job_id: str) -> None:
                # Says where the job came from, should the server stop before it is written.
                placeholder.id = job_id
                self.outbox.write_status(placeholder.to_document())

            try:
                job_id, body, size = self.outbox.claim(path, name, reserved,
                                                       self.settings.max_body_bytes,
                                                       source=source)
            except FileNotFoundError:
                raise  # taken already: not a storage problem
            except OSError as exc:
                raise self._storage_failed(exc) from None
            self._storage_error = None
            try:
                request = (peeked if peeked is not None and body == peek else
                           parse_request(body, self.settings.root, self._limits, size=size))
                if len(request.images) > self.settings.max_queue:
                    raise RequestError.single("images", _never_fits(len(request.images),
                                                                    self.settings.max_queue))
            except RequestError as error:
                if self.settings.notify_url:
                    placeholder.notifications = [Notification(redacted(self.settings.notify_url))]
                placeholder.reject(str(error), self.settings.keep_finished)
                self._emit(JobAccepted, job_id, placeholder.summary())
                self._finish(_Active(placeholder))
                return placeholder.to_document()
            job = self._new_job(job_id, source, request)
            job.created_at = placeholder.created_at
            return self._accept(job, request, None, write=True)

    def status(self, job_id: str) -> dict:
        """The status document of ``job_id``; JobNotFound if there is no such job."""
        with self._cond:
            active = self._active.get(job_id)
            if active is not None:
                return active.job.to_document()
        document = self.outbox.read_status(job_id)
        if document is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return served(document, self.settings.keep_finished)

    def snapshot(self, job_id: str) -> tuple[dict, int]:
        """The status document of ``job_id`` and the ``seq`` of the last event it reflects
        (every later event of the job changes it); JobNotFound if there is no such job."""
        with self._cond:
            return self.status(job_id), self._seq

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

    def unfinished(self, since: int | None = None) -> tuple[list[dict], int]:
        """Summaries of the jobs not finished, and of those finished since the event
        ``since`` (at most RECENTLY_FINISHED, newest first); and the ``seq`` of the last event
        they reflect. An event's number is at most the clock's microseconds when it
        happened, so the jobs finished since are those with a ``finished_at`` from that
        moment on (and a few from the same millisecond)."""
        with self._cond:  # the index is written under it: a job is in one list or the other
            summaries = [active.job.summary() for active in self._active.values()]
            if since is not None:
                moment = timestamp(datetime.fromtimestamp(since / 1e6, timezone.utc))
                summaries += [served(s, self.settings.keep_finished) for s in
                              self.outbox.index.finished_since(moment, RECENTLY_FINISHED)]
            return summaries, self._seq

    def note_delivery(self, job_id: str, index: int, notification: Notification) -> None:
        """Record how the job's notification ``index`` went (the webhooks' progress)."""
        with self._cond:  # not while the job's own status is being written
            self.outbox.note_delivery(job_id, index, notification.to_document())

    def jobs(self, *, states: Sequence[str] = (), source: str | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[dict], str | None]:
        """Summaries of jobs (documents without images), newest first, and the cursor of the
        next page (None on the last). CapacityError while the index is being rebuilt."""
        if self.outbox.index.needs_scan:
            raise CapacityError("the job index is being rebuilt from the status files; "
                                "listing is back when it is done", retry_after=5)
        asked = set(states)
        if asked & {QUEUED, RUNNING}:  # a live job's row may still say the other one
            asked |= {QUEUED, RUNNING}
        summaries, after = self.outbox.index.page(states=sorted(asked), source=source,
                                                  limit=limit, cursor=cursor)
        with self._cond:  # a running job's row lags its status by up to STATUS_INTERVAL
            summaries = [self._active[s["id"]].job.summary() if s["id"] in self._active
                         else served(s, self.settings.keep_finished) for s in summaries]
        return [s for s in summaries if not states or s["state"] in states], after

    def wait(self, job_id: str) -> Future:
        """A future that resolves to the job's final status document."""
        future: Future = Future()
        with self._cond:
            active = self._active.get(job_id)
            if active is not None:
                if not self._accepting:
                    future.set_exception(self._shutting_down(job_id))
                else:
                    active.waiters.append(future)
                return future
        future.set_result(self.status(job_id))
        return future

    def cancel(self, job_id: str) -> tuple[dict, bool]:
        """Cancel a job: its images not started never start, running ones finish.

        Returns the status document and whether the job was cancelled before (False: by
        this call). JobNotFound for no such job, JobConflict for a job already done or
        failed. The cancel is on disk before this returns.
        """
        with self._cond:
            active = self._active.get(job_id)
            if active is None:
                document = self.status(job_id)
                if document["state"] == CANCELLED:
                    return document, True
                if document["state"] in FINAL_STATES:
                    raise JobConflict(f"job {job_id} is already {document['state']}; only an "
                                      f"unfinished job can be cancelled", document)
                raise JobConflict(f"job {job_id} is run by another process ('imgserver run'); "
                                  f"stop that process to stop it", document)
            job = active.job
            if not job.cancelling:
                self.outbox.request_cancel(job_id)
                withdrawn = self._runner.withdraw(job_id)
                self._open_images -= len(withdrawn)
                job.cancel([work.index for work in withdrawn])
                for work in sorted(withdrawn, key=lambda work: work.index):
                    self._image_event(active, work.index)
                if job.finish_if_complete(self.settings.keep_finished):
                    self._finish(active)
                else:
                    self._write(active)
                    self._cond.notify_all()
            return job.to_document(), False

    def resume(self, job_id: str) -> None:
        """Queue the unfinished job ``job_id`` found in the outbox (an earlier run's)."""
        with self._cond:
            if job_id in self._active:
                return
            recovered = recover(self.outbox, job_id, self._parse, self._new_job,
                                self.settings.keep_finished)
            if recovered is None:
                return
            job, request = recovered
            active = self._register(job, request, None)
            if not job.finished:
                self._write(active)
            self._cond.notify_all()
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
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        return self._storage_error or self._runner.problem

    @property
    def active_jobs(self) -> int:
        """Jobs accepted and not finished (finished jobs live on in their status files)."""
        return len(self._active)

    @property
    def open_images(self) -> int:
        """Images accepted and not yet finished, all jobs together."""
        return self._open_images

    def stop_accepting(self) -> None:
        """Refuse new requests and release everyone waiting; running images go on."""
        with self._cond:
            self._accepting = False
            for job_id, active in self._active.items():
                for waiter in active.waiters:
                    waiter.set_exception(self._shutting_down(job_id))
                active.waiters.clear()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop: let running images finish, write every status file, keep queued images queued.

        Jobs not finished stay on disk and resume at the next start.
        """
        self.stop_accepting()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._scanner.is_alive():
            self._scanner.join()
        self.outbox.close()

    # -- admission and bookkeeping ------------------------------------------------------

    def _admit(self, count: int) -> None:
        if not self._accepting:
            raise CapacityError("the server is shutting down", retry_after=5)
        limit = self.settings.max_queue
        if count > limit:
            raise RequestError.single("images", _never_fits(count, limit))
        if self._open_images + count > limit:
            raise CapacityError(
                f"the queue is full: {self._open_images} images are waiting or running, "
                f"this request adds {count}, the limit is {limit} (--max-queue)")

    def _create(self, body: bytes, request: Request, *, source: str, name: str | None,
                key: str | None = None) -> tuple[dict, bool]:
        """Store a valid request and accept it as a queued job: its status document, and
        True; with an idempotency ``key`` used before, that key's job, and False.

        The request is written and fsynced before the condition is taken (the engine goes
        on meanwhile), then placed under its id and registered.
        """
        try:
            staged = self.outbox.stage(body, lock=self._lock_jobs)
        except OSError as exc:
            with self._cond:
                raise self._storage_failed(exc) from None
        try:
            with self._cond:
                if key is not None:
                    earlier = self._replay(key, body)  # the same key sent twice at once
                    if earlier is not None:
                        return earlier, False
                self._admit(len(request.images))
                if key is not None and name is not None:
                    # Bound before the job exists: a crash in between binds it to nothing.
                    self.outbox.keys.bind(key, name)
                try:
                    job_id = self.outbox.place(staged, name, source=source)
                except OSError as exc:
                    raise self._storage_failed(exc) from None
                self._storage_error = None
                lock_fd = staged.detach() if self._lock_jobs else None
                return self._accept(self._new_job(job_id, source, request), request, lock_fd,
                                    write=False), True
        finally:
            staged.close()

    def _accept(self, job: Job, request: Request, lock_fd: int | None, *, write: bool) -> dict:
        """Register a stored, valid request as a queued job; its status document."""
        active = self._register(job, request, lock_fd)
        if write:
            self._write(active)
        else:
            # Written by the engine thread with its next flush, off the request's path: a
            # short job is done before, and only its final status is written. Until then the
            # request file is the job's record (a restart makes the job from it).
            active.dirty, active.written_at = True, time.monotonic()
        self._emit(JobAccepted, job.id, job.summary())
        document = job.to_document()  # as accepted: queued
        self._advance()  # a free worker starts it now, not when the engine thread wakes
        self._cond.notify_all()
        return document

    def _storage_failed(self, exc: OSError) -> CapacityError:
        self._storage_error = f"the outbox {self.outbox.path} cannot store requests: " \
                              f"{exc.strerror or exc}"
        return CapacityError(self._storage_error, retry_after=30)

    def _register(self, job: Job, request: Request, lock_fd: int | None) -> _Active:
        active = _Active(job, lock_fd)
        self._active[job.id] = active
        for index, (spec, image) in enumerate(zip(request.images, job.images, strict=False)):
            if image.state in FINAL_STATES:
                continue
            image.state, image.outputs, image.error = QUEUED, [], None
            task = ImageTask(
                root=str(self.settings.root), input=str(spec.input_path),
                outputs=tuple(str(path) for path in spec.outputs), operations=request.parsed,
                max_pixels=self.settings.max_pixels, max_file_bytes=self.settings.max_file_bytes)
            self._runner.queue.push(job.id, Work(job.id, index, task))
            self._open_images += 1
        if job.finish_if_complete(self.settings.keep_finished):
            self._finish(active)
        return active

    def _parse(self, body: bytes) -> Request:
        return parse_request(body, self.settings.root, self._limits)

    def _new_job(self, job_id: str, source: str, request: Request) -> Job:
        urls = [url for url in (self.settings.notify_url, request.notify) if url]
        return Job(id=job_id, source=source, operations=list(request.operations),
                   images=[ImageStatus(spec.input, spec.output) for spec in request.images],
                   notifications=[Notification(redacted(url)) for url in dict.fromkeys(urls)])

    @staticmethod
    def _shutting_down(job_id: str) -> CapacityError:
        return CapacityError(f"the server is shutting down; job {job_id} resumes at the next start",
                             retry_after=5)

    # -- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        with self._cond:
            while True:
                try:
                    if self._step():
                        break
                except Exception:  # a bug must not stop every job: log it and go on
                    logger.exception("the engine loop failed; going on")
                    self._cond.wait(1.0)
            self._flush(force=True)
            for active in self._active.values():
                if active.lock_fd is not None:
                    os.close(active.lock_fd)
                    active.lock_fd = None

    def _step(self) -> bool:
        """One turn of the engine thread; True once it is closing and nothing runs."""
        self._advancing = True  # a reset's callbacks fire on this thread: not into this
        try:
            expired = self._runner.enforce_deadlines()
        finally:
            self._advancing = False
        for outcome in expired:
            self._settle(outcome)
        self._advance()
        self._runner.probe()
        if self._closing and self._runner.idle:
            return True
        self._flush()
        timeout = self._next_wakeup()
        self._sleeping_until = math.inf if timeout is None else time.monotonic() + timeout
        self._cond.wait(timeout)
        self._sleeping_until = 0.0
        return False

    def _completed(self) -> None:
        """An image finished (on the executor's thread, holding the condition): settle it
        and hand its worker the next image now, without waking the engine thread."""
        if self._advancing:
            # On this thread, mid-collect or mid-dispatch (a reset's callbacks, or an image
            # finished before its hand-over returned): the engine thread settles it at
            # once (Runner.next_wakeup).
            return
        self._advance()
        # The engine thread is woken only when it must act sooner than it planned to (a
        # status to write, a time limit, the end at closing), not for every image.
        timeout = self._next_wakeup()
        if self._closing or (timeout is not None
                             and time.monotonic() + timeout < self._sleeping_until):
            self._cond.notify_all()

    def _advance(self) -> None:
        """Settle the images that finished; hand images to free workers."""
        self._advancing = True
        try:
            for outcome in self._runner.collect():
                self._settle(outcome)
            if self._accepting and not self._closing:  # once stopping, queued images wait
                for work in self._runner.dispatch():
                    self._started(work)
        finally:
            self._advancing = False

    def _next_wakeup(self) -> float | None:
        moments = [a.written_at + STATUS_INTERVAL for a in self._active.values() if a.dirty]
        runner = self._runner.next_wakeup()
        if runner is not None:
            moments.append(runner)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic()) + 0.001

    def _started(self, work: Work) -> None:
        active = self._active[work.job_id]
        active.job.images[work.index].state = RUNNING
        if active.job.state == QUEUED:
            active.job.start()
            self._emit(StateChanged, active.job.id, RUNNING, active.job.progress())
            # Written with the next flush: a short job is often done before, and its final
            # status (written at once) says running's times too.
            active.dirty = True

    def _settle(self, outcome: Outcome) -> None:
        work = outcome.work
        active = self._active[work.job_id]
        image = active.job.images[work.index]
        image.state, image.outputs, image.error = (outcome.state, list(outcome.outputs),
                                                   outcome.error)
        self._open_images -= 1
        active.dirty = True
        waited = None if work.started_at is None else work.started_at - work.queued_at
        self._image_event(active, work.index, waited, outcome.seconds)
        if active.job.finish_if_complete(self.settings.keep_finished):
            self._finish(active)

    def _image_event(self, active: _Active, index: int, waited: float | None = None,
                     seconds: float | None = None) -> None:
        progress = active.job.progress()
        self._emit(ImageFinished, active.job.id, index,
                   dataclasses.replace(active.job.images[index]), progress["done"],
                   progress["total"], waited, seconds)

    def _finish(self, active: _Active) -> None:
        # The status file is the record, written before anyone is answered; the index
        # follows (a crash in between leaves a row that start-up checks against the file).
        self._write(active, index=False)
        self._active.pop(active.job.id, None)
        document = active.job.to_document()
        self._emit(StateChanged, active.job.id, active.job.state, active.job.progress())
        self._emit(JobFinished, active.job.id, document)
        for waiter in active.waiters:
            waiter.set_result(document)
        active.waiters.clear()
        self._index(document)
        if active.lock_fd is not None:
            os.close(active.lock_fd)
            active.lock_fd = None

    def _flush(self, force: bool = False) -> None:
        moment = time.monotonic()
        for active in self._active.values():
            if active.dirty and (force or moment - active.written_at >= STATUS_INTERVAL):
                self._write(active)

    def _write(self, active: _Active, *, index: bool = True) -> None:
        try:
            self.outbox.write_status(active.job.to_document(), index=index)
        except OSError as exc:
            logger.error("cannot write the status of job %s: %s", active.job.id, exc)
            return
        active.dirty = False
        active.written_at = time.monotonic()

    def _index(self, document: dict) -> None:
        try:
            self.outbox.index.put(summary(document))
        except OSError as exc:
            logger.error("cannot index job %s: %s", document["id"], exc)

    def _emit(self, kind: type[JobEvent], job_id: str, *fields: object) -> None:
        """Number an event and hand it to every listener (holding the condition)."""
        # Numbers follow the clock (microseconds) when it is ahead: they keep growing across
        # restarts, and a number says when its event happened, at the latest.
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        event: Event = kind(self._seq, job_id, *fields)  # type: ignore[assignment]
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the engine
                logger.exception("an event listener failed")


def _never_fits(count: int, limit: int) -> str:
    return f"lists {count} images, more than the queue holds ({limit}, --max-queue)"
