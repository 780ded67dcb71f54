"""Server-Sent Event streams: the hub's bounds in-process, and real streams end to end."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.sse import KEEPALIVE_COMMENT

from imgserver.http import history, streams
from imgserver.http.streams import EventHub
from imgserver.jobs.events import ImageFinished, JobAccepted, JobFinished, StateChanged
from imgserver.jobs.job import ImageStatus

from conftest import request_body, wait_for
from processes import peak_rss_kib, rss_kib
from serving import SSE, Server, shared_server, start_server, stream_events

# -- the hub, in-process -----------------------------------------------------------------------

def document(job_id: str, state: str, done: int = 0) -> dict:
    return {"id": job_id, "state": state, "progress": {"done": done, "total": 3}, "images": []}


async def collect(stream: object, count: int) -> list[bytes]:
    chunks: list[bytes] = []
    async for chunk in stream:  # type: ignore[attr-defined]
        chunks.append(chunk)
        if sum(c.count(b"\n\nevent:") + c.startswith(b"event:") for c in chunks) >= count:
            break
    return chunks


def names(chunks: list[bytes]) -> list[str]:
    return [line[7:] for line in b"".join(chunks).decode().splitlines()
            if line.startswith("event: ")]


def test_streams_slow_client_is_bounded_then_skipped_ahead_or_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "HISTORY_BYTES", 1 << 20)  # 8 MiB in the server

    async def scenario() -> None:
        state = {"seq": 0}
        hub = EventHub(lambda job_id: (document(job_id, "running", 1), state["seq"]),
                       lambda since, view: ([], state["seq"]))
        hub.attach(asyncio.get_running_loop())
        job_stream = hub.job_stream("a", None).__aiter__()
        all_stream = hub.all_streams(None).__aiter__()
        assert names([await job_stream.__anext__()]) == ["status"]
        first = asyncio.ensure_future(all_stream.__anext__())  # waits for an event
        await asyncio.sleep(0)
        big = "x" * 10_000
        for seq in range(1, 400):  # about 4 MB of events that nobody reads
            state["seq"] = seq
            hub(ImageFinished(seq, "a", seq % 3, ImageStatus(big, "o.png", "done"), 1, 3))
        await asyncio.sleep(0.1)
        # The job's stream starts again from a fresh status; the all-jobs stream ends.
        assert names([await job_stream.__anext__()]) == ["status"]
        try:
            chunks = [await first]
        except StopAsyncIteration:  # closed before it sent anything
            chunks = []
        chunks += [chunk async for chunk in all_stream]
        assert sum(len(c) for c in chunks) <= history.HISTORY_BYTES
        state["seq"] = 400
        hub(JobFinished(400, "a", document("a", "done", 3)))
        rest = await collect(job_stream, 1)
        assert names(rest) == ["end"]
        with pytest.raises(StopAsyncIteration):
            await job_stream.__anext__()
        assert hub.streams == 0

    asyncio.run(scenario())


def test_streams_opened_before_any_event_get_the_first_ones() -> None:
    async def scenario() -> None:
        hub = EventHub(lambda job_id: (document(job_id, "queued"), 0), lambda since, view: ([], 0))
        hub.attach(asyncio.get_running_loop())
        everything = hub.all_streams(None).__aiter__()  # the history is empty
        first = asyncio.ensure_future(collect(everything, 3))
        await asyncio.sleep(0.05)
        hub(JobAccepted(1_700_000_000_000_000, "f", {"id": "f"}))  # seqs follow the clock
        hub(StateChanged(1_700_000_000_000_001, "f", "running", {"done": 0, "total": 1}))
        hub(ImageFinished(1_700_000_000_000_002, "f", 0, ImageStatus("i", "o.png", "done"),
                          1, 1))
        assert names(await asyncio.wait_for(first, 5)) == ["job", "state", "image"]

    asyncio.run(scenario())


def test_streams_resume_after_last_event_id_or_fresh_status() -> None:
    async def scenario() -> None:
        asked: list[int | None] = []
        hub = EventHub(lambda job_id: (document(job_id, "running", 2), 1003),
                       lambda since, view: (asked.append(since) or [document("b", "running"),
                                                              document("z", "done", 3)], 1003))
        hub.attach(asyncio.get_running_loop())
        hub(JobAccepted(1000, "b", {"id": "b"}))
        hub(StateChanged(1001, "b", "running", {"done": 0, "total": 3}))
        hub(ImageFinished(1002, "b", 0, ImageStatus("i", "o.png", "done"), 1, 3))
        hub(ImageFinished(1003, "b", 1, ImageStatus("i", "o.png", "done"), 2, 3))
        await asyncio.sleep(0.05)
        resumed = hub.job_stream("b", "1001").__aiter__()
        assert names(await collect(resumed, 2)) == ["image", "image"]
        everything = hub.all_streams("999").__aiter__()
        assert names(await collect(everything, 4)) == ["job", "state", "image", "image"]
        too_old = hub.job_stream("b", "5").__aiter__()  # from before the history
        assert names([await too_old.__anext__()]) == ["status"]
        lost = hub.all_streams("5").__aiter__()
        chunk = await lost.__anext__()
        assert names([chunk]) == ["status", "status"] and b'"job":"b"' in chunk
        assert [line for line in chunk.decode().splitlines() if line.startswith("id:")] == [
            "id: 1002", "id: 1003"]  # growing, the last one the snapshot's
        assert asked == [5]  # and the jobs finished since that event, the engine adds

    asyncio.run(scenario())


def test_streams_events_nobody_listens_to_are_kept_unencoded_then_resumed_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "HISTORY", 10)
    monkeypatch.setattr(history, "HISTORY", 10)
    encoded: list[int] = []

    def counting(event: object) -> history.Frame:
        encoded.append(event.seq)  # type: ignore[attr-defined]
        return history.encode(event)  # type: ignore[arg-type]

    monkeypatch.setattr(streams, "encode", counting)

    async def scenario() -> None:
        hub = EventHub(lambda job_id: (document(job_id, "running", 2), 1044),
                       lambda since, view: ([document("b", "running")], 1044))
        hub.attach(asyncio.get_running_loop())
        hub(JobAccepted(1000, "b", {"id": "b"}))
        for seq in range(1001, 1045):  # 45 events, twice HISTORY and more: a tick trims
            hub(ImageFinished(seq, "b", 0, ImageStatus("i", "o.png", "done"), 1, 3))
        await asyncio.sleep(0.05)
        assert encoded == []  # nobody listened: nothing was encoded
        resumed = hub.all_streams("1040").__aiter__()  # among the newest HISTORY
        chunks = await collect(resumed, 4)
        assert [line for line in b"".join(chunks).decode().splitlines()
                if line.startswith("id:")] == ["id: 1041", "id: 1042", "id: 1043", "id: 1044"]
        assert len(encoded) <= 20  # what was kept, once, when a stream wanted it
        lost = hub.all_streams("1010").__aiter__()  # let go of, unencoded
        assert names([await lost.__anext__()]) == ["status"]

    asyncio.run(scenario())


def test_streams_finished_job_reconnecting_after_its_end_gets_status_and_end() -> None:
    async def scenario() -> None:
        final = document("c", "done", 3)
        hub = EventHub(lambda job_id: (final, 1002), lambda since, view: ([], 1002))
        hub.attach(asyncio.get_running_loop())
        hub(JobAccepted(1000, "c", {"id": "c"}))
        hub(StateChanged(1001, "c", "done", {"done": 3, "total": 3}))
        hub(JobFinished(1002, "c", final))
        # What EventSource does by itself once the server has closed the stream.
        again = await asyncio.wait_for(collect(hub.job_stream("c", "1002"), 99), 5)
        assert names(again) == ["status", "end"]
        ids = [line for line in b"".join(again).decode().splitlines() if line.startswith("id:")]
        assert ids == ["id: 1002", "id: 1003"]  # each event its own id, growing

    asyncio.run(scenario())


def test_streams_idle_stream_gets_a_keepalive_comment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "KEEPALIVE", 0.2)  # 15 s in the server

    async def scenario() -> None:
        hub = EventHub(lambda job_id: (document(job_id, "running"), 1), lambda since, view: ([], 1))
        hub.attach(asyncio.get_running_loop())
        idle = hub.all_streams(None).__aiter__()
        begun = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(idle.__anext__(), 5) == KEEPALIVE_COMMENT
        assert asyncio.get_running_loop().time() - begun >= 0.15

    asyncio.run(scenario())


# -- real streams --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with one worker for this module's tests (each uses its own names)."""
    images = [("a.png", 64, 48), ("b.png", 800, 600), ("huge.png", 3000, 2250)]
    yield from shared_server(tmp_path_factory.mktemp("streams"), images, "--workers", "1")


