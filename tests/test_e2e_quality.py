"""Labels end to end: predictions under four gunicorn workers, labels posted later by another
client, quality equal to scikit-learn's on what the clients saw, and an accuracy drop that
raises one alert (and the cron script's exit 1) and clears with hysteresis."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn.metrics import accuracy_score, brier_score_loss, confusion_matrix, f1_score, log_loss

from tests.conftest import GUNICORN_COMMAND, ROOT
from utils.training import load_dataset

pytestmark = pytest.mark.e2e
IRIS = load_dataset()
CLASSES = ["setosa", "versicolor", "virginica"]


def predict_all(server) -> list[dict[str, Any]]:
    """Every iris row twice, three rows per request, from eight threads: the rows' answers."""
    batches = [list(range(start, start + 3)) for start in range(0, 150, 3)] * 2

    def one(rows: list[int]) -> list[dict[str, Any]]:
        response = server.post("/api/predict", json={"inputs": IRIS.features[rows].tolist()})
        assert response.status_code == 200, response.text
        return [{**p, "truth": int(IRIS.labels[row])} for p, row in zip(response.json()["predictions"], rows, strict=True)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [p for answer in pool.map(one, batches) for p in answer]


def post_labels(url: str, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Another client: its own session, the write key."""
    response = requests.post(f"{url}/api/feedback", json={"labels": items}, headers={"X-API-Key": key}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.3)
    return value


@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")  # float32 softmax, as served
def test_labels_posted_later_give_sklearns_quality_and_a_drop_alerts_once(start_server, state_dir: Path,
                                                                          api_keys: dict[str, str]) -> None:
    env = {"QUADRA_DRIFT_CHECK_SECONDS": "1", "QUADRA_QUALITY_MIN_LABELS": "100", "QUADRA_QUALITY_MAX_DROP": "0.1",
           "QUADRA_QUALITY_WINDOW": "hour"}
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    key = api_keys["write"]
    answers = predict_all(server)
    assert len(answers) == 300 and len({a["id"] for a in answers}) == 300

    truth = [{"id": a["id"], "label": CLASSES[a["truth"]]} for a in answers]
    result = post_labels(server.url, key, truth[::-1])  # any order, right after the predictions
    assert (result["recorded"], result["rejected"]) == (300, 0)

    quality = server.get("/api/monitoring/quality?window=hour").json()["versions"][0]
    y = np.array([a["truth"] for a in answers])
    probabilities = np.array([[a["probabilities"][name] for name in CLASSES] for a in answers])
    predicted = probabilities.argmax(axis=1)
    assert quality["labelled"] == quality["predictions"] == 300
    assert quality["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert quality["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)
    assert quality["confusion_matrix"] == confusion_matrix(y, predicted).tolist()
    assert quality["log_loss"] == pytest.approx(log_loss(y, probabilities, labels=[0, 1, 2]), rel=1e-6)
    assert quality["brier_score"] == pytest.approx(brier_score_loss(y, probabilities, labels=[0, 1, 2]), rel=1e-6)

    script = [str(ROOT / "scripts" / "check_quality.sh")]
    script_env = {**os.environ, "QUADRA_URL": server.url, "QUADRA_API_KEY": key}
    calm = subprocess.run(script, env=script_env, capture_output=True, text=True, timeout=60)
    assert calm.returncode == 0 and "quality=ok" in calm.stdout, calm.stdout + calm.stderr

    wrong = [{"id": a["id"], "label": (a["class_index"] + 1) % 3} for a in answers]
    assert post_labels(server.url, key, wrong)["relabelled"] == 300  # the true classes turned out otherwise
    alerts = wait_for(lambda: quality_alerts(server), "quality alert")
    alarmed = subprocess.run(script, env=script_env, capture_output=True, text=True, timeout=60)
    assert alarmed.returncode == 1 and "quality=below" in alarmed.stdout and "accuracy=0.0000" in alarmed.stdout

    post_labels(server.url, key, truth)
    wait_for(lambda: all(a["resolved_at"] for a in quality_alerts(server)), "resolved quality alert")
    alerts = quality_alerts(server)
    assert len(alerts) == 1 and "below the floor" in alerts[0]["message"]
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'quadra_quality_below_floor 0.0' in metrics and 'quadra_quality_labelled{version="1.0.0"} 300.0' in metrics


def quality_alerts(server) -> list[dict[str, Any]]:
    return [a for a in server.get("/api/monitoring/alerts").json()["alerts"] if a["kind"] == "quality"]

