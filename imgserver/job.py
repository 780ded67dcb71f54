"""A job and its status document (the same JSON in HTTP answers and status files).

    queued -> running -> done     every image succeeded
                      -> failed   the request was invalid, or at least one image failed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
FINAL_STATES = (DONE, FAILED)
SOURCES = ("http", "inbox", "cli")


def now() -> str:
    """The current time, ISO-8601 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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

    @property
    def finished(self) -> bool:
        """Whether the job has reached a final state."""
        return self.state in FINAL_STATES

    def progress(self) -> dict[str, int]:
        """How many images are finished (done or failed), of how many."""
        done = sum(image.state in FINAL_STATES for image in self.images)
        return {"done": done, "total": len(self.images)}

    def start(self) -> None:
        """Mark the job running (once its first image is handed to a worker)."""
        if self.state == QUEUED:
            self.state = RUNNING
            self.started_at = self.started_at or now()

    def finish_if_complete(self) -> bool:
        """Move the job to done or failed once every image is finished; True if it moved."""
        if self.finished or any(image.state not in FINAL_STATES for image in self.images):
            return False
        failed = sum(image.state == FAILED for image in self.images)
        self.state = FAILED if failed else DONE
        self.error = f"{failed} of {len(self.images)} images failed" if failed else None
        self.started_at = self.started_at or now()
        self.finished_at = now()
        return True

    def reject(self, error: str) -> None:
        """Fail the whole job before any image ran (an invalid request)."""
        self.state, self.error = FAILED, error
        self.finished_at = now()

    def to_document(self) -> dict[str, Any]:
        """The status document."""
        return {
            "id": self.id,
            "state": self.state,
            "source": self.source,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "operations": list(self.operations),
            "progress": self.progress(),
            "error": self.error,
            "images": [image.to_document() for image in self.images],
        }

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
        )
