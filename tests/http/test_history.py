"""The history of events: what a stream at a cursor reads, and what is let go."""

from __future__ import annotations

import json

import pytest

from imgserver.http import history
from imgserver.http.history import History, encode
from imgserver.jobs.events import JobAccepted, StateChanged


def _state(seq: int, job_id: str = "a", folder: str = "") -> history.Frame:
    return encode(StateChanged(seq, job_id, "running", {"done": 0, "total": 1},
                               folder=folder))


def _data(frame_bytes: bytes) -> dict:
    line = next(line for line in frame_bytes.decode().splitlines() if line.startswith("data:"))
    return json.loads(line.removeprefix("data:"))


def test_history_encode_names_the_job_only_in_the_all_jobs_stream() -> None:
    frame = _state(7)
    assert frame.job_bytes is not None and b"id: 7" in frame.job_bytes
    assert _data(frame.job_bytes) == {"state": "running", "progress": {"done": 0, "total": 1}}
    assert _data(frame.all_bytes)["job"] == "a"
    accepted = encode(JobAccepted(8, "b", {"id": "b", "state": "queued"}))
    assert accepted.job_bytes is None  # a job's own stream starts with its status


def test_history_after_reads_a_jobs_frames_of_a_folder_in_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kept = History()
    for seq in range(1, 101):
        kept.append(_state(seq, "a" if seq % 2 else "b", "f" if seq % 4 == 1 else ""))
    assert [f.seq for f in kept.after(90, "a")] == [91, 93, 95, 97, 99]
    assert [f.seq for f in kept.after(80, None, view="f")] == [81, 85, 89, 93, 97]
    monkeypatch.setattr(history, "CHUNK", 1)
    assert [f.seq for f in kept.after(10, None)] == [11]  # at least one, however small


def test_history_lets_the_oldest_go_by_count_and_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "HISTORY", 10)
    kept = History()
    assert not kept.holds(0)  # nothing held yet: a reconnecting client needs a status
    for seq in range(1, 26):
        kept.append(_state(seq))
    assert kept.last == 25 and kept.holds(15) and not kept.holds(14)
    assert kept.lost(14) and not kept.lost(15)
    assert kept.after(0, "a")[0].seq == 16
    size = len(_state(26).all_bytes) + len(_state(26).job_bytes or b"")
    monkeypatch.setattr(history, "HISTORY_BYTES", 3 * size)
    kept.append(_state(26))
    assert [f.seq for f in kept.after(0, None)] == [24, 25, 26]
