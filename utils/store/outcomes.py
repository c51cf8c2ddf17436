"""Outcomes: every successful prediction's id, class and probabilities, kept for the label
horizon, and the true class once feedback brings it. Written with the prediction records (one
transaction), joined to labels by primary key, read per version and time range for quality.

Beside them, `outcome_minutes` counts per minute and version the predictions, the labelled
ones and the right ones, kept exact by every write (insert, label, prune) in its transaction,
so coverage over a day reads about 1,440 counts per version and at most two minutes of
outcomes: counted row by row it was one SQL statement growing with traffic (270 ms at 600,000
outcomes, run by one worker at every drift check and scrape, its other requests waiting)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy import Connection, Select, bindparam, delete, func, select, text, update

from utils.store.database import Database, EncodedRows, encode_rows, insert_encoded, read_columns, select_in
from utils.store.service_state import lock_states, read_states, write_state
from utils.store.tables import count_outcome_minutes, minute_of, outcome_minutes, outcome_tallies, outcomes

QUALITY_REPORT = "quality_report"
OUTCOME_COUNTS = "outcome_counts"  # the lock (`lock_states`) of every write to outcome_minutes
_ADD_COUNTS = text(
    "INSERT INTO outcome_minutes (minute, model_version, predictions, labelled, correct) "
    "VALUES (:minute, :version, :predictions, :labelled, :correct) ON CONFLICT (minute, model_version) DO UPDATE SET "
    "predictions = outcome_minutes.predictions + excluded.predictions, "
    "labelled = outcome_minutes.labelled + excluded.labelled, correct = outcome_minutes.correct + excluded.correct"
)
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


def _counted(conn: Connection, *where: Any, versions: tuple[str, ...] | None = None) -> dict[str, Coverage]:
    """Coverage by version of the outcomes matching `where`, counted row by row."""
    query = select(outcomes.c.model_version, *outcome_tallies()).where(*where)
    return _coverages(conn, query, outcomes.c.model_version, versions)


def _from_minutes(conn: Connection, first: int, last: int, versions: tuple[str, ...] | None) -> dict[str, Coverage]:
    """Coverage by version of the minutes [first, last), from `outcome_minutes`."""
    minutes = outcome_minutes.c
    query = (select(minutes.model_version, func.sum(minutes.predictions), func.sum(minutes.labelled),
                    func.sum(minutes.correct)).where(minutes.minute >= first, minutes.minute < last))
    return _coverages(conn, query, minutes.model_version, versions)


def _coverages(conn: Connection, query: Select[Any], version: Any, versions: tuple[str, ...] | None) -> dict[str, Coverage]:
    """`query`'s (version, predictions, labelled, right) rows grouped by `version`, of `versions` only when given."""
    if versions is not None:
        query = query.where(version.in_(versions))
    return {name: Coverage(int(total), int(labelled), int(right or 0))
            for name, total, labelled, right in conn.execute(query.group_by(version))}


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

    def plus(self, other: Coverage) -> Coverage:
        return Coverage(self.predictions + other.predictions, self.labelled + other.labelled, self.correct + other.correct)


@dataclass(frozen=True, slots=True)
class EncodedOutcomes:
    """Outcomes ready to insert (`EncodedRows`) with the minutes they add to `outcome_minutes`,
    prepared before the transaction that writes them; the first of a repeated id is kept."""

    records: list[OutcomeRecord]
    rows: EncodedRows
    counts: _MinuteCounts

    @classmethod
    def of(cls, records: Iterable[OutcomeRecord]) -> EncodedOutcomes:
        first: dict[str, OutcomeRecord] = {}
        for record in records:
            first.setdefault(record["prediction_id"], record)
        counts = _MinuteCounts()
        for record in first.values():
            counts.add(minute_of(record["at"]), record["model_version"], predictions=1)
        return cls(list(first.values()), encode_rows(outcomes, list(first.values())), counts)


def insert_outcomes(conn: Connection, encoded: EncodedOutcomes) -> None:
    """Insert inside the caller's transaction, which holds OUTCOME_COUNTS (`lock_states`); an id
    already stored (a retried request that sent the same X-Request-ID) keeps its first
    prediction, and only the new ones are counted."""
    if not encoded.records:
        return
    stored = {key for key, in select_in(conn, outcomes, ("prediction_id",), "prediction_id",
                                        [record["prediction_id"] for record in encoded.records])}
    if stored:
        encoded = EncodedOutcomes.of(record for record in encoded.records if record["prediction_id"] not in stored)
    insert_encoded(conn, encoded.rows, skip_conflicts_on="prediction_id")
    encoded.counts.write(conn)


