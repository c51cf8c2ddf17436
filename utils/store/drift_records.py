"""Drift baselines, and the verdicts of the periodic drift check with their recent history
(written by maintenance, read by the live channel and /metrics)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, insert, select

from utils.store.database import Database, as_row, inserted_id
from utils.store.service_state import lock_states, read_states, write_state
from utils.store.tables import baselines

DRIFT_CHECK = "drift_state"
DRIFT_HISTORY = "drift_history"


@dataclass(frozen=True, slots=True)
class BaselineRow:
    id: int
    created_at: float
    created_by: str
    statistics: dict[str, Any]
    sample: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DriftCheck:
    """A drift check's verdict as the dashboard shows it (per-feature tests without samples)."""

    evaluated: bool
    drift_detected: bool
    checked_at: float
    drift_score: float | None = None
    threshold: float | None = None
    fired: tuple[str, ...] = ()
    drifted_features: tuple[str, ...] = ()
    reason: str | None = None
    dataset_drift_share: float | None = None
    features: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class DriftHistoryEntry:
    at: float
    drift_score: float | None
    drift_detected: bool
    drift_share: float | None


class BaselineStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def insert(self, created_by: str, statistics: dict[str, Any], sample: dict[str, Any]) -> int:
        with self.database.write() as conn:
            return inserted_id(conn.execute(insert(baselines).values(
                created_at=time.time(), created_by=created_by, statistics=statistics, sample=sample)))

    def latest(self) -> BaselineRow | None:
        with self.database.read() as conn:
            return as_row(BaselineRow, conn.execute(select(baselines).order_by(baselines.c.id.desc()).limit(1)).first())

    def delete_all(self) -> int:
        with self.database.write() as conn:
            return int(conn.execute(delete(baselines)).rowcount)


class DriftCheckStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def record(self, check: DriftCheck, keep: int) -> None:
        """Keep `check` as the latest verdict and add it to the history (the last `keep`)."""
        entry = DriftHistoryEntry(check.checked_at, check.drift_score, check.drift_detected, check.dataset_drift_share)
        with self.database.write() as conn:
            history = lock_states(conn, (DRIFT_CHECK, DRIFT_HISTORY)).get(DRIFT_HISTORY) or []
            write_state(conn, DRIFT_CHECK, asdict(check), "maintenance")
            write_state(conn, DRIFT_HISTORY, [*history[-(keep - 1):], asdict(entry)] if keep > 1 else [asdict(entry)],
                        "maintenance")

    def latest(self) -> DriftCheck | None:
        with self.database.read() as conn:
            stored = read_states(conn, (DRIFT_CHECK,)).get(DRIFT_CHECK)
        if not stored:
            return None
        known = {name: value for name, value in stored.items() if name in DriftCheck.__dataclass_fields__}
        return DriftCheck(**{**known, "fired": tuple(stored.get("fired") or ()),
                             "drifted_features": tuple(stored.get("drifted_features") or ()),
                             "checked_at": stored.get("checked_at") or 0.0})

    def history(self) -> list[DriftHistoryEntry]:
        """The recent verdicts, oldest first."""
        with self.database.read() as conn:
            stored = read_states(conn, (DRIFT_HISTORY,)).get(DRIFT_HISTORY) or []
        return [DriftHistoryEntry(**entry) for entry in stored]
