"""Quality per version and time window, from the labelled predictions in the store."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from utils.config import Settings
from utils.errors import VersionNotFound
from utils.monitoring_window import MonitoringWindow
from utils.quality import Labelled, quality_numbers
from utils.serving import class_names_of
from utils.store import Coverage, Store
from utils.timestamps import iso_utc

WINDOW_SECONDS = {"hour": 3600.0, "day": 86400.0}


def validation_accuracy(metrics: dict[str, Any]) -> float | None:
    """A version's reference accuracy: `val_accuracy`, else `accuracy` (training records the
    accuracy on its validation split under that name)."""
    value = metrics.get("val_accuracy", metrics.get("accuracy"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class QualityFloor:
    """When production's accuracy is too low: below `min_accuracy`, or more than `max_drop`
    under its validation accuracy (either unset: not checked), over `window`, once at least
    `min_labels` of its predictions there carry a label."""

    window: str = "day"
    min_labels: int = 100
    min_accuracy: float | None = None
    max_drop: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> QualityFloor:
        return cls(settings.quality_window, settings.quality_min_labels, settings.quality_min_accuracy,
                   settings.quality_max_drop)

    def floor(self, validation: float | None) -> float | None:
        """The accuracy below which the alert fires (the higher of the two limits)."""
        limits = [self.min_accuracy] if self.min_accuracy is not None else []
        if self.max_drop is not None and validation is not None:
            limits.append(validation - self.max_drop)
        return max(limits) if limits else None


@dataclass(frozen=True)
class QualityCheck:
    """The floor's verdict on the production version."""

    version: str | None
    window: str
    labelled: int
    min_labels: int
    accuracy: float | None
    validation_accuracy: float | None
    floor: float | None
    evaluated: bool
    below_floor: bool
    reason: str


class QualityReporter:
    """Reads quality over `store`; `monitoring_window` and `horizon_seconds` bound the
    "monitoring" and "horizon" windows, `floor` says when production's accuracy is too low."""

    def __init__(self, store: Store, monitoring_window: int, horizon_seconds: float, floor: QualityFloor) -> None:
        self.store = store
        self.monitoring_window = monitoring_window
        self.horizon_seconds = horizon_seconds
        self.floor = floor

    def check(self, now: float | None = None, coverage: dict[str, Coverage] | None = None) -> QualityCheck:
        """Production's accuracy over the floor's window against the floor (a count in the
        database: cheap enough for every drift check and scrape; `coverage`: that count, when
        the caller has it for the same window and moment)."""
        now = time.time() if now is None else now
        version = self.store.versions.deployment().production
        row = self.store.versions.get(version) if version else None
        validation = validation_accuracy(row.metrics) if row is not None else None
        floor = self.floor.floor(validation)
        since, until = self.window_range(self.floor.window, now)
        counts = coverage if coverage is not None else self.store.outcomes.coverage(since, until)
        found = counts.get(version or "", Coverage(0, 0, 0))
        accuracy = found.correct / found.labelled if found.labelled else None
        evaluated = floor is not None and accuracy is not None and found.labelled >= self.floor.min_labels
        below = evaluated and accuracy < floor  # type: ignore[operator]  # both set when evaluated
        if floor is None:
            reason = "no floor configured (QUADRA_QUALITY_MIN_ACCURACY or QUADRA_QUALITY_MAX_DROP)"
        elif not evaluated:
            reason = f"{found.labelled} labelled predictions of {self.floor.min_labels} needed"
        else:
            reason = f"accuracy {accuracy:.4f} {'below' if below else 'at or above'} the floor {floor:.4f}"
        return QualityCheck(version, self.floor.window, found.labelled, self.floor.min_labels, accuracy, validation,
                            floor, evaluated, below, reason)

    def window_range(self, window: str, now: float) -> tuple[float, float]:
        """[since, until] of a named window."""
        if window in WINDOW_SECONDS:
            return now - WINDOW_SECONDS[window], now
        if window == "monitoring":
            ats = MonitoringWindow(self.store, self.monitoring_window).columns("at")["at"]
            return (ats[0] if ats else now), now
        if window == "horizon":
            return now - self.horizon_seconds, now
        raise ValueError(f"unknown quality window {window!r}; one of hour, day, monitoring, horizon")

    def report(self, window: str = "day", version: str | None = None, now: float | None = None) -> dict[str, Any]:
        """The Quality response's fields: each version with predictions in the window (or the
        one asked for, which must be registered), production's first."""
        now = time.time() if now is None else now
        since, until = self.window_range(window, now)
        coverage = self.store.outcomes.coverage(since, until)
        production = self.store.versions.deployment().production
        if version is not None:
            if self.store.versions.get(version) is None:
                raise VersionNotFound(f"version {version} not found")
            names = [version]
        else:
            names = sorted(coverage, key=lambda name: (name != production, name))
        versions = [self.version_quality(name, since, until, coverage.get(name)) for name in names]
        return {"window": window, "since": iso_utc(since), "until": iso_utc(until), "production_version": production,
                "versions": [v for v in versions if v is not None],
                "check": asdict(self.check(now, coverage if window == self.floor.window else None))}

    def version_quality(self, version: str, since: float, until: float, coverage: Any) -> dict[str, Any] | None:
        row = self.store.versions.get(version)
        if row is None:
            return None
        classes = class_names_of(row.config)
        labelled = Labelled.from_columns(self.store.outcomes.labelled(version, since, until), classes)
        predictions = coverage.predictions if coverage is not None else 0
        return {"version": version, "classes": classes, "predictions": predictions, "labelled": len(labelled),
                "coverage": len(labelled) / predictions if predictions else None,
                "validation_accuracy": validation_accuracy(row.metrics),
                **quality_numbers(labelled, classes, since, until)}
