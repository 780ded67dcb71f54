"""The outbox's folder sync: one fsync shared by the threads that need it at once; the
status file's text."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from imgserver.jobs import outbox as outbox_module
from imgserver.jobs.outbox import FolderSync, Outbox, status_json

from conftest import wait_for


class _Counted:
    """The real folder fsync, counted, the first one held until ``release`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = threading.Event()
        self.release = threading.Event()
        self._real = outbox_module._fsync_folder

    def __call__(self, path: Path) -> OSError | None:
        self.calls += 1
        if self.calls == 1:
            self.running.set()
            assert self.release.wait(30)
        return self._real(path)


def test_outbox_folder_sync_is_shared_by_the_callers_that_arrive_while_one_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = _Counted()
    monkeypatch.setattr(outbox_module, "_fsync_folder", counted)
    sync = FolderSync(tmp_path)
    returned: list[int] = []  # how many fsyncs had begun when each caller returned
    lock = threading.Lock()

    def call() -> None:
        sync()
        with lock:
            returned.append(counted.calls)

    first = threading.Thread(target=call)
    first.start()
    assert counted.running.wait(30)
    late = [threading.Thread(target=call) for _ in range(16)]
    for thread in late:
        thread.start()
    # Each waits on the sync's condition for the fsync after the one running.
    wait_for(lambda: len(sync._cond._waiters) == 16)  # type: ignore[attr-defined]
    assert returned == []  # nobody returns on an fsync that began before its call
    counted.release.set()
    for thread in [first, *late]:
        thread.join(30)
    # The first caller's fsync, then one for the sixteen that came while it ran.
    assert counted.calls == 2
    assert sorted(returned)[1:] == [2] * 16


def test_outbox_folder_sync_raises_what_the_fsync_met(tmp_path: Path) -> None:
    sync = FolderSync(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        sync()
    (tmp_path / "gone").mkdir()
    sync()  # the next one is tried afresh


def test_outbox_status_file_holds_a_key_per_line_and_an_image_per_line(tmp_path: Path) -> None:
    document = {"id": "j1", "state": "done", "error": None, "progress": {"done": 2, "total": 2},
                "operations": ["resize=50"],
                "images": [{"input": "in/\udc80.jpg", "output": "o/é.jpg", "state": "done"},
                           {"input": "b.png", "output": "o/b.png", "state": "done"}]}
    outbox = Outbox(tmp_path)
    outbox.ensure()
    outbox.write_status(document, index=False)
    text = outbox.status_path("j1").read_bytes()
    assert text == status_json(document)
    assert json.loads(text) == document  # a lone surrogate and non-ASCII survive, escaped
    assert text.isascii()
    lines = text.decode().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert lines[1:6] == ['  "id": "j1",', '  "state": "done",', '  "error": null,',
                          '  "progress": {"done": 2, "total": 2},',
                          '  "operations": ["resize=50"],']
    assert lines[6] == '  "images": ['  # last, as a scan expects (rescan._IMAGES_KEY)
    assert [json.loads(line.rstrip(",")) for line in lines[7:9]] == document["images"]


def test_outbox_status_write_that_fails_leaves_no_temporary_file(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.ensure()
    document = {"id": "j3", "state": "done", "error": None, "images": []}
    outbox.write_status(document, index=False)
    assert list(outbox.temps.iterdir()) == []  # renamed into place
    outbox.status_path("j3").unlink()
    outbox.status_path("j3").mkdir()  # in the way: the rename fails
    with pytest.raises(OSError):
        outbox.write_status(document, index=False)
    assert list(outbox.temps.iterdir()) == []


def test_outbox_status_file_of_a_job_without_images(tmp_path: Path) -> None:
    document = {"id": "j2", "state": "failed", "error": "images: must not be empty", "images": []}
    assert json.loads(status_json(document)) == document
    assert status_json(document).endswith(b',\n  "images": []\n}\n')

