"""The routes of jobs: submit, list, status, cancel, and their event streams.

    POST /jobs[?wait=true]   202 + status document + Location (200 with wait=true);
                             with Idempotency-Key, a repeat answers 200 with the first job
    GET  /jobs               200 a page of job summaries, newest first, and the next cursor
    GET  /jobs/{id}          200 status document, 404 unknown
    POST /jobs/{id}/cancel   202 cancelled now, 200 cancelled before, 409 finished, 404
    GET  /jobs/{id}/events   Server-Sent Events of one job: status, image, state, end
    GET  /events             Server-Sent Events of every job (and job, when one is accepted)

Engine calls that touch the disk run in a thread (``asyncio.to_thread``: the loop's own
executor, a plain hand-off that costs the loop half of what Starlette's thread pool does),
and ``wait=true`` awaits the engine's future: the event loop never blocks. A
``wait=true`` submit without an Idempotency-Key hands its call to that executor and awaits
only the future, which the thread fails if the request is refused: the loop wakes once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request

from imgserver.access.principal import Principal
from imgserver.errors import RequestError
from imgserver.http.auth import Auth
from imgserver.http.errors import BodyTooLarge
from imgserver.http.eventstream import EventStreamResponse
from imgserver.http.responses import EventStream, JSONResponse, json_error
from imgserver.http.schema import ErrorResponse, JobList, StatusDocument
from imgserver.http.streams import EventHub
from imgserver.jobs.engine import Engine
from imgserver.jobs.entry import tell
from imgserver.jobs.job import SOURCES, STATES, Owner
from imgserver.jobs.keys import HEADER as IDEMPOTENCY_KEY
from imgserver.jobs.keys import PATTERN as KEY_PATTERN
from imgserver.settings import Settings

#: What the ``state`` and ``source`` parameters of GET /jobs may be, as the schema says it:
#: exactly what ``_states`` and ``list_jobs`` accept.
_STATE = "(?:" + "|".join(STATES) + ")"
STATE_PATTERN = f"^ *(?:{_STATE} *(?:, *{_STATE} *)*)?$"
SOURCE_PATTERN = "^(?:" + "|".join(SOURCES) + ")?$"


def router(engine: Engine, hub: EventHub, settings: Settings, auth: Auth) -> APIRouter:
    """The routes of ``engine``'s jobs and ``hub``'s event streams, each asking ``auth`` for
    the scope it needs; a principal with a folder sees only that folder's jobs."""
    routes = APIRouter()
    errors = auth.errors
    reader, submitter, canceller = auth.need("read"), auth.need("submit"), auth.need("cancel")

    @routes.post("/jobs", status_code=202,
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
                 openapi_extra={"parameters": _SUBMIT_PARAMETERS, "requestBody": {
                     "required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def submit_job(request: Request) -> JSONResponse:
        # The parameters are read here rather than declared (they are documented above):
        # FastAPI's resolution of declared ones took a sixth of the route's time for a
        # one-image job. The order of the checks is FastAPI's: the token, then them.
        principal = await submitter(request)
        wait = _flag("wait", request.query_params.get("wait"))
        idempotency_key = request.headers.get(IDEMPOTENCY_KEY)
        body = await _read_body(request, settings.max_body_bytes)
        created = True
        owner = principal.owner
        # Attached as the job is accepted: a short job may end before the answer is sent.
        waiter: Future | None = Future() if wait else None
        if waiter is not None and idempotency_key is None:
            # The submit's outcome, accepted or refused, comes through the waiter: the loop
            # is woken once, with the answer, instead of once more between. The waiter is
            # told only after the submit returned: the request is durable by then.
            calls = getattr(request.app.state, "calls", None)
            if calls is not None:
                calls.submit(_submit_into, engine, body, owner, waiter)
            else:  # served without its lifespan: the loop's executor, which wakes it once more
                asyncio.get_running_loop().run_in_executor(None, _submit_into, engine, body,
                                                           owner, waiter)
            document = await asyncio.wrap_future(waiter)
            return JSONResponse(document, status_code=200,
                                headers={"Location": f"/jobs/{quote(document['id'])}"})
        if idempotency_key is None:
            document = await asyncio.to_thread(engine.submit, body, source="http",
                                               owner=owner, waiter=waiter)
        else:
            document, created = await asyncio.to_thread(engine.submit_once, body,
                                                        idempotency_key, source="http",
                                                        owner=owner, waiter=waiter)
        location = f"/jobs/{quote(document['id'])}"
        if waiter is None:
            return JSONResponse(document, status_code=202 if created else 200,
                                headers={"Location": location})
        if not created:  # an earlier request's job, which may have ended long ago
            waiter = engine.wait(document["id"])
        document = await asyncio.wrap_future(waiter)
        return JSONResponse(document, status_code=200, headers={"Location": location})

    @routes.get("/jobs", summary="List jobs, newest first",
             responses={200: {"model": JobList},
                        422: {"model": ErrorResponse, "description": "A parameter is invalid."},
                        503: {"model": ErrorResponse, "description": "The job index is being "
                              "rebuilt (after it was lost or damaged). See Retry-After."},
                        **errors})
    async def list_jobs(
            state: str | None = Query(
                None, description="Only jobs in these states, comma-separated (spaces around "
                "each are ignored): " + ", ".join(STATES) + ". Empty: every job, as without "
                "it.", json_schema_extra={"pattern": STATE_PATTERN},
                openapi_examples={
                    "unfinished": {"summary": "jobs queued or running",
                                   "value": "queued,running"},
                    "every": {"summary": "every job (empty: no filter)", "value": ""}}),
            source: str | None = Query(
                None, description="Only jobs from this source: " + ", ".join(SOURCES)
                + ". Empty: every job, as without it.",
                json_schema_extra={"pattern": SOURCE_PATTERN},
                openapi_examples={"http": {"summary": "jobs submitted over HTTP",
                                           "value": "http"}}),
            limit: int = Query(50, ge=1, le=1000, description="Jobs per page."),
            cursor: str | None = Query(None, description="The `next` of the previous page."),
            principal: Principal = Depends(reader)) -> JSONResponse:
        states = _states(state)
        if source == "":
            source = None  # an empty filter, as a form sends it: every job
        if source is not None and source not in SOURCES:
            raise RequestError.single("source", f"{source!r} is not a source (expected one of "
                                                f"{', '.join(SOURCES)})")
        jobs, after = await asyncio.to_thread(engine.jobs, states=states, source=source,
                                              limit=limit, cursor=cursor,
                                              view=principal.view)
        return JSONResponse({"jobs": jobs, "next": after})

    @routes.get("/jobs/{job_id}", summary="A job's status",
             responses={200: {"model": StatusDocument},
                        404: {"model": ErrorResponse, "description": "No such job."}, **errors})
    async def get_job(job_id: str, principal: Principal = Depends(reader)) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(engine.status, job_id, principal.view))

    @routes.post("/jobs/{job_id}/cancel", status_code=202,
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
    async def cancel_job(job_id: str, principal: Principal = Depends(canceller)
                         ) -> JSONResponse:
        document, before = await asyncio.to_thread(engine.cancel, job_id, principal.view)
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
        401: json_error("No token, or one the server does not know (when it needs tokens)."),
        403: json_error("The token lacks the 'read' scope."),
        429: json_error("The token is over its rate. See Retry-After."),
        503: json_error("Too many event streams are open (--max-streams). See Retry-After."),
    }

    @routes.get("/jobs/{job_id}/events",
             response_class=EventStream, summary="Follow a job's events",
             description="`status` (the status document), then `image` when an image "
                         "finishes (`{index, image, progress}`), `state` when the job's state "
                         "changes (`{state, progress}`), and `end` (the final document), after "
                         "which the stream ends. A finished job's stream sends `status` and "
                         "`end` at once. A client that falls too far behind gets a fresh "
                         "`status`.",
             responses={**streams, 404: json_error("No such job.")})
    async def job_events(job_id: str, last_event: str | None = last_event_id,
                         principal: Principal = Depends(reader)) -> EventStreamResponse:
        # 404 before the stream starts, also for a job of another folder.
        await asyncio.to_thread(engine.status, job_id, principal.view)
        return EventStreamResponse(hub, hub.open(job_id, last_event))

    @routes.get("/events", response_class=EventStream,
             summary="Follow every job's events",
             description="The events of every job (`image`, `state`, `end`), each data object "
                         "carrying `job` (the id), and `job` (the summary) when a job is "
                         "accepted. Ids increase across the stream. A client that falls too far "
                         "behind is disconnected; one that resumes after events no longer held "
                         "gets a `status` event for each unfinished job.",
             responses=streams)
    async def all_events(last_event: str | None = last_event_id,
                         principal: Principal = Depends(reader)) -> EventStreamResponse:
        return EventStreamResponse(hub, hub.open(None, last_event, principal.view))

    return routes


#: The query and header parameters of ``POST /jobs``, as the schema shows them.
_SUBMIT_PARAMETERS = [
    {"name": "wait", "in": "query", "required": False,
     "schema": {"type": "boolean", "default": False, "title": "Wait"},
     "description": "Wait for the job to finish and answer 200 with its final status."},
    {"name": IDEMPOTENCY_KEY, "in": "header", "required": False,
     "schema": {"type": "string", "pattern": KEY_PATTERN, "title": IDEMPOTENCY_KEY},
     "description": "1 to 255 visible ASCII characters. A request repeated with the same key "
                    "within 24 hours is answered with the job the first one created (200) "
                    "instead of creating another; the same key with another body is 422. "
                    "Makes a POST whose answer was lost safe to retry."},
]
#: What a yes-or-no parameter may say (as FastAPI's declared booleans take it).
_YES = frozenset({"1", "on", "t", "true", "y", "yes"})
_NO = frozenset({"0", "off", "f", "false", "n", "no"})


def _submit_into(engine: Engine, body: bytes, owner: Owner, answer: Future) -> None:
    """Submit ``body`` for ``owner``; ``answer`` receives the job's final status document
    once the job is finished and its request durable (``submit`` has returned), or the
    error that refused it (a thread's call: its outcome is the answer's)."""
    finished: Future = Future()
    try:
        engine.submit(body, source="http", owner=owner, waiter=finished)
    except BaseException as exc:  # nothing was accepted: the error is the answer
        tell(answer, error=exc)  # unless the route gave up waiting
        return
    # A short job may have finished before its request was synced: only now may it be told.
    finished.add_done_callback(lambda done: _pass_on(done, answer))


def _pass_on(source: Future, target: Future) -> None:
    """Give ``target`` the outcome of ``source`` (done), unless it was given up on."""
    error = source.exception()
    tell(target, None if error is not None else source.result(), error)


def _flag(name: str, text: str | None) -> bool:
    """The yes-or-no parameter ``name`` (absent: no); RequestError naming it otherwise."""
    if text is None:
        return False
    word = text.lower()
    if word in _YES or word in _NO:
        return word in _YES
    raise RequestError.single(name, f"{text!r} is not a yes or no (expected true or false)")


def _states(text: str | None) -> list[str]:
    """The states a ``state`` parameter names (none: every job, also when it is empty or
    spaces); RequestError naming it for a wrong one."""
    if text is None or not text.strip(" "):
        return []
    states = [part.strip(" ") for part in text.split(",")]
    wrong = [part for part in states if part not in STATES]
    if wrong:
        raise RequestError.single("state", f"{', '.join(map(repr, wrong))}: not a state "
                                           f"(expected one or more of {', '.join(STATES)}, "
                                           f"comma-separated)")
    return states


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(declared, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


