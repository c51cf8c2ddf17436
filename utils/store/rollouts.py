"""Rollouts: which candidate serves (canary) or shadows (shadow) what share of predictions
against which production version, under which criteria, and how each one ended.

At most one rollout is active (`running` or `held`) at a time; every worker and host routes
by the same row. An active rollout ends exactly once: `finish` changes it only while it is
still active, so two processes deciding at the same moment cannot both promote or abort.
"""

from __future__ import annotations

import builtins
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from utils.store.database import Database, StoreConflict, as_row, as_rows, columns_of, inserted_id
from utils.store.service_state import lock_states
from utils.store.tables import rollouts, shadow_tallies
from utils.store.versions import PRODUCTION, SERVING, Deployment

RUNNING = "running"
HELD = "held"
ACTIVE_STATUSES = (RUNNING, HELD)


@dataclass(frozen=True, slots=True)
class RolloutRow:
    id: int
    version: str
    baseline_version: str
    mode: str
    percent: float
    min_predictions: int
    criteria: dict[str, float | None]
    on_success: str
    on_failure: str
    started_at: float
    started_by: str
    start_record_id: int
    status: str
    verdict: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    decided_by: str | None = None
    comparison: dict[str, Any] | None = None

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True, slots=True)
class RolloutRoute:
    id: int
    version: str
    mode: str
    percent: float


class RolloutStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def start(self, row: RolloutRow) -> RolloutRow:
        """Insert a running rollout (its `id` is assigned). StoreConflict while another is
        active, or unless `row.baseline_version` is production and serving: checked under the
        deployment's lock, so a promote cannot slip in between."""
        values = columns_of(row)
        values.pop("id")
        with self.database.write() as conn:
            self.database.lock_table(conn, "rollouts")
            deployment = Deployment.of(lock_states(conn, (PRODUCTION, SERVING)))
            if deployment.production != row.baseline_version or deployment.serving != row.baseline_version:
                raise StoreConflict(f"production is {deployment.production} and {deployment.serving} is serving now")
            active = conn.execute(select(rollouts.c.version).where(rollouts.c.status.in_(ACTIVE_STATUSES))).first()
            if active is not None:
                raise StoreConflict(f"a rollout of version {active.version} is already active")
            new_id = inserted_id(conn.execute(insert(rollouts).values(**values)))
        return RolloutRow(**{**values, "id": new_id})

    def route(self) -> RolloutRoute | None:
        """What a worker routes by: the active rollout's id, candidate, mode and share (not its numbers)."""
        with self.database.read() as conn:
            row = conn.execute(select(rollouts.c.id, rollouts.c.version, rollouts.c.mode, rollouts.c.percent)
                               .where(rollouts.c.status.in_(ACTIVE_STATUSES)).order_by(rollouts.c.id.desc())).first()
        return RolloutRoute(*row) if row is not None else None

    def active(self) -> RolloutRow | None:
        with self.database.read() as conn:
            return as_row(RolloutRow, conn.execute(
                select(rollouts).where(rollouts.c.status.in_(ACTIVE_STATUSES)).order_by(rollouts.c.id.desc())).first())

    def get(self, rollout_id: int) -> RolloutRow | None:
        with self.database.read() as conn:
            return as_row(RolloutRow, conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first())

    def latest(self) -> RolloutRow | None:
        """The active rollout, else the one that ended last."""
        with self.database.read() as conn:
            return as_row(RolloutRow, conn.execute(select(rollouts).order_by(rollouts.c.id.desc())).first())

    def list(self, limit: int = 20) -> builtins.list[RolloutRow]:
        with self.database.read() as conn:
            return as_rows(RolloutRow, conn.execute(select(rollouts).order_by(rollouts.c.id.desc()).limit(limit)))

    def record_comparison(self, rollout_id: int, comparison: dict[str, Any]) -> None:
        """Keep the latest side-by-side numbers of an active rollout (for /metrics and the dashboard)."""
        with self.database.write() as conn:
            conn.execute(update(rollouts).where(rollouts.c.id == rollout_id, rollouts.c.status.in_(ACTIVE_STATUSES))
                         .values(comparison=comparison))

    def hold(self, rollout_id: int, verdict: str, reason: str, comparison: dict[str, Any]) -> bool:
        """A running rollout met its verdict but waits for an operator; False if it was not running."""
        with self.database.write() as conn:
            return conn.execute(
                update(rollouts).where(rollouts.c.id == rollout_id, rollouts.c.status == RUNNING)
                .values(status=HELD, verdict=verdict, reason=reason, decided_at=time.time(), decided_by="rollout",
                        comparison=comparison)).rowcount > 0

    def finish(self, rollout_id: int, status: str, verdict: str | None, reason: str, actor: str,
               comparison: dict[str, Any] | None = None) -> bool:
        """End an active rollout as `status`; False when it had already ended (someone else decided)."""
        values: dict[str, Any] = {"status": status, "verdict": verdict, "reason": reason, "decided_at": time.time(),
                                  "decided_by": actor}
        if comparison is not None:
            values["comparison"] = comparison
        with self.database.write() as conn:
            ended = conn.execute(update(rollouts).where(rollouts.c.id == rollout_id,
                                                        rollouts.c.status.in_(ACTIVE_STATUSES)).values(**values)).rowcount > 0
            if ended:  # its final numbers are kept with it
                conn.execute(delete(shadow_tallies).where(shadow_tallies.c.rollout_id == rollout_id))
            return ended

    def amend_outcome(self, rollout_id: int, status: str, reason: str) -> None:
        """Correct how an ended rollout ended (a promote that failed after the decision)."""
        with self.database.write() as conn:
            conn.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(status=status, reason=reason))
