"""Security: API keys, JWTs, permissions and rate limits (the seed's Python API, store-backed).

API keys (`qk_...`) are shown once and stored only as HMAC-SHA-256 hashes keyed with the
server secret. Keys and their revocation live in the store, so a key made in a console or
with the CLI works on every worker at once and a revoked key stops within
`QUADRA_AUTH_CACHE_SECONDS`. Permissions rank read < write < admin: each implies those below.
Rate-limit counters live in the store (or Redis) through the `limits` library, shared by all
processes; `RateLimiter` reads the same counters the per-request check (request_limits) writes.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import wraps
from typing import Any, TypeVar

from dotenv import dotenv_values
from flask import Flask, Response, current_app, g, has_request_context, request
from flask_cors import CORS
from limits import RateLimitItem
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from utils import audit
from utils.config import ConfigError, Settings, current_settings, resolve_secret_key
from utils.errors import Forbidden, InactiveKey, InvalidRequest, KeyNotFound, TooManyRequests, Unauthorized
from utils.fallback_storage import FallbackStorage
from utils.outage import Outage
from utils.rate_limit_storage import SCHEME as STORE_SCHEME
from utils.rate_limit_storage import StoreRateLimitStorage
from utils.request_limits import RequestLimits, counter_args, parse_limit
from utils.store import ApiKeyRow, Store, UsesConfiguredStore, store_for
from utils.timestamps import iso_utc
from utils.tokens import TokenCodec

F = TypeVar("F", bound=Callable[..., Any])

PERMISSIONS = ("read", "write", "admin")
_RANK = {name: rank for rank, name in enumerate(PERMISSIONS, start=1)}
ROLE_PERMISSIONS = {"read": ["read"], "user": ["read"], "write": ["write"], "admin": ["admin"]}
KEY_PREFIX = "qk_"
DEPLOYMENT_SECRET = "QUADRA_SECRET_KEY"
MIN_KEY_LENGTH = 24
LAST_USED_WRITE_INTERVAL = 60.0
DEFAULT_ROTATION_GRACE_SECONDS = 24 * 3600
log = logging.getLogger("quadra.security")


def normalize_permissions(permissions: Iterable[str]) -> list[str]:
    """Validate permission names; returns them sorted by rank."""
    names = {p.strip().lower() for p in permissions if p and p.strip()}
    unknown = names - set(PERMISSIONS)
    if unknown or not names:
        raise InvalidRequest(f"permissions must be a non-empty subset of {', '.join(PERMISSIONS)}")
    return sorted(names, key=_RANK.__getitem__)


def permits(granted: Iterable[str], required: str) -> bool:
    """True when any granted permission ranks at or above `required`."""
    return max((_RANK.get(p, 0) for p in granted), default=0) >= _RANK[required]


def _any_case(word: str) -> str:
    return "".join(f"[{letter.lower()}{letter.upper()}]" for letter in word)


_BLANK = r"[ \t]*"
_UNIT = "(?:" + "|".join(map(_any_case, ("second", "minute", "hour", "day", "month", "year"))) + ")"
_ONE_LIMIT = (f"{_BLANK}[0-9]{{1,9}}{_BLANK}(?:/|{_any_case('per')}){_BLANK}(?:[1-9][0-9]{{0,8}}{_BLANK})?"
              f"{_UNIT}[sS]?{_BLANK}")
# The rate-limit strings a key may carry: the `limits` notation ("1000 per minute", "60/minute",
# "10 per 5 seconds", several joined by , ; or |), written so that JSON Schema (ECMA-262),
# pydantic and Python read it alike; the OpenAPI document carries it.
RATE_LIMIT_PATTERN = f"^{_ONE_LIMIT}(?:[,;|]{_ONE_LIMIT})*$"
_RATE_LIMIT = re.compile(RATE_LIMIT_PATTERN)


def validate_rate_limit(limit: str | None) -> str | None:
    if limit is None:
        return None
    try:
        if not _RATE_LIMIT.fullmatch(limit):
            raise ValueError(limit)
        parse_limit(limit)
    except ValueError:
        raise InvalidRequest(f"rate limit {limit!r} is not valid; use e.g. '1000 per minute' or '60/minute'") from None
    return limit


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key, a token, or everyone when authentication is disabled."""

    id: str
    name: str
    permissions: tuple[str, ...]
    rate_limit: str | None = None
    via: str = "api_key"

    def allows(self, permission: str) -> bool:
        return permits(self.permissions, permission)

    @property
    def rate_key(self) -> str | None:
        """The rate-limit bucket: the key (shared with its tokens), or None to use the address."""
        if self.via == "disabled":
            return None
        return self.id if self.id.startswith("token:") else f"key:{self.id}"

    @property
    def key_id(self) -> str | None:
        """The API key behind the call (directly or through a token made for it), if any."""
        return None if self.via == "disabled" or self.id.startswith("token:") else self.id

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})"


