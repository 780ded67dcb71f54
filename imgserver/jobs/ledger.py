"""The ledger: every job's current status. The jobs the engine is working on are held in
memory (``Entry``); the others live in the outbox.

A live job's status file is rewritten at most every STATUS_INTERVAL (and at once at every
decision that must survive a crash), so that a short job costs one write; its index row
follows its status file. A job finishes under the engine's lock, and its final status file
and index row are written after the lock is let go (``Finishing``): until they are, or,
after a failed write, until they can be, it is answered from memory.

Questions about jobs (one job's status, a page of the listing, the unfinished jobs) are
answered from memory for the jobs held there and from the outbox for the rest, under the
engine's lock, so that a job is always in exactly one of the two.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from datetime import datetime, timezone

from imgserver.errors import CapacityError, JobConflict, JobNotFound
from imgserver.jobs.entry import Entry, tell
from imgserver.jobs.finishing import Finishing
from imgserver.jobs.job import (
    CANCELLED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    Notification,
    Owner,
    served,
    summary,
    timestamp,
)
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.storage import Storage

#: A running job's status file is rewritten at most this often (and at every state change).
STATUS_INTERVAL = 0.5
#: A client back on the all-jobs stream after its events are gone hears of at most this
#: many jobs that finished meanwhile.
RECENTLY_FINISHED = 1000


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
        self._finished = Finishing(outbox, lock, storage)

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
        return job_id in self._live or job_id in self._finished

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
        self._finished.add(entry)
        return entry.final

    def write_finished(self) -> None:
        """Write the files of the jobs finished since the last call (``Finishing.write``):
        by each thread that can finish a job, once it has let go of the engine's lock."""
        self._finished.write()

    def await_written(self, job_id: str | None = None) -> None:
        """Wait, holding the lock, until the finished job ``job_id`` (every finished job,
        with None) has its status file and index row written."""
        self._finished.await_written(job_id)

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
            finishing = self._finished.entry(job_id)
            if finishing is not None:
                finishing.waiters.append(future)  # told once its status file is written
            else:
                tell(future, self.status(job_id))
        elif refusal is not None:
            tell(future, error=refusal(job_id))
        else:
            entry.waiters.append(future)

    def release_waiters(self, refusal: Callable[[str], Exception]) -> None:
        """Answer everyone waiting for a live job with its ``refusal`` (the engine stops)."""
        for entry in self._live.values():
            for waiter in entry.waiters:
                tell(waiter, error=refusal(entry.job.id))
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
            self._finished.repair()
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

    def release_all(self) -> None:
        """Let go of every live job's request lock (the engine is stopping)."""
        for entry in self._live.values():
            entry.release()

    # -- questions (any thread) ------------------------------------------------------------

    def status(self, job_id: str, view: str | None = None) -> dict:
        """The status document of ``job_id``; JobNotFound if there is no such job, or, with
        a ``view``, none of that folder (another folder's job is not there for it)."""
        with self._lock:
            entry = self._live.get(job_id) or self._finished.entry(job_id)
            if entry is not None:
                if view is None or entry.job.owner.folder == view:
                    return entry.job.to_document()
                raise _not_found(job_id)
            unsaved = self._finished.unsaved(job_id)
            if unsaved is not None:
                if view is None or unsaved[1].folder == view:
                    return served(unsaved[0], self._keep)
                raise _not_found(job_id)
        document = self.outbox.read_status(job_id)
        if document is None or (view is not None and self._folder(job_id) != view):
            raise _not_found(job_id)
        return served(document, self._keep)

    def owner(self, job_id: str) -> Owner:
        """Whom ``job_id`` is for; JobNotFound if there is no such job."""
        with self._lock:
            entry = self._live.get(job_id) or self._finished.entry(job_id)
            if entry is not None:
                return entry.job.owner
            unsaved = self._finished.unsaved(job_id)
            if unsaved is not None:
                return unsaved[1]
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
            finishing = self._finished.writing()
            summaries += [entry.job.summary() for entry in reversed(finishing)
                          if view is None or entry.job.owner.folder == view]
            writing = {entry.job.id for entry in finishing}
            moment = timestamp(datetime.fromtimestamp(since / 1e6, timezone.utc))
            summaries += [served(s, self._keep) for s in self.outbox.index.finished_since(
                moment, RECENTLY_FINISHED, view) if s["id"] not in writing]
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
        entry = self._live.get(row["id"]) or self._finished.entry(row["id"])
        if entry is not None:
            return entry.job.summary()
        unsaved = self._finished.unsaved(row["id"])
        return served(summary(unsaved[0] if unsaved else row), self._keep)

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


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job with id {job_id!r}")
