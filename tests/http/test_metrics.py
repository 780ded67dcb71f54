"""Prometheus metrics: scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import cv2
from prometheus_client.parser import text_string_to_metric_families

from conftest import photo, request_body, wait_for
from processes import workers
from serving import Server, start_server, wait_state


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    reply = server.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.body.decode())
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def large_image(path: Path, width: int, height: int) -> Path:
    """A photo-like JPEG of ``width`` x ``height``, quick to make (an enlarged small photo)."""
    assert cv2.imwrite(str(path), cv2.resize(photo(300, 400), (width, height),
                                             interpolation=cv2.INTER_CUBIC))
    return path


def test_metrics_move_with_jobs_failures_restarts_and_requests(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 64, 48)
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1", env={"IMGSERVER_TOKEN": "t"})
    auth = {"Authorization": "Bearer t"}
    try:
        before = scrape(server)  # open, like /healthz: no token
        assert value(before, "imgserver_build_info", version=__import__(
            "imgserver").__version__) == 1
        assert value(before, "imgserver_workers") == 1
        assert value(before, "imgserver_jobs_total", source="http", state="done") == 0
        done = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", "1.png"), ("a.png", "2.png")]), headers=auth).json()
        server.request("POST", "/jobs?wait=true", request_body([("missing.png", "3.png")]),
                       headers=auth)
        (root / "inbox" / "bad.json").write_bytes(b"{not json")
        (root / "inbox" / "good.json").write_bytes(request_body([("a.png", "4.png")]))
        wait_state(server, "good", headers=auth)
        for _ in range(3):
            server.request("GET", f"/jobs/{done['id']}", headers=auth)
        server.request("GET", "/jobs/nope", headers=auth)
        # A worker killed mid-image: its image is retried, and the restart is counted.
        slow = server.request("POST", "/jobs", request_body(
            [("big.png", "b.png")], ["blur=31"]), headers=auth).json()["id"]
        wait_state(server, slow, ("running",), headers=auth)
        wait_for(lambda: workers(server.process.pid))
        for pid in workers(server.process.pid):
            os.kill(pid, signal.SIGKILL)
        wait_state(server, slow, headers=auth)
        samples = wait_for(lambda: (lambda s: s if value(
            s, "imgserver_inbox_files_total", result="invalid") == 1 else None)(scrape(server)))
        assert value(samples, "imgserver_jobs_total", source="http", state="done") == 2
        assert value(samples, "imgserver_jobs_total", source="http", state="failed") == 1
        assert value(samples, "imgserver_jobs_total", source="inbox", state="failed") == 1
        assert value(samples, "imgserver_jobs_total", source="inbox", state="done") == 1
        assert value(samples, "imgserver_images_total", state="done") == 4
        assert value(samples, "imgserver_images_total", state="failed") == 1
        assert value(samples, "imgserver_inbox_files_total", result="taken") == 1
        assert value(samples, "imgserver_worker_restarts_total", reason="died") >= 1
        assert value(samples, "imgserver_image_seconds_count") == 5
        assert value(samples, "imgserver_image_seconds_sum") > 0
        assert value(samples, "imgserver_queue_wait_seconds_count") == 5
        assert value(samples, "imgserver_images_queued") == 0
        assert value(samples, "imgserver_images_running") == 0
        assert value(samples, "imgserver_http_requests_total", route="/jobs/{job_id}",
                     code="200") >= 3  # and the polls of wait_state
        assert value(samples, "imgserver_http_requests_total", route="/jobs/{job_id}",
                     code="404") >= 1
        assert value(samples, "imgserver_http_requests_total", route="/jobs",
                     code="200") == 2  # the two with wait=true
        assert value(samples, "imgserver_http_requests_total", route="/jobs", code="202") == 1
        assert value(samples, "imgserver_http_request_seconds_count", route="/jobs") == 3
        routes = {dict(labels).get("route") for name, labels in samples
                  if name == "imgserver_http_requests_total"}
        assert all(route == "unmatched" or "nope" not in route and done["id"] not in route
                   for route in routes)  # templates, never raw paths
        assert value(samples, "imgserver_notifications_total", result="delivered") == 0
    finally:
        server.stop()


def test_metrics_count_each_worker_stopped_when_two_images_run_over_at_once(
        root: Path) -> None:
    for name in ("one.jpg", "two.jpg"):
        large_image(root / name, 6000, 4000)  # seconds of work each: well over 0.3 s
    server = start_server(root, "--workers", "2", "--image-timeout", "0.3")
    try:
        job = server.request("POST", "/jobs?wait=true", request_body(
            [("one.jpg", "one.png"), ("two.jpg", "two.png")], ["blur=3"])).json()
        assert [image["state"] for image in job["images"]] == ["failed", "failed"]
        samples = scrape(server)
        assert value(samples, "imgserver_worker_restarts_total", reason="timeout") == 2
        assert value(samples, "imgserver_worker_restarts_total", reason="died") == 0
    finally:
        server.stop()


def test_metrics_count_a_worker_restarted_for_an_image_over_its_time_limit(root: Path) -> None:
    large_image(root / "huge.jpg", 6000, 4000)  # seconds of work: well over 0.3 s
    server = start_server(root, "--workers", "1", "--image-timeout", "0.3")
    try:
        before = scrape(server)
        assert before[("imgserver_worker_restarts_total", (("reason", "timeout"),))] == 0
        job = server.request("POST", "/jobs?wait=true", request_body(
            [("huge.jpg", "huge.png")], ["blur=3"])).json()
        assert job["state"] == "failed" and "--image-timeout" in job["images"][0]["error"]
        samples = scrape(server)
        assert value(samples, "imgserver_worker_restarts_total", reason="timeout") == 1
        assert value(samples, "imgserver_worker_restarts_total", reason="died") == 0
        assert value(samples, "imgserver_images_total", state="failed") == 1
    finally:
        server.stop()


def test_metrics_count_cancelled_images_and_drop_files_waiting_for_room(
        root: Path, make_image: Callable[..., Path]) -> None:
    large_image(root / "big.jpg", 2400, 1800)
    make_image("a.png", 8, 8)
    size = 20
    server = start_server(root, "--workers", "1", "--max-queue", str(size))
    try:
        busy = server.request("POST", "/jobs", request_body(
            [("big.jpg", f"busy/{n}.png") for n in range(size)], ["blur=31"])).json()["id"]
        # As many images as the queue holds: it waits in INBOX until the queue is empty.
        staged = root / "inbox" / ".later.json"
        staged.write_bytes(request_body([("a.png", f"later/{n}.png") for n in range(size)]))
        staged.rename(root / "inbox" / "later.json")
        wait_for(lambda: value(scrape(server), "imgserver_inbox_files_total",
                               result="waiting") == 1, timeout=10)
        assert (root / "inbox" / "later.json").exists()
        assert server.request("GET", "/jobs/later").status == 404
        assert server.request("POST", f"/jobs/{busy}/cancel").status == 202
        cancelled = wait_state(server, busy, ("cancelled",))
        not_run = int(cancelled["error"].split()[1])  # "cancelled: 17 of 20 images not run"
        assert cancelled["error"] == f"cancelled: {not_run} of {size} images not run"
        assert not_run >= size // 2
        assert wait_state(server, "later")["state"] == "done"  # room: taken at last
        samples = wait_for(lambda: (lambda s: s if value(
            s, "imgserver_inbox_files_total", result="taken") == 1 else None)(scrape(server)))
        assert value(samples, "imgserver_images_total", state="cancelled") == not_run
        assert value(samples, "imgserver_images_total", state="done") == 2 * size - not_run
        assert value(samples, "imgserver_inbox_files_total", result="waiting") == 1  # once
        assert value(samples, "imgserver_jobs_total", source="http", state="cancelled") == 1
    finally:
        server.stop()
