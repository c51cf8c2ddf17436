"""Modes, readiness and training jobs (in-process app; jobs run as real processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings
from utils.model_modes import (
    InferenceGuard,
    ModelMode,
    ModelModeManager,
    TrainingGuard,
    inference_only,
    mode_manager,
    require_mode,
    training_only,
)
from utils.store import JobRow, Store

SETOSA = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture
def modes(store: Store) -> ModelModeManager:
    return ModelModeManager(store=store, refresh_seconds=0.0)


def wait_job(client, job_id: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/train/{job_id}").get_json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.3)


# -- the Python API ---------------------------------------------------------------------


def test_default_mode_and_switching(modes: ModelModeManager) -> None:
    assert modes.mode is ModelMode.INFERENCE and modes.is_inference_mode() and modes.serves_predictions()
    assert modes.enter_training_mode("retrain")["previous_mode"] == "inference"
    assert modes.is_training_mode() and modes.serves_predictions() and modes.allows_training()
    modes.enter_maintenance_mode()
    assert modes.is_maintenance_mode() and not modes.serves_predictions() and modes.allows_training()
    modes.enter_inference_mode()
    assert not modes.allows_training()
    with pytest.raises(ValueError, match="unknown mode"):
        modes.set_mode("turbo")


def test_mode_is_shared_through_the_store(store: Store) -> None:
    first = ModelModeManager(store=store, refresh_seconds=0.0)
    second = ModelModeManager(ModelMode.TRAINING, store=store, refresh_seconds=0.0)
    assert second.mode is ModelMode.TRAINING  # the initial mode until someone sets one
    first.set_mode("maintenance", "db migration", changed_by="ops")
    state = second.state()
    assert state["mode"] == "maintenance" and state["reason"] == "db migration" and state["changed_by"] == "ops"


def test_a_switch_through_one_process_reads_back_at_once_from_another(store: Store) -> None:
    writer = ModelModeManager(store=store)
    reader = ModelModeManager(store=store, refresh_seconds=3600.0)
    assert reader.mode is ModelMode.INFERENCE  # cached for the prediction path from here on
    writer.enter_training_mode("retrain")
    assert reader.mode is ModelMode.INFERENCE  # the per-prediction check may lag by refresh_seconds
    assert reader.state()["mode"] == "training" and reader.mode is ModelMode.TRAINING


def test_callbacks_fire_in_the_process_that_observes_the_change(store: Store) -> None:
    writer = ModelModeManager(store=store, refresh_seconds=0.0)
    observer = ModelModeManager(store=store, refresh_seconds=0.0)
    seen: list[tuple[str, str]] = []
    observer.register_callback(ModelMode.MAINTENANCE, lambda old, new: seen.append((old.value, new.value)))
    observer.register_callback("training", lambda old, new: 1 / 0)  # a failing callback is logged, not raised
    assert observer.mode is ModelMode.INFERENCE
    writer.enter_maintenance_mode()
    assert observer.mode is ModelMode.MAINTENANCE and seen == [("inference", "maintenance")]
    writer.enter_training_mode()
    assert observer.mode is ModelMode.TRAINING and seen == [("inference", "maintenance")]


def test_guards_and_decorators_raise_the_seeds_errors(modes: ModelModeManager) -> None:
    with InferenceGuard(modes):
        pass
    with pytest.raises(RuntimeError, match="Cannot perform training in inference mode"):
        with TrainingGuard(modes):
            pass
    modes.enter_maintenance_mode()
    with pytest.raises(RuntimeError, match="Cannot perform inference in maintenance mode"):
        with InferenceGuard(modes):
            pass

    @require_mode("training", manager=modes)
    def fine_tune() -> str:
        return "tuned"

    with pytest.raises(RuntimeError, match="requires training mode; the current mode is maintenance"):
        fine_tune()
    modes.enter_training_mode()
    assert fine_tune() == "tuned"


def test_module_level_decorators_use_the_global_manager(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mode_manager, "_store", store)
    monkeypatch.setattr(mode_manager, "refresh_seconds", 0.0)

    @inference_only
    def serve() -> str:
        return "served"

    @training_only
    def train() -> str:
        return "trained"

    assert serve() == "served"
    with pytest.raises(RuntimeError):
        train()
    mode_manager.enter_training_mode()
    assert train() == "trained" and serve() == "served"


# -- over HTTP --------------------------------------------------------------------------


def test_mode_endpoints(app, client, anonymous, api_keys) -> None:
    assert anonymous.get("/api/mode").get_json()["mode"] == "inference"
    assert anonymous.post("/api/mode/maintenance").status_code == 401
    assert anonymous.post("/api/mode/maintenance", headers={"X-API-Key": api_keys["write"]}).status_code == 403
    changed = client.post("/api/mode/maintenance", json={"reason": "high drift"}).get_json()
    assert changed["mode"] == "maintenance" and changed["previous_mode"] == "inference" and changed["changed_by"].startswith("test-admin")
    assert client.post("/api/mode/turbo").status_code == 400
    assert client.post("/api/mode/inference", json={"reason": 5}).status_code == 400
    assert client.post("/api/mode/inference", json={"why": "x"}).status_code == 400
    audit = app.extensions["quadra"].store.audit.list(5)
    entry = next(e for e in audit if e.action == "modes.set_mode" and e.outcome == "success")
    assert entry.details["reason"] == "high drift" and entry.target == "maintenance"
    notice = app.extensions["quadra"].alerts.recent(1)[0]
    assert notice["kind"] == "mode" and notice["severity"] == "info" and "high drift" in notice["message"]
    again = client.post("/api/mode/maintenance", json={"reason": "again"}).get_json()
    assert again["changed"] is False and again["previous_mode"] == "maintenance" and again["reason"] == "high drift"
    assert app.extensions["quadra"].alerts.recent(1)[0]["id"] == notice["id"]  # no notice for a non-change
    fresh = client.post("/api/mode/inference").get_json()
    assert fresh["changed"] is True and client.post("/api/mode/inference").get_json()["changed"] is False


def test_maintenance_refuses_predictions_with_retry_after(client) -> None:
    client.post("/api/mode/maintenance")
    response = client.post("/api/predict", json=SETOSA)
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "maintenance"
    assert response.headers["Retry-After"] == "60"
    assert client.get("/api/model/versions").status_code == 200
    assert client.get("/api/monitoring/stats").status_code == 200
    assert client.post("/api/model/save", json={"version": "2.0.0"}).status_code == 201
    assert client.post("/api/model/promote/2.0.0").status_code == 200
    assert client.post("/api/model/rollback").status_code == 200
    client.post("/api/mode/training")
    assert client.post("/api/predict", json=SETOSA).status_code == 200


def test_training_is_refused_in_inference_mode(client) -> None:
    response = client.post("/api/train")
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "wrong_mode"


@pytest.mark.parametrize(
    "body",
    [
        {"epochs": 0}, {"epochs": "5"}, {"learning_rate": -1}, {"batch_size": 1.5}, {"seed": -3},
        {"hidden_dims": []}, {"hidden_dims": [0]}, {"optimizer": "sgd"},
        {"data": {"features": [[1, 2]] * 10, "labels": ["a"] * 10}},
        {"data": {"features": [[1, 2]] * 10, "labels": ["a", "b"] * 4}},
        {"data": {"features": [[1, 2]] * 5, "labels": ["a", "b"] * 2 + ["a"]}},
        {"data": {"features": [[1, "x"]] * 10, "labels": ["a", "b"] * 5}},
        {"data": {"features": [[1, 2], [1]] * 5, "labels": ["a", "b"] * 5}},
        {"data": {"features": [[1, 2]] * 10, "labels": [None, "b"] * 5}},
        {"data": {"features": [[1, 2]] * 10, "labels": ["a", "b"] * 5, "feature_names": ["x"]}},
        {"data": [[1, 2]]},
    ],
)
def test_training_requests_are_validated(client, body: dict) -> None:
    client.post("/api/mode/training")
    response = client.post("/api/train", json=body)
    assert response.status_code == 400, body
    assert response.get_json()["error"]["code"] in ("invalid_body", "invalid_data")
    assert client.get("/api/train").get_json()["jobs"] == []


def test_training_job_saves_a_version_without_promoting(app, client, api_keys) -> None:
    client.post("/api/mode/training")
    assert client.post("/api/train", headers={"X-API-Key": api_keys["read"]}).status_code == 403
    started = client.post("/api/train", json={"epochs": 20, "learning_rate": 0.02, "seed": 3}, headers={"X-API-Key": api_keys["write"]})
    assert started.status_code == 202
    job = wait_job(client, started.get_json()["id"])
    assert job["status"] == "succeeded" and job["epoch"] == 20 and job["percent"] == 100.0
    assert [p["epoch"] for p in job["progress"]] == list(range(1, 21))
    assert {"train_loss", "accuracy", "val_loss"} <= set(job["progress"][-1])
    version = client.get(f"/api/model/versions/{job['result_version']}").get_json()
    assert version["version"].startswith("train-") and not version["is_production"]
    assert version["training_info"]["job_id"] == job["id"] and version["training_info"]["epochs"] == 20
    assert version["metrics"]["accuracy"] == job["progress"][-1]["accuracy"]
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"


def test_training_on_posted_data(client) -> None:
    client.post("/api/mode/maintenance")
    features = [[float(i % 7), float(i % 3)] for i in range(60)]
    labels = ["low" if f[0] < 3 else "high" for f in features]
    started = client.post("/api/train", json={"epochs": 5, "data": {"features": features, "labels": labels, "feature_names": ["a", "b"]}})
    assert started.status_code == 202 and started.get_json()["custom_data_rows"] == 60
    job = wait_job(client, started.get_json()["id"])
    assert job["status"] == "succeeded"
    config = client.get(f"/api/model/versions/{job['result_version']}").get_json()["config"]
    assert config["input_dim"] == 2 and config["class_names"] == ["high", "low"] and config["feature_names"] == ["a", "b"]


def test_one_job_at_a_time_and_cancel(client) -> None:
    client.post("/api/mode/training")
    first = client.post("/api/train", json={"epochs": 10000}).get_json()
    second = client.post("/api/train", json={"epochs": 5})
    assert second.status_code == 409 and second.get_json()["error"]["code"] == "training_in_progress"
    refused = client.post("/api/mode/inference")
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "training_in_progress"
    assert client.post(f"/api/train/{first['id']}/cancel").get_json()["cancel_requested"] is True
    assert wait_job(client, first["id"])["status"] == "cancelled"
    assert client.post("/api/train/job_nope/cancel").status_code == 404
    assert client.get("/api/train/job_nope").status_code == 404


def test_force_switch_to_inference_cancels_the_job(client) -> None:
    client.post("/api/mode/training")
    job = client.post("/api/train", json={"epochs": 10000}).get_json()
    switched = client.post("/api/mode/inference", json={"force": True, "reason": "done"}).get_json()
    assert switched["mode"] == "inference" and switched["cancelled_jobs"] == [job["id"]]
    assert wait_job(client, job["id"])["status"] == "cancelled"


def test_a_killed_job_is_marked_failed(app, client) -> None:
    client.post("/api/mode/training")
    job = client.post("/api/train", json={"epochs": 10000}).get_json()
    deadline = time.monotonic() + 60
    while client.get(f"/api/train/{job['id']}").get_json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pid = app.extensions["quadra"].store.jobs.get(job["id"]).pid
    os.kill(pid, signal.SIGKILL)
    failed = wait_job(client, job["id"])
    assert failed["status"] == "failed" and ("exited" in failed["error"] or "gone" in failed["error"])
    assert client.post("/api/train", json={"epochs": 2}).status_code == 202


def test_silent_jobs_are_reaped(app) -> None:
    jobs = app.extensions["quadra"].jobs
    store = app.extensions["quadra"].store
    store.jobs.insert_if_capacity(JobRow(id="job_stale", status="running", created_at=time.time() - 1000, created_by="t",
                                         params={}, total_epochs=1, heartbeat_at=time.time() - 1000), 5)
    assert jobs.reap() == 1
    assert jobs.get("job_stale")["status"] == "failed" and "heartbeat" in jobs.get("job_stale")["error"]


# -- readiness --------------------------------------------------------------------------


def test_readiness_reports_every_check_without_paths(anonymous, state_dir: Path) -> None:
    response = anonymous.get("/api/health/detailed")
    body = response.get_json()
    assert response.status_code == 200 and body["ready"] and body["reasons"] == []
    checks = body["checks"]
    assert checks["store"] and checks["artifact_store"] and checks["model_directory"]
    assert checks["required_files"] == {"model_registry.json": True} and checks["disk_space"]["ok"]
    assert checks["serving_model"]["hash_verified"] and checks["serving_model"]["warmed_up"]
    assert body["current_version"] == body["production_version"] == "1.0.0" and body["mode"] == "inference"
    assert str(state_dir) not in response.get_data(as_text=True)


def test_readiness_is_503_when_disk_is_short(state_dir: Path) -> None:
    from app import create_app, start_serving

    app = create_app(make_settings(state_dir, min_free_disk_mb=10**9))
    start_serving(app)
    response = app.test_client().get("/api/health/detailed")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert any("disk" in reason for reason in response.get_json()["reasons"])
    app.extensions["quadra"].store.database.dispose()


def test_readiness_is_503_when_the_serving_artifact_is_corrupted(anonymous, state_dir: Path) -> None:
    artifact = state_dir / "models" / "1.0.0" / "model.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-2] ^= 0x10
    artifact.write_bytes(bytes(data))
    response = anonymous.get("/api/health/detailed")
    assert response.status_code == 503
    assert any("SHA-256" in reason for reason in response.get_json()["reasons"])
    assert anonymous.get("/api/health").status_code == 200


def test_readiness_with_redis_down_is_degraded_not_unready(state_dir: Path) -> None:
    from app import create_app, start_serving

    app = create_app(make_settings(state_dir, redis_url="redis://127.0.0.1:1/0"))
    start_serving(app)
    response = app.test_client().get("/api/health/detailed")
    body = response.get_json()
    assert response.status_code == 200 and body["ready"] is True  # limits fall back per process: still serving
    assert body["checks"]["redis"] is False and any("Redis is unreachable" in d for d in body["degraded"])
    app.extensions["quadra"].store.database.dispose()


def test_cli_mode_and_training(app) -> None:
    runner = app.test_cli_runner()
    assert runner.invoke(args=["train", "start"]).exit_code != 0
    assert runner.invoke(args=["mode", "set", "training", "--reason", "nightly"]).output.strip() == "mode inference -> training"
    assert "training (by cli: nightly)" in runner.invoke(args=["mode", "show"]).output
    result = runner.invoke(args=["train", "start", "--epochs", "5", "--wait"])
    assert result.exit_code == 0 and "succeeded train-" in result.stdout
    job_id = result.stdout.splitlines()[0]
    assert job_id in runner.invoke(args=["train", "list"]).output
    assert '"status": "succeeded"' in runner.invoke(args=["train", "status", job_id]).output
    assert runner.invoke(args=["train", "status", "job_nope"]).exit_code != 0
    assert runner.invoke(args=["train", "cancel", "job_nope"]).exit_code != 0
    assert runner.invoke(args=["mode", "set", "inference"]).exit_code == 0
