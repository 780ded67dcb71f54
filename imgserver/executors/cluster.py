"""Images on a Dask cluster: the same engine and image function, other machines' processes.

    Engine --submit(run_image, ImageTask)--> DaskPool --batches--> distributed.Client
                                                                       |  scheduler
    Engine <--a Future per image---- events, translated <--------------+  workers (shared ROOT)

``DaskPool`` is a ``concurrent.futures.Executor`` over a ``distributed.Client``: the engine
submits the very function the local pool runs, with plain data, and gets plain futures
back. What differs is translated at this seam, so the engine does not branch on it:

- images go to the workers in batches (``imgserver.executors.batcher``): the pool takes a
  ``backlog`` beyond its ``capacity`` for that, and says when each image really starts, so
  that its time limit is its own. Other calls (a thumbnail, a ping) run alone, at once;
- a batch is pinned to the worker chosen for it, so that Dask never runs it twice; when
  that worker dies, its images end as on a dead local worker (see the batcher). A call run
  alone that Dask gave up on (``KilledWorker``) ends with ``BrokenExecutor`` too; anything
  dropped because the scheduler connection broke, with ``LostWork``;
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
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError, LostWork
from imgserver.executors.batch import (
    BATCH_IMAGES,
    BATCH_SECONDS,
    REPORT_INTERVAL,
    Call,
    Item,
)
from imgserver.executors.batcher import Batcher, Ending, end, input_bytes, unpickled
from imgserver.executors.scheduler import SchedulerLink
from imgserver.executors.started import HeldFuture
from imgserver.images.pipeline import run_image

logger = logging.getLogger("imgserver.executors.cluster")

INSTALL_HINT = "install it with: pip install 'imgserver[dask]' (it brings distributed)"
#: How often the connection to the scheduler is checked, and re-made once lost (seconds).
WATCH_INTERVAL = 1.0


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
        #: The scheduler's event topic the workers report images on (one per pool).
        self.topic = f"imgserver-{secrets.token_hex(8)}"
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # from Dask's threads
        self._batcher = Batcher(
            self.topic, lambda number, task: self._inbox.put(("ended", number, task)),
            budget=batch_seconds, most=batch_images, interval=report_interval)
        # Calls run alone: ours -> Dask's (kept, or Dask forgets it).
        self._pending: dict[Future, Any] = {}
        self._gone: set[str] = set()            # removed, as the scheduler said
        self._restarting: set[str] = set()
        self._pump_due = False                  # the courier is to send batches
        self._closed = False
        self._link = SchedulerLink(distributed, scheduler, root, max_pixels=max_pixels,
                                   timeout=connect_timeout, topic=self.topic,
                                   tell=self._inbox.put)
        self._refresh()
        self._courier = threading.Thread(target=self._deliver, name="imgserver-dask-results",
                                         daemon=True)
        self._courier.start()
        self._watcher = threading.Thread(target=self._watch, name="imgserver-dask-watch",
                                         daemon=True)
        self._watcher.start()

    # -- the Executor interface ---------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; a plain Future of its result.

        An image (``run_image``) goes in a batch; its future stays pending until the image
        starts on its worker.
        """
        if fn is not run_image:
            return self._submit_alone(fn, *args, **kwargs)
        cost = input_bytes(args)
        with self._lock:
            self._check()
            ours = HeldFuture()
            self._batcher.add(Item(ours, Call(fn, args, kwargs), cost))
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
            theirs = self._link.client.submit(fn, *args, pure=False, **kwargs)
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
        end(endings)
        self._inbox.put(None)
        self._link.close()

    def _drop_everything(self, error: BaseException) -> list[Ending]:
        """End every image and call not finished with ``error`` (holding the lock)."""
        endings = self._batcher.drop_everything(error)
        endings += [(ours, None, error) for ours in self._pending]
        self._pending.clear()
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
                    end(message[1])
                elif message[0] == "pump":
                    with self._lock:
                        self._pump_due = False
                        self._batcher.pump(self._link.client)
                else:
                    self._on_worker(message[1], message[2])
            except Exception:  # a bug must not stop every image's delivery
                logger.exception("handling a message from the Dask cluster failed")

    def _on_report(self, message: list) -> None:
        """A worker started a batch, or ended some of its images."""
        moment = time.monotonic()
        with self._lock:
            ended, starting = self._batcher.reported(message)
            self._batcher.pump(self._link.client)
        endings: list[Ending] = []
        for item, ok, payload in ended:
            value, error = unpickled(payload)
            if not ok and error is None:
                error = value if isinstance(value, BaseException) else RuntimeError(value)
                value = None
            seconds = getattr(error if error is not None else value, "seconds", None)
            if isinstance(seconds, float):
                with self._lock:
                    self._batcher.estimate.timed(item.cost, seconds)
            endings.append((item.future, value, error))
        end(endings)
        if starting is not None:
            starting.future.mark_started(moment)

    def _on_ended(self, number: int, task: Any) -> None:
        """A batch's Dask task ended: normally after its images were all reported."""
        with self._lock:
            left = self._batcher.task_ended(number)
            if left is None:
                return
            self._batcher.pump(self._link.client)
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
        end([(item.future, None, error) for item in left])

    def _on_worker(self, action: str, worker: str) -> None:
        """The scheduler added or removed a worker."""
        with self._lock:
            if action == "add-worker":
                self._gone.discard(worker)  # the same address again: the watcher checks it
                return
            self._gone.add(worker)
            self._batcher.workers.pop(worker, None)
            endings, tasks = self._batcher.give_up(worker, BrokenExecutor(
                f"the Dask worker {worker} died while processing this image"))
            self._batcher.pump(self._link.client)
        end(endings)
        self._cancel(tasks)

    def _cancel(self, tasks: Iterable[Any]) -> None:
        tasks = [task for task in tasks if task is not None]
        if tasks:
            with contextlib.suppress(Exception):  # gone with the connection anyway
                self._link.client.cancel(tasks)

    # -- what the engine may ask of any pool --------------------------------------------

    @property
    def capacity(self) -> int:
        """Images run at once: one per thread of the workers that see the root."""
        return max(1, self._batcher.threads)

    @property
    def backlog(self) -> int:
        """Images to take beyond the capacity, waiting in the pool or in a batch.

        Per worker thread: its batch, and the next one waiting to form, so that each batch
        can be full; no more, so that another job's images take their turn within about two
        batches' time (fair share).
        """
        return self.capacity * (2 * self._batcher.batch_size() - 1)

    @property
    def problem(self) -> str | None:
        """Why no image can run now, or None."""
        if self._link.status != "running":
            return f"the Dask scheduler at {self.scheduler} is unreachable ({self._link.status})"
        if self._batcher.threads == 0:
            return f"the Dask cluster at {self.scheduler} has no worker that sees the root"
        return None

    def reset(self, futures: Sequence[Future] = ()) -> int:
        """Restart the workers running these futures' images (over their time limit); how
        many (a worker runs several images at once: one restart may end several).

        Only those workers: a cluster may be shared. The other images of their batches are
        run again. The restart happens in the background.
        """
        endings: list[Ending] = []
        tasks: list[Any] = []
        with self._lock:
            workers = {item.batch.worker for ours in futures
                       if (item := self._batcher.item(ours)) is not None
                       and item.batch is not None}
            keys = {self._pending[ours].key for ours in futures if ours in self._pending}
            for worker in workers:
                self._restarting.add(worker)
                self._batcher.workers.pop(worker, None)
                ended, cancelled = self._batcher.give_up(worker, BrokenExecutor(
                    f"stopped with its Dask worker {worker} (an image over its time limit)"))
                endings += ended
                tasks += cancelled
            self._batcher.pump(self._link.client)
        # Ended on the courier's thread, as any other: the caller (the engine's thread) takes
        # outcomes only once it is notified of them.
        self._inbox.put(("end", endings))
        threading.Thread(target=self._restart, args=(workers, keys, tasks),
                         name="imgserver-dask-restart", daemon=True).start()
        return len(workers)

    def _restart(self, workers: set[str], keys: set[str], tasks: list[Any]) -> None:
        try:
            self._cancel(tasks)  # before the restart, so that Dask does not run them again
            if keys:
                processing = self._link.client.processing()
                workers = workers | {worker for worker, running in processing.items()
                                     if keys & set(running)}
            if workers:
                self._link.client.restart_workers(sorted(workers))
        except Exception as exc:  # the watcher sees the state that follows
            logger.error("restarting Dask workers failed: %s", exc)
        finally:
            with self._lock:
                self._restarting -= workers

    # -- watching the connection --------------------------------------------------------

    def _refresh(self) -> None:
        """Read the workers again: those that see the root get batches."""
        threads = self._link.threads()
        if threads is None:
            return
        endings: list[Ending] = []
        tasks: list[Any] = []
        with self._lock:
            self._gone &= set(threads)  # forgotten by the scheduler: no stale read has them
            self._batcher.workers = {worker: count for worker, count in threads.items()
                                     if self._link.sees_root(worker) and worker not in self._gone
                                     and worker not in self._restarting}
            for worker in self._batcher.batch_workers() - set(threads):
                ended, cancelled = self._batcher.give_up(worker, BrokenExecutor(
                    f"the Dask worker {worker} left while processing this image"))
                endings += ended
                tasks += cancelled
            self._batcher.pump(self._link.client)
        end(endings)
        self._cancel(tasks)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL)
            if self._closed:
                return
            if self._link.status == "running":
                self._refresh()
                continue
            self._fail_pending(f"lost the Dask scheduler at {self.scheduler}")
            if self._link.status in ("closed", "closing", "failed"):
                self._reconnect()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            endings = self._drop_everything(LostWork(reason))
        end(endings)

    def _reconnect(self) -> None:
        if not self._link.reconnect():
            return
        with self._lock:  # a new connection has seen no worker leave
            self._gone.clear()
        self._refresh()
