"""The HTTP API (FastAPI): a thin edge over the job engine.

    POST /jobs, GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel,
    GET /jobs/{id}/events, GET /events        jobs and their events (imgserver.http.jobs)
    GET  /jobs/{id}/images/{n}/thumbnail, /file   a job's files (imgserver.http.files)
    GET  /, /ui, /ui/jobs/{id}                    the status page (imgserver.http.page)
    GET  /metrics            Prometheus metrics (open, like /healthz)
    GET  /healthz            200 {"status": "ok"} while the server can take work, else 503
    GET  /docs, /openapi.json  the API's documentation, served without internet
                               (imgserver.http.docs)

The engine's errors become status codes in ``imgserver.http.errors`` and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp

from imgserver import __version__
from imgserver.access.gate import Gate
from imgserver.http import files, jobs, page
from imgserver.http.auth import AccessLog, Auth
from imgserver.http.connection import Disconnects
from imgserver.http.docs import add_docs
from imgserver.http.errors import add_error_handlers
from imgserver.http.metrics import CONTENT_TYPE, HTTPMetrics, Metrics
from imgserver.http.responses import JSONResponse
from imgserver.http.schema import Health
from imgserver.http.security import SecurityHeaders
from imgserver.http.streams import EventHub
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

#: Engine calls the routes may have under way at once (as many as Starlette's own pool).
ENGINE_CALLS = 40


class _App(FastAPI):
    """FastAPI, with the security headers added outside all of its middleware, so that the
    500 of an unexpected error (answered by the outermost one) carries them too."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(engine: Engine, settings: Settings, gate: Gate | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` to whom ``gate`` lets in (by default:
    the one IMGSERVER_TOKEN, or everyone without it); ``app.state.hub`` streams its events
    and ``app.state.metrics`` counts them."""
    auth = Auth(gate or Gate(settings.token))
    hub = EventHub(engine.snapshot, engine.unfinished, max_streams=settings.max_streams)
    engine.subscribe(hub)
    metrics = Metrics(engine.stats, __version__)
    engine.subscribe(metrics)
    metrics.count_streams(lambda: (hub.streams, hub.refused))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # The routes' engine calls and the streams' first reads run in the loop's default
        # executor; asyncio's has cpu + 4 threads, too few: a few submits slow in their
        # fsync (a busy disk) would hold up the status of every other job.
        calls = ThreadPoolExecutor(ENGINE_CALLS, thread_name_prefix="imgserver-http")
        loop.set_default_executor(calls)
        app.state.calls = calls  # for a call whose answer reaches the loop another way
        hub.attach(loop)
        yield
        hub.close()
        calls.shutdown(wait=False)

    app = _App(
        title="imgserver", version=__version__,
        description="Resize, split and blur images on this machine. Submit a job, then follow "
                    "its events, poll its status or wait for it. Paths are resolved against "
                    "the server's root.",
        docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.hub = hub
    app.state.metrics = metrics
    app.add_middleware(HTTPMetrics, metrics=metrics)
    app.add_middleware(AccessLog)

    app.include_router(jobs.router(engine, hub, settings, auth))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             description="The server's metrics in Prometheus's text format: jobs and images by "
                         "state, time in the workers and in the queue, the queue, workers and "
                         "their restarts, HTTP requests by route, webhooks and drop-folder "
                         "files. Open, like /healthz.",
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", summary="Whether the server can take work",
             responses={200: {"model": Health}, 503: {"model": Health}})
    async def healthz() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": engine.health_reason},
                            status_code=503)

    app.include_router(files.router(engine, auth))
    page.add_routes(app)
    add_docs(app)
    add_error_handlers(app)
    app.add_middleware(Disconnects)
    return app
