"""What Dask itself costs imgserver, measured on a scheduler process of its own.

Plain empty tasks (what one image per task cost), the scheduler's CPU per task and per
message from a worker (what a batch costs: a task and a few report messages), and
near-empty images through imgserver's own DaskPool, in batches. docs/scaling.md models the
scheduler's limit from these.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DaskCost:
    """Dask's own cost, per task, per message and per image."""

    tasks_per_s: float            # empty tasks through the cluster, as fast as it takes them
    one_ms: float                 # one empty task submitted and awaited at a time
    scheduler_task_ms: float      # the scheduler's CPU per empty task
    scheduler_message_ms: float   # the scheduler's CPU per message a worker reports
    images_per_s: float           # near-empty images through DaskPool, in batches
    images_per_task: float        # how many went in one batch
    messages_per_task: float      # messages each batch sent (its start and its reports)
    scheduler_image_ms: float     # the scheduler's CPU per such image


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report_spaced(topic: str, count: int, gap: float) -> int:
    """On a worker: ``count`` messages on ``topic``, ``gap`` seconds apart (each its own)."""
    from distributed import get_worker

    worker = get_worker()
    for number in range(count):
        time.sleep(gap)
        worker.log_event(topic, ["ended", 0, [[number, True, b"x" * 100]]])
    return count


def sleep_spaced(count: int, gap: float) -> int:
    """On a worker: as long as ``report_spaced`` takes, reporting nothing."""
    for _ in range(count):
        time.sleep(gap)
    return count


@contextlib.contextmanager
def scheduler_of_its_own(processes: int) -> Iterator[tuple[str, int]]:
    """A Dask scheduler process and ``processes`` single-threaded workers: its address and
    pid."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    # The workers run this module's functions: they import it from here.
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
             "env": {**os.environ, "PYTHONPATH": path}}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                                  "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], **quiet)
    workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                "--nthreads", "1", "--nworkers", str(processes),
                                "--no-dashboard"], **quiet)
    try:
        yield address, scheduler.pid
    finally:
        for process in (workers, scheduler):
            process.terminate()
        for process in (workers, scheduler):
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def measure(work: Path, processes: int, quick: bool = False) -> DaskCost:
    """Dask's costs on this machine, with ``processes`` workers."""
    import distributed

    sys.path.insert(0, str(HERE.parent))
    from imgserver.executors.cluster import DaskPool
    from imgserver.images.pipeline import ImageTask, run_image

    tasks, messages, images = (300, 60, 600) if quick else (2000, 300, 4000)
    with scheduler_of_its_own(processes) as (address, pid), \
            distributed.Client(address, set_as_default=False) as client:
        client.wait_for_workers(processes, timeout=120)
        executor = client.get_executor(pure=False)
        list(executor.map(abs, range(200)))  # warm
        begun, used = time.perf_counter(), cpu_seconds(pid)
        list(executor.map(abs, range(tasks)))
        tasks_per_s = tasks / (time.perf_counter() - begun)
        task_ms = (cpu_seconds(pid) - used) / tasks * 1000
        begun = time.perf_counter()
        for number in range(100):
            executor.submit(abs, number).result()
        one_ms = (time.perf_counter() - begun) * 10

        client.subscribe_topic("imgserver-cost", lambda event: None)
        used = cpu_seconds(pid)
        client.submit(sleep_spaced, messages, 0.01, pure=False).result()
        idle = cpu_seconds(pid) - used
        used = cpu_seconds(pid)
        client.submit(report_spaced, "imgserver-cost", messages, 0.01, pure=False).result()
        message_ms = max(0.0, cpu_seconds(pid) - used - idle) / messages * 1000

        source = work / "inputs" / "dask-cost.png"
        source.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(source), np.full((8, 8, 3), 128, np.uint8))
        out = work / "out" / "dask-cost"
        out.mkdir(parents=True, exist_ok=True)

        def task(number: int) -> ImageTask:
            return ImageTask(root=str(work), input=str(source),
                             outputs=(str(out / f"{number:05d}.png"),), operations=(),
                             max_pixels=10**8, max_file_bytes=1 << 20)

        pool = DaskPool(address, work, max_pixels=10**8)
        try:
            for future in [pool.submit(run_image, task(n)) for n in range(100)]:
                future.result(60)  # warm: the pool learns how long such images take
            before = _messages(client, pool.topic)
            begun, used = time.perf_counter(), cpu_seconds(pid)
            for future in [pool.submit(run_image, task(n)) for n in range(images)]:
                future.result(120)
            images_per_s = images / (time.perf_counter() - begun)
            image_ms = (cpu_seconds(pid) - used) / images * 1000
            after = _messages(client, pool.topic)
        finally:
            pool.shutdown()
    batches = max(1, after[0] - before[0])
    return DaskCost(tasks_per_s, one_ms, task_ms, message_ms, images_per_s, images / batches,
                    (after[1] - before[1]) / batches, image_ms)


def _messages(client: object, topic: str) -> tuple[int, int]:
    """Batches started, and messages sent, on ``topic`` so far."""
    events = client.get_events(topic)  # type: ignore[attr-defined]
    return sum(1 for _, message in events if message[0] == "start"), len(events)
