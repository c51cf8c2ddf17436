"""Rollouts: a candidate version serves a share of prediction requests beside production
(canary), or runs beside it on a sampled copy of them (shadow, `utils.shadow`); both arms are
compared (`utils.rollout_numbers`), and the service promotes or aborts by itself once the
candidate has enough predictions (or at once on a clear breach).

The rollout lives in the store (`utils.store.rollouts`), so every worker and host routes by
the same row (`utils.serving.ModelServer` loads the candidate and picks the arm per request)
and a restart resumes it. One process at a time decides (`decide`, under a lease); a
decision ends the row exactly once, so two deciders never both act.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from utils import audit
from utils.alerts import AlertManager
from utils.errors import InvalidArtifact, QuadraError, RolloutConflict
from utils.model_import import MODEL_ERRORS
from utils.model_modes import ModelModeManager
from utils.model_monitoring import ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.rollout_numbers import LATENCY_SAMPLE, MODEL_FAILURES, Comparison, Progress, comparison_of, verdict_of
from utils.schemas import CanaryRequest
from utils.serving import Canary, ModelServer, ServedModel, class_names_of, load_served_model
from utils.shadow import ShadowRunner
from utils.store import RolloutRow, Store, StoreConflict
from utils.store.rollouts import HELD, RUNNING
from utils.timestamps import iso_utc

log = logging.getLogger("quadra.rollout")


class Rollouts:
    """Start, follow, decide and end the rollouts of one deployment's store."""

    def __init__(self, store: Store, registry: ModelVersionManager, model_server: ModelServer, monitor: ModelMonitor,
                 shadows: ShadowRunner, alerts: AlertManager, modes: ModelModeManager) -> None:
        self.store = store
        self.registry = registry
        self.model_server = model_server
        self.monitor = monitor
        self.shadows = shadows
        self.alerts = alerts
        self.modes = modes

    @property
    def paused(self) -> bool:
        return not self.modes.serves_predictions()

    # -- starting -----------------------------------------------------------------------

    def start(self, version: str, request: CanaryRequest, actor: str) -> RolloutRow:
        """Verify, load and warm `version` here (a bad artifact fails now, not on a worker),
        then record the rollout: every process routes by it within its next poll."""
        deployment = self.store.versions.deployment()
        production = deployment.production
        if production is None:
            raise RolloutConflict("there is no production version to compare a candidate with")
        if deployment.serving != production:
            raise RolloutConflict(f"version {deployment.serving} is loaded over production {production}; "
                                  "promote it or load production again first")
        if version == production:
            raise RolloutConflict(f"version {version} is already production")
        if self.store.rollouts.active() is not None:
            raise RolloutConflict("a rollout is already active; promote or abort it first")
        candidate = self._load_candidate(version, production)
        try:
            row = self.store.rollouts.start(RolloutRow(
                id=0, version=version, baseline_version=production, mode=request.mode, percent=request.percent,
                min_predictions=request.min_predictions, criteria=request.criteria.model_dump(),
                on_success=request.on_success, on_failure=request.on_failure, started_at=time.time(),
                started_by=actor, start_record_id=self.store.predictions.last_id(), status=RUNNING))
        except StoreConflict as exc:  # another start or a deployment won the race
            raise RolloutConflict(str(exc)) from None
        self.model_server.adopt_candidate(Canary(row.id, row.percent, candidate, row.mode))
        self.alerts.notify("rollout", f"{row.mode} of {version} started at {request.percent:g}% by {actor} "
                                      f"(production {production})",
                           {"version": version, "production_version": production, "percent": request.percent,
                            "mode": row.mode})
        return row

    def _load_candidate(self, version: str, production: str) -> ServedModel:
        """The candidate, loaded and warmed; it must take the same inputs and name the same
        classes as production, or its share of clients would be answered differently."""
        try:
            candidate = load_served_model(self.registry, version)
        except QuadraError:  # not found, its hash, the artifact store: as the registry says
            raise
        except MODEL_ERRORS as exc:  # its architecture is not registered here, or its weights do not fit it
            raise InvalidArtifact(f"version {version} cannot be served: {exc}") from None
        config = self.registry.version_row(production).config
        for name, theirs, ours in (("input_dim", candidate.input_dim, int(config["input_dim"])),
                                   ("class_names", candidate.class_names, class_names_of(config))):
            if theirs != ours:
                raise RolloutConflict(f"version {version} has {name} {theirs}, production {production} has {ours}: "
                                      "its share of clients would be answered differently")
        return candidate

    # -- numbers ------------------------------------------------------------------------

    def compare(self, rollout: RolloutRow) -> Comparison:
        """Both arms' numbers since the rollout started (this process's buffered records and
        shadow tallies are written first, as every monitoring read does)."""
        self.monitor.flush()
        now = time.time()
        labels = (self.store.outcomes.coverage(rollout.started_at, now, (rollout.baseline_version, rollout.version))
                  if rollout.criteria.get("max_accuracy_drop") is not None else {})
        return comparison_of(rollout, self._progress(rollout), now, labels)

    def _progress(self, rollout: RolloutRow) -> Progress:
        """The rollout's stored sums plus what arrived since they were taken."""
        earlier, predictions = Progress.of(rollout), self.store.predictions
        versions = (rollout.baseline_version, rollout.version)
        up_to = predictions.last_id()
        new = predictions.summaries(earlier.record_id, up_to, versions, MODEL_FAILURES)
        latencies = predictions.latencies(earlier.record_id, up_to, versions, MODEL_FAILURES)
        tally, tally_id = earlier.tally, earlier.tally_id
        if tally is not None:
            self.shadows.flush()
            arrived, tally_id = self.store.shadow_tallies.total(rollout.id, earlier.tally_id)
            tally.add(arrived)
        return Progress(up_to, earlier.production.plus(new[rollout.baseline_version]),
                        earlier.candidate.plus(new[rollout.version]),
                        (earlier.production_latencies + latencies[rollout.baseline_version])[-LATENCY_SAMPLE:],
                        (earlier.candidate_latencies + latencies[rollout.version])[-LATENCY_SAMPLE:], tally_id, tally)

    def current(self) -> tuple[RolloutRow, dict[str, Any] | None] | None:
        """The active rollout with live numbers, else the last one with its final numbers."""
        row = self.store.rollouts.latest()
        if row is None:
            return None
        return row, self.compare(row).as_dict(row.comparison) if row.is_active else row.comparison

    # -- decisions ----------------------------------------------------------------------

    def promote(self, actor: str, reason: str = "", verdict: str | None = None,
                comparison: Comparison | None = None) -> RolloutRow:
        """End the active rollout by promoting its candidate through the normal promote path.
        The candidate is verified first: if it cannot be promoted now (its hash, an unreachable
        artifact store) the rollout goes on and the error is the caller's to see."""
        row = self._active()
        self.registry.check_deployable(row.version)
        snapshot = (comparison or self.compare(row)).as_dict(row.comparison)
        why = reason or f"promoted by {actor}"
        if not self.store.rollouts.finish(row.id, "promoted", verdict, why, actor, snapshot):
            raise RolloutConflict("the rollout ended meanwhile")
        try:
            self.registry.promote_to_production(row.version, actor=actor)
        except Exception as exc:
            self._promote_failed(row, exc)
            raise
        self.model_server.sync()
        self.alerts.notify("rollout", f"{row.mode} of {row.version} promoted by {actor}: {why}",
                           {"version": row.version, "previous_version": row.baseline_version, "verdict": verdict})
        return self._get(row.id)

    def _promote_failed(self, row: RolloutRow, exc: Exception) -> None:
        if self.store.versions.deployment().production == row.version:
            return  # production changed; what failed came after (the registry's mirror file)
        message = exc.message if isinstance(exc, QuadraError) else "an internal error (see the service's log)"
        self.store.rollouts.amend_outcome(row.id, "aborted", f"promote failed: {message}")
        self.alerts.notify("rollout", f"{row.mode} of {row.version}: promote failed, production stays "
                                      f"{row.baseline_version}: {message}", {"version": row.version}, severity="warning")

    def abort(self, actor: str, reason: str = "", verdict: str | None = None,
              comparison: Comparison | None = None) -> RolloutRow:
        """End the active rollout: production serves every request again."""
        row = self._active()
        why = reason or f"aborted by {actor}"
        return self._end(row, "aborted", verdict, why, actor, comparison)

    def end_for_deployment(self, action: str, actor: str, version: str | None = None) -> None:
        """A promote, load or rollback by hand ends an active rollout first (as promoted when it
        promotes the candidate), so production's change is the operator's, not the rollout's.
        The version deployed is verified before, so a deployment that cannot happen ends nothing."""
        row = self.store.rollouts.active()
        if row is not None:
            if version is not None:
                self.registry.check_deployable(version)
            promoted = action == "promote" and version == row.version
            what = f"the {action} of {version}" if version else f"a {action}"
            self._end(row, "promoted" if promoted else "aborted", None, f"ended by {what} by {actor}", actor, None)

    def _end(self, row: RolloutRow, status: str, verdict: str | None, why: str, actor: str,
             comparison: Comparison | None) -> RolloutRow:
        snapshot = (comparison or self.compare(row)).as_dict(row.comparison)
        if not self.store.rollouts.finish(row.id, status, verdict, why, actor, snapshot):
            raise RolloutConflict("the rollout ended meanwhile")
        self.model_server.sync()
        self.alerts.notify("rollout", f"{row.mode} of {row.version} {status} by {actor}: {why}",
                           {"version": row.version, "production_version": row.baseline_version, "verdict": verdict},
                           severity="warning" if verdict == "failed" else "info")
        return self._get(row.id)

    def decide(self) -> RolloutRow | None:
        """One look at the active rollout (the scheduler's task, on one process at a time):
        keep its numbers for /metrics and the dashboard and, unless paused or held, act on a
        verdict as the rollout says. A rollout whose production changed under it (a promote
        from the Python API) ends. Returns the rollout when this call ended or held it."""
        row = self.store.rollouts.active()
        if row is None:
            return None
        comparison = self.compare(row)
        deployment = self.store.versions.deployment()
        if deployment.production != row.baseline_version or deployment.serving != row.baseline_version:
            promoted = deployment.production == row.version
            return self._end(row, "promoted" if promoted else "aborted", None,
                             f"production became {deployment.production} (serving {deployment.serving}) meanwhile",
                             "rollout", comparison)
        verdict = None if row.status == HELD or self.paused else verdict_of(row, comparison)
        if verdict is None:
            self.store.rollouts.record_comparison(row.id, comparison.as_dict(row.comparison))
            return None
        return self._act(row, comparison, *verdict)

    def _act(self, row: RolloutRow, comparison: Comparison, outcome: str, reason: str) -> RolloutRow:
        action = row.on_success if outcome == "passed" else row.on_failure
        log.info("%s of %s %s: %s (%s)", row.mode, row.version, outcome, reason, action)
        if action == "promote":
            decided = self.promote("rollout", reason, outcome, comparison)
        elif action == "abort":
            decided = self.abort("rollout", reason, outcome, comparison)
        else:
            if self.store.rollouts.hold(row.id, outcome, reason, comparison.as_dict(row.comparison)):
                self.alerts.notify("rollout", f"{row.mode} of {row.version} {outcome}, held for an operator: {reason}",
                                   {"version": row.version, "verdict": outcome}, severity="warning")
            decided = self._get(row.id)
        audit.record(self.store, "rollout", f"rollouts.{action}_canary", "success", target=row.version,
                     details={"verdict": outcome, "reason": reason})
        return decided

    def _active(self) -> RolloutRow:
        row = self.store.rollouts.active()
        if row is None:
            raise RolloutConflict("no rollout is active")
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
