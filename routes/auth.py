"""Tokens for key holders, key management and the audit log."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, current_app, g

from routes.common import actor, services
from routes.operations import operation
from utils import audit
from utils.errors import Unauthorized
from utils.openapi import Link
from utils.schemas import ApiKey, ApiKeys, AuditLog, AuditQuery, KeyPath, KeyRequest, NewApiKey, RotateRequest, Token, TokenRequest, WhoAmI
from utils.security import authenticated_principal, current_principal, require_permission

bp = Blueprint("auth", __name__)
KEY_NOT_FOUND = {404: "No such key"}
KEY_ID = {"key_id": "$response.body#/id"}
F = TypeVar("F", bound=Callable[..., Any])


def _key_holders_only(view: F) -> F:
    """Only a caller presenting a valid API key (not a token) gets past; checked before the body."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        principal = current_principal()
        if principal is None or principal.via != "api_key":
            current_app.extensions["quadra_security"].on_auth_failure()
            raise Unauthorized("present a valid API key in the X-API-Key header to obtain a token",
                               {"WWW-Authenticate": 'Bearer realm="quadra"'})
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@bp.post("/api/auth/token")
@_key_holders_only
@operation("Issue a JWT for an API key", body=TokenRequest, response=Token, security=("ApiKey",),
           errors={401: "No valid API key in X-API-Key (a token cannot obtain a token)",
                   403: "More permissions asked for than the key holds"})
def issue_token(body: TokenRequest) -> Token:
    """A JWT for a caller presenting a valid API key; never more rights than the key."""
    return Token.model_validate(services().auth.issue_token_for(authenticated_principal(), body.permissions,
                                                                body.expires_in))


@bp.get("/api/auth/whoami")
@require_permission("read")
@operation("Who the credentials belong to", response=WhoAmI)
def whoami() -> WhoAmI:
    """The caller's key id, name, permissions, how it authenticated and its own rate limit; never the key
    or its hash. Any valid credentials may ask."""
    principal = authenticated_principal()
    return WhoAmI.model_validate({"id": principal.id, "name": principal.name, "permissions": list(principal.permissions),
                                  "via": principal.via, "rate_limit": principal.rate_limit})


@bp.get("/api/auth/keys")
@require_permission("admin")
@operation("List API keys", response=ApiKeys)
def list_keys() -> ApiKeys:
    """Every key with its id, name, permissions, state and last use; never the key or its hash."""
    return ApiKeys.model_validate({"keys": services().auth.list_api_keys()})


@bp.post("/api/auth/keys")
@require_permission("admin")
@operation("Create an API key", body=KeyRequest, response=NewApiKey, status=201,
           links={"RevokeKey": Link("auth.revoke_key", KEY_ID), "RotateKey": Link("auth.rotate_key", KEY_ID)})
def create_key(body: KeyRequest) -> NewApiKey:
    """Create a key; the response is the only time the key itself is shown."""
    api_key, record = services().auth.create_api_key(
        body.name, body.permissions, body.expires_days, body.rate_limit, created_by=actor())
    g.audit_details = {"key_id": record["id"], "permissions": record["permissions"]}
    return NewApiKey.model_validate({**record, "api_key": api_key})


@bp.delete("/api/auth/keys/<key_id>")
@require_permission("admin")
@operation("Revoke an API key", path=KeyPath, response=ApiKey, errors=KEY_NOT_FOUND)
def revoke_key(key_id: str) -> ApiKey:
    """Revocation is immediate: every worker refuses the key within QUADRA_AUTH_CACHE_SECONDS."""
    return ApiKey.model_validate(services().auth.revoke_api_key(key_id))


@bp.post("/api/auth/keys/<key_id>/rotate")
@require_permission("admin")
@operation("Rotate an API key", path=KeyPath, body=RotateRequest, response=NewApiKey, status=201,
           errors={**KEY_NOT_FOUND, 409: "The key is revoked or expired"})
def rotate_key(key_id: str, body: RotateRequest) -> NewApiKey:
    """A replacement key; the old one keeps working for `grace_seconds` (default 24 h)."""
    api_key, record = services().auth.rotate_api_key(key_id, body.grace_seconds)
    g.audit_details = {"new_key_id": record["id"], "grace_seconds": body.grace_seconds}
    return NewApiKey.model_validate({**record, "api_key": api_key})


@bp.get("/api/audit")
@require_permission("admin")
@operation("Read the audit log", query=AuditQuery, response=AuditLog)
def audit_log(query: AuditQuery) -> AuditLog:
    """Every write and admin action and every authentication failure, newest first."""
    entries = audit.recent(services().store, query.limit, query.action, query.actor)
    return AuditLog.model_validate({"entries": entries, "count": len(entries)})
