"""Alerts: each episode or notice, and when it was resolved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import insert, select, update

from utils.store.database import Database, as_rows, inserted_id
from utils.store.service_state import lock_states, write_state
from utils.store.tables import alerts, service_state

EPISODE_PREFIX = "alert_state:"


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: int
    at: float
    kind: str
    severity: str
    message: str
    details: dict[str, Any]
    resolved_at: float | None


@dataclass(slots=True)
class AlertEpisode:
    """Where a kind of alert stands: in an episode since when, the last alert sent, and the
    clear checks seen since it went quiet (hysteresis)."""

    active: bool = False
    since: float | None = None
    last_alert_at: float = 0.0
    clear_checks: int = 0
    episodes: int = 0  # started since the store was created (a Prometheus counter)


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

    def update_episode(self, kind: str, change: Callable[[AlertEpisode], None]) -> AlertEpisode:
        """Let `change` update the episode of `kind` in one locked read-modify-write, so two
        processes never both start an episode; returns the episode as written. `change` must
        not use the store (it runs inside the transaction)."""
        name = f"{EPISODE_PREFIX}{kind}"
        with self.database.write() as conn:
            stored = lock_states(conn, (name,)).get(name)
            episode = AlertEpisode(**stored) if stored else AlertEpisode()
            change(episode)
            write_state(conn, name, asdict(episode), "alerts")
        return episode

    def episodes(self) -> dict[str, int]:
        """How many episodes each kind of alert has started."""
        with self.database.read() as conn:
            rows = conn.execute(select(service_state.c.name, service_state.c.value)
                                .where(service_state.c.name.like(f"{EPISODE_PREFIX}%"))).all()
        return {name[len(EPISODE_PREFIX):]: int((value or {}).get("episodes", 0)) for name, value in rows}

    def list(self, limit: int = 50, after_id: int = 0) -> list[AlertRow]:
        """The newest alerts first."""
        with self.database.read() as conn:
            return as_rows(AlertRow, conn.execute(select(alerts).where(alerts.c.id > after_id)
                                                  .order_by(alerts.c.id.desc()).limit(limit)))
