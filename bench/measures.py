"""What the suites measure besides a contender's speed: how far two sets of outputs are
apart, how long imgserver's image function takes on its own, and the fsync floor."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from loops import loop_ops, opencv_image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Agreement:
    """How far one set of outputs is from another: worst mean absolute difference, worst
    largest difference and worst PSNR over the files."""

    mad: float
    largest: float
    psnr: float
    images: int = 1  # files compared

    def __str__(self) -> str:
        psnr = "identical" if self.psnr > 300 else f"PSNR {self.psnr:.1f} dB"
        return f"MAD {self.mad:.2f}, max {self.largest:.0f}, {psnr}"

    def within(self, mad: float, largest: float | None, psnr: float | None) -> bool:
        """Whether every figure is within its bound (None: that one not bounded)."""
        return (self.mad <= mad and (largest is None or self.largest <= largest)
                and (psnr is None or self.psnr >= psnr))


def agreement(reference: Path, other: Path) -> Agreement:
    """The worst figures between matching output files (a file missing from ``other``, one
    that does not decode, or one of another shape, is infinitely far)."""
    worst_mad, worst_largest, worst_psnr = 0.0, 0.0, float("inf")
    files = sorted(reference.iterdir())
    for ref in files:
        mine = other / ref.name
        a = cv2.imread(str(ref), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(mine), cv2.IMREAD_UNCHANGED)
        if a is None or b is None or a.shape != b.shape:
            return Agreement(float("inf"), float("inf"), 0.0)
        difference = np.abs(a.astype(np.float64) - b)
        worst_mad = max(worst_mad, float(difference.mean()))
        worst_largest = max(worst_largest, float(difference.max()))
        worst_psnr = min(worst_psnr, cv2.PSNR(a, b))
    return Agreement(worst_mad, worst_largest, worst_psnr, len(files))


def exactness(work: Path, sources: list[Path], operations: list[str]) -> Agreement:
    """imgserver's results against the plain OpenCV chain, both lossless (the worst over
    ``sources``)."""
    sys.path.insert(0, str(REPO))
    from imgserver.images.operation import Context
    from imgserver.images.operations import output_suffixes, parse_operations
    from imgserver.images.pipeline import ImageTask, process_image

    folder = work / "out" / "exactness"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "fast").mkdir(parents=True)
    (folder / "plain").mkdir(parents=True)
    parsed = parse_operations(operations, Context(work))
    for number, source in enumerate(sources):
        task = ImageTask(root=str(work), input=str(source),
                         outputs=tuple(str(folder / "fast" / f"{number}{suffix}.png")
                                       for suffix in output_suffixes(parsed)),
                         operations=parsed, max_pixels=10**9, max_file_bytes=1 << 31)
        process_image(task)
        opencv_image({"input": str(source), "output": str(folder / "plain" / f"{number}.png"),
                      "operations": loop_ops(operations)})
    return agreement(folder / "plain", folder / "fast")


def processing_time(work: Path, source: Path, operations: list[str]) -> float:
    """p50 of imgserver's own image function on one image, in this process (no server)."""
    sys.path.insert(0, str(REPO))
    from imgserver.images.operation import Context
    from imgserver.images.operations import parse_operations
    from imgserver.images.pipeline import ImageTask, process_image

    cv2.setNumThreads(1)  # as in a worker
    task = ImageTask(root=str(work), input=str(source),
                     outputs=(str(work / "out" / "processing" / ("x" + source.suffix)),),
                     operations=parse_operations(operations, Context(work)),
                     max_pixels=10**9, max_file_bytes=1 << 30)
    times = []
    for _ in range(60):
        begun = time.perf_counter()
        process_image(task)
        times.append((time.perf_counter() - begun) * 1000)
    return statistics.median(times[10:])


def durability_floor(folder: Path) -> float:
    """p50 of what durability alone costs a new job, in ms: a request-sized file written
    and fsynced, linked under its name, and its folder fsynced, as the outbox does."""
    folder.mkdir(parents=True, exist_ok=True)
    body = b"x" * 200
    times = []
    for n in range(220):
        temp, final = folder / f".floor-{n}.tmp", folder / f".floor-{n}.json"
        begun = time.perf_counter()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, body)
        os.fsync(fd)
        os.close(fd)
        os.link(temp, final)
        os.unlink(temp)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        times.append((time.perf_counter() - begun) * 1000)
        final.unlink()
    return statistics.median(times[20:])


def image_cost(work: Path, source: Path, variants: list[list[str]],
               repeats: int = 40) -> list[float]:
    """CPU ms of imgserver's image function on ``source`` for each list of operations,
    alternated in this process (one OpenCV thread, as in a worker): the medians. CPU time
    of the thread, not wall time: other work on the machine shifts it least."""
    sys.path.insert(0, str(REPO))
    from imgserver.images.operation import Context
    from imgserver.images.operations import parse_operations
    from imgserver.images.pipeline import ImageTask, process_image

    cv2.setNumThreads(1)
    tasks = [ImageTask(root=str(work), input=str(source),
                       outputs=(str(work / "out" / "cost" / f"{n}{source.suffix}"),),
                       operations=parse_operations(operations, Context(work)),
                       max_pixels=10**9, max_file_bytes=1 << 30)
             for n, operations in enumerate(variants)]
    times: list[list[float]] = [[] for _ in tasks]
    for repeat in range(repeats + 3):
        for task, measured in zip(tasks, times, strict=True):
            begun = time.thread_time()
            process_image(task)
            if repeat >= 3:
                measured.append((time.thread_time() - begun) * 1000)
    return [statistics.median(measured) for measured in times]
