"""Rollouts: a candidate version serves a share of prediction requests beside production
(canary), or runs beside it on a sampled copy of them (shadow, `utils.shadow`); both arms are
compared, and the service promotes or aborts by itself once the candidate has enough
predictions (or at once on a clear breach).

The rollout lives in the store (`utils.store.rollouts`), so every worker and host routes by
the same row (`utils.serving.ModelServer` loads the candidate and picks the arm per request)
and a restart resumes it. One process at a time decides (`decide`, under a lease); a
decision ends the row exactly once, so two deciders never both act.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from utils import audit
from utils.alerts import AlertManager
from utils.drift import jensen_shannon_distance
from utils.errors import RolloutConflict
from utils.model_modes import ModelModeManager
from utils.model_monitoring import ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.schemas import ArmSummary, CanaryRequest, CriterionCheck
from utils.serving import Canary, ModelServer, load_served_model
from utils.shadow import ShadowRunner
from utils.store import RolloutRow, ShadowTally, Store, VersionSummary
from utils.store.rollouts import HELD, RUNNING
from utils.timestamps import iso_utc

LATENCY_SAMPLE = 5000          # the newest records per arm whose latencies give its p95
EARLY_ABORT_MIN_PREDICTIONS = 30
HISTORY_LENGTH = 120           # points of each arm's curves kept with the rollout
CURVES = ("predictions", "error_rate", "latency_p95_ms", "confidence_mean")
log = logging.getLogger("quadra.rollout")


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
    arrived since the last one: the arms' records up to `record_id` and, for a shadow, the
    candidate's tallies up to `tally_id`."""

    record_id: int
    production: VersionSummary
    candidate: VersionSummary
    tally_id: int = 0
    tally: ShadowTally | None = None

    @classmethod
    def of(cls, rollout: RolloutRow) -> Progress:
        stored = (rollout.comparison or {}).get("progress")
        if stored is None:
            return cls(rollout.start_record_id, VersionSummary(), VersionSummary(),
                       tally=ShadowTally() if rollout.mode == "shadow" else None)
        return cls(stored["record_id"], VersionSummary(**stored["production"]), VersionSummary(**stored["candidate"]),
                   stored["tally_id"], ShadowTally(**stored["tally"]) if stored["tally"] is not None else None)

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


