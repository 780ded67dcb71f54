"""Finished jobs written after the engine's lock: the order of their writes, and a job
held in memory while its files cannot be written."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from imgserver.jobs.entry import Entry
from imgserver.jobs.finishing import Finishing
from imgserver.jobs.job import DONE, ImageStatus, Job
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.storage import Storage

from conftest import fill


@pytest.fixture
def outbox(root: Path) -> Iterator[Outbox]:
    """An open outbox in ``root/outbox``."""
    outbox = Outbox(root / "outbox")
    outbox.open()
    yield outbox
    outbox.close()


def finished(job_id: str) -> Entry:
    """A job whose one image is done, finished, with its final document set (as
    ``Ledger.retire`` leaves it)."""
    job = Job(job_id, "http", ["resize=50"], [ImageStatus("a.png", "b.png", DONE, ["b.png"])])
    assert job.finish_if_complete()
    return Entry(job, final=job.to_document())


def finishing(outbox: Outbox) -> tuple[Finishing, threading.Condition, Storage]:
    lock = threading.Condition()
    storage = Storage(outbox)
    return Finishing(outbox, lock, storage), lock, storage


def test_finishing_tells_a_waiter_after_the_status_file_then_puts_the_row(
        outbox: Outbox) -> None:
    jobs, lock, _ = finishing(outbox)
    entry = finished("job-1")
    seen: list[tuple[bool, list]] = []
    waiter: Future = Future()
    # What is on disk at the moment the waiter is told.
    waiter.add_done_callback(lambda _: seen.append((
        outbox.status_path("job-1").exists(), outbox.index.page(limit=10)[0])))
    entry.waiters.append(waiter)
    with lock:
        jobs.add(entry)
    assert "job-1" in jobs and jobs.entry("job-1") is entry and jobs.writing() == [entry]
    assert not outbox.status_path("job-1").exists()
    jobs.write()
    assert waiter.result(timeout=0) == entry.final
    assert seen == [(True, [])]  # the status file first, the row after
    assert json.loads(outbox.status_path("job-1").read_text())["state"] == DONE
    assert [row["id"] for row in outbox.index.page(limit=10)[0]] == ["job-1"]
    assert "job-1" not in jobs and jobs.entry("job-1") is None and not entry.waiters
    with lock:
        jobs.await_written()  # returns at once: nothing is being written


def test_finishing_holds_a_job_it_cannot_write_until_repair(
        root: Path, mount: Callable[..., Path]) -> None:
    outbox = Outbox(mount("outbox", "size=1m"))
    outbox.open()
    try:
        jobs, lock, storage = finishing(outbox)
        entry = finished("job-2")
        waiter: Future = Future()
        entry.waiters.append(waiter)
        with lock:
            jobs.add(entry)
        filler = fill(outbox.path)
        jobs.write()
        # Told from memory; held, with why, until the outbox takes writes again.
        assert waiter.result(timeout=0) == entry.final
        assert not outbox.status_path("job-2").exists()
        assert "job-2" in jobs and jobs.entry("job-2") is None
        assert jobs.unsaved("job-2") == (entry.final, entry.job.owner)
        assert storage.problem is not None and "job-2" in storage.problem
        filler.unlink()
        with lock:
            jobs.repair()
        assert json.loads(outbox.status_path("job-2").read_text()) == entry.final
        assert "job-2" not in jobs and jobs.unsaved("job-2") is None
        assert [row["id"] for row in outbox.index.page(limit=10)[0]] == ["job-2"]
    finally:
        outbox.close()
