"""The HTTP API through Flask's test client: shapes, status codes and the error contract."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings
from utils.store import JobRow

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def test_health(client) -> None:
    body = client.get("/api/health").get_json()
    assert body["status"] == "healthy" and body["model_loaded"] and body["model_version"] == "1.0.0"


def test_predict_returns_class_probabilities_and_confidence(client) -> None:
    response = client.post("/api/predict", json={"inputs": [SETOSA, VIRGINICA]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_version"] == "1.0.0" and len(body["request_id"]) == 32
    first, second = body["predictions"]
    assert (first["class"], second["class"]) == ("setosa", "virginica")
    assert set(first["probabilities"]) == {"setosa", "versicolor", "virginica"}
    assert first["confidence"] == pytest.approx(max(first["probabilities"].values()))


@pytest.mark.parametrize(
    "body, status, code",
    [
        ('{"inputs": [[1,2,3]]}', 400, "invalid_input"),
        ('{"inputs": []}', 400, "invalid_input"),
        ('{"inputs": [[1,2,3,NaN]]}', 400, "invalid_input"),
        ('{"inputs": [[1,2,3,Infinity]]}', 400, "invalid_input"),
        ('{"inputs": [[1,2,3,"x"]]}', 400, "invalid_input"),
        ('{"inputs": [[1,2,3,4]], "debug": true}', 400, "invalid_input"),
        ('{"inputs": [[1,2,3,4]', 400, "invalid_json"),
        ("[[1,2,3,4]]", 400, "invalid_body"),
        ("[" * 100000 + "]" * 100000, 400, "invalid_json"),
        ("", 415, "unsupported_media_type"),
    ],
)
def test_predict_rejects_bad_input(client, body: str, status: int, code: str) -> None:
    content_type = "application/json" if body else "text/plain"
    assert_error(client.post("/api/predict", data=body, content_type=content_type), status, code)
    assert client.post("/api/predict", json={"inputs": [SETOSA]}).status_code == 200


def test_predict_requires_json_content_type(client) -> None:
    assert_error(client.post("/api/predict", data='{"inputs": [[1,2,3,4]]}', content_type="text/plain"), 415, "unsupported_media_type")


def test_batch_and_body_limits(state_dir: Path, api_keys: dict[str, str]) -> None:
    from app import create_app, start_serving

    app = create_app(make_settings(state_dir, max_batch_size=4, max_body_bytes=2048))
    start_serving(app)
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = api_keys["read"]
    assert_error(client.post("/api/predict", json={"inputs": [SETOSA] * 5}), 400, "invalid_input")
    assert client.post("/api/predict", json={"inputs": [SETOSA] * 4}).status_code == 200
    assert_error(client.post("/api/predict", json={"inputs": [SETOSA] * 400}), 413, "request_entity_too_large")
    app.extensions["quadra"].store.database.dispose()


def test_unknown_route_and_method(client) -> None:
    assert_error(client.get("/api/nope"), 404, "not_found")
    response = client.put("/api/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_versions_listing_and_detail(client) -> None:
    body = client.get("/api/model/versions").get_json()
    assert body["count"] == 1 and body["production_version"] == body["serving_version"] == "1.0.0"
    version = body["versions"][0]
    assert version["version"] == "1.0.0" and version["is_production"] and "artifact_key" not in version
    detail = client.get("/api/model/versions/1.0.0?verify=true").get_json()
    assert detail["integrity"]["ok"] is True
    assert client.get("/api/model/versions?tag=initial").get_json()["count"] == 1
    assert client.get("/api/model/versions?tag=absent").get_json()["count"] == 0
    assert_error(client.get("/api/model/versions/9.9.9"), 404, "version_not_found")


def test_save_promote_rollback_load_round_trip(client) -> None:
    saved = client.post(
        "/api/model/save", json={"version": "1.1.0", "description": "copy", "tags": ["canary"], "metrics": {"accuracy": 0.99}}
    )
    assert saved.status_code == 201
    assert saved.get_json()["tags"] == ["canary"] and saved.get_json()["training_info"]["source_version"] == "1.0.0"
    assert_error(client.post("/api/model/save", json={"version": "1.1.0"}), 409, "conflict")
    promoted = client.post("/api/model/promote/1.1.0").get_json()
    assert promoted == {"production_version": "1.1.0", "previous_version": "1.0.0", "changed": True,
                        "message": "1.1.0 is now production"}
    assert client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()["model_version"] == "1.1.0"
    assert client.post("/api/model/rollback").get_json()["production_version"] == "1.0.0"
    assert client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()["model_version"] == "1.0.0"
    assert client.post("/api/model/load/1.1.0").get_json() == {"serving_version": "1.1.0", "previous_version": "1.0.0",
                                                                "changed": True}
    versions = client.get("/api/model/versions").get_json()
    assert (versions["production_version"], versions["serving_version"]) == ("1.0.0", "1.1.0")
    history = client.get("/api/model/history").get_json()["history"]
    assert [h["action"] for h in history[:3]] == ["load", "rollback", "promote"]
    compared = client.get("/api/model/compare?a=1.0.0&b=1.1.0").get_json()
    assert compared["metrics_comparison"]["accuracy"]["version2"] == 0.99


def test_save_without_body_generates_a_timestamp_version(client) -> None:
    response = client.post("/api/model/save")
    assert response.status_code == 201
    assert response.get_json()["version"][:2] == "20"


@pytest.mark.parametrize(
    "body",
    [
        {"version": "../evil"},
        {"version": 1},
        {"tags": "x"},
        {"tags": [""]},
        {"metrics": {"a": "b"}},
        {"description": 5},
        {"owner": "me"},
    ],
)
def test_save_rejects_bad_bodies(client, state_dir: Path, body: dict) -> None:
    response = client.post("/api/model/save", json=body)
    assert response.status_code == 400
    assert sorted(p.name for p in (state_dir / "models").iterdir() if not p.name.startswith(".")) == ["1.0.0", "model_registry.json"]


@pytest.mark.parametrize("path", ["..%2F..%2Fetc", "%2e%2e", "1.0.0%00", "a" * 200, "%2Fetc%2Fpasswd", "1.0"])
def test_path_versions_are_validated(client, path: str) -> None:
    urls = (("post", f"/api/model/load/{path}"), ("post", f"/api/model/promote/{path}"), ("get", f"/api/model/versions/{path}"))
    for method, url in urls:
        response = getattr(client, method)(url)
        assert response.status_code in (400, 404), url
        assert response.get_json()["error"]["code"] in ("invalid_version", "not_found")


def test_integrity_failure_is_422_and_old_version_keeps_serving(client, state_dir: Path) -> None:
    client.post("/api/model/save", json={"version": "1.1.0"})
    artifact = state_dir / "models" / "1.1.0" / "model.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x01
    artifact.write_bytes(bytes(data))
    assert_error(client.post("/api/model/promote/1.1.0"), 422, "integrity_check_failed")
    assert_error(client.post("/api/model/load/1.1.0"), 422, "integrity_check_failed")
    assert client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()["model_version"] == "1.0.0"
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"


@pytest.mark.parametrize("trick", ["linked file", "linked folder", "directory"])
def test_artifacts_outside_the_models_folder_or_not_files_are_422(client, state_dir: Path, tmp_path: Path, trick: str) -> None:
    """A byte-identical artifact outside the models folder (linked file or version folder) and
    an artifact that is a directory: 422 on load and promote, readiness 503, nothing served."""
    assert client.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    folder = state_dir / "models" / "1.1.0"
    outside = tmp_path / "outside-1.1.0"
    shutil.copytree(folder, outside)
    if trick == "linked file":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    elif trick == "linked folder":
        shutil.rmtree(folder)
        folder.symlink_to(outside, target_is_directory=True)
    else:
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").mkdir()
    assert_error(client.post("/api/model/load/1.1.0"), 422, "integrity_check_failed")
    assert_error(client.post("/api/model/promote/1.1.0"), 422, "integrity_check_failed")
    assert client.get("/api/model/versions/1.1.0?verify=true").get_json()["integrity"]["ok"] is False
    assert client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()["model_version"] == "1.0.0"
    assert client.get("/api/health/detailed").status_code == 200  # 1.0.0, which is served, is intact


def test_readiness_refuses_a_serving_artifact_linked_outside(client, state_dir: Path, tmp_path: Path) -> None:
    artifact = state_dir / "models" / "1.0.0" / "model.safetensors"
    copy = tmp_path / "model.safetensors"
    shutil.copy(artifact, copy)
    artifact.unlink()
    artifact.symlink_to(copy)
    response = client.get("/api/health/detailed")
    assert response.status_code == 503 and any("SHA-256" in reason for reason in response.get_json()["reasons"])


@pytest.mark.parametrize("path", ["/api/monitoring/baseline", "/api/model/rollback", "/api/model/promote/1.0.0"])
def test_bodyless_operations_accept_an_empty_object_and_refuse_fields(client, path: str) -> None:
    """`{}` is what many clients send with every POST: it (and an empty body) means no body."""
    for sent in ({"json": {}}, {"data": b"", "content_type": "application/json"}, {}):
        response = client.post(path, **sent)
        assert response.status_code != 400, (sent, response.get_json())
        assert response.status_code in (200, 201, 409)
    refused = assert_error(client.post(path, json={"force": True}), 400, "invalid_body")
    assert "force" in refused["error"]["message"]
    assert_error(client.post(path, data="{}", content_type="text/plain"), 415, "unsupported_media_type")


def test_delete_and_conflicts(client) -> None:
    client.post("/api/model/save", json={"version": "1.1.0"})
    assert_error(client.delete("/api/model/versions/1.0.0"), 409, "conflict")
    assert client.delete("/api/model/versions/1.1.0").get_json() == {"deleted": "1.1.0"}
    assert_error(client.delete("/api/model/versions/1.1.0"), 404, "version_not_found")
    assert_error(client.post("/api/model/rollback"), 409, "conflict")


def test_compare_and_history_parameters(client) -> None:
    assert_error(client.get("/api/model/compare?a=1.0.0"), 400, "invalid_parameter")
    assert_error(client.get("/api/model/compare?a=1.0.0&b=2.0.0"), 404, "version_not_found")
    assert_error(client.get("/api/model/history?limit=abc"), 400, "invalid_parameter")


def test_metrics_of_any_json_kind_recorded_through_the_python_api_are_served(app, client) -> None:
    """The response models declare what the Python API may record, so such a version is
    listed and compared, never a 500."""
    svc = app.extensions["quadra"]
    served = svc.model_server.require_current()
    svc.registry.save_model(served.model, "9.0.0", metrics={"accuracy": 0.9, "notes": "retrained", "folds": [1, 2]},
                            config=served.config)
    listed = client.get("/api/model/versions").get_json()["versions"]
    assert next(v for v in listed if v["version"] == "9.0.0")["metrics"]["notes"] == "retrained"
    compared = client.get(f"/api/model/compare?a={served.version}&b=9.0.0")
    assert compared.status_code == 200 and compared.get_json()["metrics_comparison"]["notes"]["version2"] == "retrained"


def test_not_ready_is_503_with_retry_after(tmp_path: Path) -> None:
    from app import create_app

    empty = tmp_path / "empty"
    app = create_app(make_settings(empty, bootstrap_model=False))
    api_key, _ = app.extensions["quadra"].auth.create_api_key("writer", ["write"])
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = api_key
    response = client.post("/api/predict", json={"inputs": [SETOSA]})
    assert_error(response, 503, "model_not_ready")
    assert response.headers["Retry-After"] == "2"
    assert_error(client.post("/api/model/save"), 503, "model_not_ready")
    assert client.get("/api/health").get_json()["model_loaded"] is False
    app.extensions["quadra"].store.database.dispose()


def test_unexpected_errors_hide_the_trace(app, client, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = app.extensions["quadra"].registry

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(registry, "list_versions", explode)
    body = assert_error(client.get("/api/model/versions"), 500, "internal_error")
    assert "secret" not in json.dumps(body)


def test_cli_registry_commands(app, client, tmp_path: Path) -> None:
    runner = app.test_cli_runner()
    assert "1.0.0" in runner.invoke(args=["registry", "list"]).output
    assert runner.invoke(args=["registry", "verify"]).output.strip() == "1.0.0: ok"
    backup = tmp_path / "b.tar.gz"
    assert runner.invoke(args=["registry", "backup", str(backup)]).exit_code == 0
    assert client.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    assert runner.invoke(args=["registry", "archive", "1.1.0"]).exit_code == 0
    assert " A " in runner.invoke(args=["registry", "list"]).output.replace("A  ", " A ")
    assert runner.invoke(args=["registry", "unarchive", "1.1.0"]).exit_code == 0
    refused = runner.invoke(args=["registry", "delete", "1.0.0"])
    assert refused.exit_code != 0 and "in use" in refused.output
    assert runner.invoke(args=["registry", "delete", "1.1.0"]).exit_code == 0
    assert runner.invoke(args=["registry", "restore", str(backup)]).output.startswith("restored 0")
    artifact = Path(app.extensions["quadra"].registry.models_dir) / "1.0.0" / "model.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"!")
    failed = runner.invoke(args=["registry", "verify"])
    assert failed.exit_code != 0 and "MISMATCH" in failed.output
    assert runner.invoke(args=["registry", "verify", "../x"]).exit_code != 0


def test_inputs_that_overflow_the_model_still_get_a_distribution(client) -> None:
    """float32's extremes pass the schema; where they overflow the network, logits are clamped."""
    extreme = 3.4028234663852886e38
    response = client.post("/api/predict", json={"inputs": [[extreme, -extreme, extreme, -extreme], [extreme] * 4]})
    assert response.status_code == 200
    for prediction in response.get_json()["predictions"]:
        assert 0.0 <= prediction["confidence"] <= 1.0
        assert abs(sum(prediction["probabilities"].values()) - 1.0) < 1e-5


