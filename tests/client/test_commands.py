"""The client commands (submit, jobs, cancel) against a real server."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pty
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from imgserver.client.client import Client

from conftest import request_body
from serving import (
    Server,
    TLSFiles,
    free_port,
    shared_server,
    start_server,
    tls_files,
    wait_state,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with one worker for this module's tests (each uses its own names)."""
    images = [("a.png", 64, 48), ("big.png", 2400, 1800)]
    yield from shared_server(tmp_path_factory.mktemp("remote"), images, "--workers", "1")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> TLSFiles:
    """A certificate for 127.0.0.1 from the tests' CA, which no system trusts."""
    return tls_files(tmp_path_factory.mktemp("tls"), test_ca, "127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Server]:
    """A server like ``server``, over HTTPS with the certificate of ``tls``."""
    yield from shared_server(tmp_path_factory.mktemp("remote-tls"), [("a.png", 64, 48)],
                             "--workers", "1", *tls.args(), context=tls.context())


def imgserver(server: Server | None, *args: str, env: dict[str, str] | None = None,
              port: int | None = None, url: str | None = None) -> subprocess.CompletedProcess:
    url = url or (server.url if server else f"http://127.0.0.1:{port}")
    environ = {k: v for k, v in os.environ.items() if k != "IMGSERVER_CACERT"}
    return subprocess.run([sys.executable, "-m", "imgserver", *args, "--server", url],
                          capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})})


def write(root: Path, name: str, body: bytes) -> str:
    (root / name).write_bytes(body)
    return str(root / name)


def test_commands_submit_wait_exit_codes(server: Server) -> None:
    root = server.root
    done = imgserver(server, "submit", write(root, "ok.json", request_body(
        [("a.png", "o/1.png"), ("a.png", "o/2.png")], ["resize=50"])), "--wait")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["state"] == "done" and document["progress"] == {"done": 2, "total": 2}
    assert "2/2 a.png -> o/2.png: done" in done.stderr  # a line per image when not a terminal
    failed = imgserver(server, "submit", write(root, "bad.json", request_body(
        [("a.png", "o/3.png"), ("missing.png", "o/4.png")])), "--wait")
    assert failed.returncode == 1 and json.loads(failed.stdout)["state"] == "failed"
    invalid = imgserver(server, "submit", write(root, "inv.json", request_body(
        [("../x.png", "o/5.png")])), "--wait")
    assert invalid.returncode == 2 and "images[0].input" in invalid.stderr
    assert invalid.stdout == ""
    assert imgserver(server, "submit", str(root / "nope.json")).returncode == 2
    queued = imgserver(server, "submit", str(root / "ok.json"))
    assert queued.returncode == 0 and json.loads(queued.stdout)["state"] == "queued"


def test_commands_unreachable_or_refused_is_exit_3(root: Path, make_image: Callable[..., Path]
                                                 ) -> None:
    make_image("a.png")
    request = write(root, "ok.json", request_body([("a.png", "x.png")]))
    closed = imgserver(None, "submit", request, "--wait", port=free_port())
    assert closed.returncode == 3 and "cannot reach the server" in closed.stderr
    server = start_server(root, env={"IMGSERVER_TOKEN": "s3cret"})
    try:
        refused = imgserver(server, "submit", request, env={"IMGSERVER_TOKEN": "wrong"})
        assert refused.returncode == 3 and "refused the token" in refused.stderr
        accepted = imgserver(server, "submit", request, "--wait",
                             env={"IMGSERVER_TOKEN": "s3cret"})
        assert accepted.returncode == 0, accepted.stderr
        assert imgserver(server, "jobs", env={"IMGSERVER_TOKEN": "wrong"}).returncode == 3
    finally:
        server.stop()


