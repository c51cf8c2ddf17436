"""Monitoring over HTTP: statistics, drift, baseline and alerts."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from routes.common import ApiError, actor, json_body, services
from utils.model_monitoring import InsufficientData
from utils.security import require_permission

bp = Blueprint("monitoring", __name__)


@bp.get("/api/monitoring/stats")
def statistics() -> Any:
    return jsonify(services().monitor.get_statistics())


@bp.get("/api/monitoring/drift")
def drift() -> Any:
    return jsonify(services().monitor.detect_drift())


@bp.post("/api/monitoring/baseline")
@require_permission("admin")
def set_baseline() -> Any:
    """Make the current monitoring window the drift reference (409 without enough data)."""
    body = json_body(required=False)
    if body:
        raise ApiError(400, "invalid_body", "this endpoint takes no body")
    svc = services()
    served = svc.model_server.current
    names = served.config.get("feature_names") if served else None
    try:
        baseline = svc.monitor.set_baseline(names, created_by=actor())
    except InsufficientData as exc:
        raise ApiError(409, "insufficient_data", str(exc)) from None
    return jsonify(baseline), 201


@bp.delete("/api/monitoring/baseline")
@require_permission("admin")
def reset_baseline() -> Any:
    return jsonify({"removed": services().monitor.reset_baseline()})


@bp.get("/api/monitoring/alerts")
def alerts() -> Any:
    limit = request.args.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(400, "invalid_parameter", "limit must be an integer from 1 to 500")
    return jsonify({"alerts": services().alerts.recent(int(limit))})
