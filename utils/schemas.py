"""Request and response schemas of the HTTP API (pydantic v2).

One source of truth: the request models validate every request (unknown fields, wrong types,
missing fields and oversize arrays are refused before a handler runs) and, with the response
models, are the JSON Schemas (draft 2020-12) of the OpenAPI document at /api/openapi.json.

Request models say which error (of `utils.errors`) a failure raises: `error` for the model, and
`field_errors` for fields whose failures have an error of their own (a bad version is always
`InvalidVersion`). Checks that need runtime state (the row width of the loaded model, the
configured batch size) stay in the handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from utils.drift import ColumnDrift
from utils.errors import InvalidInput, InvalidMode, InvalidParameter, InvalidRequest, InvalidTrainingData, InvalidVersion
from utils.model_modes import ModelMode
from utils.model_versioning import MAX_VERSION_LENGTH, VERSION_PATTERN, validate_version
from utils.request_ids import new_request_id
from utils.security import RATE_LIMIT_PATTERN, validate_rate_limit
from utils.serving import FLOAT32_MAX
from utils.training import Hyperparameters

# Hard upper bounds; the deployment's own (lower) limits are checked by the handlers.
MAX_BATCH_ROWS = 100_000          # QUADRA_MAX_BATCH_SIZE's largest value
MAX_TRAINING_ROWS = 10_000_000    # QUADRA_TRAINING_MAX_ROWS's largest value
MAX_FEATURES = 1000
MAX_CLASSES = 1000
MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH = 8, 4096
MAX_TOKEN_SECONDS = 30 * 86400  # the widest QUADRA_JWT_MAX_TTL_SECONDS
MAX_GRACE_SECONDS = 30 * 86400
MAX_REASON = 500
MAX_PREDICTION_ID = 240
MAX_CLASS_NAME = 128


# -- shared types --------------------------------------------------------------------------

Float32 = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False,
                                 description="a finite number within float32 range")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Permission = Literal["read", "write", "admin"]
Version = Annotated[
    str,
    AfterValidator(validate_version),
    Field(description="semantic (1.2.0, 2.1.3-beta) or a timestamp (20241221-143022, train-20241221-143022)",
          examples=["1.2.0"], json_schema_extra={"minLength": 1, "maxLength": MAX_VERSION_LENGTH, "pattern": VERSION_PATTERN}),
]


def _whole_number(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer, so the strict models accept it as 2 (and still
    refuse 2.5, "2" and true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = BeforeValidator(_whole_number)  # after an int's Field(...), so its bounds stay in the schema
RateLimit = Annotated[ShortText, AfterValidator(validate_rate_limit), Field(json_schema_extra={"pattern": RATE_LIMIT_PATTERN})]
# Every time the API shows: ISO 8601 in UTC (utils.timestamps.iso_utc).
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"}, examples=["2026-11-30T15:50:00.123456Z"])]
# A single URL segment: the router never hands a handler one containing "/".
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^/]+$")]


class RequestBody(BaseModel):
    """A JSON request body: unknown fields are refused and nothing is coerced (no "5" for 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error: ClassVar[type[InvalidRequest]] = InvalidRequest
    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {}


class QueryParameters(BaseModel):
    """Query parameters: unknown ones are refused; values arrive as text and are parsed."""

    model_config = ConfigDict(extra="forbid")
    error: ClassVar[type[InvalidRequest]] = InvalidParameter
    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {}


class PathParameters(QueryParameters):
    """Path parameters (the URL's own segments)."""


class HeaderParameters(BaseModel):
    """Request headers an operation reads, by the names they are sent under (other headers
    are none of its business)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=False)
    error: ClassVar[type[InvalidRequest]] = InvalidRequest
    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {}


M = TypeVar("M", bound=BaseModel)
MAX_REPORTED_ERRORS = 3


def validate(model: type[M], data: Any) -> M:
    """`data` as a `model`, or the model's error naming (at most three of) the problems: what
    `routes.operations` does with every request, and the CLI with what it reads from files."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        first = problems[0]["loc"]
        error = model.field_errors.get(str(first[0]), model.error) if first else model.error  # type: ignore[attr-defined]
        raise error("; ".join(_describe(problem) for problem in problems[:MAX_REPORTED_ERRORS])) from None


def _describe(problem: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else problem["msg"]



# -- request bodies ------------------------------------------------------------------------


class PredictRequest(RequestBody):
    """Rows to classify, each with the serving model's `input_dim` numbers."""

    error: ClassVar[type[InvalidRequest]] = InvalidInput
    inputs: list[Annotated[list[Float32], Field(min_length=1, max_length=MAX_FEATURES)]] = Field(
        min_length=1, max_length=MAX_BATCH_ROWS,
        description="one row per sample; at most QUADRA_MAX_BATCH_SIZE rows (1024 by default)",
        examples=[[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]],
    )


class PredictHeaders(HeaderParameters):
    request_id: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,200}$")] = Field(
        default_factory=new_request_id, alias="X-Request-ID", examples=["order-4711-attempt-1"],
        description="the answer's request_id (1 to 200 printable ASCII characters, no spaces): a retried request "
                    "with the same id lands on the same arm of a canary; without it a new id is made")


