"""Training jobs over HTTP: start (TRAINING or MAINTENANCE mode), follow, cancel."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from routes.common import ApiError, actor, services
from routes.operations import operation
from utils.schemas import JobPath, JobsQuery, TrainingJob, TrainingJobs, TrainRequest
from utils.security import require_permission
from utils.training import TrainingCapacityReached

bp = Blueprint("training", __name__)
JOB_NOT_FOUND = {404: "No such job"}


@bp.post("/api/train")
@require_permission("write")
@operation("Start a training job", body=TrainRequest, response=TrainingJob, status=202,
           errors={409: "Inference mode, or QUADRA_MAX_TRAINING_JOBS jobs are running already"})
def start_training(body: TrainRequest) -> Any:
    """Start a job on the bundled dataset, or on posted `data`; it saves a new version when done."""
    svc = services()
    if not svc.modes.allows_training():
        raise ApiError(409, "wrong_mode", f"training is refused in {svc.modes.mode.value} mode; switch to training or maintenance mode first")
    data = body.data.model_dump() if body.data else None
    if data and len(data["features"]) > svc.settings.training_max_rows:
        raise ApiError(400, "invalid_data", f"'features' may hold at most {svc.settings.training_max_rows} rows")
    try:
        job = svc.jobs.start(body.hyperparameters(), data, created_by=actor())
    except TrainingCapacityReached as exc:
        raise ApiError(409, "training_in_progress", str(exc)) from None
    return jsonify(job), 202


@bp.get("/api/train")
@require_permission("read")
@operation("List training jobs", query=JobsQuery, response=TrainingJobs)
def list_jobs(query: JobsQuery) -> Any:
    """The most recent jobs first, with their progress."""
    return jsonify({"jobs": services().jobs.list(query.limit)})


@bp.get("/api/train/<job_id>")
@require_permission("read")
@operation("One training job", path=JobPath, response=TrainingJob, errors=JOB_NOT_FOUND)
def get_job(job_id: str) -> Any:
    """Status, epoch, loss and accuracy per epoch, and the version it saved."""
    svc = services()
    svc.jobs.reap()
    try:
        return jsonify(svc.jobs.get(job_id))
    except LookupError as exc:
        raise ApiError(404, "job_not_found", str(exc)) from None


@bp.post("/api/train/<job_id>/cancel")
@require_permission("write")
@operation("Cancel a training job", path=JobPath, response=TrainingJob, errors=JOB_NOT_FOUND)
def cancel_job(job_id: str) -> Any:
    """The job stops at its next epoch; a finished job is returned unchanged."""
    try:
        return jsonify(services().jobs.cancel(job_id))
    except LookupError as exc:
        raise ApiError(404, "job_not_found", str(exc)) from None
