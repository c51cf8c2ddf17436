"""Monitoring over HTTP: statistics, drift, baseline, alerts, label feedback and quality."""

from __future__ import annotations

from collections import Counter

from flask import Blueprint, g

from routes.common import actor, services
from routes.operations import operation
from utils.metrics import FEEDBACK_LABELS
from utils.schemas import (
    Alerts,
    AlertsQuery,
    Baseline,
    BaselineRemoved,
    Drift,
    FeedbackRequest,
    FeedbackResponse,
    Quality,
    QualityQuery,
    Statistics,
)
from utils.security import require_permission

bp = Blueprint("monitoring", __name__)


@bp.get("/api/monitoring/stats")
@operation("Prediction statistics over the monitoring window", response=Statistics)
def statistics() -> Statistics:
    """Counts, error rate, latency and confidence percentiles, class and version distribution."""
    return Statistics.model_validate(services().monitor.get_statistics())


@bp.get("/api/monitoring/drift")
@operation("Drift against the baseline", response=Drift)
def drift() -> Drift:
    """The seed's confidence score plus per-feature input drift and prediction drift."""
    return services().monitor.drift_report()


@bp.post("/api/monitoring/baseline")
@require_permission("admin")
@operation("Set the drift baseline", response=Baseline, status=201,
           errors={409: "Fewer predictions in the window than QUADRA_BASELINE_MIN_SAMPLES"})
def set_baseline() -> Baseline:
    """Make the current monitoring window the drift reference (409 without enough data)."""
    svc = services()
    served = svc.model_server.current
    names = served.config.get("feature_names") if served else None
    return Baseline.model_validate(svc.monitor.set_baseline(names, created_by=actor()))


@bp.delete("/api/monitoring/baseline")
@require_permission("admin")
@operation("Forget the drift baseline", response=BaselineRemoved)
def reset_baseline() -> BaselineRemoved:
    """Drift is not evaluated until a new baseline is set."""
    return BaselineRemoved(removed=services().monitor.reset_baseline())


@bp.get("/api/monitoring/alerts")
@operation("Recent alerts", query=AlertsQuery, response=Alerts)
def alerts(query: AlertsQuery) -> Alerts:
    """Drift and health alerts, newest first."""
    return Alerts.model_validate({"alerts": services().alerts.recent(query.limit)})


@bp.post("/api/feedback")
@require_permission("write")
@operation("Record true classes for earlier predictions", body=FeedbackRequest, response=FeedbackResponse,
           errors={413: "More items than QUADRA_FEEDBACK_MAX_LABELS (or a body over QUADRA_MAX_BODY_BYTES)"})
def feedback(body: FeedbackRequest) -> FeedbackResponse:
    """Labels by prediction id (the `id` of each row of a /api/predict answer), in any order,
    late or twice (the last label wins, counted once). Each item is answered in `results`;
    an unknown, expired, mistyped or wrongly classed item is reported there, never a 4xx."""
    result = services().monitor.record_feedback(body.labels)
    for status, count in Counter(item["status"] for item in result["results"]).items():
        FEEDBACK_LABELS.labels(status).inc(count)
    g.audit_details = {key: result[key] for key in ("recorded", "relabelled", "rejected")}
    return FeedbackResponse.model_validate(result)


@bp.get("/api/monitoring/quality")
@require_permission("read")
@operation("Model quality from labelled predictions", query=QualityQuery, response=Quality,
           errors={404: "The version asked for is not registered"})
def quality(query: QualityQuery) -> Quality:
    """Per version, over a window: labelled count and coverage, accuracy, per-class precision,
    recall, F1 and support, macro-F1, confusion matrix, log loss, Brier score, calibration (ECE
    over 10 bins) and accuracy over time, beside the version's validation accuracy."""
    return Quality.model_validate(services().monitor.quality(query.version, query.window))
