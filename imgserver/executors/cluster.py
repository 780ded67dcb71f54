"""Images on a Dask cluster: the same engine and image function, other machines' processes.

    Engine --submit(run_image, ImageTask)--> DaskPool --batches--> distributed.Client
                                                                       |  scheduler
    Engine <--a Future per image---- events, translated <--------------+  workers (shared ROOT)

``DaskPool`` is a ``concurrent.futures.Executor`` over a ``distributed.Client``: the engine
submits the very function the local pool runs, with plain data, and gets plain futures
back. What differs is translated at this seam, so the engine does not branch on it:

- images go to the workers in batches (``imgserver.executors.batch``): while every worker thread has
  its batches, the images handed over wait in the pool, and the next batch takes several
  small images or one big one. The pool takes a ``backlog`` beyond its ``capacity`` for
  that, and says when each image really starts, so that its time limit is its own. Other
  calls (a thumbnail, a ping) run alone, at once;
- a batch is pinned to the worker chosen for it, so that Dask never runs it twice. When
  that worker dies (the scheduler's ``remove-worker`` event says so), the image it was
  running ends with ``BrokenExecutor``, as on a dead local worker (the runner retries it
  alone), and the images not started with ``LostWork`` (they are run again); finished
  images stay finished. A call run alone that Dask gave up on (``KilledWorker``) ends with
  ``BrokenExecutor`` too; anything dropped because the scheduler connection broke, with
  ``LostWork``;
- ``capacity`` is the threads of the workers that see ROOT, read again as workers come
  and go (a worker that joins later is checked too, and logged if it cannot see ROOT: it
  gets no batches, though Dask may still hand it a thumbnail, which then fails);
- ``problem`` says why no work can run (no scheduler, no workers), for /healthz and for the
  engine to hold its queue instead of failing it;
- ``reset`` restarts the workers running images over their time limit, in the background;
  the other images of their batches are run again.

Workers read inputs and write outputs under ROOT themselves, so ROOT must be the same path
on the server and on every worker: ``DaskPool`` checks that at start with a marker file.

Dask's handlers and callbacks only pass what they hear to the courier thread, which keeps
the batches and ends the images' futures in order (never holding the pool's lock then: the
futures' callbacks take the engine's).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, InvalidStateError
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError, LostWork
from imgserver.executors.batch import (
    BATCH_IMAGES,
    BATCH_SECONDS,
    REPORT_INTERVAL,
    Batch,
    Call,
    Estimate,
    HeldFuture,
    Item,
    plan,
    run_batch,
)
from imgserver.executors.daskworkers import WorkerSetup, check_shared_root, shared_root_workers
from imgserver.images.pipeline import run_image

logger = logging.getLogger("imgserver.executors.cluster")

INSTALL_HINT = "install it with: pip install 'imgserver[dask]' (it brings distributed)"
#: How often the connection to the scheduler is checked, and re-made once lost (seconds).
WATCH_INTERVAL = 1.0

#: What becomes of a future: set_result(value) or set_exception(error).
Ending = tuple[Future, Any, BaseException | None]


class DaskPool(Executor):
    """An executor running tasks on the workers of an existing Dask cluster."""

    def __init__(self, scheduler: str, root: Path, *, max_pixels: int,
                 connect_timeout: float = 10.0, batch_seconds: float = BATCH_SECONDS,
                 batch_images: int = BATCH_IMAGES, report_interval: float = REPORT_INTERVAL
                 ) -> None:
        """``batch_seconds``, ``batch_images``: how much one batch may take (``batch.plan``);
        ``report_interval``: how long a worker may hold the outcomes of a batch's images
        (keep it well below the image time limit: the pool learns that late that the next
        image started)."""
        try:
            import distributed
        except ImportError:
            raise ConfigError(f"--executor dask needs the 'distributed' package; "
                              f"{INSTALL_HINT}") from None
        self._distributed = distributed
        self.scheduler = scheduler
        self.root = root
        self._max_pixels = max_pixels
        self._timeout = connect_timeout
        self._budget = batch_seconds
        self._most = batch_images
        self._interval = report_interval
        #: The scheduler's event topic the workers report images on (one per pool).
        self.topic = f"imgserver-{secrets.token_hex(8)}"
        self._lock = threading.Lock()
        # Calls run alone: ours -> Dask's (kept, or Dask forgets it).
        self._pending: dict[Future, Any] = {}
        self._waiting: deque[Item] = deque()    # images handed over, not yet in a batch
        self._items: dict[Future, Item] = {}    # images handed over and not ended
        self._batches: dict[int, Batch] = {}
        self._numbers = itertools.count()
        self._workers: dict[str, int] = {}      # workers that get batches -> their threads
        self._load: Counter[str] = Counter()    # threads taken by batches, by worker
        self._gone: set[str] = set()            # removed, as the scheduler said
        self._restarting: set[str] = set()
        self._estimate = Estimate()             # what an image is expected to take
        self._pump_due = False                  # the courier is to send batches
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # from Dask's threads
        self._closed = False
        self._capacity = 0
        self._client = self._connect()
        self._good = check_shared_root(self._client, root)  # workers known to see the root
        self._seen = set(self._good)
        self._refresh()
        self._courier = threading.Thread(target=self._deliver, name="imgserver-dask-results",
                                         daemon=True)
        self._courier.start()
        self._watcher = threading.Thread(target=self._watch, name="imgserver-dask-watch",
                                         daemon=True)
        self._watcher.start()

    def _connect(self) -> Any:
        try:
            client = self._distributed.Client(self.scheduler, timeout=self._timeout,
                                              set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {self.scheduler}: "
                              f"{exc}") from None
        client.register_plugin(WorkerSetup(self._max_pixels), name=WorkerSetup.name)
        # Both handlers run on the client's event loop: they only pass the message on.
        client.subscribe_topic(self.topic, lambda event: self._inbox.put(("report", event[1])))
        client.subscribe_topic("all", self._on_cluster_event)
        return client

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if isinstance(message, dict) and message.get("action") in ("add-worker",
                                                                  "remove-worker"):
            self._inbox.put(("worker", message["action"], message.get("worker")))

    # -- the Executor interface ---------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; a plain Future of its result.

        An image (``run_image``) goes in a batch; its future stays pending until the image
        starts on its worker.
        """
        if fn is not run_image:
            return self._submit_alone(fn, *args, **kwargs)
        cost = _cost(args)
        with self._lock:
            self._check()
            ours = HeldFuture()
            item = Item(ours, Call(fn, args, kwargs), cost)
            self._estimate.handed(cost)
            self._items[ours] = item
            self._waiting.append(item)
            # Sent from the courier's thread, once the engine has handed over all it had:
            # the first batches of a job are then as full as its later ones.
            if not self._pump_due:
                self._pump_due = True
                self._inbox.put(("pump",))
        return ours

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("cannot submit after shutdown")
        if self.problem is not None:
            raise BrokenExecutor(self.problem)

    def _submit_alone(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self._check()
            ours: Future = Future()
            ours.set_running_or_notify_cancel()
            # pure=False: the same call twice (a retry) is two tasks, not one cached result.
            theirs = self._client.submit(fn, *args, pure=False, **kwargs)
            self._pending[ours] = theirs
        theirs.add_done_callback(lambda done: self._settle(ours, done))
        return ours

    def _settle(self, ours: Future, theirs: Any) -> None:
        with self._lock:
            if self._pending.pop(ours, None) is None:
                return  # already ended (the connection was lost)
        try:
            if theirs.status == "finished":
                ours.set_result(theirs.result())
                return
            error = theirs.exception() if theirs.status == "error" else None
        except Exception as exc:  # the result could not be fetched: the worker is gone
            error = BrokenExecutor(f"the Dask cluster lost this result: {exc}")
        if error is None:  # cancelled: the scheduler connection broke, or a reset
            ours.set_exception(LostWork(f"the Dask cluster dropped this task "
                                        f"({theirs.status})"))
        elif isinstance(error, self._distributed.KilledWorker):
            ours.set_exception(BrokenExecutor(f"Dask workers died running this task: {error}"))
        else:
            ours.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Disconnect from the cluster (its scheduler and workers go on)."""
        with self._lock:
            self._closed = True
            endings = self._drop_everything(BrokenExecutor("the server is stopping"))
        _end(endings)
        self._inbox.put(None)
        _close(self._client, self.topic)

    # -- batches ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send batches of waiting images to the workers with room (holding the lock)."""
        while self._waiting:
            worker = self._roomiest()
            if worker is None:
                return
            count = plan([self._estimate.seconds(item.cost) for item in self._waiting],
                         self._capacity, budget=self._budget, most=self._most)
            items = [self._waiting.popleft() for _ in range(count)]
            batch = Batch(next(self._numbers), worker, items)
            try:
                batch.task = self._client.submit(
                    run_batch, self.topic, batch.number, [item.call for item in items],
                    self._interval, workers=[worker], allow_other_workers=False, pure=False)
            except Exception as exc:  # the connection broke: the watcher sees to it
                logger.error("cannot send a batch to the Dask cluster: %s", exc)
                self._waiting.extendleft(reversed(items))
                return
            for item in items:
                item.batch = batch
            self._batches[batch.number] = batch
            self._load[worker] += 1
            batch.task.add_done_callback(
                lambda task, number=batch.number: self._inbox.put(("ended", number, task)))

    def _roomiest(self) -> str | None:
        """The worker with the most threads free for another batch, if any.

        A batch takes a thread until its last image starts: the next batch is then on its
        way while that image runs, and the thread never waits for it.
        """
        best, room = None, 0
        for worker, threads in self._workers.items():
            free = threads - self._load[worker]
            if free > room:
                best, room = worker, free
        return best

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

    def _give_up(self, worker: str, running: BaseException) -> tuple[list[Ending], list[Any]]:
        """End the batches on ``worker``: its current images with ``running``, the images
        not started with LostWork. Their endings and Dask tasks (holding the lock)."""
        endings: list[Ending] = []
        tasks = []
        for batch in [batch for batch in self._batches.values() if batch.worker == worker]:
            self._retire(batch)
            tasks.append(batch.task)
            current = batch.running
            for item in batch.unended:
                item.ended = True
                self._items.pop(item.future, None)
                endings.append((item.future, None, running if item is current else LostWork(
                    f"its Dask worker {worker} left before the image started")))
        return endings, tasks

    def _drop_everything(self, error: BaseException) -> list[Ending]:
        """End every image and call not finished with ``error`` (holding the lock)."""
        endings: list[Ending] = [(ours, None, error) for ours in self._items]
        endings += [(ours, None, error) for ours in self._pending]
        self._items.clear()
        self._pending.clear()
        self._waiting.clear()
        self._batches.clear()
        self._load.clear()
        return endings

    # -- what the workers report (on the courier thread) --------------------------------

    def _deliver(self) -> None:
        while True:
            message = self._inbox.get()
            if message is None:
                return
            try:
                if message[0] == "report":
                    self._on_report(message[1])
                elif message[0] == "ended":
                    self._on_ended(message[1], message[2])
                elif message[0] == "end":
                    _end(message[1])
                elif message[0] == "pump":
                    with self._lock:
                        self._pump_due = False
                        self._pump()
                else:
                    self._on_worker(message[1], message[2])
            except Exception:  # a bug must not stop every image's delivery
                logger.exception("handling a message from the Dask cluster failed")

    def _on_report(self, message: list) -> None:
        """A worker started a batch, or ended some of its images."""
        moment = time.monotonic()
        ended: list[tuple[Item, bool, bytes]] = []
        with self._lock:
            batch = self._batches.get(message[1])
            if batch is None:
                return  # given up on already (its worker left, or was restarted)
            batch.started = True
            if message[0] == "ended":
                for index, ok, payload in message[2]:
                    item = batch.items[index]
                    if not item.ended:
                        item.ended = True
                        self._items.pop(item.future, None)
                        ended.append((item, ok, payload))
                if not batch.unended:
                    self._retire(batch)
            starting = batch.running
            if starting is batch.items[-1] or starting is None:
                self._release(batch)
                self._pump()
        endings: list[Ending] = []
        for item, ok, payload in ended:
            value, error = _unpickled(payload)
            if not ok and error is None:
                error = value if isinstance(value, BaseException) else RuntimeError(value)
                value = None
            seconds = getattr(error if error is not None else value, "seconds", None)
            if isinstance(seconds, float):
                with self._lock:
                    self._estimate.timed(item.cost, seconds)
            endings.append((item.future, value, error))
        _end(endings)
        if starting is not None:
            starting.future.mark_started(moment)

    def _on_ended(self, number: int, task: Any) -> None:
        """A batch's Dask task ended: normally after its images were all reported."""
        with self._lock:
            batch = self._batches.get(number)
            if batch is None:
                return
            self._retire(batch)
            left = batch.unended
            for item in left:
                item.ended = True
                self._items.pop(item.future, None)
            self._pump()
        error: BaseException
        try:
            failure = task.exception() if task.status == "error" else None
        except Exception as exc:
            failure = exc
        if isinstance(failure, self._distributed.KilledWorker):
            error = BrokenExecutor(f"Dask workers died running this image: {failure}")
        elif failure is not None:
            error = failure  # the batch itself failed (it could not be run at all)
        else:
            logger.warning("a Dask task ended (%s) with %d images not reported; running "
                           "them again", task.status, len(left))
            error = LostWork(f"the Dask cluster dropped this image ({task.status})")
        _end([(item.future, None, error) for item in left])

    def _on_worker(self, action: str, worker: str) -> None:
        """The scheduler added or removed a worker."""
        with self._lock:
            if action == "add-worker":
                self._gone.discard(worker)  # the same address again: the watcher checks it
                return
            self._gone.add(worker)
            if worker in self._workers:
                del self._workers[worker]
                self._capacity = sum(self._workers.values())
            endings, tasks = self._give_up(worker, BrokenExecutor(
                f"the Dask worker {worker} died while processing this image"))
            self._pump()
        _end(endings)
        self._cancel(tasks)

    def _cancel(self, tasks: Iterable[Any]) -> None:
        tasks = [task for task in tasks if task is not None]
        if tasks:
            with contextlib.suppress(Exception):  # gone with the connection anyway
                self._client.cancel(tasks)

    # -- what the engine may ask of any pool --------------------------------------------

    @property
    def capacity(self) -> int:
        """Images run at once: one per thread of the workers that see the root."""
        return max(1, self._capacity)

    @property
    def backlog(self) -> int:
        """Images to take beyond the capacity, waiting in the pool or in a batch.

        Per worker thread: its batch, and the next one waiting to form, so that each batch
        can be full; no more, so that another job's images take their turn within about two
        batches' time (fair share).
        """
        size = self._estimate.batch_size(budget=self._budget, most=self._most)
        return self.capacity * (2 * size - 1)

    @property
    def problem(self) -> str | None:
        """Why no image can run now, or None."""
        if self._client.status != "running":
            return f"the Dask scheduler at {self.scheduler} is unreachable ({self._client.status})"
        if self._capacity == 0:
            return f"the Dask cluster at {self.scheduler} has no worker that sees the root"
        return None

    def reset(self, futures: Sequence[Future] = ()) -> None:
        """Restart the workers running these futures' images (over their time limit).

        Only those workers: a cluster may be shared. The other images of their batches are
        run again. The restart happens in the background.
        """
        endings: list[Ending] = []
        tasks: list[Any] = []
        with self._lock:
            workers = {item.batch.worker for ours in futures
                       if (item := self._items.get(ours)) is not None and item.batch is not None}
            keys = {self._pending[ours].key for ours in futures if ours in self._pending}
            for worker in workers:
                self._restarting.add(worker)
                self._workers.pop(worker, None)
                ended, cancelled = self._give_up(worker, BrokenExecutor(
                    f"stopped with its Dask worker {worker} (an image over its time limit)"))
                endings += ended
                tasks += cancelled
            self._capacity = sum(self._workers.values())
            self._pump()
        # Ended on the courier's thread, as any other: the caller (the engine's thread) takes
        # outcomes only once it is notified of them.
        self._inbox.put(("end", endings))
        threading.Thread(target=self._restart, args=(workers, keys, tasks),
                         name="imgserver-dask-restart", daemon=True).start()

    def _restart(self, workers: set[str], keys: set[str], tasks: list[Any]) -> None:
        try:
            self._cancel(tasks)  # before the restart, so that Dask does not run them again
            if keys:
                processing = self._client.processing()
                workers = workers | {worker for worker, running in processing.items()
                                     if keys & set(running)}
            if workers:
                self._client.restart_workers(sorted(workers))
        except Exception as exc:  # the watcher sees the state that follows
            logger.error("restarting Dask workers failed: %s", exc)
        finally:
            with self._lock:
                self._restarting -= workers

    # -- watching the connection --------------------------------------------------------

    def _refresh(self) -> None:
        """Read the workers again: those that see the root get batches; checks new ones."""
        try:
            threads = self._client.nthreads()
        except Exception as exc:  # the watcher sees a broken connection next
            logger.warning("cannot read the Dask cluster's workers: %s", exc)
            return
        new = [worker for worker in threads if worker not in self._seen]
        if new:
            self._seen.update(new)
            try:
                self._good.update(shared_root_workers(self._client, self.root, new))
            except Exception as exc:
                logger.error("cannot check the new Dask workers %s: %s", new, exc)
        endings: list[Ending] = []
        tasks: list[Any] = []
        with self._lock:
            self._gone &= set(threads)  # forgotten by the scheduler: no stale read has them
            self._workers = {worker: count for worker, count in threads.items()
                             if worker in self._good and worker not in self._gone
                             and worker not in self._restarting}
            self._capacity = sum(self._workers.values())
            for worker in {batch.worker for batch in self._batches.values()} - set(threads):
                ended, cancelled = self._give_up(worker, BrokenExecutor(
                    f"the Dask worker {worker} left while processing this image"))
                endings += ended
                tasks += cancelled
            self._pump()
        _end(endings)
        self._cancel(tasks)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL)
            if self._closed:
                return
            if self._client.status == "running":
                self._refresh()
                continue
            self._fail_pending(f"lost the Dask scheduler at {self.scheduler}")
            if self._client.status in ("closed", "closing", "failed"):
                self._reconnect()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            endings = self._drop_everything(LostWork(reason))
        _end(endings)

    def _reconnect(self) -> None:
        try:
            client = self._connect()
            good = set(shared_root_workers(client, self.root))
        except (ConfigError, OSError) as exc:
            logger.warning("%s; trying again", exc)
            return
        with self._lock:
            old, self._client = self._client, client
            self._good, self._seen = good, set(client.nthreads())
            self._gone.clear()
        self._refresh()
        logger.info("reconnected to the Dask scheduler at %s", self.scheduler)
        _close(old, self.topic)


def _close(client: Any, topic: str) -> None:
    """Close a client; first leave the topics, or the scheduler would tell the closed
    client of its own leaving (an error in the scheduler's log)."""
    with contextlib.suppress(Exception):
        client.unsubscribe_topic(topic)
        client.unsubscribe_topic("all")
    with contextlib.suppress(Exception):
        client.close()


def _cost(args: tuple) -> int:
    """What an image is expected to cost: its input file's bytes."""
    try:
        return os.stat(args[0].input).st_size
    except (AttributeError, IndexError, OSError, TypeError):
        return 0  # it will fail at once


def _unpickled(payload: bytes) -> tuple[Any, BaseException | None]:
    try:
        return pickle.loads(payload), None
    except Exception as exc:
        return None, RuntimeError(f"cannot read what the Dask worker reported: {exc!r}")


def _end(endings: Iterable[Ending]) -> None:
    """Set each future's result or exception (never holding the pool's lock: the futures'
    callbacks take the engine's)."""
    for future, value, error in endings:
        with contextlib.suppress(InvalidStateError):
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