class SaveRequest(RequestBody):
    """A snapshot of the serving model as a new version; every field is optional."""

    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {"version": InvalidVersion}
    version: Version | None = Field(None, description="omitted: a timestamp version")
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    tags: list[Tag] = Field([], max_length=32)
    metrics: dict[ShortText, Float32] | None = Field(
        None, max_length=64, description="omitted: the serving version's metrics", examples=[{"accuracy": 0.97}])


class ImportMetadata(RequestBody):
    """The `metadata` part of an import: the model's config and the new version's details."""

    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {"version": InvalidVersion}
    config: dict[str, JsonValue] = Field(
        description="the architecture and its sizes, as the registry keeps them",
        examples=[{"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [16]}])
    version: Version | None = Field(None, description="omitted: a timestamp version")
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    tags: list[Tag] = Field([], max_length=32)
    metrics: dict[ShortText, JsonValue] | None = Field(None, max_length=64, examples=[{"accuracy": 0.97}])
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = Field(
        None, description="the artifact's SHA-256 (hex): the import fails if it differs")


class RolloutCriteria(RequestBody):
    """Limits the candidate must stay within, each measured against the production arm over the
    same period; null switches a criterion off."""

    max_error_rate_increase: float | None = Field(
        0.01, ge=0, le=1, description="candidate error rate minus production's (0.01: one percentage point)")
    max_latency_p95_ratio: float | None = Field(
        1.5, gt=0, le=1000, description="candidate p95 latency divided by production's")
    max_confidence_drop: float | None = Field(
        0.05, ge=0, le=1, description="production's mean confidence minus the candidate's")
    max_prediction_distance: float | None = Field(
        0.1, ge=0, le=1, description="Jensen-Shannon distance between the two arms' predicted-class distributions")
    max_disagreement_rate: float | None = Field(
        None, ge=0, le=1, description="shadow mode only (0.05 there unless given): share of rows where the candidate's "
                                      "class differs from production's on the same input")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="canary mode only: production's accuracy minus the candidate's, on their "
                                      "predictions since the start that have a label (POST /api/feedback); the "
                                      "decision waits until each arm has 30 labelled predictions")


class CanaryRequest(RequestBody):
    """Send a share of prediction requests to a candidate version (canary), or run it beside
    production on a sample of them (shadow), and decide by its numbers."""

    mode: Literal["canary", "shadow"] = Field(
        "canary", description="canary: the candidate answers its share; shadow: production answers every request and "
                              "the candidate also runs a sampled copy, off the request path")
    percent: float = Field(10.0, ge=1, le=100, description="the candidate's share of prediction requests: at most 50 "
                                                           "for a canary, up to 100 for a shadow")
    min_predictions: Annotated[int, Field(ge=100, le=1_000_000), WholeNumber] = Field(
        1000, description="predictions on the candidate before the service decides by itself")
    criteria: RolloutCriteria = Field(default_factory=lambda: RolloutCriteria.model_validate({}))
    on_success: Literal["promote", "hold"] = Field("promote", description="hold: wait for an operator's promote or abort")
    on_failure: Literal["abort", "hold"] = Field("abort", description="hold: keep the canary for an operator to decide")

    @model_validator(mode="after")
    def _fits_the_mode(self) -> CanaryRequest:
        if self.mode == "canary" and self.percent > 50:
            raise ValueError("percent: a canary answers at most 50% of requests (a shadow may take up to 100)")
        if self.mode == "canary" and self.criteria.max_disagreement_rate is not None:
            raise ValueError("criteria.max_disagreement_rate needs shadow mode (it compares both on the same input)")
        if self.mode == "shadow" and self.criteria.max_accuracy_drop is not None:
            raise ValueError("criteria.max_accuracy_drop needs canary mode (a shadow's answers reach no client, so they "
                             "take no labels)")
        if self.mode == "shadow" and "max_disagreement_rate" not in self.criteria.model_fields_set:
            self.criteria.max_disagreement_rate = 0.05
        return self


class RolloutDecisionRequest(RequestBody):
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON)] = ""


