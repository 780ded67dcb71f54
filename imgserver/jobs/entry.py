"""A job the engine is working on, and the futures of those waiting for it to end."""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field

from imgserver.jobs.job import Job


@dataclass(eq=False)
class Entry:
    """A job the engine is working on."""

    job: Job
    lock_fd: int | None = None  # holds the request's lock (``imgserver run``)
    dirty: bool = False         # changed since its status file was written
    written_at: float = 0.0
    waiters: list[Future] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # its final status document, once finished

    def release(self) -> None:
        """Let go of the request's lock, if held."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def tell(waiter: Future, document: dict | None = None, error: BaseException | None = None
         ) -> None:
    """Resolve ``waiter`` to ``document``, or to ``error``; not if it was given up on
    (cancelled: a route that stopped waiting)."""
    if waiter.set_running_or_notify_cancel():
        if error is None:
            waiter.set_result(document)
        else:
            waiter.set_exception(error)
