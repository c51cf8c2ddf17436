"""The service-wide rate limit, checked before every request's view.

Built on the `limits` library directly (a fixed window over the store storage of
`rate_limit_storage`, or Redis), not through Flask-Limiter: the extension resolves decorated,
blueprint and default limits with their exemption scopes on every request, which cost about
100 µs per prediction here, more than the rest of the governance together (bench/RESULTS.md).
The service has one limit per caller, so one check is all it needs.

A Redis outage is handled by the storage itself (`utils.fallback_storage`): each process
counts in memory until Redis is back, so this check never fails a request because of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from flask import Flask, Response, g, request
from limits import parse
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from utils.errors import TooManyRequests

APPLICATION_SCOPE = "global"  # the key segment naming the service-wide limit

parse_limit = lru_cache(maxsize=1024)(parse)


def counter_args(key_prefix: str, identifier: str) -> tuple[str, ...]:
    """The parts of a caller's counter key, shared with the seed's `RateLimiter`."""
    return (key_prefix, identifier, APPLICATION_SCOPE) if key_prefix else (identifier, APPLICATION_SCOPE)


@dataclass(frozen=True)
class Window:
    """What a request's rate-limit headers report."""

    limit: int
    remaining: int
    reset_at: float


class RequestLimits:
    """One limit per caller (`identity()`), of `limit_for(identity)` requests per window."""

    def __init__(
        self,
        storage: Storage,
        identity: Callable[[], str],
        limit_for: Callable[[str], str],
        key_prefix: str,
    ) -> None:
        self.storage = storage
        self.identity = identity
        self.limit_for = limit_for
        self.key_prefix = key_prefix
        self._strategy = FixedWindowRateLimiter(storage)
        self._exempt: set[str] = set()

    def init_app(self, app: Flask) -> None:
        app.before_request(self._enforce)
        app.after_request(self._add_headers)

    def exempt(self, name: str) -> None:
        """Exempt a blueprint (its name) or an endpoint."""
        self._exempt.add(name)

    def applies_to(self, endpoint: str | None) -> bool:
        """Unrouted requests and static files are never limited, nor exempt views."""
        if not endpoint or endpoint.rpartition(".")[2] == "static":
            return False
        return endpoint not in self._exempt and endpoint.partition(".")[0] not in self._exempt

    def _enforce(self) -> None:
        if not self.applies_to(request.endpoint):
            return
        identifier = self.identity()
        item = parse_limit(self.limit_for(identifier))
        args = counter_args(self.key_prefix, identifier)
        allowed = self._strategy.hit(item, *args)
        stats = self._strategy.get_window_stats(item, *args)
        g.rate_limit_window = Window(item.amount, stats.remaining, stats.reset_time)
        if not allowed:
            raise TooManyRequests(f"rate limit exceeded: {item}", stats.reset_time)

    @staticmethod
    def _add_headers(response: Response) -> Response:
        window: Window | None = g.get("rate_limit_window")
        if window is not None:
            response.headers["X-RateLimit-Limit"] = str(window.limit)
            response.headers["X-RateLimit-Remaining"] = str(window.remaining)
            response.headers["X-RateLimit-Reset"] = str(math.ceil(window.reset_at))
        return response