class ModeChangeRequest(RequestBody):
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON)] = ""
    force: bool = Field(False, description="switching to inference: cancel running training jobs first")


class TokenRequest(RequestBody):
    permissions: list[Permission] | None = Field(
        None, min_length=1, max_length=3, description="omitted: all of the key's permissions")
    expires_in: Annotated[int, Field(ge=1, le=MAX_TOKEN_SECONDS), WholeNumber] | None = Field(
        None, description="seconds, at most QUADRA_JWT_MAX_TTL_SECONDS; omitted: QUADRA_JWT_TTL_SECONDS")


class KeyRequest(RequestBody):
    name: ShortText = Field(pattern=r"\S", description="who or what holds the key; leading and trailing spaces are dropped")
    permissions: list[Permission] = Field(["read"], min_length=1, max_length=3)
    expires_days: Annotated[float, Field(gt=0, le=3650)] | None = Field(
        None, description="omitted: QUADRA_KEY_EXPIRY_DAYS")
    rate_limit: RateLimit | None = Field(
        None, description="the key's own limit, e.g. '1000 per minute'; omitted: the service-wide limit")


class RotateRequest(RequestBody):
    grace_seconds: Annotated[float, Field(ge=0, le=MAX_GRACE_SECONDS)] = Field(
        24 * 3600, description="how long the old key keeps working")


class TrainingData(RequestBody):
    """Your own training data: rows of features and one label per row."""

    features: list[Annotated[list[Float32], Field(min_length=1, max_length=MAX_FEATURES)]] = Field(
        min_length=10, max_length=MAX_TRAINING_ROWS, description="at most QUADRA_TRAINING_MAX_ROWS rows")
    labels: list[Annotated[str, StringConstraints(min_length=1, max_length=100)] | int] = Field(
        min_length=10, max_length=MAX_TRAINING_ROWS)
    feature_names: list[ShortText] | None = Field(None, max_length=MAX_FEATURES)

    @model_validator(mode="after")
    def _consistent(self) -> TrainingData:
        width = len(self.features[0])
        if any(len(row) != width for row in self.features):
            raise ValueError("every row of 'features' must hold the same number of values")
        if len(self.labels) != len(self.features):
            raise ValueError("'labels' must have one entry per row of 'features'")
        if not 2 <= len({str(label) for label in self.labels}) <= MAX_CLASSES:
            raise ValueError(f"'labels' must hold 2 to {MAX_CLASSES} classes")
        if self.feature_names is not None and len(self.feature_names) != width:
            raise ValueError("'feature_names' must name every feature column")
        return self


class TrainRequest(RequestBody):
    """Hyperparameters (all optional) and, optionally, your own data (default: the bundled Iris set)."""

    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {"data": InvalidTrainingData}
    epochs: Annotated[int, Field(ge=1, le=10_000), WholeNumber] = Hyperparameters.epochs
    learning_rate: Annotated[float, Field(ge=1e-7, le=10.0)] = Hyperparameters.learning_rate
    batch_size: Annotated[int, Field(ge=1, le=100_000), WholeNumber] = Hyperparameters.batch_size
    seed: Annotated[int, Field(ge=0, le=2**31 - 1), WholeNumber] = Hyperparameters.seed
    hidden_dims: list[Annotated[int, Field(ge=1, le=MAX_HIDDEN_WIDTH), WholeNumber]] = Field(
        list(Hyperparameters.hidden_dims), min_length=1, max_length=MAX_HIDDEN_LAYERS)
    data: TrainingData | None = None

    def hyperparameters(self) -> Hyperparameters:
        return Hyperparameters(epochs=self.epochs, learning_rate=self.learning_rate, batch_size=self.batch_size,
                               seed=self.seed, hidden_dims=tuple(self.hidden_dims))


