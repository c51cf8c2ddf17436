"""Predictions."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify

from routes.common import json_body, services
from utils.security import require_permission
from utils.serving import parse_inputs

bp = Blueprint("predict", __name__)


@bp.post("/api/predict")
@require_permission("read")
def predict() -> Any:
    """`{"inputs": [[...], ...]}` -> class, probabilities and confidence per row."""
    svc = services()
    served = svc.model_server.require_current()
    inputs = parse_inputs(json_body(), served.input_dim, svc.settings.max_batch_size)
    return jsonify(
        {
            "predictions": served.predict(inputs),
            "model_version": served.version,
            "request_id": uuid.uuid4().hex,
        }
    )
