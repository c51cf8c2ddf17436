"""The Socket.IO channel: snapshots, change events from the per-worker pusher, security."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio

from tests.conftest import GUNICORN_COMMAND, make_settings
from utils.events import TOPICS

PROTECTED_TOPICS = {"training", "rollout", "quality"}  # /api/train, /api/model/canary, /api/monitoring/quality need read
PUBLIC_TOPICS = set(TOPICS) - PROTECTED_TOPICS


def test_snapshot_on_connect_and_resync(app, api_keys: dict[str, str]) -> None:
    client = app.extensions["socketio"].test_client(app, auth={"apiKey": api_keys["read"]})
    received = client.get_received()
    assert [m["name"] for m in received] == ["snapshot"]
    snapshot = received[0]["args"][0]
    assert set(snapshot) == set(TOPICS)
    assert snapshot["mode"]["mode"] == "inference" and snapshot["versions"]["production_version"] == "1.0.0"
    assert snapshot["health"]["ready"] and "total_predictions" in snapshot["stats"]
    client.emit("resync")
    assert [m["name"] for m in client.get_received()] == ["snapshot"]
    client.disconnect()


def test_an_anonymous_snapshot_holds_only_the_public_topics(app, anonymous) -> None:
    client = app.extensions["socketio"].test_client(app)
    snapshot = client.get_received()[0]["args"][0]
    assert set(snapshot) == PUBLIC_TOPICS
    assert anonymous.get("/api/train").status_code == 401
    client.emit("resync")
    assert set(client.get_received()[0]["args"][0]) == PUBLIC_TOPICS
    client.disconnect()


def test_the_versions_topic_holds_only_what_public_readiness_shows(app, anonymous) -> None:
    """`versions` is public: its three fields are in the anonymous GET /api/health/detailed."""
    versions = app.extensions["quadra"].events.read("versions")
    readiness = anonymous.get("/api/health/detailed").get_json()
    assert versions == {"serving_version": readiness["checks"]["serving_model"]["expected_version"],
                        "production_version": readiness["production_version"],
                        "current_version": readiness["current_version"]}


def test_with_authentication_disabled_everyone_gets_every_topic(state_dir: Path) -> None:
    from app import create_app, start_serving

    application = create_app(make_settings(state_dir, auth_enabled=False))
    start_serving(application)
    client = application.extensions["socketio"].test_client(application, auth={"apiKey": "qk_" + "unknown"})
    assert set(client.get_received()[0]["args"][0]) == set(TOPICS)
    client.disconnect()
    application.extensions["quadra"].store.database.dispose()


def test_sockets_of_a_revoked_key_lose_the_protected_topics(app) -> None:
    """The pusher's re-check (run every second) moves them to the public topics and says so."""
    auth, pusher = app.extensions["quadra"].auth, app.extensions["quadra"].events
    api_key, record = auth.create_api_key("soon-revoked", ["read"])
    token = auth.issue_token_for(auth.authenticate_key(api_key), None, 3600)["access_token"]
    clients = [app.extensions["socketio"].test_client(app, auth=credential)
               for credential in ({"apiKey": api_key}, {"token": token})]
    assert [set(c.get_received()[0]["args"][0]) for c in clients] == [set(TOPICS)] * 2
    assert pusher.recheck_credentials() == []
    auth.revoke_api_key(record["id"])
    assert len(pusher.recheck_credentials()) == 2
    for client in clients:
        [access] = [m["args"][0] for m in client.get_received() if m["name"] == "access"]
        assert access["permissions"] == [] and set(access["topics"]) == PUBLIC_TOPICS and "revoked" in access["reason"]
        client.emit("resync")
        assert set(client.get_received()[0]["args"][0]) == PUBLIC_TOPICS
    assert pusher.recheck_credentials() == []  # told once
    for client in clients:
        client.disconnect()
    assert pusher.clients == 0


