"""The outbox: each job's request, kept byte for byte, its status file, and their index.

    OUTBOX/<id>.request.json   the job's durable record, written before the job is accepted
    OUTBOX/<id>.status.json    the status document, replaced atomically as the job moves
    OUTBOX/<id>.cancel         the job was cancelled (until its final status says so)
    OUTBOX/<id>.owner.json     whom the job is for (a token's name, its folder), when it is
                               for a token: there before the request, so that a restart
                               resolves the job's paths in the right folder
    OUTBOX/.jobs.sqlite3       the index: a row per job, for listing (imgserver.jobs.index),
                               rebuilt from the files above when lost (imgserver.jobs.rescan)
    OUTBOX/.keys/              idempotency keys (imgserver.jobs.keys)
    OUTBOX/.tmp/               files being written

Files are written to ``.tmp/`` first and then renamed into place, so a reader (or a restart
after ``kill -9``) sees either the old or the new file, never half of one. How a new job's
request comes in, under an id of its own, is ``imgserver.jobs.arrivals``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from imgserver.jobs.index import Index
from imgserver.jobs.job import FINAL_STATES, Owner, summary
from imgserver.jobs.keys import IdempotencyKeys

logger = logging.getLogger("imgserver.jobs.outbox")

REQUEST_SUFFIX = ".request.json"
STATUS_SUFFIX = ".status.json"
CANCEL_SUFFIX = ".cancel"
OWNER_SUFFIX = ".owner.json"
#: Temporary files older than this (seconds) are left over from a crash.
STALE_TEMP = 60.0
_NOT_IN_IDS = re.compile(r"[\x00-\x1f\x7f/]")


def valid_id(job_id: str) -> bool:
    """Whether ``job_id`` can name a job (a file name that is not hidden, without control
    characters)."""
    return (0 < len(job_id) <= 200 and not job_id.startswith(".")
            and _NOT_IN_IDS.search(job_id) is None)


def job_name(stem: str) -> str | None:
    """A job id made from a file's stem (``holiday`` for holiday.json); None if none fits.

    Leading dots are dropped (ids are never hidden files) and the name is cut to 200 bytes,
    so that ``<id>.request.json`` and a ``-<n>`` suffix fit in a file name.
    """
    # A file name that is not UTF-8 reaches us with surrogates: keep what can be encoded.
    name = stem.lstrip(".").encode("utf-8", "replace")[:200].decode("utf-8", "ignore")
    return name if valid_id(name) else None


class Outbox:
    """The folder of request and status files, and the index over them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = Index(path)
        self.keys = IdempotencyKeys(path / ".keys")
        self.temps = path / ".tmp"
        self._folder_sync = FolderSync(path)
        # Temporary names: this outbox's own random part, then a count (no system call for
        # randomness per file, and still apart from another process's names).
        self._temp_prefix = f"tmp-{secrets.token_hex(8)}-"
        self._temp_count = itertools.count()

    def open(self) -> None:
        """Create the folder if needed and open the index."""
        self.ensure()
        self.index.open()

    def close(self) -> None:
        """Close the index (cleanly: the next start needs no scan)."""
        self.index.close()

    def ensure(self) -> None:
        """Create the folder (and its folder of temporary files) if they do not exist."""
        self.temps.mkdir(parents=True, exist_ok=True)

    def request_path(self, job_id: str) -> Path:
        """Where the request of ``job_id`` is kept."""
        return self.path / (job_id + REQUEST_SUFFIX)

    def status_path(self, job_id: str) -> Path:
        """Where the status document of ``job_id`` is kept."""
        return self.path / (job_id + STATUS_SUFFIX)

    def owner_path(self, job_id: str) -> Path:
        """Where whom ``job_id`` is for is kept (when it is for a token)."""
        return self.path / (job_id + OWNER_SUFFIX)

    def read_owner(self, job_id: str) -> Owner:
        """Whom ``job_id`` is for, as kept beside its request; the root's default when
        nothing is kept."""
        try:
            with open(self.owner_path(job_id), encoding="utf-8") as file:
                kept = json.load(file)
            return Owner(str(kept.get("name", "")), str(kept.get("folder", "")))
        except FileNotFoundError:
            return Owner()
        except (OSError, ValueError, AttributeError) as exc:
            # Never the root by mistake: a job whose owner cannot be read is nobody's.
            raise OSError(f"cannot read the owner of job {job_id}: {exc}") from None

    def cancel_path(self, job_id: str) -> Path:
        """The marker saying ``job_id`` was cancelled, until its final status is written."""
        return self.path / (job_id + CANCEL_SUFFIX)

    def taken(self, info: os.stat_result) -> bool:
        """Whether a file with this ``os.stat`` result is already a job's request."""
        if info.st_nlink < 2:
            return False
        for request in self.path.glob("*" + REQUEST_SUFFIX):
            with contextlib.suppress(OSError):
                found = request.stat()
                if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                    return True
        return False

    # -- status, requests, removal --------------------------------------------------------

    def write_status(self, document: dict[str, Any], *, index: bool = True,
                     folder: str = "") -> None:
        """Replace the status file of ``document['id']`` atomically, then its index row
        (unless ``index`` is False: the caller puts the row itself, a moment later);
        ``folder`` is the job's, should its row be new."""
        data = status_json(document)
        temp, fd = self.create_temp()
        try:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(temp, self.status_path(document["id"]))
        except BaseException:
            unlink(temp)
            raise
        if index:
            self.index.put(summary(document), folder)
        if document["state"] in FINAL_STATES:
            unlink(self.cancel_path(document["id"]))  # the status says it from now on

    def read_status(self, job_id: str) -> dict[str, Any] | None:
        """The status document of ``job_id``, or None if it has none (or the id is invalid)."""
        if not valid_id(job_id):
            return None
        try:
            with open(self.status_path(job_id), encoding="utf-8") as file:
                return json.load(file)
        except (OSError, ValueError):
            return None

    def keyed(self, key: str) -> tuple[str, bytes] | None:
        """The job the idempotency ``key`` made in the last 24 hours and its request; None
        if there is none, or its request is not kept (never stored, or removed since)."""
        job_id = self.keys.lookup(key)
        if job_id is None:
            return None
        try:
            return job_id, self.read_request(job_id)
        except OSError:
            return None

    def note_delivery(self, job_id: str, index: int, notification: dict[str, Any]) -> None:
        """Replace the job's notification ``index`` in its status file (a webhook's
        progress); nothing if the file is gone (--keep-finished removed it meanwhile)."""
        document = self.read_status(job_id)
        if document is None or index >= len(document.get("notifications", [])):
            return
        document["notifications"][index] = notification
        self.write_status(document)

    def read_request(self, job_id: str) -> bytes:
        """The request of ``job_id``, byte for byte."""
        return self.request_path(job_id).read_bytes()

    def request_cancel(self, job_id: str) -> None:
        """Record, durably, that ``job_id`` is cancelled: a restart must not resume it."""
        fd = os.open(self.cancel_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.sync_folder()

    def cancel_requested(self, job_id: str) -> bool:
        """Whether ``job_id`` was cancelled before its final status was written."""
        return self.cancel_path(job_id).exists()

    def discard(self, job_id: str) -> None:
        """Remove the files of a job that never was (an id reserved, then not used)."""
        self.remove([job_id])

    def remove(self, job_ids: list[str]) -> None:
        """Remove the request, status and index row of each job (its outputs stay)."""
        for job_id in job_ids:
            for path in (self.status_path(job_id), self.request_path(job_id),
                         self.cancel_path(job_id), self.owner_path(job_id)):
                unlink(path)
        self.index.remove(job_ids)

    # -- the index ----------------------------------------------------------------------

    def unfinished(self) -> list[str]:
        """Ids of jobs whose request is kept but whose status is not final, oldest first.

        A job whose request file is locked belongs to a live ``imgserver run``; it is left
        to that process.
        """
        return [job_id for job_id in self.index.unfinished()
                if not locked(self.request_path(job_id))]

    def remove_stale_temps(self) -> None:
        """Remove temporary files older than ``STALE_TEMP``: a killed process left them (a
        live one's are seconds old at most)."""
        cutoff = time.time() - STALE_TEMP
        with contextlib.suppress(FileNotFoundError), os.scandir(self.temps) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    # -- plumbing -----------------------------------------------------------------------

    def temp_path(self) -> Path:
        """A new name for a file being written (in ``.tmp/``)."""
        return self.temps / f"{self._temp_prefix}{next(self._temp_count)}"

    def create_temp(self) -> tuple[Path, int]:
        """A new temporary file (``temp_path``) and its descriptor, open for writing."""
        temp = self.temp_path()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return temp, os.open(temp, flags, 0o644)
        except FileNotFoundError:  # its folder is made at start, and again only if it went
            self.ensure()
            return temp, os.open(temp, flags, 0o644)

    def sync_folder(self) -> None:
        """Make the folder's entries durable (renames and links into it): once this returns,
        every entry made before it was called is on disk. Threads that ask at once share an
        fsync (``FolderSync``)."""
        self._folder_sync()


class FolderSync:
    """fsync of a folder, shared by the threads that need one at the same moment (group
    commit): a caller returns once an fsync that began after its call has ended.

    While one fsync runs, the callers that arrive wait for it, then one of them runs the
    next for all of them: under load, many new jobs are made durable by one fsync instead
    of one each, and none waits for more than the one running and its own.
    """

    def __init__(self, path: Path) -> None:
        """A sync of the folder ``path``."""
        self._path = path
        self._cond = threading.Condition(threading.Lock())
        self._begun = 0   # fsyncs begun (the number of the last one)
        self._ended = 0   # the number of the last fsync that ended
        self._running = False
        self._failed: dict[int, OSError] = {}  # recent fsyncs that failed, by number

    def __call__(self) -> None:
        """Return once an fsync begun after this call has ended; its OSError if it failed."""
        with self._cond:
            ticket = self._begun + 1  # the one running (if any) began before this call
            while self._ended < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._begun += 1
                number = self._begun
                self._cond.release()
                error: OSError | None = None
                try:
                    error = _fsync_folder(self._path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._ended = number
                    if error is not None:
                        self._failed[number] = error
                    for old in [key for key in self._failed if key < number - 64]:
                        del self._failed[old]  # waiters of those have long seen them
                    self._cond.notify_all()
            error = self._failed.get(ticket)
        if error is not None:
            raise error


def _fsync_folder(path: Path) -> OSError | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    return None


def locked(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock (a job's request, while it runs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unlink(path: Path) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def status_json(document: dict[str, Any]) -> bytes:
    """A status document as its file holds it: a key per line, an image per line.

    Written by the C encoder a value at a time (an indented ``json.dumps`` runs in Python,
    several times slower); the images come last, so that a scan reads a job's summary from
    the head of the file without parsing them.
    """
    keys = [f"  {_encode(key)}: {_encode(value)}" for key, value in document.items()
            if key != "images"]
    if "images" in document:
        images = ",\n".join(f"    {_encode(image)}" for image in document["images"])
        keys.append(f'  "images": [\n{images}\n  ]' if images else '  "images": []')
    return ("{\n" + ",\n".join(keys) + "\n}\n").encode()


_encode = json.JSONEncoder(ensure_ascii=True).encode
