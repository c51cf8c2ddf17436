"""What every blueprint shares: the service bundle, JSON bodies and the one error shape."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from utils.errors import InvalidJson, InvalidRequest, QuadraError, UnsupportedMediaType
from utils.security import current_principal
from utils.services import Services


def services() -> Services:
    return current_app.extensions["quadra"]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def request_bytes() -> bytes:
    """The request body, refused with 413 past MAX_CONTENT_LENGTH also when it comes without
    a Content-Length (chunked): werkzeug stops reading at the limit and hands back what it
    read, so one more byte decides whether the body went on. Nothing past the limit is kept."""
    raw = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and limit is not None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge(f"the body exceeds QUADRA_MAX_BODY_BYTES ({limit} bytes)")
    return raw


def json_body(required: bool = True) -> dict[str, Any]:
    """The request's JSON object; 415 for another content type, 400 for malformed JSON."""
    raw = request_bytes()
    if not raw and not required:
        return {}
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidJson("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def actor() -> str:
    """Who is acting, for history and audit rows: the key's name and id."""
    principal = current_principal()
    return principal.label if principal else "anonymous"


def error_code(exc: Exception) -> str:
    """The `code` the client is answered with for `exc`."""
    if isinstance(exc, QuadraError):
        return exc.code
    if isinstance(exc, HTTPException):
        return (exc.name or "error").lower().replace(" ", "_")
    return "internal_error"


def register_error_handlers(app: Flask) -> None:
    """Every error leaves as JSON in one shape; a stack trace never reaches a client."""

    @app.errorhandler(QuadraError)
    def _quadra_error(exc: QuadraError) -> Any:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        headers = {k: v for k, v in exc.get_headers() if k in ("Allow", "Retry-After")}
        return error_response(exc.code or 500, error_code(exc), exc.description or exc.name, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")