def test_pusher_emits_only_what_changed(app, client) -> None:
    pusher = app.extensions["quadra"].events
    sio_client = app.extensions["socketio"].test_client(app)
    pusher.push_changes()
    sio_client.get_received()
    assert set(pusher.push_changes()) <= {"stats"}  # only the timestamped statistics move
    assert pusher.read("health")["checks"]["disk_space"]["free_bytes"] % (1024 * 1024) == 0  # not every write
    client.post("/api/mode/maintenance", json={"reason": "pusher test"})
    changed = pusher.push_changes()
    assert "mode" in changed and "alerts" in changed
    events = {m["name"]: m["args"][0] for m in sio_client.get_received()}
    assert events["mode"]["mode"] == "maintenance" and events["mode"]["reason"] == "pusher test"
    sio_client.disconnect()


def test_events_carry_no_secrets(app, client, api_keys) -> None:
    client.post("/api/auth/keys", json={"name": "secret-holder", "permissions": ["read"]})
    snapshot = app.extensions["quadra"].events.snapshot()
    text = str(snapshot)
    assert not any(key in text for key in api_keys.values())
    assert app.extensions["quadra"].auth.secret_key not in text and "key_hash" not in text
    assert str(app.extensions["quadra"].settings.state_dir) not in text


def test_clients_cannot_change_state_over_the_socket(app) -> None:
    sio_client = app.extensions["socketio"].test_client(app)
    for event, payload in (("set_mode", {"mode": "maintenance"}), ("promote", "1.0.0"), ("message", "rollback")):
        sio_client.emit(event, payload)
    assert app.extensions["quadra"].modes.mode.value == "inference"
    assert app.extensions["quadra"].registry.get_production_version() == "1.0.0"
    sio_client.disconnect()


class Listener:
    """A python-socketio client (WebSocket only) recording the modes it is told about."""

    def __init__(self, url: str) -> None:
        self.modes: list[str] = []
        self.connected = threading.Event()
        self.client = socketio.Client(reconnection=False)
        self.client.on("snapshot", lambda data: (self.modes.append(data["mode"]["mode"]), self.connected.set()))
        self.client.on("mode", lambda data: self.modes.append(data["mode"]))
        self.client.connect(url, transports=["websocket"], wait_timeout=10)


def all_see_maintenance(server, listeners: list[Listener], reason: str) -> None:
    """Every listener connects, the mode goes to maintenance, and each is told within 5 s."""
    assert all(listener.connected.wait(10) for listener in listeners)
    assert server.post("/api/mode/maintenance", json={"reason": reason}).status_code == 200
    deadline = time.monotonic() + 5
    while not all("maintenance" in listener.modes for listener in listeners):
        assert time.monotonic() < deadline, [listener.modes for listener in listeners]
        time.sleep(0.1)


