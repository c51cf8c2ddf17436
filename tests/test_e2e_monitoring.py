"""Monitoring end to end: four gunicorn workers, restarts, drift, /metrics, the cron script."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import GUNICORN_COMMAND, ROOT, promtool_findings
from utils.training import load_dataset

pytestmark = pytest.mark.e2e
IRIS = load_dataset().features.tolist()


def send(server, batches: list[list[list[float]]]) -> int:
    """Send every batch (8 at a time); returns how many rows were acknowledged with 200."""

    def one(batch: list[list[float]]) -> int:
        response = server.post("/api/predict", json={"inputs": batch})
        return len(batch) if response.status_code == 200 else 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(one, batches))


def wait_until_recorded(server, count: int, timeout: float = 20.0) -> None:
    """Records reach the store within the workers' flush interval; wait for all of them."""
    deadline = time.monotonic() + timeout
    while requests.get(f"{server.url}/api/monitoring/stats", timeout=10).json()["total_predictions"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} records after {timeout}s"
        time.sleep(0.2)


def test_every_prediction_is_recorded_once_across_workers_and_a_restart(start_server, state_dir: Path) -> None:
    env = {"QUADRA_MONITORING_FLUSH_SECONDS": "5"}  # records still buffered when SIGTERM arrives
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    batches = [[IRIS[i % 150]] for i in range(300)] + [IRIS[i:i + 3] for i in range(0, 150, 3)]
    acknowledged = send(server, batches)
    assert acknowledged == 450
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)
    restarted = start_server(state_dir, env, GUNICORN_COMMAND)
    assert send(restarted, [[IRIS[0]]] * 10) == 10
    restarted.process.send_signal(signal.SIGTERM)
    restarted.process.wait(timeout=60)
    final = start_server(state_dir)
    stats = final.get("/api/monitoring/stats").json()
    assert stats["total_predictions"] == 460 and stats["error_count"] == 0


def test_metrics_sum_every_worker(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    assert send(server, [[IRIS[0]]] * 40) == 40
    totals = set()
    for _ in range(8):  # whichever worker answers the scrape
        body = requests.get(f"{server.url}/metrics", timeout=10).text
        series = 'quadra_http_requests_total{endpoint="predict.predict",method="POST",status="200"}'
        line = next(candidate for candidate in body.splitlines() if candidate.startswith(series))
        totals.add(float(line.split()[-1]))
    assert totals == {40.0}
    assert "quadra_model_info" in body and "quadra_predictions_total" in body
    assert promtool_findings(body) == ""


def test_shifted_load_turns_drift_on_and_the_cron_script_reports_it(start_server, state_dir: Path) -> None:
    env = {"QUADRA_MONITORING_WINDOW": "300", "QUADRA_DRIFT_CHECK_SECONDS": "1"}
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    script_env = {**os.environ, "QUADRA_URL": server.url}
    script = [str(ROOT / "scripts" / "check_drift.sh")]
    assert send(server, [IRIS[i:i + 10] for i in range(0, 150, 10)] * 2) == 300
    wait_until_recorded(server, 300)
    assert server.post("/api/monitoring/baseline").status_code == 201
    assert send(server, [IRIS[i:i + 10] for i in range(0, 150, 10)] * 2) == 300
    wait_until_recorded(server, 600)
    calm = subprocess.run(script, env=script_env, capture_output=True, text=True, timeout=60)
    assert calm.returncode == 0 and "drift=ok" in calm.stdout
    drifted_rows = [[r[0], r[1] + 1.0, r[2] + 2.0, r[3]] for r in IRIS]
    assert send(server, [drifted_rows[i:i + 10] for i in range(0, 150, 10)] * 2) == 300
    wait_until_recorded(server, 900)
    drift = requests.get(f"{server.url}/api/monitoring/drift", timeout=10).json()
    assert drift["drift_detected"] and {"sepal_width_cm", "petal_length_cm"} <= set(drift["drifted_features"])
    assert "sepal_length_cm" not in drift["drifted_features"]
    alarmed = subprocess.run(script, env=script_env, capture_output=True, text=True, timeout=60)
    assert alarmed.returncode == 1 and "drift=drift" in alarmed.stdout and "petal_length_cm" in alarmed.stdout
    deadline = time.monotonic() + 20
    while not requests.get(f"{server.url}/api/monitoring/alerts", timeout=10).json()["alerts"]:
        assert time.monotonic() < deadline, "no drift alert recorded"
        time.sleep(0.5)
    alerts = requests.get(f"{server.url}/api/monitoring/alerts", timeout=10).json()["alerts"]
    assert len(alerts) == 1 and alerts[0]["kind"] == "drift"


def test_a_killed_worker_loses_no_acknowledged_prediction(start_server, state_dir: Path) -> None:
    """SIGKILL a worker holding unflushed records: its journal is replayed by a sibling."""
    server = start_server(state_dir, {"QUADRA_MONITORING_FLUSH_SECONDS": "30"}, GUNICORN_COMMAND)
    acknowledged = send(server, [[IRIS[i % 150]] for i in range(200)])
    assert acknowledged == 200
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in workers[:2]:
        os.kill(int(pid), signal.SIGKILL)
    server.process.send_signal(signal.SIGTERM)  # the survivors flush; a restart replays the killed ones' journals
    server.process.wait(timeout=60)
    restarted = start_server(state_dir)
    wait_until_recorded(restarted, 200)
    assert restarted.get("/api/monitoring/stats").json()["total_predictions"] == 200
