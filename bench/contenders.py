"""The contenders of scripts/bench, each run on a workload: imgserver (over HTTP, by the drop
folder, on Dask, or an earlier revision), the hand-written loops and thumbor; what one run
gives (Result)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loops import loop_ops
from measures import Agreement
from servers import (
    Server,
    Thumbor,
    body,
    dask_cluster,
    done,
    drop,
    fresh_root,
    post_wait,
)

HERE = Path(__file__).resolve().parent

#: Kept-alive client connections per thumbor process on the thumbnail workloads: one in
#: flight while the next waits.
THUMBOR_CLIENTS = 4
#: Requests each client makes before the timing starts, on the workloads of many clients
#: (and one-image jobs before the sequential ones): connections open, workers warm.
WARM_REQUESTS = 5


@dataclass
class Workload:
    """One benchmark job: its inputs and operations."""

    name: str
    count: int
    quick: int
    width: int
    height: int
    extension: str
    operations: list[str]
    sequential: bool = False
    clients: int = 0  # >0: one-image requests from as many kept-alive clients at once
    blur_bounds: bool = False  # held to the blur contract: mean <= 1, largest <= 8
    rounds: int = 1  # alternating rounds (each contender's best is kept); 1 with --quick
    contenders: tuple[str, ...] | None = None  # None: every contender asked for
    thumbor: str | None = None  # thumbor's URL for the operations (its contender needs it)
    exact_images: int = 1  # distinct inputs held to the lossless check
    baseline: bool = False  # run against --baseline REV too (contender imgserver-base)
    held: bool = True  # whether disagreeing outputs fail the run (see outputs_agree)
    reference: str = "opencv-loop"  # the contender whose outputs the others are held to

    @property
    def description(self) -> str:
        """What the workload is, in a few words (its count as defined, not as run)."""
        size = (f"{self.width * self.height / 1e6:.0f} MP" if self.width * self.height > 4e6
                else f"{self.width}×{self.height}")
        kind = {".jpg": "JPEG", ".png": "PNG"}[self.extension]
        if self.sequential:
            return f"1 × {size} {kind}, {self.count} sequential requests"
        if self.clients:
            return (f"{size} {kind}, {self.count} one-image requests from {self.clients} "
                    f"kept-alive clients")
        return f"{self.count} × {size} {kind}"


@dataclass
class Result:
    """What one contender did on one workload."""

    seconds: float
    images: int
    latencies_ms: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    agreement: Agreement | None = None  # with the outputs of the workload's reference
    folder: Path | None = None  # where its outputs are
    cpu_seconds: float = 0.0  # CPU time of its processes (server and workers) while timed
    rounds: list[float] = field(default_factory=list)  # images/s of every round, in order
    cpu_rounds: list[float] = field(default_factory=list)  # CPU ms per image, every round

    @property
    def cpu_ms(self) -> float:
        """CPU ms per image: the least of the rounds (the one other work disturbed least)."""
        return min(self.cpu_rounds or [1000 * self.cpu_seconds / self.images])

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds

    def percentile(self, share: float) -> float:
        """The latency below which ``share`` of the requests (or images) fell, in ms."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def output_name(workload: Workload, index: int) -> str:
    """The file of the image numbered ``index``: the same for every contender, so that
    their outputs pair up by name."""
    return f"{index:03d}{workload.extension}"


def run_contender(contender: str, work: Path, workload: Workload, inputs: list[Path],
                  processes: int, count: int, baseline: Path | None) -> Result:
    """One contender's run of one workload."""
    if contender == "opencv-loop":
        return run_loop("opencv", work, workload, inputs, processes, count)
    if contender == "pyvips":
        return run_loop("vips", work, workload, inputs, processes, count)
    if contender == "thumbor":
        thumbor = Thumbor(work, inputs[0].parent, processes)
        try:
            return run_thumbor(thumbor, work, workload, inputs, count)
        finally:
            thumbor.stop()
    if contender == "imgserver-dask":
        with dask_cluster(processes) as (address, dask_workers):
            server = Server(work, processes, ["--executor", "dask", "--scheduler", address],
                            dask_workers)
            try:
                return run_imgserver("dask", server, workload, inputs, count)
            finally:
                server.stop()
    fresh = workload.clients or (workload.baseline and baseline is not None
                                 and contender in ("imgserver-http", "imgserver-base"))
    if fresh:
        # In a fresh root of its own: an earlier version need not read this one's outbox,
        # and thousands of small jobs start each round from an empty one.
        root = fresh_root(work, f"root-{contender}", inputs)
        linked = [root / "in" / path.name for path in inputs]
        server = Server(root, processes, [],
                        code=baseline if contender == "imgserver-base" else None)
        try:
            return run_imgserver("http", server, workload, linked, count, contender)
        finally:
            server.stop()
    server = Server(work, processes, [])
    try:
        return run_imgserver(contender.split("-", 1)[1], server, workload, inputs, count)
    finally:
        server.stop()


# -- the hand-written loops -----------------------------------------------------------------

def run_loop(kind: str, work: Path, workload: Workload, inputs: list[Path], processes: int,
             count: int) -> Result:
    """``count`` images through bench/loops.py's pool of ``processes``."""
    out = work / "out" / kind / workload.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tasks = [{"input": str(inputs[index % len(inputs)]),
              "output": str(out / output_name(workload, index)),
              "operations": loop_ops(workload.operations)} for index in range(count)]
    manifest = work / f"manifest-{kind}.json"
    manifest.write_text(json.dumps({"processes": processes, "tasks": tasks,
                                    "sequential": workload.sequential}))
    env = {**os.environ, "VIPS_CONCURRENCY": "1"}
    finished = subprocess.run([sys.executable, str(HERE / "loops.py"), kind, str(manifest)],
                              capture_output=True, text=True, check=True, env=env)
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    return Result(report["seconds"], count, [s * 1000 for s in report["latencies"]],
                  report["peak_kib"] / 1024, folder=out, cpu_seconds=report["cpu_seconds"])


