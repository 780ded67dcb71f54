"""The HTTP API's behaviour, through FastAPI's TestClient, on a real engine and pool."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imgserver.executors.pool import LocalPool
from imgserver.http.app import create_app
from imgserver.images.operations import Context, Operation, parse_operation
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

from conftest import CORPUS_LIMITS, INVALID_BODIES, job_files, request_body


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
