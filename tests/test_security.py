"""Security through the app: keys, tokens, permissions, rate limits, audit, hardening."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from tests.conftest import epoch, make_settings, set_key_columns
from utils.security import (
    AuthManager,
    Principal,
    RateLimiter,
    SecretsManager,
    normalize_permissions,
    storage_for,
)
from utils.tokens import JWT_AUDIENCE, JWT_ISSUER

SETOSA = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "a valid API key (X-API-Key header) or bearer token is required"}}


def make_app(state_dir: Path, **overrides):
    from app import create_app, start_serving

    application = create_app(make_settings(state_dir, **overrides))
    start_serving(application)
    return application


def auth_of(app) -> AuthManager:
    return app.extensions["quadra"].auth


def audit_actions(app) -> list[str]:
    return [e.action for e in app.extensions["quadra"].store.audit.list(200)]


# -- who gets in -----------------------------------------------------------------------


def test_missing_garbage_revoked_expired_and_query_string_keys_get_the_same_401(app, anonymous, api_keys) -> None:
    auth = auth_of(app)
    revoked, record = auth.create_api_key("to-revoke", ["admin"])
    auth.revoke_api_key(record["id"])
    expired, record = auth.create_api_key("to-expire", ["admin"])
    set_key_columns(app.extensions["quadra"].store, record["id"], expires_at=time.time() - 1)
    attempts = [
        anonymous.get("/api/model/versions"),
        anonymous.get("/api/model/versions", headers={"X-API-Key": "qk_garbage"}),
        anonymous.get("/api/model/versions", headers={"X-API-Key": revoked}),
        anonymous.get("/api/model/versions", headers={"X-API-Key": expired}),
        anonymous.get(f"/api/model/versions?api_key={api_keys['admin']}"),
        anonymous.get(f"/api/model/versions?X-API-Key={api_keys['admin']}"),
    ]
    for response in attempts:
        assert response.status_code == 401
        assert response.get_json() == UNAUTHORIZED
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert audit_actions(app).count("auth.failure") == len(attempts)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("post", "/api/model/save", {"version": "3.0.0"}),
        ("post", "/api/model/promote/1.0.0", None),
        ("post", "/api/model/load/1.0.0", None),
        ("post", "/api/model/rollback", None),
        ("delete", "/api/model/versions/1.0.0", None),
        ("get", "/api/auth/keys", None),
        ("post", "/api/auth/keys", {"name": "x"}),
        ("get", "/api/audit", None),
    ],
)
def test_read_key_is_forbidden_on_write_and_admin_endpoints(app, anonymous, api_keys, method: str, path: str, body) -> None:
    response = getattr(anonymous, method)(path, json=body, headers={"X-API-Key": api_keys["read"]})
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "forbidden"
    entry = app.extensions["quadra"].store.audit.list(1)[0]
    assert entry.action == "auth.forbidden" and entry.outcome == "denied" and entry.actor.startswith("test-read")
    assert entry.target == path and entry.ip == "127.0.0.1"


def test_permissions_rank_read_write_admin(anonymous, api_keys) -> None:
    for permission in ("read", "write", "admin"):
        headers = {"X-API-Key": api_keys[permission]}
        assert anonymous.post("/api/predict", json=SETOSA, headers=headers).status_code == 200
        assert anonymous.get("/api/model/versions", headers=headers).status_code == 200
    assert anonymous.post("/api/model/save", json={"version": "3.0.0"}, headers={"X-API-Key": api_keys["write"]}).status_code == 201
    assert anonymous.post("/api/model/promote/3.0.0", headers={"X-API-Key": api_keys["write"]}).status_code == 403
    assert anonymous.post("/api/model/promote/3.0.0", headers={"X-API-Key": api_keys["admin"]}).status_code == 200


def test_public_endpoints_need_no_key(anonymous) -> None:
    assert anonymous.get("/api/health").status_code == 200
    assert anonymous.get("/api/health", headers={"X-API-Key": "garbage"}).status_code == 200


def test_write_and_admin_actions_are_audited(app, client) -> None:
    client.post("/api/model/save", json={"version": "3.0.0"})
    client.post("/api/model/promote/3.0.0")
    client.post("/api/model/promote/9.9.9")
    entries = app.extensions["quadra"].store.audit.list(3)
    assert [(e.action, e.outcome, e.target, e.status) for e in entries] == [
        ("registry.promote_version", "failure", "9.9.9", 404),
        ("registry.promote_version", "success", "3.0.0", 200),
        ("registry.save_model", "success", None, 201),
    ]
    assert all(e.actor.startswith("test-admin (key_") for e in entries)


# -- keys -------------------------------------------------------------------------------


def test_keys_are_stored_only_as_keyed_hashes(app, client) -> None:
    created = client.post("/api/auth/keys", json={"name": "ci-bot", "permissions": ["read", "write"]}).get_json()
    api_key = created["api_key"]
    assert api_key.startswith("qk_") and len(api_key) >= 40
    row = app.extensions["quadra"].store.keys.get(created["id"])
    secret = app.extensions["quadra"].auth.secret_key
    assert row.key_hash == SecretsManager(secret_key=secret).hash_api_key(api_key) != api_key
    listed = client.get("/api/auth/keys").get_json()["keys"]
    text = str(listed)
    assert api_key not in text and row.key_hash not in text and "key_hash" not in text
    mine = next(k for k in listed if k["id"] == created["id"])
    assert mine["display"] == f"{api_key[:7]}…{api_key[-4:]}" and mine["permissions"] == ["read", "write"]
    assert epoch(mine["expires_at"]) == pytest.approx(time.time() + 90 * 86400, abs=60)


def test_key_made_in_a_console_works_at_once_and_revocation_within_seconds(app, anonymous, settings) -> None:
    console = AuthManager(app.extensions["quadra"].auth.secret_key, store=app.extensions["quadra"].store)
    record = console.register_api_key(user_id="notebook", permissions=["read"])
    headers = {"X-API-Key": record["api_key"]}
    assert anonymous.get("/api/model/versions", headers=headers).status_code == 200
    console.revoke_api_key(record["id"])
    deadline = time.monotonic() + settings.auth_cache_seconds + 3
    while anonymous.get("/api/model/versions", headers=headers).status_code == 200:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.2)


def test_rotation_keeps_the_old_key_for_the_grace_period(client, anonymous) -> None:
    created = client.post("/api/auth/keys", json={"name": "svc", "permissions": ["read"], "rate_limit": "50 per minute"}).get_json()
    rotated = client.post(f"/api/auth/keys/{created['id']}/rotate", json={"grace_seconds": 8}).get_json()
    assert rotated["name"] == "svc" and rotated["permissions"] == ["read"] and rotated["rate_limit"] == "50 per minute"
    assert anonymous.get("/api/model/versions", headers={"X-API-Key": rotated["api_key"]}).status_code == 200
    assert anonymous.get("/api/model/versions", headers={"X-API-Key": created["api_key"]}).status_code == 200
    deadline = time.monotonic() + 60  # the grace period, the auth cache, and a busy machine
    while anonymous.get("/api/model/versions", headers={"X-API-Key": created["api_key"]}).status_code == 200:
        assert time.monotonic() < deadline, "the old key outlived its grace period"
        time.sleep(0.5)
    assert anonymous.get("/api/model/versions", headers={"X-API-Key": rotated["api_key"]}).status_code == 200
    assert client.post(f"/api/auth/keys/{created['id']}/rotate").status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "x", "permissions": ["root"]},
        {"name": "x", "permissions": []},
        {"name": "x", "rate_limit": "lots"},
        {"name": "x", "expires_days": -1},
        {"name": "x", "owner": "me"},
        {"name": 5},
    ],
)
def test_key_creation_validates(client, body: dict) -> None:
    response = client.post("/api/auth/keys", json=body)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_body"


def test_unknown_key_ids(client) -> None:
    assert client.delete("/api/auth/keys/key_nope").status_code == 404
    assert client.post("/api/auth/keys/key_nope/rotate").status_code == 404


def test_bootstrap_key_only_when_there_is_no_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    app = make_app(tmp_path / "fresh")
    printed = capsys.readouterr().err
    assert "bootstrap admin key" in printed
    api_key = next(line.strip() for line in printed.splitlines() if line.strip().startswith("qk_"))
    client = app.test_client()
    assert client.get("/api/auth/keys", headers={"X-API-Key": api_key}).status_code == 200
    app.extensions["quadra"].store.database.dispose()
    again = make_app(tmp_path / "fresh")
    assert "bootstrap" not in capsys.readouterr().err
    assert len(auth_of(again).list_api_keys()) == 1
    again.extensions["quadra"].store.database.dispose()


# -- tokens -----------------------------------------------------------------------------


def test_token_carries_the_key_and_at_most_its_permissions(app, anonymous, api_keys) -> None:
    response = anonymous.post("/api/auth/token", headers={"X-API-Key": api_keys["write"]})
    assert response.status_code == 200
    token = response.get_json()
    assert token["token_type"] == "Bearer" and token["permissions"] == ["write"]
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert claims["kid"] == claims["sub"] and claims["sub"].startswith("key_")
    assert {"exp", "iat", "iss", "aud", "jti"} <= set(claims)
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert anonymous.post("/api/model/save", json={"version": "4.0.0"}, headers=bearer).status_code == 201
    assert anonymous.post("/api/model/promote/4.0.0", headers=bearer).status_code == 403


def test_token_cannot_be_escalated(anonymous, api_keys) -> None:
    assert anonymous.post("/api/auth/token").status_code == 401
    read = {"X-API-Key": api_keys["read"]}
    assert anonymous.post("/api/auth/token", json={"role": "admin"}, headers=read).status_code == 400
    assert anonymous.post("/api/auth/token", json={"permissions": ["admin"]}, headers=read).status_code == 403
    token = anonymous.post("/api/auth/token", headers=read).get_json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/api/auth/keys", headers=bearer).status_code == 403
    assert anonymous.post("/api/auth/token", headers=bearer).status_code == 401


def test_narrower_token_from_an_admin_key(anonymous, api_keys) -> None:
    body = anonymous.post(
        "/api/auth/token", json={"permissions": ["read"], "expires_in": 120}, headers={"X-API-Key": api_keys["admin"]}
    ).get_json()
    assert body["permissions"] == ["read"] and body["expires_in"] == 120
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert anonymous.get("/api/model/versions", headers=bearer).status_code == 200
    assert anonymous.get("/api/auth/keys", headers=bearer).status_code == 403


def test_revoking_the_key_kills_its_tokens(app, anonymous) -> None:
    auth = auth_of(app)
    api_key, record = auth.create_api_key("short-lived", ["read"])
    token = anonymous.post("/api/auth/token", headers={"X-API-Key": api_key}).get_json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/api/model/versions", headers=bearer).status_code == 200
    auth.revoke_api_key(record["id"])
    assert anonymous.get("/api/model/versions", headers=bearer).status_code == 401


def test_whoami_names_the_caller_never_the_key(app, anonymous, api_keys) -> None:
    admin = anonymous.get("/api/auth/whoami", headers={"X-API-Key": api_keys["admin"]})
    assert admin.status_code == 200
    body = admin.get_json()
    assert set(body) == {"id", "name", "permissions", "via", "rate_limit"}
    assert body["id"].startswith("key_") and body["name"] == "test-admin"
    assert body["permissions"] == ["admin"] and body["via"] == "api_key" and body["rate_limit"] is None
    row = app.extensions["quadra"].store.keys.get(body["id"])
    assert api_keys["admin"] not in admin.get_data(as_text=True) and row.key_hash not in admin.get_data(as_text=True)

    reader = anonymous.get("/api/auth/whoami", headers={"X-API-Key": api_keys["read"]}).get_json()
    assert reader["name"] == "test-read" and reader["permissions"] == ["read"] and reader["via"] == "api_key"

    token = anonymous.post("/api/auth/token", json={"permissions": ["read"]}, headers={"X-API-Key": api_keys["admin"]})
    bearer = {"Authorization": f"Bearer {token.get_json()['access_token']}"}
    via_token = anonymous.get("/api/auth/whoami", headers=bearer).get_json()
    assert via_token == {**body, "permissions": ["read"], "via": "jwt"}

    missing = anonymous.get("/api/auth/whoami")
    assert missing.status_code == 401 and missing.get_json() == UNAUTHORIZED


def _claims(**overrides) -> dict:
    now = int(time.time())
    claims = {
        "sub": "ops", "name": "ops", "perms": ["admin"], "iat": now, "exp": now + 600, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "jti": "x",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_forged_and_malformed_tokens_are_refused(app, anonymous) -> None:
    secret = auth_of(app).secret_key
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    payload = jwt.utils.base64url_encode(jwt.api_jws.json.dumps(_claims()).encode()).decode()
    tokens = {
        "alg none": f"{header}.{payload}.",
        "wrong key": jwt.encode(_claims(), "not-the-server-secret-but-long-enough-0123456789", algorithm="HS256"),
        "no exp": jwt.encode(_claims(exp=None), secret, algorithm="HS256"),
        "expired": jwt.encode(_claims(exp=int(time.time()) - 10), secret, algorithm="HS256"),
        "wrong aud": jwt.encode(_claims(aud="someone-else"), secret, algorithm="HS256"),
        "wrong iss": jwt.encode(_claims(iss="evil"), secret, algorithm="HS256"),
        "no jti": jwt.encode(_claims(jti=None), secret, algorithm="HS256"),
        "HS512": jwt.encode(_claims(), secret, algorithm="HS512"),
        "garbage": "not.a.token",
    }
    for name, token in tokens.items():
        response = anonymous.get("/api/model/versions", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, name
    valid = jwt.encode(_claims(), secret, algorithm="HS256")
    assert anonymous.get("/api/model/versions", headers={"Authorization": f"Bearer {valid}"}).status_code == 200


def test_tokens_minted_for_too_long_or_with_text_times_are_refused(app, anonymous, settings) -> None:
    """Validly signed, yet: a lifetime far beyond QUADRA_JWT_MAX_TTL_SECONDS, or time claims
    given as numeric strings (which PyJWT alone accepts)."""
    secret, now = auth_of(app).secret_key, int(time.time())
    longest = settings.jwt_max_ttl_seconds
    tokens = {
        "three years": _claims(iat=now, exp=now + 3 * 365 * 86400),
        "one second too long": _claims(iat=now, exp=now + longest + 1),
        "exp as text": _claims(exp=str(now + 600)),
        "iat as text": _claims(iat=str(now)),
        "nbf as text": _claims(nbf=str(now - 10)),
        "exp as boolean": _claims(exp=True),
    }
    for name, claims in tokens.items():
        token = jwt.encode(claims, secret, algorithm="HS256")
        response = anonymous.get("/api/model/versions", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, name
    at_the_limit = jwt.encode(_claims(iat=now, exp=now + longest), secret, algorithm="HS256")
    assert anonymous.get("/api/model/versions", headers={"Authorization": f"Bearer {at_the_limit}"}).status_code == 200


def test_token_requests_beyond_the_maximum_lifetime_are_refused(app, anonymous, api_keys, settings) -> None:
    too_long = anonymous.post("/api/auth/token", json={"expires_in": settings.jwt_max_ttl_seconds + 1},
                              headers={"X-API-Key": api_keys["read"]})
    assert too_long.status_code == 400 and "QUADRA_JWT_MAX_TTL_SECONDS" in too_long.get_json()["error"]["message"]
    longest = anonymous.post("/api/auth/token", json={"expires_in": settings.jwt_max_ttl_seconds},
                             headers={"X-API-Key": api_keys["read"]})
    assert longest.status_code == 200
    with pytest.raises(ValueError, match="QUADRA_JWT_MAX_TTL_SECONDS"):
        auth_of(app).generate_token("alice", "read", expires_in=settings.jwt_max_ttl_seconds + 1)


def test_seed_token_api(app) -> None:
    auth = auth_of(app)
    token = auth.generate_token("alice", "admin")
    payload = auth.verify_token(token)
    assert payload["sub"] == "alice" and payload["role"] == "admin" and payload["perms"] == ["admin"]
    assert auth.verify_token(token + "x") is None
    assert auth.check_permission(payload, "write") and auth.check_permission({"role": "read"}, "read")
    assert not auth.check_permission({"role": "read"}, "write") and not auth.check_permission(None, "read")
    assert auth.check_permission(Principal("k", "k", ("write",)), "read")


def test_seed_secrets_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = SecretsManager(env_prefix="QUADRA_", secret_key="s" * 40)
    manager.set_secret("webhook_token", "abc")
    assert manager.get_secret("WEBHOOK_TOKEN") == "abc" and manager.get_secret("missing", "d") == "d"
    key = manager.generate_api_key()
    digest = manager.hash_api_key(key)
    assert key.startswith("qk_") and len(digest) == 64 and manager.verify_api_key(key, digest)
    assert not manager.verify_api_key(key + "x", digest)
    assert SecretsManager(secret_key="t" * 40).hash_api_key(key) != digest
    monkeypatch.delenv("QUADRA_WEBHOOK_TOKEN")


def test_permission_names_are_validated() -> None:
    assert normalize_permissions(["admin", "read"]) == ["read", "admin"]
    for bad in (["root"], [], [""]):
        with pytest.raises(ValueError):
            normalize_permissions(bad)


# -- rate limits ------------------------------------------------------------------------


def test_limit_exceeded_gives_429_with_headers_then_resets(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=5, rate_window=2)
    client = app.test_client()
    headers = {"X-API-Key": api_keys["read"]}
    time.sleep(2 - time.time() % 2 + 0.05)  # start at the beginning of a window
    statuses = [client.post("/api/predict", json=SETOSA, headers=headers) for _ in range(6)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429]
    limited = statuses[-1]
    assert limited.get_json()["error"]["code"] == "too_many_requests"
    assert limited.headers["X-RateLimit-Limit"] == "5" and limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["Retry-After"]) >= 0 and int(limited.headers["X-RateLimit-Reset"]) > time.time() - 1
    assert statuses[0].headers["X-RateLimit-Remaining"] == "4" and "Retry-After" not in statuses[0].headers
    time.sleep(2.2)
    assert client.post("/api/predict", json=SETOSA, headers=headers).status_code == 200
    app.extensions["quadra"].store.database.dispose()


def test_limit_is_per_key_and_honours_a_keys_own_tier(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=3, rate_window=60)
    premium, _ = auth_of(app).create_api_key("premium", ["read"], rate_limit="10 per minute")
    client = app.test_client()
    codes = lambda key, n: [client.get("/api/model/versions", headers={"X-API-Key": key}).status_code for _ in range(n)]  # noqa: E731
    assert codes(api_keys["read"], 4) == [200, 200, 200, 429]
    assert codes(api_keys["write"], 3) == [200, 200, 200]
    assert codes(premium, 11) == [200] * 10 + [429]
    app.extensions["quadra"].store.database.dispose()


def test_seed_rate_limiter_reports_the_services_counters(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=10, rate_window=60)
    client = app.test_client()
    principal = auth_of(app).authenticate_key(api_keys["read"])
    for _ in range(4):
        client.get("/api/model/versions", headers={"X-API-Key": api_keys["read"]})
    security = app.extensions["quadra_security"]
    limiter = security.rate_limiter
    identifier = f"key:{principal.id}"
    assert limiter.get_remaining(identifier) == 6  # this process's count, before it is shared
    assert 0 < limiter.get_reset_time(identifier) <= 60  # seconds until the window resets
    security.request_limits.storage.sync()  # what the background sync does every QUADRA_RATE_LIMIT_SYNC_SECONDS
    settings = app.extensions["quadra"].settings
    console = RateLimiter(10, 60, storage=storage_for(settings, app.extensions["quadra"].store), key_prefix=settings.redis_prefix)
    assert console.get_remaining(identifier) == 6
    assert console.is_allowed(identifier) and console.get_remaining(identifier) == 5
    security.request_limits.storage.sync()  # nothing counted here since: the next request reads the shared count
    assert client.get("/api/model/versions", headers={"X-API-Key": api_keys["read"]}).headers["X-RateLimit-Remaining"] == "4"
    app.extensions["quadra"].store.database.dispose()


def test_anonymous_callers_are_limited_by_address_and_xff_is_ignored(state_dir: Path) -> None:
    app = make_app(state_dir, max_requests=3, rate_window=60)
    client = app.test_client()
    codes = [client.get("/api/model/versions", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    app.extensions["quadra"].store.database.dispose()


def test_trusted_proxy_makes_xff_the_client_address(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=2, rate_window=60, trusted_proxies=1)
    client = app.test_client()
    first = [
        client.post("/api/predict", json=SETOSA, headers={"X-Forwarded-For": "203.0.113.7", "X-API-Key": "bad"}).status_code
        for _ in range(3)
    ]
    other = client.post("/api/predict", json=SETOSA, headers={"X-Forwarded-For": "203.0.113.8", "X-API-Key": "bad"})
    assert first == [401, 401, 429] and other.status_code == 401
    entry = app.extensions["quadra"].store.audit.list(1)[0]
    assert entry.ip == "203.0.113.8"
    app.extensions["quadra"].store.database.dispose()


def test_health_is_never_rate_limited(state_dir: Path) -> None:
    app = make_app(state_dir, max_requests=1, rate_window=60)
    client = app.test_client()
    assert all(client.get("/api/health").status_code == 200 for _ in range(5))
    app.extensions["quadra"].store.database.dispose()


def test_repeated_auth_failures_are_throttled_with_one_alert(state_dir: Path) -> None:
    app = make_app(state_dir, auth_failure_limit="3 per minute")
    client = app.test_client()
    codes = [client.get("/api/model/versions", headers={"X-API-Key": f"qk_guess{i}"}).status_code for i in range(6)]
    assert codes == [401, 401, 401, 429, 429, 429]
    throttled = client.get("/api/model/versions", headers={"X-API-Key": "qk_guess"})
    assert throttled.get_json()["error"] == {"code": "too_many_requests", "message": "too many failed authentications from this address"}
    assert int(throttled.headers["Retry-After"]) > 0
    actions = audit_actions(app)
    assert actions.count("alert.auth_failures") == 1 and actions.count("auth.failure") == 3
    app.extensions["quadra"].store.database.dispose()


def test_rate_limiting_can_be_disabled(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=1, rate_limit_enabled=False)
    client = app.test_client()
    assert all(client.get("/api/model/versions", headers={"X-API-Key": api_keys["read"]}).status_code == 200 for _ in range(3))
    app.extensions["quadra"].store.database.dispose()


def test_redis_down_falls_back_to_per_process_limits(state_dir: Path, api_keys) -> None:
    app = make_app(state_dir, max_requests=3, rate_window=60, redis_url="redis://127.0.0.1:1/0")
    client = app.test_client()
    codes = [client.get("/api/model/versions", headers={"X-API-Key": api_keys["read"]}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    app.extensions["quadra"].store.database.dispose()


def test_redis_down_still_answers_401_and_throttles_failed_authentications(
        state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every Redis-backed path degrades alike: the failed-authentication counter falls back to
    this process's memory too, and the outage is logged once, not per request."""
    app = make_app(state_dir, redis_url="redis://127.0.0.1:1/0", auth_failure_limit="10 per minute")
    client = app.test_client()
    with caplog.at_level("INFO"):
        wrong = [client.get("/api/model/versions", headers={"X-API-Key": f"qk_wrong{i}"}) for i in range(15)]
        missing = client.post("/api/predict", json=SETOSA)
    assert [r.status_code for r in wrong] == [401] * 10 + [429] * 5
    assert wrong[0].get_json() == UNAUTHORIZED
    assert wrong[-1].get_json()["error"]["code"] == "too_many_requests"
    assert missing.status_code == 429
    outage_lines = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(outage_lines) == 1 and "per process" in outage_lines[0].getMessage()
    assert app.test_client().get("/api/health").status_code == 200
    app.extensions["quadra"].store.database.dispose()