# -- imgserver ------------------------------------------------------------------------------

def run_imgserver(road: str, server: Server, workload: Workload, inputs: list[Path],
                  count: int, label: str | None = None) -> Result:
    """One job of ``count`` images, or ``count`` one-image jobs (in turn, or from many
    clients at once), through ``server``, whose root holds ``inputs``; outputs under the
    root's out/<label>/<workload>."""
    root = server.root
    out = root / "out" / (label or f"imgserver-{road}") / workload.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def pair(index: int) -> tuple[str, str]:
        return (inputs[index % len(inputs)].relative_to(root).as_posix(),
                (out / output_name(workload, index)).relative_to(root).as_posix())

    if workload.clients:
        def ask(connection: http.client.HTTPConnection, index: int) -> None:
            done(*post_wait(connection, body([pair(index)], workload.operations)))

        driven = drive([server.port], workload.clients, count, ask, server.cpu_seconds)
        missing = [index for index in range(driven.requests)
                   if not (out / output_name(workload, index)).is_file()]
        if missing:
            raise RuntimeError(f"imgserver answered done without {len(missing)} outputs, "
                               f"{pair(missing[0])[1]} the first")
        return Result(driven.seconds, count, driven.latencies_ms, server.peak_mib(),
                      folder=out, cpu_seconds=driven.cpu_seconds)
    pairs = [pair(index) for index in range(count)]
    # Warm the workers first, as the loops warm their pools.
    warm = (out.parent / f"{workload.name}-warm{workload.extension}").relative_to(root)
    for number in range(WARM_REQUESTS if workload.sequential else 1):
        _submit(road, server, f"{workload.name}-warm-{number}-{time.monotonic_ns()}",
                body([(pairs[0][0], warm.as_posix())], workload.operations))
    bodies = ([body([one], workload.operations) for one in pairs] if workload.sequential
              else [body(pairs, workload.operations)])
    latencies: list[float] = []
    cpu = server.cpu_seconds()
    started = time.perf_counter()
    for number, data in enumerate(bodies):
        begun = time.perf_counter()
        _submit(road, server, f"{workload.name}-{number}-{time.monotonic_ns()}", data)
        latencies.append((time.perf_counter() - begun) * 1000)
    seconds = time.perf_counter() - started
    return Result(seconds, count, latencies if workload.sequential else [], server.peak_mib(),
                  folder=out, cpu_seconds=server.cpu_seconds() - cpu)


def _submit(road: str, server: Server, name: str, data: bytes) -> None:
    """One job through the server, to its end: POSTed and waited for, or dropped."""
    if road in ("http", "dask"):
        done(*server.post(data))
    else:
        drop(server.root, name, data)


# -- thumbor --------------------------------------------------------------------------------

def run_thumbor(thumbor: Thumbor, work: Path, workload: Workload, inputs: list[Path],
                count: int) -> Result:
    """``count`` GETs of ``/unsafe/<operations>/<file>``, each answer written to a file,
    from the workload's clients (else THUMBOR_CLIENTS per instance), the clients spread
    over the instances."""
    out = work / "out" / "thumbor" / workload.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def ask(connection: http.client.HTTPConnection, index: int) -> None:
        path = f"/unsafe/{workload.thumbor}/{inputs[index % len(inputs)].name}"
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"thumbor answered {response.status} to {path}: {data[:200]!r}")
        (out / output_name(workload, index)).write_bytes(data)

    clients = workload.clients or THUMBOR_CLIENTS * len(thumbor.ports)
    driven = drive(thumbor.ports, clients, count, ask, thumbor.cpu_seconds,
                   warm=WARM_REQUESTS if workload.clients else 1)
    return Result(driven.seconds, count, driven.latencies_ms, thumbor.peak_mib(), folder=out,
                  cpu_seconds=driven.cpu_seconds)


# -- many clients at once -------------------------------------------------------------------

@dataclass
class Driven:
    """What drive measured: seconds, each timed request's milliseconds, the servers' CPU
    seconds meanwhile, and how many requests were made in all (warm-ups included)."""

    seconds: float
    latencies_ms: list[float]
    cpu_seconds: float
    requests: int


def drive(ports: list[int], clients: int, count: int,
          ask: Callable[[http.client.HTTPConnection, int], None], cpu: Callable[[], float],
          warm: int = WARM_REQUESTS) -> Driven:
    """``ask(connection, index)`` for every index below ``count``, taken in turn by
    ``clients`` threads, each on a kept-alive connection of its own to one of ``ports``
    (spread evenly), each making ``warm`` requests of its own first (indices from ``count``
    on). Timed from the moment every client is warm to the last answer, with the servers'
    CPU seconds (``cpu()``) meanwhile; ``ask`` raises on a wrong answer, which fails the
    run."""
    start = threading.Barrier(clients + 1)
    lock = threading.Lock()
    remaining = list(range(count - 1, -1, -1))
    latencies: list[float] = []
    errors: list[BaseException] = []

    def client(number: int) -> None:
        port = ports[number % len(ports)]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            for index in range(count + number * warm, count + (number + 1) * warm):
                ask(connection, index)
            start.wait()
            while True:
                with lock:
                    if not remaining:
                        return
                    index = remaining.pop()
                begun = time.perf_counter()
                ask(connection, index)
                latencies.append((time.perf_counter() - begun) * 1000)
        except threading.BrokenBarrierError:
            pass
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            start.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    used = cpu()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}") from errors[0]
    return Driven(seconds, latencies, cpu() - used, count + clients * warm)
