"""Background work on each process's scheduler (`utils.scheduler`).

Drift and quality checks (with their alerts and history), canary decisions, roll-ups and journal recovery run on one
process of the deployment at a time, under leases in the store; the model health check, the
mode refresh (which fires mode callbacks) and the reaping of dead training jobs run everywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from utils.artifact_files import crash_leftovers, remove_path
from utils.instruments import mark_worker_started, record_memory
from utils.services import Services
from utils.store import DriftCheck

MONITORING_LEASE = "monitoring-maintenance"
JOURNAL_LEASE = "journal-recovery"
ROLLOUT_LEASE = "rollout-decision"
DRIFT_HISTORY_LENGTH = 120
ROLL_UP_SECONDS = 60.0
JOB_REAP_SECONDS = 5.0
MEMORY_SAMPLE_SECONDS = 5.0
JOURNAL_RECOVERY_SECONDS = 10.0
CLEANUP_LEASE = "crash-leftovers"
CLEANUP_LEASE_SECONDS = 60.0
log = logging.getLogger("quadra.registry")


def schedule_background_work(services: Services) -> None:
    """Register the periodic tasks and start the scheduler."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    settings, monitor, store, scheduler = services.settings, services.monitor, services.store, services.scheduler

    def check_drift() -> None:
        if store.leases.try_acquire(MONITORING_LEASE, owner, settings.drift_check_seconds * 3):
            record_drift_check(services)
            observe_quality(services)

    def roll_up() -> None:
        if store.leases.try_acquire(MONITORING_LEASE, owner, settings.drift_check_seconds * 3):
            monitor.roll_up(settings.monitoring_retention_hours * 3600)
            route = store.rollouts.route()
            store.shadow_tallies.prune(route.id if route else None)

    def decide_rollout() -> None:
        if store.leases.try_acquire(ROLLOUT_LEASE, owner, settings.rollout_check_seconds * 3):
            services.rollouts.decide()

    def check_model() -> None:
        if services.model_server.last_error:
            services.alerts.raise_alert("health", services.model_server.last_error, {"process": owner})
        if services.model_server.candidate_error:
            services.alerts.raise_alert("rollout", services.model_server.candidate_error, {"process": owner},
                                        severity="warning")

    def recover_journals() -> None:
        if store.leases.try_acquire(JOURNAL_LEASE, owner, JOURNAL_RECOVERY_SECONDS * 3):
            try:
                monitor.recover_journals()
            finally:
                store.leases.release(JOURNAL_LEASE, owner)

    remove_crash_leftovers(services, owner)
    recover_journals()
    scheduler.every(settings.monitoring_flush_seconds, monitor.flush)
    scheduler.every(settings.monitoring_flush_seconds, services.shadows.flush)
    services.shadows.start()
    scheduler.every(JOURNAL_RECOVERY_SECONDS, recover_journals)
    scheduler.every(settings.drift_check_seconds, check_drift)
    scheduler.every(ROLL_UP_SECONDS, roll_up)
    scheduler.every(settings.rollout_check_seconds, decide_rollout)
    scheduler.every(settings.drift_check_seconds, check_model)
    scheduler.every(settings.monitoring_flush_seconds, services.modes.state)
    scheduler.every(JOB_REAP_SECONDS, services.jobs.reap)
    scheduler.every(MEMORY_SAMPLE_SECONDS, record_memory)
    mark_worker_started()
    scheduler.start()


def remove_crash_leftovers(services: Services, owner: str) -> list[str]:
    """Delete what saves and downloads of processes killed on this host left behind (staging
    folders, temporary files), once per host at a time (workers starting together would
    race otherwise); log each removal. Returns the removed paths."""
    lease = f"{CLEANUP_LEASE}:{socket.gethostname()}"
    if not services.store.leases.try_acquire(lease, owner, CLEANUP_LEASE_SECONDS):
        return []
    try:
        removed = []
        for folder in (services.registry.models_dir, services.settings.artifact_cache_dir):
            for path in crash_leftovers(folder):
                remove_path(path)
                removed.append(str(path))
                log.warning("removed %s, left by a process that stopped during a save or download", path)
        return removed
    finally:
        services.store.leases.release(lease, owner)


def record_drift_check(services: Services) -> DriftCheck:
    """Check drift, keep the verdict and its history for the dashboard, feed the alerts."""
    report = services.monitor.drift_report()
    check = DriftCheck(
        evaluated=report.evaluated, drift_detected=report.drift_detected, checked_at=time.time(),
        drift_score=report.drift_score, threshold=report.threshold, fired=tuple(report.fired),
        drifted_features=tuple(report.drifted_features), reason=report.reason,
        dataset_drift_share=report.dataset_drift_share,
        features={name: {key: getattr(column, key) for key in ("test", "statistic", "p_value", "drift_detected")}
                  for name, column in report.features.items()},
    )
    services.store.drift_checks.record(check, keep=DRIFT_HISTORY_LENGTH)
    if report.evaluated:
        message = f"drift detected by {', '.join(report.fired)}" if report.fired else "no drift"
        services.alerts.observe("drift", report.drift_detected, message,
                                report.model_dump(include={"drift_score", "threshold", "fired", "drifted_features"}))
    return check


def observe_quality(services: Services) -> dict[str, Any]:
    """Compute the quality report over QUADRA_QUALITY_WINDOW, keep it for the dashboard, and
    feed production's verdict against the floor to the alerts (one alert per episode, cleared
    after consecutive checks at or above the floor). Returns the report."""
    report = services.monitor.quality(window=services.settings.quality_window)
    services.store.outcomes.record_report(report)
    check = report["check"]
    if check["evaluated"]:
        message = f"accuracy of {check['version']} {check['reason']}"
        services.alerts.observe("quality", check["below_floor"], message,
                                {key: check[key] for key in ("version", "window", "labelled", "accuracy",
                                                             "validation_accuracy", "floor")})
    return report
