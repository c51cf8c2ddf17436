"""Quadra: serve a PyTorch model and govern it.

`create_app(settings)` builds the Flask app. The module-level `app` and `socketio` (for
`gunicorn app:app` and `flask --app app`) are built on first use, not on import, so tests and
tools can import this module without touching the default state folder.
`python app.py` runs the development server.
"""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

import torch
from flask import Flask, current_app, request
from flask_socketio import SocketIO
from sqlalchemy.exc import OperationalError

from routes import auth, dashboard, docs, health, modes, monitoring, predict, registry, rollouts, training
from routes.common import register_error_handlers
from utils.cli import register_cli
from utils.config import ConfigError, Settings
from utils.events import EventPusher, detect_async_mode, origin_check
from utils.logs import configure_logging
from utils.maintenance import schedule_background_work
from utils.metrics import init_metrics, shared_state
from utils.security import install_security, redis_outage
from utils.services import Services, build_services
from utils.serving import import_architecture_modules
from utils.training import ensure_initial_version

BLUEPRINTS = (dashboard.bp, health.bp, auth.bp, registry.bp, rollouts.bp, predict.bp, monitoring.bp, modes.bp, training.bp,
              docs.bp)


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
    )
    # Before the security hooks: their ProxyFix (QUADRA_TRUSTED_PROXIES) must wrap the Socket.IO
    # endpoint too, so a socket sees the client's address and the page's forwarded origin as REST does.
    socketio = SocketIO(
        app,
        async_mode=detect_async_mode(),
        cors_allowed_origins=origin_check(settings.cors_origins),
        transports=["websocket"],
    )
    app.extensions["socketio"] = socketio
    services = build_services(settings, redis_outage(app.logger))
    install_security(app, services.security)
    app.extensions["quadra"] = services
    init_metrics(app, lambda: shared_state(services))

    register_error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    services.security.request_limits.exempt(health.bp.name)
    services.security.request_limits.exempt("metrics")
    docs.describe_other_views(app)
    app.before_request(lambda: start_serving(app))
    register_cli(app)

    services.events = EventPusher(socketio, services)
    services.events.register_handlers()
    if services.notices is not None:
        app.after_request(_announce_changes)
    return app


def _announce_changes(response: Any) -> Any:
    """After a successful change, wake every dashboard pusher through Redis pub/sub."""
    if request.method in ("POST", "DELETE") and response.status_code < 400:
        current_app.extensions["quadra"].notices.publish()
    return response


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
    services.security.start()
    schedule_background_work(services)
    if services.events is not None:
        services.events.start()
    if services.settings.auth_enabled and not services.settings.is_production:
        _print_bootstrap_key(services)


def stop_serving(app: Flask) -> None:
    """Stop what `start_serving` started and write what this process still holds (monitoring
    records, rate-limit counts): gunicorn's worker_exit, the end of `python app.py`, tests."""
    services: Services = app.extensions["quadra"]
    if services.started:
        services.stop()
        services.started = False


def freeze_start_up_objects() -> None:
    """For a serving process, once started: move what start-up made (torch, the model, the
    app; about 200k objects) out of the garbage collector's view, so its full passes take
    about 1 ms instead of about 100 ms of a worker's time (a p99 spike)."""
    gc.collect()
    gc.freeze()


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


def _create_or_exit() -> Flask:
    try:
        return create_app()
    except ConfigError as exc:
        print(f"quadra: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OperationalError as exc:
        print(f"quadra: the database (QUADRA_DATABASE_URL) is unreachable after QUADRA_STORE_WAIT_SECONDS: "
              f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}", file=sys.stderr)
        raise SystemExit(3) from None


def __getattr__(name: str) -> Any:
    """PEP 562: build the module-level `app` / `socketio` the first time they are asked for."""
    if name == "app":
        globals()["app"] = application = _create_or_exit()
        return application
    if name == "socketio":
        return __getattr__("app").extensions["socketio"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Exit through SystemExit, so `main` stops serving cleanly (the last monitoring records and
    rate-limit counts are written); Python's default for SIGTERM ends the process at once."""
    raise SystemExit(0)


def main() -> None:
    application = _create_or_exit()
    settings: Settings = application.extensions["quadra"].settings
    start_serving(application)
    freeze_start_up_objects()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    application.logger.info("serving on http://%s:%s", settings.host, settings.port)
    try:
        application.extensions["socketio"].run(
            application,
            host=settings.host,
            port=settings.port,
            debug=settings.debug,
            use_reloader=False,
            allow_unsafe_werkzeug=True,
        )
    finally:
        stop_serving(application)


if __name__ == "__main__":
    main()
