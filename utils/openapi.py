"""The OpenAPI 3.1 document, built from the operations declared next to the routes.

Each view carries an `Operation` (set by `routes.operations.operation`); the builder walks the
app's URL map, so every route, method and path parameter comes from Flask itself, the request
and response schemas from the pydantic models in `utils.schemas`, and the permission from the
`required_permission` attribute `utils.security.require_permission` puts on views. The error
statuses an operation can answer are derived from what it declares (a body, parameters, a
permission, being rate limited) plus the domain errors it names.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from utils.schemas import Error, HeaderParameters, PathParameters, QueryParameters, RequestBody

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "An API key (`qk_…`); never accepted in the query string."},
    "BearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "A token from POST /api/auth/token."},
}
GENERIC_ERRORS = {
    400: "Invalid request: a parameter or the body does not match its schema",
    401: "No or bad credentials",
    403: "The credentials do not hold the permission",
    404: "Not found",
    413: "The body is larger than QUADRA_MAX_BODY_BYTES",
    415: "The body is not application/json",
    429: "Rate limited (or too many failed authentications); retry after Retry-After seconds",
    500: "Internal error (never a stack trace)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
ErrorSpec = str | tuple[str, type[BaseModel]]


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: `operation` (an endpoint name) takes `parameters` from this response,
    e.g. {"job_id": "$response.body#/id"}."""

    operation: str
    parameters: Mapping[str, str]


@dataclass(frozen=True)
class Operation:
    """What the document says about one view (its description is the view's docstring)."""

    summary: str
    response: type[BaseModel] | None = None       # the success body (JSON); None with `media_type`
    status: int = 200
    media_type: str = "application/json"
    body: type[RequestBody] | None = None
    upload: type[RequestBody] | None = None  # multipart: an `artifact` file and a JSON `metadata` part of this model
    query: type[QueryParameters] | None = None
    path: type[PathParameters] | None = None
    headers: type[HeaderParameters] | None = None  # read (and validated) by the view's own wrapper, before the body
    errors: Mapping[int, ErrorSpec] = field(default_factory=dict)  # the domain's own error statuses
    security: tuple[str, ...] | None = None        # default: both schemes when a permission is required
    links: Mapping[str, Link] = field(default_factory=dict)  # operations that use what the success body holds

    @property
    def body_required(self) -> bool:
        return self.body is not None and any(f.is_required() for f in self.body.model_fields.values())


def operation_of(view: Callable[..., Any]) -> Operation | None:
    return getattr(view, "openapi_operation", None)


def build_document(app: Flask, rate_limited: Callable[[str], bool], title: str, description: str) -> dict[str, Any]:
    """The OpenAPI document of every documented route of `app`.

    `rate_limited(endpoint)` tells whether the service-wide rate limit applies to an endpoint."""
    routes = [(rule, operation) for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule)
              if (operation := operation_of(app.view_functions[rule.endpoint])) is not None]
    schemas = _component_schemas(op for _, op in routes)
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for rule, op in routes:
        view = app.view_functions[rule.endpoint]
        tag = rule.endpoint.rpartition(".")[0] or "service"
        tags.setdefault(tag, _first_line(inspect.getmodule(view)))
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            entry = _operation(rule.endpoint, method, op, view, schemas, tag, rate_limited(rule.endpoint))
            paths.setdefault(_RULE_ARGUMENT.sub(r"{\1}", rule.rule), {})[method.lower()] = entry
        if op.path is not None and set(op.path.model_fields) != set(rule.arguments):
            raise ValueError(f"{rule.endpoint}: path model {op.path.__name__} does not match {rule.rule}")
    for model in {model for _, op in routes for model in (op.query, op.path, op.headers) if model is not None}:
        del schemas["$defs"][_ref(model, "validation", schemas)["$ref"].rpartition("/")[2]]  # inlined as parameters
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": API_VERSION, "description": description},
        "tags": [{"name": name, "description": text} for name, text in tags.items()],
        "paths": paths,
        "components": {"schemas": schemas["$defs"], "securitySchemes": SECURITY_SCHEMES},
    }


def _component_schemas(operations: Iterable[Operation]) -> dict[str, Any]:
    """JSON Schemas of every model, with `$ref`s into components (request models as validated,
    response models as serialised)."""
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None}
    for op in operations:
        for model in (op.body, op.upload, op.query, op.path, op.headers):
            if model is not None:
                models[(model, "validation")] = None
        for spec in (op.response, *(s[1] for s in op.errors.values() if isinstance(s, tuple))):
            if spec is not None:
                models[(spec, "serialization")] = None
    refs, definitions = models_json_schema(list(models), ref_template=REF_TEMPLATE)
    return {"refs": refs, "$defs": definitions.get("$defs", {})}


