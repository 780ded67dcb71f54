"""Schemathesis against the server's own OpenAPI schema: no 5xx, every rejection explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import positive_data_acceptance

from imgserver.executors.pool import LocalPool
from imgserver.http.app import create_app
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings


def check(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code == 409:  # cancel of a finished job: its status document
        assert response.json()["state"] in ("done", "failed"), response.text
    elif response.status_code >= 400:
        assert response.json()["detail"], response.text
    if response.status_code == 422:
        errors = response.json()["errors"]
        assert errors and all(e["field"] and e["message"] for e in errors)
    # The schema cannot say which paths lie inside the root or which numbers are in range,
    # so schema-valid data may rightly be refused (422): that one check does not apply.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_api_follows_its_schema(root: Path, pool: LocalPool, mode: str) -> None:
    options = Settings.build({"root": str(root), "max_images": 20}, environ={})
    engine = Engine(options, pool)
    engine.start()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(engine, options))
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} == {
            "POST /jobs", "GET /jobs", "GET /jobs/{job_id}", "POST /jobs/{job_id}/cancel",
            "GET /jobs/{job_id}/events", "GET /events", "GET /jobs/{job_id}/images/{index}/file",
            "GET /jobs/{job_id}/images/{index}/thumbnail", "GET /metrics", "GET /healthz"}
        for operation in operations:
            if operation.path == "/events":
                continue  # a stream that never ends; tests/http/test_streams.py covers it
            strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

            @given(strategy)
            @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            def run(case: schemathesis.Case) -> None:
                check(case)

            try:
                run()
            except Unsatisfiable:
                # Routes that take nothing a schema can call invalid (/healthz, /metrics...).
                assert mode == "negative" and operation.path != "/jobs"
    finally:
        engine.close()
