"""Canary rollouts: routing by request id, both arms compared from the monitoring records, the
automatic promote and abort, decisions by hand, and every way a request can be refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tests.conftest import make_settings
from utils.serving import build_model, takes_candidate

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8],
          "class_names": ["setosa", "versicolor", "virginica"]}
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [4.9, 3.1, 1.5, 0.1]]
NO_CRITERIA = {"max_error_rate_increase": None, "max_latency_p95_ratio": None, "max_confidence_drop": None,
               "max_prediction_distance": None}


@pytest.fixture
def app(state_dir: Path):
    """The service with the background decider slowed down: the tests decide when it looks."""
    from app import create_app, start_serving, stop_serving

    application = create_app(make_settings(state_dir, rollout_check_seconds=3600.0, rate_limit_enabled=False))
    application.config["TESTING"] = True
    start_serving(application)
    yield application
    stop_serving(application)
    application.extensions["quadra"].store.database.dispose()


def import_random_model(client, version: str, seed: int = 3) -> None:
    """A version whose weights were drawn at random elsewhere: it predicts differently."""
    torch.manual_seed(seed)
    tensors = {name: tensor.contiguous() for name, tensor in build_model(CONFIG).state_dict().items()}
    fields = {"artifact": (io.BytesIO(save(tensors)), "model.safetensors"),
              "metadata": json.dumps({"config": CONFIG, "version": version})}
    response = client.post("/api/model/versions", data=fields, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_json()


def copy_of_production(client, version: str) -> None:
    assert client.post("/api/model/save", json={"version": version}).status_code == 201


def predict_many(client, count: int, prefix: str = "r") -> dict[str, int]:
    """Send `count` single-row predictions with ids; returns how many each version served."""
    served: dict[str, int] = {}
    for i in range(count):
        response = client.post("/api/predict", json={"inputs": [ROWS[i % len(ROWS)]]},
                               headers={"X-Request-ID": f"{prefix}-{i}"})
        assert response.status_code == 200, response.get_json()
        version = response.get_json()["model_version"]
        served[version] = served.get(version, 0) + 1
    return served


def decide(app):
    services = app.extensions["quadra"]
    services.monitor.flush()
    return services.rollouts.decide()


def test_the_share_is_deterministic_by_request_id_and_close_to_the_percent() -> None:
    ids = [f"request-{i}" for i in range(20_000)]
    share = sum(takes_candidate(7, request_id, 10.0) for request_id in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [takes_candidate(7, i, 10.0) for i in ids[:100]] == [takes_candidate(7, i, 10.0) for i in ids[:100]]
    assert not any(takes_candidate(7, i, 0.0) for i in ids[:1000])


def test_a_good_candidate_is_promoted_by_itself(app, client) -> None:
    copy_of_production(client, "1.1.0")
    # A same-weights candidate: only sampling noise tells the arms apart, which the limits allow for.
    started = client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 150,
                                                           "criteria": {"max_prediction_distance": 0.2}})
    assert started.status_code == 201, started.get_json()
    assert started.get_json()["status"] == "running" and started.get_json()["production_version"] == "1.0.0"
    served = predict_many(client, 400)
    assert set(served) == {"1.0.0", "1.1.0"} and 150 < served["1.1.0"] < 250
    assert decide(app) is not None
    status = client.get("/api/model/canary").get_json()["rollout"]
    assert status["status"] == "promoted" and status["verdict"] == "passed" and status["decided_by"] == "rollout"
    assert status["arms"]["candidate"]["predictions"] == served["1.1.0"]
    assert all(check["passed"] for check in status["checks"]) and len(status["checks"]) == 4
    versions = client.get("/api/model/versions").get_json()
    assert versions["production_version"] == "1.1.0"
    assert predict_many(client, 20, "after") == {"1.1.0": 20}
    history = client.get("/api/model/history").get_json()["history"]
    assert history[0]["action"] == "promote" and history[0]["actor"] == "rollout"


def test_a_worse_candidate_is_aborted_by_itself(app, client) -> None:
    import_random_model(client, "2.0.0")
    assert client.post("/api/model/canary/2.0.0", json={"percent": 30, "min_predictions": 40}).status_code == 201
    served = predict_many(client, 300)
    assert served["2.0.0"] > 40
    decided = decide(app)
    assert decided is not None and decided.status == "aborted" and decided.verdict == "failed"
    status = client.get("/api/model/canary").get_json()["rollout"]
    assert status["status"] == "aborted" and "max_prediction_distance" in status["reason"]
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"
    assert predict_many(client, 20, "after") == {"1.0.0": 20}
