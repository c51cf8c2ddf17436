"""The one error hierarchy: every error a client (HTTP or the `flask` CLI) is told about.

Each class carries its HTTP status and the stable machine-readable `code` of the JSON error
body `{"error": {"code", "message"}}`; one Flask handler (`routes.common`) answers them all and
the CLI prints their message and exits 1. Domain errors also subclass the built-in exception a
Python API caller would catch (`LookupError` for what is not found, `ValueError` for bad
input, ...), so `except LookupError` keeps working around the library.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import ClassVar


class QuadraError(Exception):
    """An error with an HTTP status, a stable `code` and a message safe to show a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(QuadraError, ValueError):
    """The request's body or parameters are not acceptable."""

    status = 400
    code = "invalid_body"


class InvalidJson(InvalidRequest):
    """The body is not valid JSON."""

    code = "invalid_json"


class InvalidInput(InvalidRequest):
    """A prediction request's inputs are malformed."""

    code = "invalid_input"


class InvalidVersion(InvalidRequest):
    """The version string is not semantic (1.2.0, 2.1.3-beta) or a timestamp version."""

    code = "invalid_version"


class InvalidParameter(InvalidRequest):
    """A query or path parameter is not acceptable."""

    code = "invalid_parameter"


class InvalidMode(InvalidParameter):
    """Not one of the modes."""

    code = "invalid_mode"


class InvalidTrainingData(InvalidRequest):
    """Posted training data is out of the accepted bounds."""

    code = "invalid_data"


class Unauthorized(QuadraError):
    """No valid credentials were presented."""

    status = 401
    code = "unauthorized"


class Forbidden(QuadraError, PermissionError):
    """The credentials are valid but do not hold the permission needed."""

    status = 403
    code = "forbidden"


class NotFound(QuadraError, LookupError):
    """The thing asked for does not exist."""

    status = 404
    code = "not_found"


class VersionNotFound(NotFound):
    """No such version in the registry."""

    code = "version_not_found"


class KeyNotFound(NotFound):
    """No API key with this id."""

    code = "key_not_found"


class JobNotFound(NotFound):
    """No training job with this id."""

    code = "job_not_found"


class Conflict(QuadraError):
    """The request conflicts with the current state."""

    status = 409
    code = "conflict"


class VersionConflict(Conflict, RuntimeError):
    """The request conflicts with the registry's state (exists, in use, nothing to roll back to)."""


class InactiveKey(Conflict, ValueError):
    """The key is revoked or expired, so it cannot be rotated."""


class WrongMode(Conflict, RuntimeError):
    """The current mode refuses the operation."""

    code = "wrong_mode"


class TrainingInProgress(Conflict, RuntimeError):
    """A training job's state refuses the operation (e.g. inference mode while one runs)."""

    code = "training_in_progress"


class TrainingCapacityReached(TrainingInProgress):
    """The configured number of jobs is already queued or running."""


class RolloutConflict(Conflict, RuntimeError):
    """A rollout's state refuses the operation (one is already active, none is, or the
    deployment cannot start one)."""

    code = "rollout_conflict"


class InsufficientData(Conflict, RuntimeError):
    """Not enough recorded predictions for what was asked (a baseline, a drift check)."""

    code = "insufficient_data"


class UnsupportedMediaType(QuadraError):
    """The body is not sent as the content type the operation reads."""

    status = 415
    code = "unsupported_media_type"


class IntegrityCheckFailed(QuadraError, ValueError):
    """An artifact's SHA-256 does not match the one recorded when it was saved, or the artifact
    is not a regular file inside its folder."""

    status = 422
    code = "integrity_check_failed"


class InvalidArtifact(QuadraError, ValueError):
    """An uploaded model artifact or its config cannot become a version: not safetensors, a
    config naming no registered architecture, weights that do not fit it, non-finite outputs."""

    status = 422
    code = "invalid_artifact"


class ArtifactTooLarge(QuadraError, ValueError):
    """An uploaded artifact is larger than QUADRA_MAX_ARTIFACT_BYTES."""

    status = 413
    code = "artifact_too_large"


class TooManyLabels(QuadraError, ValueError):
    """A feedback request with more items than QUADRA_FEEDBACK_MAX_LABELS."""

    status = 413
    code = "too_many_labels"


class TooManyRequests(QuadraError):
    """A request or authentication-failure budget is spent until `reset_at` (epoch seconds).

    `Retry-After` is rounded up, so a client that waits as told is not refused again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, reset_at: float) -> None:
        super().__init__(message, {"Retry-After": str(seconds_until(reset_at))})
        self.reset_at = reset_at


class ServiceUnavailable(QuadraError, RuntimeError):
    """Something the request needs is not ready or not reachable: answered 503 with Retry-After."""

    status = 503
    code = "service_unavailable"
    retry_after: ClassVar[str] = "5"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, {"Retry-After": str(retry_after) if retry_after is not None else self.retry_after})


class Maintenance(ServiceUnavailable):
    """Predictions are paused while the service is in maintenance mode."""

    code = "maintenance"


class ModelNotReady(ServiceUnavailable):
    """This process has no serving model loaded yet."""

    code = "model_not_ready"
    retry_after = "2"


class ArtifactStoreUnavailable(ServiceUnavailable):
    """The artifact store cannot be reached; metadata is untouched and serving goes on."""

    code = "artifact_store_unavailable"


def seconds_until(reset_at: float) -> int:
    """Whole seconds until `reset_at`, rounded up and at least 1 (never 0 while still refused)."""
    return max(1, math.ceil(reset_at - time.time()))
