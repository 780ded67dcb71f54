"""A job and its status document (the same JSON in HTTP answers and status files).

    queued -> running -> done        every image succeeded
                      -> failed      the request was invalid, or at least one image failed
       \\---------\\---> cancelled   cancelled: images not started never run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
#: A job or an image in one of these states never changes again.
FINAL_STATES = (DONE, FAILED, CANCELLED)
SOURCES = ("http", "inbox", "cli")


def now() -> str:
    """The current time, ISO-8601 in UTC."""
    return timestamp(datetime.now(timezone.utc))


def timestamp(moment: datetime) -> str:
    """``moment`` as the documents write it: ISO-8601 in UTC, to the millisecond.

    One format everywhere, so that timestamps sort as text in the order of time.
    """
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def expires_at(finished_at: str | None, keep: float) -> str | None:
    """When a job finished at ``finished_at`` is removed, keeping it ``keep`` seconds (0:
    for ever); None while it runs."""
    if finished_at is None or not keep:
        return None
    return timestamp(datetime.fromisoformat(finished_at) + timedelta(seconds=keep))


def served(document: dict[str, Any], keep: float) -> dict[str, Any]:
    """A stored status document as served: its expiry by the current ``keep``
    (--keep-finished), which may have changed since it was written."""
    if document.get("state") in FINAL_STATES and "finished_at" in document:
        document["expires_at"] = expires_at(document["finished_at"], keep)
    return document


@dataclass
class ImageStatus:
    """The state of one image of a job."""

    input: str
    output: str
    state: str = QUEUED
    outputs: list[str] = field(default_factory=list)
    error: str | None = None

    def to_document(self) -> dict[str, Any]:
        """The image's part of the status document."""
        return {"input": self.input, "output": self.output, "state": self.state,
                "outputs": list(self.outputs), "error": self.error}


PENDING, DELIVERED = "pending", "delivered"


#: The owner of the drop folder's jobs: the operator, one more owner for fair share.
DROP_FOLDER = "inbox"


@dataclass(frozen=True)
class Owner:
    """Whom a job is for: a name (a token's; "" with no tokens) for fair share and quotas,
    and the folder its paths are relative to ("": the root). Not part of the status
    document: kept beside the request (``Outbox.write_owner``)."""

    name: str = ""
    folder: str = ""
    max_queued: int | None = None  # images accepted and unfinished, at most (None: no limit)

    @property
    def kept(self) -> bool:
        """Whether the outbox must keep it (anything but the default)."""
        return bool(self.name or self.folder)


#: The owner of a job when there are no tokens: the root, nobody in particular.
ANYONE = Owner()


@dataclass
class Notification:
    """One completion webhook of a job: where it goes (without credentials) and how it went."""

    url: str
    state: str = PENDING
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: str | None = None

    def to_document(self) -> dict[str, Any]:
        """The notification's part of the status document."""
        return {"url": self.url, "state": self.state, "attempts": self.attempts,
                "last_error": self.last_error, "next_attempt_at": self.next_attempt_at}


@dataclass
class Job:
    """A job: its request's images and where each one stands."""

    id: str
    source: str
    operations: list[str]
    images: list[ImageStatus]
    state: str = QUEUED
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    expires_at: str | None = None
    notifications: list[Notification] = field(default_factory=list)
    #: Cancelled by its user: images not started never start; the job ends ``cancelled``.
    cancelling: bool = False
    owner: Owner = field(default_factory=Owner)

    @property
    def finished(self) -> bool:
        """Whether the job has reached a final state."""
        return self.state in FINAL_STATES

    def progress(self) -> dict[str, int]:
        """How many images are finished (done or failed), of how many."""
        done = sum(image.state in (DONE, FAILED) for image in self.images)
        return {"done": done, "total": len(self.images)}

    def start(self) -> None:
        """Mark the job running (once its first image is handed to a worker)."""
        if self.state == QUEUED:
            self.state = RUNNING
            self.started_at = self.started_at or now()

    def cancel(self, indexes: list[int]) -> None:
        """Cancel the job: the images at ``indexes`` (those not started) never run."""
        self.cancelling = True
        for index in indexes:
            self.images[index].state = CANCELLED

    def finish_if_complete(self, keep: float = 0) -> bool:
        """Move the job to its final state once every image is finished; True if it moved.

        ``keep``: seconds the finished job is kept (its ``expires_at``), 0 for ever.
        """
        if self.finished or any(image.state not in FINAL_STATES for image in self.images):
            return False
        failed = sum(image.state == FAILED for image in self.images)
        if self.cancelling:
            not_run = sum(image.state == CANCELLED for image in self.images)
            self.state = CANCELLED
            self.error = f"cancelled: {not_run} of {len(self.images)} images not run"
        else:
            self.state = FAILED if failed else DONE
            self.error = f"{failed} of {len(self.images)} images failed" if failed else None
            self.started_at = self.started_at or now()
        self._finished(keep)
        return True

    def reject(self, error: str, keep: float = 0) -> None:
        """Fail the whole job before any image ran (an invalid request)."""
        self.state, self.error = FAILED, error
        self._finished(keep)

    def _finished(self, keep: float) -> None:
        self.finished_at = now()
        self.expires_at = expires_at(self.finished_at, keep)

    def summary(self) -> dict[str, Any]:
        """The status document without its images (what a listing shows)."""
        return {
            "id": self.id,
            "state": self.state,
            "source": self.source,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "expires_at": self.expires_at,
            "operations": list(self.operations),
            "progress": self.progress(),
            "error": self.error,
            "notifications": [notification.to_document() for notification in self.notifications],
        }

    def to_document(self) -> dict[str, Any]:
        """The status document."""
        return {**self.summary(), "images": [image.to_document() for image in self.images]}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Job:
        """A job as a status document describes it."""
        return cls(
            id=document["id"],
            source=document["source"],
            operations=list(document["operations"]),
            images=[ImageStatus(image["input"], image["output"], image["state"],
                                list(image["outputs"]), image["error"])
                    for image in document["images"]],
            state=document["state"],
            created_at=document["created_at"],
            started_at=document["started_at"],
            finished_at=document["finished_at"],
            error=document["error"],
            expires_at=document.get("expires_at"),
            notifications=[Notification(**entry) for entry in document.get("notifications", [])],
        )


def summary(document: dict[str, Any]) -> dict[str, Any]:
    """A status document without its images."""
    return {key: value for key, value in document.items() if key != "images"}
