"""Predictions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, g

from routes.common import error_code, services
from routes.operations import operation
from utils.errors import Maintenance
from utils.schemas import PredictRequest, PredictResponse
from utils.security import require_permission
from utils.serving import rows_to_tensor

bp = Blueprint("predict", __name__)
F = TypeVar("F", bound=Callable[..., Any])


def _monitored(view: F) -> F:
    """Refuse in maintenance mode; otherwise time the request and record it for monitoring if
    it fails (also when its body is invalid), off the request path."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        svc = services()
        if not svc.modes.serves_predictions():
            raise Maintenance("predictions are paused: the service is in maintenance mode",
                              svc.settings.maintenance_retry_after)
        g.prediction_started = time.perf_counter()
        served = svc.model_server.current
        try:
            return view(*args, **kwargs)
        except Exception as exc:
            svc.monitor.record_failure(error_code(exc), time.perf_counter() - g.prediction_started,
                                       served.version if served else None)
            raise

    return wrapper  # type: ignore[return-value]


@bp.post("/api/predict")
@require_permission("read")
@_monitored
@operation("Classify a batch of rows", body=PredictRequest, response=PredictResponse,
           errors={400: "Invalid input: a row of the wrong width, a value that is not a finite float32 number, "
                        "unknown fields, or more rows than QUADRA_MAX_BATCH_SIZE",
                   503: "Maintenance mode, or the serving model is not loaded yet (with Retry-After)"})
def predict(body: PredictRequest) -> PredictResponse:
    """`{"inputs": [[...], ...]}` -> class, probabilities and confidence per row; every row
    (or the failed request) is recorded for monitoring off the request path."""
    svc = services()
    served = svc.model_server.require_current()
    inputs = rows_to_tensor(body.inputs, served.input_dim, svc.settings.max_batch_size)  # values checked by the schema
    results = served.predict(inputs)
    svc.monitor.record_batch(body.inputs, results, time.perf_counter() - g.prediction_started, served.version)
    return PredictResponse.model_validate({"predictions": results, "model_version": served.version,
                                           "request_id": uuid.uuid4().hex})
