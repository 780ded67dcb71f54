"""Server-Sent Event streams of the engine's events: one job's, or every job's.

    engine thread --listener--> pending (a deque) --call_soon_threadsafe--> event loop
        publish: encode each event once (SSE bytes), keep the last HISTORY of them,
                 append the bytes to the buffer of every stream that wants them
    GET /jobs/{id}/events, GET /events <-- one Stream each: joined buffers, sent as they come

The engine only appends to a deque and, when it was empty and a stream is open, wakes the
event loop: a stream never slows the engine, and with nobody listening the events wait
(for the history) until a stream opens or HISTORY of them gathered, rather than waking the
loop for every image. Each event is encoded once whatever the number of streams, and a
stream sends what gathered while it was sending in one write, so a hundred listeners cost
little more than one. A stream whose client does not read stops at its buffer's bound:
a job's stream then skips to a fresh ``status`` event, the all-jobs stream is closed.

Event ids are the engine's ``seq`` numbers, which grow across restarts: a client that
comes back with ``Last-Event-ID`` gets the events after it from the history, or a fresh
``status`` when they are no longer held.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from imgserver.jobs.events import Event, ImageFinished, JobAccepted, JobFinished, StateChanged
from imgserver.jobs.job import FINAL_STATES

logger = logging.getLogger("imgserver.http.streams")

#: Events kept for clients that reconnect with Last-Event-ID.
HISTORY = 10_000
#: A stream's client may fall this many bytes behind before it is skipped ahead or closed.
BACKLOG_BYTES = 1 << 20
#: An idle stream gets a comment this often (seconds), so that proxies keep it open.
KEEPALIVE = 15.0
#: A stream writes at most once in this many seconds: the first event after a quiet spell
#: goes at once, those of a busy job gather (a hundred streams then write twice a
#: second each, not once per image); a job's end is never held back.
GATHER = 0.5


@dataclass(frozen=True)
class _Frame:
    """One event, encoded for a job's stream and for the all-jobs stream."""

    seq: int
    job_id: str
    job_bytes: bytes | None   # None: not part of a job's stream (``job``)
    all_bytes: bytes
    last: bool                # the job's ``end``: its stream closes after it


@dataclass(eq=False)
class _Stream:
    """One client's stream: what it still has to send."""

    job_id: str | None        # None: every job
    cursor: int               # the last seq it has (sent or queued)
    buffer: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False       # nothing more to send after the buffer (the job's end)
    fresh: bool = False       # a fresh status is due before anything else
    since: int | None = None  # the stale id it came back with (all jobs: what changed since)
    sent_at: float = -GATHER  # when it last wrote (the event loop's clock)


