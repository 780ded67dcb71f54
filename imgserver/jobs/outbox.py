"""The outbox: each job's request, kept byte for byte, its status file, and their index.

    OUTBOX/<id>.request.json   the job's durable record, written before the job is accepted
    OUTBOX/<id>.status.json    the status document, replaced atomically as the job moves
    OUTBOX/<id>.cancel         the job was cancelled (until its final status says so)
    OUTBOX/<id>.owner.json     whom the job is for (a token's name, its folder), when it is
                               for a token: there before the request, so that a restart
                               resolves the job's paths in the right folder
    OUTBOX/.jobs.sqlite3       the index: a row per job, for listing (imgserver.jobs.index)
    OUTBOX/.keys/              idempotency keys (imgserver.jobs.keys)
    OUTBOX/.tmp/               files being written

Files are written to ``.tmp/`` first and then renamed into place, so a reader (or a restart
after ``kill -9``) sees either the old or the new file, never half of one. How a new job's
request comes in, under an id of its own, is ``imgserver.jobs.arrivals``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imgserver.jobs.index import BATCH, Index
from imgserver.jobs.job import FINAL_STATES, Owner, summary
from imgserver.jobs.keys import IdempotencyKeys

logger = logging.getLogger("imgserver.jobs.outbox")

REQUEST_SUFFIX = ".request.json"
STATUS_SUFFIX = ".status.json"
CANCEL_SUFFIX = ".cancel"
OWNER_SUFFIX = ".owner.json"
#: How a status file (indented JSON) introduces its images, after every other key.
_IMAGES_KEY = b',\n  "images": ['
#: The bytes of a status file read first for its summary (a few hundred are enough).
_HEAD = 4096
#: A scan adding at least this many rows, and more than the index has, loads them in bulk.
BULK_SCAN = 5000
#: Threads reading status files for a scan, besides the one writing their rows.
READERS = 2
T = TypeVar("T")
R = TypeVar("R")
#: A status file read for its summary: the summary and its JSON text, or None (unreadable).
_Read = tuple[dict[str, Any], str | None] | None
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
        temp = self.temp_path()
        data = (json.dumps(document, indent=2) + "\n").encode()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(temp, self.status_path(document["id"]))
        finally:
            unlink(temp)
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
                if not _locked(self.request_path(job_id))]

    def scan(self, unfinished: Callable[[str], None],
             stopping: Callable[[], bool] = lambda: False) -> int:
        """Give every job on disk without a row in the index its row; call ``unfinished(id)``
        for each of those not final. How many rows were added.

        Stops early when ``stopping()`` says so; the index then stays marked incomplete and
        the next start scans again.

        The jobs are read in the order of their ids, so that each batch of rows extends the
        index's table at its end. Many rows for an index that has few (a new one, or one
        rebuilt) go in without the indexes over the table, made once at the end
        (``Index.bulk``).
        """
        known = self.index.ids()
        on_disk, owned = self._ids_on_disk()
        missing = sorted(on_disk - known)
        bulk = len(missing) >= max(BULK_SCAN, len(known))
        del known
        added = 0
        with contextlib.ExitStack() as stack:
            folder = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, folder)
            if bulk:
                stack.enter_context(self.index.bulk())
            batches = (missing[start:start + BATCH] for start in range(0, len(missing), BATCH))

            def read(ids: list[str]) -> list[tuple[_Read, str]]:
                return [(_read_summary(job_id + STATUS_SUFFIX, folder),
                         self._folder_of(job_id) if job_id in owned else "")
                        for job_id in ids]

            read_batches: Generator[tuple[list[str], list[tuple[_Read, str]]], None, None]
            if READERS:
                pool = stack.enter_context(ThreadPoolExecutor(
                    READERS, thread_name_prefix="imgserver-index-read"))
                read_batches = _ahead(pool, read, batches, READERS + 1)
            else:
                read_batches = ((ids, read(ids)) for ids in batches)
            stack.callback(read_batches.close)  # a scan stopped early reads no further
            for ids, documents in read_batches:
                if stopping():
                    return added
                found: list[tuple[dict[str, Any], str | None, str]] = []
                for job_id, (read_back, owner_folder) in zip(ids, documents, strict=True):
                    document, text = read_back or ({}, None)
                    if document.get("state") not in FINAL_STATES:
                        request = self.request_path(job_id)
                        if request.exists() and not _locked(request):
                            unfinished(job_id)
                        continue
                    if _indexable(document):
                        if document.get("id") != job_id:  # the file's name says
                            document["id"], text = job_id, None
                        found.append((document, text, owner_folder))
                self.index.add(found)
                added += len(found)
        self.index.scanned()
        return added

    def rebuild(self, unfinished: Callable[[str], None], stopping: Callable[[], bool]) -> None:
        """``scan``, logged (a thread of its own at start, when the index needs it): a
        failure leaves listing unavailable until the next start tries again."""
        started = time.monotonic()
        logger.info("building the job index from the files in %s", self.path)
        try:
            added = self.scan(unfinished, stopping)
        except Exception:
            logger.exception("cannot build the job index; listing jobs stays unavailable")
            return
        if not self.index.needs_scan:
            logger.info("job index built: %d jobs added in %.1f s", added,
                        time.monotonic() - started)

    def _ids_on_disk(self) -> tuple[set[str], set[str]]:
        """The id of every job with a request or status file; and those kept with an
        owner."""
        ids: set[str] = set()
        owned: set[str] = set()
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(STATUS_SUFFIX):
                    ids.add(name[:-len(STATUS_SUFFIX)])
                elif name.endswith(REQUEST_SUFFIX):
                    ids.add(name[:-len(REQUEST_SUFFIX)])
                elif name.endswith(OWNER_SUFFIX):
                    owned.add(name[:-len(OWNER_SUFFIX)])
        return {job_id for job_id in ids if valid_id(job_id)}, owned

    def _folder_of(self, job_id: str) -> str:
        """The folder of a job kept with an owner; a job whose owner cannot be read is
        listed under a folder nobody has ("?"), never the root."""
        try:
            return self.read_owner(job_id).folder
        except OSError:
            return "?"

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
        return self.temps / f"tmp-{secrets.token_hex(8)}"

    def sync_folder(self) -> None:
        """Make the folder's entries durable (renames and links into it)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_summary(name: str, folder: int) -> _Read:
    """The status document in the file ``name`` (relative to the open folder ``folder``)
    without its images, and its JSON text when that was at hand; None if the file cannot be
    read or holds no document.

    Only the file's head is read and parsed when the images' key is in it: the status files
    written here have the images last, and the summary before them in a few hundred bytes.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    try:
        data = os.read(fd, _HEAD)
        cut = data.find(_IMAGES_KEY)
        if cut < 0:  # a long summary, or a file written otherwise: all of it
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
            cut = data.find(_IMAGES_KEY)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Decoded here: json.loads is twice as slow on bytes (it guesses their encoding).
    with contextlib.suppress(ValueError):
        if cut > 0:
            with contextlib.suppress(ValueError):
                text = data[:cut].decode() + "}"
                head = json.loads(text)
                if isinstance(head, dict):
                    return head, text
        document = json.loads(data.decode())
        if isinstance(document, dict):
            return summary(document), None
    return None


def _ahead(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Iterable[T],
           ahead: int) -> Generator[tuple[T, R], None, None]:
    """``(item, work(item))`` for each of ``items`` in order, ``work`` done on ``pool`` for
    at most ``ahead`` items ahead of the one given."""
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()
    try:
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) > ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def _indexable(document: dict[str, Any]) -> bool:
    return all(isinstance(document.get(key), str) for key in ("created_at", "state", "source"))


def _locked(path: Path) -> bool:
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


def unlink(path: Path) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
