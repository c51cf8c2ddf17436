"""Predictions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Blueprint, jsonify

from routes.common import ApiError, error_code, json_body, services
from utils.security import require_permission
from utils.serving import parse_inputs

bp = Blueprint("predict", __name__)


@bp.post("/api/predict")
@require_permission("read")
def predict() -> Any:
    """`{"inputs": [[...], ...]}` -> class, probabilities and confidence per row; every row
    (or the failed request) is recorded for monitoring off the request path."""
    svc = services()
    if not svc.modes.serves_predictions():
        raise ApiError(503, "maintenance", "predictions are paused: the service is in maintenance mode",
                       {"Retry-After": str(svc.settings.maintenance_retry_after)})
    started = time.perf_counter()
    served = svc.model_server.current
    try:
        served = svc.model_server.require_current()
        body = json_body()
        inputs = parse_inputs(body, served.input_dim, svc.settings.max_batch_size)
        results = served.predict(inputs)
    except Exception as exc:
        svc.monitor.record_failure(error_code(exc), time.perf_counter() - started, served.version if served else None)
        raise
    svc.monitor.record_batch(body["inputs"], results, time.perf_counter() - started, served.version)
    return jsonify({"predictions": results, "model_version": served.version, "request_id": uuid.uuid4().hex})
