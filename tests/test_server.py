"""``imgserver serve`` end to end: a real process on a loopback port, real signals."""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from imgserver import server as server_module
from imgserver.images.pipeline import TEMP_SUFFIX

from conftest import job_files, request_body, wait_for
from serving import Server, free_port, start_server, stream_events, tls_files, wait_state


@pytest.fixture
def server(root: Path) -> Iterator[Server]:
    running = start_server(root, "--workers", "2")
    yield running
    running.stop(signal.SIGKILL if running.process.poll() is None else signal.SIGTERM)


def test_server_submit_poll_wait_and_404(server: Server, make_image: Callable[..., Path]) -> None:
    make_image("a.jpg", 64, 48)
    reply = server.request("POST", "/jobs", request_body([("a.jpg", "out/a.png")], ["resize=50"]))
    assert reply.status == 202 and reply.headers["location"] == f"/jobs/{reply.json()['id']}"
    document = wait_state(server, reply.json()["id"])
    assert document["state"] == "done"
    assert cv2.imread(str(server.root / "out/a.png")).shape == (24, 32, 3)
    reply = server.request("POST", "/jobs?wait=true", request_body([("a.jpg", "out/b.png")]))
    assert reply.status == 200 and reply.json()["state"] == "done"
    assert server.request("GET", "/jobs/does-not-exist").status == 404


@pytest.mark.parametrize("body, field", [
    (b"{", "request"),
    (json.dumps({"images": [{"input": "a.jpg", "output": "x.png"}]}).encode(), "operations"),
    (request_body([("a.jpg", "x.png")], ["resize=0"]), "operations[0]"),
    (request_body([("../outside.jpg", "x.png")]), "images[0].input"),
    (request_body([("a.jpg", "../../x.png")]), "images[0].output"),
    (request_body([("/etc/passwd", "x.png")]), "images[0].input"),
    (request_body([("a.jpg", "x.png"), ("b.jpg", "x.png")]), "images[1].output"),
])
def test_server_invalid_requests_are_422(server: Server, body: bytes, field: str) -> None:
    reply = server.request("POST", "/jobs", body)
    assert reply.status == 422
    assert field in [problem["field"] for problem in reply.json()["errors"]]
    assert job_files(server.root / "outbox") == []


def test_server_symlink_escape_is_422(server: Server, tmp_path_factory: pytest.TempPathFactory
                                      ) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (server.root / "escape").symlink_to(outside)
    reply = server.request("POST", "/jobs", request_body([("a.jpg", "escape/x.png")]))
    assert reply.status == 422 and "outside the root" in reply.json()["detail"]
    assert list(outside.iterdir()) == []


