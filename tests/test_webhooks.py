"""Completion webhooks against a real receiver, verified with the standardwebhooks package."""

from __future__ import annotations

import base64
import email.utils
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from imgserver.webhooks import message_id, payload, retry_delay, sign

from conftest import request_body, wait_for
from processes import peak_rss_kib
from receiver import Receiver
from serving import Reply, Server, start_server

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def webhook_server(root: Path, *urls: str, allow: str = "") -> Server:
    args = [*(["--notify-url", urls[0]] if urls else []),
            *(["--notify-allow", allow] if allow else [])]
    return start_server(root, *args, env={"IMGSERVER_NOTIFY_SECRET": SECRET})


def notifications(server: Server, job_id: str) -> list[dict]:
    return server.request("GET", f"/jobs/{job_id}").json()["notifications"]


def settled(server: Server, job_id: str) -> list[dict]:
    """The job's notifications once none is pending."""
    return wait_for(lambda: [n for n in notifications(server, job_id)
                             if n["state"] != "pending"] and all(
        n["state"] != "pending" for n in notifications(server, job_id))
        and notifications(server, job_id), timeout=60)


def test_webhooks_signature_matches_the_reference_implementation() -> None:
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    document = {"id": "j", "state": "done", "finished_at": "2026-12-01T00:00:00.000+00:00",
                "notifications": [{"url": "http://x/", "state": "delivered", "attempts": 3,
                                   "last_error": None, "next_attempt_at": None}]}
    body = payload(document)
    assert body == payload({**document, "notifications": [{"url": "http://x/"}]})  # stable
    moment = int(time.time())
    headers = {"webhook-id": message_id("j", 0), "webhook-timestamp": str(moment),
               "webhook-signature": sign(key, message_id("j", 0), moment, body)}
    data = Webhook(SECRET).verify(body, headers)
    assert data["type"] == "job.done" and data["data"]["id"] == "j"
    assert data["timestamp"] == "2026-12-01T00:00:00.000+00:00"
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(SECRET).verify(body + b" ", headers)


