"""Training jobs over HTTP: start (TRAINING or MAINTENANCE mode), follow, cancel."""

from __future__ import annotations

from flask import Blueprint

from routes.common import actor, services
from routes.operations import operation
from utils.errors import InvalidTrainingData, WrongMode
from utils.openapi import Link
from utils.schemas import JobPath, JobsQuery, TrainingJob, TrainingJobs, TrainRequest
from utils.security import require_permission

bp = Blueprint("training", __name__)
JOB_NOT_FOUND = {404: "No such job"}
JOB_ID = {"job_id": "$response.body#/id"}


@bp.post("/api/train")
@require_permission("write")
@operation("Start a training job", body=TrainRequest, response=TrainingJob, status=202,
           errors={409: "Inference mode, or QUADRA_MAX_TRAINING_JOBS jobs are running already"},
           links={"GetJob": Link("training.get_job", JOB_ID), "CancelJob": Link("training.cancel_job", JOB_ID)})
def start_training(body: TrainRequest) -> TrainingJob:
    """Start a job on the bundled dataset, or on posted `data`; it saves a new version when done."""
    svc = services()
    if not svc.modes.allows_training():
        raise WrongMode(f"training is refused in {svc.modes.mode.value} mode; switch to training or maintenance mode first")
    data = body.data.model_dump() if body.data else None
    if data and len(data["features"]) > svc.settings.training_max_rows:
        raise InvalidTrainingData(f"'features' may hold at most {svc.settings.training_max_rows} rows")
    job = svc.jobs.start(body.hyperparameters(), data, created_by=actor())
    return TrainingJob.model_validate(job)


@bp.get("/api/train")
@require_permission("read")
@operation("List training jobs", query=JobsQuery, response=TrainingJobs)
def list_jobs(query: JobsQuery) -> TrainingJobs:
    """The most recent jobs first, with their progress."""
    return TrainingJobs.model_validate({"jobs": services().jobs.list(query.limit)})


@bp.get("/api/train/<job_id>")
@require_permission("read")
@operation("One training job", path=JobPath, response=TrainingJob, errors=JOB_NOT_FOUND)
def get_job(job_id: str) -> TrainingJob:
    """Status, epoch, loss and accuracy per epoch, and the version it saved."""
    svc = services()
    svc.jobs.reap()
    return TrainingJob.model_validate(svc.jobs.get(job_id))


@bp.post("/api/train/<job_id>/cancel")
@require_permission("write")
@operation("Cancel a training job", path=JobPath, response=TrainingJob, errors=JOB_NOT_FOUND)
def cancel_job(job_id: str) -> TrainingJob:
    """The job stops at its next epoch; a finished job is returned unchanged."""
    return TrainingJob.model_validate(services().jobs.cancel(job_id))
