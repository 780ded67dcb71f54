"""Who is asking, over HTTP: every route that reads, submits or cancels asks the gate for
the request's principal and for the scope it needs (``imgserver.access``), through one
dependency per scope. ``/healthz``, ``/docs``, ``/openapi.json`` and ``/metrics`` ask
nothing.

The principal is left in the request's scope, so that the access log names its token
(never its secret); a refusal (401, 403, 429) is one INFO line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from imgserver.access.gate import Gate
from imgserver.access.principal import Principal
from imgserver.errors import AccessDenied
from imgserver.http.schema import ErrorResponse

logger = logging.getLogger("imgserver.http")

#: Where a request's principal is left in its scope (for the access log).
PRINCIPAL = "imgserver.principal"


class Auth:
    """The dependencies that authenticate a request and check its scope."""

    def __init__(self, gate: Gate) -> None:
        """Checks by ``gate``."""
        self.gate = gate
        #: The answers a protected route may give, for the schema.
        self.errors: dict[int | str, dict[str, Any]] = {
            401: {"model": ErrorResponse, "description": "No token, or one the server does "
                                                          "not know (when it needs tokens)."},
            403: {"model": ErrorResponse, "description": "The token lacks the scope this "
                                                          "needs (named in the answer)."},
            429: {"model": ErrorResponse, "description": "The token is over its rate (see "
                                                          "Retry-After)."},
        }

    def need(self, scope: str) -> Callable[[Request], Awaitable[Principal]]:
        """A dependency: the request's principal, if it has ``scope`` (and room in its
        rate); AccessDenied otherwise."""
        async def principal(request: Request) -> Principal:
            try:
                found = self.gate.principal(request.headers.get("authorization"))
                request.scope[PRINCIPAL] = found
                self.gate.admit(found, scope)
            except AccessDenied as refused:
                client = request.client
                known = request.scope.get(PRINCIPAL)
                logger.info("refused %s %s from %s (%s): %s", request.method,
                            request.url.path, f"{client.host}:{client.port}" if client
                            else "a client", known.describe() if known else "no token",
                            refused)
                raise
            return found

        return principal


class AccessLog:
    """ASGI middleware: one INFO line per answer, naming the request's token (or none)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        """Pass the request on; log its answer's status when it starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                client = scope.get("client")
                query = scope.get("query_string", b"").decode("latin-1")
                principal = scope.get(PRINCIPAL)
                logger.info('%s "%s %s%s" %d %s',
                            f"{client[0]}:{client[1]}" if client else "-", scope["method"],
                            scope["path"], "?" + query if query else "", message["status"],
                            principal.describe() if isinstance(principal, Principal)
                            else "no token")
            await send(message)

        await self.app(scope, receive, sending)
