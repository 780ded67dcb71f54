"""The job engine: states, status files, one bad image failing alone, capacity, recovery."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import cv2
import pytest

from imgserver.errors import CapacityError, JobConflict, JobNotFound, RequestError
from imgserver.executors.pool import LocalPool
from imgserver.images.pipeline import TEMP_SUFFIX
from imgserver.jobs.engine import Engine
from imgserver.jobs.events import ImageFinished, JobFinished
from imgserver.jobs.job import Notification
from imgserver.settings import Settings

from conftest import final_status, job_files, photo, request_body, wait_for


def status_file(root: Path, job_id: str) -> dict:
    return json.loads((root / "outbox" / f"{job_id}.status.json").read_text())


def test_engine_runs_job_to_done(engine: Engine, root: Path,
                                 make_image: Callable[..., Path]) -> None:
    make_image("a.jpg", 80, 60)
    make_image("b.png", 50, 40, channels=4)
    document = engine.submit(request_body([("a.jpg", "out/a.jpg"), ("b.png", "out/b.png")],
                                          ["resize=50"]), source="http")
    assert document["state"] == "queued" and document["progress"] == {"done": 0, "total": 2}
    assert (root / "outbox" / f"{document['id']}.request.json").read_bytes() == request_body(
        [("a.jpg", "out/a.jpg"), ("b.png", "out/b.png")], ["resize=50"])
    final = engine.wait(document["id"]).result(timeout=60)
    assert final["state"] == "done" and final["error"] is None
    assert final["progress"] == {"done": 2, "total": 2}
    assert final["started_at"] and final["finished_at"]
    assert [i["outputs"] for i in final["images"]] == [["out/a.jpg"], ["out/b.png"]]
    assert cv2.imread(str(root / "out/a.jpg")).shape == (30, 40, 3)
    assert status_file(root, document["id"]) == final
    assert engine.status(document["id"]) == final


def test_engine_waiter_given_at_submit_gets_the_final_document(
        engine: Engine, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 40, 30)
    waiters: list[Future] = [Future() for _ in range(8)]
    ids = [engine.submit(request_body([("a.png", f"out/{n}.png")]), source="http",
                         waiter=waiter)["id"] for n, waiter in enumerate(waiters)]
    for job_id, waiter in zip(ids, waiters, strict=True):
        final = waiter.result(timeout=60)
        assert final["id"] == job_id and final["state"] == "done"
        assert final == status_file(root, job_id)
    with pytest.raises(RequestError):
        engine.submit(request_body([("a.png", "out/x.nope")]), source="http",
                      waiter=(refused := Future()))
    assert not refused.done()  # nothing was accepted: nothing to wait for


def test_engine_waiter_given_up_on_leaves_the_job_and_the_next_whole(
        engine: Engine, root: Path, make_image: Callable[..., Path]) -> None:
    # A route that stops waiting (its task cancelled) cancels its waiter: the engine
    # answers the others, records the job and goes on.
    make_image("a.png", 40, 30)
    given_up, kept = Future(), Future()
    assert given_up.cancel()
    first = engine.submit(request_body([("a.png", "out/1.png")]), source="http", waiter=given_up)
    engine.wait(first["id"])  # another waiter of the same job
    also = engine.submit(request_body([("a.png", "out/2.png")]), source="http", waiter=kept)
    assert kept.result(timeout=60)["state"] == "done"
    assert engine.wait(first["id"]).result(timeout=60)["state"] == "done"
    wait_for(lambda: {job["id"]: job["state"] for job in engine.jobs()[0]}
             == {first["id"]: "done", also["id"]: "done"})


def test_engine_bad_image_fails_alone(engine: Engine, root: Path,
                                      make_image: Callable[..., Path]) -> None:
    make_image("good.png")
    (root / "empty.jpg").write_bytes(b"")
    data = (make_image("whole.jpg", 300, 200)).read_bytes()
    (root / "cut.jpg").write_bytes(data[:len(data) // 2])
    body = request_body([("good.png", "o/good.png"), ("empty.jpg", "o/empty.png"),
                         ("missing.jpg", "o/missing.png"), ("cut.jpg", "o/cut.png")])
    final = engine.wait(engine.submit(body, source="http")["id"]).result(timeout=60)
    assert final["state"] == "failed" and final["error"] == "3 of 4 images failed"
    states = [(i["state"], i["error"]) for i in final["images"]]
    assert states[0] == ("done", None)
    assert "empty" in states[1][1] and "no such file" in states[2][1]
    assert "damaged or truncated" in states[3][1]
    assert sorted(p.name for p in (root / "o").iterdir()) == ["good.png"]


def test_engine_invalid_request_writes_nothing(engine: Engine, root: Path) -> None:
    with pytest.raises(RequestError, match=r"images\[0\].input: '../x.jpg' is outside the root"):
        engine.submit(request_body([("../x.jpg", "y.jpg")]), source="http")
    assert job_files(root / "outbox") == []


def test_engine_names_jobs_after_the_request(engine: Engine, make_image: Callable[..., Path]
                                             ) -> None:
    make_image("a.png")
    body = request_body([("a.png", "x.png")])
    first = engine.submit(body, source="cli", name="holiday")
    second = engine.submit(body, source="cli", name="holiday")
    assert (first["id"], second["id"]) == ("holiday", "holiday-2")
    engine.wait("holiday").result(timeout=60)
    engine.wait("holiday-2").result(timeout=60)


def test_engine_unknown_job(engine: Engine) -> None:
    with pytest.raises(JobNotFound):
        engine.status("nope")
    with pytest.raises(JobNotFound):
        engine.status("../etc/passwd")


def test_engine_events_report_each_image(engine: Engine, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    events: list[object] = []
    engine.subscribe(events.append)
    job_id = engine.submit(request_body([("a.png", "1.png"), ("a.png", "2.png")]),
                           source="http")["id"]
    engine.wait(job_id).result(timeout=60)
    images = [e for e in events if isinstance(e, ImageFinished)]
    assert sorted(e.done for e in images) == [1, 2] and all(e.total == 2 for e in images)
    assert isinstance(events[-1], JobFinished) and events[-1].document["state"] == "done"


@pytest.fixture
def blocked() -> Iterator[tuple[ThreadPoolExecutor, threading.Event]]:
    """A one-thread executor whose thread is held until the event is set."""
    executor = ThreadPoolExecutor(1)
    release = threading.Event()
    executor.submit(release.wait)
    yield executor, release
    release.set()
    executor.shutdown()


@pytest.fixture
def held_engine(root: Path, blocked: tuple[ThreadPoolExecutor, threading.Event]
                ) -> Iterator[tuple[Engine, threading.Event]]:
    """A started engine on ``blocked``, one image at a time, and the event that releases
    it (set on teardown too: closing waits for the running image)."""
    executor, release = blocked
    engine = Engine(Settings.build({"root": str(root)}, environ={}), executor, concurrency=1)
    engine.start()
    yield engine, release
    release.set()
    engine.close()


def test_engine_queue_limit(root: Path, make_image: Callable[..., Path],
                            blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    settings = Settings.build({"root": str(root), "max_queue": 3}, environ={})
    engine = Engine(settings, executor, concurrency=1)
    engine.start()
    try:
        with pytest.raises(RequestError, match="more than the queue holds"):
            engine.submit(request_body([("a.png", f"{i}.png") for i in range(4)]), source="http")
        first = engine.submit(request_body([("a.png", "1.png"), ("a.png", "2.png")]),
                              source="http")
        with pytest.raises(CapacityError, match="2 images are waiting or running, this request "
                                                "adds 2, the limit is 3"):
            engine.submit(request_body([("a.png", "3.png"), ("a.png", "4.png")]), source="http")
        assert len(list((root / "outbox").glob("*.request.json"))) == 1
        engine.submit(request_body([("a.png", "3.png")]), source="http")
        release.set()
        assert engine.wait(first["id"]).result(timeout=30)["state"] == "done"
    finally:
        engine.close()


def thread_cpu(name: str) -> float:
    """The CPU time (seconds) the running thread called ``name`` has used."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def test_engine_thread_sleeps_while_images_wait_for_a_worker(
        root: Path, make_image: Callable[..., Path],
        held_engine: tuple[Engine, threading.Event]) -> None:
    engine, release = held_engine
    make_image("a.png")
    ids = [engine.submit(request_body([("a.png", f"{n}.png")]), source="http")["id"]
           for n in range(3)]
    assert engine.stats()["queued"] == 2  # one handed over, two waiting for room
    for job_id in ids:  # the engine thread writes their first status files: let it
        wait_for(lambda job_id=job_id: (root / "outbox" / f"{job_id}.status.json").exists())
    before = thread_cpu("imgserver-engine")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a second of waiting, watched
        time.sleep(0.05)
    # Asleep until a worker frees (or its look every WAITING_LOOK): a few turns. It
    # once woke every millisecond while anything waited, about 1,000 turns here.
    used = thread_cpu("imgserver-engine") - before
    assert used < 0.02, f"the engine thread used {used * 1000:.1f} ms of CPU"
    release.set()
    for job_id in ids:
        assert engine.wait(job_id).result(timeout=30)["state"] == "done"


