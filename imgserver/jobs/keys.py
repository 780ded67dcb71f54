"""Idempotency keys: a POST /jobs retried with the same ``Idempotency-Key`` gets the first
job instead of a second one.

    OUTBOX/.keys/<sha256 of the key>  ->  <job id>       (a symbolic link, made atomically)

A link's target is the job id and its own time is when the key was used, so a key needs no
index and survives a restart and a rebuilt index alike. The link is made before the job's
request is stored: a server killed in between leaves a link to a job that does not exist,
which counts as no link, so the retry creates the job. Links older than ``TTL`` no longer
count and are removed by the housekeeping thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from pathlib import Path

from imgserver.errors import RequestError

#: How long a key stands for its job (seconds): 24 hours.
TTL = 24 * 3600.0
HEADER = "Idempotency-Key"
#: What ``check_key`` accepts, as a regular expression (for the API's schema).
PATTERN = "^[!-~]{1,255}$"


def check_key(key: str) -> str:
    """``key`` if it is 1-255 visible ASCII characters; RequestError naming the header."""
    if not 1 <= len(key) <= 255 or not all("!" <= char <= "~" for char in key):
        raise RequestError.single(HEADER, f"{key[:300]!r} is not 1 to 255 visible ASCII "
                                          f"characters")
    return key


class IdempotencyKeys:
    """The keys used in the last 24 hours, each bound to the job it created."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _link(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> str | None:
        """The id of the job ``key`` was used for within ``TTL``, or None."""
        link = self._link(key)
        try:
            if time.time() - os.lstat(link).st_mtime > TTL:
                return None
            return os.readlink(link)
        except (FileNotFoundError, OSError):
            return None

    def bind(self, key: str, job_id: str) -> None:
        """Bind ``key`` to ``job_id``, durably, replacing an older binding."""
        self.folder.mkdir(parents=True, exist_ok=True)
        link = self._link(key)
        temp = self.folder / f".tmp-{secrets.token_hex(8)}"
        os.symlink(job_id, temp)
        try:
            os.replace(temp, link)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def forget_expired(self) -> int:
        """Remove the links older than ``TTL``; how many were removed."""
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        cutoff = time.time() - TTL
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed
