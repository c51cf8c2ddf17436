"""Modes, training and the incident runbooks against real server processes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import GUNICORN_COMMAND, ROOT
from utils.training import load_dataset

pytestmark = pytest.mark.e2e
IRIS = load_dataset().features.tolist()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def finished_job(server, job_id: str) -> dict:
    return wait_for(lambda: (job := server.get(f"/api/train/{job_id}").json())["status"] not in ("queued", "running") and job, 120)


class PredictionLoad:
    """Predictions sent continuously from a few threads; counts every outcome."""

    def __init__(self, server, threads: int = 3) -> None:
        self.server, self.codes, self._stop = server, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.codes.append(self.server.post("/api/predict", json={"inputs": IRIS[:4]}).status_code)
            except requests.RequestException as exc:
                self.codes.append(type(exc).__name__)

    def __enter__(self) -> PredictionLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_a_mode_change_reaches_a_second_server(start_server, state_dir: Path) -> None:
    first, second = start_server(state_dir), start_server(state_dir)
    assert first.post("/api/mode/maintenance", json={"reason": "e2e"}).status_code == 200
    wait_for(lambda: second.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 503, timeout=5)
    refused = second.post("/api/predict", json={"inputs": IRIS[:1]})
    assert refused.json()["error"]["code"] == "maintenance" and int(refused.headers["Retry-After"]) > 0
    assert requests.get(f"{second.url}/api/mode", timeout=10).json()["reason"] == "e2e"
    assert second.post("/api/mode/inference").status_code == 200
    wait_for(lambda: first.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 200, timeout=5)


def test_train_save_promote_serve_cycle_with_predictions_uninterrupted(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    assert server.post("/api/train").status_code == 409
    with PredictionLoad(server) as load:
        assert server.post("/api/mode/training", json={"reason": "weekly retrain"}).status_code == 200
        job = server.post("/api/train", json={"epochs": 150, "seed": 7}).json()
        done = finished_job(server, job["id"])
        assert done["status"] == "succeeded" and len(done["progress"]) == 150
        version = done["result_version"]
        info = server.get(f"/api/model/versions/{version}").json()
        assert info["metrics"]["accuracy"] > 0.8 and not info["is_production"]
        assert server.post(f"/api/model/promote/{version}").status_code == 200
        wait_for(lambda: all(server.post("/api/predict", json={"inputs": IRIS[:1]}).json()["model_version"] == version for _ in range(12)))
        assert server.post("/api/mode/inference").status_code == 200
    assert load.codes and set(load.codes) == {200}, {c for c in load.codes if c != 200}


def test_killing_the_job_process_marks_it_failed(start_server, state_dir: Path) -> None:
    server = start_server(state_dir)
    server.post("/api/mode/training")
    job = server.post("/api/train", json={"epochs": 10000}).json()
    wait_for(lambda: server.get(f"/api/train/{job['id']}").json()["status"] == "running")
    processes = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    pid = next(int(line.split()[0]) for line in processes if job["id"] in line and "utils.training" in line)
    os.kill(pid, signal.SIGKILL)
    failed = finished_job(server, job["id"])
    assert failed["status"] == "failed" and failed["error"]


def test_runbook_high_drift(start_server, state_dir: Path) -> None:
    """High drift -> maintenance (the cron script) -> retrain -> promote -> new baseline -> inference."""
    server = start_server(state_dir, {"QUADRA_MONITORING_WINDOW": "300", "QUADRA_BASELINE_MIN_SAMPLES": "100"})
    for start in range(0, 300, 30):
        server.post("/api/predict", json={"inputs": (IRIS * 2)[start:start + 30]})
    assert server.post("/api/monitoring/baseline").status_code == 201
    drifted = [[r[0], r[1], r[2] + 2.5, r[3] + 1.0] for r in IRIS * 2]
    for start in range(0, 300, 30):
        server.post("/api/predict", json={"inputs": drifted[start:start + 30]})
    env = {**os.environ, "QUADRA_URL": server.url, "QUADRA_API_KEY": server.admin_key}
    check = subprocess.run([str(ROOT / "scripts" / "check_drift.sh"), "--maintenance"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "switched to maintenance" in check.stdout
    assert server.get("/api/mode").json()["mode"] == "maintenance"
    assert server.post("/api/predict", json={"inputs": IRIS[:1]}).status_code == 503
    job = server.post("/api/train", json={"epochs": 60}).json()
    version = finished_job(server, job["id"])["result_version"]
    assert server.post(f"/api/model/promote/{version}").status_code == 200
    assert server.delete("/api/monitoring/baseline").json()["removed"] == 1
    assert server.post("/api/mode/inference", json={"reason": "retrained"}).status_code == 200
    assert server.post("/api/predict", json={"inputs": IRIS[:1]}).json()["model_version"] == version


def test_runbook_model_corruption(start_server, state_dir: Path) -> None:
    """A corrupted serving artifact -> readiness 503 -> rollback -> ready again."""
    server = start_server(state_dir)
    assert server.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    assert server.post("/api/model/promote/1.1.0").status_code == 200
    artifact = state_dir / "models" / "1.1.0" / "model.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\x00")
    assert requests.get(f"{server.url}/api/health/detailed", timeout=10).status_code == 503
    verify = subprocess.run([str(Path(os.sys.executable)), "-m", "flask", "--app", "app", "registry", "verify"], cwd=ROOT,
                            env={**os.environ, "QUADRA_STATE_DIR": str(state_dir)}, capture_output=True, text=True, timeout=60)
    assert verify.returncode != 0 and "1.1.0: MISMATCH" in verify.stdout
    assert server.post("/api/model/rollback").json()["production_version"] == "1.0.0"
    wait_for(lambda: requests.get(f"{server.url}/api/health/detailed", timeout=10).status_code == 200, timeout=10)
    assert server.post("/api/predict", json={"inputs": IRIS[:1]}).json()["model_version"] == "1.0.0"


def test_runbook_compromised_key(start_server, state_dir: Path) -> None:
    """Revoke a leaked key at once; rotate a key that may have leaked, with a grace period."""
    server = start_server(state_dir)
    leaked = server.post("/api/auth/keys", json={"name": "leaked", "permissions": ["read"]}).json()
    suspect = server.post("/api/auth/keys", json={"name": "ci", "permissions": ["write"]}).json()
    assert server.delete(f"/api/auth/keys/{leaked['id']}").json()["active"] is False
    wait_for(
        lambda: requests.get(f"{server.url}/api/model/versions", headers={"X-API-Key": leaked["api_key"]}, timeout=10).status_code == 401,
        10,
    )
    rotated = server.post(f"/api/auth/keys/{suspect['id']}/rotate", json={"grace_seconds": 2}).json()
    assert requests.get(f"{server.url}/api/model/versions", headers={"X-API-Key": suspect["api_key"]}, timeout=10).status_code == 200
    wait_for(
        lambda: requests.get(f"{server.url}/api/model/versions", headers={"X-API-Key": suspect["api_key"]}, timeout=10).status_code == 401,
        15,
    )
    assert requests.get(f"{server.url}/api/model/versions", headers={"X-API-Key": rotated["api_key"]}, timeout=10).status_code == 200
    actions = [e["action"] for e in server.get("/api/audit?limit=50").json()["entries"]]
    assert {"auth.revoke_key", "auth.rotate_key", "auth.failure"} <= set(actions)
