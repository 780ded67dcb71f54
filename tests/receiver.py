"""A webhook receiver on a loopback port: records what it is sent and answers as told."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived


@dataclass
class Receiver:
    """Answers POSTs with the statuses queued in ``answers`` (then 200), recording each.

    An answer is a status code, or ``(status, headers)``, or ``"hang"`` (answer nothing for
    a minute), or ``"drip"`` (a 200 whose body comes a byte a second, for a minute), or
    ``"flood"`` (a 200 with no length, then 64 KiB chunks as fast as they are taken, for
    40 s). ``sent`` counts the body bytes the receiver managed to send.
    """

    answers: list[Any] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    sent: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.deliveries.append(Delivery(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                    time.time()))
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if answer == "hang":
                    time.sleep(60)
                    return
                if answer == "drip":
                    self.send_response(200)
                    self.send_header("content-length", "60")
                    self.end_headers()
                    for _ in range(60):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(1)
                    return
                if answer == "flood":
                    self.send_response(200)
                    self.send_header("connection", "close")  # the body ends when it closes
                    self.end_headers()
                    chunk = b"x" * 65536
                    until = time.monotonic() + 40
                    try:
                        while time.monotonic() < until:
                            self.wfile.write(chunk)
                            receiver.sent += len(chunk)
                    except OSError:  # the server hung up: what a sane client does
                        pass
                    return
                status, headers = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
