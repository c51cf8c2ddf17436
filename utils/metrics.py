"""Prometheus metrics at GET /metrics.

Per-request counters and histograms use prometheus_client; under gunicorn they run in its
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by gunicorn.conf.py) so a scrape sums
every worker. Everything that is shared state (predictions, drift, versions, mode) is read
from the store at scrape time, so it is the same whichever worker answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from utils.model_modes import ModelMode
from utils.store import RolloutRow

disable_created_metrics()
REQUESTS = Counter("quadra_http_requests_total", "HTTP requests by endpoint, method and status", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "quadra_http_request_duration_seconds", "HTTP request latency by endpoint", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
INTEGRITY_FAILURES = Counter("quadra_integrity_failures_total", "Artifacts refused because their SHA-256 did not match")
AUTH_FAILURES = Counter("quadra_auth_failures_total", "Requests refused for missing or bad credentials")
RATE_LIMITED = Counter("quadra_rate_limited_total", "Requests refused by the rate limit")


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
    }
