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
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
from pydantic_core import from_json

from utils.config import current_settings, is_service_folder
from utils.drift import DatasetDrift, column_drift, dataset_drift
from utils.errors import InsufficientData
from utils.journal import RecordBatch, RecordJournal
from utils.store import BaselineRow, Store, folder_store, store_for
from utils.timestamps import iso_utc

MAX_FLUSH_BATCH = 5000
MAX_BUFFERED = 200_000
MIN_DRIFT_SAMPLES = 30
MAX_BASELINE_ROWS = 5000
FEATURE_BLOCK = 500
STD_FLOOR = 1e-6
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


@dataclass
class DriftMetrics:
    """The drift verdict: the seed's confidence check plus input and prediction drift."""

    drift_detected: bool
    drift_score: float
    threshold: float
    baseline_mean: float | None
    current_mean: float | None
    baseline_std: float | None
    current_std: float | None
    sample_count: int
    evaluated: bool
    reason: str | None = None
    window: dict[str, Any] = field(default_factory=dict)
    detectors: dict[str, bool] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    drifted_features: list[str] = field(default_factory=list)
    dataset_drift_share: float | None = None
    features: dict[str, Any] = field(default_factory=dict)
    prediction_drift: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(batches: list[RecordBatch]) -> Iterator[tuple[int, list[RecordBatch]]]:
    """(index of the first, the batches) in groups of about MAX_FLUSH_BATCH records."""
    start, size = 0, 0
    for index, batch in enumerate(batches):
        size += len(batch)
        if size >= MAX_FLUSH_BATCH:
            yield start, batches[start:index + 1]
            start, size = index + 1, 0
    if start < len(batches):
        yield start, batches[start:]


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
    baseline). The service flushes every QUADRA_MONITORING_FLUSH_SECONDS on its scheduler and
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
        self.dropped = 0
        self.journal = journal
        self._buffer: deque[RecordBatch] = deque()
        self._pending = 0  # records in the buffer
        self._journal_files: list[Path] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

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
        """Record one prediction; `prediction_time` is in seconds. Returns at once.

        `input_data` may be anything JSON-able: a flat row of numbers (a list, tuple or 1-D
        array) becomes the features drift compares; anything else is recorded without them."""
        row = feature_row(input_data) if self._keep_features() else None
        score = None if confidence is None else float(confidence)
        self._append(RecordBatch(time.time(), model_version, float(prediction_time) * 1000.0, [score],
                                 [None if predicted_class is None else str(predicted_class)], [row], success, error))

    def record_metrics(self, metrics: PredictionMetrics) -> None:
        """Record one prediction described by a `PredictionMetrics` (for the Python API: a
        prediction made elsewhere, with its own time and features, kept as given)."""
        features = list(metrics.features) if metrics.features is not None and self._keep_features() else None
        self._append(RecordBatch(metrics.at, metrics.model_version, metrics.latency_ms, [metrics.confidence],
                                 [metrics.predicted_class], [features], metrics.success, metrics.error))

    def record_batch(self, rows: list[list[float]], results: list[dict[str, Any]], seconds: float, model_version: str) -> None:
        """Record each row of a served request (the request path's fast variant)."""
        features: list[list[float] | None] = (list(rows) if self.feature_sample_rate >= 1.0
                                              else [row if self._keep_features() else None for row in rows])
        self._append(RecordBatch(time.time(), model_version, seconds * 1000.0, [r["confidence"] for r in results],
                                 [r["class"] for r in results], features))

    def _keep_features(self) -> bool:
        return self.feature_sample_rate >= 1.0 or random.random() < self.feature_sample_rate

    def record_failure(self, error: str, seconds: float, model_version: str | None) -> None:
        self.record_prediction(None, seconds, success=False, error=error, model_version=model_version)

    def _append(self, batch: RecordBatch) -> None:
        """Buffer a request's records (journalled first, when a journal is configured)."""
        with self._lock:
            if self.journal is not None:
                batch = replace(batch, first_id=self.journal.reserve_ids(len(batch)))
                self.journal.append(batch)
            while self._buffer and self._pending + len(batch) > MAX_BUFFERED:
                dropped = self._buffer.popleft()
                self._pending -= len(dropped)
                self.dropped += len(dropped)
            self._buffer.append(batch)
            self._pending += len(batch)

    @property
    def pending(self) -> int:
        return self._pending

    def flush(self) -> int:
        """Write everything buffered; on a store error the records stay buffered (and
        journalled) for the next try. Returns how many new records reached the store."""
        written = 0
        with self._flush_lock:
            with self._lock:
                batches = list(self._buffer)
                self._buffer.clear()
                self._pending = 0
                if self.journal is not None and batches:
                    self._journal_files.append(self.journal.rotate())
            for start, group in _groups(batches):
                try:
                    written += self.store.predictions.insert([r for batch in group for r in batch.records()])
                except Exception:
                    unwritten = batches[start:]
                    with self._lock:
                        self._buffer.extendleft(reversed(unwritten))
                        self._pending += sum(len(batch) for batch in unwritten)
                    log.exception("could not write %d prediction records; will retry", sum(map(len, unwritten)))
                    return written
            RecordJournal.release(self._journal_files)
            self._journal_files.clear()
        return written

    def recover_journals(self) -> int:
        """Replay the journals of processes on this host that died before flushing."""
        if self.journal is None:
            return 0
        recovered = 0
        for path in RecordJournal.orphans(self.journal.folder):
            records = list(RecordJournal.read(path))
            for start in range(0, len(records), MAX_FLUSH_BATCH):
                recovered += self.store.predictions.insert(records[start:start + MAX_FLUSH_BATCH])
            path.unlink(missing_ok=True)
        if recovered:
            log.warning("recovered %d prediction records from the journals of stopped processes", recovered)
        return recovered

    def stop(self) -> None:
        """Write what is still buffered (the end of a console session, a test, a worker). The
        service flushes on its scheduler (`utils.scheduler`); this object runs no thread."""
        self.flush()

    # -- totals and window --------------------------------------------------------------

    @property
    def total_predictions(self) -> int:
        return self.store.predictions.totals().count + self._pending

    @property
    def error_count(self) -> int:
        return self.store.predictions.totals().errors + sum(len(batch) for batch in list(self._buffer) if not batch.success)

    def reset_counters(self) -> None:
        """Zero the totals and start a new window; the records themselves are kept."""
        self.flush()
        self.store.predictions.reset_window(actor="monitor")

    def _window(self, *columns: str, after_id: int = 0) -> dict[str, list[Any]]:
        """The window's records (those after `after_id`, too), column by column, oldest first."""
        start = max(self.store.predictions.window_start(), after_id)
        return self.store.predictions.window(self.window_size, start, columns)

    def _successful(self, *columns: str, after_id: int = 0) -> dict[str, list[Any]]:
        """The window's successful records, column by column, oldest first."""
        window = self._window(*columns, "success", after_id=after_id)
        success = window.pop("success")
        return {name: list(compress(values, success)) for name, values in window.items()}

    # -- statistics ---------------------------------------------------------------------

    def window_confidence_mean(self) -> float | None:
        """Mean confidence of the successful predictions in the window (from the store)."""
        values = _present(self._window("confidence")["confidence"])
        return sum(values) / len(values) if values else None

    def get_statistics(self) -> dict[str, Any]:
        """Totals plus rolling-window statistics (the last `window_size` records)."""
        self.flush()
        window = self._window("at", "latency_ms", "confidence", "predicted_class", "success", "model_version")
        success, count = window["success"], len(window["success"])
        latency = np.array(window["latency_ms"], dtype=float)
        confidence = np.array(_present(compress(window["confidence"], success)), dtype=float)
        errors = count - sum(success)
        totals = self.store.predictions.totals()
        now = time.time()
        recent = self.store.predictions.count_since(now - 60, self.store.predictions.window_start())
        counts, _ = np.histogram(confidence, bins=CONFIDENCE_BINS) if confidence.size else (np.zeros(len(CONFIDENCE_BINS) - 1), None)
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
                "histogram": {"bins": CONFIDENCE_BINS, "counts": [int(c) for c in counts]},
            },
            "class_distribution": _counts(compress(window["predicted_class"], success)),
            "model_versions": _counts(window["model_version"]),
            "throughput_per_second": recent / 60.0,
            "pending_records": self.pending,
            "dropped_records": self.dropped,
            "timestamp": iso_utc(now),
        }

    @property
    def prediction_times(self) -> tuple[float, ...]:
        """The window's prediction times in seconds, oldest first (read-only)."""
        self.flush()
        return tuple(ms / 1000.0 for ms in self._window("latency_ms")["latency_ms"])

    @property
    def confidences(self) -> tuple[float, ...]:
        """The confidences of the window's successful predictions that report one, oldest first."""
        self.flush()
        return tuple(_present(self._successful("confidence")["confidence"]))

    # -- baseline -----------------------------------------------------------------------

    def set_baseline(self, feature_names: Sequence[str] | None = None, created_by: str = "console") -> dict[str, Any]:
        """Make the current window the reference for drift (needs `baseline_min_samples`)."""
        self.flush()
        last_record_id = self.store.predictions.last_id()
        window = {name: values[-MAX_BASELINE_ROWS:]
                  for name, values in self._successful("confidence", "predicted_class", "features").items()}
        classes = window["predicted_class"]
        if len(classes) < self.baseline_min_samples:
            raise InsufficientData(
                f"a baseline needs at least {self.baseline_min_samples} successful predictions in the window; "
                f"there are {len(classes)}"
            )
        confidence = np.array(_present(window["confidence"]), dtype=float)  # a record may not report one
        if confidence.size == 0:
            raise InsufficientData("a baseline needs successful predictions that report a confidence")
        features = _feature_rows(window["features"])
        width = len(features[0]) if features else 0
        names = list(feature_names or [])[:width] or [f"feature_{i}" for i in range(width)]
        matrix = np.array(features, dtype=float) if features else np.zeros((0, width))
        statistics = {
            "confidence_mean": float(confidence.mean()),
            "confidence_std": float(confidence.std()),
            "sample_count": len(classes),
            "feature_names": names,
            "feature_means": [float(v) for v in matrix.mean(axis=0)] if len(features) else [],
            "feature_stds": [float(v) for v in matrix.std(axis=0)] if len(features) else [],
            "class_distribution": _counts(classes),
            "last_record_id": last_record_id,
        }
        sample = {"confidence": confidence.tolist(), "classes": classes, "features": features}
        baseline_id = self.store.baselines.insert(created_by, statistics, sample)
        log.info("baseline %d set by %s from %d predictions", baseline_id, created_by, len(classes))
        return {"id": baseline_id, **statistics}

    def reset_baseline(self) -> int:
        """Forget every baseline; drift is not evaluated until a new one is set."""
        removed = self.store.baselines.delete_all()
        log.info("baselines reset (%d removed)", removed)
        return removed

    @property
    def baseline_metrics(self) -> dict[str, Any] | None:
        baseline = self.store.baselines.latest()
        if baseline is None:
            return None
        return {**_baseline_summary(baseline), **baseline.statistics}

    # -- drift --------------------------------------------------------------------------

    def detect_drift(self) -> dict[str, Any]:
        """Compare the window with the baseline: confidence shift (the seed's score), input
        drift per feature and prediction (class) drift. `drift_detected` when any fires.

        The window holds only predictions made after the baseline was set (at most
        `window_size`): comparing the baseline's own rows with themselves would dilute a real
        shift. `window` says how many rows were compared and from when."""
        self.flush()
        baseline = self.store.baselines.latest()
        after_id = (baseline.statistics.get("last_record_id") or 0) if baseline else 0
        window = self._successful("confidence", "predicted_class", "features", "at", after_id=after_id)
        count = len(window["predicted_class"])
        compared = {"count": count, "first_at": iso_utc(window["at"][0]) if count else None,
                    "last_at": iso_utc(window["at"][-1]) if count else None,
                    "since_baseline_at": iso_utc(baseline.created_at) if baseline else None}
        confidence = np.array(_present(window["confidence"]), dtype=float)
        current_mean = float(confidence.mean()) if confidence.size else None
        current_std = float(confidence.std()) if confidence.size else None
        if baseline is None:
            return self._not_evaluated("no baseline set: POST /api/monitoring/baseline", current_mean, current_std,
                                       compared)
        stats = baseline.statistics
        if confidence.size < MIN_DRIFT_SAMPLES:
            return self._not_evaluated(
                f"drift needs at least {MIN_DRIFT_SAMPLES} predictions made since the baseline; there are {confidence.size}",
                current_mean, current_std, compared, stats, baseline,
            )
        score = abs(current_mean - stats["confidence_mean"]) / max(stats["confidence_std"], STD_FLOOR)
        inputs = _input_drift(baseline, window["features"])
        prediction = column_drift("predicted_class", baseline.sample["classes"], window["predicted_class"], categorical=True)
        detectors = {
            "confidence": score > self.drift_threshold,
            "input": bool(inputs and inputs.dataset_drift),
            "prediction": prediction.drift_detected,
        }
        fired = [name for name, on in detectors.items() if on]
        return DriftMetrics(
            drift_detected=bool(fired),
            drift_score=float(score),
            threshold=self.drift_threshold,
            baseline_mean=stats["confidence_mean"],
            current_mean=current_mean,
            baseline_std=stats["confidence_std"],
            current_std=current_std,
            sample_count=count,
            evaluated=True,
            window=compared,
            detectors=detectors,
            fired=fired,
            drifted_features=inputs.drifted_columns if inputs else [],
            dataset_drift_share=inputs.drift_share if inputs else None,
            features=inputs.to_dict()["columns"] if inputs else {},
            prediction_drift=prediction.to_dict(),
            baseline=_baseline_summary(baseline),
        ).to_dict()

    def _not_evaluated(self, reason: str, current_mean: float | None, current_std: float | None,
                       compared: dict[str, Any], stats: dict[str, Any] | None = None,
                       baseline: BaselineRow | None = None) -> dict[str, Any]:
        return DriftMetrics(
            drift_detected=False, drift_score=0.0, threshold=self.drift_threshold,
            baseline_mean=stats["confidence_mean"] if stats else None, current_mean=current_mean,
            baseline_std=stats["confidence_std"] if stats else None, current_std=current_std,
            sample_count=compared["count"], evaluated=False, reason=reason, window=compared,
            detectors={"confidence": False, "input": False, "prediction": False},
            baseline=_baseline_summary(baseline) if baseline else None,
        ).to_dict()

    # -- retention ----------------------------------------------------------------------

    def roll_up(self, retention_seconds: float) -> int:
        """Fold raw records older than the retention into per-minute rows."""
        return self.store.rollups.roll_up(time.time() - retention_seconds)


