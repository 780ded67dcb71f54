"""Helpers to run a real ``imgserver serve`` process on a loopback port and talk to it, over
HTTP, or over HTTPS with certificates of a throwaway CA (``tls_files``)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import trustme

from conftest import wait_for

#: What uvicorn logs once it listens, and when the port is taken.
LISTENING, TAKEN = "Uvicorn running on", "error while attempting to bind"
#: Ports tried by ``start_server`` before it gives up.
PORT_TRIES = 3


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class TLSFiles:
    """A certificate and its key in PEM files, and the file of the CA that signed it."""

    cert: Path
    key: Path
    cacert: Path

    def args(self) -> tuple[str, ...]:
        """The server's options that serve HTTPS with this certificate."""
        return "--tls-cert", str(self.cert), "--tls-key", str(self.key)

    def context(self) -> ssl.SSLContext:
        """A client's TLS context that trusts the CA (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.cacert))


def tls_files(folder: Path, ca: trustme.CA, *hosts: str, **issue: Any) -> TLSFiles:
    """A certificate for ``hosts`` from ``ca`` (``issue``: more of trustme's ``issue_cert``
    arguments, e.g. ``not_after``), written with its key and the CA under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*hosts, **issue)
    files = TLSFiles(folder / "cert.pem", folder / "key.pem", folder / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.cacert))
    return files


@dataclass
class Server:
    """A running ``imgserver serve`` process; over HTTPS when ``context`` is given (the
    client side's TLS context)."""

    process: subprocess.Popen
    port: int
    root: Path
    log: Path
    context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection to the server, in its scheme."""
        if self.context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
        connection = self.connection(timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         response.read())
        finally:
            connection.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(root: Path, *args: str, env: dict[str, str] | None = None,
                 wait: bool = True, command: list[str] | None = None, cwd: Path | None = None,
                 preexec_fn: Callable[[], Any] | None = None, port: int | None = None,
                 context: ssl.SSLContext | None = None) -> Server:
    """Start ``python -m imgserver serve`` (or ``command serve``) on ``port`` (by default a
    free one); wait until /healthz answers (over HTTPS with ``context``, when ``args`` make
    the server serve HTTPS).

    A free port may be taken by another test's server before this one binds it: then the
    server is started again on another, and /healthz counts only once this server says it
    listens (the other's would answer it too)."""
    for _ in range(PORT_TRIES if port is None else 1):
        chosen = port or free_port()
        log = root.parent / f"server-{chosen}.log"
        process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "imgserver"]), "serve", "--root", str(root),
             "--port", str(chosen), *args],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the child's)
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
            preexec_fn=preexec_fn)
        server = Server(process, chosen, root, log, context)
        if not wait:
            return server

        def healthy(server: Server = server) -> bool:
            if server.process.poll() is not None:
                return True  # judged below
            try:
                return (LISTENING in server.output()
                        and server.request("GET", "/healthz", timeout=2).status == 200)
            except OSError:
                return False
        wait_for(healthy, timeout=60)
        if server.process.poll() is None:
            return server
        if port is None and TAKEN in server.output():
            continue  # another test's server took the port first
        raise AssertionError(f"server exited {server.process.returncode}:\n{server.output()}")
    raise AssertionError(f"no free port taken in {PORT_TRIES} tries")


def shared_server(root: Path, images: list[tuple[str, int, int]], *args: str,
                  context: ssl.SSLContext | None = None) -> Iterator[Server]:
    """A server on ``root`` (given inbox/ and outbox/ and photo-like ``images``: name,
    width, height) for a whole test module, whose tests each use their own names (over
    HTTPS with ``context``, as for ``start_server``)."""
    from conftest import photo

    (root / "inbox").mkdir()
    (root / "outbox").mkdir()
    for name, width, height in images:
        assert cv2.imwrite(str(root / name), photo(height, width))
    running = start_server(root, *args, context=context)
    yield running
    running.stop()


def wait_state(server: Server, job_id: str, states: tuple[str, ...] = ("done", "failed"),
               timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict:
    """Poll a job until its state is one of ``states``; its status document."""
    def reached() -> dict | None:
        reply = server.request("GET", f"/jobs/{job_id}", headers=headers)
        if reply.status == 404:
            return None  # not yet: a dropped file not taken yet, a job not resumed yet
        document = reply.json()
        return document if document["state"] in states else None
    return wait_for(reached, timeout=timeout)


def monotonic_ms() -> float:
    return time.monotonic() * 1000


@dataclass
class SSE:
    """One Server-Sent Event as a client sees it."""

    event: str
    id: str
    data: Any


def stream_events(server: Server, path: str, *, last_id: str | None = None,
                  count: int | None = None, timeout: float = 60.0,
                  into: list[SSE] | None = None,
                  headers: dict[str, str] | None = None) -> list[SSE]:
    """Read the events of ``path`` until the server ends the stream (or ``count`` events),
    appending each to ``into`` as it comes."""
    headers = {**(headers or {}), **({"Last-Event-ID": last_id} if last_id else {})}
    connection = server.connection(timeout)
    found: list[SSE] = [] if into is None else into
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type", "").startswith("text/event-stream")
        fields: dict[str, str] = {}
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                found.append(SSE(fields.get("event", "message"), fields.get("id", ""),
                                 json.loads(fields.get("data", "null"))))
                fields = {}
                if count is not None and len(found) >= count:
                    break
    finally:
        connection.close()
    return found