def test_retry_after_is_never_zero_while_refused(state_dir: Path, api_keys) -> None:
    """A 1-second window: every refusal falls in the window's last second, where truncating
    gave `Retry-After: 0` and a reset time already past. Waiting as told must succeed."""
    app = make_app(state_dir, max_requests=1, rate_window=1)
    client = app.test_client()
    headers = {"X-API-Key": api_keys["read"]}
    for _ in range(5):
        client.get("/api/model/versions", headers=headers)
        refused = client.get("/api/model/versions", headers=headers)
        if refused.status_code != 429:
            continue  # the window turned between the two requests
        now = time.time()
        assert int(refused.headers["Retry-After"]) >= 1
        assert int(refused.headers["X-RateLimit-Reset"]) >= now
        time.sleep(int(refused.headers["Retry-After"]))
        assert client.get("/api/model/versions", headers=headers).status_code == 200
    app.extensions["quadra"].store.database.dispose()


def test_seconds_until_rounds_up() -> None:
    from utils.errors import seconds_until

    now = time.time()
    assert seconds_until(now + 0.2) == 1 and seconds_until(now - 5) == 1 and seconds_until(now + 2.5) == 3


# -- hardening --------------------------------------------------------------------------


def test_security_headers(anonymous) -> None:
    headers = anonymous.get("/api/health").headers
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "Strict-Transport-Security" not in headers
    assert "Strict-Transport-Security" in anonymous.get("/api/health", base_url="https://localhost").headers


