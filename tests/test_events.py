"""The Socket.IO channel: snapshots, change events from the per-worker pusher, security."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import socketio

from tests.conftest import GUNICORN_COMMAND, make_settings
from utils.events import TOPICS


def test_snapshot_on_connect_and_resync(app) -> None:
    client = app.extensions["socketio"].test_client(app)
    received = client.get_received()
    assert [m["name"] for m in received] == ["snapshot"]
    snapshot = received[0]["args"][0]
    assert set(snapshot) == set(TOPICS)
    assert snapshot["mode"]["mode"] == "inference" and snapshot["versions"]["production_version"] == "1.0.0"
    assert snapshot["health"]["ready"] and "total_predictions" in snapshot["stats"]
    client.emit("resync")
    assert [m["name"] for m in client.get_received()] == ["snapshot"]
    client.disconnect()


def test_pusher_emits_only_what_changed(app, client) -> None:
    pusher = app.extensions["quadra"].events
    sio_client = app.extensions["socketio"].test_client(app)
    pusher.push_changes()
    sio_client.get_received()
    assert set(pusher.push_changes()) <= {"stats"}  # only the timestamped statistics move
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


@pytest.mark.e2e
def test_twenty_clients_on_four_workers_all_see_a_mode_change(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    listeners = [Listener(server.url) for _ in range(20)]
    try:
        assert all(listener.connected.wait(10) for listener in listeners)
        assert server.post("/api/mode/maintenance", json={"reason": "broadcast test"}).status_code == 200
        deadline = time.monotonic() + 5
        while not all("maintenance" in listener.modes for listener in listeners):
            assert time.monotonic() < deadline, [listener.modes for listener in listeners]
            time.sleep(0.1)
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
    import requests

    server = start_server(state_dir)
    response = requests.get(f"{server.url}/socket.io/?EIO=4&transport=polling", timeout=10)
    assert response.status_code == 400
