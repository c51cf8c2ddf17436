"""A `limits` storage backend over the Quadra store, so rate limits hold across every gunicorn
worker, host and console sharing one database without Redis.

Fixed-window counters only (the strategy Quadra configures). By default a request writes
nothing: each process counts its own hits and adds them to the shared counter every
`sync_seconds` (QUADRA_RATE_LIMIT_SYNC_SECONDS), reading back the total of every process, the
way Kong's `sync_rate` works. A process never refuses a request before the shared count
reaches the limit (its own view is never above the true count); a burst spread over several
workers can pass the limit by what the others admitted since their last sync. The first hit
of a window in a process (or after a quiet sync interval) is written at once, so a quiet key
always starts from the shared count. With `sync_seconds=0` every hit is one small upsert and
the limit is exact.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from limits.storage import Storage
from sqlalchemy.exc import SQLAlchemyError

from utils.store import Store

SCHEME = "quadra+store"
PURGE_EVERY = 1000
RECENT_SECONDS = 0.5

log = logging.getLogger("quadra.security")


@dataclass
class _Window:
    """This process's view of one shared fixed-window counter."""

    expiry: int
    shared: int  # the store's count at the last write
    expires_at: float
    written_at: float  # time.monotonic() of that write
    pending: int = 0  # hits counted here since then

    @property
    def count(self) -> int:
        return self.shared + self.pending


class StoreRateLimitStorage(Storage):
    """Use as `storage_from_string("quadra+store://", store=store, sync_seconds=0.1)`."""

    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        store = options.pop("store", None)
        if not isinstance(store, Store):
            raise ValueError("StoreRateLimitStorage needs store=<utils.store.Store>")
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.store = store
        self.sync_seconds = float(options.pop("sync_seconds", 0.0))
        self._increments = 0
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._syncer: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def base_exceptions(self) -> type[Exception]:
        return SQLAlchemyError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        if self.sync_seconds > 0:
            with self._lock:
                window = self._windows.get(key)
                if window is not None and time.time() < window.expires_at:
                    window.pending += amount
                    return window.count
        return self._write(key, expiry, amount)

    def _write(self, key: str, expiry: int, amount: int) -> int:
        """Add `amount` to the shared counter now; remember the window it returns."""
        self._increments += 1
        if self._increments % PURGE_EVERY == 0:
            self._purge()
        count, expires_at = self.store.counters.incr(key, expiry, amount)
        with self._lock:
            self._observe(key, expiry, count, expires_at)
        return count

    def _observe(self, key: str, expiry: int, count: int, expires_at: float, synced: int = 0) -> None:
        """Take in a count the store returned (the caller holds the lock). Concurrent writes
        return in any order: the highest count of a window is the latest."""
        window = self._windows.get(key)
        if window is None or window.expires_at != expires_at:
            self._windows[key] = _Window(expiry, count, expires_at, time.monotonic())
            return
        window.pending -= synced
        window.shared, window.written_at = max(window.shared, count), time.monotonic()

    def _window(self, key: str) -> tuple[int, float]:
        """(count, expires_at): this process's view while it is fresh, else the store's."""
        with self._lock:
            window = self._windows.get(key)
        if window is not None and time.time() < window.expires_at:
            if self.sync_seconds > 0 or time.monotonic() - window.written_at < RECENT_SECONDS:
                return window.count, window.expires_at
        return self.store.counters.get(key)

    def get(self, key: str) -> int:
        return self._window(key)[0]

    def get_expiry(self, key: str) -> float:
        return self._window(key)[1]

    def sync(self) -> None:
        """Add the hits counted here to the shared counters and read back their totals.

        A window with no hit since the last sync is forgotten: its next hit is written at once."""
        with self._lock:
            now = time.time()
            self._windows = {k: w for k, w in self._windows.items() if w.pending and now < w.expires_at}
            batch = [(key, window.expiry, window.pending) for key, window in self._windows.items()]
        for key, expiry, pending in batch:
            count, expires_at = self.store.counters.incr(key, expiry, pending)
            with self._lock:
                self._observe(key, expiry, count, expires_at, synced=pending)

    def share(self) -> None:
        """`sync`, logging instead of raising a store error (the hits stay for the next)."""
        try:
            self.sync()
        except SQLAlchemyError:
            log.exception("could not share rate-limit counts")

    def start(self) -> None:
        """Start the background sync every `sync_seconds` (idempotent; nothing to do at 0).
        Whoever starts it closes the storage at exit."""
        with self._lock:
            if self.sync_seconds > 0 and self._syncer is None:
                self._stopping.clear()
                self._syncer = threading.Thread(target=self._sync_forever, name="quadra-rate-limit-sync", daemon=True)
                self._syncer.start()

    def close(self) -> None:
        """Stop the background sync and share what is still counted only here, so a restart
        loses no hit."""
        self._stopping.set()
        syncer, self._syncer = self._syncer, None
        if syncer is not None and syncer is not threading.current_thread():
            syncer.join(timeout=5.0)
        self.share()

    def _sync_forever(self) -> None:
        while not self._stopping.wait(self.sync_seconds):
            self.share()

    def _purge(self) -> None:
        self.store.counters.purge_expired()
        with self._lock:
            now = time.time()
            self._windows = {k: w for k, w in self._windows.items() if now < w.expires_at}

    def check(self) -> bool:
        try:
            self.store.database.ping()
            return True
        except SQLAlchemyError:
            return False

    def reset(self) -> int | None:
        with self._lock:
            self._windows.clear()
        return self.store.counters.clear()

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)
        self.store.counters.clear(key)
