"""photo-thumb against this machine's limit, measured in the same run.

The limit of a thumbnail made by shrinking a JPEG on load is what its two unavoidable steps
cost: libjpeg's decode at 1/N and the encode of the result. Timed on one core, image by
image, and multiplied by the cores, it says how many images a second no program could beat
here with the same libraries (``measure_limit``). Beside it, in alternating rounds:

  pool    imgserver's image function (``run_image``) through its local pool, one image in
          flight per worker as the runner hands them out: the limit plus the worker's own
          steps (reading the file, the header, the checks, writing and renaming the output)
  http    ``imgserver serve`` with the same workers, one job POSTed with ?wait=true (the
          photo-thumb workload of scripts/bench): the pool plus the server's share
  together the limit's own loop in as many processes at once as the pool has workers: what
          the cores give when they work at the same time (they share caches and memory),
          which the limit's "one core, times the cores" leaves out

Usage: .venv/bin/python bench/limit.py [--images 100] [--rounds 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from inputs import make_inputs  # noqa: E402
from loops import cpu_seconds  # noqa: E402
from servers import Server, body, descendants, done  # noqa: E402

#: photo-thumb: 12-megapixel photos to a quarter, decoded at 1/4 and written at quality 95.
WIDTH, HEIGHT, REDUCE, QUALITY = 4000, 3000, 4, 95
OPERATIONS = ["resize=25"]
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


@dataclass(frozen=True)
class Limit:
    """What the decode at 1/N and the encode cost per image on one core, and the rate they
    allow on ``cores`` cores."""

    decode_ms: float  # per image, wall time on one core (mean over the images)
    encode_ms: float
    cpu_ms: float  # decode and encode, this thread's CPU time (mean)
    cores: int

    @property
    def rate(self) -> float:
        """Images/s: the cores, each doing one image after another at the measured pace."""
        return self.cores * 1000 / (self.decode_ms + self.encode_ms)

    @property
    def cpu_rate(self) -> float:
        """Images/s from CPU time alone (the figure least exposed to other work)."""
        return self.cores * 1000 / self.cpu_ms


def measure_limit(inputs: list[Path], count: int, *, cores: int) -> Limit:
    """Decode ``count`` images (``inputs`` in turn, read beforehand) at 1/REDUCE and
    encode them as JPEG at QUALITY, one after another in this thread, on one OpenCV
    thread; the mean cost of each step, and the rate ``cores`` cores allow."""
    decode, encode, cpu = _loop(_prepared(inputs), count)
    return Limit(1000 * decode / count, 1000 * encode / count, 1000 * cpu / count, cores)


def _prepared(inputs: list[Path]) -> list[np.ndarray]:
    """The files of ``inputs`` in memory, with OpenCV on one thread and warmed by one image
    (its code and its heap)."""
    cv2.setNumThreads(1)
    files = [np.frombuffer(path.read_bytes(), np.uint8) for path in inputs]
    _loop(files, 1)
    return files


def _loop(files: list[np.ndarray], count: int) -> tuple[float, float, float]:
    """The decode and the encode of ``count`` images of ``files`` in turn: seconds of each
    step in all, and of this thread's CPU."""
    flags, parameters = _REDUCED[REDUCE], [cv2.IMWRITE_JPEG_QUALITY, QUALITY]
    decode = encode = cpu = 0.0
    for index in range(count):
        begun, begun_cpu = time.perf_counter(), time.thread_time()
        pixels = cv2.imdecode(files[index % len(files)], flags)
        decoded = time.perf_counter()
        cv2.imencode(".jpg", pixels, parameters)
        decode += decoded - begun
        encode += time.perf_counter() - decoded
        cpu += time.thread_time() - begun_cpu
    return decode, encode, cpu


@dataclass(frozen=True)
class Run:
    """One timed run of a contender: images/s, CPU ms per image of all its processes, and
    the share of the workers' time spent inside the image function (the rest: waiting for
    the next image, and the job's start and end)."""

    rate: float
    cpu_ms: float
    busy: float


