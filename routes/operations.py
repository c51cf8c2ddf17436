"""Declare an operation next to its route: validated and documented from the same models.

    @bp.post("/api/model/save")
    @require_permission("write")
    @operation("Save the serving model as a new version", body=SaveRequest, response=VersionInfo, status=201,
               errors={409: "The version exists"})
    def save_model(body: SaveRequest) -> VersionInfo: ...

Before the view runs, path parameters, query parameters and the JSON body are validated
against their models and handed to it (`body=`, `query=`, path parameters by name); a failure
is a 400 with the model's error code. An operation that declares no body accepts none, an
empty one or `{}`, and refuses any field.

`headers=` documents request headers the view's own wrapper reads before anything else (the
prediction's `X-Request-ID`, which picks a canary's arm before the body is validated), with
the model that wrapper validates them with.

A view with a JSON `response` model returns an instance of it (or `(instance, status,
headers)` for a status it declares), and this decorator serialises it, once, with the
declared status: what a client receives is what the OpenAPI document shows, because the same
`Operation` is what `utils.openapi` puts into the document.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

from flask import Response, current_app, request
from pydantic import BaseModel
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from routes.common import json_body, services
from utils.errors import ArtifactTooLarge, InvalidJson, InvalidRequest, UnsupportedMediaType
from utils.openapi import ErrorSpec, Link, Operation
from utils.schemas import HeaderParameters, PathParameters, QueryParameters, RequestBody, validate

View = Callable[..., Any]


def operation(
    summary: str,
    *,
    response: type[BaseModel] | None = None,
    status: int = 200,
    media_type: str = "application/json",
    body: type[RequestBody] | None = None,
    upload: type[RequestBody] | None = None,
    query: type[QueryParameters] | None = None,
    path: type[PathParameters] | None = None,
    headers: type[HeaderParameters] | None = None,
    errors: Mapping[int, ErrorSpec] | None = None,
    security: tuple[str, ...] | None = None,
    links: Mapping[str, Link] | None = None,
) -> Callable[[View], View]:
    """Validate the request against the models and document the view (see the module doc)."""
    spec = Operation(summary, response=response, status=status, media_type=media_type, body=body, upload=upload,
                     query=query, path=path, headers=headers, errors=dict(errors or {}), security=security,
                     links=dict(links or {}))

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapper(**kwargs: Any) -> Any:
            if spec.path is not None:
                kwargs = dict(validate(spec.path, kwargs))
            if spec.query is not None:
                kwargs["query"] = validate(spec.query, _query_values(spec.query))
            if spec.body is not None:
                kwargs["body"] = validate(spec.body, json_body(required=spec.body_required))
            elif spec.upload is not None:
                kwargs["body"], kwargs["artifact"] = _upload(spec.upload)
            elif request.method not in ("GET", "HEAD"):
                _refuse_body_fields()
            result = view(**kwargs)
            return result if spec.response is None else respond(spec, result)

        wrapper.openapi_operation = spec  # type: ignore[attr-defined]
        return wrapper

    return decorator


def respond(spec: Operation, result: Any) -> Response:
    """The response of a view that returned its declared model (optionally with a declared
    status and headers). Anything else is a programming error, never sent as it is."""
    body, status, headers = result if isinstance(result, tuple) else (result, spec.status, {})
    if type(body) is not _declared_model(spec, status):  # a subclass may carry what the document says it never shows
        raise TypeError(f"{spec.summary!r} answered {status} with {type(body).__name__}, which it does not declare")
    payload = body.model_dump_json(by_alias=True)
    return current_app.response_class(payload, status=status, headers=headers, mimetype="application/json")


def _declared_model(spec: Operation, status: int) -> type[BaseModel] | None:
    """The model documented for `status` (an error status documents one only as (text, model))."""
    if status == spec.status:
        return spec.response
    declared = spec.errors.get(status)
    return declared[1] if isinstance(declared, tuple) else None


def _upload(model: type[RequestBody]) -> tuple[RequestBody, FileStorage]:
    """A multipart body's JSON `metadata` part, validated, and its `artifact` file part, which
    werkzeug has spooled to a temporary file (never held whole in memory)."""
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the artifact as multipart/form-data (parts: artifact, metadata)")
    settings = services().settings
    request.max_content_length = settings.max_artifact_bytes + settings.max_body_bytes
    try:
        artifact, metadata = request.files.get("artifact"), request.form.get("metadata")
    except RequestEntityTooLarge:
        raise ArtifactTooLarge(f"the artifact exceeds QUADRA_MAX_ARTIFACT_BYTES ({settings.max_artifact_bytes} bytes)") from None
    if artifact is None or metadata is None:
        raise InvalidRequest("a multipart body needs an `artifact` file part and a JSON `metadata` part")
    try:
        fields = json.loads(metadata)
    except (ValueError, RecursionError):
        raise InvalidJson("the metadata part is not valid JSON") from None
    return validate(model, fields), artifact


def _refuse_body_fields() -> None:
    """For an operation without a body: no body, an empty one or `{}` (what many clients send
    with every POST) are fine; any field is refused."""
    fields = json_body(required=False)
    if fields:
        raise InvalidRequest(f"this operation takes no request body; unexpected: {', '.join(sorted(fields))}")


def _query_values(model: type[QueryParameters]) -> dict[str, Any]:
    """The query string as a dict: lists for list fields, single values for the others (a
    repeated single-valued parameter stays a list, so it is refused)."""
    values: dict[str, Any] = {}
    for name in request.args:
        given = request.args.getlist(name)
        field = model.model_fields.get(name)
        is_list = field is not None and typing.get_origin(field.annotation) is list
        values[name] = given if is_list or len(given) > 1 else given[0]
    return values
