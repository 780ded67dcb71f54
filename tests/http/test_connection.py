"""Disconnects: a client that leaves while its answer is under way is one INFO line, whether
its answer comes before or after the middleware starts watching for it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from imgserver.http.connection import GONE, WATCH_AFTER, Disconnects

SCOPE = {"type": "http", "method": "POST", "path": "/jobs", "query_string": b"wait=true",
         "client": ("127.0.0.1", 4321)}


def serve(answer_after: float, client_left: bool) -> tuple[list[dict], int]:
    """Run one request through Disconnects: an app that reads the body, works
    ``answer_after`` seconds and answers; the client gone at once when ``client_left``.
    What was sent, and the tasks still running once it is over besides the test's own."""
    sent: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await asyncio.sleep(answer_after)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def main() -> tuple[list[dict], int]:
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            if client_left:  # as uvicorn answers once the connection is lost
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        # The protocol marks the scope of a request whose connection is lost.
        scope = {**SCOPE, GONE: True} if client_left else dict(SCOPE)
        await Disconnects(app)(scope, receive, send)
        await asyncio.sleep(0)  # a cancelled watcher ends
        return sent, len(asyncio.all_tasks()) - 1

    return asyncio.run(main())


@pytest.mark.parametrize("answer_after", [0, WATCH_AFTER / 5, WATCH_AFTER * 4],
                         ids=["at-once", "before-the-watch", "after-the-watch-began"])
def test_connection_client_gone_while_waiting_is_one_line(
        caplog: pytest.LogCaptureFixture, answer_after: float) -> None:
    with caplog.at_level(logging.INFO, logger="imgserver.http"):
        serve(answer_after=answer_after, client_left=True)
    lines = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
    assert lines == ["client 127.0.0.1:4321 went away while waiting for its answer: "
                     "POST /jobs?wait=true"]


def test_connection_quick_answer_logs_nothing_and_leaves_no_task(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imgserver.http"):
        sent, left_running = serve(answer_after=0, client_left=False)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert left_running == 0
    assert not [r for r in caplog.records if "went away" in r.getMessage()]


def test_connection_client_still_there_after_a_long_answer_logs_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imgserver.http"):
        sent, left_running = serve(answer_after=WATCH_AFTER * 3, client_left=False)
    assert len(sent) == 2 and left_running == 0
    assert not [r for r in caplog.records if "went away" in r.getMessage()]
