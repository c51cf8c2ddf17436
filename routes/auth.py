"""Tokens for key holders, key management and the audit log."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from routes.common import ApiError, actor, json_body, services
from utils import audit
from utils.security import current_principal, require_permission

bp = Blueprint("auth", __name__)

MAX_TOKEN_SECONDS = 24 * 3600


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")


def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, "invalid_body", f"'{name}' must be a list of strings")
    return value


def _positive_number(body: dict[str, Any], name: str, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= maximum:
        raise ApiError(400, "invalid_body", f"'{name}' must be a number from 0 to {maximum:g}")
    return value


@bp.post("/api/auth/token")
def issue_token() -> Any:
    """A JWT for a caller presenting a valid API key; never more rights than the key."""
    principal = current_principal()
    if principal is None or principal.via != "api_key":
        current_app.extensions["quadra_security"].on_auth_failure()
        raise ApiError(401, "unauthorized", "present a valid API key in the X-API-Key header to obtain a token",
                       {"WWW-Authenticate": 'Bearer realm="quadra"'})
    body = json_body(required=False)
    _check_fields(body, {"permissions", "expires_in"})
    expires_in = int(_positive_number(body, "expires_in", MAX_TOKEN_SECONDS) or services().settings.jwt_ttl_seconds)
    try:
        token = services().auth.issue_token_for(principal, _string_list(body, "permissions"), expires_in)
    except PermissionError as exc:
        raise ApiError(403, "forbidden", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    return jsonify(token)


@bp.get("/api/auth/keys")
@require_permission("admin")
def list_keys() -> Any:
    return jsonify({"keys": services().auth.list_api_keys()})


@bp.post("/api/auth/keys")
@require_permission("admin")
def create_key() -> Any:
    """Create a key; the response is the only time the key itself is shown."""
    body = json_body()
    _check_fields(body, {"name", "permissions", "expires_days", "rate_limit"})
    name = body.get("name")
    rate_limit = body.get("rate_limit")
    if not isinstance(name, str) or (rate_limit is not None and not isinstance(rate_limit, str)):
        raise ApiError(400, "invalid_body", "'name' (and 'rate_limit' if given) must be strings")
    permissions = _string_list(body, "permissions")
    try:
        api_key, record = services().auth.create_api_key(
            name,
            ["read"] if permissions is None else permissions,
            _positive_number(body, "expires_days", 3650),
            rate_limit,
            created_by=actor(),
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    g.audit_details = {"key_id": record["id"], "permissions": record["permissions"]}
    return jsonify({**record, "api_key": api_key}), 201


@bp.delete("/api/auth/keys/<key_id>")
@require_permission("admin")
def revoke_key(key_id: str) -> Any:
    try:
        return jsonify(services().auth.revoke_api_key(key_id))
    except LookupError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from None


@bp.post("/api/auth/keys/<key_id>/rotate")
@require_permission("admin")
def rotate_key(key_id: str) -> Any:
    """A replacement key; the old one keeps working for `grace_seconds` (default 24 h)."""
    body = json_body(required=False)
    _check_fields(body, {"grace_seconds"})
    grace = body.get("grace_seconds", 24 * 3600)
    if type(grace) not in (int, float) or not 0 <= grace <= 30 * 86400:
        raise ApiError(400, "invalid_body", "'grace_seconds' must be a number from 0 to 2592000")
    try:
        api_key, record = services().auth.rotate_api_key(key_id, grace)
    except LookupError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from None
    except ValueError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    g.audit_details = {"new_key_id": record["id"], "grace_seconds": grace}
    return jsonify({**record, "api_key": api_key}), 201


@bp.get("/api/audit")
@require_permission("admin")
def audit_log() -> Any:
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise ApiError(400, "invalid_parameter", "limit must be an integer from 1 to 1000")
    entries = audit.recent(services().store, int(limit), request.args.get("action"), request.args.get("actor"))
    return jsonify({"entries": entries, "count": len(entries)})
