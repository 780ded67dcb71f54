"""The answers every route gives: ASCII JSON, and event streams as the schema shows them."""

from __future__ import annotations

import json
from typing import Any

from fastapi import responses

#: Streams must not be cached or buffered on the way (nginx reads the second header).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class JSONResponse(responses.JSONResponse):
    """JSON written in ASCII: paths and operations are echoed as written, and one may hold a
    lone surrogate (JSON's ``"\\ud800"``, or a file name that is not UTF-8), which UTF-8
    cannot encode; ``\\u`` escapes can."""

    def render(self, content: Any) -> bytes:
        """The body, as compact ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


class EventStream(responses.Response):
    """Documents a route's answer as ``text/event-stream``. (Declaring FastAPI's own
    EventSourceResponse would make FastAPI run the route as a generator of events, one write
    per event per client; the streams here write what gathered in one go, see streams.py.)"""

    media_type = "text/event-stream"


def json_error(description: str) -> dict[str, Any]:
    """An error answer of a route whose success is not JSON (a stream): still JSON."""
    return {"description": description, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
