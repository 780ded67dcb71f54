"""The answers every route gives: ASCII JSON, and event streams as the schema shows them."""

from __future__ import annotations

import json
from typing import Any

from fastapi import responses


class JSONResponse(responses.JSONResponse):
    """JSON written in ASCII: paths and operations are echoed as written, and one may hold a
    lone surrogate (JSON's ``"\\ud800"``, or a file name that is not UTF-8), which UTF-8
    cannot encode; ``\\u`` escapes can."""

    def render(self, content: Any) -> bytes:
        """The body, as compact ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


class EventStream(responses.Response):
    """Documents a route's answer as ``text/event-stream`` (what it returns is an
    ``imgserver.http.eventstream.EventStreamResponse``)."""

    media_type = "text/event-stream"


def json_error(description: str) -> dict[str, Any]:
    """An error answer of a route whose success is not JSON (a stream): still JSON."""
    return {"description": description, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
