"""Prometheus metrics at GET /metrics.

Per-request counters and histograms use prometheus_client; under gunicorn they run in its
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by gunicorn.conf.py) so a scrape sums
every worker. Everything that is shared state (predictions, drift, versions, mode) is read
from the store at scrape time, so it is the same whichever worker answers.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from utils.instruments import record_memory, uptime_seconds
from utils.model_modes import ModelMode
from utils.quality_report import QualityCheck
from utils.store import Coverage, PredictionTotals, RolloutRow, Store, VersionRow
from utils.store.predictions import CONFIDENCE_BUCKETS

disable_created_metrics()
REQUESTS = Counter("quadra_http_requests_total", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "quadra_http_request_duration_seconds", "HTTP request latency by endpoint", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
INTEGRITY_FAILURES = Counter("quadra_integrity_failures_total", "Artifacts refused because their SHA-256 did not match")
AUTH_FAILURES = Counter("quadra_auth_failures_total", "Requests refused for missing or bad credentials")
RATE_LIMITED = Counter("quadra_rate_limited_total", "Requests refused by the rate limit")
KEY_REQUESTS = Counter("quadra_api_key_requests_total", "Authenticated requests by API key id (a token counts for "
                       "the key it was made for)", ["key_id"])
FEEDBACK_LABELS = Counter("quadra_feedback_labels_total", "Feedback items by their result", ["status"])


class StoreCollector:
    """Shared state as counters and gauges, read from the store on every scrape."""

    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.read_state = read_state

    def collect(self) -> Iterator[Any]:
        state = self.read_state()
        counters = {
            "quadra_predictions": ("Predictions recorded (all workers; reset by reset_counters)", state["predictions"]),
            "quadra_prediction_errors": ("Failed predictions recorded (all workers)", state["errors"]),
        }
        for name, (documentation, value) in counters.items():
            if value is not None:
                yield CounterMetricFamily(name, documentation, value=float(value))
        gauges = {
            "quadra_prediction_confidence_mean": ("Mean confidence over the monitoring window", state["confidence_mean"]),
            "quadra_drift_score": ("Confidence drift score at the last drift check", state["drift_score"]),
            "quadra_drift_detected": ("1 when the last drift check found drift", state["drift_detected"]),
        }
        for name, (documentation, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=float(value))
        info = InfoMetricFamily("quadra_model", "Serving and production model versions")
        info.add_metric([], {"serving_version": state["serving_version"] or "", "production_version": state["production_version"] or ""})
        yield info
        mode = GaugeMetricFamily("quadra_mode", "1 for the current mode", labels=["mode"])
        for name in state["modes"]:
            mode.add_metric([name], 1.0 if name == state["mode"] else 0.0)
        yield mode
        yield from rollout_metrics(state["rollout"])
        yield from quality_metrics(state["quality"], state["quality_check"])
        yield from registry_metrics(state["versions"])
        yield confidence_histogram(state["totals"])
        storage = GaugeMetricFamily("quadra_storage_bytes", "Bytes used by the store's database and the registry's "
                                    "artifacts, and free on the state folder's disk", labels=["part"])
        for part, value in state["storage"].items():
            storage.add_metric([part], value)
        yield storage
        episodes = CounterMetricFamily("quadra_alert_episodes", "Alert episodes started (drift, quality)", labels=["kind"])
        for kind, value in state["alert_episodes"].items():
            episodes.add_metric([kind], value)
        yield episodes


ARM_GAUGES = (
    ("quadra_rollout_arm_predictions", "Predictions per canary arm since the canary started", "predictions", 1.0),
    ("quadra_rollout_arm_error_rate", "Failed share of predictions per canary arm", "error_rate", 1.0),
    ("quadra_rollout_arm_latency_p95_seconds", "p95 prediction latency per canary arm", "latency_p95_ms", 0.001),
    ("quadra_rollout_arm_confidence_mean", "Mean confidence per canary arm", "confidence_mean", 1.0),
)


def rollout_metrics(rollout: RolloutRow | None) -> Iterator[GaugeMetricFamily]:
    """The active rollout: its share and, as of its last check, each arm's numbers labelled by
    arm ("production" or "candidate") and version (and a shadow's agreement rate)."""
    yield GaugeMetricFamily("quadra_rollout_active", "1 while a canary is running or held",
                            value=1.0 if rollout is not None else 0.0)
    if rollout is None:
        return
    yield GaugeMetricFamily("quadra_rollout_percent", "Share of predictions the canary's candidate serves",
                            value=rollout.percent)
    shadow = (rollout.comparison or {}).get("shadow")
    if shadow is not None and shadow["agreement_rate"] is not None:
        yield GaugeMetricFamily("quadra_rollout_shadow_agreement_rate",
                                "Share of shadowed rows where the candidate gave production's class",
                                value=shadow["agreement_rate"])
    arms = (rollout.comparison or {}).get("arms", {})
    for name, documentation, field, scale in ARM_GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=["arm", "version"])
        for arm, numbers in arms.items():
            if numbers[field] is not None:
                gauge.add_metric([arm, numbers["version"]], numbers[field] * scale)
        yield gauge


def registry_metrics(versions: list[VersionRow]) -> Iterator[GaugeMetricFamily]:
    """How many versions (archived or not) and each one's artifact size."""
    count = GaugeMetricFamily("quadra_model_versions", "Registered model versions", labels=["archived"])
    for archived in (False, True):
        count.add_metric([str(archived).lower()], sum(1 for row in versions if row.archived == archived))
    yield count
    size = GaugeMetricFamily("quadra_model_size_bytes", "Artifact size of each registered version", labels=["version"])
    for row in versions:
        size.add_metric([row.version], row.size_bytes)
    yield size


