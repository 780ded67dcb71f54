"""What runs in a worker process of the local pool: its set-up, and the loop that runs the
tasks its pipe brings. Imported in the forkserver, so it holds no more than that needs."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


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


def serve(connection: Connection, server_pid: int,
          initializer: Callable[[int], None]) -> None:
    """A worker process: run the tasks its pipe brings, one at a time, until told to stop."""
    initializer(server_pid)
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the server is gone
            return
        if message is None:
            return
        fn, args, kwargs = message
        try:
            answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 (the task's failure, for the server)
            answer = (False, (exc, "".join(traceback.format_exception(exc))))
        try:
            connection.send(answer)
        except Exception as exc:  # a result or exception that cannot be pickled
            connection.send((False, (RuntimeError(
                f"the worker could not send back what the task gave: {exc!r}"), "")))
