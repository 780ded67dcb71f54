"""The API's documentation: /docs served from assets installed with the package (it works
with no internet), and an OpenAPI schema that shows the request body and the errors as the
API really answers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from imgserver.http.schema import JobRequest
from imgserver.http.security import docs_policy

#: Swagger UI 5 (renders OpenAPI 3.1) as shipped by the fastapi-offline package.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def add_docs(app: FastAPI) -> None:
    """/docs from assets installed with the package, and the request model in the schema."""
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    page = bytes(get_swagger_ui_html(
        openapi_url="/openapi.json", title="imgserver API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon.png",
        # The default validator badge would call validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None}).body)
    headers = {"Content-Security-Policy": docs_policy(page.decode())}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

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
