"""HTTP connections: a deadline for every request, and clients that leave logged as such.

uvicorn closes a connection that stays idle between two requests (its keep-alive timeout),
but none that stops in the middle of one: a client that sends the headers of a POST and then
nothing keeps its socket, and a file descriptor, for as long as it likes. An ASGI middleware
cannot help there: it runs only once the headers are complete, so a client stalled in its
headers (or silent from the start) never reaches it, and it cannot close a socket. h11's
limit is on bytes, not time. So the deadline lives in the protocol, which sees every byte
and owns the socket: ``protocol`` is uvicorn's h11 protocol, where a request must arrive
whole within ``--read-timeout`` seconds of its first byte (of the connection, for the first
request). A request whose headers are in is answered 408; anything less is closed. The
protocol also hands each request's scope its connection's transport (``TRANSPORT``), so that
an event stream can bound its buffers and drop a client that stopped reading.

``Disconnects`` is ASGI middleware for the other side: a client that goes away before its
answer is complete — mid-body, while ``wait=true`` waits, or mid-stream — is one INFO line,
not an "Exception in ASGI application" with a ``ClientDisconnect`` traceback. It works on
the ASGI messages, so every endpoint, a streamed response included, gets the same
treatment.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from imgserver.http.eventstream import TRANSPORT
from imgserver.http.security import HEADERS

logger = logging.getLogger("imgserver.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Set in a request's scope when the server, not the client, ended its connection.
CLOSED_BY_SERVER = "imgserver.closed_by_server"
#: Set in a request's scope when its connection is lost before the answer is complete.
GONE = "imgserver.gone"
#: The client's side of the request is over: no deadline applies any more.
_RECEIVED = frozenset({h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.SWITCHED_PROTOCOL})
#: A request whose answer is not out this long (seconds) after its body came in is watched
#: for its client leaving meanwhile.
WATCH_AFTER = 0.05
#: Refused connections are reported at most this often (seconds).
_REFUSAL_REPORT = 60.0


def protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing requests not whole within ``read_timeout``
    seconds and connections beyond ``max_connections``."""

    class Protocol(_DeadlineProtocol):
        pass

    Protocol.read_timeout = read_timeout
    Protocol.max_connections = max_connections
    return Protocol


