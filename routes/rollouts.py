"""Canary rollouts over HTTP: start one, watch both arms, promote or abort by hand."""

from __future__ import annotations

from flask import Blueprint

from routes.common import actor, services
from routes.operations import operation
from utils.rollout import rollout_view
from utils.schemas import CanaryRequest, Rollout, RolloutDecisionRequest, RolloutStatus, VersionPath
from utils.security import require_permission

bp = Blueprint("rollouts", __name__)
NO_CANARY = {409: "No rollout is active"}


@bp.get("/api/model/canary")
@require_permission("read")
@operation("The canary: both arms side by side", response=RolloutStatus)
def canary_status() -> RolloutStatus:
    """The active canary with live numbers per arm and each criterion's check, else the last
    one with its final numbers and outcome; `rollout` is null if there never was one."""
    rollouts = services().rollouts
    current = rollouts.current()
    if current is None:
        return RolloutStatus(rollout=None)
    row, comparison = current
    return RolloutStatus.model_validate({"rollout": rollout_view(row, comparison, rollouts.paused)})


@bp.post("/api/model/canary/promote")
@require_permission("admin")
@operation("Promote the canary's candidate now", body=RolloutDecisionRequest, response=Rollout,
           errors={**NO_CANARY, 422: "The candidate's SHA-256 no longer matches: it is not promoted",
                   503: "The artifact store is unreachable (with Retry-After)"})
def promote_canary(body: RolloutDecisionRequest) -> Rollout:
    """Through the normal promote path (verified, in the history and the audit log)."""
    rollouts = services().rollouts
    return Rollout.model_validate(rollout_view(row := rollouts.promote(actor(), body.reason), row.comparison, rollouts.paused))


@bp.post("/api/model/canary/abort")
@require_permission("admin")
@operation("Abort the canary", body=RolloutDecisionRequest, response=Rollout, errors=NO_CANARY)
def abort_canary(body: RolloutDecisionRequest) -> Rollout:
    """Production serves every request again within a poll of each worker."""
    rollouts = services().rollouts
    return Rollout.model_validate(rollout_view(row := rollouts.abort(actor(), body.reason), row.comparison, rollouts.paused))


@bp.post("/api/model/canary/<path:version>")
@require_permission("admin")
@operation("Start a canary", path=VersionPath, body=CanaryRequest, response=Rollout, status=201,
           errors={404: "No such version",
                   409: "A rollout is already active, the version is production, a loaded version is not production, "
                        "or the candidate takes other inputs or names other classes than production",
                   422: "The candidate's SHA-256 does not match the recorded one, or it cannot be built and loaded here",
                   503: "The artifact store is unreachable (with Retry-After)"})
def start_canary(version: str, body: CanaryRequest) -> Rollout:
    """Verify, load and warm the candidate, then send `percent` of prediction requests to it on
    every worker and host. After `min_predictions` on the candidate the service decides by
    itself (`on_success`, `on_failure`); a criterion breached by more than twice its limit
    aborts sooner. Predicting in maintenance mode is refused, so a canary pauses there."""
    svc = services()
    row = svc.rollouts.start(version, body, actor())
    return Rollout.model_validate(rollout_view(row, None, svc.rollouts.paused))
