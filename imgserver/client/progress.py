"""Progress of a job on the terminal: a bar on a TTY, a line per image otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from imgserver.jobs.events import Event, ImageFinished


class Progress:
    """An engine listener that reports finished images to ``stream``."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def __call__(self, event: Event) -> None:
        """An engine listener: report a finished image."""
        if isinstance(event, ImageFinished):
            self.image(event.image.to_document(), event.done, event.total)

    def image(self, image: dict, done: int, total: int) -> None:
        """Report that ``image`` (its part of the status document) is finished."""
        if self.tty:
            self.bar(done, total)
            return
        outcome = {"done": "done", "cancelled": "cancelled"}.get(
            image["state"], f"failed: {image['error']}")
        self.stream.write(f"{done}/{total} {image['input']} -> {image['output']}: {outcome}\n")
        self.stream.flush()

    def bar(self, done: int, total: int) -> None:
        """Draw the bar at ``done`` of ``total`` (on a terminal only)."""
        if not self.tty:
            return
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} images")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()
