"""Fixed-window rate-limit counters shared by every process (the `limits` storage's table)."""

from __future__ import annotations

import time

from sqlalchemy import delete, text

from utils.store.database import Database
from utils.store.tables import rate_limits

# Plain SQL compiled once: this runs at every counter sync (and on every request with
# QUADRA_RATE_LIMIT_SYNC_SECONDS=0).
_INCREMENT = text(
    "INSERT INTO rate_limits (key, count, expires_at) VALUES (:key, :amount, :now + :expiry) "
    "ON CONFLICT (key) DO UPDATE SET "
    "count = CASE WHEN rate_limits.expires_at <= :now THEN :amount ELSE rate_limits.count + :amount END, "
    "expires_at = CASE WHEN rate_limits.expires_at <= :now THEN :now + :expiry ELSE rate_limits.expires_at END "
    "RETURNING count, expires_at"
)
_GET = text("SELECT count, expires_at FROM rate_limits WHERE key = :key")


class CounterStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def incr(self, key: str, expiry: float, amount: int) -> tuple[int, float]:
        """Add `amount` to a counter, starting a new window if it expired; (count, expires_at)."""
        with self.database.write() as conn:
            row = conn.execute(_INCREMENT, {"key": key, "amount": amount, "now": time.time(), "expiry": expiry}).one()
        return int(row._mapping["count"]), float(row.expires_at)

    def get(self, key: str) -> tuple[int, float]:
        """(count, expires_at) of a live counter, (0, now) when absent or expired."""
        now = time.time()
        with self.database.read() as conn:
            row = conn.execute(_GET, {"key": key}).first()
        if row is None or row.expires_at <= now:
            return 0, now
        return int(row._mapping["count"]), float(row.expires_at)

    def clear(self, key: str | None = None) -> int:
        """Delete one counter, or every counter when `key` is None; returns how many."""
        statement = delete(rate_limits) if key is None else delete(rate_limits).where(rate_limits.c.key == key)
        with self.database.write() as conn:
            return int(conn.execute(statement).rowcount)

    def purge_expired(self) -> int:
        with self.database.write() as conn:
            return int(conn.execute(delete(rate_limits).where(rate_limits.c.expires_at <= time.time())).rowcount)
