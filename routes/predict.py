"""Predictions."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, g, request

from routes.common import error_code, services
from routes.operations import operation
from utils.errors import Maintenance
from utils.request_ids import new_request_id, prediction_id
from utils.schemas import PredictHeaders, PredictRequest, PredictResponse, validate
from utils.security import require_permission
from utils.serving import rows_to_tensor

bp = Blueprint("predict", __name__)
F = TypeVar("F", bound=Callable[..., Any])
REQUEST_ID_HEADER = "X-Request-ID"


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
            g.request_id = _request_id()
            served = g.served = svc.model_server.route(g.request_id)
            return view(*args, **kwargs)
        except Exception as exc:
            svc.monitor.record_failure(error_code(exc), time.perf_counter() - g.prediction_started,
                                       served.version if served else None)
            raise

    return wrapper  # type: ignore[return-value]


def _request_id() -> str:
    """The caller's X-Request-ID (so a retried request keeps its id, and its canary arm), else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None:  # the model's default, without the cost of validating nothing
        return new_request_id()
    return validate(PredictHeaders, {REQUEST_ID_HEADER: given}).request_id


@bp.post("/api/predict")
@require_permission("read")
@_monitored
@operation("Classify a batch of rows", body=PredictRequest, headers=PredictHeaders, response=PredictResponse,
           errors={400: "Invalid input: a row of the wrong width, a value that is not a finite float32 number, "
                        "unknown fields, or more rows than QUADRA_MAX_BATCH_SIZE",
                   503: "Maintenance mode, or the serving model is not loaded yet (with Retry-After)"})
def predict(body: PredictRequest) -> PredictResponse:
    """`{"inputs": [[...], ...]}` -> id, class, probabilities and confidence per row; every row
    (or the failed request) is recorded for monitoring and written to the store in the
    background (while its worker has more than 2,000 records waiting, a request first writes
    them about 500 at a time, or waits for the groups of a write in progress), and each row's
    id takes its true class later (POST /api/feedback)."""
    svc = services()
    served = g.served or svc.model_server.require_current()
    inputs = rows_to_tensor(body.inputs, served.input_dim, svc.settings.max_batch_size)  # values checked by the schema
    forward_started = time.perf_counter()
    results = svc.batcher.predict(served, inputs)
    request_id = g.request_id  # once: each read of `g` goes through a context-local proxy
    for row, result in enumerate(results):
        result["id"] = prediction_id(request_id, row)
    finished = time.perf_counter()
    svc.monitor.record_batch(body.inputs, results, finished - g.prediction_started, served.version)
    shadow = svc.model_server.shadow_for(request_id)
    if shadow is not None:
        svc.shadows.submit(shadow, inputs, results, (finished - forward_started) * 1000.0)
    return PredictResponse.model_validate({"predictions": results, "model_version": served.version,
                                           "request_id": request_id})
