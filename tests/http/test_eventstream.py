"""Event stream answers on real connections: chunks written straight to the transport by
the hub's ticks, read by real HTTP clients (HTTP/1.1, HTTP/1.0, HTTPS)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trustme

from conftest import request_body, wait_for
from serving import SSE, Server, start_server, stream_events, tls_files


def follow_job(server: Server, clients: int, images: int) -> list[list[SSE]]:
    """``clients`` readers of /events while a job of ``images`` images runs: what each read
    (up to the job's end)."""
    seen: list[list[SSE]] = [[] for _ in range(clients)]
    readers = [threading.Thread(target=stream_events, args=(server, "/events"), kwargs={
        "count": images + 4, "timeout": 60, "into": into}, daemon=True) for into in seen]
    for reader in readers:
        reader.start()
    wait_for(lambda: f"imgserver_event_streams {clients}.0" in server.request(
        "GET", "/metrics").body.decode())
    reply = server.request("POST", "/jobs?wait=true", request_body(
        [("a.png", f"o/{time.monotonic_ns()}-{n}.png") for n in range(images)]))
    assert reply.json()["state"] == "done"
    for reader in readers:
        reader.join(60)
    return seen


def test_eventstream_many_clients_each_read_every_event_once_in_order(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 64, 48)
    server = start_server(root, "--workers", "2")
    try:
        seen = follow_job(server, 40, 60)
        first = [(event.event, event.id) for event in seen[0]]
        assert [name for name, _ in first] == ["job", "state"] + ["image"] * 60 + [
            "state", "end"]
        assert [int(seq) for _, seq in first] == sorted({int(seq) for _, seq in first})
        assert all([(event.event, event.id) for event in events] == first for events in seen)
        assert sorted(event.data["index"] for event in seen[-1] if event.event == "image") \
            == list(range(60))
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_eventstream_http10_client_reads_the_stream_without_chunks(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 64, 48)
    server = start_server(root, "--workers", "1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(b"GET /events HTTP/1.0\r\n\r\n")
        wait_for(lambda: "imgserver_event_streams 1.0" in server.request(
            "GET", "/metrics").body.decode())
        reply = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", f"o/{n}.png") for n in range(5)]))
        assert reply.json()["state"] == "done"
        received = b""
        while b"event: end" not in received:
            data = sock.recv(65536)
            assert data, received
            received += data
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
        assert body.startswith(b"event: job\r\n") or body.startswith(b"event: job\n")
        assert body.count(b"event: image") == 5  # the bare events, no chunk sizes between
        assert b"\r\n0\r\n" not in body
    finally:
        sock.close()
        assert server.stop() == 0


def test_eventstream_followed_over_https(root: Path, make_image: Callable[..., Path],
                                         test_ca: trustme.CA) -> None:
    make_image("a.png", 64, 48)
    tls = tls_files(root.parent / "tls", test_ca, "127.0.0.1")
    server = start_server(root, "--workers", "2", *tls.args(), context=tls.context())
    try:
        seen = follow_job(server, 5, 30)
        assert all([event.event for event in events] == ["job", "state"] + ["image"] * 30
                   + ["state", "end"] for events in seen)
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.output()