def test_server_twenty_clients_at_once_lose_nothing(server: Server,
                                                    make_image: Callable[..., Path]) -> None:
    make_image("a.png", 120, 90)
    ids: list[str] = []
    failures: list[str] = []

    def client(index: int) -> None:
        reply = server.request("POST", "/jobs", request_body([("a.png", f"out/{index}.png")],
                                                             ["resize=50"]))
        if reply.status == 202:
            ids.append(reply.json()["id"])
        else:
            failures.append(f"{reply.status} {reply.body!r}")

    threads = [threading.Thread(target=client, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(set(ids)) == 20
    for job_id in ids:
        assert wait_state(server, job_id)["state"] == "done"
    assert len(list((server.root / "out").glob("*.png"))) == 20
    assert len(list((server.root / "outbox").glob("*.status.json"))) == 20


def test_server_full_queue_is_503_and_accepts_nothing(root: Path,
                                                      make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1", "--max-queue", "3")
    try:
        busy = request_body([("big.png", f"out/{i}.png") for i in range(3)], ["blur=31"])
        assert server.request("POST", "/jobs", busy).status == 202
        reply = server.request("POST", "/jobs", request_body([("big.png", "out/x.png")]))
        assert reply.status == 503 and reply.headers["retry-after"].isdigit()
        assert "the queue is full" in reply.json()["detail"]
        assert len(list((root / "outbox").glob("*.request.json"))) == 1
        assert server.request("GET", "/healthz").status == 200
    finally:
        assert server.stop() == 0


def test_server_token_from_environment(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    server = start_server(root, env={"IMGSERVER_TOKEN": "t0ken"})
    try:
        body = request_body([("a.png", "b.png")])
        assert server.request("POST", "/jobs", body).status == 401
        reply = server.request("POST", "/jobs?wait=true", body,
                               headers={"Authorization": "Bearer t0ken"})
        assert reply.status == 200
        assert server.request("GET", f"/jobs/{reply.json()['id']}").status == 401
        assert server.request("GET", "/healthz").status == 200
        docs = server.request("GET", "/docs")
        assert docs.status == 200 and b"https://" not in docs.body and b"http://" not in docs.body
    finally:
        server.stop()


def test_server_binds_loopback_by_default(server: Server) -> None:
    assert "http://127.0.0.1:" in server.output()


def test_server_health_stays_fast_during_a_slow_job(server: Server,
                                                    make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    reply = server.request("POST", "/jobs", request_body(
        [("big.png", f"out/{i}.png") for i in range(4)], ["blur=31"]))
    wait_state(server, reply.json()["id"], ("running",), timeout=30)
    started = time.monotonic()
    assert server.request("GET", "/healthz", timeout=5).status == 200
    assert time.monotonic() - started < 2.0  # the event loop is not held by the job
    wait_state(server, reply.json()["id"])


def test_server_sigterm_finishes_running_images_and_exits_0(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1")
    body = request_body([("big.png", f"out/{i}.png") for i in range(12)], ["blur=31"])
    job_id = server.request("POST", "/jobs", body).json()["id"]
    wait_for(lambda: server.request("GET", f"/jobs/{job_id}").json()["progress"]["done"] >= 1)
    assert server.stop(signal.SIGTERM) == 0
    saved = json.loads((root / "outbox" / f"{job_id}.status.json").read_text())
    states = [image["state"] for image in saved["images"]]
    assert "running" not in states and "queued" in states and saved["state"] == "running"
    assert not list(root.rglob(f"*{TEMP_SUFFIX}"))
    restarted = start_server(root, "--workers", "2")
    try:
        final = wait_state(restarted, job_id, timeout=120)
        assert final["state"] == "done" and len(list((root / "out").glob("*.png"))) == 12
    finally:
        assert restarted.stop(signal.SIGINT) == 0


def test_server_kill_9_mid_job_then_restart_finishes_it(root: Path,
                                                        make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "2")
    body = request_body([("big.png", f"out/{i:02d}.png") for i in range(16)], ["blur=31"])
    job_id = server.request("POST", "/jobs", body).json()["id"]
    wait_for(lambda: server.request("GET", f"/jobs/{job_id}").json()["progress"]["done"] >= 2)
    server.stop(signal.SIGKILL)
    restarted = start_server(root, "--workers", "2")
    try:
        final = wait_state(restarted, job_id, timeout=180)
    finally:
        restarted.stop()
    assert final["state"] == "done"
    outputs = sorted((root / "out").glob("*.png"))
    assert len(outputs) == 16
    for output in outputs:  # every output complete and decodable
        assert cv2.imread(str(output)).shape == (1800, 2400, 3)
    wait_for(lambda: not list(root.rglob(f"*{TEMP_SUFFIX}")), timeout=30)


def test_server_second_instance_on_same_outbox_refuses(server: Server) -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root",
                             str(server.root), "--port", "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "another 'imgserver serve' is using" in result.stderr


def test_server_drop_folder_runs_the_readme_example(server: Server) -> None:
    photos = Path(__file__).resolve().parent.parent / "examples" / "photos"
    shutil.copytree(photos, server.root / "examples" / "photos")
    example = (photos.parent / "request.json").read_bytes()
    (server.root / "inbox" / ".example.json").write_bytes(example)
    (server.root / "inbox" / ".example.json").rename(server.root / "inbox" / "example.json")
    status = server.root / "outbox" / "example.status.json"
    wait_for(lambda: status.exists() and json.loads(status.read_text())["state"] == "done")
    outputs = server.root / "examples" / "output"
    assert sorted(path.name for path in outputs.iterdir()) == ["landscape.webp", "logo.png"]
    assert cv2.imread(str(outputs / "landscape.webp")).shape == (267, 400, 3)  # fitted: 900x600
    assert cv2.imread(str(outputs / "logo.png"), cv2.IMREAD_UNCHANGED).shape == (200, 200, 4)
    assert server.request("GET", "/jobs/example").json() == json.loads(status.read_text())
    assert list((server.root / "inbox").iterdir()) == []


def test_server_serves_https_with_tls_cert_and_key(root: Path, make_image: Callable[..., Path],
                                                   test_ca: trustme.CA) -> None:
    make_image("a.png", 64, 48)
    tls = tls_files(root.parent / "tls", test_ca, "127.0.0.1", "localhost")
    server = start_server(root, "--workers", "1", *tls.args(), context=tls.context())
    try:  # /healthz answered over HTTPS, verified against the CA: the server is up
        reply = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", "out/a.png")], ["resize=50"]))
        assert reply.status == 200 and reply.json()["state"] == "done"
        assert cv2.imread(str(root / "out/a.png")).shape == (24, 32, 3)
        events = stream_events(server, f"/jobs/{reply.json()['id']}/events", timeout=10)
        assert [event.event for event in events] == ["status", "end"]
        by_name = http.client.HTTPSConnection("localhost", server.port, timeout=10,
                                              context=tls.context())
        try:  # the certificate's other name
            by_name.request("GET", "/healthz")
            assert by_name.getresponse().status == 200
        finally:
            by_name.close()
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:  # the port speaks TLS only: plain HTTP gets no answer
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                plain.request("GET", "/healthz")
                plain.getresponse()
        finally:
            plain.close()
        assert f"on https://127.0.0.1:{server.port}" in server.output()
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_server_https_handshake_gets_the_read_timeout(root: Path, test_ca: trustme.CA) -> None:
    tls = tls_files(root.parent / "tls", test_ca, "127.0.0.1")
    server = start_server(root, "--workers", "1", "--read-timeout", "1", *tls.args(),
                          context=tls.context())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent:
            began = time.monotonic()
            with contextlib.suppress(ConnectionResetError):  # closed, like a silent client
                assert silent.recv(1) == b""                   # of plain HTTP
            assert time.monotonic() - began < 10  # asyncio's own limit would be 60 s
        assert server.request("GET", "/healthz", timeout=10).status == 200
    finally:
        assert server.stop() == 0


def _encrypted(key: Path) -> bytes:
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(b"secret"))


#: What the server says when it refuses to start: the name of the case, and its message
#: ({tls}: the folder of the certificate, the key and the CA).
TLS_REFUSALS = {
    "cert-without-key": "--tls-cert is set but --tls-key (IMGSERVER_TLS_KEY) is not",
    "key-without-cert": "--tls-key is set but --tls-cert (IMGSERVER_TLS_CERT) is not",
    "key-missing": "cannot read --tls-key '{tls}/nope.pem': No such file or directory",
    "cert-a-folder": "cannot read --tls-cert '{tls}': Is a directory",
    "cert-not-a-certificate": "--tls-cert '{tls}/key.pem' holds no PEM certificate",
    "key-not-a-key": "--tls-key '{tls}/cert.pem' holds no PEM private key",
    "key-of-another-certificate": "--tls-key '{tls}/other.pem' is not the private key of",
    "key-encrypted": "--tls-key '{tls}/encrypted.pem' is encrypted",
}


@pytest.mark.parametrize("case", TLS_REFUSALS)
def test_server_tls_options_refused_at_start(root: Path, test_ca: trustme.CA, case: str
                                             ) -> None:
    tls = tls_files(root.parent / "tls", test_ca, "127.0.0.1")
    folder = tls.cert.parent
    test_ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(folder / "other.pem"))
    (folder / "encrypted.pem").write_bytes(_encrypted(tls.key))
    options, env = {
        "cert-without-key": (["--tls-cert", tls.cert], {}),
        "key-without-cert": ([], {"IMGSERVER_TLS_KEY": str(tls.key)}),
        "key-missing": (["--tls-cert", tls.cert, "--tls-key", folder / "nope.pem"], {}),
        "cert-a-folder": (["--tls-cert", folder, "--tls-key", tls.key], {}),
        "cert-not-a-certificate": (["--tls-cert", tls.key, "--tls-key", tls.key], {}),
        "key-not-a-key": (["--tls-cert", tls.cert, "--tls-key", tls.cert], {}),
        "key-of-another-certificate": (["--tls-cert", tls.cert,
                                        "--tls-key", folder / "other.pem"], {}),
        "key-encrypted": (["--tls-cert", tls.cert, "--tls-key", folder / "encrypted.pem"], {}),
    }[case]
    result = subprocess.run(
        [sys.executable, "-m", "imgserver", "serve", "--root", str(root), "--port",
         str(free_port()), "--workers", "1", *map(str, options)], capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, **env})
    assert result.returncode == 2, result.stderr
    assert TLS_REFUSALS[case].format(tls=folder) in result.stderr
    assert "Traceback" not in result.stderr


def test_server_interpreter_tuned_for_many_small_jobs() -> None:
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        server_module._tune_interpreter()
        assert gc.get_freeze_count() > 0  # start-up objects left out of collections
        assert gc.get_threshold() == (server_module.YOUNG_GENERATION, *before[1:])
        assert sys.getswitchinterval() == pytest.approx(server_module.SWITCH_INTERVAL)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)
