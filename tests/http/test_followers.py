"""Followed streams: written by the hub's ticks, handed back to their tasks when needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.sse import KEEPALIVE_COMMENT

from imgserver.http import history, streams
from imgserver.http.followers import Stream
from imgserver.http.streams import EventHub
from imgserver.jobs.events import ImageFinished, JobFinished, StateChanged
from imgserver.jobs.job import ImageStatus


class Connection:
    """A client's connection as the hub sees it: what reached it, in order, and from whom
    (``tick``: written by the hub's ticks; ``task``: sent by the stream's own task)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self.lagging = False  # the client has not taken everything yet

    def write(self, data: bytes) -> None:
        """What a tick writes."""
        self.writes.append(("tick", data))

    def backed_up(self) -> bool:
        """Whether the client lags."""
        return self.lagging

    def names(self, by: str | None = None) -> list[str]:
        """The events received (of ``by`` only, unless None)."""
        text = b"".join(data for who, data in self.writes if by in (None, who)).decode()
        return [line[7:] for line in text.splitlines() if line.startswith("event: ")]


async def serve(hub: EventHub, stream: Stream, connection: Connection) -> None:
    """What a response does: the stream's task sends to the same connection the ticks
    write to."""
    stream.sink = connection
    try:
        async for chunk in hub.chunks(stream):
            connection.writes.append(("task", chunk))
    finally:
        hub.close_stream(stream)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on the event loop until it holds, or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def document(job_id: str, state: str, done: int = 0) -> dict:
    return {"id": job_id, "state": state, "progress": {"done": done, "total": 3}, "images": []}


def image(seq: int, job_id: str = "a") -> ImageFinished:
    return ImageFinished(seq, job_id, seq, ImageStatus(f"in/{seq}.png", "o.png", "done"),
                         seq, 1000)


async def followed(hub: EventHub, job_id: str | None
                   ) -> tuple[Connection, Stream, asyncio.Future]:
    """A stream of ``job_id`` (None: every job) served to a connection of its own, once it
    has sent what it had and follows the ticks: the connection, the stream, its task."""
    connection = Connection()
    stream = hub.open(job_id, None)
    task = asyncio.ensure_future(serve(hub, stream, connection))
    await until(lambda: stream.woken is not None)
    return connection, stream, task


def hub_for(state: dict[str, int]) -> EventHub:
    hub = EventHub(lambda job_id: (document(job_id, "running"), state["seq"]),
                   lambda since, view: ([], state["seq"]))
    hub.attach(asyncio.get_running_loop())
    return hub


def test_followers_write_every_stream_once_a_tick_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "GATHER", 0.2)

    async def scenario() -> None:
        hub = hub_for({"seq": 0})
        connections = [Connection() for _ in range(50)]
        opened = [hub.open(None, None) for _ in connections]
        tasks = [asyncio.ensure_future(serve(hub, stream, connection))
                 for stream, connection in zip(opened, connections, strict=True)]
        await until(lambda: all(stream.woken is not None for stream in opened))
        started = asyncio.get_running_loop().time()
        for seq in range(1, 101):  # an image every 5 ms for half a second
            hub(image(seq))
            await asyncio.sleep(0.005)
        await until(lambda: all(len(c.names()) == 100 for c in connections))
        ticks = (asyncio.get_running_loop().time() - started) / 0.2 + 2
        for connection in connections:
            assert connection.names("tick") == ["image"] * 100  # all by ticks, in order
            assert len(connection.writes) <= ticks  # gathered, not one write per image
            # Read and joined once: every stream was given the very same bytes.
            assert all(mine is theirs for (_, mine), (_, theirs)
                       in zip(connection.writes, connections[0].writes, strict=True))
        hub.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert hub.streams == 0

    asyncio.run(scenario())


def test_followers_a_jobs_end_is_not_held_for_the_next_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "GATHER", 5.0)

    async def scenario() -> None:
        hub = hub_for({"seq": 10})
        connection, stream, task = await followed(hub, "a")  # sent its status, then followed
        hub(StateChanged(11, "a", "running", {"done": 0, "total": 1}))  # at once: quiet
        await until(lambda: connection.names("tick") == ["state"])
        hub(image(12))   # held for the next tick, 5 s away...
        hub(JobFinished(13, "a", document("a", "done", 1)))  # ...until the end comes
        await asyncio.wait_for(task, 1.0)
        assert connection.names() == ["status", "state", "image", "end"]
        assert hub.streams == 0

    asyncio.run(scenario())


def test_followers_hand_a_lagging_stream_back_to_its_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "GATHER", 0.05)

    async def scenario() -> None:
        hub = hub_for({"seq": 0})
        connection, stream, task = await followed(hub, None)
        hub(image(1))
        await until(lambda: connection.names() == ["image"])
        connection.lagging = True  # the next ticks must not write: its task waits instead
        for seq in range(2, 6):
            hub(image(seq))
        await until(lambda: len(connection.names()) == 5)
        assert connection.names("tick") == ["image"] and connection.names("task") == [
            "image"] * 4
        connection.lagging = False  # its task sends the next news, then follows again
        hub(image(6))
        await until(lambda: len(connection.names()) == 6 and stream.woken is not None)
        hub(image(7))
        await until(lambda: connection.names("tick") == ["image"] * 2)
        assert connection.names("task") == ["image"] * 5
        ids = [line for line in b"".join(data for _, data in connection.writes).decode()
               .splitlines() if line.startswith("id:")]
        assert ids == [f"id: {seq}" for seq in range(1, 8)]  # nothing missed or repeated
        hub.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_followers_stream_behind_the_history_leaves_as_a_pulled_one_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "GATHER", 0.05)
    monkeypatch.setattr(history, "HISTORY", 10)

    async def scenario() -> None:
        state = {"seq": 0}
        hub = hub_for(state)
        everything, job = Connection(), Connection()
        streams_ = [hub.open(None, None), hub.open("a", None)]
        tasks = [asyncio.ensure_future(serve(hub, stream, connection))
                 for stream, connection in zip(streams_, (everything, job), strict=True)]
        await until(lambda: all(stream.woken is not None for stream in streams_))
        everything.lagging = job.lagging = True
        for seq in range(1, 31):  # three histories' worth, nobody reading
            state["seq"] = seq
            hub(image(seq))
        await asyncio.sleep(0)
        # The all-jobs stream ends, the job's stream skips to a fresh status.
        await asyncio.wait_for(tasks[0], 5)
        await until(lambda: "status" in job.names()[1:])
        hub.close()
        await asyncio.wait_for(tasks[1], 5)

    asyncio.run(scenario())


def test_followers_idle_followed_stream_gets_a_keepalive_comment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "KEEPALIVE", 0.2)

    async def scenario() -> None:
        hub = hub_for({"seq": 0})
        connection, stream, task = await followed(hub, None)
        begun = asyncio.get_running_loop().time()
        await until(lambda: connection.writes)
        assert connection.writes == [("tick", KEEPALIVE_COMMENT)]
        assert asyncio.get_running_loop().time() - begun >= 0.15
        hub.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
