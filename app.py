"""Quadra: serve a PyTorch model and govern it.

`create_app(settings)` builds the Flask app. The module-level `app` and `socketio` (for
`gunicorn app:app` and `flask --app app`) are built on first use, not on import, so tests and
tools can import this module without touching the default state folder.
`python app.py` runs the development server.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import torch
from flask import Flask
from flask_socketio import SocketIO

from routes import auth, dashboard, health, modes, monitoring, predict, registry, training
from routes.common import Services, register_error_handlers
from utils.alerts import AlertManager
from utils.cli import register_cli
from utils.config import ConfigError, Settings
from utils.events import DRIFT_HISTORY, DRIFT_STATE, EventPusher, detect_async_mode
from utils.logs import configure_logging
from utils.metrics import init_metrics
from utils.model_modes import ModelMode, ModelModeManager
from utils.model_monitoring import ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.security import init_auth
from utils.readiness import Readiness
from utils.serving import ModelServer, import_architecture_modules
from utils.store import PRODUCTION, SERVING, get_store
from utils.training import TrainingJobs, ensure_initial_version

BLUEPRINTS = (dashboard.bp, health.bp, auth.bp, registry.bp, predict.bp, monitoring.bp, modes.bp, training.bp)
MONITORING_LEASE = "monitoring-maintenance"
DRIFT_HISTORY_LENGTH = 120
DRIFT_SUMMARY_FIELDS = ("drift_detected", "drift_score", "threshold", "fired", "drifted_features", "evaluated", "reason", "dataset_drift_share")
ROLL_UP_SECONDS = 60.0
JOB_REAP_SECONDS = 5.0


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app for `settings` (default: the environment and `.env`)."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    torch.set_num_threads(settings.torch_threads)
    import_architecture_modules(settings.architecture_modules)

    app = Flask(__name__)
    app.url_map.merge_slashes = False  # "//etc/passwd" is refused as a bad version, not redirected
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        DEBUG=settings.debug,
        JSON_SORT_KEYS=False,
    )
    store = get_store(settings.database_url, wait_seconds=settings.store_wait_seconds)
    model_registry = ModelVersionManager(settings.models_dir, store, settings.verify_integrity)
    model_server = ModelServer(model_registry, settings.model_poll_seconds)
    monitor = ModelMonitor(
        settings.monitoring_dir, settings.monitoring_window, settings.drift_threshold, store,
        settings.feature_sample_rate, settings.monitoring_flush_seconds, settings.baseline_min_samples,
    )
    alerts = AlertManager(store, settings.alert_webhook, settings.alert_webhook_allow_private, settings.alert_cooldown_seconds)
    modes_manager = ModelModeManager(store=store)
    jobs = TrainingJobs(store, settings.database_url, settings.models_dir, settings.verify_integrity,
                        settings.max_training_jobs, settings.training_heartbeat_timeout)
    readiness = Readiness(settings, store, model_registry, model_server, modes_manager)
    security = init_auth(app, settings, store)
    services = Services(settings, store, model_registry, model_server, security.auth, monitor, alerts,
                        modes_manager, jobs, readiness)
    app.extensions["quadra"] = services
    init_metrics(app, lambda: _metrics_state(services))

    register_error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    security.limiter.exempt(health.bp)
    security.limiter.exempt(app.view_functions["metrics"])
    app.before_request(lambda: start_serving(app))
    register_cli(app)

    socketio = SocketIO(
        app,
        async_mode=detect_async_mode(),
        cors_allowed_origins=list(settings.cors_origins) or None,
        transports=["websocket"],
    )
    app.extensions["socketio"] = socketio
    services.events = EventPusher(socketio, services)
    services.events.register_handlers()
    return app


def start_serving(app: Flask) -> None:
    """Load (or on an empty registry, create) the serving model and start watching the store.

    Idempotent; called by `python app.py`, by gunicorn's post_worker_init and, as a fallback
    for other servers, before the first request."""
    services: Services = app.extensions["quadra"]
    if services.started:
        return
    services.started = True
    bootstrap = ensure_initial_version if services.settings.bootstrap_model else None
    services.model_server.start(bootstrap)
    _schedule_monitoring(services)
    services.events.start()
    if services.settings.auth_enabled and not services.settings.is_production:
        _print_bootstrap_key(services)


def _print_bootstrap_key(services: Services) -> None:
    """First start in development with no key at all: print one admin key, once, to stderr
    (never to the log). Production never creates one."""
    api_key = services.auth.create_bootstrap_key()
    if api_key:
        print(
            "\n" + "=" * 72
            + "\nQuadra bootstrap admin key (shown once; only its hash is stored):\n  "
            + api_key
            + "\nMake your own: flask --app app keys create --name NAME --permissions admin\n"
            + "=" * 72 + "\n",
            file=sys.stderr,
            flush=True,
        )


def _schedule_monitoring(services: Services) -> None:
    """Periodic work on each process's monitoring thread. Drift checks and roll-ups run on
    one process of the deployment at a time (a lease in the store); the health check runs
    everywhere, since each process holds its own model."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    settings, monitor, alerts = services.settings, services.monitor, services.alerts

    def check_drift() -> None:
        if not services.store.try_acquire_lease(MONITORING_LEASE, owner, settings.drift_check_seconds * 3):
            return
        result = monitor.detect_drift()
        summary = {key: result[key] for key in DRIFT_SUMMARY_FIELDS}
        summary["features"] = {name: {k: column[k] for k in ("test", "statistic", "p_value", "drift_detected")}
                               for name, column in result["features"].items()}
        summary["checked_at"] = time.time()
        services.store.set_state(DRIFT_STATE, summary)
        history = (services.store.get_state(DRIFT_HISTORY) or [])[-(DRIFT_HISTORY_LENGTH - 1):]
        history.append({"at": summary["checked_at"], "drift_score": result["drift_score"],
                        "drift_detected": result["drift_detected"], "drift_share": result["dataset_drift_share"]})
        services.store.set_state(DRIFT_HISTORY, history)
        if result["evaluated"]:
            message = f"drift detected by {', '.join(result['fired'])}" if result["fired"] else "no drift"
            alerts.observe("drift", result["drift_detected"], message, {k: result[k] for k in ("drift_score", "threshold", "fired", "drifted_features")})

    def roll_up() -> None:
        if services.store.try_acquire_lease(MONITORING_LEASE, owner, settings.drift_check_seconds * 3):
            monitor.roll_up(settings.monitoring_retention_hours * 3600)

    def check_model() -> None:
        if services.model_server.last_error:
            alerts.raise_alert("health", services.model_server.last_error, {"process": owner})

    monitor.every(settings.drift_check_seconds, check_drift)
    monitor.every(ROLL_UP_SECONDS, roll_up)
    monitor.every(settings.drift_check_seconds, check_model)
    monitor.every(settings.monitoring_flush_seconds, services.modes.state)
    monitor.every(JOB_REAP_SECONDS, services.jobs.reap)
    monitor.start()