def run_together(work: Path, inputs: list[Path], count: int, processes: int) -> Run:
    """The limit's loop (``measure_limit``) in ``processes`` processes started together,
    ``count`` images in all: images/s from the first start to the last end."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    share = [count // processes + (index < count % processes) for index in range(processes)]
    workers = [context.Process(target=_together, args=(inputs, n, barrier, results))
               for n in share]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    began, ended = min(span[0] for span in spans), max(span[1] for span in spans)
    cpu = sum(span[2] for span in spans)
    return Run(count / (ended - began), 1000 * cpu / count, 1.0)


def _together(inputs: list[Path], count: int, barrier: Any, results: Any) -> None:
    """One process of ``run_together``: its files read and warm, it waits for the others,
    then runs the loop; its start and end (``time.monotonic``, one clock for every process)
    and its CPU seconds."""
    files = _prepared(inputs)
    barrier.wait()
    began = time.monotonic()
    cpu = _loop(files, count)[2]
    results.put((began, time.monotonic(), cpu))


def run_pool(work: Path, inputs: list[Path], count: int, processes: int) -> Run:
    """``count`` images through imgserver's LocalPool, one in flight per worker: each
    finished image hands its worker the next from the pool's own thread, as the runner
    does."""
    from imgserver.executors.pool import LocalPool
    from imgserver.images.operation import Context
    from imgserver.images.operations import parse_operations
    from imgserver.images.pipeline import ImageTask, run_image

    out = _fresh(work / "out" / "limit" / "pool")
    operations = parse_operations(OPERATIONS, Context(work))
    tasks = [ImageTask(str(work), str(inputs[index % len(inputs)]),
                       (str(out / f"{index:03d}.jpg"),), operations, 10**9, 1 << 30)
             for index in range(count)]
    pool = LocalPool(processes, max_pixels=10**9)
    try:
        pool.warm()
        for task in tasks[:processes]:  # warm the workers' heaps and code, as in http's
            pool.submit(run_image, task).result()
        pids = descendants(os.getpid())
        cpu = cpu_seconds(pids)
        worked: list[float] = []

        def submit(task: object, then: Callable[..., None]) -> None:
            future = pool.submit(run_image, task)
            future.add_done_callback(lambda done: worked.append(done.result().seconds))
            future.add_done_callback(then)

        began = time.perf_counter()
        _in_turn(submit, tasks, processes)
        seconds = time.perf_counter() - began
        return Run(count / seconds, 1000 * (cpu_seconds(pids) - cpu) / count,
                   sum(worked) / (processes * seconds))
    finally:
        pool.shutdown()


def _in_turn(submit: Callable[[object, Callable[..., None]], None], tasks: list,
             in_flight: int) -> None:
    """Run ``tasks`` with ``in_flight`` at a time, the next handed over as one finishes."""
    remaining = list(reversed(tasks))
    lock, finished = threading.Lock(), threading.Event()
    errors: list[BaseException] = []
    left = [len(tasks)]

    def done(future: object) -> None:
        error = future.exception()  # type: ignore[attr-defined]
        with lock:
            if error is not None:
                errors.append(error)
            left[0] -= 1
            task = remaining.pop() if remaining else None
            if not left[0]:
                finished.set()
        if task is not None:
            submit(task, done)

    with lock:
        first = [remaining.pop() for _ in range(min(in_flight, len(remaining)))]
    for task in first:
        submit(task, done)
    finished.wait()
    if errors:
        raise errors[0]


def run_http(work: Path, inputs: list[Path], count: int, processes: int) -> Run:
    """One job of ``count`` images through ``imgserver serve`` (POST ?wait=true), after a
    one-image warm-up job."""
    out = _fresh(work / "out" / "limit" / "http")
    pairs = [(inputs[index % len(inputs)].relative_to(work).as_posix(),
              (out / f"{index:03d}.jpg").relative_to(work).as_posix())
             for index in range(count)]
    server = Server(work, processes, [])
    try:
        done(*server.post(body(pairs[:processes], OPERATIONS)))
        pids = server.pids()
        cpu, worked = cpu_seconds(pids), _worked(server.connection)
        began = time.perf_counter()
        done(*server.post(body(pairs, OPERATIONS)))
        seconds = time.perf_counter() - began
        return Run(count / seconds, 1000 * (cpu_seconds(pids) - cpu) / count,
                   (_worked(server.connection) - worked) / (processes * seconds))
    finally:
        server.stop()


def _worked(connection: http.client.HTTPConnection) -> float:
    """The workers' seconds in the image function so far, from the server's metrics."""
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return float(text.split("\nimgserver_image_seconds_sum ", 1)[1].split()[0])


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--contenders", nargs="*", default=["together", "pool", "http"])
    parser.add_argument("--work", type=Path, default=REPO / ".bench",
                        help="scratch folder (inputs are cached there)")
    args = parser.parse_args()
    work = args.work.resolve()
    inputs = make_inputs(work / "inputs", f"{WIDTH}x{HEIGHT}", min(args.images, 20),
                         WIDTH, HEIGHT, ".jpg")
    runners = {"pool": run_pool, "http": run_http, "together": run_together}
    rows: dict[str, list[float]] = {"limit": [], "limit-cpu": []}
    print(f"round  limit (1 core x {args.processes})  "
          + "  ".join(f"{name}: images/s, % of limit, CPU ms/image, workers busy" for name in
                      args.contenders), flush=True)
    for number in range(args.rounds):
        limit = measure_limit(inputs, args.images, cores=args.processes)
        rows["limit"].append(limit.rate)
        rows["limit-cpu"].append(limit.cpu_rate)
        line = (f"{number + 1:5d}  {limit.rate:5.1f} (decode {limit.decode_ms:.1f} + encode "
                f"{limit.encode_ms:.1f} ms; CPU {limit.cpu_ms:.1f} ms)")
        for name in args.contenders:
            run = runners[name](work, inputs, args.images, args.processes)
            rows.setdefault(name, []).append(run.rate / limit.rate)
            rows.setdefault(f"{name}-cpu", []).append(limit.cpu_ms / run.cpu_ms)
            line += (f"  {name}: {run.rate:5.1f} {100 * run.rate / limit.rate:5.1f}% "
                     f"{run.cpu_ms:5.1f} busy {100 * run.busy:4.1f}%")
        print(line, flush=True)
    for name in args.contenders:
        shares, cpu = rows[name], rows[f"{name}-cpu"]
        print(f"{name}: {100 * statistics.median(shares):.1f}% of the limit (median; "
              f"{100 * min(shares):.1f}-{100 * max(shares):.1f}%); by CPU time "
              f"{100 * statistics.median(cpu):.1f}% (the limit's CPU per image over its own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
