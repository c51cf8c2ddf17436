"""Tokens for key holders, key management and the audit log."""

from __future__ import annotations

from functools import wraps
from typing import Any, Callable, TypeVar

from flask import Blueprint, current_app, g, jsonify

from routes.common import ApiError, actor, services
from routes.operations import operation
from utils import audit
from utils.schemas import (ApiKey, ApiKeys, AuditLog, AuditQuery, KeyPath, KeyRequest, NewApiKey, RotateRequest,
                           Token, TokenRequest, WhoAmI)
from utils.security import current_principal, require_permission

bp = Blueprint("auth", __name__)
KEY_NOT_FOUND = {404: "No such key"}
F = TypeVar("F", bound=Callable[..., Any])


def _key_holders_only(view: F) -> F:
    """Only a caller presenting a valid API key (not a token) gets past; checked before the body."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        principal = current_principal()
        if principal is None or principal.via != "api_key":
            current_app.extensions["quadra_security"].on_auth_failure()
            raise ApiError(401, "unauthorized", "present a valid API key in the X-API-Key header to obtain a token",
                           {"WWW-Authenticate": 'Bearer realm="quadra"'})
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@bp.post("/api/auth/token")
@_key_holders_only
@operation("Issue a JWT for an API key", body=TokenRequest, response=Token, security=("ApiKey",),
           errors={401: "No valid API key in X-API-Key (a token cannot obtain a token)",
                   403: "More permissions asked for than the key holds"})
def issue_token(body: TokenRequest) -> Any:
    """A JWT for a caller presenting a valid API key; never more rights than the key."""
    settings = services().settings
    expires_in = body.expires_in or settings.jwt_ttl_seconds
    if expires_in > settings.jwt_max_ttl_seconds:
        raise ApiError(400, "invalid_body", f"expires_in: at most QUADRA_JWT_MAX_TTL_SECONDS ({settings.jwt_max_ttl_seconds})")
    try:
        token = services().auth.issue_token_for(current_principal(), body.permissions, expires_in)
    except PermissionError as exc:
        raise ApiError(403, "forbidden", str(exc)) from None
    return jsonify(token)


@bp.get("/api/auth/whoami")
@require_permission("read")
@operation("Who the credentials belong to", response=WhoAmI)
def whoami() -> Any:
    """The caller's key id, name, permissions, how it authenticated and its own rate limit; never the key
    or its hash. Any valid credentials may ask."""
    principal = current_principal()
    return jsonify({"id": principal.id, "name": principal.name, "permissions": list(principal.permissions),
                    "via": principal.via, "rate_limit": principal.rate_limit})


@bp.get("/api/auth/keys")
@require_permission("admin")
@operation("List API keys", response=ApiKeys)
def list_keys() -> Any:
    """Every key with its id, name, permissions, state and last use; never the key or its hash."""
    return jsonify({"keys": services().auth.list_api_keys()})


@bp.post("/api/auth/keys")
@require_permission("admin")
@operation("Create an API key", body=KeyRequest, response=NewApiKey, status=201)
def create_key(body: KeyRequest) -> Any:
    """Create a key; the response is the only time the key itself is shown."""
    try:
        api_key, record = services().auth.create_api_key(
            body.name, body.permissions, body.expires_days, body.rate_limit, created_by=actor())
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    g.audit_details = {"key_id": record["id"], "permissions": record["permissions"]}
    return jsonify({**record, "api_key": api_key}), 201


@bp.delete("/api/auth/keys/<key_id>")
@require_permission("admin")
@operation("Revoke an API key", path=KeyPath, response=ApiKey, errors=KEY_NOT_FOUND)
def revoke_key(key_id: str) -> Any:
    """Revocation is immediate: every worker refuses the key within QUADRA_AUTH_CACHE_SECONDS."""
    try:
        return jsonify(services().auth.revoke_api_key(key_id))
    except LookupError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from None


@bp.post("/api/auth/keys/<key_id>/rotate")
@require_permission("admin")
@operation("Rotate an API key", path=KeyPath, body=RotateRequest, response=NewApiKey, status=201,
           errors={**KEY_NOT_FOUND, 409: "The key is revoked or expired"})
def rotate_key(key_id: str, body: RotateRequest) -> Any:
    """A replacement key; the old one keeps working for `grace_seconds` (default 24 h)."""
    try:
        api_key, record = services().auth.rotate_api_key(key_id, body.grace_seconds)
    except LookupError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from None
    except ValueError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    g.audit_details = {"new_key_id": record["id"], "grace_seconds": body.grace_seconds}
    return jsonify({**record, "api_key": api_key}), 201


@bp.get("/api/audit")
@require_permission("admin")
@operation("Read the audit log", query=AuditQuery, response=AuditLog)
def audit_log(query: AuditQuery) -> Any:
    """Every write and admin action and every authentication failure, newest first."""
    entries = audit.recent(services().store, query.limit, query.action, query.actor)
    return jsonify({"entries": entries, "count": len(entries)})
