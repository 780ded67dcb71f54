"""Server-Sent Event streams of the engine's events: one job's, or every job's.

    engine thread --listener--> pending (a deque) --one wake-up, when idle--> event loop
        tick: encode each event once (SSE bytes) into the shared history (the last HISTORY
              events), then write to every stream that keeps up what followed its cursor,
              straight to its connection; the next tick GATHER seconds later
    GET /jobs/{id}/events, GET /events <-- one Stream each: a cursor into the history

The engine only appends to a deque, and wakes the event loop only when no tick is due: a
stream never slows the engine, and while events keep coming the loop wakes once every
GATHER seconds for all the streams, not once per event nor once per stream. With nobody
listening the events wait as they came, not encoded, until a stream opens: the newest
HISTORY of them are kept for a client that comes back with Last-Event-ID (a tick lets the
older ones go once twice as many gathered), and most are never encoded at all. A stream
holds no events of its own, only how far it has read, so a thousand streams cost a
thousand cursors, not a thousand copies.

A stream whose client keeps up is written by the tick itself, one write per tick and no
task of its own woken (``imgserver.http.followers``). Its own task sends what it has of its
own (a fresh status, a backlog after Last-Event-ID, more than its client has taken yet)
through the ASGI response, waiting for the client, until it has caught up. A stream whose
client reads too slowly to stay within the history falls out of it: a job's stream then
skips to a fresh ``status`` event, the all-jobs stream is closed. A client that reads
nothing at all is disconnected by its response (``imgserver.http.eventstream``), and the
number of open streams is capped (``--max-streams``; beyond it, 503 with Retry-After).

Event ids are the engine's ``seq`` numbers, which grow across restarts: a client that
comes back with ``Last-Event-ID`` gets the events after it from the history, or a fresh
``status`` when they are no longer held.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT

from imgserver.errors import CapacityError
from imgserver.http.followers import Followers, Stream
from imgserver.http.history import HISTORY, History, encode, sse
from imgserver.jobs.events import Event, JobFinished
from imgserver.jobs.job import FINAL_STATES

logger = logging.getLogger("imgserver.http.streams")

#: An idle stream gets a comment this often (seconds), so that proxies keep it open.
KEEPALIVE = 15.0
#: Once this many streams have closed, the memory they freed is handed back to the system
#: (glibc keeps freed buffers for the process otherwise), at most every TRIM_INTERVAL s.
TRIM_AFTER = 100
TRIM_INTERVAL = 10.0
#: Streams are written at most once in this many seconds: the first event after a quiet
#: spell goes at once, those of a busy job gather (a hundred streams then get two writes a
#: second each, not one per image); a job's end is never held back from its own streams.
GATHER = 0.5


class EventHub:
    """Fans the engine's events out to Server-Sent Event streams."""

    def __init__(self, snapshot: Callable[[str], tuple[dict, int]],
                 active: Callable[[int | None, str | None], tuple[list[dict], int]], *,
                 max_streams: int = 1000) -> None:
        """``snapshot(job_id)``: a job's status document and the seq it reflects;
        ``active(since, view)``: the summaries of the unfinished jobs, and of those finished
        since event ``since`` (None: none), of the folder ``view`` (None: every folder), and
        the seq they reflect; at most ``max_streams`` streams are open at once."""
        self._snapshot = snapshot
        self._active = active
        self.max_streams = max_streams
        self.refused = 0  # streams refused at the cap, for /metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[Event] = deque()
        self._scheduled = False  # a tick is due (soon, or GATHER after the last one)
        self._history = History()
        self._ended: OrderedDict[str, int] = OrderedDict()  # job -> its end's seq, recent
        self._signals: dict[str | None, asyncio.Event] = {}  # job (None: all) -> news
        self._watching: dict[str | None, int] = {}          # job (None: all) -> streams
        self._listening = 0  # streams open; read by the engine's thread
        self._followers = Followers(self._history)  # streams the ticks write to
        self._closed = False
        self._gone = 0        # streams closed since memory was last handed back
        self._trim: asyncio.TimerHandle | None = None

    # -- the engine's side ----------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """The engine's listener: note the event; the event loop encodes and sends it."""
        loop = self._loop
        if loop is None:
            return  # nobody can be listening before the server runs
        # Appended before the check: a stream that opens meanwhile catches up after it is
        # counted (``open``), and a tick that ends meanwhile looks again after it says so
        # (``_tick``), so an event is either caught up with or scheduled.
        self._pending.append(event)
        if self._scheduled:  # the tick due will take it, unless a job's streams wait for it
            if isinstance(event, JobFinished) and event.job_id in self._watching:
                self._call(loop, self._finish, event.job_id)
        elif self._listening or len(self._pending) >= 2 * HISTORY:
            self._scheduled = True
            self._call(loop, self._tick)

    def _call(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., None],
              *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
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
        for signal in self._signals.values():
            signal.set()
        self._followers.end()

    @property
    def streams(self) -> int:
        """Streams open now."""
        return self._listening

    def _tick(self) -> None:
        """Publish what the engine said and write it to the followed streams; while there is
        news, the next tick is GATHER seconds later (events meanwhile wake nobody)."""
        if not self._listening:
            self._forget_unheard()
            self._scheduled = False
            return
        news = self._catch_up()
        loop = self._loop
        if loop is None:
            self._scheduled = False
            return
        if self._followers.push(loop.time()) or news:
            loop.call_later(GATHER, self._tick)  # still scheduled: the engine wakes nobody
            return
        self._scheduled = False
        if self._pending:  # came after the catch-up, before the flag
            self._scheduled = True
            loop.call_soon(self._tick)

    def _finish(self, job_id: str) -> None:
        """A job has ended: its streams get their end now, not at the next tick."""
        self._catch_up()
        if self._loop is not None:
            self._followers.push_job(job_id, self._loop.time())

    def _catch_up(self) -> bool:
        """Move the pending events into the history; whether there were any."""
        if not self._pending:
            return False
        woken: set[str | None] = set()
        while self._pending:
            frame = encode(self._pending.popleft())
            self._history.append(frame)
            if frame.last:
                self._note_end(frame.job_id, frame.seq)
            woken.update((frame.job_id, None))
        for key in woken:
            self._wake(key)
        return True

    def _forget_unheard(self) -> None:
        """With nobody listening, keep only the newest HISTORY events, unencoded: the
        older ones go (and whatever the history held before them), never encoded."""
        excess = len(self._pending) - HISTORY
        if excess <= 0:
            return
        for _ in range(excess):
            event = self._pending.popleft()
            if isinstance(event, JobFinished):
                self._note_end(event.job_id, event.seq)
        self._history.skip(event.seq)

    def _note_end(self, job_id: str, seq: int) -> None:
        self._ended[job_id] = seq
        if len(self._ended) > HISTORY:
            self._ended.popitem(last=False)

    def _wake(self, key: str | None) -> None:
        """Tell the streams of ``key`` (a job, or None: all jobs) that there is news."""
        signal = self._signals.pop(key, None)
        if signal is not None:
            signal.set()

    def _signal(self, key: str | None) -> asyncio.Event:
        signal = self._signals.get(key)
        if signal is None:
            signal = self._signals[key] = asyncio.Event()
        return signal

    # -- streams ---------------------------------------------------------------------------

    def job_stream(self, job_id: str, last_id: str | None) -> AsyncIterator[bytes]:
        """The events of ``job_id``: ``status``, then ``image`` and ``state`` as they happen,
        then ``end``; after ``last_id``, the events that followed it if they are held."""
        return self._serve(self.open(job_id, last_id))

    def all_streams(self, last_id: str | None) -> AsyncIterator[bytes]:
        """Every job's events, each data object carrying ``job``, and ``job`` when a job is
        accepted; after ``last_id``, the events that followed it if they are held, otherwise
        a ``status`` event for each job unfinished or finished since."""
        return self._serve(self.open(None, last_id))

    async def _serve(self, stream: Stream) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.chunks(stream):
                yield chunk
        finally:
            self.close_stream(stream)

    def open(self, job_id: str | None, last_id: str | None, view: str | None = None
             ) -> Stream:
        """Register a stream of ``job_id`` (None: every job; of the folder ``view`` only,
        unless None), placed after ``last_id`` when the history holds all that followed it,
        or else with a fresh status due; CapacityError when ``max_streams`` are open.
        ``close_stream`` ends it."""
        if self._listening >= self.max_streams:
            self.refused += 1
            raise CapacityError(f"too many event streams: {self._listening} are open, the "
                                f"limit is {self.max_streams} (--max-streams)", retry_after=5)
        if not self._listening:
            self._forget_unheard()  # not encoded only to be let go
        self._catch_up()  # the history first: events waited while nobody listened
        after = _seq(last_id)
        history = self._history
        stream = Stream(job_id, cursor=history.last, view=view, closed=self._closed)
        ended = self._ended.get(job_id) if job_id is not None else None
        if after is not None and ended is not None and ended <= after:
            # Back after its job's end (EventSource reconnects by itself when a stream
            # closes): the finished job's status and end again, then the stream closes.
            stream.fresh = True
        elif after is not None and history.holds(after):
            stream.cursor = after
        else:
            stream.fresh = job_id is not None or after is not None
            stream.since = after
        self._watching[job_id] = self._watching.get(job_id, 0) + 1
        self._listening += 1
        return stream

    def close_stream(self, stream: Stream) -> None:
        """A stream has ended: it no longer counts."""
        self._listening -= 1
        self._gone += 1
        if self._trim is None and self._loop is not None and (
                self._gone >= TRIM_AFTER or self._listening == 0 and self._gone >= 10):
            self._trim = self._loop.call_later(TRIM_INTERVAL, self._give_back)
        left = self._watching[stream.job_id] - 1
        if left:
            self._watching[stream.job_id] = left
        else:
            del self._watching[stream.job_id]
            self._signals.pop(stream.job_id, None)

    def _give_back(self) -> None:
        """Hand the memory that closed streams freed back to the system (glibc's
        ``malloc_trim``; elsewhere nothing is done)."""
        self._trim = None
        self._gone = 0
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
            ctypes.CDLL(None).malloc_trim(0)

    async def _status(self, stream: Stream) -> tuple[bytes, bool]:
        """Fresh ``status`` events: of the stream's job (and ``end`` if it is finished), or of
        every unfinished job on the all-jobs stream; and whether the stream is complete."""
        stream.fresh = False
        final = False
        if stream.job_id is None:
            documents, seq = await asyncio.to_thread(self._active, stream.since, stream.view)
            # Each its own id, growing, the last one ``seq``: all are as of that event.
            first = seq - len(documents) + 1
            data = b"".join(sse("status", {**document, "job": document["id"]}, first + number)
                            for number, document in enumerate(documents))
        else:
            document, seq = await asyncio.to_thread(self._snapshot, stream.job_id)
            data = sse("status", document, seq)
            if document["state"] in FINAL_STATES:
                final = True
                data += sse("end", document, seq + 1)  # ids grow within the stream
        # Events the snapshot reflects are not sent again.
        stream.cursor = max(stream.cursor, seq)
        return data, final

    async def chunks(self, stream: Stream) -> AsyncIterator[bytes]:
        """What the stream's own task has to send, read from the history in as few writes as
        possible; with a sink, ticks write to it themselves whenever it has caught up."""
        loop = asyncio.get_running_loop()
        while True:
            if stream.fresh:
                status, final = await self._status(stream)
                yield status
                if final:
                    return
                continue
            if self._closed or stream.closed:
                return
            if self._history.lost(stream.cursor):
                # Too slow for the history: a job's stream starts again from a fresh status
                # (nothing missed, only skipped); the all-jobs stream cannot, and ends.
                if stream.job_id is None:
                    logger.info("an all-jobs event stream fell behind the history: closed")
                    return
                stream.fresh = True
                continue
            frames = self._history.after(stream.cursor, stream.job_id, stream.view)
            if frames:
                stream.cursor = frames[-1].seq
                stream.sent_at = loop.time()
                yield b"".join(frame.all_bytes if stream.job_id is None else
                               frame.job_bytes or b"" for frame in frames)
                if frames[-1].last and stream.job_id is not None:
                    return
                continue
            if stream.sink is not None and not stream.sink.backed_up():
                if await self._followers.follow(stream, stream.sink, KEEPALIVE):
                    return
                continue
            signal = self._signal(stream.job_id)
            try:
                await asyncio.wait_for(signal.wait(), KEEPALIVE)
            except asyncio.TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            wait = stream.sent_at + GATHER - loop.time()
            if wait > 0 and not self._closed and stream.job_id not in self._ended:
                await asyncio.sleep(wait)  # let the events of this moment gather


def _seq(last_id: str | None) -> int | None:
    if last_id is None:
        return None
    try:
        return int(last_id.strip())
    except ValueError:
        return None
