"""The one error hierarchy: every `QuadraError` leaves the API as its status and code, the
operations that raise them answer so, and the CLI prints the same message and exits 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import set_key_columns
from utils import errors
from utils.cli import OperatorGroup
from utils.errors import QuadraError


def all_errors(base: type[QuadraError] = QuadraError) -> list[type[QuadraError]]:
    found = []
    for sub in base.__subclasses__():
        found += [sub, *all_errors(sub)]
    return found


def instance(error: type[QuadraError]) -> QuadraError:
    if issubclass(error, errors.TooManyRequests):
        return error("slow down", reset_at=0.0)
    return error(f"{error.__name__} happened")


def test_every_error_lives_in_the_one_module_and_each_429_has_one_code() -> None:
    assert all(error.__module__ == "utils.errors" for error in all_errors())
    assert {error.code for error in all_errors() if error.status == 429} == {"too_many_requests"}
    assert all(400 <= error.status < 600 for error in all_errors())


@pytest.mark.parametrize("error", all_errors(), ids=lambda error: error.__name__)
def test_each_error_raised_in_a_view_answers_its_status_code_and_message(app, client, error: type[QuadraError]) -> None:
    raised = instance(error)

    def view() -> None:
        raise raised

    app.add_url_rule(f"/test/raise/{error.__name__}", f"raise_{error.__name__}", view)
    response = client.get(f"/test/raise/{error.__name__}")
    assert response.status_code == error.status
    assert response.get_json() == {"error": {"code": error.code, "message": raised.message}}
    if error.status in (429, 503):
        assert int(response.headers["Retry-After"]) >= 1


def test_domain_errors_keep_the_builtin_bases_a_library_caller_catches() -> None:
    assert issubclass(errors.VersionNotFound, LookupError) and issubclass(errors.KeyNotFound, LookupError)
    assert issubclass(errors.JobNotFound, LookupError) and issubclass(errors.InvalidVersion, ValueError)
    assert issubclass(errors.IntegrityCheckFailed, ValueError) and issubclass(errors.Forbidden, PermissionError)
    assert issubclass(errors.InsufficientData, RuntimeError) and issubclass(errors.VersionConflict, RuntimeError)


def _corrupt_saved_version(client, state_dir: Path) -> None:
    assert client.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    artifact = state_dir / "models" / "1.1.0" / "model.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"!")


REAL_PATHS = [
    # (error, method, path, request kwargs, key to send: admin / read / none)
    (errors.InvalidRequest, "POST", "/api/auth/keys", {"json": {"name": "x", "permissions": ["read"], "rate_limit": "lots"}}, "admin"),
    (errors.InvalidJson, "POST", "/api/predict", {"data": "{", "content_type": "application/json"}, "admin"),
    (errors.InvalidInput, "POST", "/api/predict", {"json": {"inputs": [[1.0]]}}, "admin"),
    (errors.InvalidVersion, "POST", "/api/model/promote/-bad", {}, "admin"),
    (errors.InvalidParameter, "GET", "/api/train", {"query_string": {"limit": "0"}}, "admin"),
    (errors.InvalidMode, "POST", "/api/mode/party", {}, "admin"),
    (errors.InvalidTrainingData, "POST", "/api/train", {"json": {"data": {"features": [[1.0]], "labels": []}}}, "admin"),
    (errors.Unauthorized, "GET", "/api/model/versions", {}, None),
    (errors.Forbidden, "POST", "/api/model/save", {"json": {}}, "read"),
    (errors.VersionNotFound, "GET", "/api/model/versions/9.9.9", {}, "admin"),
    (errors.KeyNotFound, "DELETE", "/api/auth/keys/key_nope", {}, "admin"),
    (errors.JobNotFound, "GET", "/api/train/job_nope", {}, "admin"),
    (errors.VersionConflict, "POST", "/api/model/save", {"json": {"version": "1.0.0"}}, "admin"),
    (errors.WrongMode, "POST", "/api/train", {"json": {}}, "admin"),
    (errors.InsufficientData, "POST", "/api/monitoring/baseline", {}, "admin"),
    (errors.UnsupportedMediaType, "POST", "/api/predict", {"data": "1", "content_type": "text/plain"}, "admin"),
    (errors.IntegrityCheckFailed, "POST", "/api/model/load/1.1.0", {}, "admin"),
    (errors.InvalidArtifact, "POST", "/api/model/versions",
     {"data": {"artifact": (io.BytesIO(b"not weights"), "m.safetensors"),
               "metadata": json.dumps({"config": {"architecture": "mlp", "input_dim": 4, "num_classes": 3}})},
      "content_type": "multipart/form-data"}, "admin"),
]


@pytest.mark.parametrize(("error", "method", "path", "kwargs", "key"), REAL_PATHS, ids=[row[0].__name__ for row in REAL_PATHS])
def test_operations_answer_their_domain_errors(app, client, anonymous, state_dir: Path, api_keys: dict[str, str],
                                               error: type[QuadraError], method: str, path: str, kwargs: dict, key: str | None) -> None:
    if error is errors.IntegrityCheckFailed:
        _corrupt_saved_version(client, state_dir)
    headers = {"X-API-Key": api_keys[key]} if key else {}
    caller = client if key else anonymous
    response = caller.open(path, method=method, headers=headers, **kwargs)
    assert (response.status_code, response.get_json()["error"]["code"]) == (error.status, error.code)
    assert client.get("/api/health").status_code == 200


def test_rotating_a_revoked_key_is_a_conflict(client) -> None:
    key_id = client.post("/api/auth/keys", json={"name": "short-lived", "permissions": ["read"]}).get_json()["id"]
    assert client.delete(f"/api/auth/keys/{key_id}").status_code == 200
    response = client.post(f"/api/auth/keys/{key_id}/rotate", json={})
    assert (response.status_code, response.get_json()["error"]["code"]) == (409, "conflict")


def test_maintenance_refuses_predictions_with_its_retry_after(client, settings) -> None:
    assert client.post("/api/mode/maintenance", json={"reason": "disk swap"}).status_code == 200
    response = client.post("/api/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2]]})
    assert (response.status_code, response.get_json()["error"]["code"]) == (503, "maintenance")
    assert response.headers["Retry-After"] == str(settings.maintenance_retry_after)


@pytest.mark.parametrize("error", [errors.KeyNotFound, errors.InsufficientData, errors.IntegrityCheckFailed])
def test_the_cli_prints_the_message_and_exits_1(error: type[QuadraError]) -> None:
    group = OperatorGroup("demo")

    @group.command("fail")
    def fail() -> None:
        raise error("what the API would say")

    result = CliRunner().invoke(group, ["fail"])
    assert result.exit_code == 1 and result.output.strip() == "Error: what the API would say"


def test_cli_commands_answer_domain_errors_like_the_api(app) -> None:
    runner = app.test_cli_runner()
    for args, message in ((["keys", "revoke", "key_nope"], "API key key_nope not found"),
                          (["train", "status", "job_nope"], "training job job_nope not found"),
                          (["monitoring", "baseline", "set"], "at least"),
                          (["registry", "delete", "9.9.9"], "9.9.9")):
        result = runner.invoke(args=args)
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, (args, result.output)


def test_restoring_a_file_that_is_not_a_backup_is_a_clear_cli_error(app, tmp_path: Path) -> None:
    import io
    import tarfile

    not_tar = tmp_path / "notes.tar.gz"
    not_tar.write_text("hello")
    bad_manifest = tmp_path / "bad.tar.gz"
    with tarfile.open(bad_manifest, "w:gz") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"{]["))
    runner = app.test_cli_runner()
    for source in (not_tar, bad_manifest):
        result = runner.invoke(args=["registry", "restore", str(source)])
        assert result.exit_code == 1 and result.output.startswith("Error: not a Quadra registry backup"), result.output
    assert "1.0.0" in runner.invoke(args=["registry", "list"]).output


def test_a_key_with_a_limit_an_earlier_release_accepted_still_rotates(app, client) -> None:
    created = client.post("/api/auth/keys", json={"name": "legacy", "permissions": ["read"]}).get_json()
    set_key_columns(app.extensions["quadra"].store, created["id"], rate_limit="10 per 05 minutes")
    rotated = client.post(f"/api/auth/keys/{created['id']}/rotate", json={"grace_seconds": 60})
    assert rotated.status_code == 201 and rotated.get_json()["rate_limit"] == "10 per 05 minutes"
    refused = client.post("/api/auth/keys", json={"name": "new", "permissions": ["read"], "rate_limit": "10 per 05 minutes"})
    assert refused.status_code == 400 and "is not valid; use e.g." in refused.get_json()["error"]["message"]