# -- query and path parameters -------------------------------------------------------------


class VersionsQuery(QueryParameters):
    tag: list[Tag] = Field([], description="repeatable: a version must carry every tag given")


class VersionQuery(QueryParameters):
    verify: bool = Field(False, description="recompute the artifact's SHA-256")


class CompareQuery(QueryParameters):
    a: Version
    b: Version


class HistoryQuery(QueryParameters):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class AuditQuery(QueryParameters):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    action: ShortText | None = Field(None, description="only this action, e.g. registry.promote_version")
    actor: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="only this actor, e.g. 'ops (key_3cc8…)'")


class FeedbackRequest(RequestBody):
    """True classes for predictions the service made. Each item is checked on its own and
    answered in `results`: a bad item never rejects the others."""

    labels: list[JsonValue] = Field(
        min_length=1,
        description="items {\"id\": <a prediction's id>, \"label\": <a class name or index of its version>}; "
                    "at most QUADRA_FEEDBACK_MAX_LABELS (10000 by default) per request",
        examples=[[{"id": "0190a5e4c3d27c1a9b5e6f708192a3b4:0", "label": "setosa"},
                   {"id": "0190a5e4c3d27c1a9b5e6f708192a3b4:1", "label": 2}]])


class FeedbackItem(RequestBody):
    """One item of a FeedbackRequest."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PREDICTION_ID)]
    label: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASS_NAME)] | Annotated[int, Field(ge=0)]


QualityWindow = Literal["hour", "day", "monitoring", "horizon"]


class QualityQuery(QueryParameters):
    field_errors: ClassVar[dict[str, type[InvalidRequest]]] = {"version": InvalidVersion}
    version: Version | None = Field(None, description="omitted: every version with predictions in the window")
    window: QualityWindow = Field(
        "day", description="the predictions made in the last hour or day, since the oldest record of the monitoring "
                           "window, or within the label horizon (QUADRA_FEEDBACK_HORIZON_DAYS)")


class AlertsQuery(QueryParameters):
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class JobsQuery(QueryParameters):
    limit: Annotated[int, Field(ge=1, le=200)] = 20


class VersionPath(PathParameters):
    error: ClassVar[type[InvalidRequest]] = InvalidVersion
    version: Version


class ModePath(PathParameters):
    error: ClassVar[type[InvalidRequest]] = InvalidMode
    mode: ModelMode


class KeyPath(PathParameters):
    key_id: Identifier = Field(examples=["key_beb7e82312f1"])


class JobPath(PathParameters):
    job_id: Identifier = Field(examples=["job_837bd19c9e8a"])


# -- responses -----------------------------------------------------------------------------


class ResponseBody(BaseModel):
    """A response body: routes return these (`routes.operations.respond` serialises them), so
    every field a client receives is declared here, and an undeclared one fails loudly."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(examples=["invalid_body"])
    message: str


