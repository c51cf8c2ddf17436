"""The deployment's mode over HTTP."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify

from routes.common import ApiError, actor, json_body, services
from utils.model_modes import ModelMode
from utils.security import require_permission

bp = Blueprint("modes", __name__)
MAX_REASON = 500


@bp.get("/api/mode")
def get_mode() -> Any:
    modes = services().modes
    return jsonify({**modes.state(), "serves_predictions": modes.serves_predictions(), "allows_training": modes.allows_training()})


@bp.post("/api/mode/<mode>")
@require_permission("admin")
def set_mode(mode: str) -> Any:
    """Switch mode, with an optional reason. Returning to INFERENCE while a training job runs
    is refused (409) unless the body says "force": true, which cancels the job first."""
    try:
        target = ModelMode.parse(mode)
    except ValueError as exc:
        raise ApiError(400, "invalid_mode", str(exc)) from None
    body = json_body(required=False)
    unknown = set(body) - {"reason", "force"}
    reason, force = body.get("reason", ""), body.get("force", False)
    if unknown or not isinstance(reason, str) or len(reason) > MAX_REASON or not isinstance(force, bool):
        raise ApiError(400, "invalid_body", f"the body takes 'reason' (a string of at most {MAX_REASON}) and 'force' (a boolean)")
    svc = services()
    cancelled: list[str] = []
    if target is ModelMode.INFERENCE and svc.jobs.active():
        if not force:
            raise ApiError(409, "training_in_progress",
                           "a training job is running; cancel it first or send {\"force\": true} to cancel it and switch")
        cancelled = svc.jobs.cancel_all()
    state = svc.modes.set_mode(target, reason, changed_by=actor())
    g.audit_details = {"reason": reason, "from": state["previous_mode"], "to": target.value, "cancelled_jobs": cancelled}
    svc.alerts.notify("mode", f"mode {state['previous_mode']} -> {target.value} by {actor()}: {reason or 'no reason given'}",
                      {"from": state["previous_mode"], "to": target.value, "reason": reason})
    return jsonify({**state, "cancelled_jobs": cancelled})