class Rollouts:
    """Start, follow, decide and end canaries for one deployment's store."""

    def __init__(self, store: Store, registry: ModelVersionManager, model_server: ModelServer, monitor: ModelMonitor,
                 shadows: ShadowRunner, alerts: AlertManager, modes: ModelModeManager) -> None:
        self.store = store
        self.registry = registry
        self.model_server = model_server
        self.monitor = monitor
        self.shadows = shadows
        self.alerts = alerts
        self.modes = modes

    def start(self, version: str, request: CanaryRequest, actor: str) -> RolloutRow:
        """Verify, load and warm `version` here (a bad artifact fails now, not on a worker),
        then record the rollout: every process routes by it within its next poll."""
        deployment = self.store.versions.deployment()
        if deployment.production is None:
            raise RolloutConflict("there is no production version to compare a canary with")
        if deployment.serving != deployment.production:
            raise RolloutConflict(f"version {deployment.serving} is loaded over production {deployment.production}; "
                                  "promote it or load production again before a canary")
        if version == deployment.production:
            raise RolloutConflict(f"version {version} is already production")
        if self.store.rollouts.active() is not None:
            raise RolloutConflict("a canary is already active; promote or abort it first")
        candidate = load_served_model(self.registry, version)
        row = self.store.rollouts.start(RolloutRow(
            id=0, version=version, baseline_version=deployment.production, mode=request.mode, percent=request.percent,
            min_predictions=request.min_predictions, criteria=request.criteria.model_dump(),
            on_success=request.on_success, on_failure=request.on_failure, started_at=time.time(),
            started_by=actor, start_record_id=self.store.predictions.last_id(), status=RUNNING))
        self.model_server.adopt_candidate(Canary(row.id, row.percent, candidate, row.mode))
        self.alerts.notify("rollout", f"{row.mode} of {version} started at {request.percent:g}% by {actor} "
                                      f"(production {deployment.production})",
                           {"version": version, "production_version": deployment.production, "percent": request.percent,
                            "mode": row.mode})
        return row

    def compare(self, rollout: RolloutRow) -> Comparison:
        """Both arms' numbers since the rollout started, from the store (with this process's
        buffered records and shadow tallies written first, as every monitoring read does).
        A canary's candidate is measured by its monitoring records; a shadow's by its tallies."""
        self.monitor.flush()
        progress = self._progress(rollout)
        predictions, start = self.store.predictions, rollout.start_record_id
        shadow = progress.tally
        if shadow is not None:  # latency: both forward passes on the sampled requests
            production = arm_of(rollout.baseline_version, progress.production, shadow.production_latency_samples)
            candidate = arm_of(rollout.version, VersionSummary(  # a failed copy counts once, as a failed request does
                shadow.rows + shadow.errors, shadow.errors, shadow.confidence_sum, shadow.confidence_count,
                shadow.class_counts), shadow.latency_samples)
        else:  # latency: each arm's newest requests as recorded
            production, candidate = (arm_of(v, summary, predictions.latencies(start, v, LATENCY_SAMPLE))
                                     for v, summary in ((rollout.baseline_version, progress.production),
                                                        (rollout.version, progress.candidate)))
        checks = checks_for(rollout.criteria, production, candidate, shadow)
        return Comparison(production, candidate, checks, time.time(), progress)

    def _progress(self, rollout: RolloutRow) -> Progress:
        """The rollout's stored sums plus what arrived since they were taken."""
        earlier = Progress.of(rollout)
        up_to = self.store.predictions.last_id()
        new = self.store.predictions.summaries(earlier.record_id, up_to, (rollout.baseline_version, rollout.version))
        tally, tally_id = earlier.tally, earlier.tally_id
        if tally is not None:
            self.shadows.flush()
            arrived, tally_id = self.store.shadow_tallies.total(rollout.id, earlier.tally_id)
            tally.add(arrived)
        return Progress(up_to, earlier.production.plus(new[rollout.baseline_version]),
                        earlier.candidate.plus(new[rollout.version]), tally_id, tally)

    def current(self) -> tuple[RolloutRow, dict[str, Any] | None] | None:
        """The active rollout with live numbers, else the last one with its final numbers."""
        row = self.store.rollouts.latest()
        if row is None:
            return None
        return row, self.compare(row).as_dict(row.comparison) if row.is_active else row.comparison

    @property
    def paused(self) -> bool:
        return not self.modes.serves_predictions()

    def promote(self, actor: str, reason: str = "", verdict: str | None = None) -> RolloutRow:
        """End the active canary by promoting its candidate through the normal promote path."""
        row = self._active()
        comparison = self.compare(row).as_dict(row.comparison)
        why = reason or f"promoted by {actor}"
        if not self.store.rollouts.finish(row.id, "promoted", verdict, why, actor, comparison):
            raise RolloutConflict("the canary ended meanwhile")
        try:
            self.registry.promote_to_production(row.version, actor=actor)
        except Exception as exc:
            self.store.rollouts.amend_outcome(row.id, "aborted", f"promote failed: {exc}")
            self.alerts.notify("rollout", f"{row.mode} of {row.version}: promote failed, production stays "
                                          f"{row.baseline_version}: {exc}", {"version": row.version}, severity="warning")
            raise
        self.model_server.sync()
        self.alerts.notify("rollout", f"{row.mode} of {row.version} promoted by {actor}: {why}",
                           {"version": row.version, "previous_version": row.baseline_version, "verdict": verdict})
        return self._get(row.id)

    def abort(self, actor: str, reason: str = "", verdict: str | None = None) -> RolloutRow:
        """End the active canary: production serves every request again."""
        row = self._active()
        why = reason or f"aborted by {actor}"
        comparison = self.compare(row).as_dict(row.comparison)
        if not self.store.rollouts.finish(row.id, "aborted", verdict, why, actor, comparison):
            raise RolloutConflict("the canary ended meanwhile")
        self.model_server.sync()
        self.alerts.notify("rollout", f"{row.mode} of {row.version} aborted by {actor}: {why}",
                           {"version": row.version, "production_version": row.baseline_version, "verdict": verdict},
                           severity="warning" if verdict == "failed" else "info")
        return self._get(row.id)

    def decide(self) -> RolloutRow | None:
        """One look at the active canary (the scheduler's task, on one process at a time):
        keep its numbers for /metrics and the dashboard and, unless paused or held, act on a
        verdict as the rollout says. Returns the rollout when this call ended or held it."""
        row = self.store.rollouts.active()
        if row is None:
            return None
        comparison = self.compare(row)
        snapshot = comparison.as_dict(row.comparison)
        verdict = None if row.status == HELD or self.paused else verdict_of(row, comparison)
        if verdict is None:
            self.store.rollouts.record_comparison(row.id, snapshot)
            return None
        outcome, reason = verdict
        action = row.on_success if outcome == "passed" else row.on_failure
        log.info("%s of %s %s: %s (%s)", row.mode, row.version, outcome, reason, action)
        audit.record(self.store, "rollout", f"rollout.{action}", "success", target=row.version,
                     details={"verdict": outcome, "reason": reason})
        if action == "promote":
            return self.promote("rollout", reason, outcome)
        if action == "abort":
            return self.abort("rollout", reason, outcome)
        if self.store.rollouts.hold(row.id, outcome, reason, snapshot):
            self.alerts.notify("rollout", f"{row.mode} of {row.version} {outcome}, held for an operator: {reason}",
                               {"version": row.version, "verdict": outcome}, severity="warning")
        return self._get(row.id)

    def _active(self) -> RolloutRow:
        row = self.store.rollouts.active()
        if row is None:
            raise RolloutConflict("no canary is active")
        return row

    def _get(self, rollout_id: int) -> RolloutRow:
        row = self.store.rollouts.get(rollout_id)
        assert row is not None, "rollouts are never deleted"
        return row


def rollout_view(row: RolloutRow, comparison: dict[str, Any] | None, paused: bool) -> dict[str, Any]:
    """A rollout as the API shows it (`utils.schemas.Rollout`)."""
    return {
        "id": row.id, "mode": row.mode, "status": row.status, "version": row.version,
        "production_version": row.baseline_version,
        "percent": row.percent, "min_predictions": row.min_predictions, "criteria": row.criteria,
        "on_success": row.on_success, "on_failure": row.on_failure, "started_at": iso_utc(row.started_at),
        "started_by": row.started_by, "paused": paused and row.is_active,
        "arms": comparison["arms"] if comparison else None, "checks": comparison["checks"] if comparison else [],
        "shadow": comparison.get("shadow") if comparison else None,
        "evaluated_at": iso_utc(comparison["evaluated_at"]) if comparison else None,
        "history": [{**point, "at": iso_utc(point["at"])} for point in comparison["history"]] if comparison else [],
        "verdict": row.verdict, "reason": row.reason, "decided_at": iso_utc(row.decided_at),
        "decided_by": row.decided_by,
    }
