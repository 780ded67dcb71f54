"""Progress of a job on the terminal: a bar on a TTY, a line per image otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from imgserver.events import Event, ImageFinished


class Progress:
    """An engine listener that reports finished images to ``stream``."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def __call__(self, event: Event) -> None:
        if not isinstance(event, ImageFinished):
            return
        image = event.image
        if self.tty:
            filled = self.width * event.done // max(event.total, 1)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {event.done}/{event.total} images")
            if event.done == event.total:
                self.stream.write("\n")
        else:
            outcome = "done" if image.error is None else f"failed: {image.error}"
            self.stream.write(f"{event.done}/{event.total} {image.input} -> {image.output}: "
                              f"{outcome}\n")
        self.stream.flush()
