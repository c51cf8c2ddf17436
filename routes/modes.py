"""The deployment's mode over HTTP."""

from __future__ import annotations

from flask import Blueprint, g

from routes.common import actor, services
from routes.operations import operation
from utils.errors import TrainingInProgress
from utils.model_modes import ModelMode
from utils.schemas import ModeChange, ModeChangeRequest, ModePath, ModeState
from utils.security import require_permission

bp = Blueprint("modes", __name__)


@bp.get("/api/mode")
@operation("The current mode", response=ModeState)
def get_mode() -> ModeState:
    """INFERENCE serves predictions; TRAINING serves them and allows training; MAINTENANCE refuses them."""
    modes = services().modes
    return ModeState.model_validate({**modes.state(), "serves_predictions": modes.serves_predictions(),
                                     "allows_training": modes.allows_training()})


@bp.post("/api/mode/<mode>")
@require_permission("admin")
@operation("Switch the mode", path=ModePath, body=ModeChangeRequest, response=ModeChange,
           errors={400: "Invalid request: an unknown mode, or a body that does not match its schema",
                   409: "A training job is running (returning to inference without force)"})
def set_mode(mode: ModelMode, body: ModeChangeRequest) -> ModeChange:
    """Switch mode, with an optional reason. Returning to INFERENCE while a training job runs
    is refused (409) unless the body says "force": true, which cancels the job first."""
    reason = body.reason
    svc = services()
    cancelled: list[str] = []
    if mode is ModelMode.INFERENCE and svc.jobs.active():
        if not body.force:
            raise TrainingInProgress("a training job is running; cancel it first or send {\"force\": true} to cancel it and switch")
        cancelled = svc.jobs.cancel_all()
    state = svc.modes.set_mode(mode, reason, changed_by=actor())
    changed = state["previous_mode"] != mode.value
    g.audit_details = {"reason": reason, "from": state["previous_mode"], "to": mode.value, "cancelled_jobs": cancelled}
    if changed:
        svc.alerts.notify("mode", f"mode {state['previous_mode']} -> {mode.value} by {actor()}: {reason or 'no reason given'}",
                          {"from": state["previous_mode"], "to": mode.value, "reason": reason})
    return ModeChange.model_validate({**state, "changed": changed, "cancelled_jobs": cancelled})
