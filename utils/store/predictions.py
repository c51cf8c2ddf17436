"""Prediction records: written in batches (exactly once, by record id) with running totals,
read back as rows or, for the monitoring window, column by column."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NotRequired, TypedDict

from sqlalchemy import Connection, TextClause, func, or_, select, text

from utils.store.database import Database, EncodedRows, as_rows, encode_rows, insert_encoded, read_columns, select_in
from utils.store.outcomes import OUTCOME_COUNTS, EncodedOutcomes, OutcomeRecord, insert_outcomes
from utils.store.service_state import lock_states, read_states, write_state
from utils.store.tables import predictions

TOTALS = "prediction_totals"
WINDOW_START = "monitoring_window_start"

# `window` reads features as their JSON text (None when not kept), and rows in blocks smaller
# than the garbage collector's first threshold (700), so they die young.
_WINDOW_SELECT = {"features": "NULLIF(CAST(features AS TEXT), 'null')"}
_WINDOW_BLOCK = 500


class PredictionRecord(TypedDict):
    """One prediction as the monitor buffers and journals it (the columns an INSERT takes)."""

    at: float
    model_version: str | None
    latency_ms: float
    confidence: float | None
    predicted_class: str | None
    success: bool
    error: str | None
    features: Sequence[float] | None
    record_id: str | None
    prediction_id: NotRequired[str | None]  # with probabilities: kept as an outcome for labels
    probabilities: NotRequired[Sequence[float] | None]


@dataclass(frozen=True, slots=True)
class PredictionRow:
    id: int
    at: float
    model_version: str | None
    latency_ms: float
    confidence: float | None
    predicted_class: str | None
    success: bool
    error: str | None
    features: list[float] | None
    record_id: str | None


CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)  # upper bounds (le), then +Inf


@dataclass(frozen=True, slots=True)
class PredictionTotals:
    """Every prediction recorded since the counters were last reset, how many failed, and the
    successful ones' confidences as a histogram: counts per bucket of CONFIDENCE_BUCKETS (the
    last one past them), not cumulative, and their sum."""

    count: int = 0
    errors: int = 0
    confidence_counts: tuple[int, ...] = (0,) * (len(CONFIDENCE_BUCKETS) + 1)
    confidence_sum: float = 0.0

    def plus(self, records: list[PredictionRecord]) -> PredictionTotals:
        counts = list(self.confidence_counts)
        confidences = [r["confidence"] for r in records if r["success"] and r["confidence"] is not None]
        for confidence in confidences:
            counts[bisect_left(CONFIDENCE_BUCKETS, confidence)] += 1
        return PredictionTotals(self.count + len(records), self.errors + sum(1 for r in records if not r["success"]),
                                tuple(counts), self.confidence_sum + sum(confidences))

    def merged(self, other: PredictionTotals) -> PredictionTotals:
        return PredictionTotals(self.count + other.count, self.errors + other.errors,
                                tuple(a + b for a, b in zip(self.confidence_counts, other.confidence_counts, strict=True)),
                                self.confidence_sum + other.confidence_sum)

    def as_state(self) -> dict[str, Any]:
        return {"count": self.count, "errors": self.errors, "confidence_counts": list(self.confidence_counts),
                "confidence_sum": self.confidence_sum}


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """One version's records after some record id: how many, how many failed, the confidence
    sum over the successful ones that report one, and their predicted classes."""

    count: int = 0
    errors: int = 0
    confidence_sum: float = 0.0
    confidence_count: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)

    def plus(self, other: VersionSummary) -> VersionSummary:
        classes = dict(self.class_counts)
        for name, count in other.class_counts.items():
            classes[name] = classes.get(name, 0) + count
        return VersionSummary(self.count + other.count, self.errors + other.errors,
                              self.confidence_sum + other.confidence_sum, self.confidence_count + other.confidence_count,
                              classes)


class PredictionStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def insert(self, records: list[PredictionRecord]) -> int:
        """Insert a batch of records and add them to the totals, atomically, with the outcomes
        of those that carry a prediction id. Records whose `record_id` is already stored are
        skipped; returns how many were new. The rows are encoded before the transaction
        (`EncodedRows`): it holds the store's writer lock only for the SQL."""
        if not records:
            return 0
        encoded = _EncodedPredictions.of(records)
        with self.database.write() as conn:
            totals = _totals(lock_states(conn, (TOTALS, OUTCOME_COUNTS)))
            ids = [r["record_id"] for r in records if r.get("record_id")]
            known = {key for key, in select_in(conn, predictions, ("record_id",), "record_id", ids)} if ids else set()
            if known:  # a journal replayed after a flush had written part of it
                records = [r for r in records if r.get("record_id") not in known]
                if not records:
                    return 0
                encoded = _EncodedPredictions.of(records)
            insert_encoded(conn, encoded.rows)
            insert_outcomes(conn, encoded.outcomes)
            write_state(conn, TOTALS, totals.merged(encoded.totals).as_state(), "monitor")
        return len(records)

    def totals(self) -> PredictionTotals:
        with self.database.read() as conn:
            return _totals(read_states(conn, (TOTALS,)))

    def window_start(self) -> int:
        """The id after which the monitoring window begins (0: from the first record)."""
        with self.database.read() as conn:
            return int(read_states(conn, (WINDOW_START,)).get(WINDOW_START) or 0)

    def reset_window(self, actor: str) -> None:
        """Zero the totals and start the window after the newest record (records are kept)."""
        with self.database.write() as conn:
            lock_states(conn, (TOTALS, WINDOW_START))
            write_state(conn, WINDOW_START, _last_id(conn), actor)
            write_state(conn, TOTALS, PredictionTotals().as_state(), actor)

    def recent(self, limit: int, after_id: int = 0) -> list[PredictionRow]:
        """The newest `limit` records with id > after_id, oldest first."""
        query = select(predictions).where(predictions.c.id > after_id).order_by(predictions.c.id.desc()).limit(limit)
        with self.database.read() as conn:
            rows = conn.execute(query).all()
        return as_rows(PredictionRow, reversed(rows))

    def window(self, limit: int, after_id: int, columns: tuple[str, ...]) -> dict[str, list[Any]]:
        """What `recent` reads, column by column: {column: its values, oldest first}, except
        that `features` stay JSON text (None when not kept) for the caller to parse.

        A window can hold 100k records, so this skips what costs per record there: SQLAlchemy's
        result processing, an object per record, and keeping an object per record alive until
        the end (a block of rows is transposed as it arrives, then dropped): with that many
        young objects the garbage collector's full passes cost more than the read itself
        (`read_columns`)."""
        with self.database.read() as conn:
            result = conn.execute(_window_statement(columns), {"after_id": after_id, "limit": limit})
            values = read_columns(result, len(columns), _WINDOW_BLOCK)
        for column in values:
            column.reverse()
        window = dict(zip(columns, values, strict=True))
        if "success" in window:  # SQLite returns booleans as 0/1
            window["success"] = list(map(bool, window["success"]))
        return window

    def summaries(self, after_id: int, up_to_id: int, versions: tuple[str, ...],
                  failures: tuple[str, ...]) -> dict[str, VersionSummary]:
        """A `VersionSummary` of each of `versions` over the records with after_id < id <= up_to_id,
        aggregated in the database (one pass over that range of the primary key). Only
        failures whose error code is in `failures` count; other failed requests (a client's
        bad input) are left out, as they say nothing about the model."""
        query = (select(predictions.c.model_version, predictions.c.predicted_class, predictions.c.success, func.count(),
                        func.coalesce(func.sum(predictions.c.confidence), 0.0), func.count(predictions.c.confidence))
                 .where(*_range(after_id, up_to_id, versions, failures))
                 .group_by(predictions.c.model_version, predictions.c.predicted_class, predictions.c.success))
        parts: dict[str, dict[str, Any]] = {v: {"count": 0, "errors": 0, "confidence_sum": 0.0, "confidence_count": 0,
                                                "class_counts": {}} for v in versions}
        with self.database.read() as conn:
            rows = conn.execute(query).all()
        for version, predicted_class, success, count, confidence_sum, confidence_count in rows:
            part = parts[version]
            part["count"] += count
            if not success:
                part["errors"] += count
                continue
            part["confidence_sum"] += float(confidence_sum)
            part["confidence_count"] += confidence_count
            part["class_counts"][str(predicted_class)] = count
        return {version: VersionSummary(**part) for version, part in parts.items()}

    def latencies(self, after_id: int, up_to_id: int, versions: tuple[str, ...],
                  failures: tuple[str, ...]) -> dict[str, list[float]]:
        """The latencies (ms) of the records `summaries` counts, by version, oldest first."""
        query = (select(predictions.c.model_version, predictions.c.latency_ms)
                 .where(*_range(after_id, up_to_id, versions, failures)).order_by(predictions.c.id))
        found: dict[str, list[float]] = {version: [] for version in versions}
        with self.database.read() as conn:
            for version, latency in conn.execute(query):
                found[version].append(float(latency))
        return found

    def last_id(self) -> int:
        with self.database.read() as conn:
            return _last_id(conn)

    def count_since(self, since: float, after_id: int = 0) -> int:
        with self.database.read() as conn:
            return int(conn.execute(
                select(func.count()).select_from(predictions).where(predictions.c.at >= since, predictions.c.id > after_id)
            ).scalar_one())