class Error(BaseModel):
    """Every error response, whatever the status."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class Health(ResponseBody):
    status: Literal["healthy"]
    model_loaded: bool
    model_version: str | None
    uptime_seconds: float
    timestamp: Timestamp


class Readiness(ResponseBody):
    status: Literal["ready", "not_ready"]
    ready: bool
    reasons: list[str] = Field(description="why the process is not ready (empty when ready)")
    degraded: list[str] = Field(description="what works in a reduced way while ready, e.g. Redis down")
    current_version: str | None
    production_version: str | None
    mode: ModelMode | None = Field(description="null while the store is unreachable")
    checks: dict[str, Any]
    timestamp: Timestamp


class ModeState(ResponseBody):
    mode: ModelMode
    reason: str
    changed_by: str
    changed_at: Timestamp | None
    serves_predictions: bool
    allows_training: bool


class ModeChange(ResponseBody):
    mode: ModelMode
    previous_mode: ModelMode
    changed: bool = Field(description="false when the service already was in that mode (nothing recorded)")
    reason: str
    changed_by: str
    changed_at: Timestamp | None = Field(description="when the mode last changed; null if it never did")
    cancelled_jobs: list[str]


class Prediction(ResponseBody):
    id: str = Field(description="`<request_id>:<row>`: send it back with the true class to POST /api/feedback")
    class_: str = Field(alias="class")
    class_index: int
    confidence: float
    probabilities: dict[str, float]


class PredictResponse(ResponseBody):
    predictions: list[Prediction]
    model_version: str
    request_id: str


class VersionInfo(ResponseBody):
    version: str
    sha256: str
    size_bytes: int
    created_at: Timestamp
    created_by: str | None
    description: str | None
    tags: list[str]
    metrics: dict[str, JsonValue] = Field(description="numbers as a rule; the Python API may record any JSON value")
    config: dict[str, Any]
    training_info: dict[str, Any]
    is_production: bool
    is_serving: bool
    archived: bool
    integrity: dict[str, Any] | None = Field(None, description="with ?verify=true")


class VersionList(ResponseBody):
    versions: list[VersionInfo]
    count: int
    production_version: str | None
    serving_version: str | None


class Deleted(ResponseBody):
    deleted: str


class ServingChange(ResponseBody):
    serving_version: str
    previous_version: str | None
    changed: bool = Field(description="false when the version was already serving")


class ProductionChange(ResponseBody):
    production_version: str
    previous_version: str | None
    changed: bool = Field(description="false when the version already was production (nothing recorded)")
    message: str


class HistoryEntry(ResponseBody):
    id: int
    action: str
    actor: str | None
    at: Timestamp
    from_version: str | None
    to_version: str | None


class History(ResponseBody):
    history: list[HistoryEntry]


class MetricComparison(ResponseBody):
    version1: JsonValue
    version2: JsonValue
    improvement: float | None = Field(description="> 0: version2 is better")


class Comparison(ResponseBody):
    version1: str
    version2: str
    metrics_comparison: dict[str, MetricComparison]


class Summary(ResponseBody):
    """Summary statistics of a set of values (each null when there are none)."""

    mean: float | None
    std: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class Histogram(ResponseBody):
    bins: list[float] = Field(description="bin edges")
    counts: list[int]


class ConfidenceSummary(Summary):
    min: float | None
    histogram: Histogram


FeedbackStatus = Literal["recorded", "relabelled", "superseded", "unknown_id", "expired", "invalid_label",
                         "invalid_item"]


class FeedbackResult(ResponseBody):
    index: int = Field(description="the item's position in `labels`")
    id: str | None
    status: FeedbackStatus = Field(
        description="recorded: a first label; relabelled: replaced an earlier label (counted once); superseded: a "
                    "later item of this request labels the same id; unknown_id: no such prediction; expired: older "
                    "than the label horizon; invalid_label: not a class of the prediction's version; invalid_item: "
                    "not an object {id, label} of the right types")
    message: str | None = None


class FeedbackResponse(ResponseBody):
    recorded: int
    relabelled: int
    rejected: int = Field(description="items not recorded (every status but recorded and relabelled)")
    results: list[FeedbackResult]


class ClassQuality(ResponseBody):
    precision: float
    recall: float
    f1: float
    support: int = Field(description="labelled predictions whose true class this is")


class CalibrationBin(ResponseBody):
    lower: float
    upper: float
    count: int
    confidence_mean: float | None
    accuracy: float | None


class QualityPoint(ResponseBody):
    start: Timestamp
    labelled: int
    accuracy: float


class VersionQuality(ResponseBody):
    version: str
    classes: list[str]
    predictions: int = Field(description="successful predictions of the version made in the window")
    labelled: int
    coverage: float | None = Field(description="labelled / predictions")
    accuracy: float | None
    validation_accuracy: float | None = Field(
        description="the reference line: the version's metrics val_accuracy, else accuracy (what training records)")
    macro_f1: float | None
    log_loss: float | None
    brier_score: float | None
    expected_calibration_error: float | None
    per_class: dict[str, ClassQuality]
    confusion_matrix: list[list[int]] = Field(description="rows: true class, columns: predicted, in `classes` order")
    calibration: list[CalibrationBin] = Field(description="10 equal-width bins of confidence")
    timeline: list[QualityPoint] = Field(description="accuracy per 1/24 of the window, where labels exist")


class QualityCheck(ResponseBody):
    """Production's accuracy against the alert's floor, as the quality alert judges it."""

    version: str | None
    window: QualityWindow = Field(description="QUADRA_QUALITY_WINDOW")
    labelled: int
    min_labels: int = Field(description="QUADRA_QUALITY_MIN_LABELS: fewer labels, no verdict")
    accuracy: float | None
    validation_accuracy: float | None
    floor: float | None = Field(description="the higher of QUADRA_QUALITY_MIN_ACCURACY and validation accuracy minus "
                                            "QUADRA_QUALITY_MAX_DROP; null when neither is set")
    evaluated: bool
    below_floor: bool
    reason: str


class Quality(ResponseBody):
    window: QualityWindow
    since: Timestamp
    until: Timestamp
    production_version: str | None
    versions: list[VersionQuality]
    check: QualityCheck


class StatisticsWindow(ResponseBody):
    """The monitoring window: the last QUADRA_MONITORING_WINDOW records."""

    count: int
    errors: int
    error_rate: float
    first_at: Timestamp | None
    last_at: Timestamp | None


class Statistics(ResponseBody):
    total_predictions: int = Field(description="every prediction since the counters were last reset")
    error_count: int
    error_rate: float
    window_size: int
    avg_prediction_time: float | None = Field(description="seconds, over the window")
    avg_confidence: float | None
    window: StatisticsWindow
    latency_ms: Summary
    prediction_time: Summary = Field(description="seconds")
    confidence: ConfidenceSummary
    class_distribution: dict[str, int]
    model_versions: dict[str, int]
    throughput_per_second: float = Field(description="over the last minute")
    pending_records: int = Field(description="records of this process not yet written to the store")
    dropped_records: int = Field(description="records this process dropped because its buffer was full")
    timestamp: Timestamp = Field(description="when the statistics were computed")


class DriftWindow(ResponseBody):
    """The predictions drift compared with the baseline: only those made after it was set."""

    count: int
    first_at: Timestamp | None
    last_at: Timestamp | None
    since_baseline_at: Timestamp | None


class BaselineSummary(ResponseBody):
    id: int
    created_at: Timestamp
    created_by: str
    sample_count: int


class Drift(ResponseBody):
    drift_detected: bool
    drift_score: float | None
    threshold: float
    baseline_mean: float | None
    current_mean: float | None
    baseline_std: float | None
    current_std: float | None
    sample_count: int
    evaluated: bool
    reason: str | None = Field(description="why drift was not evaluated")
    window: DriftWindow
    detectors: dict[Literal["confidence", "input", "prediction"], bool]
    fired: list[str]
    drifted_features: list[str]
    dataset_drift_share: float | None = Field(description="the share of input features that drifted")
    features: dict[str, ColumnDrift]
    prediction_drift: ColumnDrift | None
    baseline: BaselineSummary | None


class Baseline(ResponseBody):
    id: int
    sample_count: int
    feature_names: list[str]
    confidence_mean: float
    confidence_std: float
    feature_means: list[float]
    feature_stds: list[float]
    class_distribution: dict[str, int]
    last_record_id: int = Field(description="the newest prediction record the baseline was taken from")


class BaselineRemoved(ResponseBody):
    removed: int


class Alert(ResponseBody):
    id: int
    kind: str
    severity: str
    message: str
    at: Timestamp
    resolved_at: Timestamp | None
    details: dict[str, Any] | None


class Alerts(ResponseBody):
    alerts: list[Alert]


class ApiKey(ResponseBody):
    """A key as it may be shown: never the key or its hash."""

    id: str
    name: str
    user_id: str = Field(description="the key's name (the seed's field)")
    display: str = Field(description="a prefix and the last four characters")
    permissions: list[Permission]
    rate_limit: str | None
    created_at: Timestamp
    created_by: str | None
    expires_at: Timestamp | None
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None
    rotated_to: str | None
    active: bool


class NewApiKey(ApiKey):
    api_key: str = Field(description="the key itself, shown only in this response")


class ApiKeys(ResponseBody):
    keys: list[ApiKey]


class WhoAmI(ResponseBody):
    """Whom the request's credentials belong to: never the key or its hash."""

    id: str = Field(description="the key's id (for a token: the id of the key it was issued to)",
                    examples=["key_beb7e82312f1"])
    name: str
    permissions: list[Permission] = Field(description="what the credentials hold (a token: at most its key's)")
    via: Literal["api_key", "jwt", "disabled"] = Field(
        description="an X-API-Key, a bearer token, or authentication disabled (QUADRA_AUTH_ENABLED=false)")
    rate_limit: str | None = Field(description="the key's own limit; null: the service-wide limit")


class Token(ResponseBody):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    permissions: list[Permission]


class AuditEntry(ResponseBody):
    id: int
    at: Timestamp
    actor: str | None
    action: str
    outcome: str
    target: str | None
    status: int | None
    ip: str | None
    details: dict[str, Any] | None


class AuditLog(ResponseBody):
    entries: list[AuditEntry]
    count: int


class TrainingJob(ResponseBody):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    epoch: int
    total_epochs: int
    percent: float
    params: dict[str, Any]
    progress: list[dict[str, Any]]
    result_version: str | None
    error: str | None
    cancel_requested: bool
    created_at: Timestamp
    created_by: str
    started_at: Timestamp | None
    finished_at: Timestamp | None
    custom_data_rows: int | None = Field(description="rows of posted training data; null: the bundled dataset")


class TrainingJobs(ResponseBody):
    jobs: list[TrainingJob]


class ArmSummary(ResponseBody):
    """One arm's predictions since the rollout started."""

    version: str
    predictions: int
    errors: int
    error_rate: float | None
    latency_p95_ms: float | None
    confidence_mean: float | None
    class_distribution: dict[str, int]
    labelled: int = Field(default=0, description="its predictions since the start that have a label (with max_accuracy_drop)")
    accuracy: float | None = Field(default=None, description="on those labelled predictions")