def busy(server: Server) -> str:
    """Occupy the only worker, and the one image the pool takes ahead of it, for a second or
    so: a job posted next stays queued meanwhile; the busy job's id."""
    return server.request("POST", "/jobs", request_body(
        [("huge.png", f"busy/{time.monotonic_ns()}-{n}.png") for n in range(2)],
        ["blur=31"])).json()["id"]


def test_streams_job_events_in_order_with_a_failed_image(server: Server) -> None:
    busy(server)
    pairs = [("a.png", "o/0.png"), ("a.png", "o/1.png"), ("missing.png", "o/2.png"),
             ("a.png", "o/3.png"), ("a.png", "o/4.png")]
    job_id = server.request("POST", "/jobs", request_body(pairs)).json()["id"]
    events = stream_events(server, f"/jobs/{job_id}/events")
    assert [e.event for e in events] == ["status", "state"] + ["image"] * 5 + ["state", "end"]
    assert events[0].data["state"] == "queued" and events[0].data["id"] == job_id
    assert events[1].data == {"state": "running", "progress": {"done": 0, "total": 5}}
    images = events[2:7]
    assert [e.data["index"] for e in images] == [0, 1, 2, 3, 4]
    assert [e.data["progress"]["done"] for e in images] == [1, 2, 3, 4, 5]
    assert images[2].data["image"]["state"] == "failed" and "no such file" in \
        images[2].data["image"]["error"]
    assert events[7].data == {"state": "failed", "progress": {"done": 5, "total": 5}}
    assert events[8].data == server.request("GET", f"/jobs/{job_id}").json()
    ids = [int(e.id) for e in events[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # A finished job's stream: status and end at once, then the stream ends.
    again = stream_events(server, f"/jobs/{job_id}/events", timeout=10)
    assert [e.event for e in again] == ["status", "end"]
    assert server.request("GET", "/jobs/nope/events").status == 404


def test_streams_reconnect_with_last_event_id_misses_and_repeats_nothing(server: Server) -> None:
    busy(server)
    job_id = server.request("POST", "/jobs", request_body(
        [("b.png", f"r/{n}.png") for n in range(6)], ["blur=31"])).json()["id"]
    whole: list[SSE] = []
    reader = threading.Thread(target=lambda: whole.extend(
        stream_events(server, f"/jobs/{job_id}/events")))
    reader.start()
    first = stream_events(server, f"/jobs/{job_id}/events", count=4)  # status, state, 2 images
    assert [e.event for e in first] == ["status", "state", "image", "image"]
    rest = stream_events(server, f"/jobs/{job_id}/events", last_id=first[-1].id)
    reader.join(60)
    assert [e.event for e in rest][-1] == "end"
    assert [(e.event, e.id) for e in first[1:] + rest] == [(e.event, e.id) for e in whole[1:]]


def test_streams_all_jobs_sees_drop_folder_and_http_jobs(server: Server) -> None:
    seen: list[SSE] = []
    reader = threading.Thread(target=lambda: stream_events(
        server, "/events", count=10, timeout=30, into=seen), daemon=True)
    reader.start()
    time.sleep(0.5)  # the stream is open
    http_id = server.request("POST", "/jobs", request_body([("a.png", "h.png")])).json()["id"]
    (server.root / "inbox" / "dropped.json").write_bytes(request_body([("a.png", "d.png")]))
    reader.join(30)
    accepted = {e.data["job"]: e.data["source"] for e in seen if e.event == "job"}
    assert accepted == {http_id: "http", "dropped": "inbox"}
    ends = {e.data["job"]: e.data["state"] for e in seen if e.event == "end"}
    assert ends == {http_id: "done", "dropped": "done"}
    assert all("job" in e.data for e in seen)
    ids = [int(e.id) for e in seen]
    assert ids == sorted(ids)


def test_streams_client_that_never_reads_does_not_slow_a_job(server: Server) -> None:
    name = "n" * 150  # long paths make big events

    def run_job(tag: str) -> float:
        started = time.monotonic()
        reply = server.request("POST", "/jobs?wait=true", request_body(
            [("a.png", f"{tag}/{name}{n}.png") for n in range(200)]), timeout=120)
        assert reply.json()["state"] == "done"
        return time.monotonic() - started

    run_job("warm")
    alone = run_job("alone")
    rss_before = rss_kib(server.process.pid)
    stalled = []
    for path in ["/events"] * 5 + ["/events?x=1"]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stalled.append(sock)  # and never read from
    try:
        watched = [run_job(f"watched{n}") for n in range(4)]  # several MB of events
        assert min(watched) < alone * 3 + 2.0  # not held up by clients that do not read
        assert server.request("GET", "/healthz", timeout=5).status == 200
        grown = rss_kib(server.process.pid) - rss_before
        assert grown < 64 * 1024, f"the server grew by {grown} KiB"
    finally:
        for sock in stalled:
            sock.close()


def test_streams_end_when_the_server_stops(root: Path, make_image: Callable[..., Path]) -> None:
    server = start_server(root, "--workers", "1")
    make_image("a.png", 64, 48)
    ended = threading.Event()

    def listen() -> None:
        stream_events(server, "/events", timeout=30)
        ended.set()

    threading.Thread(target=listen, daemon=True).start()
    wait_for(lambda: server.request("GET", "/healthz").status == 200)
    time.sleep(0.3)
    started = time.monotonic()
    assert server.stop() == 0
    assert ended.wait(5) and time.monotonic() - started < 8.0
    assert "Traceback" not in server.output()


def test_streams_beyond_the_cap_are_503_with_retry_after_and_counted(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    server = start_server(root, "--workers", "1", "--max-streams", "3")
    held = [stalled_client(server, "/events") for _ in range(3)]
    try:
        wait_for(lambda: metric(server, "imgserver_event_streams") == 3)
        refused = server.request("GET", "/events", timeout=5)
        assert refused.status == 503 and refused.headers["retry-after"] == "5"
        assert "--max-streams" in refused.json()["detail"]
        assert metric(server, "imgserver_event_streams_refused_total") == 1
        held.pop().close()
        wait_for(lambda: metric(server, "imgserver_event_streams") == 2)
        assert server.request("GET", "/jobs/nope/events").status == 404  # not a stream
        assert metric(server, "imgserver_event_streams") == 2
        job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "b.png")]))
        events = stream_events(server, f"/jobs/{job.json()['id']}/events", timeout=10)
        assert [e.event for e in events] == ["status", "end"]  # there is room again
    finally:
        for sock in held:
            sock.close()
        server.stop()