class _DeadlineProtocol(H11Protocol):
    """H11Protocol with a clock that runs while a request is coming in."""

    read_timeout = 10.0
    max_connections = 1 << 20
    _refused_at = 0.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Take the connection, or close it at once when too many are open."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
            return
        self._arm()  # the first request is due within the deadline too

    def data_received(self, data: bytes) -> None:
        """Feed h11, then start or stop the clock by where the request stands."""
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None:  # its app has not run yet: give it the connection too
            extensions = cast(dict, cycle.scope).setdefault("extensions", {})
            extensions.setdefault(TRANSPORT, self.transport)
        self._follow()

    def on_response_complete(self) -> None:
        """After an answer, a pipelined request may already have begun."""
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock; a client gone in the middle of its headers is one INFO line (once
        they are in, the endpoint sees the disconnect and ``Disconnects`` says it)."""
        if (self._deadline is not None and self.conn.their_state is h11.IDLE
                and self.conn.trailing_data[0]):
            logger.info("%s went away while sending its request", _who(self.client))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cast(dict, cycle.scope)[GONE] = True  # for ``Disconnects``, when it answers
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """At shutdown a request still coming in is not waited for: it is answered 503."""
        if self._deadline is not None:
            self._disarm()
            self._end(503, "the server is stopping")
        else:
            super().shutdown()

    # -- the clock ----------------------------------------------------------------------

    def _follow(self) -> None:
        state = self.conn.their_state
        if self.transport.is_closing() or state in _RECEIVED:
            self._disarm()
        elif state is h11.SEND_BODY or self.conn.trailing_data[0]:
            self._arm()  # a request has begun; idle between requests is keep-alive's business

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self._end(408, f"no complete request within {self.read_timeout:g} s (--read-timeout)")

    def _end(self, status: int, reason: str) -> None:
        """Close the connection; answer ``status`` if a request's headers are in."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if (cycle is not None and not cycle.response_started
                and self.conn.our_state is h11.SEND_RESPONSE):
            # The endpoint waiting for the body now receives a disconnect; the scope says
            # why, so that it is not logged a second time as a client that went away.
            cast(dict, cycle.scope)[CLOSED_BY_SERVER] = reason
            cycle.disconnected = True  # whatever the endpoint still sends goes nowhere
            with contextlib.suppress(h11.LocalProtocolError):
                self._answer(status, json.dumps({"detail": reason}).encode(),
                             b"application/json")
            cycle.message_event.set()
        logger.info("closed the connection of %s: %s", _who(self.client), reason)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, with the headers of every answer."""
        self._answer(400, msg.encode("ascii", "replace"), b"text/plain; charset=utf-8")
        self.transport.close()

    def _answer(self, status: int, body: bytes, media_type: bytes) -> None:
        """Write a whole answer that closes the connection, outside the ASGI app (so with
        the security headers the app's middleware would have added)."""
        headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *HEADERS]
        phrase = http.HTTPStatus(status).phrase.encode()
        for event in (h11.Response(status_code=status, headers=headers, reason=phrase),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))

    def _refuse(self) -> None:
        moment = time.monotonic()
        if moment - type(self)._refused_at >= _REFUSAL_REPORT:
            type(self)._refused_at = moment
            logger.warning("refusing connections: %d are open, the limit is %d (the open-file "
                           "limit less what the engine keeps)", len(self.connections) - 1,
                           self.max_connections)
        self.transport.close()


class Disconnects:
    """ASGI middleware: a client that goes away before its answer is one INFO line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; if the client leaves, log it once and end quietly."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stage = "while sending its request"
        gone = answered = False
        watcher: asyncio.Task | asyncio.TimerHandle | None = None

        def left() -> None:
            nonlocal gone
            if gone or answered:
                return
            gone = True
            if CLOSED_BY_SERVER not in scope:  # the protocol has said why already
                query = scope.get("query_string", b"").decode("latin-1")
                logger.info("%s went away %s: %s %s%s", _who(scope.get("client")), stage,
                            scope["method"], scope["path"], "?" + query if query else "")

        async def watch() -> None:
            # Once the body is read, nothing else reads: listen for a disconnect meanwhile.
            try:
                message = await receive()
            except Exception:  # the server's own business; it must not surface here
                return
            if message["type"] == "http.disconnect":
                left()

        def start_watching() -> None:
            nonlocal watcher
            if not answered:
                watcher = asyncio.ensure_future(watch())

        async def receive_() -> Message:
            nonlocal watcher, stage
            message = await receive()
            if message["type"] == "http.disconnect":
                left()
            elif not message.get("more_body", False) and watcher is None:
                if stage.startswith("while sending"):
                    stage = "while waiting for its answer"
                # Most answers are out sooner: a task for each would cost them more than
                # the rest of this middleware. A client that left meanwhile is heard of
                # all the same: by the watcher, or by the protocol's mark as the answer
                # is sent.
                watcher = asyncio.get_running_loop().call_later(WATCH_AFTER, start_watching)
            return message

        async def send_(message: Message) -> None:
            nonlocal answered, stage
            if scope.get(GONE):  # before the watcher began: the answer goes nowhere
                left()
            if message["type"] == "http.response.start":
                stage = "during its answer"
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True  # before sending: the watcher wakes when the answer is out
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        except Exception:
            if not gone:
                raise
            # What a vanished client leaves behind (ClientDisconnect, a broken stream): the
            # line above said it.
            logger.debug("request of a client that went away ended", exc_info=True)
        finally:
            if watcher is not None:
                watcher.cancel()


def _who(client: Any) -> str:
    return f"client {client[0]}:{client[1]}" if client else "a client"
