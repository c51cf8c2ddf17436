"""A rollout's numbers: each arm's summary, the criteria's checks and the verdict they give.

The sums are incremental (`Progress`, kept with the rollout's stored comparison): each check
adds only the records (and shadow tallies) that arrived since the last one, so a long rollout
costs each check the same. Only failures that are the service's or the model's count against
an arm; a client's bad input says nothing about the model (and a client choosing its request
ids could otherwise aim failures at one arm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from utils.drift import jensen_shannon_distance
from utils.errors import QuadraError
from utils.schemas import ArmSummary, CriterionCheck
from utils.store import Coverage, RolloutRow, ShadowTally, VersionSummary

LATENCY_SAMPLE = 2000          # the newest latencies per arm, for its p95
MIN_LABELLED_PER_ARM = 30      # labelled predictions each arm needs before accuracies are compared
EARLY_ABORT_MIN_PREDICTIONS = 100
HISTORY_LENGTH = 120           # points of each arm's curves kept with the rollout
CURVES = ("predictions", "error_rate", "latency_p95_ms", "confidence_mean")


def _server_error_codes() -> tuple[str, ...]:
    """The codes a failed prediction is recorded with when the service or the model failed."""
    codes, classes = {"internal_error", "internal_server_error"}, [QuadraError]  # an unexpected exception; werkzeug's 500
    while classes:
        error = classes.pop()
        classes.extend(error.__subclasses__())
        if error.status >= 500:
            codes.add(error.code)
    return tuple(sorted(codes))


MODEL_FAILURES = _server_error_codes()


def arm_of(version: str, summary: VersionSummary, latencies: list[float]) -> ArmSummary:
    count = summary.count
    return ArmSummary(version=version, predictions=count, errors=summary.errors,
                      error_rate=summary.errors / count if count else None,
                      latency_p95_ms=float(np.percentile(latencies, 95)) if latencies else None,
                      confidence_mean=summary.confidence_sum / summary.confidence_count if summary.confidence_count
                      else None, class_distribution=summary.class_counts)


def observe(name: str, production: ArmSummary, candidate: ArmSummary, shadow: ShadowTally | None) -> float | None:
    """The value of criterion `name` for the two arms (and, in shadow mode, the candidate's
    tally on production's inputs); None while it cannot be measured."""
    if name == "max_accuracy_drop":
        if min(production.labelled, candidate.labelled) < MIN_LABELLED_PER_ARM:
            return None
        return production.accuracy - candidate.accuracy  # type: ignore[operator]  # set with labels
    if name == "max_disagreement_rate":
        return 1.0 - shadow.agreements / shadow.rows if shadow is not None and shadow.rows else None
    if name == "max_error_rate_increase":
        if production.error_rate is None or candidate.error_rate is None:
            return None
        return candidate.error_rate - production.error_rate
    if name == "max_latency_p95_ratio":
        if not production.latency_p95_ms or candidate.latency_p95_ms is None:
            return None
        return candidate.latency_p95_ms / production.latency_p95_ms
    if name == "max_confidence_drop":
        if production.confidence_mean is None or candidate.confidence_mean is None:
            return None
        return production.confidence_mean - candidate.confidence_mean
    if name == "max_prediction_distance":
        classes = sorted(set(production.class_distribution) | set(candidate.class_distribution))
        if not production.class_distribution or not candidate.class_distribution:
            return None
        return jensen_shannon_distance(np.array([production.class_distribution.get(c, 0) for c in classes], dtype=float),
                                       np.array([candidate.class_distribution.get(c, 0) for c in classes], dtype=float))
    raise ValueError(f"unknown rollout criterion {name!r}")


def checks_for(criteria: dict[str, float | None], production: ArmSummary, candidate: ArmSummary,
               shadow: ShadowTally | None) -> list[CriterionCheck]:
    checks = []
    for name, limit in criteria.items():
        if limit is None:
            continue
        observed = observe(name, production, candidate, shadow)
        checks.append(CriterionCheck(name=name, limit=limit, observed=observed,
                                     passed=None if observed is None else observed <= limit))
    return checks


@dataclass(frozen=True)
class Progress:
    """A rollout's sums so far, kept with its comparison so that each check reads only what
    arrived since the last one: the arms' records up to `record_id` (with the newest
    latencies of each) and, for a shadow, the candidate's tallies up to `tally_id`."""

    record_id: int
    production: VersionSummary
    candidate: VersionSummary
    production_latencies: list[float]
    candidate_latencies: list[float]
    tally_id: int = 0
    tally: ShadowTally | None = None

    @classmethod
    def of(cls, rollout: RolloutRow) -> Progress:
        stored = (rollout.comparison or {}).get("progress")
        if stored is None:
            return cls(rollout.start_record_id, VersionSummary(), VersionSummary(), [], [],
                       tally=ShadowTally() if rollout.mode == "shadow" else None)
        return cls(stored["record_id"], VersionSummary(**stored["production"]), VersionSummary(**stored["candidate"]),
                   stored["production_latencies"], stored["candidate_latencies"], stored["tally_id"],
                   ShadowTally(**stored["tally"]) if stored["tally"] is not None else None)

    def arms(self, production_version: str, candidate_version: str) -> tuple[ArmSummary, ArmSummary]:
        """Both arms' summaries. A shadow's candidate is measured by its tallies, and both
        latencies are the forward passes of the sampled requests (the same work on each side)."""
        shadow = self.tally
        if shadow is None:
            return (arm_of(production_version, self.production, self.production_latencies),
                    arm_of(candidate_version, self.candidate, self.candidate_latencies))
        candidate = VersionSummary(shadow.rows + shadow.errors, shadow.errors, shadow.confidence_sum,  # a failed copy
                                   shadow.confidence_count, shadow.class_counts)                     # counts once
        return (arm_of(production_version, self.production, shadow.production_latency_samples),
                arm_of(candidate_version, candidate, shadow.latency_samples))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Both arms side by side and each criterion's check, at one moment."""

    production: ArmSummary
    candidate: ArmSummary
    checks: list[CriterionCheck]
    evaluated_at: float
    progress: Progress

    def as_dict(self, earlier: dict[str, Any] | None) -> dict[str, Any]:
        """As stored with the rollout: the arms, the checks and the arms' history, `earlier`'s
        history (the rollout's stored comparison) followed by this moment."""
        point = {"at": self.evaluated_at, **{arm: {key: getattr(numbers, key) for key in CURVES}
                                             for arm, numbers in (("production", self.production),
                                                                  ("candidate", self.candidate))}}
        history = (earlier or {}).get("history", [])[-(HISTORY_LENGTH - 1):]
        return {"arms": {"production": self.production.model_dump(), "candidate": self.candidate.model_dump()},
                "checks": [check.model_dump() for check in self.checks], "evaluated_at": self.evaluated_at,
                "history": [*history, point], "shadow": _shadow_summary(self.progress.tally),
                "progress": self.progress.as_dict()}


def _shadow_summary(tally: ShadowTally | None) -> dict[str, Any] | None:
    if tally is None:
        return None
    return {"requests": tally.requests, "rows": tally.rows, "errors": tally.errors, "dropped": tally.dropped,
            "agreement_rate": tally.agreements / tally.rows if tally.rows else None, "confusion": tally.confusion}


def verdict_of(rollout: RolloutRow, comparison: Comparison) -> tuple[str, str] | None:
    """("passed" | "failed", why) once the criteria decide; None while they cannot yet."""
    seen = comparison.candidate.predictions
    early = min(rollout.min_predictions, max(EARLY_ABORT_MIN_PREDICTIONS, rollout.min_predictions // 10))
    breached = [c for c in comparison.checks if c.passed is False]
    if seen >= early and any(c.clearly_breached for c in breached):
        return "failed", f"clear breach after {seen} predictions: {_describe(breached)}"
    if seen < rollout.min_predictions:
        return None
    if breached:
        return "failed", f"after {seen} predictions: {_describe(breached)}"
    if any(c.passed is None for c in comparison.checks):
        return None
    return "passed", f"every criterion met after {seen} predictions" if comparison.checks else \
        f"{seen} predictions and no criteria"


def _describe(breached: list[CriterionCheck]) -> str:
    return "; ".join(f"{c.name} {c.observed:.4g} > {c.limit:g}" for c in breached)


def with_labels(arm: ArmSummary, labels: dict[str, Coverage]) -> ArmSummary:
    """The arm with its labelled predictions' count and accuracy (`labels`: by version)."""
    found = labels.get(arm.version)
    if found is None or not found.labelled:
        return arm
    return arm.model_copy(update={"labelled": found.labelled, "accuracy": found.correct / found.labelled})


def comparison_of(rollout: RolloutRow, progress: Progress, at: float, labels: dict[str, Coverage]) -> Comparison:
    """Both arms (with `labels`, each version's labelled predictions since the start) and the checks."""
    production, candidate = (with_labels(arm, labels) for arm in progress.arms(rollout.baseline_version, rollout.version))
    return Comparison(production, candidate, checks_for(rollout.criteria, production, candidate, progress.tally), at,
                      progress)
