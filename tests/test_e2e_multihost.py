"""Several hosts: independent gunicorn servers sharing PostgreSQL, Redis and a SeaweedFS S3
server, with no sticky routing. Each "host" has its own state folder (its own local files,
journal and artifact cache); everything shared goes through the backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import socketio

from utils.security import AuthManager
from utils.store import Store
from utils.training import load_dataset

pytestmark = pytest.mark.e2e
IRIS = load_dataset().features.tolist()
TWO_WORKERS = [str(Path(sys.executable).parent / "gunicorn"), "-w", "2", "-b", "127.0.0.1:{port}", "--worker-class", "eventlet", "app:app"]


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


class Cluster:
    def __init__(self, start_server, root: Path, env: dict[str, str], admin_key: str) -> None:
        self.start_server, self.root, self.env, self.admin_key = start_server, root, env, admin_key
        self.hosts = [self.start_host(i) for i in range(2)]

    def start_host(self, index: int):
        host = self.start_server(self.root / f"host-{index}", self.env, TWO_WORKERS)
        host.session.headers["X-API-Key"] = self.admin_key
        return host

    def predict(self, host, key: str | None = None) -> requests.Response:
        headers = {"X-API-Key": key} if key else {}
        return host.post("/api/predict", json={"inputs": IRIS[:1]}, headers=headers)


@pytest.fixture
def cluster(start_server, tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str, s3_server: dict, s3_uri: str) -> Cluster:
    secret = f"multi-host-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    store = Store(postgres_url)
    admin_key, _ = AuthManager(secret, store=store).create_api_key("cluster-admin", ["admin"])
    store.database.dispose()
    env = {
        "QUADRA_DATABASE_URL": postgres_url, "QUADRA_REDIS_URL": redis_url, "QUADRA_REDIS_PREFIX": redis_prefix,
        "QUADRA_ARTIFACT_URI": s3_uri, "QUADRA_SECRET_KEY": secret, "AWS_ENDPOINT_URL": s3_server["endpoint"],
        "AWS_ACCESS_KEY_ID": s3_server["access_key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret_key"],
    }
    return Cluster(start_server, tmp_path, env, admin_key)


def test_hosts_share_versions_modes_limits_and_events(cluster: Cluster) -> None:
    a, b = cluster.hosts
    assert cluster.predict(a).json()["model_version"] == cluster.predict(b).json()["model_version"] == "1.0.0"

    assert a.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    assert a.post("/api/model/promote/1.1.0").status_code == 200
    wait_for(lambda: all(cluster.predict(b).json()["model_version"] == "1.1.0" for _ in range(6)))
    assert b.get("/api/health/detailed").json()["checks"]["serving_model"]["hash_verified"]

    limited = a.post("/api/auth/keys", json={"name": "tier", "permissions": ["read"], "rate_limit": "20 per hour"}).json()["api_key"]
    codes = [cluster.predict(host, limited).status_code for _ in range(20) for host in (a, b)]
    assert codes.count(200) == 20 and codes.count(429) == 20

    modes: list[str] = []
    listener = socketio.Client(reconnection=False)
    listener.on("mode", lambda data: modes.append(data["mode"]))
    listener.connect(b.url, transports=["websocket"], wait_timeout=10)
    try:
        assert a.post("/api/mode/maintenance", json={"reason": "multi-host"}).status_code == 200
        wait_for(lambda: cluster.predict(b).status_code == 503, timeout=5)
        wait_for(lambda: "maintenance" in modes, timeout=5)
    finally:
        listener.disconnect()
    assert b.post("/api/mode/inference").status_code == 200
    wait_for(lambda: cluster.predict(a).status_code == 200, timeout=5)


def test_killing_a_host_loses_no_acknowledged_prediction(cluster: Cluster) -> None:
    a, b = cluster.hosts
    acknowledged = 0
    for host in (a, b) * 60:
        acknowledged += cluster.predict(host).status_code == 200
    assert acknowledged == 120
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(a.process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(a.process.pid, signal.SIGKILL)
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    a.process.wait(timeout=30)
    restarted = cluster.start_host(0)  # same state folder: replays the killed workers' journals
    wait_for(lambda: restarted.get("/api/monitoring/stats").json()["total_predictions"] >= 120, timeout=30)
    assert b.get("/api/monitoring/stats").json()["total_predictions"] == 120


def test_an_s3_outage_degrades_and_recovers(cluster: Cluster, s3_server: dict) -> None:
    a, _ = cluster.hosts
    s3_server["process"].terminate()
    s3_server["process"].wait(timeout=30)
    try:
        assert cluster.predict(a).status_code == 200  # the model in memory keeps serving
        wait_for(lambda: a.get("/api/health/detailed").status_code == 503, timeout=10)
        assert a.get("/api/health/detailed").json()["checks"]["artifact_store"] is False
        refused = a.post("/api/model/save", json={"version": "3.0.0"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "artifact_store_unavailable"
        assert "3.0.0" not in [v["version"] for v in a.get("/api/model/versions").json()["versions"]]
    finally:
        log = open(Path(s3_server["command"][2].split("=", 1)[1]) / "weed-restart.log", "wb")
        s3_server["process"] = subprocess.Popen(s3_server["command"], env=s3_server["env"], stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: a.get("/api/health/detailed").status_code == 200, timeout=60)
    assert a.post("/api/model/save", json={"version": "3.0.0"}).status_code == 201


def test_a_redis_outage_degrades_and_recovers(start_server, state_dir: Path, tmp_path: Path) -> None:
    """With its own Redis: serving goes on through an outage; limits return to Redis after."""
    import redis as redis_client

    from tests.conftest import free_port

    port = free_port()
    command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _redis_up(url), timeout=10)
    server = start_server(state_dir, {"QUADRA_REDIS_URL": url, "QUADRA_REDIS_PREFIX": "outage"})
    try:
        assert server.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 200
        assert any(redis_client.Redis.from_url(url).scan_iter(match="*outage*"))
        redis_process.terminate()
        redis_process.wait(timeout=10)
        assert all(server.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 200 for _ in range(5))
        wrong_key = [server.get("/api/model/versions", headers={"X-API-Key": f"qk_wrong{i}"}).status_code for i in range(3)]
        assert wrong_key == [401] * 3  # the failed-authentication counter falls back too: never a 500
        assert server.post("/api/model/save", json={}).status_code == 201  # a change notice skips Redis
        readiness = server.get("/api/health/detailed")
        assert readiness.status_code == 200 and readiness.json()["checks"]["redis"] is False
        redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _redis_up(url), timeout=10)
        wait_for(lambda: server.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 200
                 and any(redis_client.Redis.from_url(url).scan_iter(match="*outage*")), timeout=60)
        assert server.get("/api/health/detailed").json()["checks"]["redis"] is True
        log = server.log()
        assert log.count("Redis unreachable") == 1 and log.count("Redis is back") == 1, log[-3000:]
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=10)


def _redis_up(url: str) -> bool:
    import redis as redis_client

    try:
        return bool(redis_client.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis_client.RedisError:
        return False


def test_start_up_waits_for_the_database_then_stops_with_one_line(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
    env.update({"QUADRA_STATE_DIR": str(tmp_path), "QUADRA_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none",
                "QUADRA_STORE_WAIT_SECONDS": "2"})
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and "QUADRA_DATABASE_URL" in lines[0] and "unreachable" in lines[0]