def _metrics_state(services: Services) -> dict[str, Any]:
    """Shared state for /metrics, read from the store."""
    store = services.store
    totals = store.get_state("prediction_totals") or {"count": 0, "errors": 0}
    drift = store.get_state(DRIFT_STATE) or {}
    versions = store.get_states((PRODUCTION, SERVING))
    window = store.recent_predictions(services.settings.monitoring_window, store.get_state("monitoring_window_start") or 0, ("confidence",))
    confidences = [r["confidence"] for r in window if r["confidence"] is not None]
    return {
        "predictions": totals["count"],
        "errors": totals["errors"],
        "confidence_mean": sum(confidences) / len(confidences) if confidences else None,
        "drift_score": drift.get("drift_score"),
        "drift_detected": 1.0 if drift.get("drift_detected") else 0.0 if drift else None,
        "serving_version": versions.get(SERVING) or versions.get(PRODUCTION),
        "production_version": versions.get(PRODUCTION),
        "mode": services.modes.mode.value,
        "modes": tuple(mode.value for mode in ModelMode),
    }


def _create_or_exit() -> Flask:
    try:
        return create_app()
    except ConfigError as exc:
        print(f"quadra: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    """PEP 562: build the module-level `app` / `socketio` the first time they are asked for."""
    if name == "app":
        globals()["app"] = application = _create_or_exit()
        return application
    if name == "socketio":
        return __getattr__("app").extensions["socketio"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    application = _create_or_exit()
    settings: Settings = application.extensions["quadra"].settings
    start_serving(application)
    application.logger.info("serving on http://%s:%s", settings.host, settings.port)
    application.extensions["socketio"].run(
        application,
        host=settings.host,
        port=settings.port,
        debug=settings.debug,
        use_reloader=False,
        allow_unsafe_werkzeug=True,
    )


if __name__ == "__main__":
    main()
