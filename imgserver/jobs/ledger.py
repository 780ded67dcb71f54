"""The ledger: every job's current status. The jobs the engine is working on are held in
memory (``Entry``); the others live in the outbox.

A live job's status file is rewritten at most every STATUS_INTERVAL (and at once at every
decision that must survive a crash), so that a short job costs one write; its index row
follows its status file. A finished job whose status file or index row could not be
written (a full disk) is held until they can (``Storage`` says when): meanwhile it is
answered from memory, so its listing never disagrees with its status.

A job finishes under the engine's lock, but its final status file and index row are written
after the lock is let go (``write_finished``), by the thread that finished it: under load
the lock was held for most of the time, largely across those writes, while the threads
accepting new jobs waited for it. Until its status file is written, a finished job is
answered from memory, and whoever waits for it is told only after.

Questions about jobs (one job's status, a page of the listing, the unfinished jobs) are
answered from memory for live jobs and from the outbox for the rest, under the engine's
lock, so that a job is always in exactly one of the two.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from imgserver.errors import CapacityError, JobConflict, JobNotFound
from imgserver.jobs.job import (
    CANCELLED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    Job,
    Notification,
    Owner,
    served,
    summary,
    timestamp,
)
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.storage import Storage

logger = logging.getLogger("imgserver.jobs.ledger")

#: A running job's status file is rewritten at most this often (and at every state change).
STATUS_INTERVAL = 0.5
#: A client back on the all-jobs stream after its events are gone hears of at most this
#: many jobs that finished meanwhile.
RECENTLY_FINISHED = 1000


@dataclass(eq=False)
class Entry:
    """A job the engine is working on."""

    job: Job
    lock_fd: int | None = None  # holds the request's lock (``imgserver run``)
    dirty: bool = False         # changed since its status file was written
    written_at: float = 0.0
    waiters: list[Future] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # its final status document, once finished

    def release(self) -> None:
        """Let go of the request's lock, if held."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class Ledger:
    """The live jobs, and the questions asked about any job."""

    def __init__(self, outbox: Outbox, keep_finished: float, lock: threading.Condition,
                 storage: Storage) -> None:
        """A ledger over ``outbox``; ``lock`` is the engine's, held around every change;
        failed writes are told to ``storage``."""
        self.outbox = outbox
        self._keep = keep_finished
        self._lock = lock
        self._storage = storage
        self._live: dict[str, Entry] = {}
        self._unsaved: dict[str, tuple[dict, Owner]] = {}  # finished, not yet all on disk
        self._finishing: dict[str, Entry] = {}  # finished, their files still being written
        self._to_write: list[Entry] = []  # of those, the ones no thread is writing yet
        self._awaiting = 0  # threads waiting for finished jobs to be written

    # -- the live jobs (the engine holds the lock) -----------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._live.values())

    def get(self, job_id: str) -> Entry | None:
        """The live job ``job_id``, or None."""
        return self._live.get(job_id)

    def holds(self, job_id: str) -> bool:
        """Whether ``job_id`` is this process's: live, finishing, or finished and not yet all
        on disk (its files on disk may not say so yet)."""
        return job_id in self._live or job_id in self._finishing or job_id in self._unsaved

    def __getitem__(self, job_id: str) -> Entry:
        return self._live[job_id]

    def add(self, entry: Entry) -> None:
        """Hold ``entry`` as a live job."""
        self._live[entry.job.id] = entry

    def retire(self, entry: Entry) -> dict:
        """A finished job is no longer live: its final status document, which
        ``write_finished`` writes before anyone waiting for the job is told."""
        entry.final = entry.job.to_document()
        self._live.pop(entry.job.id, None)
        self._finishing[entry.job.id] = entry
        self._to_write.append(entry)
        return entry.final

    def write_finished(self) -> None:
        """Write the status files of the jobs finished since the last call (the record,
        before anyone is answered), tell whoever waits for them, then put their index rows
        and let go of their requests' locks.

        Called by each thread that can finish a job, once it has let go of the engine's
        lock: the writes are done outside it. (The engine thread calls it holding the
        lock, for what it finished itself.) A crash before a row is put leaves a row that
        start-up checks against the status file.
        """
        if not self._to_write:
            return  # read without the lock: a job finished meanwhile is its finisher's to write
        with self._lock:
            entries, self._to_write = self._to_write, []
        unsaved: list[Entry] = []
        told = [0] * len(entries)  # of each job's waiters, those told it
        done = 0
        try:
            for entry in entries:
                saved = self._save(entry)
                # Those who wait so far; any who come meanwhile are told below, with the lock.
                told[done] = len(entry.waiters)
                for waiter in entry.waiters[:told[done]]:
                    _tell(waiter, entry.final)
                if not (saved and self.put_row(summary(entry.final), entry.job.owner.folder)):
                    unsaved.append(entry)
                done += 1
        finally:  # even after a bug: no job stays finishing, nobody waits for good
            with self._lock:
                for entry, count in zip(entries, told, strict=True):
                    del self._finishing[entry.job.id]
                    for waiter in entry.waiters[count:]:
                        _tell(waiter, entry.final)
                    entry.waiters.clear()
                    entry.release()
                for entry in unsaved + entries[done:]:
                    self._unsaved[entry.job.id] = (entry.final, entry.job.owner)
                if self._awaiting:
                    self._lock.notify_all()

    def await_written(self, job_id: str | None = None) -> None:
        """Wait, holding the lock, until the finished job ``job_id`` (every finished job,
        with None) has its status file and index row written."""
        self._awaiting += 1
        try:
            while job_id in self._finishing if job_id is not None else self._finishing:
                self._lock.wait()
        finally:
            self._awaiting -= 1

    def _save(self, entry: Entry) -> bool:
        """Write a finished job's status file; whether it worked."""
        try:
            self.outbox.write_status(entry.final, index=False, folder=entry.job.owner.folder)
        except OSError as exc:
            with self._lock:
                self._storage.failed(f"cannot write the status of job {entry.job.id}: {exc}")
            return False
        return True

    def wait(self, job_id: str, refusal: Callable[[str], Exception] | None) -> Future:
        """A future of the job's final status document (the caller holds the lock); for a
        live job, with ``refusal``, at once its error instead."""
        future: Future = Future()
        self.attach(job_id, future, refusal)
        return future

    def attach(self, job_id: str, future: Future,
               refusal: Callable[[str], Exception] | None = None) -> None:
        """Resolve ``future`` to the job's final status document (``wait``)."""
        entry = self._live.get(job_id)
        if entry is None:
            finishing = self._finishing.get(job_id)
            if finishing is not None:
                finishing.waiters.append(future)  # told once its status file is written
            else:
                _tell(future, self.status(job_id))
        elif refusal is not None:
            _tell(future, error=refusal(job_id))
        else:
            entry.waiters.append(future)

    def release_waiters(self, refusal: Callable[[str], Exception]) -> None:
        """Answer everyone waiting for a live job with its ``refusal`` (the engine stops)."""
        for entry in self._live.values():
            for waiter in entry.waiters:
                _tell(waiter, error=refusal(entry.job.id))
            entry.waiters.clear()

    def write(self, entry: Entry, *, index: bool = True) -> bool:
        """Write the job's status file (and, unless ``index`` is False, its index row);
        whether it worked (if not, it is tried again: the entry stays dirty)."""
        try:
            self.outbox.write_status(entry.job.to_document(), index=index,
                                     folder=entry.job.owner.folder)
        except OSError as exc:
            self._storage.failed(f"cannot write the status of job {entry.job.id}: {exc}")
            entry.dirty = True
            return False
        entry.dirty = False
        entry.written_at = time.monotonic()
        return True

    def flush(self, *, force: bool = False) -> None:
        """Write the status files that changed and have waited STATUS_INTERVAL (all that
        changed, with ``force``); once the outbox takes writes again after a failure, what
        could not be written then."""
        if self._storage.problem is not None:
            if not self._storage.probe():
                return  # nothing can be written yet: try when the probe says so
            self._repair()
        moment = time.monotonic()
        for entry in self._live.values():
            if entry.dirty and (force or moment - entry.written_at >= STATUS_INTERVAL):
                self.write(entry)

    def next_write(self) -> float | None:
        """When (``time.monotonic``) the next write is due: a changed status file, or a
        probe of storage that failed; None if none is."""
        due = [entry.written_at + STATUS_INTERVAL for entry in self._live.values()
               if entry.dirty]
        probe = self._storage.next_probe()
        return probe if probe is not None else min(due, default=None)

    def put_row(self, job_summary: dict[str, Any], folder: str) -> bool:
        """Put the index row of a job of ``folder``; whether it worked (the status file is
        the record)."""
        try:
            self.outbox.index.put(job_summary, folder)
        except OSError as exc:
            with self._lock:
                self._storage.failed(f"cannot index job {job_summary['id']}: {exc}")
            return False
        return True

    def _repair(self) -> None:
        """Write the finished jobs' status files and index rows that could not be written."""
        for job_id, (document, owner) in list(self._unsaved.items()):
            try:
                self.outbox.write_status(document, folder=owner.folder)
            except OSError as exc:
                self._storage.failed(f"cannot write the status of job {job_id}: {exc}")
                return
            del self._unsaved[job_id]
            logger.info("job %s: its status file and index row are written now", job_id)

    def release_all(self) -> None:
        """Let go of every live job's request lock (the engine is stopping)."""
        for entry in self._live.values():
            entry.release()

    # -- questions (any thread) ------------------------------------------------------------

    def status(self, job_id: str, view: str | None = None) -> dict:
        """The status document of ``job_id``; JobNotFound if there is no such job, or, with
        a ``view``, none of that folder (another folder's job is not there for it)."""
        with self._lock:
            entry = self._live.get(job_id) or self._finishing.get(job_id)
            if entry is not None:
                if view is None or entry.job.owner.folder == view:
                    return entry.job.to_document()
                raise _not_found(job_id)
            if job_id in self._unsaved:
                unsaved, owner = self._unsaved[job_id]
                if view is None or owner.folder == view:
                    return served(unsaved, self._keep)
                raise _not_found(job_id)
        document = self.outbox.read_status(job_id)
        if document is None or (view is not None and self._folder(job_id) != view):
            raise _not_found(job_id)
        return served(document, self._keep)

    def owner(self, job_id: str) -> Owner:
        """Whom ``job_id`` is for; JobNotFound if there is no such job."""
        with self._lock:
            entry = self._live.get(job_id) or self._finishing.get(job_id)
            if entry is not None:
                return entry.job.owner
            if job_id in self._unsaved:
                return self._unsaved[job_id][1]
        try:
            return self.outbox.read_owner(job_id)
        except OSError:
            raise _not_found(job_id) from None

    def _folder(self, job_id: str) -> str | None:
        """The folder of a finished job (None when its owner cannot be read: nobody's)."""
        try:
            return self.outbox.read_owner(job_id).folder
        except OSError:
            return None

    def unfinished(self, since: int | None = None, view: str | None = None) -> list[dict]:
        """Summaries of the jobs not finished, and of those finished since the event
        ``since`` (at most RECENTLY_FINISHED, newest first; the caller holds the lock).

        An event's number is at most the clock's microseconds when it happened, so the jobs
        finished since are those with a ``finished_at`` from that moment on (and a few from
        the same millisecond).
        """
        summaries = [entry.job.summary() for entry in self._live.values()
                     if view is None or entry.job.owner.folder == view]
        if since is not None:
            # Those finishing have no final row yet: they are the newest finished.
            summaries += [entry.job.summary() for entry in reversed(self._finishing.values())
                          if view is None or entry.job.owner.folder == view]
            moment = timestamp(datetime.fromtimestamp(since / 1e6, timezone.utc))
            summaries += [served(s, self._keep) for s in self.outbox.index.finished_since(
                moment, RECENTLY_FINISHED, view) if s["id"] not in self._finishing]
        return summaries

    def page(self, *, states: Sequence[str] = (), source: str | None = None, limit: int = 50,
             cursor: str | None = None, view: str | None = None
             ) -> tuple[list[dict], str | None]:
        """Summaries of jobs (documents without images; of the folder ``view`` only, unless
        None), newest first, and the cursor of the next page (None on the last).
        CapacityError while the index is being rebuilt."""
        if self.outbox.index.needs_scan:
            raise CapacityError("the job index is being rebuilt from the status files; "
                                "listing is back when it is done", retry_after=5)
        asked = set(states)
        if asked & {QUEUED, RUNNING}:  # a live job's row may still say the other one
            asked |= {QUEUED, RUNNING}
        summaries, after = self.outbox.index.page(states=sorted(asked), source=source,
                                                  limit=limit, cursor=cursor, folder=view)
        with self._lock:  # a running job's row lags its status by up to STATUS_INTERVAL
            summaries = [self._current(s) for s in summaries]
        return [s for s in summaries if not states or s["state"] in states], after

    def _current(self, row: dict) -> dict:
        """The summary of the job of an index ``row``, from memory where its row may lag."""
        entry = self._live.get(row["id"]) or self._finishing.get(row["id"])
        if entry is not None:
            return entry.job.summary()
        return served(summary(self._unsaved.get(row["id"], (row,))[0]), self._keep)

    def cancelled_before(self, job_id: str, view: str | None = None) -> dict:
        """The document of ``job_id``, not live, if it was cancelled; JobConflict if it is
        done or failed (or run by another process), JobNotFound if there is no such job
        (of ``view``)."""
        document = self.status(job_id, view)
        if document["state"] == CANCELLED:
            return document
        if document["state"] in FINAL_STATES:
            raise JobConflict(f"job {job_id} is already {document['state']}; only an "
                              f"unfinished job can be cancelled", document)
        raise JobConflict(f"job {job_id} is run by another process ('imgserver run'); "
                          f"stop that process to stop it", document)

    def note_delivery(self, job_id: str, index: int, notification: Notification) -> None:
        """Record how the job's notification ``index`` went (the webhooks' progress)."""
        with self._lock:  # not while the job's own status is being written
            self.await_written(job_id)
            self.outbox.note_delivery(job_id, index, notification.to_document())


def _tell(waiter: Future, document: dict | None = None, error: Exception | None = None
          ) -> None:
    """Resolve ``waiter`` to ``document``, or to ``error``; not if it was given up on
    (cancelled: a route that stopped waiting)."""
    if waiter.set_running_or_notify_cancel():
        if error is None:
            waiter.set_result(document)
        else:
            waiter.set_exception(error)


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job with id {job_id!r}")
