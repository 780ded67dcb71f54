"""Errors become status codes here, and nowhere else.

    RequestError (and FastAPI's own parameter checks)  422, naming each field
    CapacityError                                      503 with Retry-After
    JobNotFound, ImageError (a file not shown)         404
    JobConflict                                        409 with the job's document
    BodyTooLarge                                       413
    Unauthorized                                       401 with WWW-Authenticate
    Forbidden                                          403, naming the scope
    TooManyRequests                                    429 with Retry-After
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from imgserver.errors import (
    CapacityError,
    Forbidden,
    ImageError,
    JobConflict,
    JobNotFound,
    Problem,
    RequestError,
    TooManyRequests,
    Unauthorized,
)
from imgserver.http.responses import JSONResponse


class BodyTooLarge(Exception):
    """A request body over ``--max-body-bytes``."""

    def __init__(self, size: str, limit: int) -> None:
        super().__init__(f"request body is {size} bytes, the limit is {limit} bytes "
                         f"(--max-body-bytes)")


def add_error_handlers(app: FastAPI) -> None:
    """Answer each of imgserver's errors with its status code and a JSON body."""
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

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "scope": exc.scope}, status_code=403)

    @app.exception_handler(TooManyRequests)
    async def too_many(request: Request, exc: TooManyRequests) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})
