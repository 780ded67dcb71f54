"""The outbox: each job's request, kept byte for byte, its status file, and their index.

    OUTBOX/<id>.request.json   the job's durable record, written before the job is accepted
    OUTBOX/<id>.status.json    the status document, replaced atomically as the job moves
    OUTBOX/<id>.cancel         the job was cancelled (until its final status says so)
    OUTBOX/.jobs.sqlite3       the index: a row per job, for listing (imgserver.jobs.index)
    OUTBOX/.keys/              idempotency keys (imgserver.jobs.keys)
    OUTBOX/.tmp/               files being written

Files are written to ``.tmp/`` first and then renamed into place, so a reader (or a restart
after ``kill -9``) sees either the old or the new file, never half of one. A new job's id is
claimed in the index and by an empty request file made exclusively (by any number of
producers at once, in any number of processes), then its first status is written, then its
request is moved over the empty file: a job whose request is still empty was never
accepted, and a crash at any point leaves a row for every job on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgserver.jobs.index import Index
from imgserver.jobs.job import FINAL_STATES, now, summary
from imgserver.jobs.keys import IdempotencyKeys

logger = logging.getLogger("imgserver.jobs.outbox")

REQUEST_SUFFIX = ".request.json"
STATUS_SUFFIX = ".status.json"
CANCEL_SUFFIX = ".cancel"
#: How a status file (indented JSON) introduces its images, after every other key.
_IMAGES_KEY = ',\n  "images": ['
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

    def cancel_path(self, job_id: str) -> Path:
        """The marker saying ``job_id`` was cancelled, until its final status is written."""
        return self.path / (job_id + CANCEL_SUFFIX)

    # -- new jobs -----------------------------------------------------------------------

    def stage(self, body: bytes, *, lock: bool = False) -> Staged:
        """Write ``body`` to a temporary file and fsync it: the slow half of storing a new
        job's request, done before the engine's lock is taken. ``place`` finishes it; the
        ``Staged`` file must be closed (``Staged.close``) either way.

        With ``lock``, the file stays locked (flock) while its descriptor is open, which
        tells a starting server that a live process owns the job.
        """
        self.ensure()
        temp = self._temp()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        staged = Staged(temp, fd)
        try:
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            staged.close()
            raise
        return staged

    def place(self, staged: Staged, name: str | None, *, source: str) -> str:
        """Put a staged request in place as a new job's request; the job's id.

        The id is ``name``, or ``name-2``, ``name-3``... when taken; a random one without a
        name. It is claimed in the index first, then by linking the file under it, which
        fails if the name is taken (by a job the index does not know yet): a crash at any
        point leaves a row for every request on disk.
        """
        created_at = now()
        for job_id in _candidates(name):
            if self.status_path(job_id).exists():
                continue
            if not self.index.reserve(job_id, source, created_at):
                continue
            try:
                os.link(staged.path, self.request_path(job_id))
            except FileExistsError:
                self.index.remove([job_id])
                continue
            except BaseException:
                self.index.remove([job_id])
                raise
            _unlink(staged.path)
            self._sync_folder()
            return job_id
        raise AssertionError("unreachable: candidate ids are endless")

    def claim(self, source_path: Path, name: str | None, reserved: Callable[[str], None],
              max_bytes: int, *, source: str) -> tuple[str, bytes, int]:
        """Move the file ``source_path`` in as a new job's request; its id, content and size.

        The id is reserved first, then ``reserved(id)`` is called. The file is then
        hard-linked over the reservation, and its name in INBOX removed if it still is that
        file: what the job keeps and runs is exactly the file taken, even if a new one was
        renamed over the name meanwhile (that one is left for later). A link, not a rename:
        a rename out of the watched folder would hold up the watcher's next events (it waits
        to pair moves). Where a link is refused (the file belongs to another user and hard
        links are protected) it is renamed instead; from another file system it is copied,
        then removed. A server stopped between the link and the removal leaves the file
        linked twice; ``taken`` tells. At most ``max_bytes + 1`` bytes are read back.
        """
        self.ensure()
        job_id, _ = self._reserve(name, source)
        target = self.request_path(job_id)
        try:
            reserved(job_id)
            self._move_in(source_path, target)
        except BaseException:
            self.discard(job_id)
            raise
        self._sync_folder()
        with open(target, "rb") as file:
            return job_id, file.read(max_bytes + 1), os.fstat(file.fileno()).st_size

    def _reserve(self, name: str | None, source: str, *, lock: bool = False
                 ) -> tuple[str, int | None]:
        """Claim the first free id for ``name``: a row in the index, then an empty request
        file made exclusively (a job on disk that the index does not know keeps its id).

        With ``lock`` the empty file is locked while it waits for the request (a server
        starting meanwhile leaves it alone); the lock is released when the request replaces
        it, which carries its own.
        """
        created_at = now()
        for job_id in _candidates(name):
            if self.status_path(job_id).exists() or self.request_path(job_id).exists():
                continue
            if not self.index.reserve(job_id, source, created_at):
                continue
            try:
                fd = os.open(self.request_path(job_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                self.index.remove([job_id])
                continue
            if not lock:
                os.close(fd)
                return job_id, None
            fcntl.flock(fd, fcntl.LOCK_EX)
            return job_id, fd
        raise AssertionError("unreachable: candidate ids are endless")

    def _move_in(self, source: Path, target: Path) -> None:
        temp = self._temp()
        try:
            os.link(source, temp, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                self._copy_in(source, target)
            elif exc.errno in (errno.EPERM, errno.EACCES):
                os.rename(source, target)
            else:
                raise
            return
        try:
            os.replace(temp, target)
        finally:
            _unlink(temp)
        taken = os.stat(target)
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(source, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (taken.st_dev, taken.st_ino):
                os.unlink(source)

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

    def _copy_in(self, source: Path, target: Path) -> None:
        temp = self._temp()
        try:
            with open(source, "rb") as file, open(temp, "wb") as copy:
                shutil.copyfileobj(file, copy)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(temp, target)
        finally:
            _unlink(temp)
        os.unlink(source)

    # -- status, requests, removal --------------------------------------------------------

    def write_status(self, document: dict[str, Any], *, index: bool = True) -> None:
        """Replace the status file of ``document['id']`` atomically, then its index row
        (unless ``index`` is False: the caller puts the row itself, a moment later)."""
        temp = self._temp()
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
            _unlink(temp)
        if index:
            self.index.put(summary(document))
        if document["state"] in FINAL_STATES:
            _unlink(self.cancel_path(document["id"]))  # the status says it from now on

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

    def read_summary(self, job_id: str) -> dict[str, Any] | None:
        """The status document of ``job_id`` without its images, or None.

        Status files are written with the images last, so the summary is parsed from the
        text before them: a thousand-image document costs what a one-image one does.
        """
        try:
            text = self.status_path(job_id).read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
        cut = text.rfind(_IMAGES_KEY)
        try:
            if cut > 0:
                with contextlib.suppress(ValueError):
                    return json.loads(text[:cut] + "}")
            return summary(json.loads(text))
        except ValueError:
            return None

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
        self._sync_folder()

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
                         self.cancel_path(job_id)):
                _unlink(path)
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
        """
        known = self.index.ids()
        found: list[dict[str, Any]] = []
        added = 0
        for job_id in self._ids_on_disk():
            if stopping():
                self.index.add(found)
                return added + len(found)
            if job_id in known:
                continue
            document = self.read_summary(job_id)
            if document is None or document.get("state") not in FINAL_STATES:
                if self.request_path(job_id).exists() and not _locked(self.request_path(job_id)):
                    unfinished(job_id)
                continue
            if _indexable(document):
                found.append(summary(document) | {"id": job_id})
            if len(found) >= 2000:
                self.index.add(found)
                added += len(found)
                found = []
        self.index.add(found)
        self.index.scanned()
        return added + len(found)

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

    def _ids_on_disk(self) -> Iterator[str]:
        seen: set[str] = set()
        with os.scandir(self.path) as entries:
            for entry in entries:
                for suffix in (STATUS_SUFFIX, REQUEST_SUFFIX):
                    if entry.name.endswith(suffix):
                        job_id = entry.name[:-len(suffix)]
                        if job_id not in seen and valid_id(job_id):
                            seen.add(job_id)
                            yield job_id

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

    def _temp(self) -> Path:
        return self.temps / f"tmp-{secrets.token_hex(8)}"

    def _sync_folder(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Staged:
    """A request written and fsynced, waiting to be placed (``Outbox.place``)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    def detach(self) -> int:
        """The descriptor, now the caller's to close (it holds the request's lock)."""
        fd, self.fd = self.fd, None
        assert fd is not None
        return fd

    def close(self) -> None:
        """Remove the file if it was not placed, and close it unless detached."""
        _unlink(self.path)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _indexable(document: dict[str, Any]) -> bool:
    return all(isinstance(document.get(key), str) for key in ("created_at", "state", "source"))


def _candidates(name: str | None) -> Iterator[str]:
    if name is None:
        while True:
            yield uuid.uuid4().hex
    yield name
    number = 2
    while True:
        yield f"{name}-{number}"
        number += 1


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


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
