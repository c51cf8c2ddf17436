"""Training jobs over HTTP: start (TRAINING or MAINTENANCE mode), follow, cancel."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from routes.common import ApiError, actor, json_body, services
from utils.security import require_permission
from utils.serving import is_float32
from utils.training import Hyperparameters, TrainingCapacityReached

bp = Blueprint("training", __name__)

LIMITS = {
    "epochs": (int, 1, 10_000),
    "learning_rate": (float, 1e-7, 10.0),
    "batch_size": (int, 1, 100_000),
    "seed": (int, 0, 2**31 - 1),
}
MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH, MAX_FEATURES, MAX_CLASSES = 8, 4096, 1000, 1000


def _hyperparameters(body: dict[str, Any]) -> Hyperparameters:
    values: dict[str, Any] = {}
    for name, (kind, low, high) in LIMITS.items():
        if name not in body:
            continue
        value = body[name]
        valid_type = type(value) is int or (kind is float and type(value) is float)
        if not valid_type or not low <= value <= high:
            raise ApiError(400, "invalid_body", f"'{name}' must be a{'n integer' if kind is int else ' number'} from {low:g} to {high:g}")
        values[name] = value
    if "hidden_dims" in body:
        dims = body["hidden_dims"]
        if (not isinstance(dims, list) or not 1 <= len(dims) <= MAX_HIDDEN_LAYERS
                or not all(type(d) is int and 1 <= d <= MAX_HIDDEN_WIDTH for d in dims)):
            raise ApiError(400, "invalid_body", f"'hidden_dims' must be 1-{MAX_HIDDEN_LAYERS} integers from 1 to {MAX_HIDDEN_WIDTH}")
        values["hidden_dims"] = tuple(dims)
    return Hyperparameters(**values)


def _training_data(data: Any, max_rows: int) -> dict[str, Any]:
    """Validate posted training data: features (rows of finite numbers), labels, optional names."""
    if not isinstance(data, dict) or set(data) - {"features", "labels", "feature_names"}:
        raise ApiError(400, "invalid_data", "'data' must be an object with 'features', 'labels' and optional 'feature_names'")
    features, labels = data.get("features"), data.get("labels")
    if not isinstance(features, list) or not isinstance(labels, list) or not 10 <= len(features) <= max_rows:
        raise ApiError(400, "invalid_data", f"'features' and 'labels' must be lists of 10 to {max_rows} rows")
    if len(labels) != len(features):
        raise ApiError(400, "invalid_data", "'labels' must have one entry per row of 'features'")
    width = len(features[0]) if isinstance(features[0], list) else 0
    if not 1 <= width <= MAX_FEATURES or not all(isinstance(r, list) and len(r) == width and all(is_float32(v) for v in r) for r in features):
        raise ApiError(400, "invalid_data", f"every row of 'features' must hold the same number (1-{MAX_FEATURES}) of finite numbers")
    if not all((isinstance(label, str) and 0 < len(label) <= 100) or type(label) is int for label in labels):
        raise ApiError(400, "invalid_data", "'labels' must be strings (1-100 characters) or integers")
    if not 2 <= len({str(label) for label in labels}) <= MAX_CLASSES:
        raise ApiError(400, "invalid_data", f"'labels' must hold 2 to {MAX_CLASSES} classes")
    names = data.get("feature_names")
    if names is not None and (not isinstance(names, list) or len(names) != width
                              or not all(isinstance(n, str) and 0 < len(n) <= 100 for n in names)):
        raise ApiError(400, "invalid_data", "'feature_names' must name every feature column (strings of 1-100 characters)")
    return {"features": features, "labels": labels, "feature_names": names}


@bp.post("/api/train")
@require_permission("write")
def start_training() -> Any:
    """Start a job on the bundled dataset, or on posted `data`; it saves a new version when done."""
    svc = services()
    if not svc.modes.allows_training():
        raise ApiError(409, "wrong_mode", f"training is refused in {svc.modes.mode.value} mode; switch to training or maintenance mode first")
    body = json_body(required=False)
    unknown = set(body) - set(LIMITS) - {"hidden_dims", "data"}
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
    params = _hyperparameters(body)
    data = _training_data(body["data"], svc.settings.training_max_rows) if "data" in body else None
    try:
        job = svc.jobs.start(params, data, created_by=actor())
    except TrainingCapacityReached as exc:
        raise ApiError(409, "training_in_progress", str(exc)) from None
    return jsonify(job), 202


@bp.get("/api/train")
@require_permission("read")
def list_jobs() -> Any:
    limit = request.args.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 200:
        raise ApiError(400, "invalid_parameter", "limit must be an integer from 1 to 200")
    return jsonify({"jobs": services().jobs.list(int(limit))})


@bp.get("/api/train/<job_id>")
@require_permission("read")
def get_job(job_id: str) -> Any:
    svc = services()
    svc.jobs.reap()
    try:
        return jsonify(svc.jobs.get(job_id))
    except LookupError as exc:
        raise ApiError(404, "job_not_found", str(exc)) from None


@bp.post("/api/train/<job_id>/cancel")
@require_permission("write")
def cancel_job(job_id: str) -> Any:
    try:
        return jsonify(services().jobs.cancel(job_id))
    except LookupError as exc:
        raise ApiError(404, "job_not_found", str(exc)) from None
