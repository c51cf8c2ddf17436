"""Training jobs: their parameters, state, progress and heartbeat."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, update

from utils.store.database import Database, as_row, as_rows, columns_of
from utils.store.tables import training_jobs

ACTIVE_JOB_STATES = ("queued", "running")


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    status: str
    created_at: float
    created_by: str
    params: dict[str, Any]
    total_epochs: int
    data: dict[str, Any] | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    result_version: str | None = None
    error: str | None = None
    host: str | None = None
    pid: int | None = None
    cancel_requested: bool = False

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_JOB_STATES


class JobStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def insert_if_capacity(self, row: JobRow, max_active: int) -> bool:
        """Insert a queued job unless `max_active` jobs are already queued or running."""
        with self.database.write() as conn:
            self.database.lock_table(conn, "training_jobs")
            active = conn.execute(select(func.count()).select_from(training_jobs)
                                  .where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))).scalar_one()
            if active >= max_active:
                return False
            conn.execute(insert(training_jobs).values(**columns_of(row)))
            return True

    def get(self, job_id: str) -> JobRow | None:
        with self.database.read() as conn:
            return as_row(JobRow, conn.execute(select(training_jobs).where(training_jobs.c.id == job_id)).first())

    def list(self, limit: int = 50, active_only: bool = False) -> list[JobRow]:
        """The newest jobs first."""
        query = select(training_jobs).order_by(training_jobs.c.created_at.desc()).limit(limit)
        if active_only:
            query = query.where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))
        with self.database.read() as conn:
            return as_rows(JobRow, conn.execute(query))

    def update(self, job_id: str, only_if_active: bool = False, **values: Any) -> bool:
        """Set columns of a job; with `only_if_active`, a finished job is left alone (False)."""
        statement = update(training_jobs).where(training_jobs.c.id == job_id)
        if only_if_active:
            statement = statement.where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))
        with self.database.write() as conn:
            return conn.execute(statement.values(**values)).rowcount > 0

    def append_progress(self, job_id: str, entry: dict[str, Any]) -> bool:
        """Add an epoch's metrics and beat the heart; returns whether a cancel was requested."""
        with self.database.write() as conn:
            row = conn.execute(select(training_jobs.c.progress, training_jobs.c.cancel_requested)
                               .where(training_jobs.c.id == job_id)).first()
            if row is None:  # the job's row is gone: nothing to report to, so stop
                return True
            conn.execute(update(training_jobs).where(training_jobs.c.id == job_id)
                         .values(progress=[*row.progress, entry], heartbeat_at=time.time()))
            return bool(row.cancel_requested)
