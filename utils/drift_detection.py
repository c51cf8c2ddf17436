"""Baselines and the drift verdict over the monitoring window: the seed's confidence score,
input drift per feature and prediction (class) drift, with Evidently's choice of tests."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.drift import DatasetDrift, column_drift, dataset_drift
from utils.errors import InsufficientData
from utils.monitoring_window import MonitoringWindow, counts, feature_matrix, feature_rows, present
from utils.schemas import Drift
from utils.store import BaselineRow, Store
from utils.timestamps import iso_utc

MIN_DRIFT_SAMPLES = 30
MAX_BASELINE_ROWS = 5000
STD_FLOOR = 1e-6
NO_DETECTOR = {"confidence": False, "input": False, "prediction": False}
log = logging.getLogger("quadra.monitoring")


def set_baseline(store: Store, window: MonitoringWindow, min_samples: int, feature_names: Sequence[str] | None,
                 created_by: str) -> dict[str, Any]:
    """Make the window's successful predictions (the newest MAX_BASELINE_ROWS) the reference."""
    last_record_id = store.predictions.last_id()
    rows = {name: values[-MAX_BASELINE_ROWS:]
            for name, values in window.successful("confidence", "predicted_class", "features").items()}
    classes = rows["predicted_class"]
    if len(classes) < min_samples:
        raise InsufficientData(
            f"a baseline needs at least {min_samples} successful predictions in the window; there are {len(classes)}")
    confidence = np.array(present(rows["confidence"]), dtype=float)  # a record may not report one
    if confidence.size == 0:
        raise InsufficientData("a baseline needs successful predictions that report a confidence")
    features = feature_rows(rows["features"])
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
        "class_distribution": counts(classes),
        "last_record_id": last_record_id,
    }
    sample = {"confidence": confidence.tolist(), "classes": classes, "features": features}
    baseline_id = store.baselines.insert(created_by, statistics, sample)
    log.info("baseline %d set by %s from %d predictions", baseline_id, created_by, len(classes))
    return {"id": baseline_id, **statistics}


def baseline_metrics(store: Store) -> dict[str, Any] | None:
    baseline = store.baselines.latest()
    return None if baseline is None else {**_baseline_summary(baseline), **baseline.statistics}


def drift_report(store: Store, window: MonitoringWindow, threshold: float) -> Drift:
    """Compare the window with the baseline; `drift_detected` when any detector fires.

    The window holds only predictions made after the baseline was set: comparing the
    baseline's own rows with themselves would dilute a real shift. `window` says how many
    rows were compared and from when."""
    baseline = store.baselines.latest()
    after_id = (baseline.statistics.get("last_record_id") or 0) if baseline else 0
    rows = window.successful("confidence", "predicted_class", "features", "at", after_id=after_id)
    count = len(rows["predicted_class"])
    compared = {"count": count, "first_at": iso_utc(rows["at"][0]) if count else None,
                "last_at": iso_utc(rows["at"][-1]) if count else None,
                "since_baseline_at": iso_utc(baseline.created_at) if baseline else None}
    confidence = np.array(present(rows["confidence"]), dtype=float)
    current = {"current_mean": float(confidence.mean()) if confidence.size else None,
               "current_std": float(confidence.std()) if confidence.size else None,
               "threshold": threshold, "window": compared}
    if baseline is None:
        return _not_evaluated("no baseline set: POST /api/monitoring/baseline", current, None)
    if confidence.size < MIN_DRIFT_SAMPLES:
        reason = f"drift needs at least {MIN_DRIFT_SAMPLES} predictions made since the baseline; there are {confidence.size}"
        return _not_evaluated(reason, current, baseline)
    stats = baseline.statistics
    score = abs(float(confidence.mean()) - stats["confidence_mean"]) / max(stats["confidence_std"], STD_FLOOR)
    inputs = _input_drift(baseline, rows["features"])
    prediction = column_drift("predicted_class", baseline.sample["classes"], rows["predicted_class"], categorical=True)
    detectors = {"confidence": score > threshold, "input": bool(inputs and inputs.dataset_drift),
                 "prediction": prediction.drift_detected}
    fired = [name for name, on in detectors.items() if on]
    return Drift.model_validate({
        **current, "drift_detected": bool(fired), "drift_score": float(score), "baseline_mean": stats["confidence_mean"],
        "baseline_std": stats["confidence_std"], "sample_count": count, "evaluated": True, "reason": None,
        "detectors": detectors, "fired": fired, "drifted_features": inputs.drifted_columns if inputs else [],
        "dataset_drift_share": inputs.drift_share if inputs else None,
        "features": inputs.to_dict()["columns"] if inputs else {}, "prediction_drift": prediction.to_dict(),
        "baseline": _baseline_summary(baseline),
    })


def _not_evaluated(reason: str, current: dict[str, Any], baseline: BaselineRow | None) -> Drift:
    stats = baseline.statistics if baseline else {}
    return Drift.model_validate({
        **current, "drift_detected": False, "drift_score": 0.0, "baseline_mean": stats.get("confidence_mean"),
        "baseline_std": stats.get("confidence_std"), "sample_count": current["window"]["count"], "evaluated": False,
        "reason": reason, "detectors": NO_DETECTOR, "fired": [], "drifted_features": [], "dataset_drift_share": None,
        "features": {}, "prediction_drift": None, "baseline": _baseline_summary(baseline) if baseline else None,
    })


def _input_drift(baseline: BaselineRow, features: list[str | None]) -> DatasetDrift | None:
    reference = baseline.sample["features"]
    current = present(features)
    if not reference or not current:
        return None
    names = baseline.statistics["feature_names"]
    ref, cur = np.array(reference, dtype=float), feature_matrix(current)
    if ref.shape[1] != cur.shape[1]:
        return None
    return dataset_drift({n: ref[:, i] for i, n in enumerate(names)}, {n: cur[:, i] for i, n in enumerate(names)})


def _baseline_summary(baseline: BaselineRow) -> dict[str, Any]:
    return {"id": baseline.id, "created_at": iso_utc(baseline.created_at), "created_by": baseline.created_by,
            "sample_count": baseline.statistics["sample_count"]}
