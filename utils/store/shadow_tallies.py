"""What a shadow rollout's candidate did on the sampled copies of production's requests: each
process adds its tally of the last seconds as a row; readers sum a rollout's rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import delete, insert, select

from utils.store.database import Database, as_rows, columns_of
from utils.store.service_state import lock_states
from utils.store.tables import shadow_tallies

MAX_LATENCY_SAMPLES = 2000  # the newest per rollout, for its p95
SHADOW_TALLIES = "shadow_tallies"  # the lock name of adds


@dataclass(slots=True)
class ShadowTally:
    """Shadow requests run, their rows, rows where the candidate agreed with production, failed
    requests, copies dropped because the process's queue was full, and the candidate's
    confidence, forward-pass latency (ms per request, beside production's on the same
    request), classes and confusion against production's class."""

    requests: int = 0
    rows: int = 0
    agreements: int = 0
    errors: int = 0
    dropped: int = 0
    confidence_sum: float = 0.0
    confidence_count: int = 0
    latency_samples: list[float] = field(default_factory=list)
    production_latency_samples: list[float] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.requests or self.dropped)

    def add(self, other: ShadowTally) -> None:
        for name in ("requests", "rows", "agreements", "errors", "dropped", "confidence_sum", "confidence_count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_samples = (self.latency_samples + other.latency_samples)[-MAX_LATENCY_SAMPLES:]
        self.production_latency_samples = (self.production_latency_samples
                                           + other.production_latency_samples)[-MAX_LATENCY_SAMPLES:]
        for name, count in other.class_counts.items():
            self.class_counts[name] = self.class_counts.get(name, 0) + count
        for production, row in other.confusion.items():
            mine = self.confusion.setdefault(production, {})
            for candidate, count in row.items():
                mine[candidate] = mine.get(candidate, 0) + count


@dataclass(frozen=True, slots=True)
class _TallyRow:
    id: int
    rollout_id: int
    at: float
    requests: int
    rows: int
    agreements: int
    errors: int
    dropped: int
    confidence_sum: float
    confidence_count: int
    latency_samples: list[float]
    production_latency_samples: list[float]
    class_counts: dict[str, int]
    confusion: dict[str, dict[str, int]]


class ShadowTallyStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, rollout_id: int, tally: ShadowTally) -> None:
        """Add a process's tally. Adds are serialised (as prediction inserts are), so ids commit
        in order and a reader that has summed up to an id never misses a lower one later."""
        with self.database.write() as conn:
            lock_states(conn, (SHADOW_TALLIES,))
            conn.execute(insert(shadow_tallies).values(rollout_id=rollout_id, at=time.time(), **columns_of(tally)))

    def prune(self, active_rollout_id: int | None) -> int:
        """Remove the tallies of rollouts that are not active (added late, after they ended)."""
        others = shadow_tallies.c.rollout_id != (active_rollout_id or 0)
        with self.database.write() as conn:
            return conn.execute(delete(shadow_tallies).where(others)).rowcount

    def total(self, rollout_id: int, after_id: int = 0) -> tuple[ShadowTally, int]:
        """Every process's tallies of a rollout with id > after_id, summed (latency samples: the
        newest), and the last id summed (`after_id` when there was none)."""
        with self.database.read() as conn:
            rows = as_rows(_TallyRow, conn.execute(
                select(shadow_tallies).where(shadow_tallies.c.rollout_id == rollout_id, shadow_tallies.c.id > after_id)
                .order_by(shadow_tallies.c.id)))
        total = ShadowTally()
        for row in rows:
            total.add(ShadowTally(row.requests, row.rows, row.agreements, row.errors, row.dropped, row.confidence_sum,
                                  row.confidence_count, row.latency_samples, row.production_latency_samples,
                                  row.class_counts, row.confusion))
        return total, rows[-1].id if rows else after_id
