"""Alerts: each episode or notice, and when it was resolved."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update

from utils.store.database import Database, as_rows, inserted_id
from utils.store.tables import alerts


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: int
    at: float
    kind: str
    severity: str
    message: str
    details: dict[str, Any]
    resolved_at: float | None


class AlertStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def insert(self, kind: str, severity: str, message: str, details: dict[str, Any]) -> int:
        with self.database.write() as conn:
            return inserted_id(conn.execute(insert(alerts).values(
                at=time.time(), kind=kind, severity=severity, message=message, details=details)))

    def resolve(self, kind: str) -> int:
        """Mark the open alerts of `kind` resolved; returns how many."""
        with self.database.write() as conn:
            return int(conn.execute(update(alerts).where(alerts.c.kind == kind, alerts.c.resolved_at.is_(None))
                                    .values(resolved_at=time.time())).rowcount)

    def list(self, limit: int = 50, after_id: int = 0) -> list[AlertRow]:
        """The newest alerts first."""
        with self.database.read() as conn:
            return as_rows(AlertRow, conn.execute(select(alerts).where(alerts.c.id > after_id)
                                                  .order_by(alerts.c.id.desc()).limit(limit)))
