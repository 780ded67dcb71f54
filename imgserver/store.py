"""The outbox: each job's request, kept byte for byte, and its status file.

    OUTBOX/<id>.request.json   the job's durable record, written before the job is accepted
    OUTBOX/<id>.status.json    the status document, replaced atomically as the job moves

Both are written to a temporary file first and then linked or renamed into place, so a
reader (or a restart after ``kill -9``) sees either the old or the new file, never half of
one. A request file is linked into place, which fails if the name is taken: that is how an
id is claimed, by any number of producers at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgserver.job import FINAL_STATES

REQUEST_SUFFIX = ".request.json"
STATUS_SUFFIX = ".status.json"


def valid_id(job_id: str) -> bool:
    """Whether ``job_id`` can name a job (a file name that is not hidden)."""
    return (0 < len(job_id) <= 200 and not job_id.startswith(".") and "/" not in job_id
            and all(ord(char) >= 32 and ord(char) != 127 for char in job_id))


def job_name(stem: str) -> str | None:
    """A job id made from a file's stem (``holiday`` for holiday.json); None if none fits.

    Leading dots are dropped (ids are never hidden files) and the name is cut to 200 bytes,
    so that ``<id>.request.json`` and a ``-<n>`` suffix fit in a file name.
    """
    # A file name that is not UTF-8 reaches us with surrogates: keep what can be encoded.
    name = stem.lstrip(".").encode("utf-8", "replace")[:200].decode("utf-8", "ignore")
    return name if valid_id(name) else None


class Outbox:
    """The folder of request and status files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the folder if it does not exist."""
        self.path.mkdir(parents=True, exist_ok=True)

    def request_path(self, job_id: str) -> Path:
        """Where the request of ``job_id`` is kept."""
        return self.path / (job_id + REQUEST_SUFFIX)

    def status_path(self, job_id: str) -> Path:
        """Where the status document of ``job_id`` is kept."""
        return self.path / (job_id + STATUS_SUFFIX)

    def create(self, body: bytes, name: str | None = None, *, lock: bool = False
               ) -> tuple[str, int | None]:
        """Store ``body`` as a new job's request; return its id (and a lock fd if asked).

        The id is ``name``, or ``name-2``, ``name-3``... when taken; a random one without a
        name. With ``lock``, the request file stays locked (flock) until the fd is closed,
        which tells a starting server that a live process owns the job.
        """
        self.ensure()
        temp = self._temp()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            with open(fd, "wb", closefd=False) as file:
                file.write(body)
            os.fsync(fd)
            job_id = self._link(temp, name)
        except BaseException:
            os.close(fd)
            raise
        finally:
            _unlink(temp)
        if not lock:
            os.close(fd)
            return job_id, None
        return job_id, fd

    def claim(self, source: Path, name: str | None, reserved: Callable[[str], None],
              max_bytes: int) -> tuple[str, bytes, int]:
        """Move the file ``source`` in as a new job's request; its id, content and size.

        The id is reserved first (an empty request file made exclusively, then
        ``reserved(id)``). The file is then hard-linked over the reservation, and its name
        in INBOX removed if it still is that file: what the job keeps and runs is exactly
        the file taken, even if a new one was renamed over the name meanwhile (that one is
        left for later). A link, not a rename: a rename out of the watched folder would
        hold up the watcher's next events (it waits to pair moves). Where a link is refused
        (the file belongs to another user and hard links are protected) it is renamed
        instead; from another file system it is copied, then removed. A server stopped
        between the link and the removal leaves the file linked twice; ``taken`` tells.
        At most ``max_bytes + 1`` bytes are read back.
        """
        self.ensure()
        job_id = self._reserve(name)
        target = self.request_path(job_id)
        try:
            reserved(job_id)
            self._move_in(source, target)
        except BaseException:
            self.discard(job_id)
            raise
        self._sync_folder()
        with open(target, "rb") as file:
            return job_id, file.read(max_bytes + 1), os.fstat(file.fileno()).st_size

    def _reserve(self, name: str | None) -> str:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return self._allocate(name, lambda target: os.close(os.open(target, flags, 0o644)))

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
            now = os.stat(source, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (taken.st_dev, taken.st_ino):
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

    def discard(self, job_id: str) -> None:
        """Remove the files of a job that never was (an id reserved, then not used)."""
        _unlink(self.request_path(job_id))
        _unlink(self.status_path(job_id))

    def _link(self, source: Path, name: str | None) -> str:
        job_id = self._allocate(name, lambda target: os.link(source, target))
        self._sync_folder()
        return job_id

    def _allocate(self, name: str | None, make: Callable[[Path], None]) -> str:
        """The first free id for ``name``: ``make(request path)`` claims it or raises
        FileExistsError (taken meanwhile, by another producer)."""
        for job_id in self._candidates(name):
            if self.status_path(job_id).exists():
                continue
            try:
                make(self.request_path(job_id))
            except FileExistsError:
                continue
            return job_id
        raise AssertionError("unreachable: candidate ids are endless")

    @staticmethod
    def _candidates(name: str | None) -> Iterator[str]:
        if name is None:
            while True:
                yield uuid.uuid4().hex
        yield name
        number = 2
        while True:
            yield f"{name}-{number}"
            number += 1

    def write_status(self, document: dict[str, Any]) -> None:
        """Replace the status file of ``document['id']`` atomically."""
        temp = self._temp()
        try:
            with open(temp, "w", encoding="utf-8") as file:
                json.dump(document, file, indent=2)
                file.write("\n")
            os.replace(temp, self.status_path(document["id"]))
        finally:
            _unlink(temp)

    def read_status(self, job_id: str) -> dict[str, Any] | None:
        """The status document of ``job_id``, or None if it has none (or the id is invalid)."""
        if not valid_id(job_id):
            return None
        try:
            with open(self.status_path(job_id), encoding="utf-8") as file:
                return json.load(file)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            return None

    def read_request(self, job_id: str) -> bytes:
        """The request of ``job_id``, byte for byte."""
        return self.request_path(job_id).read_bytes()

    def unfinished(self) -> list[str]:
        """Ids of jobs whose request is kept but whose status is not final, oldest first.

        A job whose request file is locked belongs to a live ``imgserver run``; it is left
        to that process.
        """
        if not self.path.is_dir():
            return []
        found: list[tuple[float, str]] = []
        for request in self.path.glob("*" + REQUEST_SUFFIX):
            job_id = request.name[:-len(REQUEST_SUFFIX)]
            if not valid_id(job_id):
                continue
            status = self.read_status(job_id)
            if status is not None and status.get("state") in FINAL_STATES:
                continue
            if _locked(request):
                continue
            with contextlib.suppress(OSError):
                found.append((request.stat().st_mtime, job_id))
        return [job_id for _, job_id in sorted(found)]

    def _temp(self) -> Path:
        return self.path / f".tmp-{secrets.token_hex(8)}"

    def _sync_folder(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