def test_engine_close_keeps_queued_images_for_next_start(
        root: Path, make_image: Callable[..., Path], pool: LocalPool,
        blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    settings = Settings.build({"root": str(root)}, environ={})
    engine = Engine(settings, executor, concurrency=1)
    engine.start()
    job_id = engine.submit(request_body([("a.png", "1.png"), ("a.png", "2.png")]),
                           source="http")["id"]
    waiter = engine.wait(job_id)
    engine.stop_accepting()
    with pytest.raises(CapacityError, match="resumes at the next start"):
        waiter.result(timeout=5)
    release.set()
    engine.close()
    saved = status_file(root, job_id)
    assert saved["state"] in ("queued", "running") and saved["progress"]["done"] < 2
    restarted = Engine(settings, pool)
    restarted.start()
    try:
        final = restarted.wait(job_id).result(timeout=60)
    finally:
        restarted.close()
    assert final["state"] == "done" and final["source"] == "http"
    assert (root / "1.png").exists() and (root / "2.png").exists()


def leave_unfinished_job(root: Path) -> None:
    """What a server killed mid-job leaves: job "old" with one image done and one running (and
    the half-written output of its worker), and a half-written status file."""
    body = request_body([("a.png", "done.png"), ("a.png", "todo.png")])
    (root / "outbox" / "old.request.json").write_bytes(body)
    (root / "outbox" / "old.status.json").write_text(json.dumps({
        "id": "old", "state": "running", "source": "inbox", "created_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:01Z", "finished_at": None, "operations": [],
        "progress": {"done": 1, "total": 2}, "error": None,
        "images": [{"input": "a.png", "output": "done.png", "state": "done",
                    "outputs": ["done.png"], "error": None},
                   {"input": "a.png", "output": "todo.png", "state": "running",
                    "outputs": [], "error": None}]}))
    (root / f".todo.png.deadbeef{TEMP_SUFFIX}").write_bytes(b"half an image")
    (root / "outbox" / ".tmp").mkdir()
    (root / "outbox" / ".tmp" / "tmp-0123").write_bytes(b"half a status")
    old = time.time() - 3600
    os.utime(root / "outbox" / ".tmp" / "tmp-0123", (old, old))


def recover_unfinished_job(root: Path, settings: Settings, executor: Executor) -> None:
    """Start an engine on what ``leave_unfinished_job`` left; check that it finishes the job
    without redoing the image done before, and removes the half-written files."""
    engine = Engine(settings, executor)
    engine.start()
    try:
        final = final_status(engine, "old")
    finally:
        engine.close()
    # Text, not the dict: pytest would cut the dict short, before its images.
    assert final["state"] == "done" and final["source"] == "inbox", json.dumps(final)
    assert final["created_at"] == "2026-01-01T00:00:00Z"
    assert not (root / "done.png").exists()  # it was done before: not redone
    assert (root / "todo.png").exists()
    assert not list(root.rglob(f"*{TEMP_SUFFIX}"))
    assert not (root / "outbox" / ".tmp" / "tmp-0123").exists()


def test_engine_recovers_unfinished_job_without_redoing_done_images(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    leave_unfinished_job(root)
    recover_unfinished_job(root, settings, pool)


class FinishedBeforeReturning(ThreadPoolExecutor):
    """Threads whose ``submit`` returns only once the task has finished: what a busy machine
    makes of a hand-over now and then (the engine's thread loses the CPU after the executor
    took the image and before the engine added its callback, and a worker finishes it)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future = super().submit(fn, *args, **kwargs)
        wait([future])
        return future


def test_engine_settles_an_image_finished_before_its_hand_over_returned(
        root: Path, make_image: Callable[..., Path]) -> None:
    # Its callback then runs inside the hand-over, on the engine's thread: the image must
    # still be settled at once, not left running until its time limit fails it.
    make_image("a.png")
    leave_unfinished_job(root)
    settings = Settings.build({"root": str(root), "workers": 2, "image_timeout": 5.0},
                              environ={})
    with FinishedBeforeReturning(2) as executor:
        recover_unfinished_job(root, settings, executor)


@pytest.mark.stress
def test_engine_recovers_unfinished_job_200_times_under_load(tmp_path: Path,
                                                            pool: LocalPool) -> None:
    """The recovery test 200 times on a warm pool, two busy processes beside it: ``pytest -n 0
    -m stress tests/jobs/test_engine.py``. Before Runner.next_wakeup said "now" for a finished
    image, one run in a few dozen lost its image to the race the test above forces."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for run in range(200):
            root = tmp_path / str(run)
            (root / "outbox").mkdir(parents=True)
            assert cv2.imwrite(str(root / "a.png"), photo(48, 64))
            leave_unfinished_job(root)
            # A lost image fails at its time limit: 10 s, not the suite's 60.
            settings = Settings.build({"root": str(root), "workers": 2, "image_timeout": 10.0},
                                      environ={})
            recover_unfinished_job(root, settings, pool)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_engine_recovers_request_without_status(root: Path, settings: Settings, pool: LocalPool,
                                                make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "outbox" / "early.request.json").write_bytes(request_body([("a.png", "x.png")]))
    (root / "outbox" / "bad.request.json").write_bytes(b"{broken")
    engine = Engine(settings, pool)
    engine.start()
    try:
        assert final_status(engine, "early")["state"] == "done"
    finally:
        engine.close()
    bad = status_file(root, "bad")
    assert bad["state"] == "failed" and "not valid JSON" in bad["error"]


def test_engine_small_job_takes_its_turn_behind_a_batch(
        root: Path, make_image: Callable[..., Path],
        blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    engine = Engine(Settings.build({"root": str(root)}, environ={}), executor, concurrency=1)
    finished: list[tuple[str, int]] = []
    engine.subscribe(lambda event: finished.append((event.job_id, event.index))
                     if isinstance(event, ImageFinished) else None)
    engine.start()
    try:
        batch = engine.submit(request_body([("a.png", f"b/{i}.png") for i in range(20)]),
                              source="http")["id"]
        wait_for(lambda: engine.status(batch)["images"][0]["state"] == "running")
        small = engine.submit(request_body([("a.png", "small.png")]), source="inbox")["id"]
        other = engine.submit(request_body([("a.png", f"o/{i}.png") for i in range(2)]),
                              source="cli")["id"]
        release.set()
        assert engine.wait(small).result(timeout=60)["state"] == "done"
        engine.wait(batch).result(timeout=60)
        engine.wait(other).result(timeout=60)
    finally:
        engine.close()
    # The batch's first image was handed over before the others arrived; then turns.
    assert finished[:6] == [(batch, 0), (batch, 1), (small, 0), (other, 0), (batch, 2),
                            (other, 1)]
    assert [index for job, index in finished if job == batch] == list(range(20))


def test_engine_lists_a_job_by_its_live_state_before_its_row_catches_up(
        make_image: Callable[..., Path], held_engine: tuple[Engine, threading.Event]) -> None:
    engine, _ = held_engine
    make_image("a.png")
    job_id = engine.submit(request_body([("a.png", "a2.png")]), source="http")["id"]
    wait_for(lambda: engine.status(job_id)["state"] == "running")  # its row: queued
    # A new index is scanned at start (listing answers CapacityError meanwhile).
    wait_for(lambda: not engine.outbox.index.needs_scan)
    assert [s["id"] for s in engine.jobs(states=["running"])[0]] == [job_id]
    assert engine.jobs(states=["queued"])[0] == []


def test_engine_cancel_queued_job_runs_nothing(
        root: Path, make_image: Callable[..., Path],
        blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    engine = Engine(Settings.build({"root": str(root)}, environ={}), executor, concurrency=1)
    engine.start()
    try:
        first = engine.submit(request_body([("a.png", "first.png")]), source="http")["id"]
        queued = engine.submit(request_body([("a.png", f"q/{i}.png") for i in range(3)]),
                               source="http")["id"]
        document, before = engine.cancel(queued)
        assert not before and document["state"] == "cancelled"
        assert document["error"] == "cancelled: 3 of 3 images not run"
        assert document["started_at"] is None and document["finished_at"]
        assert [image["state"] for image in document["images"]] == ["cancelled"] * 3
        assert document["progress"] == {"done": 0, "total": 3}
        assert status_file(root, queued) == document
        assert not (root / "outbox" / f"{queued}.cancel").exists()
        assert engine.cancel(queued) == (document, True)  # again: cancelled before
        assert engine.open_images == 1
        release.set()
        assert engine.wait(first).result(timeout=60)["state"] == "done"
        with pytest.raises(JobConflict) as caught:
            engine.cancel(first)
        assert caught.value.document["state"] == "done"
        with pytest.raises(JobNotFound):
            engine.cancel("no-such-job")
    finally:
        engine.close()
    assert not (root / "q").exists()


def test_engine_cancel_running_job_lets_running_image_finish(
        root: Path, make_image: Callable[..., Path],
        blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    engine = Engine(Settings.build({"root": str(root)}, environ={}), executor, concurrency=1)
    engine.start()
    try:
        job_id = engine.submit(request_body([("a.png", f"out/{i}.png") for i in range(4)]),
                               source="http")["id"]
        wait_for(lambda: engine.status(job_id)["images"][0]["state"] == "running")
        document, before = engine.cancel(job_id)
        assert not before and document["state"] == "running"
        assert [i["state"] for i in document["images"]] == ["running"] + ["cancelled"] * 3
        assert (root / "outbox" / f"{job_id}.cancel").exists()  # on disk before the answer
        assert engine.cancel(job_id)[0]["state"] == "running"
        release.set()
        final = engine.wait(job_id).result(timeout=60)
    finally:
        engine.close()
    assert final["state"] == "cancelled" and final["error"] == "cancelled: 3 of 4 images not run"
    assert final["images"][0]["state"] == "done" and final["images"][0]["outputs"] == ["out/0.png"]
    assert final["progress"] == {"done": 1, "total": 4}
    assert sorted(p.name for p in (root / "out").iterdir()) == ["0.png"]
    assert not (root / "outbox" / f"{job_id}.cancel").exists()


def test_engine_unfinished_since_an_event_adds_the_jobs_finished_after_it(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    engine = Engine(settings, pool)
    engine.start()

    def run(name: str) -> str:
        time.sleep(0.005)  # finished_at counts milliseconds: keep the jobs apart in time
        job_id = engine.submit(request_body([("a.png", f"{name}.png")]), source="http")["id"]
        engine.wait(job_id).result(timeout=60)
        return job_id

    try:
        before = run("before")
        between = run("between")
        _, since = engine.unfinished()  # the number of between's last event
        after = run("after")
        summaries, seq = engine.unfinished(since)
        ids = [s["id"] for s in summaries]
        assert after in ids and before not in ids
        assert all(s["state"] == "done" for s in summaries) and seq > since
        assert engine.unfinished() == ([], seq)  # without: only the jobs not finished
        assert [s["id"] for s in engine.unfinished(0)[0]] == [after, between, before]
    finally:
        engine.close()


def test_engine_cancelled_job_is_not_resumed(root: Path, settings: Settings, pool: LocalPool,
                                             make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    # What a server killed right after cancelling leaves: the marker, a running status.
    body = request_body([("a.png", "x.png"), ("a.png", "y.png")])
    (root / "outbox" / "gone.request.json").write_bytes(body)
    (root / "outbox" / "gone.cancel").write_bytes(b"")
    (root / "outbox" / "gone.status.json").write_text(json.dumps({
        "id": "gone", "state": "running", "source": "http",
        "created_at": "2026-01-01T00:00:00.000+00:00", "started_at": None, "finished_at": None,
        "operations": [], "progress": {"done": 0, "total": 2}, "error": None,
        "images": [{"input": "a.png", "output": "x.png", "state": "running", "outputs": [],
                    "error": None},
                   {"input": "a.png", "output": "y.png", "state": "cancelled", "outputs": [],
                    "error": None}]}))
    engine = Engine(settings, pool)
    engine.start()
    try:
        final = final_status(engine, "gone")
    finally:
        engine.close()
    assert final["state"] == "cancelled" and final["error"] == "cancelled: 2 of 2 images not run"
    assert not (root / "x.png").exists() and not (root / "y.png").exists()
    assert not (root / "outbox" / "gone.cancel").exists()


def test_engine_idempotency_key_makes_one_job(root: Path, settings: Settings, pool: LocalPool,
                                              make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    body = request_body([("a.png", "once.png")])
    engine = Engine(settings, pool)
    engine.start()
    try:
        first, created = engine.submit_once(body, "order-17", source="http")
        assert created and first["state"] == "queued"
        again, created = engine.submit_once(body, "order-17", source="http")
        assert not created and again["id"] == first["id"]
        with pytest.raises(RequestError, match="Idempotency-Key: was used for another request"):
            engine.submit_once(request_body([("a.png", "other.png")]), "order-17", source="http")
        with pytest.raises(RequestError, match="Idempotency-Key"):
            engine.submit_once(body, "bad key", source="http")
        engine.wait(first["id"]).result(timeout=60)
    finally:
        engine.close()
    restarted = Engine(settings, pool)
    restarted.start()
    try:
        again, created = restarted.submit_once(body, "order-17", source="http")
        assert not created and again["id"] == first["id"] and again["state"] == "done"
    finally:
        restarted.close()
    assert len(list((root / "outbox").glob("*.request.json"))) == 1


def test_engine_writes_a_finished_job_then_tells_its_waiters_without_holding_its_lock(
        root: Path, make_image: Callable[..., Path],
        held_engine: tuple[Engine, threading.Event]) -> None:
    engine, release = held_engine
    make_image("a.png")
    seen: list[tuple[str, bool]] = []

    def told(future: Future) -> None:  # on the executor's thread, which finished the job
        other = threading.Thread(target=engine.stats)  # takes the engine's lock
        other.start()
        other.join(timeout=10)
        seen.append((status_file(root, future.result()["id"])["state"], not other.is_alive()))

    waiter: Future = Future()
    waiter.add_done_callback(told)
    engine.submit(request_body([("a.png", "a2.png")]), source="http", waiter=waiter)
    release.set()
    wait_for(lambda: seen)
    assert seen == [("done", True)]  # the file first; and the lock was free meanwhile


def test_engine_answers_a_job_finishing_from_memory_until_its_files_are_written(
        root: Path, make_image: Callable[..., Path],
        held_engine: tuple[Engine, threading.Event]) -> None:
    engine, release = held_engine
    make_image("a.png")
    job_id = engine.submit(request_body([("a.png", "a2.png")]), source="http")["id"]
    wait_for(lambda: not engine.outbox.index.needs_scan)
    seen: dict[str, Any] = {}
    late: Future = Future()

    def on_finished(future: Future) -> None:
        seen["file when told"] = status_file(root, job_id)["state"]

    def listener(event: object) -> None:  # announced holding the lock, before any write
        if isinstance(event, JobFinished):
            path = root / "outbox" / f"{job_id}.status.json"
            seen["on disk"] = path.exists() and status_file(root, job_id)["state"]
            seen["status"] = engine.status(job_id)["state"]
            seen["folder"] = engine.folder(job_id)
            seen["finished since"] = [s["id"] for s in engine.unfinished(0)[0]]
            waiter = engine.wait(job_id)  # told only once the file is written
            waiter.add_done_callback(on_finished)
            waiter.add_done_callback(lambda f: late.set_result(f.result()))

    engine.subscribe(listener)
    release.set()
    assert late.result(timeout=30)["state"] == "done"
    assert seen.pop("on disk") in (False, "queued", "running")  # not written yet
    assert seen == {"status": "done", "folder": "", "finished since": [job_id],
                    "file when told": "done"}
    wait_for(lambda: engine.jobs(states=["done"])[0])  # its row follows


def test_engine_records_a_webhook_delivery_after_the_final_status_file(
        root: Path, make_image: Callable[..., Path],
        blocked: tuple[ThreadPoolExecutor, threading.Event]) -> None:
    executor, release = blocked
    make_image("a.png")
    secret = "whsec_" + base64.b64encode(b"sixteen bytes...").decode()
    settings = Settings.build({"root": str(root), "notify_url": "http://127.0.0.1:9/hook"},
                              environ={"IMGSERVER_NOTIFY_SECRET": secret})
    engine = Engine(settings, executor, concurrency=1)
    engine.start()
    delivering: list[threading.Thread] = []

    def listener(event: object) -> None:  # holding the lock, before the status file
        if isinstance(event, JobFinished):
            delivered = Notification("http://127.0.0.1:9/hook", state="delivered", attempts=1)
            thread = threading.Thread(target=engine.note_delivery,
                                      args=(event.job_id, 0, delivered))
            thread.start()  # waits for the lock, then for the final status file
            delivering.append(thread)

    try:
        engine.subscribe(listener)
        job_id = engine.submit(request_body([("a.png", "a2.png")]), source="http")["id"]
        release.set()
        engine.wait(job_id).result(timeout=30)
        wait_for(lambda: delivering)[0].join(timeout=30)
        final = status_file(root, job_id)
        assert final["state"] == "done"
        assert [n["state"] for n in final["notifications"]] == ["delivered"]
    finally:
        release.set()
        engine.close()


def test_engine_does_not_resume_a_job_it_is_still_writing(
        root: Path, make_image: Callable[..., Path],
        held_engine: tuple[Engine, threading.Event]) -> None:
    # A scan of the outbox (a rebuilt index) may come upon a job whose final status file
    # is not written yet: it must not run it again.
    engine, release = held_engine
    make_image("a.png")
    job_id = engine.submit(request_body([("a.png", "a2.png")]), source="http")["id"]
    finished: list[int] = []
    seen: list[str] = []

    def listener(event: object) -> None:  # holding the lock, before the status file
        if isinstance(event, JobFinished) and event.job_id == job_id:
            finished.append(event.seq)
            if len(finished) == 1:
                engine.resume(job_id)
                threading.Thread(target=lambda: (engine.written(job_id), seen.append(
                    status_file(root, job_id)["state"]))).start()

    engine.subscribe(listener)
    release.set()
    assert engine.wait(job_id).result(timeout=30)["state"] == "done"
    wait_for(lambda: seen)
    assert seen == ["done"]  # ``written`` returned once the final file was on disk
    assert len(finished) == 1 and engine.status(job_id)["state"] == "done"
