"""The outbox's folder sync: one fsync shared by the threads that need it at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imgserver.jobs import outbox as outbox_module
from imgserver.jobs.outbox import FolderSync

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
