"""Per-minute roll-ups of prediction records older than the retention period."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from utils.store.database import Database, as_rows, columns_of
from utils.store.tables import prediction_rollups, predictions


@dataclass(slots=True)
class RollupRow:
    minute: float
    model_version: str
    count: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    latency_max: float = 0.0
    confidence_sum: float = 0.0
    confidence_count: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)

    def add(self, latency: float, confidence: float | None, predicted: str | None, success: bool) -> None:
        self.count += 1
        self.errors += 0 if success else 1
        self.latency_sum += latency
        self.latency_max = max(self.latency_max, latency)
        if confidence is not None:
            self.confidence_sum += confidence
            self.confidence_count += 1
        if predicted is not None:
            self.class_counts[predicted] = self.class_counts.get(predicted, 0) + 1

    def merged(self, other: RollupRow) -> dict[str, Any]:
        """The column values of this minute with `other` (the same minute and version) added."""
        classes = dict(self.class_counts)
        for name, count in other.class_counts.items():
            classes[name] = classes.get(name, 0) + count
        return {"count": self.count + other.count, "errors": self.errors + other.errors,
                "latency_sum": self.latency_sum + other.latency_sum,
                "latency_max": max(self.latency_max, other.latency_max),
                "confidence_sum": self.confidence_sum + other.confidence_sum,
                "confidence_count": self.confidence_count + other.confidence_count, "class_counts": classes}


class RollupStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def roll_up(self, before: float) -> int:
        """Fold raw records older than `before` into per-minute rows, then delete them."""
        with self.database.write() as conn:
            rows = conn.execute(
                select(predictions.c.at, predictions.c.model_version, predictions.c.latency_ms, predictions.c.confidence,
                       predictions.c.predicted_class, predictions.c.success).where(predictions.c.at < before)
            ).all()
            minutes: dict[tuple[float, str], RollupRow] = {}
            for at, version, latency, confidence, predicted, success in rows:
                minute = at - at % 60
                bucket = minutes.setdefault((minute, version or ""), RollupRow(minute, version or ""))
                bucket.add(latency, confidence, predicted, success)
            for bucket in minutes.values():
                _merge(conn, bucket)
            conn.execute(delete(predictions).where(predictions.c.at < before))
        return len(rows)

    def list(self, since: float = 0.0) -> list[RollupRow]:
        with self.database.read() as conn:
            return as_rows(RollupRow, conn.execute(select(prediction_rollups).where(prediction_rollups.c.minute >= since)
                                                   .order_by(prediction_rollups.c.minute)))


def _merge(conn: Connection, bucket: RollupRow) -> None:
    """Add a minute's bucket to its stored row, or store it."""
    same_minute = (prediction_rollups.c.minute == bucket.minute, prediction_rollups.c.model_version == bucket.model_version)
    existing = as_rows(RollupRow, conn.execute(select(prediction_rollups).where(*same_minute)))
    if not existing:
        conn.execute(insert(prediction_rollups).values(**columns_of(bucket)))
        return
    conn.execute(update(prediction_rollups).where(*same_minute).values(**existing[0].merged(bucket)))