@pytest.mark.e2e
def test_the_service_and_its_dashboard_socket_run_under_the_gevent_worker(start_server, state_dir: Path) -> None:
    """gunicorn 26 has no eventlet worker: the service runs on gevent, which it still ships."""
    command = [GUNICORN_COMMAND[0], "-w", "2", "-b", "127.0.0.1:{port}", "-k", "gevent", "app:app"]
    server = start_server(state_dir, command=command)
    listeners = [Listener(server.url) for _ in range(4)]
    try:
        answers = [server.post("/api/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2]] * batch}) for batch in (1, 32)]
        assert [len(answer.json()["predictions"]) for answer in answers] == [1, 32]
        all_see_maintenance(server, listeners, "gevent")
    finally:
        for listener in listeners:
            listener.client.disconnect()
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.e2e
def test_twenty_clients_on_four_workers_all_see_a_mode_change(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    listeners = [Listener(server.url) for _ in range(20)]
    try:
        all_see_maintenance(server, listeners, "broadcast test")
    finally:
        for listener in listeners:
            listener.client.disconnect()


def test_the_origin_check_accepts_the_listed_origins_and_the_requests_own() -> None:
    from utils.events import origin_check

    check = origin_check(("https://ops.example.com",))
    own = {"wsgi.url_scheme": "https", "HTTP_HOST": "Models.example.com:443"}
    assert check("https://ops.example.com", own) and check("https://models.example.com", own)
    assert not check("http://models.example.com", own)  # another scheme is another origin
    assert not check("https://evil.example.com", own) and not check("null", own)
    assert not check("https://models.example.com", {"wsgi.url_scheme": "https"})  # no Host to compare with
    assert check(None, own)  # no Origin header: not a browser, nothing to check
    assert origin_check(("*",))("https://anyone.example.com", own)


def websocket_handshake(url: str, origin: str, headers: dict[str, str] | None = None) -> bool:
    """Open the Engine.IO WebSocket with a given Origin; True when the server accepts it."""
    import websocket

    try:
        connection = websocket.create_connection(
            url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket", origin=origin, timeout=10,
            header=[f"{name}: {value}" for name, value in (headers or {}).items()])
    except websocket.WebSocketBadStatusException:
        return False
    accepted = connection.recv().startswith("0")  # Engine.IO "open" packet
    connection.close()
    return accepted


@pytest.mark.e2e
def test_socket_honours_the_cors_origins(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, {"QUADRA_CORS_ORIGINS": "https://ops.example.com"})
    assert websocket_handshake(server.url, "https://ops.example.com")
    assert websocket_handshake(server.url, server.url)  # the page's own origin, though not listed
    assert not websocket_handshake(server.url, "https://evil.example.com")
    default = start_server(state_dir)
    assert websocket_handshake(default.url, default.url)
    assert not websocket_handshake(default.url, "https://evil.example.com")


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "models.example.com"}


@pytest.mark.e2e
def test_the_own_origin_behind_a_proxy_counts_only_with_trusted_proxies(start_server, state_dir: Path) -> None:
    listed = {"QUADRA_CORS_ORIGINS": "https://ops.example.com"}
    proxied = start_server(state_dir, {**listed, "QUADRA_TRUSTED_PROXIES": "1"})
    assert websocket_handshake(proxied.url, "https://models.example.com", FORWARDED)
    assert not websocket_handshake(proxied.url, "https://models.example.com")
    assert not websocket_handshake(proxied.url, "https://evil.example.com", FORWARDED)
    direct = start_server(state_dir, listed)  # no proxy trusted: forwarded headers are anyone's to invent
    assert not websocket_handshake(direct.url, "https://models.example.com", FORWARDED)
    assert websocket_handshake(direct.url, direct.url, FORWARDED)  # its own Host still counts


@pytest.mark.e2e
def test_long_polling_is_refused(start_server, state_dir: Path) -> None:
    server = start_server(state_dir)
    response = requests.get(f"{server.url}/socket.io/?EIO=4&transport=polling", timeout=10)
    assert response.status_code == 400


class Channel:
    """A python-socketio client (WebSocket only) recording every event it receives, in order;
    a refused connection leaves the server's reason in `refused`."""

    def __init__(self, url: str, auth: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.refused: Any = None
        self.client = socketio.Client(reconnection=False)
        for name in ("snapshot", "access", *TOPICS):
            self.client.on(name, self._recorder(name))
        self.client.on("connect_error", lambda data: setattr(self, "refused", data))
        try:
            self.client.connect(url, transports=["websocket"], auth=auth, wait_timeout=10)
        except socketio.exceptions.ConnectionError:
            assert self.refused is not None, "the connection failed without the server refusing it"

    def _recorder(self, name: str) -> Callable[[Any], None]:
        return lambda data: self.events.append((name, data))

    def received(self, name: str) -> list[Any]:
        return [data for event, data in list(self.events) if event == name]

    def snapshot_topics(self, index: int = 0) -> set[str]:
        return set(self.received("snapshot")[index])

    def close(self) -> None:
        if self.client.connected:
            self.client.disconnect()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds (a generous timeout: the machine is shared; no threshold is tested)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_training_job(server) -> str:
    """Start a short job in training mode, wait for it to succeed, return its id."""
    assert server.post("/api/mode/training", json={"reason": "socket permission test"}).status_code == 200
    response = server.post("/api/train", json={"epochs": 3})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_for(lambda: server.get(f"/api/train/{job_id}").json()["status"] == "succeeded", f"job {job_id}", 180)
    return job_id


def settle(server, channels: list[Channel]) -> None:
    """Two mode switches every channel sees: a worker's pusher emits its topics in order, so once
    a channel has the second one it has everything its worker emitted before (such as a job's end)."""
    for mode in ("inference", "maintenance"):
        assert server.post(f"/api/mode/{mode}", json={"reason": "settle"}).status_code == 200
    wait_for(lambda: all(any(m["mode"] == "maintenance" for m in c.received("mode")) for c in channels),
             "every channel to see the maintenance mode")


@pytest.mark.e2e
def test_each_topic_follows_its_rest_permission_on_four_workers(start_server, state_dir: Path,
                                                               api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    read_key = api_keys["read"]
    token = server.post("/api/auth/token", json={"permissions": ["read"]}, headers={"X-API-Key": read_key}).json()
    query = f"?apiKey={read_key}&api_key={read_key}&token={token['access_token']}"
    anonymous = [Channel(server.url) for _ in range(4)] + [Channel(server.url + query) for _ in range(4)]
    readers = [Channel(server.url, {"apiKey": read_key}) for _ in range(4)] + [Channel(server.url, {"token": token["access_token"]})]
    channels = anonymous + readers
    try:
        wait_for(lambda: all(c.received("snapshot") for c in channels), "every snapshot", 30)
        assert [c.snapshot_topics() for c in anonymous] == [PUBLIC_TOPICS] * len(anonymous)  # a key in the query: nothing more
        assert [c.snapshot_topics() for c in readers] == [set(TOPICS)] * len(readers)
        assert requests.get(f"{server.url}/api/train", timeout=30).status_code == 401  # what anonymous REST gets

        job_id = run_training_job(server)
        wait_for(lambda: all(any(j["id"] == job_id and j["status"] == "succeeded" for t in c.received("training") for j in t["jobs"])
                             for c in readers), "every reader to see the job succeed")
        settle(server, channels)
        for channel in anonymous:
            assert channel.received("training") == [] and channel.received("access") == []
            assert job_id not in json.dumps(channel.events)
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.e2e
def test_bad_credentials_are_refused_and_a_revoked_key_loses_the_protected_topics(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    bad_key = Channel(server.url, {"apiKey": "qk_" + "not_a_key_of_this_deployment"})
    bad_token = Channel(server.url, {"token": "not.a.token"})
    assert not bad_key.client.connected and "not valid" in bad_key.refused["message"]
    assert not bad_token.client.connected and "not valid" in bad_token.refused["message"]
    failures = server.get("/api/audit", params={"action": "auth.failure"}).json()["entries"]
    socket_failures = [entry for entry in failures if entry["target"] == "/socket.io/"]
    assert len(socket_failures) == 2  # counted like REST failures
    assert all(entry["details"]["credentials"] == "presented" for entry in socket_failures)

    created = server.post("/api/auth/keys", json={"name": "watcher", "permissions": ["read"]}).json()
    watchers = [Channel(server.url, {"apiKey": created["api_key"]}) for _ in range(4)]
    token = server.post("/api/auth/token", json={"expires_in": 20}).json()["access_token"]  # the admin key's, kept
    expiring = Channel(server.url, {"token": token})
    dropped = watchers + [expiring]
    try:
        wait_for(lambda: all(c.received("snapshot") for c in dropped), "every snapshot", 30)
        assert [c.snapshot_topics() for c in dropped] == [set(TOPICS)] * len(dropped)
        assert server.delete(f"/api/auth/keys/{created['id']}").status_code == 200
        wait_for(lambda: all(c.received("access") for c in dropped), "every socket to be told it lost access")
        for channel in dropped:
            assert channel.received("access") == [{"permissions": [], "topics": [t for t in TOPICS if t in PUBLIC_TOPICS],
                                                   "reason": channel.received("access")[0]["reason"]}]
            channel.client.emit("resync")
        wait_for(lambda: all(len(c.received("snapshot")) == 2 for c in dropped), "the resynced snapshots", 30)
        assert [c.snapshot_topics(1) for c in dropped] == [PUBLIC_TOPICS] * len(dropped)

        trainings_before = [len(c.received("training")) for c in dropped]
        job_id = run_training_job(server)
        settle(server, dropped)
        assert [len(c.received("training")) for c in dropped] == trainings_before
        assert all(job_id not in json.dumps(c.events) for c in dropped)
    finally:
        for channel in (bad_key, bad_token, *dropped):
            channel.close()
