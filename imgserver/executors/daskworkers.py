"""What imgserver needs of each Dask worker: its setup, and proof that it sees ROOT.

Both run on the workers, so they live apart from the pool (``imgserver.executors.cluster``): a
worker imports this small module, not the server's side of the cluster.

    DaskPool --register_plugin(WorkerSetup)--> every worker: OpenCV's settings, no profiler
    DaskPool --run(read_marker, ROOT/.imgserver-shared-<token>)--> each worker: what it reads
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError

logger = logging.getLogger("imgserver.executors.cluster")


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
    """A Dask worker plugin: the settings a local worker gets from ``init_worker``, and no
    sampling profiler."""

    name = "imgserver"
    #: Dask's statistical profiler samples a worker's threads a hundred times a second (for
    #: its dashboard): 5-10% of a tiles image's time on two busy cores. Off while this
    #: plugin is on a worker.
    PROFILER = ("profile", "profile-cycle")

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._stopped: dict[str, Any] = {}

    def setup(self, worker: Any) -> None:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(self.max_pixels))
        import cv2

        import imgserver.executors.batch  # noqa: F401 (loaded now, not by the first batch)
        import imgserver.images.pipeline  # noqa: F401
        from imgserver.executors.worker import keep_freed_memory

        cv2.setNumThreads(1)
        keep_freed_memory()
        # Taken out, not only stopped: a worker starting (or restarted) sets up its plugins
        # first, then starts every periodic callback it has.
        callbacks = getattr(worker, "periodic_callbacks", {})
        for name in self.PROFILER:
            if name in callbacks:
                self._stopped[name] = callbacks.pop(name)
                self._stopped[name].stop()

    def teardown(self, worker: Any) -> None:
        """Turn the profiler back on."""
        for name, callback in self._stopped.items():
            worker.periodic_callbacks[name] = callback
            callback.start()
        self._stopped.clear()


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
