"""What the engine tells its subscribers (``Engine.subscribe``), as it happens.

    JobAccepted     a job was accepted (its summary: the status document without images)
    StateChanged    a job moved: queued -> running -> done | failed | cancelled
    ImageFinished   an image reached a final state (done, failed or cancelled)
    JobFinished     a job reached its final state (its final status document)

Every event carries ``seq``: a number that grows with every event the engine emits, across
restarts too (it starts from the clock), so that a snapshot (``Engine.snapshot``) can say
which events it already reflects and a client can resume after the last event it saw.
Listeners are called on the thread that changed the job, holding the engine's lock: a
listener must only note the event and hand it on (to its own thread or event loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imgserver.jobs.job import ImageStatus

logger = logging.getLogger("imgserver.jobs.events")


@dataclass(frozen=True)
class JobEvent:
    """Something happened to a job (of ``folder``: whose streams may hear of it)."""

    seq: int
    job_id: str
    folder: str = field(default="", kw_only=True)


@dataclass(frozen=True)
class JobAccepted(JobEvent):
    """A job was accepted; ``summary`` is its status document without images."""

    summary: dict[str, Any]


@dataclass(frozen=True)
class StateChanged(JobEvent):
    """A job's state changed."""

    state: str
    progress: dict[str, int]


@dataclass(frozen=True)
class ImageFinished(JobEvent):
    """An image of a job reached a final state (done, failed or cancelled)."""

    index: int
    image: ImageStatus
    done: int
    total: int
    waited: float | None = None   # seconds from acceptance to a worker (None: never ran)
    seconds: float | None = None  # the worker's own time on it


@dataclass(frozen=True)
class JobFinished(JobEvent):
    """A job reached its final state; ``document`` is its final status document."""

    document: dict[str, Any]


Event = JobAccepted | StateChanged | ImageFinished | JobFinished
Listener = Callable[[Event], None]


class Announcer:
    """Numbers the engine's events and hands each to every listener."""

    def __init__(self) -> None:
        # Numbers start from the clock, so that they keep growing across restarts.
        self.seq = time.time_ns() // 1000
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` for every event from now on."""
        self._listeners.append(listener)

    def emit(self, kind: type[JobEvent], job_id: str, *fields: object, folder: str = "") -> None:
        """Number an event of ``kind`` (of a job of ``folder``) and hand it to every
        listener."""
        # Numbers follow the clock (microseconds) when it is ahead: they keep growing across
        # restarts, and a number says when its event happened, at the latest.
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        event: Event = kind(self.seq, job_id, *fields, folder=folder)  # type: ignore
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the engine
                logger.exception("an event listener failed")
