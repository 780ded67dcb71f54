"""The batcher: the images handed to a ``DaskPool`` and not ended yet, waiting to go out in
a batch or in one on a worker thread.

    add(item) --> waiting --pump: a worker thread has room, plan() says how many-->
        a Batch, pinned to that worker (one Dask task: run_batch)
            --reported("start" / "ended")--> its images end one by one; the thread is free
                                             again once its last image has started
            --given_up(worker)-------------> its worker left: the image it ran ends with
                                             the pool's error, the others with LostWork

While every worker thread has its batch, the images handed over wait here, and the next
batch takes several small images or one big one. A batch is pinned to its worker, so that
Dask never runs it twice. When that worker dies (the scheduler's ``remove-worker`` event
says so), the image it was running ends with ``BrokenExecutor``, as on a dead local worker
(the runner retries it alone), and the images not started with ``LostWork`` (they are run
again); finished images stay finished.

The batcher has no lock and no thread of its own: the pool calls it holding its lock, and
ends the futures it is given back (``end``) after letting go of that lock, since the
futures' callbacks take the engine's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from imgserver.errors import LostWork
from imgserver.executors.batch import Batch, Estimate, Item, plan, run_batch

logger = logging.getLogger("imgserver.executors.cluster")

#: What becomes of a future: set_result(value) or set_exception(error).
Ending = tuple[Future, Any, BaseException | None]


class Batcher:
    """Forms batches of the images handed over and keeps track of them until they end."""

    def __init__(self, topic: str, on_task_end: Callable[[int, Any], None], *, budget: float,
                 most: int, interval: float) -> None:
        """Batches reporting on ``topic``, of at most ``budget`` expected seconds and ``most``
        images, whose workers report every ``interval`` seconds; ``on_task_end(number,
        task)`` is told (on Dask's thread) when a batch's Dask task ends."""
        self.topic = topic
        self._on_task_end = on_task_end
        self.workers: dict[str, int] = {}       # workers that get batches -> their threads
        self.estimate = Estimate()              # what an image is expected to take
        self._budget = budget
        self._most = most
        self._interval = interval
        self._waiting: deque[Item] = deque()    # images handed over, not yet in a batch
        self._items: dict[Future, Item] = {}    # images handed over and not ended
        self._batches: dict[int, Batch] = {}
        self._numbers = itertools.count()
        self._load: Counter[str] = Counter()    # threads taken by batches, by worker

    @property
    def threads(self) -> int:
        """The worker threads that take batches."""
        return sum(self.workers.values())

    def batch_size(self) -> int:
        """How many images a batch takes, as the images go now."""
        return self.estimate.batch_size(budget=self._budget, most=self._most)

    def add(self, item: Item) -> None:
        """An image handed over: it waits for the next ``pump``."""
        self.estimate.handed(item.cost)
        self._items[item.future] = item
        self._waiting.append(item)

    def item(self, future: Future) -> Item | None:
        """The image of ``future``, while it has not ended."""
        return self._items.get(future)

    def batch_workers(self) -> set[str]:
        """The workers that have batches now."""
        return {batch.worker for batch in self._batches.values()}

    def pump(self, client: Any) -> None:
        """Send batches of waiting images through ``client`` to the workers with room."""
        # A batch takes at most a thread's share of the images not started when the pump
        # began (waiting here, or in the other threads' batches), and of what still waits
        # among the threads still free in it. Threads given batches together (a job's
        # images arriving at once) get even ones; a thread freed while the others are busy
        # takes enough to end with them, not half of what waits (then half again, each
        # batch a round trip through the scheduler); and the last images spread over the
        # free threads rather than queueing two deep behind one.
        share = _share(len(self._waiting) + self._unstarted(), self.threads)
        free = sum(max(0, threads - self._load[worker])
                   for worker, threads in self.workers.items())
        while self._waiting:
            worker = self._roomiest()
            if worker is None:
                return
            count = plan([self.estimate.seconds(item.cost) for item in self._waiting],
                         min(share, _share(len(self._waiting), free)),
                         budget=self._budget, most=self._most)
            free -= 1
            items = [self._waiting.popleft() for _ in range(count)]
            batch = Batch(next(self._numbers), worker, items)
            try:
                batch.task = client.submit(
                    run_batch, self.topic, batch.number, [item.call for item in items],
                    self._interval, workers=[worker], allow_other_workers=False, pure=False)
            except Exception as exc:  # the connection broke: the pool's watcher sees to it
                logger.error("cannot send a batch to the Dask cluster: %s", exc)
                self._waiting.extendleft(reversed(items))
                return
            for item in items:
                item.batch = batch
            self._batches[batch.number] = batch
            self._load[worker] += 1
            batch.task.add_done_callback(
                lambda task, number=batch.number: self._on_task_end(number, task))

    def reported(self, message: list) -> tuple[list[tuple[Item, bool, bytes]], Item | None]:
        """A worker started a batch, or ended some of its images: the images that ended
        (with ``ok`` and the pickled outcome), and the one starting now, if any."""
        ended: list[tuple[Item, bool, bytes]] = []
        batch = self._batches.get(message[1])
        if batch is None:
            return ended, None  # given up on already (its worker left, or was restarted)
        batch.started = True
        if message[0] == "ended":
            for index, ok, payload in message[2]:
                item = batch.items[index]
                if not item.ended:
                    self._end_item(item)
                    ended.append((item, ok, payload))
            if not batch.unended:
                self._retire(batch)
        starting = batch.running
        if starting is batch.items[-1] or starting is None:
            self._release(batch)
        return ended, starting

    def task_ended(self, number: int) -> list[Item] | None:
        """A batch's Dask task ended: its images not reported (normally none); None if the
        batch was given up on already."""
        batch = self._batches.get(number)
        if batch is None:
            return None
        self._retire(batch)
        left = batch.unended
        for item in left:
            self._end_item(item)
        return left

    def give_up(self, worker: str, running: BaseException) -> tuple[list[Ending], list[Any]]:
        """End the batches on ``worker``: its current images with ``running``, the images
        not started with LostWork. Their endings, and their Dask tasks to cancel."""
        endings: list[Ending] = []
        tasks = []
        for batch in [batch for batch in self._batches.values() if batch.worker == worker]:
            self._retire(batch)
            tasks.append(batch.task)
            current = batch.running
            for item in batch.unended:
                self._end_item(item)
                endings.append((item.future, None, running if item is current else LostWork(
                    f"its Dask worker {worker} left before the image started")))
        return endings, tasks

    def drop_everything(self, error: BaseException) -> list[Ending]:
        """End every image not ended with ``error``: their endings."""
        endings: list[Ending] = [(ours, None, error) for ours in self._items]
        self._items.clear()
        self._waiting.clear()
        self._batches.clear()
        self._load.clear()
        return endings

    def _unstarted(self) -> int:
        """Images in batches that have not started, as far as the workers have said (they
        report ends a little late, so this may count a few that have)."""
        return sum(len(batch.unended) - (batch.running is not None)
                   for batch in self._batches.values())

    def _roomiest(self) -> str | None:
        """The worker with the most threads free for another batch, if any.

        A batch takes a thread until its last image starts: the next batch is then on its
        way while that image runs, and the thread never waits for it.
        """
        best, room = None, 0
        for worker, threads in self.workers.items():
            free = threads - self._load[worker]
            if free > room:
                best, room = worker, free
        return best

    def _end_item(self, item: Item) -> None:
        item.ended = True
        self._items.pop(item.future, None)

    def _retire(self, batch: Batch) -> None:
        del self._batches[batch.number]
        self._release(batch)

    def _release(self, batch: Batch) -> None:
        """The batch's worker thread may take the next batch."""
        if batch.holds:
            batch.holds = False
            self._load[batch.worker] -= 1
            if self._load[batch.worker] <= 0:
                del self._load[batch.worker]


def input_bytes(args: tuple) -> int:
    """What an image (``run_image``'s ``args``) is expected to cost: its input's bytes."""
    try:
        return os.stat(args[0].input).st_size
    except (AttributeError, IndexError, OSError, TypeError):
        return 0  # it will fail at once


def unpickled(payload: bytes) -> tuple[Any, BaseException | None]:
    """What a worker reported (pickled), or the error of reading it."""
    try:
        return pickle.loads(payload), None
    except Exception as exc:
        return None, RuntimeError(f"cannot read what the Dask worker reported: {exc!r}")


def end(endings: Iterable[Ending]) -> None:
    """Set each future's result or exception (never holding the pool's lock: the futures'
    callbacks take the engine's)."""
    for future, value, error in endings:
        with contextlib.suppress(InvalidStateError):
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


def _share(images: int, threads: int) -> int:
    """Each thread's share of ``images`` among ``threads``, rounded up."""
    return -(-images // max(1, threads))
