"""The Socket.IO channel: the async mode, the event names, the allowed origins and the
per-worker pusher.

The app stays free of eventlet-only code: the mode follows whatever the server process has
monkey-patched (gunicorn's eventlet or gevent worker), else plain threads (`python app.py`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable

import redis
from flask_socketio import SocketIO, emit


def detect_async_mode() -> str:
    """"eventlet" or "gevent" when that library has patched the socket module, else "threading"."""
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("socket"):
        return "eventlet"
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    return "threading"


TOPICS = ("mode", "versions", "health", "stats", "drift", "training", "alerts")
PUSH_INTERVAL_SECONDS = 1.0
DRIFT_STATE = "drift_state"
DRIFT_HISTORY = "drift_history"
RECENT_JOBS = 5
RECENT_ALERTS = 20
RESUBSCRIBE_SECONDS = 5.0
log = logging.getLogger("quadra.events")


def _normalized_origin(scheme: str, host: str) -> str:
    """scheme://host in lower case, without the scheme's default port."""
    scheme, host = scheme.lower(), host.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}"


def origin_check(allowed: Iterable[str]) -> Callable[[str | None, dict[str, Any]], bool]:
    """Engine.IO's `cors_allowed_origins`: the listed origins (QUADRA_CORS_ORIGINS) plus the
    request's own origin, scheme://Host, which is not cross-origin. Behind QUADRA_TRUSTED_PROXIES
    the scheme and Host are the forwarded ones: ProxyFix wraps the Socket.IO endpoint too."""
    listed = {origin.rstrip("/").lower() for origin in allowed}

    def check(origin: str | None, environ: dict[str, Any]) -> bool:
        if not origin:
            return True  # not a browser: Engine.IO only asks when an Origin header is present
        origin = origin.rstrip("/").lower()
        if "*" in listed or origin in listed:
            return True
        host = environ.get("HTTP_HOST")
        if not host:
            return False
        scheme, _, rest = origin.partition("://")
        return _normalized_origin(scheme, rest) == _normalized_origin(environ.get("wsgi.url_scheme", "http"), host)

    return check


def change_channel(prefix: str) -> str:
    return f"{prefix}:changes"


def publish_change(redis_url: str, prefix: str) -> None:
    """Tell every pusher that state changed (best effort: pushers poll anyway)."""
    try:
        _publisher(redis_url).publish(change_channel(prefix), "changed")
    except redis.RedisError as exc:
        log.debug("could not publish a change notification: %s", exc)


_publishers: dict[str, redis.Redis] = {}


def _publisher(url: str) -> redis.Redis:
    if url not in _publishers:
        _publishers[url] = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    return _publishers[url]


class EventPusher:
    """This worker's pusher: about once a second it reads what changed in the store and emits
    it to the Socket.IO clients connected to this worker. Request handlers never broadcast,
    so this works the same with one worker, four, or many hosts.

    Events (server to client): "snapshot" (every topic, on connect and on "resync"), then one
    event per topic when it changes: mode, versions, health, stats, drift, training, alerts.
    Clients can send nothing that changes state: the channel has no such handler."""

    def __init__(self, socketio: SocketIO, services: Any, interval: float = PUSH_INTERVAL_SECONDS) -> None:
        self.socketio = socketio
        self.services = services
        self.interval = interval
        self.clients = 0
        self._last: dict[str, Any] = {}
        self._started = False
        self._wake = socketio.server.eio.create_event()

    def register_handlers(self) -> None:
        socketio = self.socketio

        @socketio.on("connect")
        def on_connect(auth: Any = None) -> None:
            self.clients += 1
            emit("snapshot", self.snapshot())

        @socketio.on("disconnect")
        def on_disconnect(*args: Any) -> None:
            self.clients = max(0, self.clients - 1)

        @socketio.on("resync")
        def on_resync(*args: Any) -> None:
            emit("snapshot", self.snapshot())

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.socketio.start_background_task(self._run)
            if self.services.settings.redis_url:
                self.socketio.start_background_task(self._listen_for_changes)

    def wake(self) -> None:
        """Push now instead of at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self.clients:
                continue
            try:
                self.push_changes()
            except Exception:
                log.exception("event pusher could not read the store")

    def _listen_for_changes(self) -> None:
        """Wake on every change published by any worker of any host (polling stays the fallback)."""
        settings = self.services.settings
        while True:
            try:
                pubsub = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(change_channel(settings.redis_prefix))
                for _ in pubsub.listen():
                    self.wake()
            except redis.RedisError as exc:
                log.warning("change notifications unavailable (%s); polling every %.1fs", exc, self.interval)
                self.socketio.sleep(RESUBSCRIBE_SECONDS)

    def push_changes(self) -> list[str]:
        """Emit every topic whose payload changed since the last push; returns their names."""
        changed = []
        for topic in TOPICS:
            payload = self.read(topic)
            if payload != self._last.get(topic):
                self._last[topic] = payload
                self.socketio.emit(topic, payload)
                changed.append(topic)
        return changed

    def snapshot(self) -> dict[str, Any]:
        return {topic: self.read(topic) for topic in TOPICS}

    def read(self, topic: str) -> Any:
        svc = self.services
        if topic == "mode":
            return {**svc.modes.state(), "serves_predictions": svc.modes.serves_predictions(), "allows_training": svc.modes.allows_training()}
        if topic == "versions":
            served = svc.model_server.current
            return {"serving_version": svc.registry.get_serving_version(), "production_version": svc.registry.get_production_version(),
                    "current_version": served.version if served else None}
        if topic == "health":
            report = svc.readiness.report()
            report.pop("timestamp", None)
            return report
        if topic == "stats":
            return svc.monitor.get_statistics()
        if topic == "drift":
            return {**(svc.store.get_state(DRIFT_STATE) or {"evaluated": False, "drift_detected": False}),
                    "threshold": svc.settings.drift_threshold, "history": svc.store.get_state(DRIFT_HISTORY) or []}
        if topic == "training":
            return {"jobs": svc.jobs.list(RECENT_JOBS)}
        if topic == "alerts":
            return {"alerts": svc.alerts.recent(RECENT_ALERTS)}
        raise ValueError(f"unknown topic {topic}")