def test_commands_default_server_is_port_8000_on_loopback(
        root: Path, make_image: Callable[..., Path]) -> None:
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(("127.0.0.1", 8000))
    except OSError as exc:
        pytest.skip(f"port 8000 of 127.0.0.1, where the client looks by default, is taken "
                    f"({exc.strerror})")
    make_image("a.png")
    request = write(root, "default.json", request_body([("a.png", "default.png")]))
    env = {k: v for k, v in os.environ.items() if k not in ("IMGSERVER_URL", "IMGSERVER_TOKEN")}
    server = start_server(root, port=8000)
    try:
        submitted = subprocess.run(  # neither --server nor IMGSERVER_URL
            [sys.executable, "-m", "imgserver", "submit", request, "--wait"],
            capture_output=True, text=True, timeout=120, env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["id"]
        assert server.request("GET", f"/jobs/{job_id}").json()["state"] == "done"
        assert (root / "default.png").exists()
    finally:
        server.stop()


def test_commands_submit_wait_draws_a_bar_on_a_terminal(server: Server) -> None:
    request = write(server.root, "bar.json", request_body(
        [("big.png", f"o/b{n}.png") for n in range(3)], ["blur=31"]))
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "imgserver", "submit", request, "--wait", "--server",
         f"http://127.0.0.1:{server.port}"], stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other end closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(60) == 0
    text = seen.decode()
    assert "\r[##########--------------------] 1/3 images" in text
    assert "[##############################] 3/3 images" in text
    assert json.loads(process.stdout.read())["state"] == "done"  # type: ignore[union-attr]


def test_commands_jobs_and_cancel(server: Server) -> None:
    small = server.request("POST", "/jobs?wait=true", request_body([("a.png", "j/1.png")]))
    slow = server.request("POST", "/jobs", request_body(
        [("big.png", f"j/s{n}.png") for n in range(40)], ["blur=31"])).json()["id"]
    wait_state(server, slow, ("running",))
    listed = imgserver(server, "jobs", "--limit", "2")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == [slow, "running", "http"]
    assert lines[1].split()[:4] == [small.json()["id"], "done", "http", "1/1"]
    by_variable = subprocess.run(  # no --server: IMGSERVER_URL says where
        [sys.executable, "-m", "imgserver", "jobs", "--limit", "2"], capture_output=True,
        text=True, timeout=120,
        env={**os.environ, "IMGSERVER_URL": f"http://127.0.0.1:{server.port}"})
    assert by_variable.returncode == 0
    assert by_variable.stdout.splitlines()[0].split()[:3] == [slow, "running", "http"]
    done = imgserver(server, "jobs", "--state", "done").stdout.splitlines()
    assert done[0] == lines[1] and all(" done " in line for line in done)
    as_json = [json.loads(line) for line in imgserver(
        server, "jobs", "--json", "--limit", "2").stdout.split("\n") if line]
    assert [job["id"] for job in as_json] == [slow, small.json()["id"]]
    assert imgserver(server, "jobs", "--state", "nope").returncode == 2
    cancelled = imgserver(server, "cancel", slow)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["id"] == slow
    assert wait_state(server, slow, ("cancelled",))["error"].startswith("cancelled: ")
    finished = imgserver(server, "cancel", small.json()["id"])
    assert finished.returncode == 1 and "already done" in finished.stderr
    assert imgserver(server, "cancel", "no-such-job").returncode == 2


