"""Finished jobs on their way to disk: their final status files and index rows, written
after the engine's lock is let go.

    engine, holding the lock          the thread that finished them, without it
    finish -> Ledger.retire -> add --> write: status file -> tell waiters -> index row
                                         |  a write failed (a full disk)
                                         v
                                       unsaved, answered from memory --> repair, once the
                                                                         outbox takes writes

A job finishes under the engine's lock, but its files are written by the thread that
finished it once it has let go of the lock: under load the lock was held for most of the
time, largely across those writes, while the threads accepting new jobs waited for it.
Until its status file is written, a finished job is answered from memory, and whoever waits
for it is told only after. A job whose files could not be written is held until they can
(``Storage`` says when), so its listing never disagrees with its status.
"""

from __future__ import annotations

import logging
import threading

from imgserver.jobs.entry import Entry, tell
from imgserver.jobs.job import Owner, summary
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.storage import Storage

logger = logging.getLogger("imgserver.jobs.ledger")  # as before the split


class Finishing:
    """The finished jobs whose files are being written, or could not be."""

    def __init__(self, outbox: Outbox, lock: threading.Condition, storage: Storage) -> None:
        """Finished jobs of ``outbox``; ``lock`` is the engine's; failed writes are told to
        ``storage``."""
        self._outbox = outbox
        self._lock = lock
        self._storage = storage
        self._writing: dict[str, Entry] = {}  # their files still being written
        self._to_write: list[Entry] = []  # of those, the ones no thread is writing yet
        self._unsaved: dict[str, tuple[dict, Owner]] = {}  # not yet all on disk
        self._awaiting = 0  # threads waiting for finished jobs to be written

    def __contains__(self, job_id: str) -> bool:
        """Whether ``job_id`` is here: its files on disk may not say it finished yet."""
        return job_id in self._writing or job_id in self._unsaved

    def add(self, entry: Entry) -> None:
        """Hold ``entry``, whose final status document is set, until ``write`` writes it
        (the caller holds the lock)."""
        self._writing[entry.job.id] = entry
        self._to_write.append(entry)

    def entry(self, job_id: str) -> Entry | None:
        """The job ``job_id`` while its files are being written, or None."""
        return self._writing.get(job_id)

    def writing(self) -> list[Entry]:
        """The jobs whose files are being written, in the order they finished."""
        return list(self._writing.values())

    def unsaved(self, job_id: str) -> tuple[dict, Owner] | None:
        """The final status document and owner of ``job_id``, if its files could not all be
        written; or None."""
        return self._unsaved.get(job_id)

    def write(self) -> None:
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
                    tell(waiter, entry.final)
                if not (saved and self._put_row(entry)):
                    unsaved.append(entry)
                done += 1
        finally:  # even after a bug: no job stays finishing, nobody waits for good
            with self._lock:
                for entry, count in zip(entries, told, strict=True):
                    del self._writing[entry.job.id]
                    for waiter in entry.waiters[count:]:
                        tell(waiter, entry.final)
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
            while job_id in self._writing if job_id is not None else self._writing:
                self._lock.wait()
        finally:
            self._awaiting -= 1

    def repair(self) -> None:
        """Write the status files and index rows that could not be written (the caller
        holds the lock, and the outbox takes writes again)."""
        for job_id, (document, owner) in list(self._unsaved.items()):
            try:
                self._outbox.write_status(document, folder=owner.folder)
            except OSError as exc:
                self._storage.failed(f"cannot write the status of job {job_id}: {exc}")
                return
            del self._unsaved[job_id]
            logger.info("job %s: its status file and index row are written now", job_id)

    def _save(self, entry: Entry) -> bool:
        """Write a finished job's status file; whether it worked."""
        try:
            self._outbox.write_status(entry.final, index=False, folder=entry.job.owner.folder)
        except OSError as exc:
            with self._lock:
                self._storage.failed(f"cannot write the status of job {entry.job.id}: {exc}")
            return False
        return True

    def _put_row(self, entry: Entry) -> bool:
        """Put a finished job's index row; whether it worked (the status file is the
        record)."""
        try:
            self._outbox.index.put(summary(entry.final), entry.job.owner.folder)
        except OSError as exc:
            with self._lock:
                self._storage.failed(f"cannot index job {entry.job.id}: {exc}")
            return False
        return True
