"""What the engine tells its subscribers (``Engine.subscribe``), on the engine's thread.

Events are small frozen records; a subscriber that needs to do more than note one (write to
a socket, send a webhook) hands it to its own thread or event loop, and must never block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imgserver.job import ImageStatus


@dataclass(frozen=True)
class ImageFinished:
    """An image of a job is finished (done or failed)."""

    job_id: str
    index: int
    image: ImageStatus
    done: int
    total: int


@dataclass(frozen=True)
class JobFinished:
    """A job reached its final state; ``document`` is its final status document."""

    job_id: str
    document: dict


Event = ImageFinished | JobFinished
Listener = Callable[[Event], None]
