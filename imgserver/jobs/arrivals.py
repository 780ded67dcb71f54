"""Arrivals: a new job's request comes into the outbox under an id of its own, durably,
exactly once, whatever else arrives at the same moment.

    over HTTP, or from ``imgserver run``:
        stage (write + fsync a temporary file, before the engine's lock is taken)
        -> place: an id claimed in the index, the file linked under it (holding the lock)
        -> the folder synced, one fsync shared by the requests placed meanwhile (after
           the lock, before the answer)
    from the drop folder:
        claim: an id reserved (index row + an empty request file made exclusively),
        -> the INBOX file linked over the reservation, then unlinked from INBOX

A new job's id is claimed in the index and on disk by any number of producers at once, in
any number of processes: a job whose request is still empty was never accepted, and a
crash at any point leaves a row for every job on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from imgserver.jobs.job import Owner, now
from imgserver.jobs.outbox import Outbox, unlink, write_all


class Arrivals:
    """Brings new jobs' requests into an outbox."""

    def __init__(self, outbox: Outbox) -> None:
        """Arrivals into ``outbox``."""
        self.outbox = outbox

    def stage(self, body: bytes, *, lock: bool = False, owner: Owner | None = None) -> Staged:
        """Write ``body`` to a temporary file and fsync it: the slow half of storing a new
        job's request, done before the engine's lock is taken. ``place`` finishes it; the
        ``Staged`` file must be closed (``Staged.close``) either way.

        With ``lock``, the file stays locked (flock) while its descriptor is open, which
        tells a starting server that a live process owns the job. An ``owner`` that must be
        kept (a token's job) is staged beside it, to be placed first.
        """
        temp, fd = self.outbox.create_temp()
        staged = Staged(temp, fd)
        try:
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, body)
            os.fsync(fd)
            if owner is not None and owner.kept:
                kept = json.dumps({"name": owner.name, "folder": owner.folder}).encode()
                staged.owner, owner_fd = self.outbox.create_temp()
                try:
                    write_all(owner_fd, kept)
                    os.fsync(owner_fd)
                finally:
                    os.close(owner_fd)
        except BaseException:
            staged.close()
            raise
        return staged

    def place(self, staged: Staged, name: str | None, *, source: str, folder: str = "") -> str:
        """Put a staged request in place as a new job's request; the job's id.

        The id is ``name``, or ``name-2``, ``name-3``... when taken; a random one without a
        name. It is claimed in the index first, then by linking the file under it, which
        fails if the name is taken (by a job the index does not know yet): a crash at any
        point leaves a row for every request on disk. A staged owner is linked before the
        request: a request on disk always has its owner beside it. The link is durable once
        the outbox's folder is synced (``Outbox.sync_folder``), which the caller does before
        it answers anyone, outside its lock: concurrent requests share that fsync.
        """
        created_at = now()
        for job_id in _candidates(name):
            if name is not None and self.outbox.status_path(job_id).exists():
                continue  # a name taken (a random id is a fresh uuid4: no file has it)
            if not self.outbox.index.reserve(job_id, source, created_at, folder):
                continue
            owner: Path | None = None  # the owner file linked for it, to undo on failure
            try:
                if staged.owner is not None:
                    os.link(staged.owner, self.outbox.owner_path(job_id))  # fails if taken
                    owner = self.outbox.owner_path(job_id)
                os.link(staged.path, self.outbox.request_path(job_id))
            except BaseException as exc:
                if owner is not None:
                    unlink(owner)
                self.outbox.index.remove([job_id])
                if isinstance(exc, FileExistsError):
                    continue
                raise
            unlink(staged.path)
            staged.linked = True
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
        self.outbox.ensure()
        job_id, _ = self._reserve(name, source)
        target = self.outbox.request_path(job_id)
        try:
            reserved(job_id)
            self._move_in(source_path, target)
        except BaseException:
            self.outbox.discard(job_id)
            raise
        self.outbox.sync_folder()
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
            outbox = self.outbox
            if outbox.status_path(job_id).exists() or outbox.request_path(job_id).exists():
                continue
            if not self.outbox.index.reserve(job_id, source, created_at):
                continue
            try:
                fd = os.open(self.outbox.request_path(job_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                self.outbox.index.remove([job_id])
                continue
            if not lock:
                os.close(fd)
                return job_id, None
            fcntl.flock(fd, fcntl.LOCK_EX)
            return job_id, fd
        raise AssertionError("unreachable: candidate ids are endless")

    def _move_in(self, source: Path, target: Path) -> None:
        temp = self.outbox.temp_path()
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
            unlink(temp)
        taken = os.stat(target)
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(source, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (taken.st_dev, taken.st_ino):
                os.unlink(source)

    def _copy_in(self, source: Path, target: Path) -> None:
        temp = self.outbox.temp_path()
        try:
            with open(source, "rb") as file, open(temp, "wb") as copy:
                shutil.copyfileobj(file, copy)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(temp, target)
        finally:
            unlink(temp)
        os.unlink(source)


class Staged:
    """A request written and fsynced, waiting to be placed (``Outbox.place``)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        self.owner: Path | None = None  # whom the job is for, staged beside it
        self.linked = False  # placed: its name in the outbox's temporary files is gone

    def detach(self) -> int:
        """The descriptor, now the caller's to close (it holds the request's lock)."""
        fd, self.fd = self.fd, None
        assert fd is not None
        return fd

    def close(self) -> None:
        """Remove the files if they were not placed, and close it unless detached."""
        if not self.linked:
            unlink(self.path)
        if self.owner is not None:
            unlink(self.owner)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _candidates(name: str | None) -> Iterator[str]:
    if name is None:
        while True:
            yield uuid.uuid4().hex
    yield name
    number = 2
    while True:
        yield f"{name}-{number}"
        number += 1
