"""Streams that keep up, written by the hub's ticks themselves ("followed").

A stream's own task (``EventHub.chunks``) hands its stream over once it has caught up with
the history and its connection (its ``Sink``) has taken all that was written. From then on
each tick writes to it what followed its cursor, at most CHUNK bytes, read from the history
and joined once for all the streams at one cursor: one write per stream per tick, and no
task woken for it. The stream goes back to its task when it has more to do than a tick
gives (its client lags, it fell behind the history, more than CHUNK is waiting), or when it
is over (its job's end was written, the server stops); its task then waits for the client
as a response does. A followed stream that nothing is written to for ``keepalive`` seconds
gets a comment, from its task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fastapi.sse import KEEPALIVE_COMMENT

from imgserver.http.history import History

#: What one read of the history gives every stream at a cursor: its bytes, the cursor after
#: them, whether they end the job, and whether more are waiting.
_Read = tuple[bytes, int, bool, bool]


class Sink(Protocol):
    """A stream's connection, written without waiting (``imgserver.http.eventstream``)."""

    def write(self, data: bytes) -> None:
        """Send ``data``, some of a stream's events, now."""

    def backed_up(self) -> bool:
        """Whether the client has not taken all that was written yet (or has gone)."""


@dataclass(eq=False)
class Stream:
    """One client's stream: how far it has read."""

    job_id: str | None        # None: every job
    cursor: int               # the seq of the last event it has sent (or skipped)
    view: str | None = None   # the one folder whose jobs it sees (None: every folder)
    fresh: bool = False       # a fresh status is due before anything else
    since: int | None = None  # the stale id it came back with (all jobs: what changed since)
    closed: bool = False
    sink: Sink | None = None  # its connection, when ticks may write to it themselves
    sent_at: float = float("-inf")  # when it last wrote (the event loop's clock)
    woken: asyncio.Future[bool] | None = None  # followed: set when handed back (True: over)


class Followers:
    """The followed streams, by job (None: all jobs), and their writes."""

    def __init__(self, history: History) -> None:
        """Streams that read ``history``."""
        self._history = history
        self._streams: dict[str | None, set[Stream]] = {}

    def push(self, now: float) -> bool:
        """Write to every followed stream what followed its cursor; whether any was."""
        return self._push([stream for followed in self._streams.values()
                           for stream in followed], now)

    def push_job(self, job_id: str, now: float) -> bool:
        """Write to the followed streams of ``job_id`` what followed their cursors."""
        return self._push(list(self._streams.get(job_id, ())), now)

    def _push(self, streams: Iterable[Stream], now: float) -> bool:
        history = self._history
        read: dict[tuple[int, str | None, str | None], _Read] = {}
        wrote = False
        for stream in streams:
            sink = stream.sink
            if sink is None or sink.backed_up() or history.lost(stream.cursor):
                self.hand_back(stream, False)  # its task waits for the client, or skips
                continue
            key = (stream.cursor, stream.job_id, stream.view)
            found = read.get(key)
            if found is None:
                found = read[key] = self._read(*key)
            data, cursor, last, more = found
            if not data:
                continue
            sink.write(data)
            stream.cursor, stream.sent_at = cursor, now
            wrote = True
            if last or more:
                self.hand_back(stream, last)
        return wrote

    def _read(self, cursor: int, job_id: str | None, view: str | None) -> _Read:
        frames, more = self._history.read(cursor, job_id, view)
        if not frames:
            return b"", cursor, False, False
        data = b"".join(frame.all_bytes if job_id is None else frame.job_bytes or b""
                        for frame in frames)
        return data, frames[-1].seq, frames[-1].last and job_id is not None, more

    def hand_back(self, stream: Stream, over: bool) -> None:
        """Stop following ``stream``: its task goes on (``over``: it ends)."""
        followed = self._streams.get(stream.job_id)
        if followed is not None:
            followed.discard(stream)
            if not followed:
                del self._streams[stream.job_id]
        if stream.woken is not None and not stream.woken.done():
            stream.woken.set_result(over)

    def end(self) -> None:
        """Hand every stream back, over (the server is stopping)."""
        for followed in list(self._streams.values()):
            for stream in list(followed):
                self.hand_back(stream, True)

    async def follow(self, stream: Stream, sink: Sink, keepalive: float) -> bool:
        """Let the ticks write to ``stream`` until they hand it back; whether it is over."""
        loop = asyncio.get_running_loop()
        woken = stream.woken = loop.create_future()
        self._streams.setdefault(stream.job_id, set()).add(stream)
        quiet = loop.time()
        try:
            while not woken.done():
                idle = max(stream.sent_at, quiet) + keepalive - loop.time()
                if idle > 0:
                    await asyncio.wait((woken,), timeout=idle)
                elif sink.backed_up():
                    return False  # its task waits for the client
                else:
                    sink.write(KEEPALIVE_COMMENT)  # so that proxies keep it open
                    quiet = loop.time()
            return woken.result()
        finally:
            stream.woken = None
            self.hand_back(stream, False)
