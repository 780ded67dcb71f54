"""The drop folder with a real watchdog observer on a real folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis
import pytest
from fastapi.testclient import TestClient

from imgserver import inbox
from imgserver.executors.pool import LocalPool
from imgserver.http.app import create_app
from imgserver.inbox import DropFolder
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

from conftest import CORPUS_LIMITS, INVALID_BODIES, job_files, json_values, request_body, wait_for


def status(root: Path, job_id: str) -> dict | None:
    path = root / "outbox" / f"{job_id}.status.json"
    return json.loads(path.read_text()) if path.exists() else None


def finished(root: Path, job_id: str) -> dict | None:
    document = status(root, job_id)
    return document if document and document["state"] in ("done", "failed") else None


@pytest.fixture
def drop(engine: Engine, root: Path) -> Iterator[DropFolder]:
    with DropFolder(engine, root / "inbox") as folder:
        yield folder


def test_inbox_dropped_request_runs_and_leaves_inbox(drop: DropFolder, engine: Engine, root: Path,
                                                     make_image: Callable[..., Path]) -> None:
    make_image("a.png", 40, 30)
    body = request_body([("a.png", "out/a.jpg")], ["resize=50"])
    (root / "inbox" / "holiday.json").write_bytes(body)
    document = wait_for(lambda: finished(root, "holiday"))
    assert document["state"] == "done" and document["source"] == "inbox"
    assert (root / "out" / "a.jpg").exists()
    assert list((root / "inbox").iterdir()) == []
    assert (root / "outbox" / "holiday.request.json").read_bytes() == body  # kept byte for byte
    assert engine.status("holiday") == document


def test_inbox_file_written_in_two_pieces_is_taken_once_whole(
        drop: DropFolder, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    body = request_body([("a.png", "slow.png")])
    with open(root / "inbox" / "slow.json", "wb") as file:
        file.write(body[:10])
        file.flush()
        time.sleep(1.0)
        file.write(body[10:])
    assert wait_for(lambda: finished(root, "slow"))["state"] == "done"
    time.sleep(0.5)
    assert job_files(root / "outbox") == [
        "slow.request.json", "slow.status.json"]


def test_inbox_file_appended_in_two_writes_is_taken_whole(
        drop: DropFolder, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    body = request_body([("a.png", "twice.png")])
    (root / "inbox" / "twice.json").write_bytes(body[:15])   # closed once, half a request
    time.sleep(1.0)
    with open(root / "inbox" / "twice.json", "ab") as file:  # and closed again, whole
        file.write(body[15:])
    assert wait_for(lambda: finished(root, "twice"))["state"] == "done"
    assert not (root / "outbox" / "twice-2.status.json").exists()


def test_inbox_atomic_drop_by_rename(drop: DropFolder, root: Path,
                                     make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "inbox" / ".atomic.json").write_bytes(request_body([("a.png", "atomic.png")]))
    os.rename(root / "inbox" / ".atomic.json", root / "inbox" / "atomic.json")
    assert wait_for(lambda: finished(root, "atomic"))["state"] == "done"


def test_inbox_file_moved_in_from_elsewhere(drop: DropFolder, root: Path,
                                            make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "staging").mkdir()
    (root / "staging" / "moved.json").write_bytes(request_body([("a.png", "moved.png")]))
    os.rename(root / "staging" / "moved.json", root / "inbox" / "moved.json")
    assert wait_for(lambda: finished(root, "moved"))["state"] == "done"


def test_inbox_burst_of_200_each_once(drop: DropFolder, root: Path,
                                      make_image: Callable[..., Path]) -> None:
    make_image("a.png", 16, 16)
    for index in range(200):
        (root / "inbox" / f"r{index:03d}.json").write_bytes(
            request_body([("a.png", f"burst/{index:03d}.png")]))
    wait_for(lambda: all(finished(root, f"r{i:03d}") for i in range(200)), timeout=120)
    time.sleep(1.0)
    statuses = sorted((root / "outbox").glob("*.status.json"))
    assert len(statuses) == 200  # no duplicates such as r001-2
    assert all(finished(root, f"r{i:03d}")["state"] == "done" for i in range(200))
    assert len(list((root / "burst").iterdir())) == 200
    assert list((root / "inbox").iterdir()) == []


def test_inbox_files_present_at_start(engine: Engine, root: Path,
                                      make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "inbox" / "early.json").write_bytes(request_body([("a.png", "early.png")]))
    old = time.time() - 3600
    os.utime(root / "inbox" / "early.json", (old, old))
    with DropFolder(engine, root / "inbox"):
        assert wait_for(lambda: finished(root, "early"))["state"] == "done"


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b'{"images": [], "operations": []}', "images: must list at least one image"),
    (b'{"images": [{"input": "../x.png", "output": "y.png"}], "operations": []}',
     "outside the root"),
    (b"\x00\x01binary", "not"),
])
def test_inbox_invalid_request_fails_once(drop: DropFolder, root: Path, content: bytes,
                                          message: str) -> None:
    (root / "inbox" / "bad.json").write_bytes(content)
    document = wait_for(lambda: finished(root, "bad"), timeout=30)
    assert document["state"] == "failed" and message in document["error"]
    assert document["images"] == [] and document["source"] == "inbox"
    time.sleep(2.5)  # several rescans later: still one status, nothing retried
    assert job_files(root / "outbox") == [
        "bad.request.json", "bad.status.json"]
    assert list((root / "inbox").iterdir()) == []


def test_inbox_oversized_request_fails(root: Path, pool: LocalPool) -> None:
    settings = Settings.build({"root": str(root), "max_body_bytes": 50}, environ={})
    engine = Engine(settings, pool)
    engine.start()
    try:
        with DropFolder(engine, root / "inbox"):
            (root / "inbox" / "huge.json").write_bytes(b"{" + b" " * 100 + b"}")
            document = wait_for(lambda: finished(root, "huge"))
    finally:
        engine.close()
    assert "request: is 102 bytes, the limit is 50 bytes" in document["error"]


def test_inbox_ignored_files_stay_untouched(drop: DropFolder, root: Path) -> None:
    inbox = root / "inbox"
    (inbox / ".hidden.json").write_text("{}")
    (inbox / "notes.txt").write_text("{}")
    (inbox / "request.JSON.bak").write_text("{}")
    (inbox / "folder.json").mkdir()
    (inbox / "link.json").symlink_to(root / "outbox")
    time.sleep(3.0)  # more than a rescan
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".hidden.json", "folder.json", "link.json", "notes.txt", "request.JSON.bak"]
    assert job_files(root / "outbox") == []


def test_inbox_same_name_twice_runs_twice(drop: DropFolder, root: Path,
                                          make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "inbox" / "again.json").write_bytes(request_body([("a.png", "1.png")]))
    wait_for(lambda: finished(root, "again"))
    (root / "inbox" / "again.json").write_bytes(request_body([("a.png", "2.png")]))
    assert wait_for(lambda: finished(root, "again-2"))["state"] == "done"
    assert (root / "1.png").exists() and (root / "2.png").exists()


def test_inbox_waits_in_inbox_while_queue_is_full(root: Path,
                                                  make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    executor = ThreadPoolExecutor(1)
    release = threading.Event()
    executor.submit(release.wait)
    settings = Settings.build({"root": str(root), "max_queue": 1}, environ={})
    engine = Engine(settings, executor, concurrency=1)
    engine.start()
    try:
        with DropFolder(engine, root / "inbox"):
            (root / "inbox" / "first.json").write_bytes(request_body([("a.png", "1.png")]))
            wait_for(lambda: status(root, "first"))
            (root / "inbox" / "second.json").write_bytes(request_body([("a.png", "2.png")]))
            time.sleep(2.5)
            assert (root / "inbox" / "second.json").exists() and not status(root, "second")
            release.set()
            assert wait_for(lambda: finished(root, "second"))["state"] == "done"
    finally:
        release.set()
        engine.close()
        executor.shutdown()


def test_inbox_request_larger_than_the_queue_fails_and_the_folder_goes_on(
        root: Path, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    settings = Settings.build({"root": str(root), "max_queue": 2}, environ={})
    engine = Engine(settings, pool)
    engine.start()
    try:
        with DropFolder(engine, root / "inbox"):
            (root / "inbox" / "big.json").write_bytes(
                request_body([("a.png", f"{i}.png") for i in range(3)]))
            document = wait_for(lambda: finished(root, "big"))
            assert "more than the queue holds (2, --max-queue)" in document["error"]
            (root / "inbox" / "next.json").write_bytes(request_body([("a.png", "next.png")]))
            assert wait_for(lambda: finished(root, "next"))["state"] == "done"
    finally:
        engine.close()


def test_inbox_file_replaced_again_and_again_runs_what_it_records(
        drop: DropFolder, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    for version in range(15):  # each version renamed over the last, as an atomic drop does
        staged = root / "inbox" / ".same.json"
        staged.write_bytes(request_body([("a.png", f"out/v{version}.png")]))
        staged.rename(root / "inbox" / "same.json")
        time.sleep(0.03)
    wait_for(lambda: not (root / "inbox" / "same.json").exists())
    time.sleep(1.0)
    statuses = sorted((root / "outbox").glob("same*.status.json"))
    assert statuses
    for status_path in statuses:
        job_id = status_path.name[:-len(".status.json")]
        document = wait_for(lambda job_id=job_id: finished(root, job_id))
        kept = json.loads((root / "outbox" / f"{job_id}.request.json").read_bytes())
        assert [i["output"] for i in document["images"]] == [
            i["output"] for i in kept["images"]]
        assert document["images"][0]["outputs"] == [kept["images"][0]["output"]]


def test_inbox_non_utf8_file_name_is_taken(drop: DropFolder, root: Path,
                                           make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    name = os.fsencode(root / "inbox") + b"/caf\xe9.json"
    with open(name, "wb") as file:
        file.write(request_body([("a.png", "cafe.png")]))
    wait_for(lambda: (root / "cafe.png").exists())
    assert os.listdir(root / "inbox") == []


def test_inbox_on_another_file_system_is_copied_in(
        root: Path, engine: Engine, make_image: Callable[..., Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    inbox = tmp_path_factory.mktemp("other-fs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inbox)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        make_image("a.png")
        with DropFolder(engine, inbox):
            (inbox / "far.json").write_bytes(request_body([("a.png", "far.png")]))
            assert wait_for(lambda: finished(root, "far"))["state"] == "done"
        assert list(inbox.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(inbox)], capture_output=True)


def test_inbox_id_reserved_by_a_killed_server_is_released(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    # What a kill -9 between reserving an id and moving the file in leaves behind:
    (root / "outbox" / "late.request.json").write_bytes(b"")
    (root / "outbox" / "late.status.json").write_text(json.dumps({
        "id": "late", "state": "queued", "source": "inbox", "created_at": "2026-01-01T00:00:00Z",
        "started_at": None, "finished_at": None, "operations": [],
        "progress": {"done": 0, "total": 0}, "error": None, "images": []}))
    (root / "inbox" / "late.json").write_bytes(request_body([("a.png", "late.png")]))
    engine = Engine(settings, pool)
    engine.start()
    try:
        with DropFolder(engine, root / "inbox"):
            document = wait_for(lambda: finished(root, "late"))
    finally:
        engine.close()
    assert document["state"] == "done" and document["source"] == "inbox"
    assert not (root / "outbox" / "late-2.status.json").exists()


def test_inbox_file_taken_by_a_killed_server_is_not_run_twice(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    # What a kill -9 between linking the file into the outbox and removing its INBOX name
    # leaves behind: the same file under both names, and no status yet.
    (root / "inbox" / "twice.json").write_bytes(request_body([("a.png", "twice.png")]))
    os.link(root / "inbox" / "twice.json", root / "outbox" / "twice.request.json")
    engine = Engine(settings, pool)
    engine.start()
    try:
        with DropFolder(engine, root / "inbox"):
            assert wait_for(lambda: finished(root, "twice"))["state"] == "done"
            wait_for(lambda: not (root / "inbox" / "twice.json").exists())
            time.sleep(2.5)
    finally:
        engine.close()
    assert not (root / "outbox" / "twice-2.request.json").exists()


def test_inbox_every_body_http_refuses_fails_once_with_its_message(
        root: Path, pool: LocalPool, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.build({"root": str(root), **CORPUS_LIMITS}, environ={})
    engine = Engine(settings, pool)
    engine.start()
    try:
        with TestClient(create_app(engine, settings)) as client:
            answers = {name: client.post("/jobs", content=body)
                       for name, body, _ in INVALID_BODIES}
        assert {name: reply.status_code for name, reply in answers.items()} == {
            name: 422 for name in answers}
        assert job_files(root / "outbox") == []
        with DropFolder(engine, root / "inbox"):
            for name, body, _ in INVALID_BODIES:
                (root / "inbox" / f"{name}.json").write_bytes(body)
            wait_for(lambda: all(finished(root, name) for name in answers), timeout=30)
            wait_for(lambda: list((root / "inbox").iterdir()) == [], timeout=10)
            time.sleep(inbox.RESCAN + 0.5)  # a rescan later: nothing comes back, nothing retried
    finally:
        engine.close()
    for name, reply in answers.items():
        document = finished(root, name)
        assert document is not None and document["state"] == "failed", name
        assert document["error"] == reply.json()["detail"], name
        assert document["images"] == [] and document["source"] == "inbox"
    assert sorted(p.name for p in (root / "outbox").glob("*.status.json")) == sorted(
        f"{name}.status.json" for name in answers)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_inbox_request_fuzz_gets_the_verdict_http_gives(
        root: Path, engine: Engine, settings: Settings, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    dropped = iter(range(1_000_000))
    with TestClient(create_app(engine, settings)) as client, \
            DropFolder(engine, root / "inbox"):

        @hypothesis.settings(max_examples=50, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(json_values)
        def same_verdict(value: object) -> None:
            body = json.dumps(value).encode()
            reply = client.post("/jobs", content=body)
            name = f"fuzz-{next(dropped)}"
            staged = root / "inbox" / f".{name}.json"
            staged.write_bytes(body)
            staged.rename(root / "inbox" / f"{name}.json")
            document = wait_for(lambda: _judged(status(root, name)), timeout=30)
            if reply.status_code == 422:
                assert document["state"] == "failed" and document["images"] == []
                assert document["error"] == reply.json()["detail"]
            else:
                assert reply.status_code == 202, reply.text
                accepted = reply.json()
                assert [(i["input"], i["output"]) for i in document["images"]] == [
                    (i["input"], i["output"]) for i in accepted["images"]]
                assert document["operations"] == accepted["operations"]

        same_verdict()
    assert list((root / "inbox").iterdir()) == []


def _judged(document: dict | None) -> dict | None:
    """A drop-folder job's status once the request is judged (not while its id is reserved)."""
    return document if document and (document["images"] or document["state"] == "failed") \
        else None


