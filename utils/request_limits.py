"""The service-wide rate limit, checked before every request's view.

Built on the `limits` library directly (a fixed window over the store storage of
`rate_limit_storage`, or Redis), not through Flask-Limiter: the extension resolves decorated,
blueprint and default limits with their exemption scopes on every request, which cost about
100 µs per prediction here, more than the rest of the governance together (bench/RESULTS.md).
The service has one limit per caller, so one check is all it needs.

When the shared storage fails (Redis down) and the fallback is on, each process counts in
memory and retries the storage after 1, 2, 4 ... 32 seconds, as Flask-Limiter's in-memory
fallback does; the service keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from flask import Flask, Response, g, request
from limits import parse
from limits.storage import MemoryStorage, Storage
from limits.strategies import FixedWindowRateLimiter

from utils.errors import ApiError

APPLICATION_SCOPE = "global"  # the key segment naming the service-wide limit
MAX_BACKOFF_SECONDS = 32

log = logging.getLogger("quadra.security")
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
        memory_fallback: bool = False,
    ) -> None:
        self.storage = storage
        self.identity = identity
        self.limit_for = limit_for
        self.key_prefix = key_prefix
        self._shared = FixedWindowRateLimiter(storage)
        self._memory = FixedWindowRateLimiter(MemoryStorage()) if memory_fallback else None
        self._failed_checks = 0
        self._next_check: float | None = None  # set while the shared storage is down
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
        strategy = self._strategy()
        try:
            allowed = strategy.hit(item, *args)
            stats = strategy.get_window_stats(item, *args)
        except self.storage.base_exceptions:
            if self._memory is None or strategy is self._memory:
                raise
            self._storage_failed()
            allowed, stats = self._memory.hit(item, *args), self._memory.get_window_stats(item, *args)
        g.rate_limit_window = Window(item.amount, stats.remaining, stats.reset_time)
        if not allowed:
            raise ApiError(429, "too_many_requests", f"rate limit exceeded: {item}",
                           {"Retry-After": str(max(0, int(stats.reset_time - time.time())))})

    def _strategy(self) -> FixedWindowRateLimiter:
        """The shared counters, or this process's memory while they are unreachable."""
        if self._next_check is None or self._memory is None:
            return self._shared
        if time.monotonic() < self._next_check:
            return self._memory
        if self.storage.check():
            log.info("rate-limit storage is back: limits are shared again")
            self._next_check, self._failed_checks = None, 0
            return self._shared
        self._storage_failed()
        return self._memory

    def _storage_failed(self) -> None:
        if self._next_check is None:
            log.warning("rate-limit storage unreachable: each process limits in memory until it is back")
        self._failed_checks += 1
        self._next_check = time.monotonic() + min(MAX_BACKOFF_SECONDS, 2 ** (self._failed_checks - 1))

    @staticmethod
    def _add_headers(response: Response) -> Response:
        window: Window | None = g.get("rate_limit_window")
        if window is not None:
            response.headers["X-RateLimit-Limit"] = str(window.limit)
            response.headers["X-RateLimit-Remaining"] = str(window.remaining)
            response.headers["X-RateLimit-Reset"] = str(int(window.reset_at))
        return response

