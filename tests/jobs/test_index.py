"""The job index: listing order, filters and cursors; damage, loss and rebuilding."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from imgserver.errors import RequestError
from imgserver.executors.pool import LocalPool
from imgserver.jobs.engine import Engine
from imgserver.jobs.index import FILENAME, INDEXES, Index
from imgserver.settings import Settings

from conftest import final_status, job_summary, request_body, sql, sqlite_indexes, wait_for


@pytest.fixture
def index(tmp_path: Path) -> Index:
    opened = Index(tmp_path)
    opened.open()
    return opened


def test_index_pages_newest_first_with_ties_broken_by_id(index: Index) -> None:
    for number in range(7):
        index.put(job_summary(f"job{number}", f"2026-01-01T00:00:0{number // 2}.000+00:00"))
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
        index.put(job_summary(f"j{number}", f"2026-01-01T00:00:0{number}.000+00:00", state,
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
        index.put(job_summary(f"job{number:04d}", "2026-01-01T00:00:00.000+00:00"))
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
    reopened.put(job_summary("new", "2026-01-02T00:00:00.000+00:00"))
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


def test_index_left_without_its_indexes_makes_them_at_open(tmp_path: Path) -> None:
    index = Index(tmp_path)
    index.open()
    with index.bulk():
        index.put(job_summary("a", "2026-01-01T00:00:00.000+00:00"))
        index.put(job_summary("b", "2026-01-01T00:00:01.000+00:00"))
        assert sqlite_indexes(index.path) == set()
    assert sqlite_indexes(index.path) == set(INDEXES)
    index.close()
    for name in INDEXES:  # what a process killed during a bulk scan leaves behind
        sql(index.path, f"DROP INDEX {name}")
    reopened = Index(tmp_path)
    reopened.open()
    assert sqlite_indexes(reopened.path) == set(INDEXES)
    assert [job["id"] for job in reopened.page()[0]] == ["b", "a"]