@pytest.mark.parametrize(("expires_in", "status"), [(60.0, 200), (60, 200), (60.5, 400), ("60", 400), (True, 400)])
def test_integer_fields_take_json_integers_written_with_a_fraction_of_zero(client, expires_in: object, status: int) -> None:
    assert client.post("/api/auth/token", json={"expires_in": expires_in}).status_code == status


ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


def timestamps_in(value: object, key: str = "") -> list[tuple[str, object]]:
    """Every (key, value) of a JSON document whose key names a time (`at`, `*_at`, `timestamp`)."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in timestamps_in(v, k)]
    if isinstance(value, list):
        return [found for item in value for found in timestamps_in(item, key)]
    return [(key, value)] if key in ("at", "timestamp") or key.endswith("_at") else []


def test_every_timestamp_the_api_shows_is_iso_8601_utc(app, client) -> None:
    services = app.extensions["quadra"]
    services.store.jobs.insert_if_capacity(JobRow(id="job_iso", status="cancelled", created_at=time.time(), created_by="t",
                                                  params={}, total_epochs=1, progress=[{"epoch": 1, "at": time.time()}]), 5)
    client.post("/api/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2]] * 40})
    client.post("/api/monitoring/baseline")
    client.post("/api/mode/maintenance", json={"reason": "iso"})
    services.alerts.raise_alert("health", "iso test", {})
    services.alerts.observe("drift", False, "no drift", {})
    found = []
    for path in ("/api/health", "/api/health/detailed", "/api/mode", "/api/model/versions", "/api/model/versions/1.0.0",
                 "/api/model/history", "/api/auth/keys", "/api/audit", "/api/monitoring/stats", "/api/monitoring/drift",
                 "/api/monitoring/alerts", "/api/train", "/api/train/job_iso"):
        found += timestamps_in(client.get(path).get_json())
    names = {name for name, _ in found}
    assert {"timestamp", "changed_at", "created_at", "at", "expires_at", "last_used_at", "first_at", "started_at"} <= names
    not_iso = [(name, value) for name, value in found if value is not None and not ISO_UTC.match(str(value))]
    assert not_iso == []