def _operation(endpoint: str, method: str, op: Operation, view: Callable[..., Any], schemas: dict[str, Any],
               tag: str, rate_limited: bool) -> dict[str, Any]:
    permission = getattr(view, "required_permission", None)
    security = op.security or (("ApiKey", "BearerAuth") if permission else ())
    description = inspect.getdoc(view) or ""
    if permission:
        description = f"{description}\n\nRequires the `{permission}` permission.".strip()
    entry: dict[str, Any] = {"operationId": endpoint, "summary": op.summary, "tags": [tag]}
    if description:
        entry["description"] = description
    parameters = [*_parameters(op.path, "path", schemas), *_parameters(op.query, "query", schemas),
                  *_parameters(op.headers, "header", schemas)]
    if parameters:
        entry["parameters"] = parameters
    if op.body is not None:
        entry["requestBody"] = {"required": op.body_required,
                                "content": {"application/json": {"schema": _ref(op.body, "validation", schemas)}}}
    if op.upload is not None:
        entry["requestBody"] = {"required": True, "content": {"multipart/form-data": _upload(op.upload, schemas)}}
    if security:
        entry["security"] = [{name: []} for name in security]
    success: dict[str, Any] = {"description": op.summary}
    schema = _ref(op.response, "serialization", schemas) if op.response else {"type": "string"}
    success["content"] = {op.media_type: {"schema": schema}}
    if op.links:
        success["links"] = {name: {"operationId": link.operation, "parameters": dict(link.parameters)}
                            for name, link in op.links.items()}
    entry["responses"] = {str(op.status): success, **_error_responses(op, method, permission, security, rate_limited, schemas)}
    return entry


def _upload(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """A multipart body: the artifact's bytes and the `model` as a JSON part."""
    artifact = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                "description": "the model's weights as a safetensors file"}
    return {"schema": {"type": "object", "required": ["artifact", "metadata"],
                       "properties": {"artifact": artifact, "metadata": _ref(model, "validation", schemas)}},
            "encoding": {"artifact": {"contentType": "application/octet-stream"},
                         "metadata": {"contentType": "application/json"}}}


def _parameters(model: type[BaseModel] | None, location: str, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    if model is None:
        return []
    definition = schemas["$defs"][_ref(model, "validation", schemas)["$ref"].rpartition("/")[2]]
    required = set(definition.get("required", ()))
    parameters = []
    for name, schema in definition["properties"].items():
        parameter = {"name": name, "in": location, "required": location == "path" or name in required,
                     "schema": {k: v for k, v in schema.items() if k != "description"}}
        if "description" in schema:
            parameter["description"] = schema["description"]
        parameters.append(parameter)
    return parameters


def _error_responses(op: Operation, method: str, permission: str | None, security: tuple[str, ...], rate_limited: bool,
                     schemas: dict[str, Any]) -> dict[str, Any]:
    statuses: set[int] = {500}
    if op.body or op.upload or op.query or op.path or op.headers or method != "GET":  # without a body model, a body is refused
        statuses.add(400)
    if op.body is not None or op.upload is not None:
        statuses |= {413, 415}
    if op.path is not None:
        statuses.add(404)
    if security:
        statuses |= {401, 429}
    if permission in ("write", "admin"):
        statuses.add(403)
    if rate_limited:
        statuses.add(429)
    responses: dict[int, dict[str, Any]] = {status: _error(GENERIC_ERRORS[status], schemas) for status in statuses}
    for status, spec in op.errors.items():
        text, model = spec if isinstance(spec, tuple) else (spec, Error)
        responses[status] = {"description": text,
                             "content": {"application/json": {"schema": _ref(model, "serialization", schemas)}}}
    for status in (429, 503):
        if status in responses:
            responses[status]["headers"] = RETRY_AFTER
    return {str(status): responses[status] for status in sorted(responses)}


def _error(description: str, schemas: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(Error, "serialization", schemas)}}}


def _ref(model: type[BaseModel], mode: str, schemas: dict[str, Any]) -> dict[str, Any]:
    return schemas["refs"][(model, mode)]


def _first_line(module: Any) -> str:
    return (inspect.getdoc(module) or "").split("\n", 1)[0]


@dataclass(frozen=True)
class RuntimeLimit:
    """A bound the server checks against its settings or its serving model, which the static
    schemas cannot know: `constraints` are written into the component `schema` at `path`
    (property names; "items" steps into an array's items)."""

    schema: str
    path: tuple[str, ...]
    constraints: Mapping[str, Any]


def with_runtime_limits(document: dict[str, Any], limits: Iterable[RuntimeLimit]) -> dict[str, Any]:
    """A copy of `document` whose schemas also say what `limits` enforce, so that a request the
    document accepts is one the server accepts."""
    narrowed = copy.deepcopy(document)
    for limit in limits:
        node = narrowed["components"]["schemas"][limit.schema]
        for step in limit.path:
            node = _non_null(node)
            node = node["items"] if step == "items" else node["properties"][step]
        _non_null(node).update(limit.constraints)
    return narrowed


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of an optional value's non-null variant (the schema itself otherwise)."""
    return next((variant for variant in schema.get("anyOf", ()) if variant.get("type") != "null"), schema)