def stalled_client(server: Server, path: str) -> socket.socket:
    """A client that asks for ``path`` and never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def metric(server: Server, name: str) -> float:
    """The value of the unlabelled metric ``name`` on /metrics."""
    for line in server.request("GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def tcp_memory_kib() -> int:
    """The memory the kernel holds for TCP sockets, all of them (KiB)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4  # pages of 4 KiB
    return 0


@pytest.mark.parametrize("clients, images, budget_mib", [
    pytest.param(300, 1000, 60, id="300-clients"),
    pytest.param(2000, 5000, 300, id="2000-clients", marks=pytest.mark.soak),
])
def test_streams_stalled_clients_cost_bounded_memory_given_back_when_they_go(
        root: Path, make_image: Callable[..., Path], clients: int, images: int,
        budget_mib: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < clients + 500:
        pytest.skip(f"the open-file hard limit is {hard}; this test needs {clients + 500}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, clients + 500), hard))
    make_image("a.png", 8, 8)
    server = start_server(root, "--max-streams", str(clients), "--max-queue", str(images),
                          "--max-images", str(images))
    name = "n" * 120  # long paths make big events

    def run_job(tag: str) -> None:
        body = request_body([("a.png", f"{tag}/{name}{n}.png") for n in range(images)])
        job = server.request("POST", "/jobs?wait=true", body, timeout=600)
        assert job.json()["state"] == "done"

    try:
        run_job("alone")  # what the job costs by itself is in the baseline
        idle = rss_kib(server.process.pid) + tcp_memory_kib()
        stalled = [stalled_client(server, "/events" if n % 2 else f"/events?n={n}")
                   for n in range(clients)]
        wait_for(lambda: metric(server, "imgserver_event_streams") == clients, timeout=60)
        run_job("watched")
        busy = rss_kib(server.process.pid) + tcp_memory_kib()
        peak = peak_rss_kib(server.process.pid)
        print(f"\n{clients} stalled streams, {images} images: server RSS + TCP memory "
              f"{idle / 1024:.0f} MiB idle, {busy / 1024:.0f} MiB with them "
              f"(+{(busy - idle) / 1024:.0f} MiB), peak RSS {peak / 1024:.0f} MiB")
        assert busy - idle < budget_mib * 1024, f"grew by {(busy - idle) / 1024:.0f} MiB"
        for sock in stalled:
            sock.close()
        wait_for(lambda: metric(server, "imgserver_event_streams") == 0, timeout=30)
        # Given back: the kernel's buffers all, the server's heap at least half (Python's
        # allocator keeps some arenas of the connections' objects, reused by the next ones).
        given_back = wait_for(lambda: (lambda now: now if now - idle < max(
            16 * 1024, (busy - idle) // 2) else None)(
            rss_kib(server.process.pid) + tcp_memory_kib()), timeout=30, interval=1)
        print(f"after they left: {given_back / 1024:.0f} MiB "
              f"(+{(given_back - idle) / 1024:.0f} MiB)")
    finally:
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.soak
def test_streams_client_that_takes_nothing_is_disconnected_after_30_s(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    server = start_server(root)
    stalled = stalled_client(server, "/events")
    try:
        wait_for(lambda: metric(server, "imgserver_event_streams") == 1)
        body = request_body([("a.png", f"o/{'n' * 120}{n}.png") for n in range(500)])
        assert server.request("POST", "/jobs?wait=true", body, timeout=120).status == 200
        filled = time.monotonic()  # its buffers are full: its writes wait from about now
        wait_for(lambda: metric(server, "imgserver_event_streams") == 0, timeout=60)
        waited = time.monotonic() - filled
        assert 20 < waited < 45, waited  # eventstream.STALLED is 30 s
        assert "took nothing of its event stream for 30 s: disconnected" in server.output()
    finally:
        stalled.close()
        server.stop()
