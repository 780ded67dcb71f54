"""The answer of an event stream: a stream's chunks written to one client, within bounds.

A client that reads slowly only falls behind the shared history (``imgserver.http.streams``
decides what it then gets). A client that reads nothing must not hold memory: its kernel
send queue and the server's write buffer fill, and a write that is still waiting for room
after STALLED seconds disconnects it. The connection is aborted, not closed: a close would
wait for the buffered bytes to go out, that is for ever. A stream's connection also gets
small buffers (SEND_BUFFER in the kernel, WRITE_BUFFER in the server), so that a thousand
stalled clients cost megabytes, not the gigabyte that Linux's autotuned buffers allow.

The connection's transport comes from the protocol (``imgserver.http.connection`` puts it in
the request's scope); served by something else, the stream works without those bounds.
With the transport, and the answer's body in HTTP/1.1 chunks (a GET of HTTP/1.1), the hub's
ticks write a stream that keeps up straight to its transport (``Chunks``): one write per
stream per tick, without the stack of ASGI middleware, h11 and a task woken per stream that
an ASGI message costs. The status line and headers, and whatever the stream's own task
sends (a status, a backlog, the last chunk), go through ASGI as before; both write whole
chunks, on the event loop, so they never interleave within one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import Response

from imgserver.http.followers import Stream
from imgserver.http.streams import EventHub

logger = logging.getLogger("imgserver.http.streams")

#: A write that waits this long for the client to take anything disconnects it (seconds).
STALLED = 30.0
#: The kernel's send buffer of a stream's socket (Linux doubles it for its bookkeeping).
SEND_BUFFER = 16 * 1024
#: The server's own write buffer of a stream's connection: beyond it, writing waits.
WRITE_BUFFER = 16 * 1024
#: Where the protocol leaves the connection's transport in a request's scope.
TRANSPORT = "imgserver.transport"
#: Streams must not be cached or buffered on the way (nginx reads the second header).
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class EventStreamResponse(Response):
    """``text/event-stream``: the chunks of a hub's stream, until it ends or the client
    goes (or stops reading for STALLED seconds)."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub, stream: Stream) -> None:
        """The answer for ``stream`` (opened already: it counts until this ends)."""
        # Not Response.__init__: it would declare a length, and a stream has none.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            *((name.encode(), value.encode()) for name, value in HEADERS.items())]
        self._hub = hub
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        """Write the stream; the stream no longer counts once this returns."""
        transport = scope.get("extensions", {}).get(TRANSPORT)
        writer = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            if writer is not None:
                writer.cancel()  # the client left: stop writing for it

        watcher = asyncio.ensure_future(watch())
        try:
            _bound(transport)
            if (transport is not None and scope.get("http_version") == "1.1"
                    and scope.get("method") == "GET"):
                self._stream.sink = Chunks(transport)  # h11 frames this answer in chunks
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self._hub.chunks(self._stream):
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk,
                                                 "more_body": True}), STALLED)
                    if gone:  # wait_for returns a send that ended as it was cancelled
                        return
                except asyncio.TimeoutError:
                    logger.info("%s took nothing of its event stream for %g s: disconnected",
                                _who(scope), STALLED)
                    if transport is not None:
                        transport.abort()
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise  # the server is stopping: not ours to swallow
        finally:
            watcher.cancel()
            self._stream.closed = True
            self._hub.close_stream(self._stream)


class Chunks:
    """A stream's connection, written as HTTP/1.1 chunks straight to its transport."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        """Send ``data`` as one chunk of the answer's body (buffered when the client lags)."""
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def backed_up(self) -> bool:
        """Whether some of what was written waits for the client, or the client has gone."""
        return self._transport.is_closing() or self._transport.get_write_buffer_size() > 0


def _bound(transport: Any) -> None:
    """Small buffers for a stream's connection: it is long-lived, and may stop reading."""
    if transport is None:
        return
    with contextlib.suppress(AttributeError, ValueError, NotImplementedError):
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _who(scope: Scope) -> str:
    client = scope.get("client")
    return f"client {client[0]}:{client[1]}" if client else "a client"