def test_webhooks_delivered_signed_to_global_and_request_urls(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    other = Receiver()
    server = webhook_server(root, f"http://user:pass@127.0.0.1:{receiver.port}/hook",
                            allow=f"http://127.0.0.1:{other.port}/")
    try:
        body = json.loads(request_body([("a.png", "x.png")]))
        body["notify"] = f"http://127.0.0.1:{other.port}/mine?x=1"
        done = server.request("POST", "/jobs?wait=true", json.dumps(body).encode()).json()
        assert [n["url"] for n in done["notifications"]] == [
            receiver.url, f"http://127.0.0.1:{other.port}/mine?x=1"]  # without credentials
        final = settled(server, done["id"])
        assert [(n["state"], n["attempts"]) for n in final] == [("delivered", 1)] * 2
        for sink, path in ((receiver, "/hook"), (other, "/mine?x=1")):
            [delivery] = sink.deliveries
            assert delivery.path == path
            event = Webhook(SECRET).verify(delivery.body, delivery.headers)
            assert event["type"] == "job.done" and event["data"]["id"] == done["id"]
            assert event["data"]["images"] == done["images"]
        assert receiver.deliveries[0].headers.get("authorization", "").startswith("Basic ")
    finally:
        server.stop()
        other.close()


def test_webhooks_retry_after_500_then_delivered_with_the_same_id(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver.answers = [(500, {"Retry-After": "1"}), 200]
    server = webhook_server(root, receiver.url)
    try:
        job = server.request("POST", "/jobs?wait=true", request_body(
            [("missing.png", "x.png")])).json()
        wait_for(lambda: len(receiver.deliveries) == 1)
        pending = wait_for(lambda: (lambda entry: entry if entry["attempts"] == 1 else None)(
            notifications(server, job["id"])[0]))  # recorded just after the answer
        assert pending["state"] == "pending"
        assert pending["last_error"] == "HTTP 500 Internal Server Error"
        assert pending["next_attempt_at"]
        [final] = settled(server, job["id"])
        assert final["state"] == "delivered" and final["attempts"] == 2
        first, second = receiver.deliveries
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert first.body == second.body
        assert 0.9 <= second.at - first.at < 4.0  # Retry-After: 1 was honoured (the
        # schedule's first step is 5 s, 4.5 s at the least with its jitter)
        event = Webhook(SECRET).verify(second.body, second.headers)
        assert event["type"] == "job.failed"
    finally:
        server.stop()


#: The retries SPEC §9 promises, in seconds: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h.
SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)


def test_webhooks_retry_delay_follows_the_schedule_with_jitter() -> None:
    for attempts, step in enumerate(SCHEDULE, 1):
        delays = [retry_delay(attempts) for _ in range(400)]
        assert None not in delays
        low, high = min(delays), max(delays)
        assert 0.9 * step <= low and high <= 1.1 * step, (attempts, low, high)  # +-10 %
        # Jittered, both ways (by chance alone this fails once in 10^49 runs).
        assert low < 0.95 * step and high > 1.05 * step, (attempts, low, high)
    assert retry_delay(len(SCHEDULE) + 1) is None  # seven retries, then it has failed
    assert retry_delay(len(SCHEDULE) + 1, retry_after=60.0) is None


def test_webhooks_retry_delay_honours_retry_after() -> None:
    assert retry_delay(1, retry_after=120.0) == 120.0  # longer than the first step
    assert retry_delay(6, retry_after=30.0) == 30.0  # shorter than the sixth, 10 h
    assert retry_delay(1, retry_after=0.0) == 1.0  # never at once, never a loop
    assert retry_delay(1, retry_after=-50.0) == 1.0  # a date in the past
    assert retry_delay(2, retry_after=1e9) == 36000.0  # never longer than the longest step


def test_webhooks_next_attempt_honours_retry_after_seconds_and_dates(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    later = time.time() + 7200
    receiver.answers = [(503, {"Retry-After": "3600"}),
                        (429, {"Retry-After": email.utils.formatdate(later, usegmt=True)}),
                        500]
    server = webhook_server(root, receiver.url)
    try:
        waits = []
        for n in range(3):  # one job at a time: its delivery gets the next answer
            job = server.request("POST", "/jobs?wait=true", request_body(
                [("a.png", f"{n}.png")])).json()
            entry = wait_for(lambda job=job: (lambda e: e if e["attempts"] == 1 else None)(
                notifications(server, job["id"])[0]))
            assert entry["state"] == "pending", entry
            due = datetime.fromisoformat(entry["next_attempt_at"]).timestamp()
            waits.append(due - receiver.deliveries[n].at)
        assert 3599 <= waits[0] <= 3602  # Retry-After in seconds
        assert abs(waits[1] + receiver.deliveries[1].at - later) <= 2  # an HTTP date
        assert 4.5 - 0.1 <= waits[2] <= 5.5 + 2  # none: the schedule's first step
        assert len(receiver.deliveries) == 3
    finally:
        server.stop()

def test_webhooks_pending_delivery_keeps_its_job_past_keep_finished(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver.answers = [(500, {"Retry-After": "3"}), 200]
    server = start_server(root, "--notify-url", receiver.url, "--keep-finished", "1s",
                          env={"IMGSERVER_NOTIFY_SECRET": SECRET})
    try:
        job_id = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", "kept.png")])).json()["id"]
        deadline = time.monotonic() + 30
        while len(receiver.deliveries) < 2:  # past --keep-finished, its webhook pending
            assert time.monotonic() < deadline, "the second attempt never came"
            reply = server.request("GET", f"/jobs/{job_id}")
            assert reply.status == 200, "removed while its webhook was pending"
            time.sleep(0.1)
        wait_for(lambda: server.request("GET", f"/jobs/{job_id}").status == 404)  # then
        assert (root / "kept.png").exists()
    finally:
        server.stop()


def test_webhooks_410_stops_at_once(root: Path, receiver: Receiver,
                                    make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver.answers = [410]
    server = webhook_server(root, receiver.url)
    try:
        job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "x.png")])).json()
        [final] = settled(server, job["id"])
        assert final["state"] == "failed" and final["attempts"] == 1
        assert final["last_error"] == "HTTP 410 Gone"
        time.sleep(1.0)
        assert len(receiver.deliveries) == 1
    finally:
        server.stop()


