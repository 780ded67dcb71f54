"""The HTTP API (FastAPI): a thin edge over the job engine.

    POST /jobs[?wait=true]   202 + status document + Location (200 with wait=true);
                             with Idempotency-Key, a repeat answers 200 with the first job
    GET  /jobs               200 a page of job summaries, newest first, and the next cursor
    GET  /jobs/{id}          200 status document, 404 unknown
    POST /jobs/{id}/cancel   202 cancelled now, 200 cancelled before, 409 finished, 404
    GET  /jobs/{id}/events   Server-Sent Events of one job: status, image, state, end
    GET  /events             Server-Sent Events of every job (and job, when one is accepted)
    GET  /jobs/{id}/images/{n}/thumbnail, /file   a job's files (imgserver.http.files)
    GET  /, /ui, /ui/jobs/{id}                    the status page (imgserver.http.page)
    GET  /metrics            Prometheus metrics (open, like /healthz)
    GET  /healthz            200 {"status": "ok"} while the server can take work, else 503
    GET  /docs, /openapi.json  the API's documentation, served without internet

The engine's errors become status codes here and nowhere else: RequestError 422,
CapacityError 503 with Retry-After, JobNotFound 404, JobConflict 409 (with the job's
document); a body over the limit is 413. Engine
calls that touch the disk run in a worker thread, and ``wait=true`` awaits the engine's
future: the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fastapi_offline
from fastapi import Depends, FastAPI, Header, Query, Request, responses
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.sse import EventSourceResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from imgserver import __version__
from imgserver.errors import (
    CapacityError,
    ImageError,
    JobConflict,
    JobNotFound,
    Problem,
    RequestError,
)
from imgserver.http import files, page
from imgserver.http.connection import Disconnects
from imgserver.http.metrics import CONTENT_TYPE, HTTPMetrics, Metrics
from imgserver.http.schema import ErrorResponse, Health, JobList, JobRequest, StatusDocument
from imgserver.http.streams import EventHub
from imgserver.jobs.engine import Engine
from imgserver.jobs.job import SOURCES, STATES
from imgserver.jobs.keys import HEADER as IDEMPOTENCY_KEY
from imgserver.settings import Settings

#: Swagger UI 5 (renders OpenAPI 3.1) as shipped by the fastapi-offline package.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


class JSONResponse(responses.JSONResponse):
    """JSON written in ASCII: paths and operations are echoed as written, and one may hold a
    lone surrogate (JSON's ``"\\ud800"``, or a file name that is not UTF-8), which UTF-8
    cannot encode; ``\\u`` escapes can."""

    def render(self, content: Any) -> bytes:
        """The body, as compact ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


class _Unauthorized(Exception):
    pass


class _BodyTooLarge(Exception):
    def __init__(self, size: str, limit: int) -> None:
        super().__init__(f"request body is {size} bytes, the limit is {limit} bytes "
                         f"(--max-body-bytes)")


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    """The FastAPI application serving ``engine``; ``app.state.hub`` streams its events and
    ``app.state.metrics`` counts them."""
    hub = EventHub(engine.snapshot, engine.unfinished)
    engine.subscribe(hub)
    metrics = Metrics(engine.stats, __version__)
    engine.subscribe(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.attach(asyncio.get_running_loop())
        yield
        hub.close()

    app = FastAPI(
        title="imgserver", version=__version__,
        description="Resize, split and blur images on this machine. Submit a job, then follow "
                    "its events, poll its status or wait for it. Paths are resolved against "
                    "the server's root.",
        docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.hub = hub
    app.state.metrics = metrics
    app.add_middleware(HTTPMetrics, metrics=metrics)

    async def authorized(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time whatever the first differing byte.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.strip().encode(), settings.token.encode()):
            raise _Unauthorized()

    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "Missing or wrong bearer token "
                                                      "(only when IMGSERVER_TOKEN is set)."},
    }

    @app.post("/jobs", status_code=202, dependencies=[Depends(authorized)],
              summary="Submit a job",
              responses={
                  202: {"model": StatusDocument, "description": "Accepted; the job is queued. "
                        "The Location header points at its status."},
                  200: {"model": StatusDocument, "description": "With wait=true: the job's "
                        "final status. With an Idempotency-Key used before: the status of the "
                        "job that key created (nothing new is created)."},
                  413: {"model": ErrorResponse, "description": "The body is over the limit."},
                  422: {"model": ErrorResponse, "description": "The request is invalid, or "
                        "its Idempotency-Key was used for another request; nothing was read "
                        "or written."},
                  503: {"model": ErrorResponse, "description": "The queue is full, the "
                        "server is stopping, or the outbox cannot store the request; nothing "
                        "was accepted. See Retry-After."},
                  **errors},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def submit_job(request: Request, wait: bool = Query(
            False, description="Wait for the job to finish and answer 200 with its final "
                               "status."),
            idempotency_key: str | None = Header(
                None, alias=IDEMPOTENCY_KEY, description=(
                    "1 to 255 visible ASCII characters. A request repeated with the same key "
                    "within 24 hours is answered with the job the first one created (200) "
                    "instead of creating another; the same key with another body is 422. "
                    "Makes a POST whose answer was lost safe to retry."))) -> JSONResponse:
        body = await _read_body(request, settings.max_body_bytes)
        created = True
        if idempotency_key is None:
            document = await run_in_threadpool(engine.submit, body, source="http")
        else:
            document, created = await run_in_threadpool(engine.submit_once, body,
                                                        idempotency_key, source="http")
        location = f"/jobs/{quote(document['id'])}"
        if not wait:
            return JSONResponse(document, status_code=202 if created else 200,
                                headers={"Location": location})
        document = await asyncio.wrap_future(engine.wait(document["id"]))
        return JSONResponse(document, status_code=200, headers={"Location": location})

    @app.get("/jobs", dependencies=[Depends(authorized)], summary="List jobs, newest first",
             responses={200: {"model": JobList},
                        422: {"model": ErrorResponse, "description": "A parameter is invalid."},
                        503: {"model": ErrorResponse, "description": "The job index is being "
                              "rebuilt (after it was lost or damaged). See Retry-After."},
                        **errors})
    async def list_jobs(
            state: str | None = Query(None, description="Only jobs in these states, "
                                      "comma-separated: " + ", ".join(STATES) + "."),
            source: str | None = Query(None, description="Only jobs from this source: "
                                       + ", ".join(SOURCES) + "."),
            limit: int = Query(50, ge=1, le=1000, description="Jobs per page."),
            cursor: str | None = Query(None, description="The `next` of the previous page.")
    ) -> JSONResponse:
        states = _states(state)
        if source is not None and source not in SOURCES:
            raise RequestError.single("source", f"{source!r} is not a source (expected one of "
                                                f"{', '.join(SOURCES)})")
        jobs, after = await run_in_threadpool(engine.jobs, states=states, source=source,
                                              limit=limit, cursor=cursor)
        return JSONResponse({"jobs": jobs, "next": after})

    @app.get("/jobs/{job_id}", dependencies=[Depends(authorized)], summary="A job's status",
             responses={200: {"model": StatusDocument},
                        404: {"model": ErrorResponse, "description": "No such job."}, **errors})
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(engine.status, job_id))

    @app.post("/jobs/{job_id}/cancel", status_code=202, dependencies=[Depends(authorized)],
              summary="Cancel a job",
              description="Images of the job that have not started never start; running "
                          "images finish and keep their outputs; then the job is `cancelled`. "
                          "The cancel is on disk before the answer: a restart does not resume "
                          "the job.",
              responses={
                  202: {"model": StatusDocument, "description": "Cancelled. The job is "
                        "`cancelled`, or still `running` until its running images finish."},
                  200: {"model": StatusDocument, "description": "The job was cancelled "
                        "before."},
                  404: {"model": ErrorResponse, "description": "No such job."},
                  409: {"model": StatusDocument, "description": "The job is done or failed "
                        "(or run by an 'imgserver run' process): its document."},
                  **errors})
    async def cancel_job(job_id: str) -> JSONResponse:
        document, before = await run_in_threadpool(engine.cancel, job_id)
        return JSONResponse(document, status_code=200 if before else 202)

    last_event_id = Header(None, alias="Last-Event-ID", description=(
        "The id of the last event received: the stream resumes after it, or starts with a "
        "fresh status when those events are no longer held."))
    streams: dict[int | str, dict[str, Any]] = {
        200: {"description": "Server-Sent Events; each event has an `id`, and an idle stream "
                             "gets a comment line every 15 s.",
              "content": {"text/event-stream": {"schema": {"type": "string"}, "example": (
                  'event: status\nid: 1764602000000001\ndata: {"id":"holiday",...}\n\n'
                  'event: image\nid: 1764602000000002\ndata: {"index":0,"image":{...},'
                  '"progress":{"done":1,"total":5}}\n\n')}}},
        401: _json_error("Missing or wrong bearer token (only when IMGSERVER_TOKEN is set)."),
    }

    @app.get("/jobs/{job_id}/events", dependencies=[Depends(authorized)],
             response_class=_EventStream, summary="Follow a job's events",
             description="`status` (the status document), then `image` when an image "
                         "finishes (`{index, image, progress}`), `state` when the job's state "
                         "changes (`{state, progress}`), and `end` (the final document), after "
                         "which the stream ends. A finished job's stream sends `status` and "
                         "`end` at once. A client that falls too far behind gets a fresh "
                         "`status`.",
             responses={**streams, 404: _json_error("No such job.")})
    async def job_events(job_id: str, last_event: str | None = last_event_id
                         ) -> EventSourceResponse:
        await run_in_threadpool(engine.status, job_id)  # 404 before the stream starts
        return EventSourceResponse(hub.job_stream(job_id, last_event), headers=_STREAM_HEADERS)

    @app.get("/events", dependencies=[Depends(authorized)], response_class=_EventStream,
             summary="Follow every job's events",
             description="The events of every job (`image`, `state`, `end`), each data object "
                         "carrying `job` (the id), and `job` (the summary) when a job is "
                         "accepted. Ids increase across the stream. A client that falls too far "
                         "behind is disconnected; one that resumes after events no longer held "
                         "gets a `status` event for each unfinished job.",
             responses=streams)
    async def all_events(last_event: str | None = last_event_id) -> EventSourceResponse:
        return EventSourceResponse(hub.all_streams(last_event), headers=_STREAM_HEADERS)

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

    app.include_router(files.router(engine, authorized, errors))
    page.add_routes(app)
    _add_docs(app)
    _add_error_handlers(app)
    app.add_middleware(Disconnects)
    return app


#: Streams must not be cached or buffered on the way (nginx reads the second header).
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EventStream(Response):
    """Documents a route's answer as ``text/event-stream``. (Declaring FastAPI's own
    EventSourceResponse would make FastAPI run the route as a generator of events, one write
    per event per client; the streams here write what gathered in one go, see streams.py.)"""

    media_type = "text/event-stream"


def _json_error(description: str) -> dict[str, Any]:
    """An error answer of a route whose success is not JSON (a stream): still JSON."""
    return {"description": description, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}


def _states(text: str | None) -> list[str]:
    """The states a ``state`` parameter names; RequestError naming it for a wrong one."""
    if text is None:
        return []
    states = [part.strip() for part in text.split(",")]
    wrong = [part for part in states if part not in STATES]
    if wrong:
        raise RequestError.single("state", f"{', '.join(map(repr, wrong))}: not a state "
                                           f"(expected one or more of {', '.join(STATES)}, "
                                           f"comma-separated)")
    return states


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge(declared, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def invalid(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": [
            {"field": p.field, "message": p.message} for p in exc.problems]}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own checks (query and path parameters), in the same shape as ours.
        problems = [Problem(".".join(str(part) for part in error["loc"][1:]) or error["loc"][0],
                            error["msg"]) for error in exc.errors()]
        return await invalid(request, RequestError(problems))

    @app.exception_handler(CapacityError)
    async def full(request: Request, exc: CapacityError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(JobNotFound)
    async def not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ImageError)
    async def not_shown(request: Request, exc: ImageError) -> JSONResponse:
        # A listed file that cannot be read or decoded (a thumbnail): nothing to show.
        return JSONResponse({"detail": f"cannot show it: {exc}"}, status_code=404)

    @app.exception_handler(JobConflict)
    async def conflict(request: Request, exc: JobConflict) -> JSONResponse:
        return JSONResponse(exc.document, status_code=409)

    @app.exception_handler(_BodyTooLarge)
    async def too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse({"detail": "a valid 'Authorization: Bearer <token>' header is "
                                       "required"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})


def _add_docs(app: FastAPI) -> None:
    """/docs from assets installed with the package, and the request model in the schema."""
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="imgserver API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
            # The default validator badge would call validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            # The body is read raw (one validator for every road); document it by its model.
            definitions = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.pop("$defs", {}))
            components["JobRequest"] = definitions
            _only_our_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _only_our_errors(schema: dict[str, Any]) -> None:
    """Document FastAPI's own 422 (a bad query or path parameter) as the API answers it.

    FastAPI describes it with its HTTPValidationError model; our handler answers it with
    ErrorResponse, like every other error, so that model is never sent.
    """
    reference = {"$ref": "#/components/schemas/ErrorResponse"}
    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        answer = operation.get("responses", {}).get("422")
        content = (answer or {}).get("content", {}).get("application/json", {})
        if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
            answer["description"] = "A parameter is invalid."
            content["schema"] = reference
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
