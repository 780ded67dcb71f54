"""Intake: a request becomes an accepted job (validated, admitted, stored), or is refused.

    submit(body)         validate -> stage: written and fsynced, outside the lock
    submit_once(body)      -> [its Idempotency-Key used before? that job]
                           -> admit: room in the queue? -> placed under its id -> accepted
    take(INBOX file)     peek -> admit -> the file claimed into the outbox -> validate
                           -> accepted, or a failed job (nobody is there to answer)

A request refused over HTTP or on the command line leaves no trace. An accepted one is on
disk before anyone is told, and is handed to the engine (``Desk.accept``), which decides
everything that happens to it from then on.

Every request comes for an ``Owner``: its paths are resolved and confined in the owner's
folder (the root itself by default), its images count against the owner's quota as well as
the queue, and its idempotency keys are its own.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from imgserver.errors import CapacityError, RequestError, TooManyRequests
from imgserver.images.pipeline import ImageTask
from imgserver.jobs.arrivals import Arrivals
from imgserver.jobs.job import ANYONE, DROP_FOLDER, ImageStatus, Job, Notification, Owner
from imgserver.jobs.keys import check_key
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.request import ImageSpec, Request, RequestLimits, parse_request
from imgserver.jobs.storage import Storage
from imgserver.settings import Settings
from imgserver.urls import redacted


class Desk(Protocol):
    """What intake needs of the engine: whether it takes work, how full its queue is, and
    someone to hand each stored job to."""

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (not while starting or stopping)."""

    @property
    def open_images(self) -> int:
        """Images accepted and not yet finished, all jobs together."""

    def open_images_of(self, owner: str) -> int:
        """Images accepted and not yet finished of ``owner``'s jobs."""

    def accept(self, job: Job, request: Request, lock_fd: int | None, *, write: bool,
               waiter: Future | None = None) -> dict:
        """Take a stored, valid request on as a queued job; its status document (``waiter``
        resolves to the final one)."""

    def refuse(self, job: Job) -> dict:
        """Record a stored request that is invalid as a failed job; its status document."""

    def status(self, job_id: str) -> dict:
        """The status document of ``job_id``."""


