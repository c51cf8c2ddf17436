"""A `limits` storage backend over the Quadra store, so rate limits hold across every gunicorn
worker, host and console sharing one database without Redis.

Fixed-window counters only (the strategy Quadra configures). Each hit is one small upsert; on
SQLite (WAL, synchronous=NORMAL) that is no fsync per request. The window that an increment
returns is remembered briefly, so the rate-limit headers computed right after it in the same
request cost no second and third query.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from limits.storage import Storage
from sqlalchemy.exc import SQLAlchemyError

from utils.store import Store

SCHEME = "quadra+store"
PURGE_EVERY = 1000
RECENT_SECONDS = 0.5


class StoreRateLimitStorage(Storage):
    """Use as `storage_from_string("quadra+store://", store=store)`."""

    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        store = options.pop("store", None)
        if not isinstance(store, Store):
            raise ValueError("StoreRateLimitStorage needs store=<utils.store.Store>")
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.store = store
        self._increments = 0
        self._recent = threading.local()

    @property
    def base_exceptions(self) -> type[Exception]:
        return SQLAlchemyError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        self._increments += 1
        if self._increments % PURGE_EVERY == 0:
            self.store.counter_purge_expired()
        count, expires_at = self.store.counter_incr(key, expiry, amount)
        self._recent.window = (key, count, expires_at, time.monotonic())
        return count

    def _window(self, key: str) -> tuple[int, float]:
        recent = getattr(self._recent, "window", None)
        if recent is not None and recent[0] == key and time.monotonic() - recent[3] < RECENT_SECONDS:
            return recent[1], recent[2]
        return self.store.counter_get(key)

    def get(self, key: str) -> int:
        return self._window(key)[0]

    def get_expiry(self, key: str) -> float:
        return self._window(key)[1]

    def check(self) -> bool:
        try:
            self.store.ping()
            return True
        except SQLAlchemyError:
            return False

    def reset(self) -> int | None:
        return self.store.counter_clear()

    def clear(self, key: str) -> None:
        self.store.counter_clear(key)
