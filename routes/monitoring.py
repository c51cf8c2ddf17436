"""Monitoring over HTTP: statistics, drift, baseline and alerts."""

from __future__ import annotations

from flask import Blueprint

from routes.common import actor, services
from routes.operations import operation
from utils.schemas import Alerts, AlertsQuery, Baseline, BaselineRemoved, Drift, Statistics
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
