"""A Future that also says when its task starts: the executors' futures for images that may
wait inside the executor (queued ahead of a worker, or in a Dask batch), so that an image's
time limit starts with the image, not with its hand-over."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

logger = logging.getLogger("imgserver.executors.started")


class HeldFuture(Future):
    """The Future of an image that may wait in a batch: it says when the image starts."""

    def __init__(self) -> None:
        super().__init__()
        self._start_lock = threading.Lock()
        self._started_at: float | None = None
        self._on_start: list[Callable[[Future, float], None]] = []

    def add_start_callback(self, fn: Callable[[Future, float], None]) -> None:
        """Call ``fn(self, moment)`` when the image starts (at once if it has)."""
        with self._start_lock:
            if self._started_at is None:
                self._on_start.append(fn)
                return
            moment = self._started_at
        fn(self, moment)

    def mark_started(self, moment: float) -> None:
        """The image started at ``moment`` (time.monotonic): the future is running."""
        with self._start_lock:
            if self._started_at is not None:
                return
            self._started_at = moment
            callbacks, self._on_start = self._on_start, []
        try:
            self.set_running_or_notify_cancel()
        except RuntimeError:  # already ended (its batch was given up on)
            return
        for fn in callbacks:
            try:
                fn(self, moment)
            except Exception:
                logger.exception("a start callback failed")
