"""The service's objects, built in one place from its settings (`build_services`), started by
`start` and stopped by `stop`: the one wiring of the service, which `create_app` uses.

Every collaborator is passed explicitly, so nothing here or in the classes it builds reads
the QUADRA_* configuration behind the caller's back."""

from __future__ import annotations

from dataclasses import dataclass

from utils.alerts import AlertManager
from utils.artifact_store import artifact_store_for
from utils.batching import Batcher
from utils.change_notices import ChangeNotices
from utils.config import Settings
from utils.events import EventPusher
from utils.feedback import FeedbackPolicy
from utils.journal import RecordJournal
from utils.model_modes import ModelModeManager
from utils.model_monitoring import ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.outage import Outage
from utils.quality_report import QualityFloor
from utils.readiness import Readiness
from utils.rollout import Rollouts
from utils.scheduler import Scheduler
from utils.security import AuthManager, SecurityState, auth_manager_for, build_security, storage_for
from utils.serving import ModelServer
from utils.shadow import ShadowRunner
from utils.store import Store, store_for
from utils.training import TrainingJobs


@dataclass
class Services:
    """The per-process objects of the service, kept in `app.extensions["quadra"]`."""

    settings: Settings
    store: Store
    registry: ModelVersionManager
    model_server: ModelServer
    batcher: Batcher
    monitor: ModelMonitor
    alerts: AlertManager
    modes: ModelModeManager
    jobs: TrainingJobs
    readiness: Readiness
    security: SecurityState
    scheduler: Scheduler
    shadows: ShadowRunner
    rollouts: Rollouts
    notices: ChangeNotices | None = None
    events: EventPusher | None = None
    started: bool = False

    @property
    def auth(self) -> AuthManager:
        return self.security.auth

    def stop(self) -> None:
        """Stop the background work and write what this process still holds (its monitoring
        records and rate-limit counts): a worker's exit, the end of `python app.py`, a test."""
        if self.events is not None:
            self.events.stop()
        self.scheduler.stop()
        self.model_server.stop()
        self.shadows.stop()
        self.monitor.stop()
        self.security.stop()


def build_services(settings: Settings, redis_outage: Outage) -> Services:
    """Every object of the service for `settings`; `redis_outage` is shared by every path that
    uses Redis in this process."""
    store = store_for(settings)
    artifacts = artifact_store_for(settings.artifact_uri, settings.models_dir, settings.artifact_cache_dir)
    registry = ModelVersionManager(settings.models_dir, store, settings.verify_integrity, artifacts)
    model_server = ModelServer(registry, settings.model_poll_seconds)
    batcher = Batcher(settings.batch_max_rows, settings.batch_max_delay_ms / 1000.0)
    monitor = ModelMonitor(
        settings.monitoring_dir, settings.monitoring_window, settings.drift_threshold, store,
        feature_sample_rate=settings.feature_sample_rate, baseline_min_samples=settings.baseline_min_samples,
        journal=RecordJournal(settings.monitoring_dir / "journal"),
        feedback_policy=FeedbackPolicy.from_settings(settings), quality_floor=QualityFloor.from_settings(settings),
    )
    alerts = AlertManager(store, settings.alert_webhook, settings.alert_webhook_allow_private, settings.alert_cooldown_seconds)
    modes = ModelModeManager(store=store)
    jobs = TrainingJobs(store, settings, settings.max_training_jobs, settings.training_heartbeat_timeout)
    readiness = Readiness(settings, store, registry, model_server, modes)
    security = build_security(settings, store, auth_manager_for(settings, store),
                              storage_for(settings, store, redis_outage))
    notices = ChangeNotices(settings.redis_url, settings.redis_prefix, redis_outage) if settings.redis_url else None
    scheduler = Scheduler(settings.monitoring_flush_seconds)
    shadows = ShadowRunner(store)
    rollouts = Rollouts(store, registry, model_server, monitor, shadows, alerts, modes)
    return Services(settings, store, registry, model_server, batcher, monitor, alerts, modes, jobs, readiness, security,
                    scheduler, shadows, rollouts, notices)
