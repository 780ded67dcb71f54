"""Whether the outbox takes writes, found out again by itself once it did not.

A write that fails (a full disk, a folder made read-only) is noted where it happens: by the
intake, when a request cannot be stored; by the ledger, when a status file or an index row
cannot be written. From then on /healthz says why, and every PROBE_INTERVAL the engine
thread writes a small file into the outbox and syncs it (``probe``). Once that works, the
problem is cleared and the ledger writes what it could not: health returns without any
request having to succeed first, and no job's listing disagrees with its status file.
"""

from __future__ import annotations

import logging
import os
import time

from imgserver.jobs.outbox import Outbox, unlink

logger = logging.getLogger("imgserver.jobs.storage")

#: While a write has failed, the outbox is tried again this often (seconds).
PROBE_INTERVAL = 5.0


class Storage:
    """The outbox's health: the last write problem, and when to try again."""

    def __init__(self, outbox: Outbox) -> None:
        """The health of ``outbox``'s storage."""
        self.outbox = outbox
        self.problem: str | None = None  # why the outbox cannot be written, while it cannot
        self._due = 0.0

    def failed(self, problem: str) -> None:
        """A write failed (``problem`` says which and why): probe from now on."""
        if self.problem is None:
            logger.error("%s; trying again every %g s", problem, PROBE_INTERVAL)
        self.problem = problem
        self._due = time.monotonic() + PROBE_INTERVAL

    def succeeded(self) -> None:
        """A write of new work went through: the outbox takes writes."""
        self.problem = None

    def next_probe(self) -> float | None:
        """When (``time.monotonic``) to probe next; None while nothing failed."""
        return self._due if self.problem is not None else None

    def probe(self) -> bool:
        """Whether the outbox takes writes again, if it is time to find out (a small file
        written, synced and removed); True once it does."""
        if self.problem is None:
            return True
        if time.monotonic() < self._due:
            return False
        path = self.outbox.temp_path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._due = time.monotonic() + PROBE_INTERVAL
            logger.debug("the outbox still cannot be written: %s", exc)
            return False
        finally:
            unlink(path)
        logger.info("the outbox %s takes writes again", self.outbox.path)
        self.problem = None
        return True
