"""Rescanning the outbox: every job on disk gets its row; the unfinished are found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgserver.jobs import rescan
from imgserver.jobs.index import FILENAME, INDEXES
from imgserver.jobs.outbox import Outbox

from conftest import job_summary, request_body, sql, sqlite_indexes


def _outbox_of_jobs(folder: Path, count: int) -> tuple[Outbox, list[dict]]:
    """An outbox holding ``count`` finished jobs' files, as the server writes them, and a
    few odd ones: a summary longer than the head a scan reads first, a status file written
    without indentation, an unfinished job, a request without a status, a damaged status."""
    outbox = Outbox(folder)
    outbox.ensure()
    documents = []
    for number in range(count):
        document = job_summary(f"job{(number * 7919) % count:04d}",
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
    outbox.write_status(job_summary("queued", "2026-01-02T00:00:00.000+00:00", "queued")
                        | {"images": []}, index=False)
    for job_id in ("queued", "requested", "damaged"):
        outbox.request_path(job_id).write_bytes(request_body([("a.png", f"{job_id}.png")]))
    outbox.status_path("damaged").write_text('{\n  "id": "damaged",\n  "sta')
    return outbox, [{k: v for k, v in d.items() if k != "images"} for d in documents]


@pytest.mark.parametrize("bulk", [False, True])
def test_rescan_indexes_every_job_on_disk_and_finds_the_unfinished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk: bool) -> None:
    monkeypatch.setattr(rescan, "BATCH", 7)  # several batches
    monkeypatch.setattr(rescan, "BULK_SCAN", 10 if bulk else 10**9)
    outbox, documents = _outbox_of_jobs(tmp_path, 40)
    outbox.open()
    assert outbox.index.needs_scan
    unfinished: list[str] = []
    assert rescan.scan(outbox, unfinished.append) == 41
    assert sorted(unfinished) == ["damaged", "queued", "requested"]
    assert not outbox.index.needs_scan
    assert sqlite_indexes(outbox.index.path) == set(INDEXES)
    listed, _ = outbox.index.page(limit=1000)
    assert listed == sorted(documents, key=lambda d: (d["created_at"], d["id"]), reverse=True)
    failed, _ = outbox.index.page(states=["failed"], source="inbox", limit=1000)
    assert {job["id"] for job in failed} == {
        d["id"] for d in documents if d["state"] == "failed" and d["source"] == "inbox"}
    # A second scan finds nothing new (the unfinished jobs are the engine's to index).
    assert rescan.scan(outbox, unfinished.append) == 0


def test_rescan_in_bulk_makes_the_same_index(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    outbox, _ = _outbox_of_jobs(tmp_path, 40)
    rows = []
    for threshold in (10**9, 10):
        monkeypatch.setattr(rescan, "BULK_SCAN", threshold)
        outbox.open()
        rescan.scan(outbox, lambda job_id: None)
        rows.append(sql(outbox.index.path, "SELECT * FROM jobs ORDER BY id"))
        outbox.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / (FILENAME + suffix)).unlink(missing_ok=True)
        outbox = Outbox(tmp_path)
    assert rows[0] == rows[1] and len(rows[0]) == 41


def test_rescan_stopped_early_leaves_the_index_incomplete_with_its_indexes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rescan, "BATCH", 10)
    monkeypatch.setattr(rescan, "BULK_SCAN", 10)
    outbox, documents = _outbox_of_jobs(tmp_path, 40)
    outbox.open()
    checks = iter([False, False, True])
    first = rescan.scan(outbox, lambda job_id: None, lambda: next(checks))  # two batches of ten
    assert 10 < first <= 20 and len(outbox.index.ids()) == first
    assert outbox.index.needs_scan and sqlite_indexes(outbox.index.path) == set(INDEXES)
    outbox.close()
    reopened = Outbox(tmp_path)
    reopened.open()
    assert reopened.index.needs_scan  # the next start scans again, and finds the rest
    assert rescan.scan(reopened, lambda job_id: None) == 41 - first
    assert not reopened.index.needs_scan
    assert len(reopened.index.page(limit=1000)[0]) == len(documents)