def _range(after_id: int, up_to_id: int, versions: tuple[str, ...], failures: tuple[str, ...]) -> tuple[Any, ...]:
    return (predictions.c.id > after_id, predictions.c.id <= up_to_id, predictions.c.model_version.in_(versions),
            or_(predictions.c.success, predictions.c.error.in_(failures)))


@dataclass(frozen=True, slots=True)
class _EncodedPredictions:
    """A batch of records as `insert` writes them: its rows, outcomes and totals."""

    rows: EncodedRows
    outcomes: EncodedOutcomes
    totals: PredictionTotals

    @classmethod
    def of(cls, records: list[PredictionRecord]) -> _EncodedPredictions:
        return cls(encode_rows(predictions, records), EncodedOutcomes.of(_outcomes(records)), PredictionTotals().plus(records))


def _outcomes(records: list[PredictionRecord]) -> list[OutcomeRecord]:
    """The outcomes of the successful records that carry a prediction id and probabilities."""
    found: list[OutcomeRecord] = []
    for r in records:
        key, probabilities, version, predicted = (r.get("prediction_id"), r.get("probabilities"), r["model_version"],
                                                  r["predicted_class"])
        if key and probabilities and version is not None and predicted is not None and r["success"]:
            found.append({"prediction_id": key, "at": r["at"], "model_version": version, "predicted_class": predicted,
                          "probabilities": probabilities})
    return found


def _last_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(predictions.c.id))).scalar() or 0)


def _totals(state: dict[str, Any]) -> PredictionTotals:
    """The stored totals (those of earlier releases have no histogram: it starts empty)."""
    stored = state.get(TOTALS) or {}
    counts = stored.get("confidence_counts")
    return PredictionTotals(int(stored.get("count", 0)), int(stored.get("errors", 0)),
                            tuple(counts) if counts and len(counts) == len(CONFIDENCE_BUCKETS) + 1
                            else PredictionTotals().confidence_counts, float(stored.get("confidence_sum", 0.0)))


def _window_column(name: str) -> str:
    """The SQL selecting one predictions column; any other name is a KeyError, never SQL."""
    return _WINDOW_SELECT.get(name, predictions.c[name].name)


@cache
def _window_statement(columns: tuple[str, ...]) -> TextClause:
    """The window query for a set of columns, built once: plain SQL, no result processing per row."""
    selected = ", ".join(_window_column(name) for name in columns)
    return text(f"SELECT {selected} FROM predictions WHERE id > :after_id ORDER BY id DESC LIMIT :limit")
