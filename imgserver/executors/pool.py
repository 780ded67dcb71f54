"""The local process pool: a ``concurrent.futures.Executor`` that survives its workers.

A ``ProcessPoolExecutor`` is broken for good when one of its workers dies (a segfault in a
codec, the OOM killer): every later ``submit`` raises ``BrokenProcessPool``. ``LocalPool``
replaces the broken pool with a new one on the next ``submit``, and ``reset`` kills the
running workers on purpose (an image over its time limit), which ends their tasks with
``BrokenExecutor``. The engine sees only the ``Executor`` interface plus ``reset``, so any
other executor (a Dask cluster's) can stand in.

Workers start by forkserver, never by fork: a process forked from a parent that has run a
cv2 call can hang in its first cv2 call. The forkserver preloads the image code, so a new
worker starts in a fraction of a second. It is started without the current folder on its
``sys.path``: whatever the folder the server was started from holds, the workers import
the installed imgserver, OpenCV and NumPy.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor
from multiprocessing import forkserver
from typing import Any

logger = logging.getLogger("imgserver.executors.pool")

#: Imported once in the forkserver. Python 3.10 cannot keep the current folder off the
#: forkserver's path (see ``_start_forkserver``): there each worker imports the image code
#: itself, after multiprocessing has given it the server's own sys.path.
_PRELOAD = ["imgserver.images.pipeline"] if sys.version_info >= (3, 11) else []


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


def init_worker(server_pid: int) -> None:
    """Prepare a worker process: one OpenCV thread, no SIGINT, and no life after the server."""
    # Ctrl-C reaches the whole process group; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    threading.Thread(target=_exit_with, args=(server_pid,), name="imgserver-orphan-guard",
                     daemon=True).start()
    import cv2

    cv2.setNumThreads(1)  # one image per process; threads would only fight for the cores


def keep_freed_memory() -> None:
    """Let glibc reuse freed image buffers instead of returning them to the system.

    By default every buffer above 128 KiB is a fresh mmap, unmapped when freed, so each
    image pays for faulting its pages in again (30-40% of a 1080p resize). A worker handles
    one image at a time, so keeping its peak heap costs no more than that image needs.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's largest allowed value
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    except (OSError, AttributeError):  # not glibc: keep its defaults
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


def _exit_with(pid: int) -> None:
    """End this worker when process ``pid`` (the server) ends, even by ``kill -9``.

    A worker waits for tasks on a pipe it also holds the other end of, so it would outlive
    a killed server for ever, and go on running queued images nobody will collect.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll instead
        while _running(pid):
            time.sleep(1.0)
    else:
        select.select([fd], [], [])  # readable once the process has ended
    os._exit(0)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalPool(Executor):
    """A process pool that rebuilds itself after a worker dies."""

    def __init__(self, workers: int, *, max_pixels: int, max_tasks_per_child: int | None = None
                 ) -> None:
        self.workers = workers
        self._max_tasks_per_child = max_tasks_per_child
        self._lock = threading.Lock()
        self._closed = False
        # OpenCV reads its own pixel limit (a backstop for formats imgserver does not read
        # headers of) once, when cv2 is loaded: in the forkserver, which inherits this.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        _start_forkserver()  # again if it was killed: a lazy restart would have the folder
        return ProcessPoolExecutor(
            self.workers, mp_context=self._context, initializer=init_worker,
            initargs=(os.getpid(),), max_tasks_per_child=self._max_tasks_per_child)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in a worker; a broken pool is replaced first."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenExecutor:
                logger.warning("a worker process died; starting a new pool")
                self._pool.shutdown(wait=False)
                self._pool = self._new_pool()
                return self._pool.submit(fn, *args, **kwargs)

    @property
    def capacity(self) -> int:
        """Images to run at once: one per worker process."""
        return self.workers

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

    def reset(self, futures: Sequence[Future] = ()) -> None:
        """Kill every worker now: their running tasks end with BrokenExecutor.

        A process pool cannot tell which worker runs which task, so ``futures`` (the
        tasks to end) does not narrow it: the others come back and are run again.
        """
        with self._lock:
            pool, self._pool = self._pool, self._new_pool()
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool; with ``wait``, after the running tasks finish."""
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    kill = getattr(pool, "kill_workers", None)  # Python 3.14 has it
    if kill is not None:
        kill()
        return
    # Before 3.14 the worker processes are only reachable through this attribute.
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()
