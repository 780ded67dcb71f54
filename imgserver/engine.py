"""The job engine: one queue of images, fed by every road, run on one executor.

    HTTP API --+                                   +--> executor (process pool / Dask)
    drop folder+--> submit: validate -> admit ->   |      process_image(ImageTask)
    imgserver run  persist request -> queue ------>+             |
                                                   |   done / failed / worker died
    GET /jobs, wait <--- status documents <--------+<------------+
                         (OUTBOX/<id>.status.json)

``submit`` validates the request (nothing is written for an invalid one), checks that its
images fit in the queue, stores the request in the outbox and only then accepts it. A
single engine thread hands images to the executor, no more at once than its capacity, so
each image starts as soon as it is handed over: that is when its time limit starts.

The executor is any ``concurrent.futures.Executor``. A pool may also offer ``capacity``
(images to hand over at once; otherwise one per worker), ``problem`` (why no image can run
now: /healthz reports it and the queue waits) and ``reset(futures)`` (end the images of
these futures: they ran over their time limit). ``LocalPool`` and ``DaskPool`` offer all
three.

The same thread collects results, retries images whose worker died, fails images that
run past their time limit (and resets the pool, which kills their worker), and writes the
status files. On start, every job whose request is kept and whose status is not final is
queued again: an accepted job is never lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

from imgserver.errors import CapacityError, ImageError, JobNotFound, LostWork, RequestError
from imgserver.job import DONE, FAILED, FINAL_STATES, QUEUED, RUNNING, SOURCES, ImageStatus, Job
from imgserver.pipeline import ImageTask, ping, process_image, remove_partial
from imgserver.request import Request, RequestLimits, parse_request
from imgserver.settings import Settings
from imgserver.store import Outbox

logger = logging.getLogger("imgserver.engine")

#: A running job's status file is rewritten at most this often (and at every state change).
STATUS_INTERVAL = 0.5
#: Temporary files in the outbox older than this (seconds) are left over from a crash;
#: they are looked for at start and then this often.
STALE_TEMP = 60.0
SWEEP_INTERVAL = 300.0
#: After the executor refused work, try again after this many seconds.
RETRY_DELAY = 1.0
#: Workers dying this many times in a row, without an image finishing, make the engine
#: unhealthy (and slow down its dispatch, so a broken pool does not burn through the queue).
CRASH_STREAK = 3


@dataclass(frozen=True)
class ImageFinished:
    """An image of a job is finished (done or failed)."""

    job_id: str
    index: int
    image: ImageStatus
    done: int
    total: int


@dataclass(frozen=True)
class JobFinished:
    """A job reached its final state."""

    job_id: str
    document: dict


Event = ImageFinished | JobFinished
Listener = Callable[[Event], None]


@dataclass(eq=False)
class _Work:
    """One image on its way through the executor."""

    job: _Active
    index: int
    task: ImageTask
    retried: bool = False      # its worker died once: it now runs alone
    deadline: float = 0.0
    abandoned: bool = False    # already failed (timed out); waiting for its worker to end
    bystander: bool = False    # was running when the pool was reset on purpose


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
        self._executor = executor
        self._concurrency = concurrency
        self._lock_jobs = lock_jobs
        self._limits = RequestLimits(settings.max_body_bytes, settings.max_images)
        self._cond = threading.Condition()
        self._active: dict[str, _Active] = {}
        self._pending: deque[_Work] = deque()
        self._retries: deque[_Work] = deque()
        self._running: dict[Future, _Work] = {}
        self._completed: list[Future] = []
        self._open_images = 0
        self._accepting = False
        self._closing = False
        self._healthy = True
        self._executor_error = ""
        self._storage_error: str | None = None
        self._crash_streak = 0
        self._probing: Future | None = None
        self._swept_at = time.monotonic()
        self._retry_at = 0.0
        self._listeners: list[Listener] = []
        self._thread = threading.Thread(target=self._loop, name="imgserver-engine", daemon=True)

    # -- public interface -------------------------------------------------------------

    def start(self, *, recover: bool = True) -> None:
        """Queue the jobs left unfinished by an earlier run, then start taking work."""
        self._remove_stale_temps()
        if recover:
            for job_id in self.outbox.unfinished():
                self._recover(job_id)
        with self._cond:
            self._accepting = True
        self._thread.start()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` (on the engine thread) for every finished image and job."""
        self._listeners.append(listener)

    def submit(self, body: bytes, *, source: str, name: str | None = None) -> dict:
        """Accept a request; return its job's status document.

        An invalid request raises RequestError and leaves no trace; CapacityError when the
        queue is full or the request cannot be stored.
        """
        request = parse_request(body, self.settings.root, self._limits)
        with self._cond:
            self._admit(len(request.images))
            try:
                job_id, lock_fd = self.outbox.create(body, name, lock=self._lock_jobs)
            except OSError as exc:
                raise self._storage_failed(exc) from None
            self._storage_error = None
            return self._accept(job_id, source, request, lock_fd)

    def take(self, path: Path, *, name: str | None, peek: bytes, source: str = "inbox") -> dict:
        """Take the drop-folder file ``path`` as a job; return its status document.

        ``peek`` is the file's content as read a moment ago: it decides whether the queue has
        room (CapacityError leaves the file where it is). The file is then moved into the
        outbox as the job's request (``Outbox.claim``: exactly that file, once, even if it
        was replaced meanwhile) and what was moved is what is validated and run. An invalid
        request becomes a failed job, since nobody is there to answer.
        """
        try:
            peeked: Request | None = parse_request(peek, self.settings.root, self._limits)
        except RequestError:
            peeked = None  # it will be recorded as failed once taken
        count = len(peeked.images) if peeked else 0
        with self._cond:
            if not self._accepting:
                raise CapacityError("the server is shutting down", retry_after=5)
            if count:
                self._admit(min(count, self.settings.max_queue))
            placeholder = Job(id="", source=source, operations=[], images=[])

            def reserved(job_id: str) -> None:
                # Says where the job came from, should the server stop before it is written.
                placeholder.id = job_id
                self.outbox.write_status(placeholder.to_document())

            try:
                job_id, body, size = self.outbox.claim(path, name, reserved,
                                                       self.settings.max_body_bytes)
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
                placeholder.reject(str(error))
                self.outbox.write_status(placeholder.to_document())
                return placeholder.to_document()
            return self._accept(job_id, source, request, None)

    def _accept(self, job_id: str, source: str, request: Request, lock_fd: int | None) -> dict:
        """Register a stored, valid request as a queued job; its status document."""
        job = Job(id=job_id, source=source, operations=list(request.operations),
                  images=[ImageStatus(spec.input, spec.output) for spec in request.images])
        active = self._register(job, request, lock_fd)
        self._write(active)
        self._cond.notify_all()
        return job.to_document()

    def _storage_failed(self, exc: OSError) -> CapacityError:
        self._storage_error = f"the outbox {self.outbox.path} cannot store requests: " \
                              f"{exc.strerror or exc}"
        return CapacityError(self._storage_error, retry_after=30)

    def status(self, job_id: str) -> dict:
        """The status document of ``job_id``; JobNotFound if there is no such job."""
        with self._cond:
            active = self._active.get(job_id)
            if active is not None:
                return active.job.to_document()
        document = self.outbox.read_status(job_id)
        if document is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return document

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
        problem = getattr(self._executor, "problem", None)  # a pool may say what is wrong
        if problem:
            return problem
        if self._storage_error:
            return self._storage_error
        if not self._healthy:
            return f"the executor refuses work: {self._executor_error}"
        if self._crash_streak >= CRASH_STREAK:
            return (f"worker processes keep dying: {self._crash_streak} in a row without "
                    f"finishing an image")
        return None

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
            self._pending.append(_Work(active, index, task))
            self._open_images += 1
        if job.finish_if_complete():
            self._finish(active)
        return active

    def _recover(self, job_id: str) -> None:
        try:
            body = self.outbox.read_request(job_id)
        except OSError as exc:
            logger.error("cannot read the request of job %s: %s", job_id, exc)
            return
        document = self.outbox.read_status(job_id)
        if not body and document is not None and not document.get("images"):
            # An id reserved for a drop-folder file that was never moved in: no job.
            self.outbox.discard(job_id)
            return
        try:
            job = Job.from_document(document) if document else None
        except (KeyError, TypeError):
            job = None
        try:
            request = parse_request(body, self.settings.root, self._limits)
        except RequestError as error:
            job = job or Job(id=job_id, source=_source(document), operations=[], images=[])
            job.reject(str(error))
            self.outbox.write_status(job.to_document())
            return
        if job is None or len(job.images) != len(request.images):
            # Accepted, but stopped before its first full status file: it never started.
            job = Job(id=job_id, source=_source(document), operations=list(request.operations),
                      images=[ImageStatus(spec.input, spec.output) for spec in request.images])
        for spec, image in zip(request.images, job.images, strict=False):
            if image.state not in FINAL_STATES:
                remove_partial(tuple(str(path) for path in spec.outputs))
        if job.state == RUNNING and all(i.state not in FINAL_STATES for i in job.images):
            job.state = QUEUED
        with self._cond:
            active = self._register(job, request, None)
            if not job.finished:
                self._write(active)
        logger.info("resuming job %s (%d of %d images left)", job_id,
                    sum(i.state not in FINAL_STATES for i in job.images), len(job.images))

    def _remove_stale_temps(self) -> None:
        # Left by a process killed while writing; a live one's are seconds old at most.
        if not self.outbox.path.is_dir():
            return
        for temp in self.outbox.path.glob(".tmp-*"):
            try:
                if time.time() - temp.stat().st_mtime > STALE_TEMP:
                    temp.unlink()
            except OSError:
                pass

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
                    self._cond.wait(RETRY_DELAY)
            self._flush(force=True)
            for active in self._active.values():
                if active.lock_fd is not None:
                    os.close(active.lock_fd)
                    active.lock_fd = None

    def _step(self) -> bool:
        """One turn of the engine thread; True once it is closing and nothing runs."""
        self._collect()
        self._enforce_deadlines()
        self._probe()
        self._sweep()
        if self._closing and not self._running:
            return True
        if self._accepting and not self._closing:
            self._dispatch()  # once stopping, images not started stay queued
        self._flush()
        self._cond.wait(self._next_wakeup())
        return False

    def _probe(self) -> None:
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

    def _sweep(self) -> None:
        if time.monotonic() >= self._swept_at + SWEEP_INTERVAL:
            self._swept_at = time.monotonic()
            self._remove_stale_temps()

    def _next_wakeup(self) -> float | None:
        moments = [work.deadline for work in self._running.values() if not work.abandoned]
        if self._crash_streak >= CRASH_STREAK and self._probing is None:
            moments.append(self._retry_at)
        moments.append(self._swept_at + SWEEP_INTERVAL)
        moments += [a.written_at + STATUS_INTERVAL for a in self._active.values() if a.dirty]
        if self._pending or self._retries:
            moments.append(self._retry_at)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic()) + 0.001

    def _capacity(self) -> int:
        # A pool may know its size (a Dask cluster's changes); else, as many as workers.
        if self._concurrency:
            return self._concurrency
        return int(getattr(self._executor, "capacity", self.settings.workers))

    def _dispatch(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        if getattr(self._executor, "problem", None):
            self._retry_at = time.monotonic() + RETRY_DELAY  # the queue waits for the pool
            return
        if any(work.retried for work in self._running.values()):
            return  # an image whose worker died runs alone, so a second death is its own
        if self._retries:
            if not self._running:
                self._hand_over(self._retries.popleft())
            return
        while self._pending and len(self._running) < self._capacity():
            if not self._hand_over(self._pending.popleft()):
                return

    def _hand_over(self, work: _Work) -> bool:
        try:
            future = self._executor.submit(process_image, work.task)
        except (BrokenExecutor, RuntimeError, OSError) as exc:
            logger.error("the executor refused work: %s", exc)
            self._executor_error = str(exc) or type(exc).__name__
            (self._retries if work.retried else self._pending).appendleft(work)
            self._healthy = False
            self._retry_at = time.monotonic() + RETRY_DELAY
            return False
        self._healthy = True
        work.deadline = time.monotonic() + self.settings.image_timeout
        self._running[future] = work
        image = work.job.job.images[work.index]
        image.state = RUNNING
        if work.job.job.state == QUEUED:
            work.job.job.start()
            # Written with the next flush: a short job is often done before, and its final
            # status (written at once) says running's times too.
            work.job.dirty = True
        future.add_done_callback(self._on_done)
        return True

    def _on_done(self, future: Future) -> None:
        with self._cond:
            self._completed.append(future)
            self._cond.notify_all()

    def _collect(self) -> None:
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
                self._settle(work, DONE, outputs=future.result())
            elif isinstance(error, ImageError):
                self._crash_streak = 0
                self._settle(work, FAILED, error=str(error))
            elif isinstance(error, LostWork):
                self._pending.appendleft(work)  # not the image's fault: run it again
            elif isinstance(error, BrokenExecutor):
                remove_partial(work.task.outputs)
                self._worker_died(work)
            else:
                logger.error("image %s of job %s failed unexpectedly", work.index,
                             work.job.job.id, exc_info=error)
                self._settle(work, FAILED, error=f"internal error: {error!r}")

    def _worker_died(self, work: _Work) -> None:
        if work.bystander:
            work.bystander = False
            self._pending.appendleft(work)  # stopped by a reset meant for another image
            return
        self._crash_streak += 1
        if self._crash_streak >= CRASH_STREAK:
            self._retry_at = time.monotonic() + RETRY_DELAY
        if work.retried:
            self._settle(work, FAILED, error=(
                "the worker process died while processing this image, twice "
                "(a crash or the out-of-memory killer); the image was not retried again"))
        else:
            logger.warning("a worker died while processing %s; retrying it alone",
                           work.task.input)
            work.retried = True
            self._retries.append(work)

    def _enforce_deadlines(self) -> None:
        moment = time.monotonic()
        expired = [w for w in self._running.values() if not w.abandoned and w.deadline <= moment]
        if not expired:
            return
        for work in expired:
            work.abandoned = True
            self._settle(work, FAILED, error=(
                f"processing took longer than the limit of {self.settings.image_timeout:g} s "
                f"(--image-timeout); its worker was stopped"))
        for work in self._running.values():
            if not work.abandoned:
                work.bystander = True
        reset = getattr(self._executor, "reset", None)
        if reset is not None:
            reset([future for future, work in self._running.items() if work in expired])

    def _settle(self, work: _Work, state: str, *, outputs: list[str] | None = None,
                error: str | None = None) -> None:
        active = work.job
        image = active.job.images[work.index]
        image.state, image.outputs, image.error = state, outputs or [], error
        self._open_images -= 1
        active.dirty = True
        progress = active.job.progress()
        self._emit(ImageFinished(active.job.id, work.index, image, progress["done"],
                                 progress["total"]))
        if active.job.finish_if_complete():
            self._finish(active)

    def _finish(self, active: _Active) -> None:
        self._write(active)
        self._active.pop(active.job.id, None)
        document = active.job.to_document()
        for waiter in active.waiters:
            waiter.set_result(document)
        active.waiters.clear()
        if active.lock_fd is not None:
            os.close(active.lock_fd)
            active.lock_fd = None
        self._emit(JobFinished(active.job.id, document))

    def _flush(self, force: bool = False) -> None:
        moment = time.monotonic()
        for active in self._active.values():
            if active.dirty and (force or moment - active.written_at >= STATUS_INTERVAL):
                self._write(active)

    def _write(self, active: _Active) -> None:
        try:
            self.outbox.write_status(active.job.to_document())
        except OSError as exc:
            logger.error("cannot write the status of job %s: %s", active.job.id, exc)
            return
        active.dirty = False
        active.written_at = time.monotonic()

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the engine
                logger.exception("an event listener failed")


def _source(document: dict | None) -> str:
    """Where a job came from, by its status file; a job without one came over HTTP (a
    drop-folder job has a status before its request is moved in, a command-line job is
    held by its own process)."""
    source = (document or {}).get("source")
    return source if source in SOURCES else "http"


def _never_fits(count: int, limit: int) -> str:
    return f"lists {count} images, more than the queue holds ({limit}, --max-queue)"
