"""Helpers to run a real ``imgserver serve`` process on a loopback port and talk to it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import wait_for


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
class Server:
    """A running ``imgserver serve`` process."""

    process: subprocess.Popen
    port: int
    root: Path
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
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
                 preexec_fn: Callable[[], Any] | None = None) -> Server:
    """Start ``python -m imgserver serve`` (or ``command serve``) on a free port; wait until
    /healthz answers."""
    port = free_port()
    log = root.parent / f"server-{port}.log"
    process = subprocess.Popen(
        [*(command or [sys.executable, "-m", "imgserver"]), "serve", "--root", str(root),
         "--port", str(port), *args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the child keeps it)
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
        preexec_fn=preexec_fn)
    server = Server(process, port, root, log)
    if wait:
        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"server exited {process.returncode}:\n{server.output()}")
            try:
                return server.request("GET", "/healthz", timeout=2).status == 200
            except OSError:
                return False
        wait_for(healthy, timeout=60)
    return server


def wait_state(server: Server, job_id: str, states: tuple[str, ...] = ("done", "failed"),
               timeout: float = 60.0) -> dict:
    """Poll a job until its state is one of ``states``; its status document."""
    def reached() -> dict | None:
        document = server.request("GET", f"/jobs/{job_id}").json()
        return document if document["state"] in states else None
    return wait_for(reached, timeout=timeout)


def monotonic_ms() -> float:
    return time.monotonic() * 1000
