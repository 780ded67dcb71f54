"""Batches: several images in one Dask task, each image reported on its own as it ends.

    DaskPool.submit(run_image, task) --> waiting (expected: input bytes x seconds per byte)
        |  a worker thread has room: plan() says how many go together
        v
    one Dask task, pinned to that worker:  run_batch(topic, number, calls)
        |  image after image, on the worker: events on the pool's topic
        v      ["start", n, size]   ["ended", n, [[i, ok, result or error], ...]]
    each image's own HeldFuture: started (its time limit starts), then done or failed

Every Dask task costs the scheduler, the worker and the client several milliseconds of CPU
and a round trip: about what resizing a 1080p JPEG costs. A batch pays that once for several
images. Its images still end one by one: the worker reports them as they
end (a few at a time, within ``REPORT_INTERVAL``), through the scheduler's event topics, so
progress, results and time limits stay per image, and a worker that dies costs only the
images it had not finished (or not reported).
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgserver.executors.started import HeldFuture

logger = logging.getLogger("imgserver.executors.batch")

#: A batch takes images while their expected times add up to at most this many seconds; an
#: image expected to take as long goes alone. A Dask task costs 5-10 ms of CPU across the
#: scheduler, the worker and the client (measured on two busy cores): a few percent of this.
BATCH_SECONDS = 0.5
#: And at most this many images, however fast.
BATCH_IMAGES = 64
#: A worker reports the images of a batch that ended at most this long after they end, a
#: few in one message: each message costs the worker, the scheduler and the client about a
#: millisecond of CPU each, as much as a small image. So the pool learns this late that an
#: image started (its time limit runs this much longer), and a worker that dies may take
#: this long a stretch of finished images with it (they are run again).
REPORT_INTERVAL = 0.2


@dataclass(frozen=True)
class Call:
    """One call to run in a batch: a top-level function and its plain-data arguments."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def run_batch(topic: str, number: int, calls: list[Call], interval: float = REPORT_INTERVAL
              ) -> int:
    """Run ``calls`` one after the other on this Dask worker, reporting each as it ends."""
    from distributed import get_worker

    report = Report(get_worker(), topic, number, interval)
    report.send(["start", number, len(calls)])
    last = len(calls) - 1
    for index, call in enumerate(calls):
        try:
            outcome = [index, True, pickle.dumps(call.fn(*call.args, **call.kwargs))]
        except Exception as exc:  # the image's own failure: its error travels as a result
            outcome = [index, False, pickled_error(exc)]
        # At once when the last image starts (the pool then sends this thread's next batch)
        # and when the batch ends.
        report.add(outcome, now=index + 1 >= last)
    return len(calls)


class Report:
    """What a batch tells the pool, in order: a message at once, or outcomes gathered for at
    most ``interval`` seconds, all sent from the worker's event loop."""

    def __init__(self, worker: Any, topic: str, number: int, interval: float) -> None:
        self._worker = worker
        self._topic = topic
        self._number = number
        self._interval = interval
        self._lock = threading.Lock()
        self._outcomes: list[list] = []
        self._timer = False

    def send(self, message: list) -> None:
        """Send ``message`` now (after what was sent before)."""
        self._worker.loop.add_callback(self._worker.log_event, self._topic, message)

    def add(self, outcome: list, *, now: bool = False) -> None:
        """Send ``outcome`` now, or with the next outcomes within the interval."""
        with self._lock:
            self._outcomes.append(outcome)
            later = not now and not self._timer
            self._timer = self._timer or later
        if now:
            self._worker.loop.add_callback(self._flush)
        elif later:
            self._worker.loop.add_callback(self._worker.loop.call_later, self._interval,
                                           self._flush)

    def _flush(self) -> None:  # on the worker's event loop: messages leave in order
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
            self._timer = False
        if outcomes:
            self._worker.log_event(self._topic, ["ended", self._number, outcomes])


def pickled_error(exc: BaseException) -> bytes:
    """``exc`` pickled, or an error saying what it was when it cannot be."""
    try:
        return pickle.dumps(exc)
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


def plan(expected: Sequence[float], share: int, *, budget: float = BATCH_SECONDS,
         most: int = BATCH_IMAGES) -> int:
    """How many of the waiting images (their expected seconds, in order) go into the next
    batch.

    Images go together while their expected times fit ``budget``; the first goes in any
    case, so an image expected to take as long goes alone. No batch takes more than
    ``share`` (a worker thread's share of the images not started: ``Batcher.pump``), so
    that the last images of a job spread over the workers instead of queueing behind one.
    """
    limit = min(most, len(expected), max(1, share))
    taken, total = 1, expected[0]
    while taken < limit and total + expected[taken] <= budget:
        total += expected[taken]
        taken += 1
    return taken


class Estimate:
    """What an image is expected to take: its input's bytes times the seconds per byte
    recent images took (moving means, so that it follows a change of work)."""

    WEIGHT = 1 / 8
    #: Seconds per byte assumed until an image has been timed: half a second per MiB. Far
    #: more than images take (a 1080p JPEG, half a MiB, takes 10-40 ms), so that a big image
    #: goes alone from the start, and small ones go two or three together.
    PRIOR = 0.5 / 2**20

    def __init__(self) -> None:
        self.per_byte: float | None = None
        self.typical_bytes: float | None = None

    def seconds(self, size: int) -> float:
        """Expected seconds for an input of ``size`` bytes."""
        return size * (self.PRIOR if self.per_byte is None else self.per_byte)

    def handed(self, size: int) -> None:
        """An image of ``size`` bytes was handed over."""
        self.typical_bytes = _moved(self.typical_bytes, float(size), self.WEIGHT)

    def timed(self, size: int, seconds: float) -> None:
        """An image of ``size`` bytes took ``seconds`` on its worker."""
        if size > 0 and seconds >= 0:
            self.per_byte = _moved(self.per_byte, seconds / size, self.WEIGHT)

    def batch_size(self, *, budget: float = BATCH_SECONDS, most: int = BATCH_IMAGES) -> int:
        """Images of the typical size a batch would take."""
        if self.typical_bytes is None:
            return 1
        seconds = self.seconds(int(self.typical_bytes))
        return max(1, min(most, int(budget // seconds) if seconds > 0 else most))


def _moved(mean: float | None, value: float, weight: float) -> float:
    return value if mean is None else mean + (value - mean) * weight


@dataclass(eq=False)
class Item:
    """One call handed to the pool to run in a batch."""

    future: HeldFuture
    call: Call
    cost: int
    batch: Batch | None = None
    ended: bool = False   # its outcome arrived


@dataclass(eq=False)
class Batch:
    """Images sent together to one worker, and how far the worker has got."""

    number: int
    worker: str
    items: list[Item]
    started: bool = False
    task: Any = None      # Dask's future of the task
    holds: bool = True    # holds a thread of its worker (until its last image starts)

    @property
    def running(self) -> Item | None:
        """The image the worker is on now, as far as the pool has heard."""
        return next((item for item in self.items if not item.ended), None) \
            if self.started else None

    @property
    def unended(self) -> list[Item]:
        """The images whose outcome has not arrived."""
        return [item for item in self.items if not item.ended]