class Cutter:
    """A TCP proxy to the server that cuts its first connection after ``limit`` bytes back."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = free_port()
        self.cuts = 0
        listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, args=(listener, port, limit), daemon=True).start()

    def _serve(self, listener: socket.socket, port: int, limit: int) -> None:
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            cut = self.cuts == 0
            self.cuts += 1
            threading.Thread(target=self._pipe, args=(client, upstream, None),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit if cut else None),
                             daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    target.sendall(data[:limit - sent])
                    break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_commands_follow_survives_a_dropped_connection(server: Server) -> None:
    job_id = server.request("POST", "/jobs", request_body(
        [("big.png", f"f/{n}.png") for n in range(4)], ["blur=31"])).json()["id"]
    cutter = Cutter(server.port, limit=1200)  # the headers, the status event, a little more
    client = Client(f"http://127.0.0.1:{cutter.port}", sleep=lambda seconds: None)
    seen: list[tuple[str, int | None]] = []

    def note(name: str, data: dict) -> None:
        if name == "status":  # images finished before this (re)connection
            seen.extend(("done before", n) for n, image in enumerate(data["images"])
                        if image["state"] == "done")
        seen.append((name, data.get("index")))

    try:
        final = client.follow(job_id, note)
    finally:
        client.close()
    assert cutter.cuts >= 2 and final["state"] == "done"
    events = [index for name, index in seen if name == "image"]
    assert len(events) == len(set(events))  # no event twice
    reported = {index for name, index in seen if name in ("image", "done before")}
    assert reported == {0, 1, 2, 3}  # nothing missed
    assert seen[-1] == ("end", None)


def test_commands_over_https_with_cacert(https_server: Server, tls: TLSFiles) -> None:
    request = write(https_server.root, "tls.json", request_body([("a.png", "t/1.png")]))
    done = imgserver(https_server, "submit", request, "--wait", "--cacert", str(tls.cacert))
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["id"]
    assert json.loads(done.stdout)["state"] == "done" and (https_server.root / "t/1.png").exists()
    assert "1/1 a.png -> t/1.png: done" in done.stderr
    listed = imgserver(https_server, "jobs", "--cacert", str(tls.cacert))
    assert listed.returncode == 0 and listed.stdout.split()[:2] == [job_id, "done"]
    by_variable = imgserver(https_server, "jobs", "--json",
                            env={"IMGSERVER_CACERT": str(tls.cacert)})
    assert by_variable.returncode == 0, by_variable.stderr
    assert json.loads(by_variable.stdout.splitlines()[0])["id"] == job_id
    finished = imgserver(https_server, "cancel", job_id, env={"IMGSERVER_CACERT": str(tls.cacert)})
    assert finished.returncode == 1 and "already done" in finished.stderr


def test_commands_https_server_whose_certificate_does_not_verify_is_exit_3(
        https_server: Server, tmp_path: Path) -> None:
    request = write(https_server.root, "untrusted.json", request_body([("a.png", "u/1.png")]))
    stranger = tmp_path / "stranger.pem"  # another CA: not the one that signed the server's
    trustme.CA().cert_pem.write_to_path(str(stranger))
    refused = [
        imgserver(https_server, "submit", request, "--wait"),  # the system's CAs only
        imgserver(https_server, "jobs"),
        imgserver(https_server, "cancel", "some-job"),
        imgserver(https_server, "submit", request, "--cacert", str(stranger)),
        imgserver(https_server, "jobs", env={"IMGSERVER_CACERT": str(stranger)}),
    ]
    for result in refused:
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith(f"imgserver: the certificate of the server at "
                                        f"{https_server.url} does not verify: ")
        assert "unable to get local issuer certificate" in result.stderr
        assert "--cacert FILE or IMGSERVER_CACERT" in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (https_server.root / "u").exists()


#: A certificate the client refuses, signed by the CA it is given, and the reason it says.
UNVERIFIED = {"another-host-name": "IP address mismatch, certificate is not valid for '127.0.0.1'",
              "expired": "certificate has expired"}


@pytest.mark.parametrize("case", UNVERIFIED)
def test_commands_https_certificate_for_another_host_or_expired_is_exit_3(
        root: Path, test_ca: trustme.CA, case: str) -> None:
    if case == "expired":
        yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        tls = tls_files(root.parent / "tls", test_ca, "127.0.0.1", not_after=yesterday)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # to see it start, and no more
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        tls = tls_files(root.parent / "tls", test_ca, "imgserver.example")
        context = tls.context()
        context.check_hostname = False
    server = start_server(root, "--workers", "1", *tls.args(), context=context)
    try:
        result = imgserver(server, "jobs", "--cacert", str(tls.cacert))
    finally:
        server.stop()
    assert result.returncode == 3, result.stderr
    assert (f"the certificate of the server at {server.url} does not verify: "
            f"{UNVERIFIED[case]}") in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_cacert_that_cannot_be_read_is_exit_2(root: Path) -> None:
    request = write(root, "ok.json", request_body([("a.png", "x.png")]))
    url = f"https://127.0.0.1:{free_port()}"  # no server: the file is read before connecting
    missing = imgserver(None, "submit", request, "--cacert", str(root / "nope.pem"), url=url)
    assert missing.returncode == 2
    assert f"cannot read --cacert '{root / 'nope.pem'}': No such file or directory" in (
        missing.stderr)
    by_variable = imgserver(None, "jobs", env={"IMGSERVER_CACERT": str(root / "nope.pem")},
                            url=url)
    assert by_variable.returncode == 2 and "cannot read --cacert" in by_variable.stderr
    not_pem = imgserver(None, "cancel", "x", "--cacert", request, url=url)
    assert not_pem.returncode == 2
    assert f"--cacert {request!r} holds no PEM certificate" in not_pem.stderr
    for result in (missing, by_variable, not_pem):
        assert "Traceback" not in result.stderr and result.stdout == ""
