"""Typed models of the HTTP API's bodies, for its OpenAPI schema and its /docs page.

Requests are validated by ``imgserver.jobs.request`` (the one place every road shares); these
models describe the same documents so that the schema documents every field and the grammar
of each operation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imgserver.images.operations import Operation


def _operations_help() -> str:
    """Every operation the server knows, each with what it does and an example."""
    lines = "\n".join(f"- `{kind.example}` ({kind.name}): {kind.summary}."
                       for kind in Operation.registry.values())
    return ("Applied in order to every image; after a split, to every tile. Grammar "
            "`name=value`; whitespace around the name, the value and each part of a value "
            "is ignored. Sizes are whole pixels, 1 to 100000. The server checks every value "
            "and answers 422 naming `operations[i]` and what was expected:\n\n" + lines)


OPERATIONS_HELP = _operations_help()
#: The operation grammar as a regular expression: a known name, then its value (whose form
#: and range the server checks).
OPERATION_PATTERN = (r"^\s*(?:" + "|".join(Operation.registry) + r")\s*(?:=.*)?$")
OUTPUT_PATTERN = (r"\.(?:[jJ][pP][eE]?[gG]|[pP][nN][gG]|[wW][eE][bB][pP]|[tT][iI][fF][fF]?"
                  r"|[bB][mM][pP]|[aA][vV][iI][fF])$")


def _string_not_null(schema: dict[str, Any]) -> None:
    """The schema of an optional key that, when present, must be a string: the server takes
    the key's absence, not null, for "none", so the schema shows neither null nor a default."""
    schema.pop("default", None)
    for branch in schema.pop("anyOf", []):
        if branch.get("type") != "null":
            schema.update(branch)


class ImageRequest(BaseModel):
    """One image to process."""

    model_config = ConfigDict(extra="forbid")

    # Examples are whole requests, on JobRequest only: a tool that builds a request from the
    # examples of its fields (schemathesis does) fills the other fields, notify among them,
    # with values of its own, which a server refuses.
    input: str = Field(min_length=1, description="Input path, relative to the server's root "
                                                 "(or absolute inside it).")
    output: str = Field(min_length=1, pattern=OUTPUT_PATTERN,
                        description="Output path inside the root; its extension picks the "
                                    "format: .jpg .jpeg .png .webp .avif .tif .tiff .bmp.")


class JobRequest(BaseModel):
    """A request: images and the operations applied to each of them."""

    # Each one is accepted by a server with the default settings (tests/http/test_app.py).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": [{"input": "photos/cat.jpg", "output": "thumbs/cat.webp"},
                    {"input": "photos/dog.jpg", "output": "thumbs/dog.webp"}],
         "operations": ["fit=400x400", "sharpen=0.8,0.5", "quality=80"]},
        {"images": [{"input": "photos/cat.jpg", "output": "squares/cat.jpg"}],
         "operations": ["fill=200x200,smart", "grayscale"]},
        {"images": [{"input": "photos/cat.jpg", "output": "tiles/cat.png"}],
         "operations": ["resize=50", "split=True", "blur=5,1.5"]}]})

    images: list[ImageRequest] = Field(min_length=1, description="One or more images.")
    operations: list[Annotated[str, Field(pattern=OPERATION_PATTERN)]] = Field(
        description=OPERATIONS_HELP)
    # No example value: a server accepts a notify URL only under its --notify-allow prefixes,
    # of which there are none by default, so any example would be refused (422).
    notify: str | None = Field(
        None, pattern=r"^https?://", json_schema_extra=_string_not_null, description=(
            "A URL to tell when the job is finished: a signed webhook (Standard Webhooks v1), "
            "retried for about 28 hours until it is answered 2xx. Accepted only under one "
            "of the server's --notify-allow prefixes, of which there are none by default, "
            "matched on the URL's boundaries: the same scheme, host and port, and the path "
            "by whole segments once dot segments are resolved; no credentials. "
            "`https://hooks.example.com/imgserver` needs `--notify-allow "
            "https://hooks.example.com/`; otherwise 422. Leave it out for no webhook."))


State = Literal["queued", "running", "done", "failed", "cancelled"]
Source = Literal["http", "inbox", "cli"]


class ImageStatusModel(BaseModel):
    """Where one image of a job stands."""

    input: str
    output: str
    state: State = Field(description="`cancelled`: the job was cancelled before the image "
                                     "started; it never runs.")
    outputs: list[str] = Field(description="Files written, relative to the root.")
    error: str | None = Field(description="Why the image failed, or null.")


class Progress(BaseModel):
    """Images finished (done or failed) out of the total."""

    done: int
    total: int


class NotificationModel(BaseModel):
    """A completion webhook of the job and how its delivery goes."""

    url: str = Field(description="Where it goes (without credentials).")
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None = Field(description="What went wrong with the last attempt.")
    next_attempt_at: str | None = Field(description="When the next attempt is due (ISO-8601), "
                                                    "while pending after a failed attempt.")


class JobSummary(BaseModel):
    """A job's status without its images (what a listing shows)."""

    id: str
    state: State = Field(description="queued -> running -> done (every image succeeded), "
                                     "failed (the request was invalid, or an image failed) or "
                                     "cancelled (POST /jobs/{id}/cancel).")
    source: Source
    created_at: str = Field(description="ISO-8601, UTC.")
    started_at: str | None
    finished_at: str | None
    expires_at: str | None = Field(description="When the job's request and status files are "
                                               "removed (--keep-finished); null while it runs "
                                               "or when finished jobs are kept for ever. "
                                               "Outputs are never removed.")
    operations: list[str]
    progress: Progress = Field(description="Images finished (done or failed) of the total; "
                                           "cancelled images are not counted as finished.")
    error: str | None = Field(description="Why the job failed as a whole, a summary such as "
                                          "'2 of 10 images failed', or 'cancelled: 7 of 10 "
                                          "images not run'; null when done or unfinished.")
    notifications: list[NotificationModel] = Field(
        description="Its completion webhooks (--notify-url, the request's notify).")


class StatusDocument(JobSummary):
    """A job's status: the same JSON as its status file OUTBOX/<id>.status.json."""

    images: list[ImageStatusModel]


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobSummary]
    next: str | None = Field(description="The cursor of the next page (pass it as `cursor`); "
                                         "null on the last page.")


class FieldProblem(BaseModel):
    """One reason a request is invalid."""

    field: str = Field(examples=["operations[1]"])
    message: str = Field(examples=["resize=150: scaling factor must be in (0.05, 100]"])


class ErrorResponse(BaseModel):
    """An error: what went wrong, and for an invalid request every field at fault."""

    detail: str
    errors: list[FieldProblem] | None = None


class Health(BaseModel):
    """Whether the server can take work."""

    status: Literal["ok", "unavailable"]
    reason: str | None = None
