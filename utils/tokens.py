"""JWTs for the API (PyJWT, HS256): what a token carries, how long it may live, and the checks
beyond PyJWT's own."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from utils.errors import InvalidRequest
from utils.instruments import TOKEN_EXPIRATIONS

JWT_ALGORITHM = "HS256"
JWT_ISSUER = "quadra"
JWT_AUDIENCE = "quadra-api"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "jti", "sub"]
TIME_CLAIMS = ("exp", "iat", "nbf")


class TokenCodec:
    """Signs and checks the deployment's tokens with its secret key."""

    def __init__(self, secret_key: str, default_seconds: int, max_seconds: int) -> None:
        self.secret_key = secret_key
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds

    def lifetime(self, expires_in: int | None) -> int:
        """`expires_in` (default: the configured lifetime), refused beyond QUADRA_JWT_MAX_TTL_SECONDS."""
        lifetime = expires_in or self.default_seconds
        if lifetime < 1:
            raise InvalidRequest("expires_in: at least 1 second")
        if lifetime > self.max_seconds:
            raise InvalidRequest(f"expires_in: at most QUADRA_JWT_MAX_TTL_SECONDS ({self.max_seconds})")
        return lifetime

    def encode(self, user_id: str, role: str, permissions: list[str], expires_in: int | None, key_id: str | None) -> str:
        """A signed token; one made for a key (`key_id`) names it in `kid`."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": key_id or user_id, "name": user_id, "role": role, "perms": permissions, "iat": now,
            "exp": now + self.lifetime(expires_in), "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "jti": uuid.uuid4().hex,
        }
        if key_id:
            claims["kid"] = key_id
        return jwt.encode(claims, self.secret_key, algorithm=JWT_ALGORITHM)

    def decode(self, token: str) -> dict[str, Any] | None:
        """The token's claims if its signature, algorithm, issuer, audience and lifetime are
        valid, else None. Beyond what PyJWT checks: the time claims must be JSON numbers (PyJWT
        takes "1999999999" too) and the lifetime (exp - iat) at most `max_seconds`, so a
        validly signed token minted for years is refused."""
        try:
            claims: dict[str, Any] = jwt.decode(token, self.secret_key, algorithms=[JWT_ALGORITHM], audience=JWT_AUDIENCE,
                                                issuer=JWT_ISSUER, options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            TOKEN_EXPIRATIONS.inc()
            return None
        except jwt.PyJWTError:
            return None
        times = [claims[name] for name in TIME_CLAIMS if name in claims]
        if not all(type(value) in (int, float) for value in times):
            return None
        if claims["exp"] - claims["iat"] > self.max_seconds:
            return None
        return claims
