"""The HTTP API (FastAPI): a thin edge over the job engine.

    POST /jobs[?wait=true]   202 + status document + Location (200 with wait=true)
    GET  /jobs/{id}          200 status document, 404 unknown
    GET  /healthz            200 {"status": "ok"} while the server can take work, else 503
    GET  /docs, /openapi.json  the API's documentation, served without internet

The engine's errors become status codes here and nowhere else: RequestError 422,
CapacityError 503 with Retry-After, JobNotFound 404; a body over the limit is 413. Engine
calls that touch the disk run in a worker thread, and ``wait=true`` awaits the engine's
future: the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fastapi_offline
from fastapi import Depends, FastAPI, Query, Request, responses
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from imgserver import __version__
from imgserver.connection import Disconnects
from imgserver.engine import Engine
from imgserver.errors import CapacityError, JobNotFound, Problem, RequestError
from imgserver.schema import ErrorResponse, Health, JobRequest, StatusDocument
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
    """The FastAPI application serving ``engine``."""
    app = FastAPI(
        title="imgserver", version=__version__,
        description="Resize, split and blur images on this machine. Submit a job, then poll "
                    "its status or wait for it. Paths are resolved against the server's root.",
        docs_url=None, redoc_url=None)

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
                        "final status."},
                  413: {"model": ErrorResponse, "description": "The body is over the limit."},
                  422: {"model": ErrorResponse, "description": "The request is invalid; "
                        "nothing was read or written."},
                  503: {"model": ErrorResponse, "description": "The queue is full, the "
                        "server is stopping, or the outbox cannot store the request; nothing "
                        "was accepted. See Retry-After."},
                  **errors},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def submit_job(request: Request, wait: bool = Query(
            False, description="Wait for the job to finish and answer 200 with its final "
                               "status.")) -> JSONResponse:
        body = await _read_body(request, settings.max_body_bytes)
        document = await run_in_threadpool(engine.submit, body, source="http")
        location = f"/jobs/{quote(document['id'])}"
        if not wait:
            return JSONResponse(document, status_code=202, headers={"Location": location})
        document = await asyncio.wrap_future(engine.wait(document["id"]))
        return JSONResponse(document, status_code=200, headers={"Location": location})

    @app.get("/jobs/{job_id}", dependencies=[Depends(authorized)], summary="A job's status",
             responses={200: {"model": StatusDocument},
                        404: {"model": ErrorResponse, "description": "No such job."}, **errors})
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(engine.status, job_id))

    @app.get("/healthz", summary="Whether the server can take work",
             responses={200: {"model": Health}, 503: {"model": Health}})
    async def healthz() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": engine.health_reason},
                            status_code=503)

    _add_docs(app)
    _add_error_handlers(app)
    app.add_middleware(Disconnects)
    return app


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
