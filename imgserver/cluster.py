"""Images on a Dask cluster: the same engine and image function, other machines' processes.

    Engine --submit(process_image, ImageTask)--> DaskPool --> distributed.Client
                                                                  |  scheduler
    Engine <--concurrent.futures.Future----------- (translated) <-+  workers (shared ROOT)

``DaskPool`` is a ``concurrent.futures.Executor`` over a ``distributed.Client``: the engine
submits the very function the local pool runs, with plain data, and gets plain futures
back. What differs is translated at this seam, so the engine does not branch on it:

- a task Dask gave up on (its workers kept dying: ``KilledWorker``) ends with
  ``BrokenExecutor``, as a dead local worker does; one dropped because the scheduler
  connection broke ends with ``LostWork``, and is simply run again;
- ``capacity`` is the threads of the workers that see ROOT, read again as workers come
  and go (a worker that joins later is checked too, and logged if it cannot see ROOT:
  Dask may still hand it images, which then fail with "no such file");
- ``problem`` says why no work can run (no scheduler, no workers), for /healthz and for the
  engine to hold its queue instead of failing it;
- ``reset`` restarts the workers running images over their time limit, in the background.

Workers read inputs and write outputs under ROOT themselves, so ROOT must be the same path
on the server and on every worker: ``DaskPool`` checks that at start with a marker file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError, LostWork

logger = logging.getLogger("imgserver.cluster")

INSTALL_HINT = "install it with: pip install 'imgserver[dask]' (it brings distributed)"
#: How often the connection to the scheduler is checked, and re-made once lost (seconds).
WATCH_INTERVAL = 1.0


def read_marker(path: str) -> str:
    """What a worker reads at ``path`` (run on every worker to prove the root is shared)."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # the dask extra is not installed: DaskPool says so when asked for
    _WorkerPlugin = object  # type: ignore[misc, assignment]


class WorkerSetup(_WorkerPlugin):  # type: ignore[misc, valid-type]
    """A Dask worker plugin: the settings a local worker gets from ``init_worker``."""

    name = "imgserver"

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def setup(self, worker: Any) -> None:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(self.max_pixels))
        import cv2

        from imgserver.pool import keep_freed_memory

        cv2.setNumThreads(1)
        keep_freed_memory()

    def teardown(self, worker: Any) -> None:
        """Nothing to undo."""


class DaskPool(Executor):
    """An executor running tasks on the workers of an existing Dask cluster."""

    def __init__(self, scheduler: str, root: Path, *, max_pixels: int,
                 connect_timeout: float = 10.0) -> None:
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
        self._lock = threading.Lock()
        self._pending: dict[Future, Any] = {}   # ours -> Dask's (kept, or Dask forgets it)
        self._closed = False
        self._client = self._connect()
        self._good = check_shared_root(self._client, root)  # workers known to see the root
        self._seen = set(self._good)
        self._capacity = self._threads()
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
        return client

    # -- the Executor interface ---------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; a plain Future of its result."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            if self.problem is not None:
                raise BrokenExecutor(self.problem)
            ours: Future = Future()
            ours.set_running_or_notify_cancel()
            # pure=False: the same image twice (a retry) is two tasks, not one cached result.
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
            error = BrokenExecutor(f"the Dask cluster lost this image's result: {exc}")
        if error is None:  # cancelled: the scheduler connection broke, or a reset
            ours.set_exception(LostWork(f"the Dask cluster dropped this image "
                                        f"({theirs.status})"))
        elif isinstance(error, self._distributed.KilledWorker):
            ours.set_exception(BrokenExecutor(f"Dask workers died running this image: {error}"))
        else:
            ours.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Disconnect from the cluster (its scheduler and workers go on)."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for ours in pending:
            ours.set_exception(BrokenExecutor("the server is stopping"))
        self._client.close()

    # -- what the engine may ask of any pool --------------------------------------------

    @property
    def capacity(self) -> int:
        """Images handed over at once: one per thread of the workers that see the root.

        (Handing over more would hide the scheduler's round trip, but an image's time limit
        would then count its wait behind another.)
        """
        return max(1, self._capacity)

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

        Only those workers: a cluster may be shared. It happens in the background.
        """
        with self._lock:
            keys = {self._pending[ours].key for ours in futures if ours in self._pending}
        threading.Thread(target=self._restart, args=(keys,), name="imgserver-dask-restart",
                         daemon=True).start()

    def _restart(self, keys: set[str]) -> None:
        try:
            processing = self._client.processing()
            workers = [worker for worker, running in processing.items() if keys & set(running)]
            if workers:
                self._client.restart_workers(workers)
        except Exception as exc:  # the watcher sees the state that follows
            logger.error("restarting Dask workers failed: %s", exc)

    # -- watching the connection --------------------------------------------------------

    def _threads(self) -> int:
        """Threads of the workers that see the root; checks workers that joined since."""
        try:
            threads = self._client.nthreads()
        except Exception:
            return 0
        new = [worker for worker in threads if worker not in self._seen]
        if new:
            self._seen.update(new)
            try:
                self._good.update(shared_root_workers(self._client, self.root, new))
            except Exception as exc:
                logger.error("cannot check the new Dask workers %s: %s", new, exc)
        return sum(count for worker, count in threads.items() if worker in self._good)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL)
            if self._closed:
                return
            if self._client.status == "running":
                self._capacity = self._threads()
                continue
            self._fail_pending(f"lost the Dask scheduler at {self.scheduler}")
            if self._client.status in ("closed", "closing", "failed"):
                self._reconnect()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for ours in pending:
            ours.set_exception(LostWork(reason))

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
        self._capacity = self._threads()
        logger.info("reconnected to the Dask scheduler at %s", self.scheduler)
        with contextlib.suppress(Exception):
            old.close()


def check_shared_root(client: Any, root: Path) -> set[str]:
    """The workers, all of which see ``root`` as this server does; ConfigError otherwise."""
    seen = _read_markers(client, root, None)
    if not seen:
        raise ConfigError("the Dask cluster has no workers")
    for worker, found in sorted(seen.items()):
        if found is not True:
            raise ConfigError(
                f"Dask worker {worker} does not see the root {root} as this server does "
                f"({found}); every worker must mount the root at the same path (shared "
                f"storage)")
    return set(seen)


def shared_root_workers(client: Any, root: Path, workers: list[str] | None = None) -> list[str]:
    """Of ``workers`` (all when None), those that see ``root``; the others are logged."""
    good = []
    for worker, found in sorted(_read_markers(client, root, workers).items()):
        if found is True:
            good.append(worker)
        else:
            logger.error("Dask worker %s does not see the root %s (%s); images it runs "
                         "will fail: give it the shared storage, or stop it", worker, root, found)
    return good


def _read_markers(client: Any, root: Path, workers: list[str] | None) -> dict[str, Any]:
    token = secrets.token_hex(16)
    marker = root / f".imgserver-shared-{token}"
    marker.write_text(token)
    try:
        seen = client.run(read_marker, str(marker), workers=workers)
    finally:
        marker.unlink()
    return {worker: True if found == token else
            (found if found.startswith("cannot") else "it holds other files")
            for worker, found in seen.items()}