def _input_drift(baseline: BaselineRow, features: list[str | None]) -> DatasetDrift | None:
    reference = baseline.sample["features"]
    current = _present(features)
    if not reference or not current:
        return None
    names = baseline.statistics["feature_names"]
    ref, cur = np.array(reference, dtype=float), _feature_matrix(current)
    if ref.shape[1] != cur.shape[1]:
        return None
    return dataset_drift({n: ref[:, i] for i, n in enumerate(names)}, {n: cur[:, i] for i, n in enumerate(names)})


def _baseline_summary(baseline: BaselineRow) -> dict[str, Any]:
    return {"id": baseline.id, "created_at": iso_utc(baseline.created_at), "created_by": baseline.created_by,
            "sample_count": baseline.statistics["sample_count"]}


def _present(values: Iterable[Any]) -> list[Any]:
    """The values that are not None (missing features or confidence)."""
    return [value for value in values if value is not None]


def _feature_rows(texts: Iterable[str | None]) -> list[list[float]]:
    """The kept feature rows of a window (JSON texts, None where not kept), parsed in one go.

    pydantic_core's parser gives the same values as `json.loads` (floats bit for bit, ints as
    ints) in a third of the time, which is most of the cost of drift over a large window."""
    return from_json("[" + ",".join(_present(texts)) + "]")


def _feature_matrix(texts: list[str]) -> np.ndarray:
    """Feature rows (JSON texts) as one float matrix, parsed FEATURE_BLOCK rows at a time: a
    Python list per row of a 100k window, all alive at once, costs more in garbage collection
    than in parsing (a block stays under the collector's first threshold, 700)."""
    return np.concatenate([np.array(_feature_rows(texts[start:start + FEATURE_BLOCK]), dtype=float)
                           for start in range(0, len(texts), FEATURE_BLOCK)])


def _counts(values: Iterable[Any]) -> dict[str, int]:
    """Occurrences by text, in order of first appearance (None counts as "None")."""
    counts: dict[str, int] = {}
    for value, count in Counter(values).items():
        key = str(value)
        counts[key] = counts.get(key, 0) + count
    return counts


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
