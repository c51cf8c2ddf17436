"""One optional dependency's outage (Redis): when to try it again, and one log line when it
goes and one when it is back.

Every Redis-backed path (rate-limit counters, the failed-authentication throttle, change
notifications to the dashboard pushers) degrades the same way: the first failure logs one
warning naming what the process does instead, later calls skip Redis until a back-off of
1, 2, 4 ... 32 seconds has passed, one call then tries again, and the first success logs
that the process is back to normal. Nothing on the request path waits for Redis meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_BACKOFF_SECONDS = 32.0


class Outage:
    """The state of one dependency as this process sees it (thread-safe)."""

    def __init__(self, name: str, fallback: str, log: logging.Logger, max_backoff: float = MAX_BACKOFF_SECONDS) -> None:
        self.name = name
        self.fallback = fallback
        self.log = log
        self.max_backoff = max_backoff
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._failures > 0

    def should_try(self) -> bool:
        """True while the dependency is up, and once per back-off period while it is down."""
        if not self._failures:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._backoff()  # one caller probes; the others keep the fallback
            return True

    def failed(self, error: BaseException) -> None:
        """A call failed: log the start of an outage once, then back off."""
        with self._lock:
            self._failures += 1
            self._retry_at = time.monotonic() + self._backoff()
            first = self._failures == 1
        if first:
            self.log.warning("%s unreachable (%s): %s until it is back", self.name, _short(error), self.fallback)

    def succeeded(self) -> None:
        """A call worked: end the outage, if there was one, with one log line."""
        if not self._failures:
            return
        with self._lock:
            was_down, self._failures = self._failures, 0
        if was_down:
            self.log.info("%s is back after %d failed attempt(s)", self.name, was_down)

    def _backoff(self) -> float:
        return min(self.max_backoff, 2.0 ** max(0, self._failures - 1))


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