class _MinuteCounts:
    """Changes to `outcome_minutes`, by (minute, version), written in one statement per row."""

    def __init__(self) -> None:
        self.changes: dict[tuple[int, str], list[int]] = {}

    def add(self, minute: int, version: str, predictions: int = 0, labelled: int = 0, correct: int = 0) -> None:
        change = self.changes.setdefault((minute, version), [0, 0, 0])
        change[0] += predictions
        change[1] += labelled
        change[2] += correct

    def write(self, conn: Connection) -> None:
        rows = [{"minute": minute, "version": version, "predictions": predictions, "labelled": labelled, "correct": correct}
                for (minute, version), (predictions, labelled, correct) in self.changes.items()
                if predictions or labelled or correct]
        if rows:
            conn.execute(_ADD_COUNTS, rows)


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
        columns = ("prediction_id", "at", "model_version", "predicted_class", "label")
        with self.database.write() as conn:
            lock_states(conn, (OUTCOME_COUNTS,))
            counts = _MinuteCounts()
            updates = []
            for key, made_at, version, predicted, earlier in select_in(conn, outcomes, columns, "prediction_id", list(labels)):
                label = labels[key]
                counts.add(minute_of(made_at), version, labelled=earlier is None,
                           correct=(label == predicted) - (earlier == predicted))
                updates.append({"id": key, "label": label})
            if updates:
                conn.execute(statement, updates)
            counts.write(conn)

    def labelled(self, version: str, since: float, until: float) -> LabelledColumns:
        """A version's labelled predictions made in [since, until], read 1,000 at a time with the
        worker's other requests running in between."""
        with self.database.read() as conn:
            result = conn.execute(_LABELLED, {"version": version, "since": since, "until": until})
            return LabelledColumns(*read_columns(result, 4, 1000))

    def coverage(self, since: float, until: float, versions: tuple[str, ...] | None = None) -> dict[str, Coverage]:
        """Per version (of `versions`, or every one): predictions made in [since, until], how
        many are labelled, how many right. The whole minutes in between come from
        `outcome_minutes`; the outcomes of the two partial minutes at the ends are counted."""
        first, last = minute_of(since) + 1, minute_of(until)  # the whole minutes: [first, last)
        found: dict[str, Coverage] = {}
        with self.database.read() as conn:
            if first >= last:
                parts = [_counted(conn, outcomes.c.at >= since, outcomes.c.at <= until, versions=versions)]
            else:
                parts = [_counted(conn, outcomes.c.at >= since, outcomes.c.at < first * 60, versions=versions),
                         _from_minutes(conn, first, last, versions),
                         _counted(conn, outcomes.c.at >= last * 60, outcomes.c.at <= until, versions=versions)]
        for part in parts:
            for version, counts in part.items():
                found[version] = found.get(version, Coverage(0, 0, 0)).plus(counts)
        return {version: counts for version, counts in found.items() if counts.predictions}

    def prune(self, before: float) -> int:
        """Forget predictions made before `before` (the label horizon); returns how many."""
        edge = minute_of(before)
        with self.database.write() as conn:
            lock_states(conn, (OUTCOME_COUNTS,))
            counts = _MinuteCounts()
            for version, gone in _counted(conn, outcomes.c.at >= edge * 60, outcomes.c.at < before).items():
                counts.add(edge, version, predictions=-gone.predictions, labelled=-gone.labelled, correct=-gone.correct)
            counts.write(conn)
            conn.execute(delete(outcome_minutes).where(outcome_minutes.c.minute < edge))
            return int(conn.execute(delete(outcomes).where(outcomes.c.at < before)).rowcount or 0)

    def recount(self) -> int:
        """Count `outcome_minutes` again from the stored outcomes; returns how many minute rows.
        For whenever a process of a release before schema 8 wrote to this store after it was
        upgraded (the old workers of a reload, a rolling restart, a host not yet upgraded, a
        rollback): such a process stores outcomes and labels without counting them."""
        with self.database.write() as conn:
            lock_states(conn, (OUTCOME_COUNTS,))
            conn.execute(delete(outcome_minutes))
            return count_outcome_minutes(conn)

    def record_report(self, report: dict[str, Any]) -> None:
        """Keep the latest quality report (the dashboard's, computed by one process per check)."""
        with self.database.write() as conn:
            write_state(conn, QUALITY_REPORT, report, "maintenance")

    def latest_report(self) -> dict[str, Any] | None:
        with self.database.read() as conn:
            stored: dict[str, Any] | None = read_states(conn, (QUALITY_REPORT,)).get(QUALITY_REPORT)
            return stored