def test_webhooks_pending_delivery_survives_kill_9_and_a_dead_receiver(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver = Receiver()
    url = receiver.url
    receiver.close()  # down: the first attempt fails
    server = webhook_server(root, url)
    job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "x.png")])).json()
    wait_for(lambda: notifications(server, job["id"])[0]["attempts"] == 1)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    port = int(url.split(":")[2].split("/")[0])
    receiver = Receiver(port=port)
    server = webhook_server(root, url)
    try:
        [final] = settled(server, job["id"])
        assert final["state"] == "delivered" and final["attempts"] == 2
        assert len(receiver.deliveries) == 1
        Webhook(SECRET).verify(receiver.deliveries[0].body, receiver.deliveries[0].headers)
    finally:
        server.stop()
        receiver.close()


def test_webhooks_hanging_receiver_times_out_and_jobs_go_on(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver.answers = ["hang", "drip"]  # silent; and an answer a byte a second
    server = webhook_server(root, receiver.url)
    try:
        first = server.request("POST", "/jobs?wait=true", request_body([("a.png", "1.png")]))
        wait_for(lambda: receiver.deliveries)
        started = time.monotonic()
        later = []
        for n in range(3):  # jobs, and their webhooks, go on meanwhile
            reply = server.request("POST", "/jobs?wait=true", request_body(
                [("a.png", f"{n}.png")]), timeout=10)
            assert reply.json()["state"] == "done"
            later.append(reply.json()["id"])
        assert time.monotonic() - started < 8.0
        wait_for(lambda: len(receiver.deliveries) >= 4)
        silent = wait_for(lambda: notifications(server, first.json()["id"])[0]["attempts"]
                          == 1 and notifications(server, first.json()["id"])[0], timeout=20)
        assert silent["last_error"] == "no answer within 10 s"  # 10 s for the whole attempt
        assert silent["state"] == "pending"
        # A 200 whose body drips is a 200: judged by its status line, not waited for.
        dripped = notifications(server, later[0])[0]
        assert dripped["state"] == "delivered" and dripped["attempts"] == 1, dripped
    finally:
        server.stop()


def test_webhooks_endless_answer_costs_a_few_kilobytes_and_counts_as_delivered(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    receiver.answers = ["flood"]  # 200, no length, 64 KiB chunks for 40 s
    server = webhook_server(root, receiver.url)
    try:
        before = peak_rss_kib(server.process.pid)
        job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "1.png")]))
        entry = wait_for(lambda: notifications(server, job.json()["id"])[0]["state"]
                         != "pending" and notifications(server, job.json()["id"])[0],
                         timeout=15)  # not the 40 s the receiver would go on for
        assert entry["state"] == "delivered" and entry["attempts"] == 1, entry
        assert entry["last_error"] is None
        grown = peak_rss_kib(server.process.pid) - before
        assert grown < 32 * 1024, f"the server's peak memory grew by {grown} KiB"
        # The server hung up after a few kilobytes: what got out is what the socket buffers
        # held, megabytes at most, not the gigabytes 40 s of streaming would be.
        assert receiver.sent < 64 << 20, receiver.sent
    finally:
        server.stop()


