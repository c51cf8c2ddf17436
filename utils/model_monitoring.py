"""Monitoring: every prediction recorded, rolling-window statistics, drift against a stored
baseline, and the seed's HealthChecker.

Recording is cheap on the request path: a record is appended to an in-process buffer, which
`flush()` writes to the store in batches (the service's scheduler calls it, and so does shutdown). All processes share one
window, one baseline and one set of totals through the store.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np

from utils import drift_detection
from utils.config import current_settings, is_service_folder
from utils.errors import InsufficientData as InsufficientData  # the Python API imports it from here
from utils.feedback import FeedbackPolicy, LabelFeedback
from utils.journal import RecordBatch, RecordJournal
from utils.monitoring_window import MonitoringWindow, counts, present
from utils.quality_report import QualityFloor, QualityReporter
from utils.record_buffer import RecordBuffer
from utils.schemas import Drift
from utils.store import Store, folder_store, store_for
from utils.timestamps import iso_utc

CONFIDENCE_BINS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
log = logging.getLogger("quadra.monitoring")


@dataclass(frozen=True)
class PredictionMetrics:
    """One prediction as the Python API hands it to `ModelMonitor.record_metrics` (the service
    itself records with `record_batch`); `at` in epoch seconds, `latency_ms` in milliseconds."""

    at: float
    latency_ms: float
    success: bool
    confidence: float | None = None
    predicted_class: str | None = None
    error: str | None = None
    model_version: str | None = None
    features: list[float] | None = None
    prediction_id: str | None = None  # with probabilities (in class order): labels can be recorded for it
    probabilities: list[float] | None = None

    def __post_init__(self) -> None:
        """A record the store cannot place in time would fail its whole flush, again at every retry.
        A bool is refused too: Python counts it as a number, and `True` would be 1970."""
        if isinstance(self.at, bool) or not (isinstance(self.at, numbers.Real) and math.isfinite(self.at) and self.at >= 0):
            raise ValueError(f"at must be finite epoch seconds, not {self.at!r}")


def _summary(values: np.ndarray) -> dict[str, float | None]:
    """mean, std, p50, p95, p99 and max of `values` (None for each when there are none)."""
    if values.size == 0:
        return dict.fromkeys(("mean", "std", "p50", "p95", "p99", "max"))
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"mean": float(values.mean()), "std": float(values.std()), "p50": float(p50), "p95": float(p95),
            "p99": float(p99), "max": float(values.max())}


def feature_row(data: Any) -> list[float] | None:
    """`data` as the features drift compares when it is a flat row of finite numbers (a list,
    a tuple, a 1-D array or tensor); None for anything else, which is recorded without them."""
    if hasattr(data, "tolist") and getattr(data, "ndim", 1) == 1:
        data = data.tolist()
    if not isinstance(data, (list, tuple)) or not data:
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in data):
        return None
    return [float(v) for v in data]


class ModelMonitor:
    """The seed's monitor over a store.

    The folder rule: `ModelMonitor()` or `ModelMonitor(<QUADRA_MONITORING_DIR>)` is the
    service's monitor (its store, so the service's window, baseline and totals), a monitor
    built for any other folder keeps its own SQLite file there. Arguments left out come from
    the QUADRA_* settings (window, drift threshold, baseline minimum, sampling).

    Records are buffered; `flush()` writes them, and so does every read (statistics, drift,
    baseline, quality). The service flushes every QUADRA_MONITORING_FLUSH_SECONDS on its scheduler and
    at exit; a console monitor writes when it reads or is flushed, stopped or left as a
    context manager."""

    def __init__(
        self,
        monitoring_dir: str | Path | None = None,
        window_size: int | None = None,
        drift_threshold: float | None = None,
        store: Store | None = None,
        *,
        feature_sample_rate: float | None = None,
        baseline_min_samples: int | None = None,
        journal: RecordJournal | None = None,
        feedback_policy: FeedbackPolicy | None = None,
        quality_floor: QualityFloor | None = None,
    ) -> None:
        settings = current_settings()
        if store is None:
            service = is_service_folder(monitoring_dir, settings.monitoring_dir)
            store = store_for(settings) if service else folder_store(Path(monitoring_dir or "."))
        self.monitoring_dir = Path(monitoring_dir or settings.monitoring_dir)
        self.window_size = settings.monitoring_window if window_size is None else window_size
        self.drift_threshold = settings.drift_threshold if drift_threshold is None else drift_threshold
        self.store = store
        self.feature_sample_rate = settings.feature_sample_rate if feature_sample_rate is None else feature_sample_rate
        self.baseline_min_samples = (settings.baseline_min_samples if baseline_min_samples is None
                                     else baseline_min_samples)
        self.buffer = RecordBuffer(store, journal)
        self.feedback = LabelFeedback(store, feedback_policy or FeedbackPolicy.from_settings(settings))
        floor = quality_floor or QualityFloor.from_settings(settings)
        self.quality_reporter = QualityReporter(store, self.window_size, self.feedback.policy.horizon_seconds, floor)

    def __enter__(self) -> ModelMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recording ----------------------------------------------------------------------

    def record_prediction(
        self,
        input_data: Any,
        prediction_time: float,
        confidence: float | None = None,
        success: bool = True,
        error: str | None = None,
        predicted_class: str | None = None,
        model_version: str | None = None,
    ) -> None:
        """Record one prediction; `prediction_time` is in seconds. Returns at once, unless more
        than FLUSH_AHEAD records (2,000) wait for the store: then it first writes them about
        500 at a time, or waits for the groups of a write in progress, until no more wait.

        `input_data` may be anything JSON-able: a flat row of numbers (a list, tuple or 1-D
        array) becomes the features drift compares; anything else is recorded without them."""
        row = feature_row(input_data) if self._keep_features() else None
        score = None if confidence is None else float(confidence)
        self.buffer.append(RecordBatch(time.time(), model_version, float(prediction_time) * 1000.0, [score],
                                 [None if predicted_class is None else str(predicted_class)], [row], success, error))

    def record_metrics(self, metrics: PredictionMetrics) -> None:
        """Record one prediction described by a `PredictionMetrics` (for the Python API: a
        prediction made elsewhere, with its own time and features, kept as given)."""
        features = list(metrics.features) if metrics.features is not None and self._keep_features() else None
        ids, probabilities = None, None
        if metrics.prediction_id is not None and metrics.probabilities is not None:
            ids, probabilities = [metrics.prediction_id], [list(metrics.probabilities)]
        self.buffer.append(RecordBatch(metrics.at, metrics.model_version, metrics.latency_ms, [metrics.confidence],
                                       [metrics.predicted_class], [features], metrics.success, metrics.error,
                                       prediction_ids=ids, probabilities=probabilities))

    def record_batch(self, rows: list[list[float]], results: list[dict[str, Any]], seconds: float, model_version: str) -> None:
        """Record each row of a served request (the request path's fast variant): results carry
        their prediction `id` and `probabilities` (class -> probability) for labels. Kept as
        tuples, which the garbage collector stops tracking (see `RecordBatch`)."""
        features = (tuple(map(tuple, rows)) if self.feature_sample_rate >= 1.0
                    else tuple(tuple(row) if self._keep_features() else None for row in rows))
        self.buffer.append(RecordBatch(time.time(), model_version, seconds * 1000.0,
                                       tuple([r["confidence"] for r in results]), tuple([r["class"] for r in results]),
                                       features, prediction_ids=tuple([r["id"] for r in results]),
                                       probabilities=tuple([tuple(r["probabilities"].values()) for r in results])))

    def _keep_features(self) -> bool:
        return self.feature_sample_rate >= 1.0 or random.random() < self.feature_sample_rate

    def record_failure(self, error: str, seconds: float, model_version: str | None) -> None:
        self.record_prediction(None, seconds, success=False, error=error, model_version=model_version)

    @property
    def pending(self) -> int:
        """Records buffered in this process, not yet in the store."""
        return self.buffer.pending

    @property
    def dropped(self) -> int:
        """Records this process dropped because its buffer was full."""
        return self.buffer.dropped

    def flush(self) -> int:
        """Write everything buffered; returns how many new records reached the store."""
        return self.buffer.flush()

    def recover_journals(self) -> int:
        """Replay the journals of processes on this host that died before flushing."""
        return self.buffer.recover_journals()

    def stop(self) -> None:
        """Write what is still buffered (the end of a console session, a test, a worker). The
        service flushes on its scheduler (`utils.scheduler`); this object runs no thread."""
        self.flush()

    # -- totals and window --------------------------------------------------------------

    @property
    def total_predictions(self) -> int:
        return self.store.predictions.totals().count + self.buffer.pending

    @property
    def error_count(self) -> int:
        return self.store.predictions.totals().errors + self.buffer.pending_errors

    def reset_counters(self) -> None:
        """Zero the totals and start a new window; the records themselves are kept."""
        self.flush()
        self.store.predictions.reset_window(actor="monitor")

    def _window(self) -> MonitoringWindow:
        return MonitoringWindow(self.store, self.window_size)

    # -- statistics ---------------------------------------------------------------------

    def window_confidence_mean(self) -> float | None:
        """Mean confidence of the successful predictions in the window (from the store)."""
        values = present(self._window().columns("confidence")["confidence"])
        return sum(values) / len(values) if values else None

    def get_statistics(self) -> dict[str, Any]:
        """Totals plus rolling-window statistics (the last `window_size` records)."""
        self.flush()
        window = self._window().columns("at", "latency_ms", "confidence", "predicted_class", "success", "model_version")
        success, count = window["success"], len(window["success"])
        latency = np.array(window["latency_ms"], dtype=float)
        confidence = np.array(present(compress(window["confidence"], success)), dtype=float)
        errors = count - sum(success)
        totals = self.store.predictions.totals()
        now = time.time()
        recent = self.store.predictions.count_since(now - 60, self.store.predictions.window_start())
        histogram, _ = np.histogram(confidence, bins=CONFIDENCE_BINS) if confidence.size else (np.zeros(len(CONFIDENCE_BINS) - 1), None)
        latency_summary = _summary(latency)
        mean_latency_ms = latency_summary["mean"]
        return {
            "total_predictions": totals.count,
            "error_count": totals.errors,
            "error_rate": totals.errors / totals.count if totals.count else 0.0,
            "avg_prediction_time": mean_latency_ms / 1000.0 if mean_latency_ms is not None else None,
            "avg_confidence": float(confidence.mean()) if confidence.size else None,
            "window_size": self.window_size,
            "window": {
                "count": count,
                "errors": errors,
                "error_rate": errors / count if count else 0.0,
                "first_at": iso_utc(window["at"][0]) if count else None,
                "last_at": iso_utc(window["at"][-1]) if count else None,
            },
            "latency_ms": latency_summary,
            "prediction_time": _summary(latency / 1000.0),
            "confidence": {
                **_summary(confidence),
                "min": float(confidence.min()) if confidence.size else None,
                "histogram": {"bins": CONFIDENCE_BINS, "counts": [int(c) for c in histogram]},
            },
            "class_distribution": counts(compress(window["predicted_class"], success)),
            "model_versions": counts(window["model_version"]),
            "throughput_per_second": recent / 60.0,
            "pending_records": self.pending,
            "dropped_records": self.dropped,
            "timestamp": iso_utc(now),
        }

    @property
    def prediction_times(self) -> tuple[float, ...]:
        """The window's prediction times in seconds, oldest first (read-only)."""
        self.flush()
        return tuple(ms / 1000.0 for ms in self._window().columns("latency_ms")["latency_ms"])

    @property
    def confidences(self) -> tuple[float, ...]:
        """The confidences of the window's successful predictions that report one, oldest first."""
        self.flush()
        return tuple(present(self._window().successful("confidence")["confidence"]))

    # -- baseline and drift (utils.drift_detection) ----------------------------------------

    def set_baseline(self, feature_names: Sequence[str] | None = None, created_by: str = "console") -> dict[str, Any]:
        """Make the current window the reference for drift (needs `baseline_min_samples`)."""
        self.flush()
        return drift_detection.set_baseline(self.store, self._window(), self.baseline_min_samples, feature_names,
                                            created_by)

    def reset_baseline(self) -> int:
        """Forget every baseline; drift is not evaluated until a new one is set."""
        removed = self.store.baselines.delete_all()
        log.info("baselines reset (%d removed)", removed)
        return removed

    @property
    def baseline_metrics(self) -> dict[str, Any] | None:
        return drift_detection.baseline_metrics(self.store)

    def drift_report(self) -> Drift:
        """The drift verdict (see `utils.drift_detection.drift_report`)."""
        self.flush()
        return drift_detection.drift_report(self.store, self._window(), self.drift_threshold)

    def detect_drift(self) -> dict[str, Any]:
        """The drift verdict as a dict: the confidence shift (the seed's score), input drift
        per feature and prediction (class) drift; `drift_detected` when any fires."""
        return self.drift_report().model_dump()

    # -- labels and quality -------------------------------------------------------------

    def record_feedback(self, labels: Sequence[Any]) -> dict[str, Any]:
        """Record true classes: `labels` is a sequence of {"id": <a prediction's id>, "label":
        <a class name or index>}. Returns per item its status (`utils.feedback`) and the counts;
        raises `TooManyLabels` past the configured maximum."""
        self.flush()
        return self.feedback.record(labels)

    def quality(self, version: str | None = None, window: str = "day") -> dict[str, Any]:
        """Accuracy, per-class precision / recall / F1, confusion matrix, log loss, Brier score
        and calibration of each version's labelled predictions in `window` (hour, day,
        monitoring or horizon), as GET /api/monitoring/quality answers."""
        self.flush()
        return self.quality_reporter.report(window, version)

    # -- retention ----------------------------------------------------------------------

    def roll_up(self, retention_seconds: float) -> int:
        """Fold raw records older than the retention into per-minute rows, and forget the
        predictions older than the label horizon."""
        now = time.time()
        self.store.outcomes.prune(now - self.feedback.policy.horizon_seconds)
        return self.store.rollups.roll_up(now - retention_seconds)


class HealthChecker:
    """The seed's file-level health check of a models folder: `healthy`, `model_dir_exists`
    and `required_files` (name -> present) as the seed reports them, the checks beside."""

    def __init__(self, model_path: str | Path, required_files: Sequence[str] = ("model_registry.json",),
                 min_free_bytes: int = 100 * 1024 * 1024) -> None:
        self.model_path = Path(model_path)
        self.required_files = list(required_files)
        self.min_free_bytes = min_free_bytes

    def check_health(self) -> dict[str, Any]:
        exists = self.model_path.is_dir()
        files = {name: (self.model_path / name).exists() for name in self.required_files}
        measured = self.model_path if exists else self.model_path.parent
        free = shutil.disk_usage(measured).free if measured.exists() else 0
        disk_ok = free >= self.min_free_bytes
        registry_ok = True
        if files.get("model_registry.json"):
            try:
                json.loads((self.model_path / "model_registry.json").read_text())
            except (OSError, ValueError):
                registry_ok = False
        healthy = exists and all(files.values()) and disk_ok and registry_ok
        return {
            "status": "healthy" if healthy else "unhealthy",
            "healthy": healthy,
            "model_dir_exists": exists,
            "required_files": files,
            "checks": {
                "model_directory": exists,
                "required_files": files,
                "registry_readable": registry_ok,
                "disk_space": {"ok": disk_ok, "free_bytes": free, "min_free_bytes": self.min_free_bytes},
            },
            "timestamp": time.time(),
        }
