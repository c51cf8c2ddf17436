"""The Socket.IO channel: the async mode, the event names, who may receive which topic, the
allowed origins and the per-worker pusher.

The app stays free of eventlet-only code: the mode follows whatever the server process has
monkey-patched (gunicorn's eventlet or gevent worker), else plain threads (`python app.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from flask import current_app, request
from flask_socketio import ConnectionRefusedError, SocketIO, emit, join_room

from utils.errors import TooManyRequests
from utils.metrics import resource_summary
from utils.rollout import rollout_view
from utils.security import AUTH_DISABLED_PRINCIPAL, PERMISSIONS, Principal
from utils.timestamps import iso_utc

if TYPE_CHECKING:  # utils.services builds an EventPusher, so it is imported for types only
    from utils.services import Services


def detect_async_mode() -> str:
    """"eventlet" or "gevent" when that library has patched the socket module, else "threading"."""
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("socket"):
        return "eventlet"
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    return "threading"


TOPICS = ("mode", "versions", "health", "stats", "drift", "training", "alerts", "rollout", "quality", "resources")
# The permission each topic needs: that of the REST endpoint showing the same data (None: public).
TOPIC_PERMISSIONS: dict[str, str | None] = {
    "mode": None,        # GET /api/mode
    "versions": None,    # GET /api/health/detailed: current_version, production_version, and the serving
                         # version as checks.serving_model.expected_version (the version list is read)
    "health": None,      # GET /api/health/detailed
    "stats": None,       # GET /api/monitoring/stats
    "drift": None,       # GET /api/monitoring/drift
    "training": "read",  # GET /api/train
    "alerts": None,      # GET /api/monitoring/alerts
    "rollout": "read",   # GET /api/model/canary
    "quality": "read",   # GET /api/monitoring/quality
    "resources": None,   # GET /metrics
}
PUBLIC_ROOM = "public"
CREDENTIAL_FIELDS = ("apiKey", "token")  # in the Socket.IO `auth` payload; a query string is never read
PUSH_INTERVAL_SECONDS = 1.0
RECENT_JOBS = 5
RECENT_ALERTS = 20
FREE_DISK_STEP = 1024 * 1024  # health is pushed when free disk space moves by a MiB, not by a byte
log = logging.getLogger("quadra.events")


def room_for(permission: str | None) -> str:
    """The room of the sockets allowed `permission` (one room per level; None: every socket)."""
    return PUBLIC_ROOM if permission is None else f"permission:{permission}"


def _allows(principal: Principal | None, permission: str | None) -> bool:
    return permission is None or (principal is not None and principal.allows(permission))


@dataclass
class Subscriber:
    """One socket on this worker: the credential it presented (kept to re-check it) and whom it
    belongs to; both None for an anonymous socket."""

    credential: tuple[str, str] | None = None
    principal: Principal | None = None

    @property
    def rooms(self) -> set[str]:
        return {PUBLIC_ROOM} | {room_for(p) for p in PERMISSIONS if _allows(self.principal, p)}

    @property
    def topics(self) -> list[str]:
        return [topic for topic in TOPICS if _allows(self.principal, TOPIC_PERMISSIONS[topic])]


def read_credential(auth: Any) -> tuple[str, str] | None:
    """("apiKey" or "token", value) from a Socket.IO `auth` payload; None when it carries none."""
    if auth is None:
        return None
    if not isinstance(auth, dict):
        raise ConnectionRefusedError('the Socket.IO auth payload must be an object such as {"apiKey": "qk_..."}',
                                     {"code": "invalid_auth"})
    for field in CREDENTIAL_FIELDS:
        value = auth.get(field)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConnectionRefusedError(f"'{field}' in the Socket.IO auth payload must be a string", {"code": "invalid_auth"})
        return field, value.strip()
    return None


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


class EventPusher:
    """This worker's pusher: about once a second it reads what changed in the store and emits
    it to the Socket.IO clients connected to this worker. Request handlers never broadcast,
    so this works the same with one worker, four, or many hosts.

    Events (server to client): "snapshot" (the topics the socket may receive, on connect and on
    "resync"), then one event per topic when it changes: mode, versions, health, stats, drift,
    training, alerts, each only to the sockets holding its permission (TOPIC_PERMISSIONS), and
    "access" when a socket's credential stops being valid (revoked key, expired key or token).
    A socket authenticates with {"apiKey": ...} or {"token": ...} in the Socket.IO `auth`
    payload; without one it is anonymous, with an invalid one it is refused. Clients can send
    nothing that changes state: the channel has no such handler."""

    def __init__(self, socketio: SocketIO, services: Services, interval: float = PUSH_INTERVAL_SECONDS) -> None:
        self.socketio = socketio
        self.services = services
        self.interval = interval
        self.subscribers: dict[str, Subscriber] = {}
        self._last: dict[str, Any] = {}
        self._checked_at = 0.0
        self._started = False
        self._stopped = False
        self._wake = socketio.server.eio.create_event()

    @property
    def clients(self) -> int:
        return len(self.subscribers)

    def register_handlers(self) -> None:
        socketio = self.socketio

        @socketio.on("connect")
        def on_connect(auth: Any = None) -> None:
            subscriber = self.admit(auth)
            self.subscribers[_socket_id()] = subscriber
            for room in subscriber.rooms:
                join_room(room)
            emit("snapshot", self.snapshot(subscriber.topics))

        @socketio.on("disconnect")
        def on_disconnect(*args: Any) -> None:
            self.subscribers.pop(_socket_id(), None)

        @socketio.on("resync")
        def on_resync(*args: Any) -> None:
            subscriber = self.subscribers.get(_socket_id()) or Subscriber()
            emit("snapshot", self.snapshot(subscriber.topics))

    def admit(self, auth: Any) -> Subscriber:
        """Whom a connecting socket belongs to; refuses it (ConnectionRefusedError, with the
        reason) for invalid credentials, counted like a failed REST authentication."""
        if not self.services.auth.enabled:
            return Subscriber(None, AUTH_DISABLED_PRINCIPAL)
        credential = read_credential(auth)
        if credential is None:
            return Subscriber()
        principal = self._authenticate(credential)
        if principal is None:
            try:
                current_app.extensions["quadra_security"].on_auth_failure(presented=True)
            except TooManyRequests as exc:  # too many failures from this address
                raise ConnectionRefusedError(exc.message, {"code": exc.code}) from None
            what = "API key" if credential[0] == "apiKey" else "token"
            raise ConnectionRefusedError(f"the {what} in the Socket.IO auth payload is not valid (unknown, revoked or expired)",
                                         {"code": "unauthorized"})
        return Subscriber(credential, principal)

    def _authenticate(self, credential: tuple[str, str]) -> Principal | None:
        kind, value = credential
        auth = self.services.auth
        return auth.authenticate_key(value) if kind == "apiKey" else auth.authenticate_token(value)

    def recheck_credentials(self) -> list[str]:
        """Re-authenticate every socket that presented a credential (through the auth cache, so
        at most one store read per key and QUADRA_AUTH_CACHE_SECONDS); one no longer valid leaves
        the protected rooms and is told with an "access" event. Returns the sids that changed."""
        changed = []
        results: dict[tuple[str, str], Principal | None] = {}
        for sid, subscriber in list(self.subscribers.items()):
            credential = subscriber.credential
            if credential is None:
                continue
            if credential not in results:
                results[credential] = self._authenticate(credential)
            if self._update_access(sid, subscriber, results[credential]):
                changed.append(sid)
        return changed

    def _update_access(self, sid: str, subscriber: Subscriber, principal: Principal | None) -> bool:
        old_rooms, old_topics = subscriber.rooms, subscriber.topics
        subscriber.principal = principal
        if principal is None:
            subscriber.credential = None  # from now on an anonymous socket
        server = self.socketio.server
        for room in old_rooms - subscriber.rooms:
            server.leave_room(sid, room, namespace="/")
        for room in subscriber.rooms - old_rooms:
            try:
                server.enter_room(sid, room, namespace="/")
            except (KeyError, ValueError):  # disconnected meanwhile
                pass
        if subscriber.topics == old_topics:
            return False
        reason = ("the credential is no longer valid (the key was revoked or has expired, or the token has expired)"
                  if principal is None else "the credential's permissions changed")
        self.socketio.emit("access", {"permissions": list(principal.permissions) if principal else [],
                                      "topics": subscriber.topics, "reason": reason}, to=sid)
        return True

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.socketio.start_background_task(self._run)
            if self.services.notices is not None:
                self.socketio.start_background_task(self.services.notices.listen, self.wake, self.socketio.sleep)

    def stop(self) -> None:
        """End the pusher's loop (and the change-notice listener) at its next tick."""
        self._stopped = True
        if self.services.notices is not None:
            self.services.notices.stop()
        self.wake()

    def wake(self) -> None:
        """Push now instead of at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped or not self.clients:
                continue
            try:
                self.push_changes()
            except Exception:
                log.exception("event pusher could not read the store")
            if time.monotonic() - self._checked_at >= self.interval:  # wake-ups can come much more often
                self._checked_at = time.monotonic()
                try:
                    self.recheck_credentials()
                except Exception:
                    log.exception("event pusher could not re-check the sockets' credentials")

    def push_changes(self) -> list[str]:
        """Emit every topic whose payload changed since the last push; returns their names."""
        changed = []
        for topic in TOPICS:
            payload = self.read(topic)
            if payload != self._last.get(topic):
                self._last[topic] = payload
                self.socketio.emit(topic, payload, to=room_for(TOPIC_PERMISSIONS[topic]))
                changed.append(topic)
        return changed

    def snapshot(self, topics: Iterable[str] = TOPICS) -> dict[str, Any]:
        return {topic: self.read(topic) for topic in topics}

    def read(self, topic: str) -> Any:
        svc = self.services
        if topic == "mode":
            modes = svc.modes
            return {**modes.state(), "serves_predictions": modes.serves_predictions(), "allows_training": modes.allows_training()}
        if topic == "versions":
            served = svc.model_server.current
            deployment = svc.store.versions.deployment()
            return {"serving_version": deployment.serving, "production_version": deployment.production,
                    "current_version": served.version if served else None}
        if topic == "health":
            report = svc.readiness.report()
            report.pop("timestamp", None)
            disk = report["checks"]["disk_space"]
            disk["free_bytes"] -= disk["free_bytes"] % FREE_DISK_STEP  # any file write moves it by bytes
            return report
        if topic == "stats":
            return svc.monitor.get_statistics()
        if topic == "drift":
            check = svc.store.drift_checks.latest()
            state = asdict(check) if check else {"evaluated": False, "drift_detected": False, "checked_at": None}
            history = [{**asdict(entry), "at": iso_utc(entry.at)} for entry in svc.store.drift_checks.history()]
            return {**state, "checked_at": iso_utc(state["checked_at"]), "threshold": svc.settings.drift_threshold,
                    "history": history}
        if topic == "training":
            return {"jobs": svc.jobs.list(RECENT_JOBS)}
        if topic == "alerts":
            return {"alerts": svc.alerts.recent(RECENT_ALERTS)}
        if topic == "rollout":  # as of its last check (`Rollouts.decide`), so a push costs one read
            row = svc.store.rollouts.latest()
            return {"rollout": rollout_view(row, row.comparison, svc.rollouts.paused) if row else None}
        if topic == "resources":
            return resource_summary(svc.store, svc.settings.state_dir, svc.batcher.summary())
        if topic == "quality":  # as of the last quality check (`observe_quality`), so a push costs one read
            return {"quality": svc.store.outcomes.latest_report()}
        raise ValueError(f"unknown topic {topic}")


def _socket_id() -> str:
    """The Socket.IO session id Flask-SocketIO puts on the request of an event handler."""
    return str(request.sid)  # type: ignore[attr-defined]