class CriterionCheck(ResponseBody):
    name: str
    limit: float
    observed: float | None = Field(description="null until both arms have predictions to compare")
    passed: bool | None

    @property
    def clearly_breached(self) -> bool:
        """Beyond twice its limit: bad enough to abort before `min_predictions`."""
        return self.observed is not None and self.observed > 2 * self.limit


class ArmPoint(ResponseBody):
    predictions: int
    error_rate: float | None
    latency_p95_ms: float | None
    confidence_mean: float | None


class RolloutPoint(ResponseBody):
    """Both arms at one check: the curves of the rollout."""

    at: Timestamp
    production: ArmPoint
    candidate: ArmPoint


class ShadowSummary(ResponseBody):
    """What the candidate did on the sampled copies of production's requests."""

    requests: int
    rows: int
    agreement_rate: float | None = Field(description="rows where both gave the same class, over the rows compared")
    errors: int
    dropped: int = Field(description="copies not run because a process's shadow queue was full")
    confusion: dict[str, dict[str, int]] = Field(description="production's class -> the candidate's class -> rows")


class RolloutArms(ResponseBody):
    production: ArmSummary
    candidate: ArmSummary


class Rollout(ResponseBody):
    """A canary: the candidate, its share, its criteria and, once decided, the outcome."""

    id: int
    mode: Literal["canary", "shadow"]
    status: Literal["running", "held", "promoted", "aborted"]
    version: str = Field(description="the candidate")
    production_version: str
    percent: float
    min_predictions: int
    criteria: dict[str, float | None]
    on_success: Literal["promote", "hold"]
    on_failure: Literal["abort", "hold"]
    started_at: Timestamp
    started_by: str
    paused: bool = Field(description="true in maintenance mode: no prediction is served, nothing is decided")
    arms: RolloutArms | None
    shadow: ShadowSummary | None = Field(description="shadow mode: the candidate against production on the same inputs")
    checks: list[CriterionCheck]
    evaluated_at: Timestamp | None
    history: list[RolloutPoint] = Field(description="both arms at each check, oldest first (the last 120)")
    verdict: Literal["passed", "failed"] | None = Field(description="what the criteria said; null for a decision by hand")
    reason: str | None
    decided_at: Timestamp | None
    decided_by: str | None


class RolloutStatus(ResponseBody):
    rollout: Rollout | None = Field(description="the active canary, else the last one; null if there never was one")


class OpenApiDocument(ResponseBody):
    openapi: str
    info: dict[str, Any]
    tags: list[dict[str, Any]]
    paths: dict[str, Any]
    components: dict[str, Any]