def test_cors_only_for_configured_origins(state_dir: Path) -> None:
    closed = make_app(state_dir).test_client()
    assert "Access-Control-Allow-Origin" not in closed.get("/api/health", headers={"Origin": "https://evil.example"}).headers
    app = make_app(state_dir, cors_origins=("https://ops.example",))
    client = app.test_client()
    allowed = client.get("/api/health", headers={"Origin": "https://ops.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ops.example"
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    refused = client.get("/api/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    preflight = client.options(
        "/api/predict",
        headers={"Origin": "https://ops.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"},
    )
    assert "x-api-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    app.extensions["quadra"].store.database.dispose()


def test_auth_disabled_outside_production_is_loud(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(state_dir, auth_enabled=False)
    assert "AUTHENTICATION IS DISABLED" in caplog.text
    client = app.test_client()
    assert client.post("/api/model/save", json={"version": "5.0.0"}).status_code == 201
    app.extensions["quadra"].store.database.dispose()


def test_keys_never_reach_the_log(app, client, caplog: pytest.LogCaptureFixture) -> None:
    created = client.post("/api/auth/keys", json={"name": "secret-check", "permissions": ["read"]}).get_json()
    client.get("/api/model/versions", headers={"X-API-Key": created["api_key"]})
    client.get("/api/model/versions", headers={"X-API-Key": created["api_key"] + "x"})
    assert created["api_key"] not in caplog.text


def test_cli_key_management(app) -> None:
    runner = app.test_cli_runner()
    created = runner.invoke(args=["keys", "create", "--name", "cron", "--permissions", "read,write"])
    assert created.exit_code == 0
    api_key = created.stdout.strip().splitlines()[-1]
    assert api_key.startswith("qk_")
    assert auth_of(app).authenticate_key(api_key).permissions == ("read", "write")
    listing = runner.invoke(args=["keys", "list"]).output
    assert "cron" in listing and api_key not in listing and f"{api_key[:7]}…{api_key[-4:]}" in listing
    key_id = auth_of(app).authenticate_key(api_key).id
    rotated = runner.invoke(args=["keys", "rotate", key_id, "--grace-hours", "0"])
    new_key = rotated.stdout.strip().splitlines()[-1]
    assert rotated.exit_code == 0 and auth_of(app).authenticate_key(new_key) is not None
    assert runner.invoke(args=["keys", "revoke", "key_nope"]).exit_code != 0
    new_id = auth_of(app).authenticate_key(new_key).id
    assert runner.invoke(args=["keys", "revoke", new_id]).exit_code == 0
    time.sleep(app.extensions["quadra"].settings.auth_cache_seconds + 0.1)
    assert auth_of(app).authenticate_key(new_key) is None
    assert runner.invoke(args=["keys", "create", "--name", "x", "--permissions", "root"]).exit_code != 0
    audit_output = runner.invoke(args=["audit", "--action", "keys."]).output
    assert "keys.create" in audit_output and "keys.rotate" in audit_output and "keys.revoke" in audit_output