class _FaultyEngine(Engine):
    """An engine whose drop-folder intake has a bug."""

    calls = 0

    def take(self, path: Path, **options: object) -> dict:
        type(self).calls += 1
        raise RuntimeError("a bug in taking files")


def test_inbox_file_that_keeps_failing_is_not_retried_in_a_loop(
        root: Path, settings: Settings, pool: LocalPool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(inbox, "RETRY", 0.1)
    monkeypatch.setattr(inbox, "RESCAN", 0.2)
    engine = _FaultyEngine(settings, pool)
    engine.start()
    request = root / "inbox" / "odd.json"
    try:
        with DropFolder(engine, root / "inbox"):
            request.write_bytes(request_body([("a.png", "b.png")]))
            wait_for(lambda: _FaultyEngine.calls >= inbox.RETRIES)
            time.sleep(1.5)  # several rescans
            assert _FaultyEngine.calls == inbox.RETRIES and request.exists()
            request.write_bytes(request_body([("a.png", "c.png")]))  # changed: tried again
            wait_for(lambda: _FaultyEngine.calls >= 2 * inbox.RETRIES)
            time.sleep(1.0)
            assert _FaultyEngine.calls == 2 * inbox.RETRIES
    finally:
        engine.close()
    lines = [r for r in caplog.records if r.name == "imgserver.inbox"]
    assert len(lines) == 2 * inbox.RETRIES
    assert sum(r.exc_info is not None for r in lines) == 2  # the traceback once per version
    assert "it stays in the drop folder, untouched until it changes" in lines[-1].getMessage()
