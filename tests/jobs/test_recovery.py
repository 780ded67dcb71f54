"""Recovery at start: what an unfinished job found in the outbox becomes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from imgserver.executors.pool import LocalPool
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

from conftest import final_status, request_body


def cancelled_while_running(root: Path, outputs: list[str], operations: list[str]) -> None:
    """A job in the outbox as a server left it when it died: cancelled, its images running."""
    body = request_body([("a.png", output) for output in outputs], operations)
    (root / "outbox" / "cut.request.json").write_bytes(body)
    created = time.time() - 60
    (root / "outbox" / "cut.status.json").write_text(json.dumps({
        "id": "cut", "state": "running", "source": "http",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(created)),
        "started_at": None, "finished_at": None, "operations": operations,
        "progress": {"done": 0, "total": len(outputs)}, "error": None,
        "images": [{"input": "a.png", "output": output, "state": "running", "outputs": [],
                    "error": None} for output in outputs]}))
    (root / "outbox" / "cut.cancel").touch()


def test_recovery_cancelled_job_lists_outputs_written_since_it_was_accepted(
        root: Path, settings: Settings, pool: LocalPool, make_image: Callable[..., Path]
        ) -> None:
    make_image("a.png")
    cancelled_while_running(root, ["whole.png", "half.png", "none.png", "old.png"], ["split"])
    for name in ("whole_lt", "whole_rt", "whole_lb", "whole_rb", "half_lt", "half_rb",
                 "old_lt", "old_rt", "old_lb", "old_rb"):
        make_image(f"{name}.png")
    for tile in ("lt", "rt", "lb", "rb"):  # there since before the job: not its doing
        os.utime(root / f"old_{tile}.png", (time.time() - 3600,) * 2)
    engine = Engine(settings, pool)
    engine.start()
    try:
        final = final_status(engine, "cut")
    finally:
        engine.close()
    whole, half, none, old = final["images"]
    assert whole["state"] == "done" and whole["outputs"] == [
        "whole_lt.png", "whole_rt.png", "whole_lb.png", "whole_rb.png"]
    assert half["state"] == "failed" and half["outputs"] == ["half_lt.png", "half_rb.png"]
    assert half["error"] == ("interrupted when the server stopped, after writing 2 of its "
                             "4 files")
    assert none["state"] == "cancelled" and none["outputs"] == []
    assert old["state"] == "cancelled" and old["outputs"] == []
    assert final["state"] == "cancelled"
    assert final["error"] == "cancelled: 2 of 4 images not run"
    assert all((root / f"old_{tile}.png").exists() for tile in ("lt", "rt", "lb", "rb"))
