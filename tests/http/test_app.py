"""The HTTP API's behaviour, through FastAPI's TestClient, on a real engine and pool."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from imgserver.executors.pool import LocalPool
from imgserver.http.app import ENGINE_CALLS, create_app
from imgserver.images.operations import Context, Operation, parse_operation
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

from conftest import CORPUS_LIMITS, INVALID_BODIES, job_files, request_body, wait_for


def client_for(settings: Settings, pool: LocalPool) -> Iterator[TestClient]:
    engine = Engine(settings, pool)
    engine.start()
    try:
        with TestClient(create_app(engine, settings)) as client:
            yield client
    finally:
        engine.close()


@pytest.fixture
def client(settings: Settings, pool: LocalPool) -> Iterator[TestClient]:
    yield from client_for(settings, pool)


def test_app_submit_then_poll(client: TestClient, root: Path,
                              make_image: Callable[..., Path]) -> None:
    make_image("a.png", 40, 30)
    response = client.post("/jobs", content=request_body([("a.png", "out/a.jpg")], ["resize=50"]))
    assert response.status_code == 202
    document = response.json()
    assert document["state"] == "queued" and document["source"] == "http"
    assert response.headers["location"] == f"/jobs/{document['id']}"
    assert (root / "outbox" / f"{document['id']}.request.json").exists()
    for _ in range(600):
        status = client.get(response.headers["location"]).json()
        if status["state"] == "done":
            break
    assert status["state"] == "done" and status["images"][0]["outputs"] == ["out/a.jpg"]


def test_app_wait_returns_final_document(client: TestClient,
                                         make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    response = client.post("/jobs?wait=true", content=request_body([("a.png", "b.png")]))
    assert response.status_code == 200
    assert response.json()["state"] == "done" and response.headers["location"].startswith("/jobs/")


@pytest.mark.parametrize("word, waits", [("yes", True), ("1", True), ("On", True),
                                         ("false", False), ("0", False), ("no", False)])
def test_app_wait_takes_the_words_of_a_boolean(client: TestClient, make_image: Callable[..., Path],
                                               word: str, waits: bool) -> None:
    make_image("a.png")
    response = client.post(f"/jobs?wait={word}", content=request_body([("a.png", "b.png")]))
    assert response.status_code == (200 if waits else 202)
    assert (response.json()["state"] == "done") is waits


def test_app_wait_that_is_no_boolean_is_422_naming_it_and_writes_nothing(
        client: TestClient, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    response = client.post("/jobs?wait=later", content=request_body([("a.png", "b.png")]))
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "wait", "message": "'later' is not a yes or no (expected true or false)"}]
    assert not list((root / "outbox").glob("*.request.json"))


class _SlowSubmits:
    """An engine whose submits wait for ``release``, as ones slow in their fsync would."""

    healthy, health_reason = True, None

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def submit(self, body: bytes, **_: object) -> dict:
        with self._lock:
            self.waiting += 1
        assert self.release.wait(30)
        return {"id": "slow", "state": "queued"}

    def status(self, job_id: str, view: str | None = None) -> dict:
        return {"id": job_id, "state": "done"}

    def subscribe(self, listener: object) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def snapshot(self, job_id: str) -> tuple[dict, int]:
        return self.status(job_id), 0

    def unfinished(self) -> list:
        return []


def test_app_slow_submits_do_not_hold_up_status_reads(settings: Settings) -> None:
    engine = _SlowSubmits()
    with TestClient(create_app(engine, settings)) as client:  # type: ignore[arg-type]
        slow = ENGINE_CALLS - 2  # more than asyncio's default executor has threads
        posts = [threading.Thread(target=client.post, args=("/jobs",), kwargs={
            "content": request_body([("a.png", "b.png")])}) for _ in range(slow)]
        try:
            for post in posts:
                post.start()
            wait_for(lambda: engine.waiting == slow, timeout=15)  # all in the engine at once
            assert client.get("/jobs/j1").json() == {"id": "j1", "state": "done"}
        finally:
            engine.release.set()
            for post in posts:
                post.join()


class _FinishedBeforeDurable(_SlowSubmits):
    """An engine whose job finishes at once, while its submit still syncs the request."""

    def submit(self, body: bytes, *, waiter: Future | None = None, **_: object) -> dict:
        assert waiter is not None
        waiter.set_result({"id": "quick", "state": "done"})
        assert self.release.wait(30)
        return {"id": "quick", "state": "queued"}


def test_app_wait_answers_only_once_the_request_is_durable(settings: Settings) -> None:
    engine = _FinishedBeforeDurable()
    with TestClient(create_app(engine, settings)) as client:  # type: ignore[arg-type]
        answers: list[int] = []
        post = threading.Thread(target=lambda: answers.append(client.post(
            "/jobs?wait=true", content=request_body([("a.png", "b.png")])).status_code))
        post.start()
        try:
            post.join(0.5)  # the job is finished, its submit is not: no answer yet
            assert answers == []
        finally:
            engine.release.set()
        post.join(30)
        assert answers == [200]


def test_app_wait_answers_when_served_without_its_lifespan(settings: Settings) -> None:
    engine = _FinishedBeforeDurable()
    engine.release.set()
    client = TestClient(create_app(engine, settings))  # type: ignore[arg-type]
    response = client.post("/jobs?wait=true", content=request_body([("a.png", "b.png")]))
    assert response.status_code == 200 and response.json()["state"] == "done"


def test_app_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/jobs/nope")
    assert response.status_code == 404 and response.json()["detail"] == "no job with id 'nope'"


@pytest.fixture
def corpus_client(root: Path, pool: LocalPool) -> Iterator[TestClient]:
    """A client of an app with the limits INVALID_BODIES is written for."""
    yield from client_for(Settings.build({"root": str(root), **CORPUS_LIMITS}, environ={}), pool)


@pytest.mark.parametrize("body, field", [(body, field) for _, body, field in INVALID_BODIES],
                         ids=[name for name, _, _ in INVALID_BODIES])
def test_app_invalid_request_is_422_and_writes_nothing(corpus_client: TestClient, root: Path,
                                                       body: bytes, field: str) -> None:
    response = corpus_client.post("/jobs", content=body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert field in [problem["field"] for problem in payload["errors"]]
    assert payload["detail"].startswith(payload["errors"][0]["field"] + ": ")
    assert job_files(root / "outbox") == []


def test_app_body_over_limit_is_413(root: Path, pool: LocalPool) -> None:
    settings = Settings.build({"root": str(root), "max_body_bytes": 100}, environ={})
    for client in client_for(settings, pool):
        response = client.post("/jobs", content=b"{" + b" " * 200 + b"}")
        assert response.status_code == 413
        assert "the limit is 100 bytes" in response.json()["detail"]


def test_app_too_many_images_is_422(root: Path, pool: LocalPool) -> None:
    settings = Settings.build({"root": str(root), "max_images": 2}, environ={})
    for client in client_for(settings, pool):
        body = request_body([("a.png", f"{i}.png") for i in range(3)])
        response = client.post("/jobs", content=body)
        assert response.status_code == 422
        assert "lists 3 images, the limit is 2" in response.json()["detail"]


def test_app_token_guards_every_job_route_but_not_health_docs_or_metrics(
        root: Path, pool: LocalPool, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    settings = Settings.build({"root": str(root)}, environ={"IMGSERVER_TOKEN": "s3cret"})
    for client in client_for(settings, pool):
        body = request_body([("a.png", "b.png")])
        assert client.post("/jobs", content=body).status_code == 401
        wrong = client.post("/jobs", content=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/jobs/x", headers={"Authorization": "Basic s3cret"}).status_code == 401
        good = client.post("/jobs", content=body, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 202
        job = client.get(good.headers["location"], headers={"Authorization": "bearer s3cret"})
        assert job.status_code == 200
        job_id = good.json()["id"]
        for method, path in [("GET", "/jobs"), ("POST", f"/jobs/{job_id}/cancel"),
                             ("GET", f"/jobs/{job_id}/events"), ("GET", "/events"),
                             ("GET", f"/jobs/{job_id}/images/0/thumbnail"),
                             ("GET", f"/jobs/{job_id}/images/0/file")]:
            assert client.request(method, path).status_code == 401, path
        for path in ("/healthz", "/docs", "/openapi.json", "/metrics", "/ui"):
            assert client.get(path).status_code == 200, path


def test_app_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_app_docs_work_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"(https?:)?//[a-z]", page.text), "the page must not load anything remote"
    assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert len(assets) >= 3
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    bundle = client.get("/docs-assets/swagger-ui-bundle.js").text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle)
    assert version and int(version.group(1)) >= 5  # Swagger UI 5 renders OpenAPI 3.1


def test_app_openapi_documents_request_and_status(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    post = schema["paths"]["/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/JobRequest")
    components = schema["components"]["schemas"]
    operations = components["JobRequest"]["properties"]["operations"]
    for kind in Operation.registry.values():  # every operation, with an example that works
        assert f"`{kind.example}` ({kind.name})" in operations["description"]
        assert re.fullmatch(operations["items"]["pattern"], kind.example), kind.example
        parse_operation(kind.example, Context(Path("/nonexistent-root")))
    assert set(components["StatusDocument"]["properties"]) >= {
        "id", "state", "source", "created_at", "progress", "error", "images"}
    assert {"202", "413", "422", "503"} <= set(post["responses"])


def test_app_openapi_documents_listing_cancel_keys_and_states(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/jobs"]) and "post" in paths["/jobs/{job_id}/cancel"]
    parameters = {p["name"] for p in paths["/jobs"]["get"]["parameters"]}
    assert parameters == {"state", "source", "limit", "cursor"}
    assert "Idempotency-Key" in {p["name"] for p in paths["/jobs"]["post"]["parameters"]}
    assert set(paths["/jobs/{job_id}/cancel"]["post"]["responses"]) >= {"200", "202", "404",
                                                                        "409"}
    components = schema["components"]["schemas"]
    assert "cancelled" in components["JobSummary"]["properties"]["state"]["enum"]
    assert "expires_at" in components["StatusDocument"]["properties"]
    assert "images" not in components["JobSummary"]["properties"]


def test_app_openapi_shows_only_the_error_shape_it_sends(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert not {"HTTPValidationError", "ValidationError"} & set(components)
    text = json.dumps(schema)
    for name in re.findall(r'"#/components/schemas/([^"]+)"', text):
        assert name in components, name  # every reference resolves
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                # /healthz says why it is unhealthy; a 409 to a cancel is the job's document.
                if code.startswith(("4", "5")) and path != "/healthz" and code != "409":
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
    # What the 422 of a bad parameter really is.
    reply = client.post("/jobs?wait=maybe", content=request_body([("a.png", "b.png")]))
    assert reply.status_code == 422 and set(reply.json()) == {"detail", "errors"}
    assert reply.json()["errors"][0]["field"] == "wait"


def answers_to_examples(schema: schemathesis.BaseSchema, operation: schemathesis.APIOperation
                        ) -> list[tuple[str, dict, object, int]]:
    """Call ``operation`` with each request schemathesis builds from the schema's examples
    (as a client's tooling builds them, filling what a field's example leaves out): the
    route, query, body and status of each."""
    # It also makes up the parameters that have no example (the opaque cursor; an
    # Idempotency-Key, which is refused when reused for another body): those are left out,
    # as a user trying the examples leaves them out.
    parameters = schema.raw_schema["paths"][operation.path][operation.method].get(
        "parameters", [])
    shown = {p["name"] for p in parameters
             if {"examples", "example", "default"} & (set(p) | set(p["schema"]))}
    answered = []
    for strategy in operation.get_strategies_from_examples():

        @given(strategy)
        @hypothesis.settings(max_examples=1, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            for values in (case.query, case.headers):
                for name in set(values or {}) - shown:
                    del values[name]
            reply = case.call()
            answered.append((f"{case.method} {case.path}", dict(case.query or {}), case.body,
                             reply.status_code))

        call()
    return answered


def test_app_openapi_examples_are_accepted_by_a_default_server(root: Path,
                                                               pool: LocalPool) -> None:
    # The default settings: no --notify-allow, so no notify URL is accepted.
    options = Settings.build({"root": str(root)}, environ={})
    engine = Engine(options, pool)
    engine.start()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(engine, options))
        answered = [answer for result in schema.get_all_operations()
                    for answer in answers_to_examples(schema, result.ok())]
        documented = schema.raw_schema["components"]["schemas"]["JobRequest"]["examples"]
    finally:
        engine.close()
    assert [answer for answer in answered if not 200 <= answer[-1] < 300] == []
    posted = [body for route, _, body, _ in answered if route == "POST /jobs"]
    assert len(documented) >= 3 and all(example in posted for example in documented)
    assert not any("notify" in body for body in posted if isinstance(body, dict))
    filters = [query for route, query, _, _ in answered if route == "GET /jobs"]
    assert {query.get("state") for query in filters} >= {"", "queued,running"}


def test_app_jobs_listing_filters_follow_the_schema(client: TestClient,
                                                     make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    assert client.post("/jobs?wait=true", content=request_body([("a.png", "b.png")])
                       ).status_code == 200
    every = client.get("/jobs").json()
    assert len(every["jobs"]) == 1
    # Empty is no filter, as a form sends it (and as an empty cursor is the first page).
    for query in ("state=", "state=%20%20", "source=", "state=&source=", "cursor="):
        reply = client.get(f"/jobs?{query}")
        assert (reply.status_code, reply.json()) == (200, every), query
    assert client.get("/jobs?state=done,%20failed&source=http").json() == every
    refused = client.get("/jobs?state=done,")
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "state"
    assert "'': not a state" in refused.json()["detail"]

    parameters = {p["name"]: p for p in
                  client.get("/openapi.json").json()["paths"]["/jobs"]["get"]["parameters"]}
    patterns = {name: re.compile(parameters[name]["schema"]["pattern"]) for name in
                ("state", "source")}
    for name in ("state", "source"):
        assert "Empty: every job" in parameters[name]["description"]
    texts = st.text(st.sampled_from("queudrningflcahtpbox ,\t\n"), max_size=24)
    # Whatever the value, the server accepts it exactly when the schema's pattern allows it.
    values = st.sampled_from(["state", "source"]).flatmap(lambda name: st.tuples(
        st.just(name), texts | st.from_regex(patterns[name], fullmatch=True)))

    @given(values)
    @hypothesis.settings(max_examples=150, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    def check(value: tuple[str, str]) -> None:
        name, text = value
        reply = client.get("/jobs", params={name: text})
        allowed = patterns[name].fullmatch(text) is not None
        assert reply.status_code == (200 if allowed else 422), (name, text, reply.text)

    check()


def test_app_answers_echoing_a_lone_surrogate_are_ascii_json(client: TestClient) -> None:
    # split takes any value, so this request is valid and its operations are echoed.
    accepted = client.post("/jobs", content=b'{"images": [{"input": "a.png", "output": '
                                            b'"b.png"}], "operations": ["split=\\ud800"]}')
    refused = client.post("/jobs", content=b'{"images": [{"input": "a.png", "output": '
                                           b'"b.png"}], "operations": ["\\udfff"]}')
    assert (accepted.status_code, refused.status_code) == (202, 422)
    assert accepted.content.isascii() and refused.content.isascii()
    assert accepted.json()["operations"] == ["split=\ud800"]
    assert refused.json()["errors"][0]["message"].startswith("\udfff: unknown operation")