def confidence_histogram(totals: PredictionTotals) -> HistogramMetricFamily:
    """The confidence of every successful prediction since the counters were reset (all workers)."""
    cumulative, buckets = 0, []
    for bound, count in zip((*CONFIDENCE_BUCKETS, float("inf")), totals.confidence_counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return HistogramMetricFamily("quadra_prediction_confidence", "Confidence of successful predictions (all workers; "
                                 "reset with the monitoring counters)", buckets=buckets, sum_value=totals.confidence_sum)


def quality_metrics(coverage: dict[str, Coverage], check: QualityCheck) -> Iterator[GaugeMetricFamily]:
    """Per version over the quality alert's window: labelled predictions, label coverage and
    accuracy; and production's floor and verdict."""
    labelled = GaugeMetricFamily("quadra_quality_labelled", "Labelled predictions in the quality window",
                                 labels=["version"])
    share = GaugeMetricFamily("quadra_quality_label_coverage", "Share of predictions in the quality window with a label",
                              labels=["version"])
    accuracy = GaugeMetricFamily("quadra_quality_accuracy", "Accuracy of the labelled predictions in the quality window",
                                 labels=["version"])
    for version, numbers in coverage.items():
        labelled.add_metric([version], numbers.labelled)
        share.add_metric([version], numbers.labelled / numbers.predictions if numbers.predictions else 0.0)
        if numbers.labelled:
            accuracy.add_metric([version], numbers.correct / numbers.labelled)
    yield from (labelled, share, accuracy)
    if check.floor is not None:
        yield GaugeMetricFamily("quadra_quality_accuracy_floor", "Accuracy below which the quality alert fires",
                                value=check.floor)
    if check.evaluated:
        yield GaugeMetricFamily("quadra_quality_below_floor", "1 when production's accuracy is below the floor",
                                value=1.0 if check.below_floor else 0.0)


def init_metrics(app: Flask, read_state: Callable[[], dict[str, Any]]) -> None:
    """Count and time every request, and serve GET /metrics."""

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unmatched"
        REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
        LATENCY.labels(endpoint).observe(time.perf_counter() - g.get("request_started", time.perf_counter()))
        principal = g.get("quadra_principal")
        if principal is not None and principal.key_id is not None:
            KEY_REQUESTS.labels(principal.key_id).inc()
        if response.status_code == 401:
            AUTH_FAILURES.inc()
        elif response.status_code == 429:
            RATE_LIMITED.inc()
        elif response.status_code == 422:
            INTEGRITY_FAILURES.inc()
        return response

    shared = CollectorRegistry()
    shared.register(StoreCollector(read_state))

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(_process_registry()) + generate_latest(shared), mimetype=CONTENT_TYPE_LATEST)


def _process_registry() -> CollectorRegistry:
    """This process's metrics, or every worker's under gunicorn's multiprocess mode."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def shared_state(services: Any) -> dict[str, Any]:
    """What /metrics reports from the store: the same whichever worker answers."""
    drift = services.store.drift_checks.latest()
    reporter = services.monitor.quality_reporter
    versions = services.store.versions.list()
    deployment = services.store.versions.deployment()
    return {
        "predictions": services.monitor.total_predictions,
        "errors": services.monitor.error_count,
        "confidence_mean": services.monitor.window_confidence_mean(),
        "drift_score": drift.drift_score if drift else None,
        "drift_detected": (1.0 if drift.drift_detected else 0.0) if drift else None,
        "serving_version": deployment.serving,
        "production_version": deployment.production,
        "mode": services.modes.mode.value,
        "modes": tuple(mode.value for mode in ModelMode),
        "rollout": services.store.rollouts.active(),
        "quality": services.store.outcomes.coverage(*reporter.window_range(reporter.floor.window, time.time())),
        "quality_check": reporter.check(),
        "versions": versions,
        "totals": services.store.predictions.totals(),
        "storage": storage_usage(services.store, services.settings.state_dir, versions),
        "alert_episodes": services.store.alerts.episodes(),
    }


def storage_usage(store: Store, state_dir: Path, versions: list[VersionRow]) -> dict[str, int]:
    """Bytes of the database and of the registered artifacts, and free on the state folder's disk."""
    return {"database": store.database.size_bytes(), "artifacts": sum(row.size_bytes for row in versions),
            "disk_free": shutil.disk_usage(state_dir).free}


def resource_summary(store: Store, state_dir: Path, batching: dict[str, Any] | None) -> dict[str, Any]:
    """What the dashboard shows of the checklist's resources, rounded so that a push goes out
    when something moved, not at every tick: uptime (minutes), this worker's memory (MB),
    storage, the version count and average model size, and this worker's `batching`
    (`Batcher.summary`)."""
    versions = [row for row in store.versions.list() if not row.archived]
    storage = storage_usage(store, state_dir, versions)
    return {"uptime_minutes": int(uptime_seconds() // 60), "worker_memory_mb": record_memory() // 2**20,
            "database_mb": round(storage["database"] / 2**20, 1), "artifacts_mb": round(storage["artifacts"] / 2**20, 1),
            "disk_free_gb": round(storage["disk_free"] / 2**30, 1), "versions": len(versions),
            "average_model_kb": round(sum(row.size_bytes for row in versions) / len(versions) / 1024, 1)
            if versions else None, "batching": batching}
