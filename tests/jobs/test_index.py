"""The job index: listing order, filters and cursors; damage, loss and rebuilding."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from imgserver.errors import RequestError
from imgserver.executors.pool import LocalPool
from imgserver.jobs import outbox as outbox_module
from imgserver.jobs.engine import Engine
from imgserver.jobs.index import FILENAME, INDEXES, Index
from imgserver.jobs.outbox import Outbox
from imgserver.settings import Settings

from conftest import final_status, request_body, wait_for


def summary(job_id: str, created_at: str, state: str = "done", source: str = "http") -> dict:
    return {"id": job_id, "state": state, "source": source, "created_at": created_at,
            "started_at": None, "finished_at": created_at if state != "queued" else None,
            "expires_at": None, "operations": [], "progress": {"done": 0, "total": 1},
            "error": None}


@pytest.fixture
def index(tmp_path: Path) -> Index:
    opened = Index(tmp_path)
    opened.open()
    return opened


def test_index_pages_newest_first_with_ties_broken_by_id(index: Index) -> None:
    for number in range(7):
        index.put(summary(f"job{number}", f"2026-01-01T00:00:0{number // 2}.000+00:00"))
    seen: list[str] = []
    cursor = None
    while True:
        jobs, cursor = index.page(limit=3, cursor=cursor)
        seen += [job["id"] for job in jobs]
        if cursor is None:
            break
    assert seen == ["job6", "job5", "job4", "job3", "job2", "job1", "job0"]


def test_index_filters_by_states_and_source(index: Index) -> None:
    states = ["done", "failed", "queued", "cancelled", "done", "running"]
    for number, state in enumerate(states):
        index.put(summary(f"j{number}", f"2026-01-01T00:00:0{number}.000+00:00", state,
                          "inbox" if number % 2 else "http"))
    jobs, after = index.page(states=["done", "failed"])
    assert [job["id"] for job in jobs] == ["j4", "j1", "j0"] and after is None
    jobs, after = index.page(states=["done", "running", "queued"], limit=2)
    assert [job["id"] for job in jobs] == ["j5", "j4"]
    jobs, after = index.page(states=["done", "running", "queued"], limit=2, cursor=after)
    assert [job["id"] for job in jobs] == ["j2", "j0"] and after is None
    jobs, _ = index.page(source="inbox")
    assert [job["id"] for job in jobs] == ["j5", "j3", "j1"]
    jobs, _ = index.page(source="inbox", states=["running", "cancelled"])
    assert [job["id"] for job in jobs] == ["j5", "j3"]
    assert index.unfinished() == ["j2", "j5"]


def test_index_bad_cursor_names_the_parameter(index: Index) -> None:
    with pytest.raises(RequestError) as caught:
        index.page(cursor="not-a-cursor")
    assert caught.value.problems[0].field == "cursor"


def test_index_reserve_claims_an_id_once(index: Index) -> None:
    assert index.reserve("a", "http", "2026-01-01T00:00:00.000+00:00")
    assert not index.reserve("a", "inbox", "2026-01-01T00:00:00.000+00:00")


def test_index_clean_close_needs_no_scan(tmp_path: Path) -> None:
    first = Index(tmp_path)
    first.open()
    assert first.needs_scan  # new: the outbox may hold jobs it does not know
    first.scanned()
    first.close()
    second = Index(tmp_path)
    second.open()
    assert not second.needs_scan
    # Not closed (a kill -9), on the same boot: every commit is in the file, no scan.
    third = Index(tmp_path)
    third.open()
    assert not third.needs_scan


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "version"])
def test_index_damaged_file_is_replaced_and_scanned(tmp_path: Path, damage: str) -> None:
    index = Index(tmp_path)
    index.open()
    for number in range(2000):  # several pages of rows
        index.put(summary(f"job{number:04d}", "2026-01-01T00:00:00.000+00:00"))
    index.scanned()
    index.close()
    path = tmp_path / FILENAME
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\0garbage" * 1000)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = '0' WHERE key = 'version'")
    reopened = Index(tmp_path)
    reopened.open()
    assert reopened.needs_scan and reopened.ids() == set()
    reopened.put(summary("new", "2026-01-02T00:00:00.000+00:00"))
    assert [job["id"] for job in reopened.page()[0]] == ["new"]


def test_index_lost_while_down_is_rebuilt_and_nothing_is_lost(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    engine = Engine(settings, pool)
    engine.start()
    ids = [engine.submit(request_body([("a.png", f"out/{n}.png")]), source="http")["id"]
           for n in range(5)]
    for job_id in ids:
        final_status(engine, job_id)
    engine.close()
    # Down: the index goes, and one job is left unfinished (as if killed mid-job).
    for suffix in ("", "-wal", "-shm"):
        (root / "outbox" / (FILENAME + suffix)).unlink(missing_ok=True)
    (root / "outbox" / "left.request.json").write_bytes(request_body([("a.png", "left.png")]))
    engine = Engine(settings, pool)
    engine.start()
    try:
        wait_for(lambda: not engine.outbox.index.needs_scan)
        listed = {job["id"]: job for job in engine.jobs(limit=1000)[0]}
        assert set(listed) == {*ids, "left"}
        assert all(listed[job_id]["state"] == "done" for job_id in ids)
        assert final_status(engine, "left")["state"] == "done"
        assert (root / "left.png").exists()
        stored = json.loads((root / "outbox" / f"{ids[0]}.status.json").read_text())
        assert listed[ids[0]] == {k: v for k, v in stored.items() if k != "images"}
    finally:
        engine.close()


def _outbox_of_jobs(folder: Path, count: int) -> tuple[Outbox, list[dict]]:
    """An outbox holding ``count`` finished jobs' files, as the server writes them, and a
    few odd ones: a summary longer than the head a scan reads first, a status file written
    without indentation, an unfinished job, a request without a status, a damaged status."""
    outbox = Outbox(folder)
    outbox.ensure()
    documents = []
    for number in range(count):
        document = summary(f"job{(number * 7919) % count:04d}",
                           f"2026-01-01T00:{number // 60:02d}:{number % 60:02d}.000+00:00",
                           "failed" if number % 5 == 0 else "done",
                           "inbox" if number % 3 == 0 else "http")
        document["notifications"] = []
        if number == 1:
            document["error"] = "x" * 10_000
        document["images"] = [{"input": "a.png", "output": f"{n}.png", "state": "done",
                               "outputs": [f"{n}.png"], "error": None} for n in range(3)]
        outbox.write_status(document, index=False)
        outbox.request_path(document["id"]).write_bytes(request_body([("a.png", "b.png")]))
        documents.append(document)
    compact = documents[2]
    outbox.status_path(compact["id"]).write_text(json.dumps(compact))
    renamed = documents[3] | {"id": "renamed"}  # the file's name is the job's id
    outbox.status_path("renamed").write_text(
        outbox.status_path(documents[3]["id"]).read_text())
    outbox.request_path("renamed").write_bytes(request_body([("a.png", "b.png")]))
    documents.append(renamed)
    outbox.write_status(summary("queued", "2026-01-02T00:00:00.000+00:00", "queued")
                        | {"images": []}, index=False)
    for job_id in ("queued", "requested", "damaged"):
        outbox.request_path(job_id).write_bytes(request_body([("a.png", f"{job_id}.png")]))
    outbox.status_path("damaged").write_text('{\n  "id": "damaged",\n  "sta')
    return outbox, [{k: v for k, v in d.items() if k != "images"} for d in documents]


def _sql(path: Path, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        return db.execute(query).fetchall()


def _rows(outbox: Outbox) -> list[tuple]:
    return _sql(outbox.index.path, "SELECT * FROM jobs ORDER BY id")


def _indexes(path: Path) -> set[str]:
    return {name for (name,) in _sql(
        path, "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


@pytest.mark.parametrize("bulk", [False, True])
def test_scan_indexes_every_job_on_disk_and_finds_the_unfinished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk: bool) -> None:
    monkeypatch.setattr(outbox_module, "BATCH", 7)  # several batches
    monkeypatch.setattr(outbox_module, "BULK_SCAN", 10 if bulk else 10**9)
    outbox, documents = _outbox_of_jobs(tmp_path, 40)
    outbox.open()
    assert outbox.index.needs_scan
    unfinished: list[str] = []
    assert outbox.scan(unfinished.append) == 41
    assert sorted(unfinished) == ["damaged", "queued", "requested"]
    assert not outbox.index.needs_scan
    assert _indexes(outbox.index.path) == set(INDEXES)
    listed, _ = outbox.index.page(limit=1000)
    assert listed == sorted(documents, key=lambda d: (d["created_at"], d["id"]), reverse=True)
    failed, _ = outbox.index.page(states=["failed"], source="inbox", limit=1000)
    assert {job["id"] for job in failed} == {
        d["id"] for d in documents if d["state"] == "failed" and d["source"] == "inbox"}
    # A second scan finds nothing new (the unfinished jobs are the engine's to index).
    assert outbox.scan(unfinished.append) == 0


def test_scan_in_bulk_makes_the_same_index(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    outbox, _ = _outbox_of_jobs(tmp_path, 40)
    rows = []
    for threshold in (10**9, 10):
        monkeypatch.setattr(outbox_module, "BULK_SCAN", threshold)
        outbox.open()
        outbox.scan(lambda job_id: None)
        rows.append(_rows(outbox))
        outbox.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / (FILENAME + suffix)).unlink(missing_ok=True)
        outbox = Outbox(tmp_path)
    assert rows[0] == rows[1] and len(rows[0]) == 41


def test_scan_stopped_early_leaves_the_index_incomplete_with_its_indexes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "BATCH", 10)
    monkeypatch.setattr(outbox_module, "BULK_SCAN", 10)
    outbox, documents = _outbox_of_jobs(tmp_path, 40)
    outbox.open()
    checks = iter([False, False, True])
    first = outbox.scan(lambda job_id: None, lambda: next(checks))  # two batches of ten
    assert 10 < first <= 20 and len(outbox.index.ids()) == first
    assert outbox.index.needs_scan and _indexes(outbox.index.path) == set(INDEXES)
    outbox.close()
    reopened = Outbox(tmp_path)
    reopened.open()
    assert reopened.index.needs_scan  # the next start scans again, and finds the rest
    assert reopened.scan(lambda job_id: None) == 41 - first
    assert not reopened.index.needs_scan
    assert len(reopened.index.page(limit=1000)[0]) == len(documents)


def test_index_left_without_its_indexes_makes_them_at_open(tmp_path: Path) -> None:
    index = Index(tmp_path)
    index.open()
    with index.bulk():
        index.put(summary("a", "2026-01-01T00:00:00.000+00:00"))
        index.put(summary("b", "2026-01-01T00:00:01.000+00:00"))
        assert _indexes(index.path) == set()
    assert _indexes(index.path) == set(INDEXES)
    index.close()
    for name in INDEXES:  # what a process killed during a bulk scan leaves behind
        _sql(index.path, f"DROP INDEX {name}")
    reopened = Index(tmp_path)
    reopened.open()
    assert _indexes(reopened.path) == set(INDEXES)
    assert [job["id"] for job in reopened.page()[0]] == ["b", "a"]
