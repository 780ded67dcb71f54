"""Clients and folders that try to break a real ``imgserver serve``: stalled and vanishing
connections, and a working folder full of names the server imports."""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest

from conftest import fill, photo, request_body, wait_for
from serving import Server, start_server, wait_state

READ_TIMEOUT = 5.0
#: Connections that stall, by how: 1,500 in all, against a server started with a soft
#: limit of 1,024 open files.
STALLS = {
    "headers, then nothing": (1200, b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: 100\r\n\r\n"),
    "half the headers": (100, b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Le"),
    "nothing at all": (100, b""),
    "half the body": (80, b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                          + b"{" * 50),
    "headers, then a byte every 0.4 s": (10, b"POST /jobs HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Length: 1000\r\n\r\n"),
    "a header byte every 0.4 s": (10, b"P"),
}
DRIP = 0.4


@pytest.fixture
def many_files() -> Iterator[int]:
    """This process's open-file soft limit, raised for thousands of client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sum(count for count, _ in STALLS.values()) + 500
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open-file hard limit is {hard}; this test needs {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def systemd_soft_limit() -> None:
    """In the server's process before it starts: the soft limit a systemd service gets."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit")


def clean_log(server: Server) -> str:
    """The server's log, checked for what a misbehaving client must never cause."""
    log = server.output()
    for sign in ("Traceback", "ERROR", "Exception in ASGI application", "ClientDisconnect"):
        assert sign not in log, f"{sign!r} in the server's log:\n{log[-5000:]}"
    return log


def test_hardening_stalled_clients_cannot_starve_the_server(
        root: Path, make_image: Callable[..., Path], many_files: int) -> None:
    make_image("a.png", 64, 48)
    server = start_server(root, "--workers", "1", "--read-timeout", str(READ_TIMEOUT),
                          preexec_fn=systemd_soft_limit)
    try:
        soft, hard = open_files_limit(server.process.pid)
        assert soft == hard > 1024, "the soft limit was raised to the hard limit at start"

        latencies: list[float] = []
        probing = threading.Event()

        def probe() -> None:
            while not probing.is_set():
                started = time.monotonic()
                try:
                    ok = server.request("GET", "/healthz", timeout=5).status == 200
                except OSError:
                    ok = False
                latencies.append(time.monotonic() - started if ok else float("inf"))
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            stalled = open_stalled_connections(server.port)
            job = server.request("POST", "/jobs", request_body([("a.png", "out/a.png")]))
            assert job.status == 202
            closed = watch_until_closed(stalled, timeout=READ_TIMEOUT + 10)
            assert wait_state(server, job.json()["id"])["state"] == "done"
        finally:
            probing.set()
            prober.join()
        assert len(closed) == len(stalled), f"{len(stalled) - len(closed)} never closed"
        late = [(how, round(at - opened, 2)) for (how, opened, _), (at, _) in
                zip(stalled, closed.values(), strict=True) if at - opened > READ_TIMEOUT + 1]
        assert not late, f"closed more than --read-timeout + 1 s after opening: {late[:10]}"
        answers = {how: {reply[:12] for (h, _, _), (_, reply) in zip(stalled, closed.values(),
                                                                      strict=True) if h == how}
                   for how in STALLS}
        for how in ("headers, then nothing", "half the body", "headers, then a byte every 0.4 s"):
            assert answers[how] == {b"HTTP/1.1 408"}, (how, answers[how])
        for how in ("half the headers", "nothing at all", "a header byte every 0.4 s"):
            assert answers[how] == {b""}, (how, answers[how])  # no request: closed, no answer
        assert len(latencies) > 20 and max(latencies) < 1.0, latencies
        print(f"\n{len(stalled)} stalled connections; /healthz answered {len(latencies)} times, "
              f"in {max(latencies) * 1000:.0f} ms at most, "
              f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms median")
    finally:
        exit_code = server.stop()
    assert exit_code == 0
    log = clean_log(server)
    assert log.count(f"no complete request within {READ_TIMEOUT:g} s (--read-timeout)") == len(
        stalled)


def open_stalled_connections(port: int) -> list[tuple[str, float, socket.socket]]:
    """Open every connection of STALLS, a hundred every 0.2 s: (how, when, socket)."""
    stalled = []
    for how, (count, first) in STALLS.items():
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            stalled.append((how, time.monotonic(), sock))
            if first:
                sock.sendall(first)
            if len(stalled) % 100 == 0:
                time.sleep(0.2)
    return stalled


def watch_until_closed(stalled: list[tuple[str, float, socket.socket]], timeout: float
                       ) -> dict[int, tuple[float, bytes]]:
    """Wait for the server to close each socket; when it did, and what it answered first.
    The dripping ones keep sending meanwhile."""
    closed: dict[int, tuple[float, bytes]] = {}
    received: dict[int, bytes] = {}
    drips = {index: sock for index, (how, _, sock) in enumerate(stalled) if "every" in how}
    with selectors.DefaultSelector() as selector:
        for index, (_, _, sock) in enumerate(stalled):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + timeout
        next_drip = time.monotonic() + DRIP
        while len(closed) < len(stalled) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.05):
                index, sock = key.data, key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except ConnectionError:
                    data = b""
                if data:
                    received[index] = received.get(index, b"") + data
                    continue
                closed[index] = (time.monotonic(), received.get(index, b""))
                selector.unregister(sock)
                sock.close()  # type: ignore[union-attr]
                drips.pop(index, None)
            if time.monotonic() >= next_drip:
                next_drip += DRIP
                for sock in drips.values():
                    with contextlib.suppress(OSError):  # closed: the selector reports it
                        sock.send(b"x")
    for _, _, sock in stalled:
        sock.close()
    return dict(sorted(closed.items()))


def vanish(sock: socket.socket, *, reset: bool) -> None:
    """Close a client socket: gently (FIN), or at once (RST)."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_hardening_clients_that_vanish_are_one_info_line_each(root: Path) -> None:
    # A job that takes a moment (a second or so): the client leaves while it runs.
    assert cv2.imwrite(str(root / "big.jpg"), cv2.resize(photo(100, 150), (3000, 2000)))
    slow = request_body([("big.jpg", f"out/{i}.jpg") for i in range(4)], ["blur=31,9"])
    server = start_server(root, "--workers", "1", "--read-timeout", "30")
    vanished = 0
    try:
        for reset in (False, True):
            # Mid-body: a tenth of the body promised, then gone.
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                         + b" " * 100)
            time.sleep(0.2)
            vanish(sock, reset=reset)
            # Mid-headers.
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /jobs?wait=true HTTP/1.1\r\nHost: x\r\nContent-Len")
            time.sleep(0.2)
            vanish(sock, reset=reset)
            # Mid-wait=true: the whole request, then gone while its job runs.
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /jobs?wait=true HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(slow)).encode() + b"\r\n\r\n" + slow)
            time.sleep(0.3)
            vanish(sock, reset=reset)
            vanished += 3
            wait_for(lambda n=vanished: server.output().count(" went away ") == n, timeout=30)
        # The jobs of the clients that left are done all the same.
        for status in (root / "outbox").glob("*.status.json"):
            assert wait_state(server, status.name.split(".")[0])["state"] == "done"
        # At shutdown, a request still coming in is answered 503 at once, not waited for.
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        assert server.request("GET", "/healthz").status == 200  # after the one above is read
        stopped = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - stopped < 10  # uvicorn alone would wait 10 s, then cancel
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 503")
        sock.close()
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
    log = clean_log(server)
    lines = [line for line in log.splitlines() if " went away " in line]
    assert len(lines) == vanished, lines
    assert all(line.startswith("INFO imgserver.http: client 127.0.0.1:") for line in lines)
    stages = [line.split(" went away ")[1].split(":")[0] for line in lines]
    assert stages.count("while sending its request") == 4  # mid-body and mid-headers
    assert stages.count("while waiting for its answer") == 2
    assert "closed the connection of client 127.0.0.1:" in log
    assert "the server is stopping" in log


#: Names the server, its workers and their helpers import, planted where the server is
#: started (its root): each records that it was imported, then breaks the importer.
SHADOWS = {
    "a folder named imgserver": ["imgserver/", "cv2/__init__.py", "numpy/__init__.py",
                                 "multiprocessing.py", "concurrent.py", "pickle.py"],
    "a package named imgserver": ["imgserver/__init__.py", "cv2.py", "numpy.py", "socket.py",
                                  "select.py", "signal.py", "ctypes.py", "json.py", "struct.py"],
}
#: For ``python -m imgserver``: a package of that name where it is started is what Python
#: runs (its own rule for -m), so only the names it imports after.
MODULE_SHADOWS = ["cv2.py", "numpy/__init__.py", "json.py", "struct.py", "pickle.py",
                  "multiprocessing.py", "concurrent.py"]


@pytest.mark.parametrize("layout", list(SHADOWS))
def test_hardening_working_folder_does_not_reach_the_workers(
        root: Path, make_image: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory,
        layout: str) -> None:
    command = Path(sys.executable).parent / "imgserver"  # as scripts/run and the unit start it
    if not command.exists():
        pytest.skip("imgserver is not installed in this environment")
    serve_from_a_shadowed_folder(root, make_image, tmp_path_factory, SHADOWS[layout],
                                 [str(command)])


def test_hardening_working_folder_does_not_reach_python_m_imgserver(
        root: Path, make_image: Callable[..., Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    serve_from_a_shadowed_folder(root, make_image, tmp_path_factory, MODULE_SHADOWS,
                                 [sys.executable, "-m", "imgserver"])


def serve_from_a_shadowed_folder(root: Path, make_image: Callable[..., Path],
                                 tmp_path_factory: pytest.TempPathFactory, names: list[str],
                                 command: list[str]) -> None:
    """Plant ``names`` in the root, start the server there, run an HTTP job and a drop-folder
    job: every image is done and nothing planted was imported."""
    imported = tmp_path_factory.mktemp("imported")
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            path.write_text(f"open({str(imported)!r} + '/' + __name__, 'w').close()\n"
                            f"raise ImportError('imported from the working folder: ' + __name__)\n")
    make_image("a.png", 40, 30)
    make_image("b.png", 30, 40)
    server = start_server(root, "--workers", "2", command=command, cwd=root)
    try:
        reply = server.request("POST", "/jobs", request_body(
            [("a.png", "out/a.png"), ("b.png", "out/b.png")], ["resize=50", "blur=3"]))
        (root / "inbox" / "dropped.json").write_bytes(request_body(
            [("a.png", "out/c.png"), ("b.png", "out/d.png")], ["split"]))
        assert wait_state(server, reply.json()["id"])["state"] == "done"
        wait_for(lambda: (root / "outbox" / "dropped.status.json").exists())
        assert wait_state(server, "dropped")["state"] == "done"
    finally:
        assert server.stop() == 0
    assert sorted(p.name for p in imported.iterdir()) == []
    assert "Traceback" not in server.output(), server.output()


def test_hardening_full_outbox_heals_by_itself_and_the_listing_agrees(
        root: Path, make_image: Callable[..., Path], mount: Callable[..., Path]) -> None:
    outbox = mount("outbox", "size=4m")
    for n in range(4):
        make_image(f"big{n}.png", 1600, 1200)
    server = start_server(root, "--workers", "1")
    try:
        job = server.request("POST", "/jobs", request_body(
            [(f"big{n % 4}.png", f"out/{n}.png") for n in range(12)], ["blur=61"]))
        assert job.status == 202
        job_id = job.json()["id"]
        wait_state(server, job_id, ("running",))
        filler = fill(outbox)
        refused = server.request("POST", "/jobs", request_body([("big0.png", "x.png")]))
        assert refused.status == 503 and "cannot store requests" in refused.json()["detail"]
        final = wait_state(server, job_id, ("done",), timeout=120)  # answered from memory
        assert server.request("GET", "/healthz").status == 503  # its files are not written
        filler.unlink()  # space is back; from here on, nothing but GETs
        healed = time.monotonic()
        wait_for(lambda: server.request("GET", "/healthz").status == 200, timeout=30)
        status_file = outbox / f"{job_id}.status.json"
        wait_for(lambda: status_file.exists() and json.loads(status_file.read_text())[
            "state"] == "done", timeout=30)
        listed = server.request("GET", "/jobs?limit=1000").json()["jobs"]
        assert [j["state"] for j in listed if j["id"] == job_id] == ["done"]
        assert json.loads(status_file.read_text())["progress"] == final["progress"]
        assert time.monotonic() - healed < 30
    finally:
        server.stop()
