"""Prometheus metrics (prometheus-client), all counted in the server process.

    engine events ---------> imgserver_jobs_total, imgserver_images_total,
                             imgserver_image_seconds (the worker's own time, as it reports it),
                             imgserver_queue_wait_seconds (accepted to a worker)
    Engine.stats(), scraped  imgserver_images_queued, _running, imgserver_workers,
                             imgserver_worker_restarts_total
    ASGI middleware -------> imgserver_http_requests_total, imgserver_http_request_seconds
                             (by route template, never by raw path: ids would make a series
                             per job)
    notifier, drop folder -> imgserver_notifications_total, imgserver_inbox_files_total

Each server has its own registry: nothing is global, and a test can run several servers.
The workers report their time in their results; no multiprocess mode is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgserver.jobs.events import Event, ImageFinished, JobFinished
from imgserver.jobs.job import FINAL_STATES, SOURCES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_WORKER_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The server's metrics: fed by the engine's events, read from it when scraped."""

    def __init__(self, stats: Callable[[], dict[str, Any]], version: str) -> None:
        """``stats()``: the engine's current state (``Engine.stats``)."""
        self.registry = CollectorRegistry()
        registry = self.registry
        self.jobs = Counter("imgserver_jobs", "Jobs finished, by source and final state",
                            ["source", "state"], registry=registry)
        self.images = Counter("imgserver_images", "Images finished, by state", ["state"],
                              registry=registry)
        self.image_seconds = Histogram("imgserver_image_seconds",
                                       "Time a worker spent on an image", registry=registry,
                                       buckets=_WORKER_BUCKETS)
        self.queue_wait = Histogram("imgserver_queue_wait_seconds",
                                    "Time from a job's acceptance to an image's start",
                                    registry=registry, buckets=_WAIT_BUCKETS)
        self.requests = Counter("imgserver_http_requests", "HTTP requests answered",
                                ["route", "code"], registry=registry)
        self.request_seconds = Histogram("imgserver_http_request_seconds",
                                         "Time to answer an HTTP request (to the start of the "
                                         "answer, for streams)", ["route"], registry=registry)
        self.notifications = Counter("imgserver_notifications",
                                     "Webhook attempts, by result", ["result"],
                                     registry=registry)
        self.inbox_files = Counter("imgserver_inbox_files", "Drop-folder files, by result",
                                   ["result"], registry=registry)
        Info("imgserver_build", "The running version", registry=registry).info(
            {"version": version})
        registry.register(_EngineCollector(stats))
        for source in SOURCES:  # every series exists from the start: rates need a zero
            for state in FINAL_STATES:
                self.jobs.labels(source, state)
        for state in ("done", "failed", "cancelled"):
            self.images.labels(state)
        for result in ("delivered", "retried", "failed"):
            self.notifications.labels(result)
        for result in ("taken", "invalid", "waiting"):
            self.inbox_files.labels(result)

    def count_streams(self, streams: Callable[[], tuple[int, int]]) -> None:
        """Export the event streams: ``streams()`` gives those open, and those refused at
        the cap since start."""
        self.registry.register(_StreamCollector(streams))

    def __call__(self, event: Event) -> None:
        """The engine's listener (on the engine's thread; prometheus-client is thread-safe)."""
        if isinstance(event, ImageFinished):
            self.images.labels(event.image.state).inc()
            if event.seconds is not None:
                self.image_seconds.observe(event.seconds)
            if event.waited is not None:
                self.queue_wait.observe(event.waited)
        elif isinstance(event, JobFinished):
            self.jobs.labels(event.document["source"], event.document["state"]).inc()

    def notification(self, result: str) -> None:
        """Count a webhook attempt's result: delivered, retried or failed."""
        self.notifications.labels(result).inc()

    def inbox_file(self, result: str) -> None:
        """Count what became of a drop-folder file: taken, invalid or waiting."""
        self.inbox_files.labels(result).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)

class HTTPMetrics:
    """ASGI middleware: every HTTP request counted and timed, by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The series of each route and status, looked up once: ``labels`` costs more than
        # the increment it leads to. Routes and statuses are few, so this stays small.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = False

        async def sending(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                route, status = key = (_route(scope), message["status"])
                if key not in self._series:
                    self._series[key] = (self.metrics.requests.labels(route, str(status)),
                                         self.metrics.request_seconds.labels(route))
                count, seconds = self._series[key]
                count.inc()
                seconds.observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, sending)


def _route(scope: Scope) -> str:
    """The template of the route that answered (``/jobs/{job_id}``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class _EngineCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        yield GaugeMetricFamily("imgserver_images_queued",
                                "Images accepted and waiting for a worker", stats["queued"])
        yield GaugeMetricFamily("imgserver_images_running", "Images in a worker now",
                                stats["running"])
        yield GaugeMetricFamily("imgserver_workers", "Images the executor runs at once",
                                stats["workers"])
        restarts = CounterMetricFamily("imgserver_worker_restarts",
                                       "Worker processes ended by the server, by reason",
                                       labels=["reason"])
        for reason in ("died", "timeout"):
            restarts.add_metric([reason], stats["restarts"].get(reason, 0))
        yield restarts


class _StreamCollector(Collector):
    """The event streams, read when Prometheus scrapes."""

    def __init__(self, streams: Callable[[], tuple[int, int]]) -> None:
        self._streams = streams

    def collect(self) -> Iterator[Any]:
        open_, refused = self._streams()
        yield GaugeMetricFamily("imgserver_event_streams", "Event streams open now", open_)
        yield CounterMetricFamily("imgserver_event_streams_refused",
                                  "Event streams refused: --max-streams were open", refused)
