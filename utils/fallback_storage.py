"""A `limits` storage that keeps counting in this process's memory while the shared one
(Redis) is unreachable, and returns to it by itself.

Every counter the service keeps in Redis goes through it: the per-request limits, the seed's
`RateLimiter` and the failed-authentication throttle. So a Redis outage never turns a request
into a 500: limits hold per process (a caller can get up to processes x its limit), failed
authentications are still throttled, and the `Outage` logs it once. The memory counts are
not copied back: when Redis answers again, its own counts apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from limits.storage import MemoryStorage, Storage

from utils.outage import Outage

T = TypeVar("T")


class FallbackStorage(Storage):
    """`shared` while it answers, else an in-memory storage (see the module doc)."""

    STORAGE_SCHEME = None  # built directly, never from a URI

    def __init__(self, shared: Storage, outage: Outage) -> None:
        super().__init__()
        self.shared = shared
        self.memory = MemoryStorage()
        self.outage = outage

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return ()  # the shared storage's errors never leave this class

    def _use(self, operation: Callable[[Storage], T]) -> T:
        if self.outage.should_try():
            try:
                result = operation(self.shared)
            except self.shared.base_exceptions as exc:
                self.outage.failed(exc)
            else:
                self.outage.succeeded()
                return result
        return operation(self.memory)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._use(lambda storage: storage.incr(key, expiry, amount))

    def get(self, key: str) -> int:
        return self._use(lambda storage: storage.get(key))

    def get_expiry(self, key: str) -> float:
        return self._use(lambda storage: storage.get_expiry(key))

    def check(self) -> bool:
        """Whether the shared storage answers now (its `check` reports, never raises)."""
        return self.shared.check()

    def reset(self) -> int | None:
        return self._use(lambda storage: storage.reset())

    def clear(self, key: str) -> None:
        self._use(lambda storage: storage.clear(key))
