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
import fcntl
import json
import os
import secrets
import uuid
from collections.abc import Iterator
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
    name = stem.lstrip(".").encode()[:200].decode("utf-8", "ignore")
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

    def adopt(self, source: Path, name: str | None) -> str:
        """Move ``source`` (a file on the same file system) to a new job's request; its id."""
        self.ensure()
        job_id = self._link(source, name)
        os.unlink(source)
        self._sync_folder()
        return job_id

    def _link(self, source: Path, name: str | None) -> str:
        for job_id in self._candidates(name):
            if self.status_path(job_id).exists():
                continue
            try:
                os.link(source, self.request_path(job_id))
            except FileExistsError:
                continue
            self._sync_folder()
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
