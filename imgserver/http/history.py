"""The history of events the streams read from: each event encoded once, kept by seq.

    engine event --encode--> Frame (its SSE bytes for a job's stream and for the all-jobs
    stream) --History.append--> the last HISTORY of them (and HISTORY_BYTES) <-- streams'
    cursors (``History.after``)
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass
from typing import Any

from fastapi.sse import format_sse_event

from imgserver.jobs.events import Event, ImageFinished, JobAccepted, JobFinished, StateChanged

#: Events kept for streams that have not read them yet, and for clients that reconnect
#: with Last-Event-ID: at most this many, and this many bytes. A stream further behind than
#: that falls out (``imgserver.http.streams``): the bound on the server's backlog,
#: whatever the streams.
HISTORY = 10_000
HISTORY_BYTES = 8 << 20
#: A stream sends at most this many bytes of events in one write.
CHUNK = 16 * 1024


@dataclass(frozen=True)
class Frame:
    """One event, encoded for a job's stream and for the all-jobs stream."""

    seq: int
    job_id: str
    job_bytes: bytes | None   # None: not part of a job's stream (``job``)
    all_bytes: bytes
    last: bool                # the job's ``end``: its stream closes after it
    folder: str = ""          # the job's: streams that see only one folder see only its


class History:
    """The last events, at most HISTORY of them and HISTORY_BYTES of their bytes, by seq."""

    def __init__(self) -> None:
        self._frames: list[Frame] = []
        self._seqs: list[int] = []
        self._start = 0   # the oldest frame still held (those before are going)
        self._size = 0    # bytes of the frames held
        #: Every event after this seq is held (or still to come): the last one let go, or,
        #: before any was, the one before the first (None: nothing held yet).
        self.floor: int | None = None
        self._dropped = 0  # the seq of the last frame let go

    def append(self, frame: Frame) -> None:
        """Keep ``frame``; the oldest go when there are too many, or too many bytes."""
        if self.floor is None:
            self.floor = frame.seq - 1
        self._frames.append(frame)
        self._seqs.append(frame.seq)
        self._size += _size(frame)
        while (len(self._frames) - self._start > HISTORY
               or self._size > HISTORY_BYTES and len(self._frames) - self._start > 1):
            self._size -= _size(self._frames[self._start])
            self.floor = self._dropped = self._seqs[self._start]
            self._start += 1
        if self._start > len(self._frames) // 2:  # cut the front in bulk: it costs a copy
            del self._frames[:self._start]
            del self._seqs[:self._start]
            self._start = 0

    def skip(self, seq: int) -> None:
        """Let go of every frame, and hold nothing up to ``seq``: the events up to it went
        without being encoded (nobody was listening)."""
        self._frames.clear()
        self._seqs.clear()
        self._start = self._size = 0
        self.floor = self._dropped = seq

    @property
    def last(self) -> int:
        """The seq of the newest frame (of the last one let go, when none is held; 0 when
        there was none)."""
        return self._seqs[-1] if self._seqs else self.floor or 0

    def holds(self, after: int) -> bool:
        """Whether every event after seq ``after`` is held (or still to come)."""
        return self.floor is not None and self.floor <= after <= self.last

    def lost(self, cursor: int) -> bool:
        """Whether events after seq ``cursor`` have been let go (a stream there is behind)."""
        return cursor < self._dropped

    def after(self, seq: int, job_id: str | None, view: str | None = None) -> list[Frame]:
        """The frames after ``seq`` a stream of ``job_id`` (None: every job; of the folder
        ``view`` only, unless None) wants, as many as fit in CHUNK bytes (at least one)."""
        return self.read(seq, job_id, view)[0]

    def read(self, seq: int, job_id: str | None, view: str | None = None
             ) -> tuple[list[Frame], bool]:
        """``after``, and whether the stream wants more frames than those (CHUNK is full)."""
        found: list[Frame] = []
        size = 0
        start = max(self._start, bisect.bisect_right(self._seqs, seq))
        for frame in itertools.islice(self._frames, start, None):
            data = frame.all_bytes if job_id is None else frame.job_bytes
            if data is None or (job_id is not None and frame.job_id != job_id) or (
                    view is not None and frame.folder != view):
                continue
            if found and size + len(data) > CHUNK:
                return found, True
            found.append(frame)
            size += len(data)
        return found, False


def _size(frame: Frame) -> int:
    return len(frame.all_bytes) + len(frame.job_bytes or b"")


def encode(event: Event) -> Frame:
    """An engine event as its SSE bytes (encoded once, for every stream)."""
    job_id = event.job_id
    last = False
    if isinstance(event, ImageFinished):
        name = "image"
        data: dict[str, Any] = {"index": event.index, "image": event.image.to_document(),
                                "progress": {"done": event.done, "total": event.total}}
    elif isinstance(event, StateChanged):
        name, data = "state", {"state": event.state, "progress": event.progress}
    elif isinstance(event, JobFinished):
        name, data, last = "end", event.document, True
    elif isinstance(event, JobAccepted):
        return Frame(event.seq, job_id, None,
                     sse("job", {**event.summary, "job": job_id}, event.seq), False,
                     event.folder)
    else:
        raise TypeError(f"unknown event {event!r}")
    return Frame(event.seq, job_id, sse(name, data, event.seq),
                 sse(name, {**data, "job": job_id}, event.seq), last, event.folder)


def sse(name: str, data: dict[str, Any], seq: int) -> bytes:
    """The SSE bytes of an event ``name`` with ``data`` (compact JSON) and id ``seq``."""
    return format_sse_event(data_str=json.dumps(data, separators=(",", ":")), event=name,
                            id=str(seq))