class EventHub:
    """Fans the engine's events out to Server-Sent Event streams."""

    def __init__(self, snapshot: Callable[[str], tuple[dict, int]],
                 active: Callable[[int | None], tuple[list[dict], int]]) -> None:
        """``snapshot(job_id)``: a job's status document and the seq it reflects;
        ``active(since)``: the summaries of the unfinished jobs, and of those finished since
        event ``since`` (None: none), and the seq they reflect."""
        self._snapshot = snapshot
        self._active = active
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[Event] = deque()
        self._scheduled = False
        self._history: deque[_Frame] = deque(maxlen=HISTORY)
        self._ended: OrderedDict[str, int] = OrderedDict()  # job -> its end's seq, recent
        self._streams: dict[str | None, set[_Stream]] = {}
        self._listening = 0  # streams open; read by the engine's thread
        self._closed = False

    # -- the engine's side ----------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """The engine's listener: note the event; the event loop encodes and sends it."""
        loop = self._loop
        if loop is None:
            return  # nobody can be listening before the server runs
        # Appended before the check: a stream that opens meanwhile catches up after it is
        # counted (``_open``), so an event is either caught up with or scheduled.
        self._pending.append(event)
        if not self._scheduled and (self._listening or len(self._pending) >= HISTORY):
            self._scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed: the server has stopped serving
                self._loop = None
                self._pending.clear()

    # -- the event loop's side ------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start publishing on ``loop`` (the server's)."""
        self._loop = loop

    def stop(self) -> None:
        """End every stream, from any thread (a signal handler's included)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)

    def close(self) -> None:
        """End every stream (the server is stopping); call on the event loop."""
        self._closed = True
        self._loop = None  # events from now on have nobody to go to
        for streams in self._streams.values():
            for stream in streams:
                stream.ended = True
                stream.ready.set()

    @property
    def streams(self) -> int:
        """Streams open now."""
        return self._listening

    def _drain(self) -> None:
        self._scheduled = False
        self._catch_up()

    def _catch_up(self) -> None:
        while self._pending:
            self._publish(_encode(self._pending.popleft()))

    def _publish(self, frame: _Frame) -> None:
        self._history.append(frame)
        if frame.last:
            self._ended[frame.job_id] = frame.seq
            if len(self._ended) > HISTORY:
                self._ended.popitem(last=False)
        for key in (frame.job_id, None):
            for stream in self._streams.get(key, ()):
                self._deliver(stream, frame)

    def _deliver(self, stream: _Stream, frame: _Frame) -> None:
        data = frame.all_bytes if stream.job_id is None else frame.job_bytes
        if data is None or frame.seq <= stream.cursor or stream.ended:
            return
        stream.cursor = frame.seq
        if stream.size + len(data) > BACKLOG_BYTES:
            # The client does not keep up: a job's stream starts again from a fresh status
            # (nothing missed, only skipped); the all-jobs stream cannot, and is closed.
            stream.buffer.clear()
            stream.size = 0
            stream.fresh = stream.job_id is not None
            stream.ended = stream.job_id is None
        else:
            stream.buffer.append((frame.seq, data))
            stream.size += len(data)
            stream.ended = frame.last and stream.job_id is not None
        stream.ready.set()

    # -- streams ---------------------------------------------------------------------------

    def job_stream(self, job_id: str, last_id: str | None) -> AsyncIterator[bytes]:
        """The events of ``job_id``: ``status``, then ``image`` and ``state`` as they happen,
        then ``end``; after ``last_id``, the events that followed it if they are held."""
        return self._serve(job_id, last_id)

    def all_streams(self, last_id: str | None) -> AsyncIterator[bytes]:
        """Every job's events, each data object carrying ``job``, and ``job`` when a job is
        accepted; after ``last_id``, the events that followed it if they are held, otherwise
        a ``status`` event for each job unfinished or finished since."""
        return self._serve(None, last_id)

    async def _serve(self, job_id: str | None, last_id: str | None) -> AsyncIterator[bytes]:
        stream = self._open(job_id, last_id)
        try:
            async for chunk in self._chunks(stream):
                yield chunk
        finally:
            self._close_stream(stream)

    def _open(self, job_id: str | None, last_id: str | None) -> _Stream:
        """Register a stream; queue what followed ``last_id`` when the history holds all of
        it, or else mark a fresh status as due."""
        self._catch_up()  # the history first: events waited while nobody listened
        after = _seq(last_id)
        stream = _Stream(job_id, cursor=0, ended=self._closed)
        history = self._history
        ended = self._ended.get(job_id) if job_id is not None else None
        if after is not None and ended is not None and ended <= after:
            # Back after its job's end (EventSource reconnects by itself when a stream
            # closes): the finished job's status and end again, then the stream closes.
            stream.fresh = True
            stream.cursor = history[-1].seq if history else 0
        elif (after is not None and history
              and history[0].seq - 1 <= after <= history[-1].seq):
            stream.cursor = after
            for frame in history:
                if job_id is None or frame.job_id == job_id:
                    self._deliver(stream, frame)
        else:
            stream.fresh = job_id is not None or after is not None
            stream.since = after
            stream.cursor = history[-1].seq if history else 0
        self._streams.setdefault(job_id, set()).add(stream)
        self._listening += 1
        self._catch_up()  # what came while it was being counted
        return stream

    def _close_stream(self, stream: _Stream) -> None:
        self._streams[stream.job_id].discard(stream)
        self._listening -= 1

    async def _status(self, stream: _Stream) -> tuple[bytes, bool]:
        """Fresh ``status`` events: of the stream's job (and ``end`` if it is finished), or of
        every unfinished job on the all-jobs stream; and whether the stream is complete."""
        stream.fresh = False
        final = False
        if stream.job_id is None:
            documents, seq = await asyncio.to_thread(self._active, stream.since)
            # Each its own id, growing, the last one ``seq``: all are as of that event.
            first = seq - len(documents) + 1
            data = b"".join(_sse("status", {**document, "job": document["id"]}, first + number)
                            for number, document in enumerate(documents))
        else:
            document, seq = await asyncio.to_thread(self._snapshot, stream.job_id)
            data = _sse("status", document, seq)
            if document["state"] in FINAL_STATES:
                final = True
                data += _sse("end", document, seq + 1)  # ids grow within the stream
        # Events queued meanwhile that the snapshot reflects are not sent again.
        stream.buffer = [(number, item) for number, item in stream.buffer if number > seq]
        stream.size = sum(len(item) for _, item in stream.buffer)
        stream.cursor = max(stream.cursor, seq)
        return data, final

    async def _chunks(self, stream: _Stream) -> AsyncIterator[bytes]:
        """What the stream has to send, gathered into as few writes as possible."""
        while True:
            if stream.fresh:
                status, final = await self._status(stream)
                yield status
                if final:
                    return
            elif stream.buffer:
                chunk = b"".join(item for _, item in stream.buffer)
                stream.buffer.clear()
                stream.size = 0
                stream.sent_at = asyncio.get_running_loop().time()
                yield chunk
            elif stream.ended:
                return
            else:
                stream.ready.clear()
                try:
                    await asyncio.wait_for(stream.ready.wait(), KEEPALIVE)
                except asyncio.TimeoutError:
                    yield KEEPALIVE_COMMENT
                    continue
                wait = stream.sent_at + GATHER - asyncio.get_running_loop().time()
                if wait > 0 and not stream.ended:
                    await asyncio.sleep(wait)  # let the events of this moment gather


def _encode(event: Event) -> _Frame:
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
        return _Frame(event.seq, job_id, None,
                      _sse("job", {**event.summary, "job": job_id}, event.seq), False)
    else:
        raise TypeError(f"unknown event {event!r}")
    return _Frame(event.seq, job_id, _sse(name, data, event.seq),
                  _sse(name, {**data, "job": job_id}, event.seq), last)


def _sse(name: str, data: dict[str, Any], seq: int) -> bytes:
    return format_sse_event(data_str=json.dumps(data, separators=(",", ":")), event=name,
                            id=str(seq))


def _seq(last_id: str | None) -> int | None:
    if last_id is None:
        return None
    try:
        return int(last_id.strip())
    except ValueError:
        return None
