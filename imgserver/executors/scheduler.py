"""The link to a Dask scheduler: a ``distributed.Client`` made at start and made again
when it is lost, and which of the cluster's workers see ROOT.

Both of the client's handlers (the pool's report topic, and the scheduler's own events of
workers that come and go) run on the client's event loop: they only pass the message on,
to ``tell``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError
from imgserver.executors.daskworkers import WorkerSetup, check_shared_root, shared_root_workers

logger = logging.getLogger("imgserver.executors.cluster")


class SchedulerLink:
    """A client of the scheduler at ``address``, and the workers known to see ``root``."""

    def __init__(self, distributed: Any, address: str, root: Path, *, max_pixels: int,
                 timeout: float, topic: str, tell: Callable[[tuple], None]) -> None:
        """Connect (ConfigError if the scheduler cannot be reached) and check the workers;
        the workers' reports on ``topic`` and the scheduler's worker events go to ``tell``."""
        self.address = address
        self.root = root
        self._distributed = distributed
        self._max_pixels = max_pixels
        self._timeout = timeout
        self._topic = topic
        self._tell = tell
        self.client = self._connect()
        self._good = check_shared_root(self.client, root)  # workers known to see the root
        self._seen = set(self._good)

    @property
    def status(self) -> str:
        """The client's status: ``running`` while the scheduler is reachable."""
        return str(self.client.status)

    def sees_root(self, worker: str) -> bool:
        """Whether ``worker`` is known to see ROOT."""
        return worker in self._good

    def threads(self) -> dict[str, int] | None:
        """Every worker's threads, as the scheduler says now (None if it cannot be asked);
        workers not seen before are checked for ROOT first."""
        try:
            threads: dict[str, int] = self.client.nthreads()
        except Exception as exc:  # the pool's watcher sees a broken connection next
            logger.warning("cannot read the Dask cluster's workers: %s", exc)
            return None
        new = [worker for worker in threads if worker not in self._seen]
        if new:
            self._seen.update(new)
            try:
                self._good.update(shared_root_workers(self.client, self.root, new))
            except Exception as exc:
                logger.error("cannot check the new Dask workers %s: %s", new, exc)
        return threads

    def reconnect(self) -> bool:
        """Connect again, after the scheduler was lost; whether it worked."""
        try:
            client = self._connect()
            good = set(shared_root_workers(client, self.root))
        except (ConfigError, OSError) as exc:
            logger.warning("%s; trying again", exc)
            return False
        old, self.client = self.client, client
        self._good, self._seen = good, set(client.nthreads())
        _close(old, self._topic)
        logger.info("reconnected to the Dask scheduler at %s", self.address)
        return True

    def close(self) -> None:
        """Disconnect (the scheduler and its workers go on)."""
        _close(self.client, self._topic)

    def _connect(self) -> Any:
        try:
            client = self._distributed.Client(self.address, timeout=self._timeout,
                                              set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {self.address}: "
                              f"{exc}") from None
        client.register_plugin(WorkerSetup(self._max_pixels), name=WorkerSetup.name)
        client.subscribe_topic(self._topic, lambda event: self._tell(("report", event[1])))
        client.subscribe_topic("all", self._on_cluster_event)
        return client

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if isinstance(message, dict) and message.get("action") in ("add-worker",
                                                                  "remove-worker"):
            self._tell(("worker", message["action"], message.get("worker")))


def _close(client: Any, topic: str) -> None:
    """Close a client; first leave the topics, or the scheduler would tell the closed
    client of its own leaving (an error in the scheduler's log)."""
    with contextlib.suppress(Exception):
        client.unsubscribe_topic(topic)
        client.unsubscribe_topic("all")
    with contextlib.suppress(Exception):
        client.close()
