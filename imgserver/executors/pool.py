"""The local process pool: a ``concurrent.futures.Executor`` of worker processes that
survives its workers, with one pipe to each.

    submit (any thread) --pickled task--> an idle worker's pipe   (or the queue, if none)
    worker: run it --pickled result or exception--> its pipe
    reader thread: wait on every pipe and every worker's sentinel
        result      -> the future's result; the worker takes the next queued task
        worker died -> that worker's task ends with BrokenProcessPool; a new worker starts
                       when there is work for it

Each image costs one pickled message each way and one thread woken (the reader), where a
``ProcessPoolExecutor`` moves it through a queue thread and a manager thread; and the pool
knows which worker runs which task. It takes ``backlog`` (one) task beyond its workers: the
reader hands it to the first worker that answers, so no worker idles while the server
settles one image and picks the next (0.5-3 ms, as much as a small image); its future says
when it really starts (``add_start_callback``), where its time limit starts.

Knowing which worker runs which task, a worker that dies (a segfault in a codec, the OOM
killer) fails its own image only, and ``reset(futures)`` stops the workers of those images
(over their time limit) and no other. A worker is replaced after ``max_tasks_per_child``
images (a slow leak in a codec stays bounded). The engine sees only the ``Executor``
interface plus ``capacity`` and ``reset``, so any other executor (a Dask cluster's) can
stand in.

Workers start by forkserver, never by fork: a process forked from a parent that has run a
cv2 call can hang in its first cv2 call. The forkserver preloads the image code, so a new
worker starts in a fraction of a second. It is started without the current folder on its
``sys.path``: whatever the folder the server was started from holds, the workers import
the installed imgserver, OpenCV and NumPy.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import pickle
import selectors
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from imgserver.executors.started import HeldFuture
from imgserver.executors.worker import init_worker, serve

logger = logging.getLogger("imgserver.executors.pool")

#: Tasks taken beyond one per worker. One is enough: the server refills it long before the
#: next worker finishes; more would only start time limits later than the server asked.
AHEAD = 1

#: Imported once in the forkserver. Python 3.10 cannot keep the current folder off the
#: forkserver's path (see ``_start_forkserver``): there each worker imports the image code
#: itself, after multiprocessing has given it the server's own sys.path.
_PRELOAD = (["imgserver.executors.worker", "imgserver.images.pipeline"]
            if sys.version_info >= (3, 11) else [])


def _start_forkserver() -> None:
    """Start multiprocessing's forkserver, unless it runs, with no current folder on its path.

    The forkserver (and the resource tracker it starts) run ``python -c``, which puts the
    current folder first on ``sys.path``; Python 3.11 (and the first releases of 3.12 and
    3.13) never replace that with the server's own path there. A folder named ``imgserver``
    (or ``cv2``, ``numpy``, ...) where the server was started would then be imported in
    place of the installed one, and every worker would die; the same for any other name.
    PYTHONSAFEPATH (Python 3.11+) keeps the folder off. It is set for this start only:
    programs this process starts later keep Python's usual path.
    """
    saved = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = saved


class LocalPool(Executor):
    """A pool of worker processes, one image each at a time, replaced when they die."""

    def __init__(self, workers: int, *, max_pixels: int, max_tasks_per_child: int | None = None
                 ) -> None:
        """``workers`` processes (started with the first task); each is replaced after
        ``max_tasks_per_child`` tasks (None: never)."""
        self.workers = workers
        self._max_tasks_per_child = max_tasks_per_child
        self._lock = threading.Lock()
        self._closed = False
        # OpenCV reads its own pixel limit (a backstop for formats imgserver does not read
        # headers of) once, when cv2 is loaded: in the forkserver, which inherits this.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._live: list[_Worker] = []
        self._generation = 0  # changes with ``_live``: the reader watches them anew
        self._idle: list[_Worker] = []
        self._queue: collections.deque[_Task] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()  # tells the reader the workers changed
        os.set_blocking(self._wake_write, False)
        self._reader = threading.Thread(target=self._read, name="imgserver-pool-reader",
                                        daemon=True)
        self._reader.start()

    @property
    def capacity(self) -> int:
        """Images to run at once: one per worker process."""
        return self.workers

    @property
    def backlog(self) -> int:
        """Images to take beyond the capacity: ``AHEAD``, queued for the first free worker."""
        return AHEAD

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in a worker (the first idle one, or the next free)."""
        task = _Task(HeldFuture(), fn, args, kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append(task)
            self._start_workers()
            started = self._dispatch()
        _after(started)
        return task.future

    def warm(self) -> None:
        """Start every worker now, so that the first images do not wait for them.

        Workers that cannot start are reported, not raised: the server runs, its images
        fail with the reason and /healthz says it.
        """
        try:
            for future in [self.submit(os.getpid) for _ in range(self.workers * 2)]:
                future.result()
        except BrokenExecutor as exc:
            logger.error("the worker processes cannot start: %s", exc)

    def reset(self, futures: Sequence[Future] = ()) -> int:
        """Stop the workers running ``futures`` now (every worker when none are named):
        those tasks end with BrokenProcessPool; the other workers go on. How many stop."""
        wanted = set(futures)
        with self._lock:
            doomed = [worker for worker in self._live if worker.task is not None
                      and (not wanted or worker.task.future in wanted)]
        for worker in doomed:
            with contextlib.suppress(OSError, ValueError):
                worker.process.kill()
        return len(doomed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool: the queued tasks still run (unless ``cancel_futures``), then the
        workers exit; with ``wait``, once they have."""
        with self._lock:
            self._closed = True
            cancelled = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
            for worker in self._idle:
                worker.stop()
            self._idle.clear()
            self._poke()
        for task in cancelled:
            task.future.cancel()
        if wait:
            self._reader.join()

    # -- workers (holding the lock) -----------------------------------------------------

    def _start_workers(self) -> None:
        """Start workers for the queued tasks, up to ``workers`` (a dead one is replaced
        only when there is work for it: a worker that cannot start dies with a task, not
        in a loop)."""
        missing = min(len(self._queue) - len(self._idle), self.workers - len(self._live))
        if missing <= 0:
            return
        _start_forkserver()  # again if it was killed: a lazy restart would have the folder
        for _ in range(missing):
            ours, theirs = self._context.Pipe()
            process = self._context.Process(target=serve, name="imgserver-worker",
                                            args=(theirs, os.getpid(), self._initializer))
            process.start()
            theirs.close()
            worker = _Worker(process, ours)
            self._live.append(worker)
            self._generation += 1
            self._idle.append(worker)
        self._poke()

    def _dispatch(self) -> list[_Handed]:
        """Hand queued tasks to idle workers; what became of each, for ``_after``.

        The caller tells their futures once it has let go of the lock: their callbacks take
        the engine's lock, which is held around ``submit`` (which takes this one).
        """
        handed: list[_Handed] = []
        while self._queue and self._idle:
            task = self._queue.popleft()
            if task.future.cancelled():
                continue  # cancelled while it waited
            try:
                # Plain pickle: a task is plain data, without the reductions for sockets and
                # pipes that the pipe's own send would look up for every message.
                message = pickle.dumps((task.fn, task.args, task.kwargs),
                                       pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # the task cannot be pickled: its own failure
                handed.append(_Handed(task.future, time.monotonic(), exc))
                continue
            worker = self._idle.pop()
            worker.task = task
            with contextlib.suppress(OSError, ValueError):  # gone: the reader will say so
                worker.connection.send_bytes(message)
            handed.append(_Handed(task.future, time.monotonic()))
        return handed

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")

    @staticmethod
    def _initializer(server_pid: int) -> None:
        init_worker(server_pid)

    # -- the reader thread --------------------------------------------------------------

    def _read(self) -> None:
        """Collect results and deaths until the pool is shut down and its workers gone."""
        # One selector, made again only when the workers change (not one per wake-up).
        selector: selectors.BaseSelector | None = None
        seen = -1
        while True:
            with self._lock:
                if self._closed and not self._live:
                    break
                if self._generation != seen:
                    if selector is not None:
                        selector.close()
                    selector = _watching(self._wake_read, self._live)
                    seen = self._generation
            assert selector is not None
            for key, _ in selector.select():
                worker, what = key.data
                try:
                    if worker is None:
                        os.read(self._wake_read, 4096)
                    elif what == _PIPE:
                        self._answered(worker)
                    else:
                        self._gone(worker)
                except Exception:  # a bug here must not stop every future for good
                    logger.exception("the pool's reader failed on one event")
        if selector is not None:
            selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _answered(self, worker: _Worker) -> None:
        try:
            ok, value = worker.connection.recv()
        except (EOFError, OSError):
            self._gone(worker)
            return
        except Exception as exc:  # a result that cannot be unpickled fails its task alone
            ok, value = False, (exc, "")
        with self._lock:
            task, worker.task = worker.task, None
            worker.tasks += 1
            started: list[_Handed] = []
            if self._closed and not self._queue or (
                    self._max_tasks_per_child is not None
                    and worker.tasks >= self._max_tasks_per_child):
                worker.stop()  # it exits; its sentinel removes it, and a new one may start
            else:
                self._idle.append(worker)
                started = self._dispatch()
        _after(started)
        if task is not None:  # outside the lock: the callbacks take the engine's
            if ok:
                _settle(task.future, True, value)
            else:
                error, text = value
                if text:  # the worker's traceback, as ``ProcessPoolExecutor`` gives it
                    error.__cause__ = _RemoteTraceback(f'\n"""\n{text}"""')
                _settle(task.future, False, error)

    def _gone(self, worker: _Worker) -> None:
        with self._lock:
            if worker not in self._live:
                return  # seen already (by its pipe or its sentinel)
            self._live.remove(worker)
            self._generation += 1
            if worker in self._idle:
                self._idle.remove(worker)
            task, worker.task = worker.task, None
            self._start_workers()  # for the tasks queued, even once shut down: they run
            started = self._dispatch()
        _after(started)
        exitcode = worker.close()
        if task is not None:
            _settle(task.future, False, BrokenProcessPool(
                f"a worker process died (exit code {exitcode}) while it ran this task"))


#: What a worker's key in the reader's selector stands for: its pipe or its sentinel.
_PIPE, _SENTINEL = "pipe", "sentinel"


def _watching(wake: int, workers: Sequence[_Worker]) -> selectors.BaseSelector:
    """A selector of the reader's wake-up pipe and every worker's pipe and sentinel."""
    selector = selectors.DefaultSelector()
    selector.register(wake, selectors.EVENT_READ, (None, None))
    for worker in workers:
        selector.register(worker.connection, selectors.EVENT_READ, (worker, _PIPE))
        selector.register(worker.process.sentinel, selectors.EVENT_READ, (worker, _SENTINEL))
    return selector


def _after(handed: list[_Handed]) -> None:
    """Tell the futures of tasks handed to workers that they started (or could not)."""
    for task in handed:
        if task.error is None:
            task.future.mark_started(task.moment)
        else:
            _settle(task.future, False, task.error)


def _settle(future: Future, ok: bool, value: Any) -> None:
    """End ``future`` with a result (``ok``) or an exception, unless it was cancelled."""
    with contextlib.suppress(InvalidStateError):
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


@dataclass(frozen=True)
class _Handed:
    future: HeldFuture
    moment: float                     # when it was sent to its worker (time.monotonic)
    error: Exception | None = None    # why it could not be


@dataclass(eq=False)
class _Task:
    future: HeldFuture
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    connection: Connection
    task: _Task | None = None
    tasks: int = 0  # tasks it has finished

    def stop(self) -> None:
        """Ask it to exit once idle (it reads no further tasks)."""
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(None)

    def close(self) -> int | None:
        """Let go of its pipe and process once it is gone; its exit code."""
        self.connection.close()
        self.process.join(timeout=1)
        exitcode = self.process.exitcode
        with contextlib.suppress(ValueError):  # not yet ended after all: leave it be
            self.process.close()
        return exitcode


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])