class Intake:
    """Turns requests into stored jobs and hands them to the engine."""

    def __init__(self, settings: Settings, outbox: Outbox, lock: threading.Condition,
                 desk: Desk, storage: Storage, *, lock_jobs: bool = False) -> None:
        """Intake into ``outbox`` for ``desk``, holding ``lock`` (the engine's) to admit;
        failures to store are told to ``storage``.

        ``lock_jobs``: hold a lock on each job's request file while it runs (``imgserver
        run``), so that a server starting meanwhile leaves the job to this process.
        """
        self.settings = settings
        self.outbox = outbox
        self._storage = storage
        self._lock = lock
        self._desk = desk
        self._arrivals = Arrivals(outbox)
        self._lock_jobs = lock_jobs
        self._limits = RequestLimits(settings.max_body_bytes, settings.max_images,
                                     settings.notify_allow)

    def root_of(self, owner: Owner) -> Path:
        """Where ``owner``'s paths are resolved: its folder under the root, which must be
        a folder inside it (RequestError otherwise)."""
        if not owner.folder:
            return self.settings.root
        folder = Path(os.path.realpath(self.settings.root / owner.folder))
        if not folder.is_relative_to(self.settings.root) or not folder.is_dir():
            raise RequestError.single("request", (
                f"the token's folder {owner.folder!r} is not a folder under the server's "
                f"root; ask its operator to create it"))
        return folder

    def parse(self, body: bytes, owner: Owner = ANYONE) -> Request:
        """The request ``body`` of ``owner``, validated; RequestError naming what is wrong."""
        return parse_request(body, self.root_of(owner), self._limits)

    def new_job(self, job_id: str, source: str, request: Request, owner: Owner = ANYONE
                ) -> Job:
        """A queued job of ``owner`` for a valid ``request``, told to notify the URLs it
        should."""
        urls = [url for url in (self.settings.notify_url, request.notify) if url]
        return Job(id=job_id, source=source, operations=list(request.operations),
                   images=[ImageStatus(spec.input, spec.output) for spec in request.images],
                   notifications=[Notification(redacted(url)) for url in dict.fromkeys(urls)],
                   owner=owner)

    def task(self, spec: ImageSpec, request: Request, owner: Owner = ANYONE) -> ImageTask:
        """What a worker is given to run the image ``spec`` of ``owner``'s ``request``."""
        return ImageTask(
            root=str(self.root_of(owner)), input=str(spec.input_path),
            outputs=tuple(str(path) for path in spec.outputs), operations=request.parsed,
            max_pixels=self.settings.max_pixels, max_file_bytes=self.settings.max_file_bytes)

    def submit(self, body: bytes, *, source: str, name: str | None = None,
               owner: Owner = ANYONE, waiter: Future | None = None) -> dict:
        """Accept ``owner``'s request; its job's status document. ``waiter``, if given,
        resolves to the job's final status document.

        An invalid request raises RequestError and leaves no trace; CapacityError when the
        queue is full or the request cannot be stored, TooManyRequests when the owner's
        quota would be exceeded.
        """
        return self._create(body, self.parse(body, owner), source=source, name=name,
                            owner=owner, waiter=waiter)[0]

    def submit_once(self, body: bytes, key: str, *, source: str, owner: Owner = ANYONE,
                    waiter: Future | None = None) -> tuple[dict, bool]:
        """``submit`` with an idempotency key: the document, and whether a job was created.

        A key the same owner used in the last 24 hours answers with that key's job (its
        current status) and creates nothing; RequestError if that job's request differs
        from ``body``. Owners' keys never meet: each has its own. ``waiter`` is resolved
        only for a job this call creates.
        """
        check_key(key)
        with self._lock:
            earlier = self._replay(_own(key, owner), body)
        if earlier is not None:
            return earlier, False
        return self._create(body, self.parse(body, owner), source=source,
                            name=uuid.uuid4().hex, key=_own(key, owner), owner=owner,
                            waiter=waiter)

    def take(self, path: Path, *, name: str | None, peek: bytes, source: str = "inbox") -> dict:
        """Take the drop-folder file ``path`` as a job; its status document.

        ``peek`` is the file's content as read a moment ago: it decides whether the queue has
        room (CapacityError leaves the file where it is). The file is then moved into the
        outbox as the job's request (``Outbox.claim``: exactly that file, once, even if it
        was replaced meanwhile) and what was moved is what is validated and run. An invalid
        request becomes a failed job, since nobody is there to answer.
        """
        owner = Owner(DROP_FOLDER)
        try:
            peeked: Request | None = self.parse(peek)
        except RequestError:
            peeked = None  # it will be recorded as failed once taken
        with self._lock:
            # Room for what it asks (at most a full queue: more fails below, once taken).
            self._admit(min(len(peeked.images), self.settings.max_queue) if peeked else 0,
                        owner)
            placeholder = Job(id="", source=source, operations=[], images=[], owner=owner)

            def reserved(job_id: str) -> None:
                # Says where the job came from, should the server stop before it is written.
                placeholder.id = job_id
                self.outbox.write_status(placeholder.to_document())

            try:
                job_id, body, size = self._arrivals.claim(path, name, reserved,
                                                       self.settings.max_body_bytes,
                                                       source=source)
            except FileNotFoundError:
                raise  # taken already: not a storage problem
            except OSError as exc:
                raise self._storage_failed(exc) from None
            self._storage.succeeded()
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
                return self._desk.refuse(placeholder)
            job = self.new_job(job_id, source, request, owner)
            job.created_at = placeholder.created_at
            return self._desk.accept(job, request, None, write=True)

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
        return self._desk.status(job_id)

    def _admit(self, count: int, owner: Owner) -> None:
        """Whether ``count`` more images of ``owner`` fit in the queue, and in its quota,
        now (holding the lock)."""
        if not self._desk.accepting:
            raise CapacityError("the server is shutting down", retry_after=5)
        limit, waiting = self.settings.max_queue, self._desk.open_images
        if count > limit:
            raise RequestError.single("images", _never_fits(count, limit))
        quota = owner.max_queued
        if quota is not None:
            if count > quota:
                raise RequestError.single("images", (
                    f"lists {count} images, more than the token {owner.name!r} may have "
                    f"queued ({quota}, --max-queued)"))
            mine = self._desk.open_images_of(owner.name)
            if mine + count > quota:
                raise TooManyRequests(
                    f"the token {owner.name!r} has {mine} images waiting or running, this "
                    f"request adds {count}, its limit is {quota} (--max-queued)",
                    retry_after=5)
        if waiting + count > limit:
            raise CapacityError(
                f"the queue is full: {waiting} images are waiting or running, "
                f"this request adds {count}, the limit is {limit} (--max-queue)")

    def _create(self, body: bytes, request: Request, *, source: str, name: str | None,
                owner: Owner, key: str | None = None, waiter: Future | None = None
                ) -> tuple[dict, bool]:
        """Store a valid request and accept it as a queued job: its status document, and
        True; with an idempotency ``key`` used before, that key's job, and False.

        The request is written and fsynced before the lock is taken (the engine goes on
        meanwhile), then placed under its id and handed over.
        """
        try:
            staged = self._arrivals.stage(body, lock=self._lock_jobs, owner=owner)
        except OSError as exc:
            with self._lock:
                raise self._storage_failed(exc) from None
        try:
            with self._lock:
                if key is not None:
                    earlier = self._replay(key, body)  # the same key sent twice at once
                    if earlier is not None:
                        return earlier, False
                self._admit(len(request.images), owner)
                if key is not None and name is not None:
                    # Bound before the job exists: a crash in between binds it to nothing.
                    self.outbox.keys.bind(key, name)
                try:
                    job_id = self._arrivals.place(staged, name, source=source,
                                                  folder=owner.folder)
                except OSError as exc:
                    raise self._storage_failed(exc) from None
                self._storage.succeeded()
                lock_fd = staged.detach() if self._lock_jobs else None
                document = self._desk.accept(self.new_job(job_id, source, request, owner),
                                             request, lock_fd, write=False, waiter=waiter)
        finally:
            staged.close()
        # The request's link is made durable outside the lock, in one fsync with those of
        # the requests placed meanwhile, and before anyone is answered.
        try:
            self.outbox.sync_folder()
        except OSError as exc:
            # The job is accepted and runs (its request is in the folder); only a crash of
            # the machine before the folder reaches the disk could lose it. Said, not hidden.
            with self._lock:
                self._storage_failed(exc)
        return document, True

    def _storage_failed(self, exc: OSError) -> CapacityError:
        problem = f"the outbox {self.outbox.path} cannot store requests: {exc.strerror or exc}"
        self._storage.failed(problem)
        return CapacityError(problem, retry_after=30)


def _own(key: str, owner: Owner) -> str:
    """An idempotency key as ``owner``'s own (the same key of two owners is two keys)."""
    return f"{owner.name}\x00{key}" if owner.name else key


def _never_fits(count: int, limit: int) -> str:
    return f"lists {count} images, more than the queue holds ({limit}, --max-queue)"
