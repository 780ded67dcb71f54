"""Jobs over time, end to end on a real server: listing, cancelling, idempotent submission,
retention, and the index behind them surviving restarts, damage and ``kill -9``."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from imgserver.jobs.index import FILENAME

from conftest import request_body, wait_for
from serving import Server, start_server, wait_state

FINAL = ("done", "failed", "cancelled")


def listing(server: Server, query: str = "") -> list[dict]:
    """Every job the server lists for ``query``, following the cursors."""
    jobs: list[dict] = []
    cursor = None
    while True:
        path = f"/jobs?limit=2{'&' + query if query else ''}"
        reply = server.request("GET", path + (f"&cursor={cursor}" if cursor else ""))
        assert reply.status == 200, reply.body
        jobs += reply.json()["jobs"]
        cursor = reply.json()["next"]
        if cursor is None:
            return jobs


def listed_when_ready(server: Server) -> list[dict]:
    """The full listing, once the index is ready (503 while it is being rebuilt)."""
    wait_for(lambda: server.request("GET", "/jobs").status == 200, timeout=60)
    return listing(server)


def test_server_small_job_behind_a_large_batch_waits_for_a_turn_not_the_batch(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    make_image("a.png")
    server = start_server(root, "--workers", "1")
    try:
        batch = server.request("POST", "/jobs", request_body(
            [("big.png", f"batch/{n}.png") for n in range(12)], ["blur=31"])).json()["id"]
        wait_for(lambda: server.request("GET", f"/jobs/{batch}").json()["state"] == "running")
        small = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", "small.png")], ["resize=10"]))
        behind = server.request("GET", f"/jobs/{batch}").json()["progress"]["done"]
        assert small.status == 200 and small.json()["state"] == "done"
        # Round-robin: the small job took the next turn, after at most the image running
        # when it came and the one handed over with it; the batch has far to go.
        assert behind <= 3, behind
        assert server.request("POST", f"/jobs/{batch}/cancel").status == 202
        wait_state(server, batch, FINAL)
    finally:
        server.stop()


def test_server_lists_jobs_newest_first_with_filters_across_a_restart(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1")
    try:
        done = [server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", f"out/{n}.png")])).json()["id"] for n in range(3)]
        failed = server.request("POST", "/jobs?wait=true", request_body(
            [("missing.png", "out/m.png")])).json()["id"]
        (root / "inbox" / "dropped.json").write_bytes(request_body([("a.png", "out/d.png")]))
        wait_state(server, "dropped")
        slow = server.request("POST", "/jobs", request_body(
            [("big.png", f"out/big{n}.png") for n in range(4)], ["blur=31"])).json()["id"]
        assert server.request("POST", f"/jobs/{slow}/cancel").status == 202
        wait_state(server, slow, FINAL)
        everything = listing(server)
        assert [job["id"] for job in everything] == [slow, "dropped", failed, *done[::-1]]
        assert all("images" not in job and "expires_at" in job for job in everything)
        assert [job["state"] for job in everything] == ["cancelled", "done", "failed"] + [
            "done"] * 3
        assert [job["id"] for job in listing(server, "state=failed,cancelled")] == [slow, failed]
        assert [job["id"] for job in listing(server, "source=inbox")] == ["dropped"]
        assert listing(server, "state=running") == []
        for query, field in [("state=nope", "state"), ("state=done,,failed", "state"),
                             ("source=ftp", "source"), ("limit=0", "limit"),
                             ("limit=1001", "limit"), ("limit=x", "limit"),
                             ("cursor=bogus", "cursor")]:
            reply = server.request("GET", f"/jobs?{query}")
            assert reply.status == 422, query
            assert [e["field"] for e in reply.json()["errors"]] == [field], query
        assert server.stop() == 0
        server = start_server(root, "--workers", "1")
        assert listing(server) == everything  # jobs from before the restart
    finally:
        server.stop()


def test_server_cancel_survives_kill_9_and_answers_by_state(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1")
    try:
        body = request_body([("big.png", f"out/{n}.png") for n in range(8)], ["blur=31"])
        job_id = server.request("POST", "/jobs", body).json()["id"]
        wait_state(server, job_id, ("running",))
        reply = server.request("POST", f"/jobs/{job_id}/cancel")
        assert reply.status == 202 and reply.json()["id"] == job_id
        not_run = [n for n, image in enumerate(reply.json()["images"])
                   if image["state"] == "cancelled"]
        assert len(not_run) >= 6
        server.stop(signal.SIGKILL)  # at once: the running image may not have finished
        server = start_server(root, "--workers", "1")
        final = wait_state(server, job_id, FINAL)
        assert final["state"] == "cancelled"
        assert final["error"] == f"cancelled: {8 - final['progress']['done']} of 8 images not run"
        written = sorted(int(p.stem) for p in (root / "out").glob("*.png"))
        assert not set(written) & set(not_run)  # nothing cancelled ever started
        assert final["progress"]["done"] == len(written) <= 2
        time.sleep(1.0)  # a resumed job would have started by now
        assert sorted(int(p.stem) for p in (root / "out").glob("*.png")) == written
        again = server.request("POST", f"/jobs/{job_id}/cancel")
        assert again.status == 200 and again.json() == final
        make_image("a.png")
        done = server.request("POST", "/jobs?wait=true", request_body([("a.png", "x.png")]))
        conflict = server.request("POST", f"/jobs/{done.json()['id']}/cancel")
        assert conflict.status == 409 and conflict.json() == done.json()
        assert server.request("POST", "/jobs/nope/cancel").status == 404
    finally:
        server.stop()


def test_server_cancelled_job_lists_what_its_running_image_wrote_as_the_server_died(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("big.png", 2400, 1800)
    server = start_server(root, "--workers", "1")
    try:
        body = request_body([("big.png", f"out/{n}.png") for n in range(6)], ["blur=31", "split"])
        job_id = server.request("POST", "/jobs", body).json()["id"]
        wait_state(server, job_id, ("running",))
        cancelled = server.request("POST", f"/jobs/{job_id}/cancel").json()
        server.stop(signal.SIGKILL)
        running = [n for n, image in enumerate(cancelled["images"])
                   if image["state"] == "running"]
        assert running, cancelled
        # What its worker leaves when it finishes the running image as the server dies.
        tiles = [f"out/{running[0]}_{tile}.png" for tile in ("lt", "rt", "lb", "rb")]
        (root / "out").mkdir(exist_ok=True)
        for tile in tiles:
            shutil.copy(root / "big.png", root / tile)
        server = start_server(root, "--workers", "1")
        final = wait_state(server, job_id, FINAL)
        image = final["images"][running[0]]
        assert image["state"] == "done" and image["outputs"] == tiles, image
        not_run = sum(image["state"] == "cancelled" for image in final["images"])
        assert final["state"] == "cancelled"
        assert final["error"] == f"cancelled: {not_run} of 6 images not run"
        assert final["progress"]["done"] == 6 - not_run
    finally:
        server.stop()


def test_server_idempotency_key_makes_one_job_across_a_restart(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    body = request_body([("a.png", "once.png")])
    key = {"Idempotency-Key": "order-2026-0042"}
    server = start_server(root)
    try:
        first = server.request("POST", "/jobs", body, headers=key)
        assert first.status == 202
        again = server.request("POST", "/jobs", body, headers=key)
        assert again.status == 200 and again.headers["location"] == first.headers["location"]
        assert again.json()["id"] == first.json()["id"]
        other = server.request("POST", "/jobs", request_body([("a.png", "b.png")]), headers=key)
        assert other.status == 422
        assert [e["field"] for e in other.json()["errors"]] == ["Idempotency-Key"]
        bad = server.request("POST", "/jobs", body, headers={"Idempotency-Key": "x" * 256})
        assert bad.status == 422 and bad.json()["errors"][0]["field"] == "Idempotency-Key"
        wait_state(server, first.json()["id"])
        assert server.stop() == 0
        server = start_server(root)
        waited = server.request("POST", "/jobs?wait=true", body, headers=key)
        assert waited.status == 200 and waited.json()["id"] == first.json()["id"]
        assert waited.json()["state"] == "done"
    finally:
        server.stop()
    assert len(list((root / "outbox").glob("*.request.json"))) == 1


def test_server_keep_finished_removes_records_and_keeps_outputs(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    server = start_server(root, "--keep-finished", "3s")
    try:
        document = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", "kept.png")])).json()
        finished = datetime.fromisoformat(document["finished_at"])
        assert datetime.fromisoformat(document["expires_at"]) - finished == timedelta(seconds=3)
        job_id = document["id"]
        assert [job["id"] for job in listing(server)] == [job_id]
        wait_for(lambda: server.request("GET", f"/jobs/{job_id}").status == 404, timeout=10)
        gone_after = time.time() - finished.timestamp()
        assert 3.0 <= gone_after < 3.0 + 0.3 + 2.0  # within a tenth of 3 s (and polling)
        assert not list((root / "outbox").glob(f"{job_id}.*"))
        assert (root / "kept.png").exists()  # outputs are never touched
        assert listing(server) == []
    finally:
        server.stop()


def test_server_index_damaged_while_down_is_rebuilt(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    server = start_server(root)
    try:
        for n in range(6):
            server.request("POST", "/jobs?wait=true", request_body([("a.png", f"o/{n}.png")]))
        before = listing(server)
        assert server.stop() == 0
        index = root / "outbox" / FILENAME
        index.write_bytes(index.read_bytes()[:len(index.read_bytes()) // 2])
        server = start_server(root)
        assert listed_when_ready(server) == before
        assert server.stop() == 0
        index.unlink()
        server = start_server(root)
        assert listed_when_ready(server) == before
    finally:
        server.stop()


def test_server_kill_9_while_writing_the_index_loses_nothing(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 32, 24)
    server = start_server(root)
    accepted: list[str] = []
    stop = threading.Event()

    def client(number: int) -> None:
        count = 0
        while not stop.is_set():
            try:
                reply = server.request("POST", "/jobs", request_body(
                    [("a.png", f"out/{number}-{count}.png")]), timeout=10)
            except (OSError, http.client.HTTPException):
                return  # the server is gone (mid-answer, too)
            if reply.status == 202:
                accepted.append(reply.json()["id"])
            count += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in clients:
        thread.start()
    wait_for(lambda: len(accepted) >= 60, timeout=60)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    stop.set()
    for thread in clients:
        thread.join()
    server = start_server(root)
    try:
        on_disk = {p.name[:-len(".request.json")]
                   for p in (root / "outbox").glob("*.request.json") if p.stat().st_size}
        assert set(accepted) <= on_disk  # every accepted job is on disk
        for job_id in on_disk:
            wait_state(server, job_id, FINAL)
        listed = {job["id"]: job for job in listed_when_ready(server)}
        assert set(listed) == on_disk  # the index agrees with the files: no more, no fewer
        for job_id, job in listed.items():
            stored = json.loads((root / "outbox" / f"{job_id}.status.json").read_text())
            assert job["state"] == stored["state"] == "done"
    finally:
        server.stop()
