"""Housekeeping: the background work that keeps the outbox from growing for ever.

    every --keep-finished / 10 (at most an hour)   remove jobs finished longer ago than
                                                   --keep-finished (request, status, row)
    every few minutes                              temporary files left by a crash
    every hour                                     idempotency keys older than 24 hours

All of it runs on its own thread, in small batches, never holding the engine's lock while it
touches the disk: requests and images go on meanwhile. Outputs are never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from types import TracebackType

from imgserver.jobs.engine import Engine
from imgserver.jobs.job import timestamp

logger = logging.getLogger("imgserver.jobs.housekeeping")

#: Jobs removed per batch (one index transaction); the thread yields in between.
BATCH = 200
TEMP_INTERVAL = 300.0
KEYS_INTERVAL = 3600.0
#: The retention sweep runs at least this often, and at most this often.
MAX_SWEEP_INTERVAL = 3600.0
MIN_SWEEP_INTERVAL = 0.1


class Housekeeper:
    """A thread that removes expired jobs, stale temporary files and old keys."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outbox = engine.outbox
        keep = engine.settings.keep_finished
        self.sweep_interval = min(max(keep / 10, MIN_SWEEP_INTERVAL), MAX_SWEEP_INTERVAL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgserver-housekeeping",
                                        daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (between two batches) and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Housekeeper:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        due = {self.sweep: 0.0, self.remove_stale_temps: 0.0, self.forget_keys: 0.0}
        intervals = {self.sweep: self.sweep_interval, self.remove_stale_temps: TEMP_INTERVAL,
                     self.forget_keys: KEYS_INTERVAL}
        if not self.engine.settings.keep_finished:
            del due[self.sweep]
        while not self._stop.is_set():
            moment = time.monotonic()
            for task, at in due.items():
                if moment >= at:
                    self._guarded(task)
                    due[task] = time.monotonic() + intervals[task]
            self._stop.wait(max(0.0, min(due.values()) - time.monotonic()))

    def _guarded(self, task: object) -> None:
        try:
            task()  # type: ignore[operator]
        except Exception:  # one failed round must not end housekeeping: log, try next time
            logger.exception("housekeeping failed; trying again later")

    def sweep(self) -> int:
        """Remove the jobs finished more than --keep-finished ago; how many."""
        keep = self.engine.settings.keep_finished
        removed = 0
        while not self._stop.is_set():
            cutoff = timestamp(datetime.now(timezone.utc) - timedelta(seconds=keep))
            expired = self.outbox.index.expired(cutoff, BATCH)
            if not expired:
                break
            self.outbox.remove(expired)
            removed += len(expired)
        if removed:
            logger.info("removed %d jobs finished more than %s s ago (--keep-finished)",
                        removed, f"{keep:g}")
        return removed

    def remove_stale_temps(self) -> None:
        """Remove temporary files a killed process left in the outbox."""
        self.outbox.remove_stale_temps()

    def forget_keys(self) -> None:
        """Remove idempotency keys older than 24 hours."""
        self.outbox.keys.forget_expired()
