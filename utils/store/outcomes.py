"""Outcomes: every successful prediction's id, class and probabilities, kept for the label
horizon, and the true class once feedback brings it. Written with the prediction records (one
transaction), joined to labels by primary key, read per version and time range for quality."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy import Connection, bindparam, case, delete, func, select, text, update

from utils.store.database import Database, insert_many, read_columns, select_in
from utils.store.service_state import read_states, write_state
from utils.store.tables import outcomes

QUALITY_REPORT = "quality_report"
_LABELLED = text(
    "SELECT at, predicted_class, label, CAST(probabilities AS TEXT) FROM outcomes "
    "WHERE model_version = :version AND at >= :since AND at <= :until AND label IS NOT NULL ORDER BY at"
)


class OutcomeRecord(TypedDict):
    """One successful prediction as the monitor writes it beside its record."""

    prediction_id: str
    at: float
    model_version: str
    predicted_class: str
    probabilities: Sequence[float]


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """What feedback needs to know of a prediction id: when, which version, its label so far."""

    prediction_id: str
    at: float
    model_version: str
    label: str | None


@dataclass(frozen=True, slots=True)
class LabelledColumns:
    """A version's labelled predictions in a time range, column by column, oldest first;
    `probabilities` stay JSON text (one array per row) for the caller to parse at once."""

    at: list[float]
    predicted: list[str]
    labels: list[str]
    probabilities: list[str]


@dataclass(frozen=True, slots=True)
class Coverage:
    """A version's predictions in a time range, how many carry a label, how many were right."""

    predictions: int
    labelled: int
    correct: int


def insert_outcomes(conn: Connection, rows: list[OutcomeRecord]) -> None:
    """Insert inside the caller's transaction; an id already stored (a retried request that
    sent the same X-Request-ID) keeps its first prediction."""
    insert_many(conn, outcomes, rows, skip_conflicts_on="prediction_id")


class OutcomeStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def find(self, ids: Iterable[str]) -> dict[str, StoredOutcome]:
        """The stored outcomes among `ids`, by id (indexed lookups, in chunks)."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, StoredOutcome] = {}
        columns = ("prediction_id", "at", "model_version", "label")
        with self.database.read() as conn:
            for key, at, version, label in select_in(conn, outcomes, columns, "prediction_id", wanted):
                found[key] = StoredOutcome(key, at, version, label)
        return found

    def set_labels(self, labels: dict[str, str], at: float) -> None:
        """Record the true class of each prediction id (an earlier label is replaced)."""
        if not labels:
            return
        statement = (update(outcomes).where(outcomes.c.prediction_id == bindparam("id"))
                     .values(label=bindparam("label"), labelled_at=at))
        with self.database.write() as conn:
            conn.execute(statement, [{"id": key, "label": label} for key, label in labels.items()])

    def labelled(self, version: str, since: float, until: float) -> LabelledColumns:
        """A version's labelled predictions made in [since, until], read 1,000 at a time with the
        worker's other requests running in between."""
        with self.database.read() as conn:
            result = conn.execute(_LABELLED, {"version": version, "since": since, "until": until})
            return LabelledColumns(*read_columns(result, 4, 1000))

    def coverage(self, since: float, until: float, versions: tuple[str, ...] | None = None) -> dict[str, Coverage]:
        """Per version (of `versions`, or every one): predictions made in [since, until], how
        many are labelled, how many right."""
        correct = func.sum(case((outcomes.c.label == outcomes.c.predicted_class, 1), else_=0))
        query = (select(outcomes.c.model_version, func.count(), func.count(outcomes.c.label), correct)
                 .where(outcomes.c.at >= since, outcomes.c.at <= until).group_by(outcomes.c.model_version))
        if versions is not None:
            query = query.where(outcomes.c.model_version.in_(versions))
        with self.database.read() as conn:
            return {version: Coverage(int(total), int(labelled), int(right or 0))
                    for version, total, labelled, right in conn.execute(query)}

    def prune(self, before: float) -> int:
        """Forget predictions made before `before` (the label horizon); returns how many."""
        with self.database.write() as conn:
            return int(conn.execute(delete(outcomes).where(outcomes.c.at < before)).rowcount or 0)

    def record_report(self, report: dict[str, Any]) -> None:
        """Keep the latest quality report (the dashboard's, computed by one process per check)."""
        with self.database.write() as conn:
            write_state(conn, QUALITY_REPORT, report, "maintenance")

    def latest_report(self) -> dict[str, Any] | None:
        with self.database.read() as conn:
            stored: dict[str, Any] | None = read_states(conn, (QUALITY_REPORT,)).get(QUALITY_REPORT)
            return stored
