"""The API's own description: the OpenAPI 3.1 document and Swagger UI (both public)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, render_template

from routes.common import services
from routes.operations import operation
from utils.openapi import Operation, RuntimeLimit, build_document, with_runtime_limits
from utils.schemas import OpenApiDocument
from utils.services import Services

bp = Blueprint("docs", __name__)
TITLE = "Quadra"
DESCRIPTION = (
    "Serve a PyTorch model in production and govern it: predictions, a version registry with "
    "integrity checks, monitoring and drift, modes, training jobs, API keys, tokens and audit.\n\n"
    "Authenticate with an API key in the `X-API-Key` header, or with a JWT from "
    "`POST /api/auth/token` as `Authorization: Bearer`. Permissions rank read < write < admin. "
    'Every error is `{"error": {"code": "...", "message": "..."}}`.'
)
# Swagger UI sets style attributes at run time; scripts still come only from this origin.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# Views registered outside the blueprints, documented here.
OTHER_VIEWS = {
    "metrics": Operation("Prometheus metrics", media_type="text/plain"),
    "dashboard.dashboard": Operation("The operator dashboard (HTML)", media_type="text/html"),
}


def describe_other_views(app: Flask) -> None:
    """Attach the operations of `OTHER_VIEWS` to those views (call after registering them)."""
    for endpoint, spec in OTHER_VIEWS.items():
        app.view_functions[endpoint].openapi_operation = spec  # type: ignore[union-attr]


@bp.get("/api/openapi.json")
@operation("This OpenAPI document", response=OpenApiDocument)
def openapi_document() -> OpenApiDocument:
    """Generated from the schemas that validate the requests, so it cannot drift from them, and
    narrowed by this process's settings and serving model (a row's width, the largest batch, a
    token's longest lifetime), which the server checks too."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    document = app.extensions.get("quadra_openapi")
    if document is None:
        document = app.extensions["quadra_openapi"] = build_document(
            app, app.extensions["quadra_security"].request_limits.applies_to, TITLE, DESCRIPTION)
    return OpenApiDocument.model_validate(with_runtime_limits(document, runtime_limits(services())))


def runtime_limits(svc: Services) -> list[RuntimeLimit]:
    """What the server enforces beyond the static schemas."""
    settings = svc.settings
    limits = [
        RuntimeLimit("TokenRequest", ("expires_in",), {"maximum": settings.jwt_max_ttl_seconds}),
        RuntimeLimit("PredictRequest", ("inputs",), {"maxItems": settings.max_batch_size}),
        RuntimeLimit("TrainingData", ("features",), {"maxItems": settings.training_max_rows}),
    ]
    served = svc.model_server.current
    if served is not None:
        width = {"minItems": served.input_dim, "maxItems": served.input_dim}
        limits.append(RuntimeLimit("PredictRequest", ("inputs", "items"), width))
    return limits


@bp.get("/api/docs")
@operation("Swagger UI for this API (HTML)", media_type="text/html")
def swagger_ui() -> Any:
    """Browse and try every operation; the page's assets come from the swagger-ui-dist npm package."""
    response = current_app.make_response(render_template("docs.html"))
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response