AUTH_DISABLED_PRINCIPAL = Principal("anonymous", "auth-disabled", ("admin",), via="disabled")


class SecretsManager:
    """Secrets from `QUADRA_*` variables, API-key generation and keyed hashing."""

    def __init__(self, env_prefix: str = "QUADRA_", secret_key: str | None = None) -> None:
        self.env_prefix = env_prefix
        self._secret_key = secret_key

    def get_secret(self, name: str, default: str | None = None) -> str | None:
        """`<prefix><NAME>` from the environment or `.env` (the environment wins). The
        deployment's own secret key (`get_secret("secret_key")` with the QUADRA_ prefix) is
        the one the service uses: in development the one kept in the state folder."""
        variable = self._variable(name)
        value = os.environ.get(variable, dotenv_values(".env").get(variable))
        if value is None and variable == DEPLOYMENT_SECRET:
            return self.secret_key
        return default if value is None else value

    def set_secret(self, name: str, value: str) -> None:
        """Set a secret for this process (and the children it starts)."""
        os.environ[self._variable(name)] = value

    def _variable(self, name: str) -> str:
        name = name.upper()
        return name if name.startswith(self.env_prefix) else f"{self.env_prefix}{name}"

    @property
    def secret_key(self) -> str:
        if self._secret_key is None:
            self._secret_key = resolve_secret_key(current_settings())
        return self._secret_key

    def generate_api_key(self) -> str:
        return KEY_PREFIX + secrets.token_urlsafe(32)

    def hash_api_key(self, api_key: str) -> str:
        return hmac.new(self.secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()

    def verify_api_key(self, api_key: str, key_hash: str) -> bool:
        return hmac.compare_digest(self.hash_api_key(api_key), key_hash)


secrets_manager = SecretsManager()


def _public_key(row: ApiKeyRow) -> dict[str, Any]:
    """A key as it may be shown: never the hash, only a prefix and the last four characters."""
    return {
        "id": row.id,
        "name": row.name,
        "user_id": row.name,
        "display": f"{row.prefix}…{row.last4}",
        "permissions": row.permissions,
        "rate_limit": row.rate_limit,
        "created_at": iso_utc(row.created_at),
        "created_by": row.created_by,
        "expires_at": iso_utc(row.expires_at),
        "last_used_at": iso_utc(row.last_used_at),
        "revoked_at": iso_utc(row.revoked_at),
        "rotated_to": row.rotated_to,
        "active": _is_active(row, time.time()),
    }


def _is_active(row: ApiKeyRow, now: float) -> bool:
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


class AuthManager(UsesConfiguredStore):
    """API keys (in the store) and JWTs (PyJWT, HS256) for one deployment."""

    def __init__(
        self,
        secret_key: str,
        token_expiry_hours: float = 24,
        enabled: bool = True,
        store: Store | None = None,
        cache_seconds: float = 2.0,
        key_expiry_days: int = 90,
        max_token_seconds: int | None = None,
        production: bool | None = None,
    ) -> None:
        """Without `store`, keys live in the service's store (the QUADRA_* settings), so a key
        registered here works against the running service; `production` (default: QUADRA_ENV)
        refuses user-chosen keys shorter than 24 characters."""
        if not secret_key:
            raise ValueError("AuthManager needs a secret key (secrets_manager.get_secret('secret_key') gives the service's)")
        self.secret_key = secret_key
        expiry_seconds = int(token_expiry_hours * 3600)
        self.tokens = TokenCodec(secret_key, expiry_seconds, max_token_seconds or expiry_seconds)
        self.enabled = enabled
        self.cache_seconds = cache_seconds
        self.key_expiry_days = key_expiry_days
        self.secrets = SecretsManager(secret_key=secret_key)
        self._store = store
        self._production = production
        self._cache: dict[str, tuple[float, ApiKeyRow | None]] = {}
        self._last_used_written: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- keys ---------------------------------------------------------------------------

    def create_api_key(
        self,
        name: str,
        permissions: Iterable[str] = ("read",),
        expires_days: float | None = None,
        rate_limit: str | None = None,
        created_by: str = "console",
        api_key: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Create a key; returns (the key, shown only now, and its public record)."""
        row, api_key = self._new_key_row(name, permissions, expires_days, rate_limit, created_by, api_key)
        self.store.keys.insert(row)
        return api_key, _public_key(row)

    def _new_key_row(
        self,
        name: str,
        permissions: Iterable[str],
        expires_days: float | None,
        rate_limit: str | None,
        created_by: str,
        api_key: str | None = None,
    ) -> tuple[ApiKeyRow, str]:
        name = (name or "").strip()
        if not name or len(name) > 100:
            raise InvalidRequest("a key needs a name of 1-100 characters")
        if api_key is not None:
            self._check_chosen_key(api_key, name)
        api_key = api_key or self.secrets.generate_api_key()
        days = self.key_expiry_days if expires_days is None else expires_days
        now = time.time()
        row = ApiKeyRow(
            id=f"key_{uuid.uuid4().hex[:12]}", name=name, key_hash=self.secrets.hash_api_key(api_key),
            prefix=api_key[:7], last4=api_key[-4:], permissions=normalize_permissions(permissions),
            rate_limit=validate_rate_limit(rate_limit), created_at=now, created_by=created_by,
            expires_at=now + days * 86400 if days else None, last_used_at=None, revoked_at=None, rotated_to=None,
        )
        return row, api_key

    def _check_chosen_key(self, api_key: str, name: str) -> None:
        """A key chosen by the caller (not generated) shorter than MIN_KEY_LENGTH: refused in
        production, accepted with a warning elsewhere."""
        if not isinstance(api_key, str) or not api_key.strip():
            raise InvalidRequest("an API key must be a non-empty string")
        if len(api_key) >= MIN_KEY_LENGTH:
            return
        production = current_settings().is_production if self._production is None else self._production
        if production:
            raise InvalidRequest(f"an API key must be at least {MIN_KEY_LENGTH} characters in production (QUADRA_ENV="
                             "production); make one with secrets_manager.generate_api_key()")
        log.warning("API key for %r is shorter than %d characters: accepted outside production only",
                    name, MIN_KEY_LENGTH)

    def register_api_key(
        self,
        api_key: str | None = None,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        expires_days: float | None = None,
        rate_limit: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """The seed's call: register `api_key` (or a new one) under `name` (`user_id` is the
        seed's older name for it) with `permissions` (default read); the returned record
        carries the key under "api_key"."""
        key, record = self.create_api_key(
            name or user_id or "console", permissions or ("read",), expires_days, rate_limit, created_by="console",
            api_key=api_key,
        )
        return {**record, "api_key": key}

    def create_bootstrap_key(self) -> str | None:
        """An admin key if the store has no key at all (first start); None otherwise."""
        row, api_key = self._new_key_row("bootstrap-admin", ["admin"], None, None, "bootstrap")
        return api_key if self.store.keys.insert_first(row) else None

    def list_api_keys(self) -> list[dict[str, Any]]:
        return [_public_key(r) for r in self.store.keys.list()]

    def get_api_key(self, key_id: str) -> dict[str, Any]:
        row = self.store.keys.get(key_id)
        if row is None:
            raise KeyNotFound(f"API key {key_id} not found")
        return _public_key(row)

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        self.get_api_key(key_id)
        self.store.keys.revoke(key_id, time.time())
        self._forget(key_id)
        return self.get_api_key(key_id)

    def rotate_api_key(self, key_id: str, grace_seconds: float = DEFAULT_ROTATION_GRACE_SECONDS) -> tuple[str, dict[str, Any]]:
        """Issue a replacement with the same name, permissions and limit; the old key keeps
        working for `grace_seconds` (never longer than it would have)."""
        old = self.store.keys.get(key_id)
        if old is None:
            raise KeyNotFound(f"API key {key_id} not found")
        if not _is_active(old, time.time()):
            raise InactiveKey(f"API key {key_id} is revoked or expired and cannot be rotated")
        remaining_days = None if old.expires_at is None else max(1.0, (old.expires_at - time.time()) / 86400)
        new_row, api_key = self._new_key_row(
            old.name, old.permissions, remaining_days or self.key_expiry_days, None, f"rotation of {key_id}"
        )
        new_row = replace(new_row, rate_limit=old.rate_limit)  # as accepted, also by an earlier release's looser check
        grace_end = time.time() + max(0.0, grace_seconds)
        old_end = grace_end if old.expires_at is None else min(old.expires_at, grace_end)
        self.store.keys.rotate(key_id, new_row, old_end)
        self._forget(key_id)
        return api_key, _public_key(new_row)

    def _forget(self, key_id: str) -> None:
        with self._lock:
            for cache_key, (_, row) in list(self._cache.items()):
                if row is not None and row.id == key_id:
                    del self._cache[cache_key]

    def _cached(self, cache_key: str, load: Callable[[], ApiKeyRow | None]) -> ApiKeyRow | None:
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        row = load()
        with self._lock:
            self._cache[cache_key] = (now, row)
        return row

    @staticmethod
    def _active_row(row: ApiKeyRow | None) -> ApiKeyRow | None:
        return row if row is not None and _is_active(row, time.time()) else None

    def authenticate_key(self, api_key: str) -> Principal | None:
        """The principal for a presented key, or None (unknown, revoked or expired)."""
        if not api_key or len(api_key) > 256:
            return None
        key_hash = self.secrets.hash_api_key(api_key)
        row = self._active_row(self._cached(f"hash:{key_hash}", lambda: self.store.keys.find(key_hash)))
        if row is None or not hmac.compare_digest(row.key_hash, key_hash):
            return None
        self._note_use(row.id)
        return Principal(row.id, row.name, tuple(row.permissions), row.rate_limit, "api_key")

    def _note_use(self, key_id: str) -> None:
        """Record last use at most once a minute per key and process: no per-request write."""
        now = time.time()
        if now - self._last_used_written.get(key_id, 0.0) >= LAST_USED_WRITE_INTERVAL:
            self._last_used_written[key_id] = now
            self.store.keys.note_use(key_id, now)

    def verify_api_key(self, api_key: str) -> dict[str, Any] | None:
        """The seed's call: the key's public record (truthy, with "user_id" and "permissions")
        for a valid key, None otherwise."""
        principal = self.authenticate_key(api_key)
        return self.get_api_key(principal.id) if principal else None

    @staticmethod
    def check_permission(user_info: dict[str, Any] | Principal | None, permission: str) -> bool:
        """Does `user_info` (a key record, token payload or Principal) grant `permission`?"""
        if user_info is None:
            return False
        if isinstance(user_info, Principal):
            return user_info.allows(permission)
        granted = user_info.get("permissions") or ROLE_PERMISSIONS.get(user_info.get("role", ""), [])
        return permits(granted, permission)

    # -- tokens -------------------------------------------------------------------------

    def generate_token(
        self,
        user_id: str,
        role: str = "read",
        permissions: Iterable[str] | None = None,
        expires_in: int | None = None,
        key_id: str | None = None,
    ) -> str:
        """A signed JWT. Tokens made for a key (`key_id`) die with the key."""
        granted = normalize_permissions(permissions if permissions is not None else ROLE_PERMISSIONS.get(role, [role]))
        return self.tokens.encode(user_id, role, granted, expires_in, key_id)

    def verify_token(self, token: str) -> dict[str, Any] | None:
        """The token's claims (with the seed's `user_id`) if it is valid, else None (`TokenCodec.decode`)."""
        claims = self.tokens.decode(token)
        return None if claims is None else {**claims, "user_id": claims.get("name", claims["sub"])}

    def issue_token_for(self, principal: Principal, permissions: Iterable[str] | None,
                        expires_in: int | None = None) -> dict[str, Any]:
        """A token for a key holder, carrying the key's id and at most its permissions; it lives
        `expires_in` seconds (default: the configured lifetime)."""
        lifetime = self.tokens.lifetime(expires_in)
        wanted = normalize_permissions(permissions) if permissions is not None else list(principal.permissions)
        excess = [p for p in wanted if not principal.allows(p)]
        if excess:
            raise Forbidden(f"the key does not hold: {', '.join(excess)}")
        token = self.generate_token(principal.name, wanted[-1], wanted, lifetime, key_id=principal.id)
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "permissions": wanted}

    def authenticate_token(self, token: str) -> Principal | None:
        claims = self.tokens.decode(token)
        if claims is None or not isinstance(claims.get("perms"), list):
            return None
        key_id = claims.get("kid")
        if key_id is None:
            return Principal(f"token:{claims['sub']}", str(claims.get("name", claims["sub"])), tuple(claims["perms"]), via="jwt")
        row = self._active_row(self._cached(f"id:{key_id}", lambda: self.store.keys.get(key_id)))
        if row is None:
            return None
        granted = tuple(p for p in claims["perms"] if permits(row.permissions, p))
        if not granted:
            return None
        return Principal(row.id, row.name, granted, row.rate_limit, "jwt")


class RateLimiter:
    """The seed's rate limiter over the shared counters every request is checked against.

    Identifiers are what the service limits by: "key:<key id>" for a key (or its tokens),
    "ip:<address>" for anonymous callers. Without one, a call inside a request counts for the
    request's caller (as the decorators do) and outside a request for this console's user
    ("console:<user>@<host>"). `get_remaining` and `get_reset_time` read the same counters the
    HTTP layer writes, so they report what the service enforces. Arguments left out come from
    the QUADRA_* settings (limit, window, on/off, counters)."""

    def __init__(
        self,
        max_requests: int | None = None,
        window_seconds: int | None = None,
        enabled: bool | None = None,
        storage: Storage | None = None,
        key_prefix: str | None = None,
        limit_lookup: Callable[[str], str | None] | None = None,
    ) -> None:
        if max_requests is None or window_seconds is None or enabled is None or key_prefix is None:
            settings = current_settings()
            max_requests = settings.max_requests if max_requests is None else max_requests
            window_seconds = settings.rate_window if window_seconds is None else window_seconds
            enabled = settings.rate_limit_enabled if enabled is None else enabled
            key_prefix = settings.redis_prefix if key_prefix is None else key_prefix
        self.default_limit = f"{max_requests} per {window_seconds} second"
        self.enabled = enabled
        self.key_prefix = key_prefix
        self.limit_lookup = limit_lookup
        self._storage = storage
        self._strategy: FixedWindowRateLimiter | None = None

    @property
    def strategy(self) -> FixedWindowRateLimiter:
        if self._strategy is None:
            self._strategy = FixedWindowRateLimiter(self._storage or storage_for(current_settings(), exact=True))
        return self._strategy

    def limit_for(self, identifier: str) -> str:
        custom = self.limit_lookup(identifier) if self.limit_lookup else None
        return custom or self.default_limit

    def _item(self, identifier: str) -> RateLimitItem:
        return parse_limit(self.limit_for(identifier))

    def _args(self, identifier: str) -> tuple[str, ...]:
        return counter_args(self.key_prefix, identifier)

    def is_allowed(self, identifier: str | None = None) -> bool:
        """Count one request for `identifier` (default: the caller); False once its window is used up."""
        if not self.enabled:
            return True
        identifier = identifier or current_caller()
        return self.strategy.hit(self._item(identifier), *self._args(identifier))

    def get_remaining(self, identifier: str | None = None) -> int:
        """Requests left in the caller's current window."""
        identifier = identifier or current_caller()
        return self.strategy.get_window_stats(self._item(identifier), *self._args(identifier)).remaining

    def get_reset_time(self, identifier: str | None = None) -> float:
        """Seconds until the caller's current window resets (0 when it has none)."""
        identifier = identifier or current_caller()
        reset_at = self.strategy.get_window_stats(self._item(identifier), *self._args(identifier)).reset_time
        return max(0.0, reset_at - time.time())


def current_caller() -> str:
    """Who a rate-limit call counts for: the request's key or address inside a request of the
    service, this console's user outside one."""
    if has_request_context() and "quadra_security" in current_app.extensions:
        return rate_limit_identity()
    return f"console:{getpass.getuser()}@{socket.gethostname()}"


def redis_outage(log_to: logging.Logger) -> Outage:
    """How a process reports and rides out a Redis outage (one per process and app)."""
    return Outage("Redis", "rate limits are counted per process and dashboards poll once a second", log_to)


def storage_for(settings: Settings, store: Store | None = None, outage: Outage | None = None,
                exact: bool = False) -> Storage:
    """The rate-limit counters: Redis (failing fast, with the in-memory fallback) when
    configured, else the store's own counters, synced every QUADRA_RATE_LIMIT_SYNC_SECONDS by a
    thread the service starts, or written at every hit when `exact` (a console has no syncer)."""
    if settings.redis_url:
        redis_counters = storage_from_string(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        if not isinstance(redis_counters, Storage):
            raise ConfigError(f"QUADRA_REDIS_URL: {redis_counters.STORAGE_SCHEME} is an asynchronous storage")
        return FallbackStorage(redis_counters, outage or redis_outage(log))
    return StoreRateLimitStorage(f"{STORE_SCHEME}://", store=store or store_for(settings),
                                 sync_seconds=0.0 if exact else settings.rate_limit_sync_seconds)


class _LazyRateLimiter(RateLimiter):
    """`rate_limiter` for consoles and scripts: configured from QUADRA_* on first use."""

    def __init__(self) -> None:
        self._configured = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("_configured"):
            raise AttributeError(name)
        settings = current_settings()
        auth = AuthManager(resolve_secret_key(settings), enabled=settings.auth_enabled)
        RateLimiter.__init__(self, limit_lookup=key_limit_lookup(auth))
        self._configured = True
        return getattr(self, name)


rate_limiter: RateLimiter = _LazyRateLimiter()


def key_limit_lookup(auth: AuthManager) -> Callable[[str], str | None]:
    """Resolve "key:<id>" identifiers to that key's own limit (its tier), if it has one."""

    def lookup(identifier: str) -> str | None:
        if not identifier.startswith("key:"):
            return None
        row = auth._cached(f"id:{identifier[4:]}", lambda: auth.store.keys.get(identifier[4:]))
        return row.rate_limit if row else None

    return lookup


# -- Flask integration -------------------------------------------------------------------


def auth_manager() -> AuthManager:
    return current_app.extensions["quadra_security"].auth


def current_principal() -> Principal | None:
    """Who made this request (resolved once per request), or None without valid credentials.

    Keys are accepted only in the X-API-Key header (never the query string, where they would
    end up in logs); tokens only as `Authorization: Bearer`."""
    if "quadra_principal" not in g:
        g.quadra_principal = _authenticate_request()
    return g.quadra_principal


def _authenticate_request() -> Principal | None:
    auth = auth_manager()
    if not auth.enabled:
        return AUTH_DISABLED_PRINCIPAL
    api_key = request.headers.get("X-API-Key", "").strip()
    if api_key:
        return auth.authenticate_key(api_key)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return auth.authenticate_token(token.strip())
    return None


def authenticated_principal() -> Principal:
    """The caller of a view that `require_permission` (or another check) already let through."""
    principal = current_principal()
    if principal is None:
        raise _unauthorized()
    return principal


def rate_limit_identity() -> str:
    """What a request is rate-limited by: its key, or the client address when anonymous."""
    principal = current_principal()
    rate_key = principal.rate_key if principal is not None else None
    return rate_key or f"ip:{request.remote_addr or 'unknown'}"


def _unauthorized() -> Unauthorized:
    return Unauthorized("a valid API key (X-API-Key header) or bearer token is required",
                        {"WWW-Authenticate": 'Bearer realm="quadra"'})


def require_permission(permission: str) -> Callable[[F], F]:
    """Allow the view only to callers holding `permission` (401 without valid credentials,
    403 with too few rights); the requirement is kept on the view for auditing."""
    if permission not in _RANK:
        raise ValueError(f"unknown permission {permission!r}")

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = current_principal()
            if principal is None:
                current_app.extensions["quadra_security"].on_auth_failure()
                raise _unauthorized()
            if not principal.allows(permission):
                current_app.extensions["quadra_security"].on_forbidden(permission)
                raise Forbidden(f"this key does not have the '{permission}' permission")
            return view(*args, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def require_auth(view: F) -> F:
    """The seed's decorator: any valid credentials (read permission)."""
    return require_permission("read")(view)


def rate_limit(view: F) -> F:
    """The seed's decorator: one more shared per-caller limit on this view alone (the
    service-wide limit applies to every view anyway)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        limiter: RateLimiter = current_app.extensions["quadra_security"].rate_limiter
        identifier = f"{rate_limit_identity()}:{request.endpoint}"
        if not limiter.is_allowed(identifier):
            raise TooManyRequests("too many requests", time.time() + limiter.get_reset_time(identifier))
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class SecurityState:
    """What `init_auth` attaches to an app (as `app.extensions["quadra_security"]`)."""

    settings: Settings
    store: Store
    auth: AuthManager
    rate_limiter: RateLimiter
    request_limits: RequestLimits

    def on_auth_failure(self, presented: bool | None = None) -> None:
        """Audit a failed authentication; past QUADRA_AUTH_FAILURE_LIMIT per address answer
        429 instead, and record one alert per window. `presented`: whether credentials came
        with the request (default: an X-API-Key or Authorization header did; a Socket.IO
        connection brings them in its auth payload)."""
        ip = request.remote_addr or "unknown"
        if presented is None:
            presented = "X-API-Key" in request.headers or "Authorization" in request.headers
        limit = parse_limit(self.settings.auth_failure_limit)
        args = (self.settings.redis_prefix, "auth-failures", ip)
        strategy = self.rate_limiter.strategy
        if not strategy.hit(limit, *args):
            if strategy.hit(parse_limit(f"1 per {limit.get_expiry()} second"), self.settings.redis_prefix, "auth-failure-alert", ip):
                audit.record(self.store, "anonymous", "alert.auth_failures", "alert", ip=ip, status=429,
                             details={"limit": self.settings.auth_failure_limit})
            raise TooManyRequests("too many failed authentications from this address",
                                  strategy.get_window_stats(limit, *args).reset_time)
        audit.record(self.store, "anonymous", "auth.failure", "denied", target=request.path, status=401, ip=ip,
                     details={"credentials": "presented" if presented else "missing"})

    def start(self) -> None:
        """Start sharing the store-backed counters in the background (Redis needs nothing)."""
        if isinstance(self.request_limits.storage, StoreRateLimitStorage):
            self.request_limits.storage.start()

    def stop(self) -> None:
        """Stop that, and share what this process still counts alone (at exit)."""
        if isinstance(self.request_limits.storage, StoreRateLimitStorage):
            self.request_limits.storage.close()

    def on_forbidden(self, permission: str) -> None:
        principal = current_principal()
        audit.record(self.store, principal.label if principal else "anonymous", "auth.forbidden", "denied",
                     target=request.path, status=403, ip=request.remote_addr, details={"required": permission})


def auth_manager_for(settings: Settings, store: Store) -> AuthManager:
    """The deployment's AuthManager: its secret, lifetimes and caches from `settings`."""
    return AuthManager(
        resolve_secret_key(settings),
        token_expiry_hours=settings.jwt_ttl_seconds / 3600,
        max_token_seconds=settings.jwt_max_ttl_seconds,
        enabled=settings.auth_enabled,
        store=store,
        cache_seconds=settings.auth_cache_seconds,
        key_expiry_days=settings.key_expiry_days,
        production=settings.is_production,
    )


def build_security(settings: Settings, store: Store, auth: AuthManager, counters: Storage) -> SecurityState:
    """Authentication and rate limiting over one set of counters (shared by the per-request
    limit, the seed's RateLimiter and the failed-authentication throttle), not yet in an app."""
    limiter_for_seed = RateLimiter(
        settings.max_requests, settings.rate_window, settings.rate_limit_enabled, counters,
        key_prefix=settings.redis_prefix, limit_lookup=key_limit_lookup(auth),
    )
    request_limits = RequestLimits(counters, rate_limit_identity, limiter_for_seed.limit_for, settings.redis_prefix)
    return SecurityState(settings, store, auth, limiter_for_seed, request_limits)


def install_security(app: Flask, state: SecurityState) -> None:
    """Hook `state` into `app`: authentication, rate limits, CORS, security headers, auditing."""
    settings = state.settings
    if not settings.auth_enabled:
        app.logger.warning("AUTHENTICATION IS DISABLED (QUADRA_AUTH_ENABLED=false): every caller is admin")
    app.extensions["quadra_security"] = state
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    app.after_request(_security_headers)
    if settings.rate_limit_enabled:
        state.request_limits.init_app(app)
    if settings.cors_origins:
        CORS(app, resources={r"/api/*": {"origins": list(settings.cors_origins)}}, supports_credentials=False,
             allow_headers=["Content-Type", "X-API-Key", "Authorization"], expose_headers=EXPOSED_HEADERS, max_age=600)
    app.after_request(_audit_response)


def init_auth(app: Flask, settings: Settings, store: Store, outage: Outage | None = None) -> SecurityState:
    """The seed's entry point for a Flask app of your own: wire authentication, rate limiting,
    CORS, security headers and auditing into `app` with the deployment's keys and counters.

    `outage` tracks Redis for this process (pass the app's, so every Redis path shares it)."""
    state = build_security(settings, store, auth_manager_for(settings, store), storage_for(settings, store, outage))
    install_security(app, state)
    state.start()
    return state


EXPOSED_HEADERS = ["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"]
COMMON_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"))
API_CSP = "default-src 'none'; frame-ancestors 'none'"
PAGE_CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


def _security_headers(response: Response) -> Response:
    """Security headers on every response (a view's own, such as the docs page's CSP, win)."""
    headers = response.headers
    wanted = [*COMMON_SECURITY_HEADERS,
              ("Content-Security-Policy", API_CSP if response.mimetype == "application/json" else PAGE_CSP)]
    if request.path.startswith("/api/"):
        wanted.append(("Cache-Control", "no-store"))
    if request.is_secure:
        wanted.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
    present = {name.lower() for name in headers.keys()}  # one pass: Headers.setdefault scans every time
    headers.extend([(name, value) for name, value in wanted if name.lower() not in present])
    return response


def _audit_response(response: Response) -> Response:
    """Audit every write and admin action with its outcome (auth refusals are audited where
    they happen)."""
    view = current_app.view_functions.get(request.endpoint or "")
    if getattr(view, "required_permission", None) not in ("write", "admin") or response.status_code in (401, 403):
        return response
    principal = g.get("quadra_principal")
    target = next(iter((request.view_args or {}).values()), None)
    audit.record(
        current_app.extensions["quadra_security"].store,
        principal.label if principal else "anonymous",
        request.endpoint or request.path,
        "success" if response.status_code < 400 else "failure",
        target=str(target) if target is not None else None,
        status=response.status_code,
        ip=request.remote_addr,
        details=g.get("audit_details", {}),
    )
    return response