def test_webhooks_notify_outside_allow_list_is_422_and_writes_nothing(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    server = webhook_server(root, allow="https://hooks.example.com/")
    try:
        for url, message in [(receiver.url, "does not start with an allowed prefix"),
                             ("ftp://hooks.example.com/x", "is not an http or https URL"),
                             (7, "expected a URL string")]:
            body = json.loads(request_body([("a.png", "x.png")]))
            body["notify"] = url
            reply = server.request("POST", "/jobs", json.dumps(body).encode())
            assert reply.status == 422
            [error] = reply.json()["errors"]
            assert error["field"] == "notify" and message in error["message"]
        assert not list((root / "outbox").glob("*.json"))
    finally:
        server.stop()


def test_webhooks_notify_is_matched_on_the_url_boundaries(
        root: Path, receiver: Receiver, make_image: Callable[..., Path]) -> None:
    # Each refused URL would have passed a string prefix test; each would have reached the
    # receiver, at /admin, /hooks-evil/ or with credentials, or another port on its host.
    make_image("a.png")
    base = f"http://127.0.0.1:{receiver.port}"
    server = webhook_server(root, allow=f"{base}/hooks,http://localhost")
    try:
        def submit(url: str, wait: bool = False) -> Reply:
            body = json.loads(request_body([("a.png", "x.png")]))
            body["notify"] = url
            return server.request("POST", "/jobs" + ("?wait=true" if wait else ""),
                                  json.dumps(body).encode())

        for url, message in [
                (f"{base}/hooks/../admin", f"resolves to '{base}/admin', which does not start "
                                           f"with an allowed prefix"),
                (f"{base}/hooks/%2e%2e/admin", "which does not start with an allowed prefix"),
                (f"{base}/hooks-evil/x", "does not start with an allowed prefix"),
                (f"http://localhost:{receiver.port}/hooks/x", "does not start with an "
                                                              "allowed prefix"),  # another port
                ("http://localhost.evil.example/", "does not start with an allowed prefix"),
                (f"http://user:pw@127.0.0.1:{receiver.port}/hooks/x",
                 "carries a user name or password"),
                (f"{base}/hooks/x\\..\\..\\admin", "has a backslash"),
                (f"{base}/hooks/..%2fadmin", "has an encoded '/'")]:
            reply = submit(url)
            assert reply.status == 422, (url, reply.json())
            [error] = reply.json()["errors"]
            assert error["field"] == "notify" and message in error["message"], error
            assert error["message"].endswith(
                f"(allowed prefixes: '{base}/hooks', 'http://localhost')")
        assert not list((root / "outbox").glob("*.json"))

        # Allowed: delivered to exactly the path that was checked (dot segments resolved).
        for url, path in [(f"{base}/hooks/x?job=1", "/hooks/x?job=1"),
                          (f"{base}/hooks/a/%2e%2e/b/./c", "/hooks/b/c")]:
            done = submit(url, wait=True).json()
            assert [n["url"] for n in done["notifications"]] == [base + path]
            assert [n["state"] for n in settled(server, done["id"])] == ["delivered"]
            assert receiver.deliveries[-1].path == path
        assert [delivery.path for delivery in receiver.deliveries] == [
            "/hooks/x?job=1", "/hooks/b/c"]
    finally:
        server.stop()


def test_webhooks_a_prefix_with_credentials_or_a_query_is_refused_at_start(root: Path) -> None:
    for allow, message in [("http://user:pw@127.0.0.1:9/hooks", "carries a user name or password"),
                           ("http://127.0.0.1:9/hooks?x=1", "has a query or a fragment")]:
        result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                                 "--notify-allow", allow], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "IMGSERVER_NOTIFY_SECRET": SECRET})
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_webhooks_without_a_secret_the_server_refuses_to_start(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                             "--notify-url", "http://127.0.0.1:9/hook"],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items()
                                 if k != "IMGSERVER_NOTIFY_SECRET"})
    assert result.returncode == 2 and "IMGSERVER_NOTIFY_SECRET is not set" in result.stderr
