"""Bringing a model trained elsewhere in (import) and taking a version out (export): over
HTTP, the CLI and the Python API; every bad upload is a clear error that leaves nothing behind."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from utils import model_import
from utils.errors import ArtifactTooLarge, IntegrityCheckFailed, InvalidArtifact, VersionConflict
from utils.model_versioning import ModelVersionManager
from utils.serving import build_model

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8]}
SETOSA = [5.1, 3.5, 1.4, 0.2]


def trained_elsewhere(config: dict = CONFIG, seed: int = 7) -> dict[str, torch.Tensor]:
    """The state dict of a model built (as another process would) from `config`."""
    torch.manual_seed(seed)
    return {name: tensor.contiguous() for name, tensor in build_model(config).state_dict().items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def upload(client, artifact: bytes, metadata: dict | str, filename: str = "model.safetensors"):
    fields = {"artifact": (io.BytesIO(artifact), filename),
              "metadata": metadata if isinstance(metadata, str) else json.dumps(metadata)}
    return client.post("/api/model/versions", data=fields, content_type="multipart/form-data")


def leftovers(state_dir: Path) -> list[str]:
    """What an import may leave in the models folder besides committed versions: staged files."""
    return sorted(str(p.relative_to(state_dir)) for p in (state_dir / "models" / ".staging").glob("**/*"))


def versions(client) -> set[str]:
    return {v["version"] for v in client.get("/api/model/versions").get_json()["versions"]}


# -- HTTP -----------------------------------------------------------------------------------


def test_import_then_serve_and_export_round_trip(client, state_dir: Path) -> None:
    artifact = safetensors_bytes(trained_elsewhere())
    sha256 = hashlib.sha256(artifact).hexdigest()
    response = upload(client, artifact, {"config": CONFIG, "version": "5.0.0", "description": "from the lab",
                                         "tags": ["lab"], "metrics": {"accuracy": 0.93}, "sha256": sha256})
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert (created["version"], created["sha256"], created["size_bytes"]) == ("5.0.0", sha256, len(artifact))
    assert created["config"] == CONFIG and created["tags"] == ["lab"] and created["metrics"] == {"accuracy": 0.93}
    assert created["training_info"] == {"imported": True, "filename": "model.safetensors"}
    assert client.post("/api/model/promote/5.0.0").status_code == 200
    predicted = client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()
    assert predicted["model_version"] == "5.0.0"

    exported = client.get("/api/model/versions/5.0.0/artifact")
    assert exported.status_code == 200 and exported.mimetype == "application/octet-stream"
    assert exported.data == artifact
    assert exported.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha256)).decode()}:"
    again = upload(client, exported.data, {"config": client.get("/api/model/versions/5.0.0").get_json()["config"],
                                           "version": "5.0.1"})
    assert again.status_code == 201 and again.get_json()["sha256"] == sha256
    assert leftovers(state_dir) == []


def test_import_without_a_version_gets_a_timestamp_version(client) -> None:
    response = upload(client, safetensors_bytes(trained_elsewhere()), {"config": CONFIG})
    assert response.status_code == 201 and response.get_json()["version"][:2] == "20"


BAD_UPLOADS = {
    "unknown architecture": ({**CONFIG, "architecture": "resnet"}, None, 422, "unknown architecture"),
    "wrong shapes": ({**CONFIG, "hidden_dims": [16]}, None, 422, "where architecture 'mlp' has"),
    "missing weights": (CONFIG, lambda t: {k: v for k, v in list(t.items())[1:]}, 422, "missing"),
    "wrong dtype": (CONFIG, lambda t: {k: v.double() for k, v in t.items()}, 422, "torch.float64"),
    "non-finite outputs": (CONFIG, lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, 422, "finite"),
    "hidden_dims not a list": ({**CONFIG, "hidden_dims": 5}, None, 422, "config:"),
    "a negative width": ({**CONFIG, "hidden_dims": [-1]}, None, 422, "config:"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_weights_that_do_not_fit_are_refused_and_nothing_is_left(client, state_dir: Path, case: str) -> None:
    config, change, status, message = BAD_UPLOADS[case]
    tensors = trained_elsewhere()
    before = versions(client)
    response = upload(client, safetensors_bytes(change(tensors) if change else tensors), {"config": config,
                                                                                           "version": "6.0.0"})
    assert response.status_code == status and response.get_json()["error"]["code"] == "invalid_artifact"
    assert message in response.get_json()["error"]["message"]
    assert versions(client) == before and not (state_dir / "models" / "6.0.0").exists() and leftovers(state_dir) == []


def _pickle_bytes() -> bytes:
    return pickle.dumps({"weight": [1.0, 2.0]}, protocol=4)


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(trained_elsewhere(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("payload", "filename", "message"), [
    (_pickle_bytes, "model.safetensors", "is a pickle"),
    (_torch_save_bytes, "model.safetensors", "torch.save or TorchScript archive"),
    (lambda: safetensors_bytes(trained_elsewhere()), "model.pt", "save_file(model.state_dict()"),
    (lambda: b"plain text, not weights", "model.safetensors", "not a safetensors file"),
    (lambda: safetensors_bytes(trained_elsewhere())[:-10], "model.safetensors", "not a complete safetensors file"),
    (lambda: b"", "model.safetensors", "empty"),
    (lambda: len(b"{" + b'{"a":' * 50_000).to_bytes(8, "little") + b"{" + b'{"a":' * 50_000, "model.safetensors",
     "not a complete safetensors file"),
])
def test_pickles_torchscript_and_broken_files_are_refused_with_the_way_out(client, state_dir: Path, payload,
                                                                          filename: str, message: str) -> None:
    response = upload(client, payload(), {"config": CONFIG, "version": "6.1.0"}, filename=filename)
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "invalid_artifact"
    assert message in response.get_json()["error"]["message"]
    assert "6.1.0" not in versions(client) and leftovers(state_dir) == []


def test_a_hash_that_differs_is_refused(client, state_dir: Path) -> None:
    response = upload(client, safetensors_bytes(trained_elsewhere()), {"config": CONFIG, "version": "6.2.0",
                                                                        "sha256": "0" * 64})
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "integrity_check_failed"
    assert "6.2.0" not in versions(client) and leftovers(state_dir) == []


def test_path_tricks_in_the_filename_only_name_the_upload(client, state_dir: Path, tmp_path: Path) -> None:
    response = upload(client, safetensors_bytes(trained_elsewhere()), {"config": CONFIG, "version": "6.3.0"},
                      filename="../../../../tmp/evil.safetensors")
    assert response.status_code == 201
    assert response.get_json()["training_info"]["filename"] == "evil.safetensors"
    assert (state_dir / "models" / "6.3.0" / "model.safetensors").is_file()


def test_an_existing_version_is_a_conflict(client, state_dir: Path) -> None:
    artifact = safetensors_bytes(trained_elsewhere())
    assert upload(client, artifact, {"config": CONFIG, "version": "6.4.0"}).status_code == 201
    response = upload(client, artifact, {"config": CONFIG, "version": "6.4.0"})
    assert response.status_code == 409 and leftovers(state_dir) == []


@pytest.mark.parametrize(("fields", "content_type", "status", "code"), [
    ({"metadata": json.dumps({"config": CONFIG})}, "multipart/form-data", 400, "invalid_body"),
    ({"artifact": (io.BytesIO(b"x"), "m.safetensors")}, "multipart/form-data", 400, "invalid_body"),
    ({"artifact": (io.BytesIO(b"x"), "m.safetensors"), "metadata": "{not json"}, "multipart/form-data", 400,
     "invalid_json"),
    ({"artifact": (io.BytesIO(b"x"), "m.safetensors"), "metadata": json.dumps({"config": CONFIG, "extra": 1})},
     "multipart/form-data", 400, "invalid_body"),
    ({"artifact": (io.BytesIO(b"x"), "m.safetensors"), "metadata": json.dumps({"config": CONFIG, "version": "../x"})},
     "multipart/form-data", 400, "invalid_version"),
])
def test_malformed_multipart_bodies_are_400(client, fields: dict, content_type: str, status: int, code: str) -> None:
    response = client.post("/api/model/versions", data=fields, content_type=content_type)
    assert response.status_code == status and response.get_json()["error"]["code"] == code


def test_a_json_body_is_415(client) -> None:
    response = client.post("/api/model/versions", json={"config": CONFIG})
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_media_type"


def test_import_needs_write_and_export_read(anonymous, api_keys: dict[str, str]) -> None:
    artifact = safetensors_bytes(trained_elsewhere())
    fields = {"artifact": (io.BytesIO(artifact), "m.safetensors"), "metadata": json.dumps({"config": CONFIG})}
    refused = anonymous.post("/api/model/versions", data=fields, content_type="multipart/form-data",
                             headers={"X-API-Key": api_keys["read"]})
    assert refused.status_code == 403
    assert anonymous.get("/api/model/versions/1.0.0/artifact").status_code == 401


def test_exporting_a_corrupted_or_missing_version_is_a_json_error(client, state_dir: Path) -> None:
    assert client.get("/api/model/versions/9.9.9/artifact").status_code == 404
    assert upload(client, safetensors_bytes(trained_elsewhere()), {"config": CONFIG, "version": "6.5.0"}).status_code == 201
    path = state_dir / "models" / "6.5.0" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    response = client.get("/api/model/versions/6.5.0/artifact")
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "integrity_check_failed"


def test_an_archived_version_is_not_exported_until_restored(client) -> None:
    assert upload(client, safetensors_bytes(trained_elsewhere()), {"config": CONFIG, "version": "6.7.0"}).status_code == 201
    result = client.application.test_cli_runner().invoke(args=["registry", "archive", "6.7.0"])
    assert result.exit_code == 0, result.output
    response = client.get("/api/model/versions/6.7.0/artifact")
    assert response.status_code == 409 and "restore it first" in response.get_json()["error"]["message"]


def test_an_artifact_over_the_limit_is_413_and_nothing_is_left(state_dir: Path, api_keys: dict[str, str]) -> None:
    from app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(state_dir, max_artifact_bytes=2048))
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = api_keys["admin"]
    response = upload(client, safetensors_bytes(trained_elsewhere({**CONFIG, "hidden_dims": [64]})),
                      {"config": {**CONFIG, "hidden_dims": [64]}, "version": "6.6.0"})
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "artifact_too_large"
    assert "QUADRA_MAX_ARTIFACT_BYTES" in response.get_json()["error"]["message"] and leftovers(state_dir) == []
    app.extensions["quadra"].store.database.dispose()


# -- Python API and CLI ---------------------------------------------------------------------


def test_python_api_import_checks_size_hash_and_content(registry: ModelVersionManager) -> None:
    artifact = safetensors_bytes(trained_elsewhere())
    with pytest.raises(ArtifactTooLarge):
        model_import.import_version(registry, io.BytesIO(artifact), CONFIG, max_bytes=len(artifact) - 1)
    with pytest.raises(IntegrityCheckFailed):
        model_import.import_version(registry, io.BytesIO(artifact), CONFIG, max_bytes=10**9, sha256="f" * 64)
    with pytest.raises(InvalidArtifact, match="config: must be a JSON object"):
        model_import.import_version(registry, io.BytesIO(artifact), ["not", "a", "dict"], max_bytes=10**9)
    imported = model_import.import_version(registry, io.BytesIO(artifact), CONFIG, max_bytes=10**9, version="1.0.0")
    assert imported.sha256 == hashlib.sha256(artifact).hexdigest() and registry.list_versions()[0]["version"] == "1.0.0"
    with pytest.raises(VersionConflict):
        model_import.import_version(registry, io.BytesIO(artifact), CONFIG, max_bytes=10**9, version="1.0.0")
    assert list((registry.models_dir / ".staging").glob("**/*")) == []


def test_cli_export_then_import_moves_a_version_between_deployments(app, tmp_path: Path, state_dir: Path) -> None:
    runner = app.test_cli_runner()
    production = app.extensions["quadra"].registry.get_production_version()
    exported = runner.invoke(args=["registry", "export", production, str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    artifact, config = tmp_path / "out" / "model.safetensors", tmp_path / "out" / "config.json"
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    imported = runner.invoke(args=["registry", "import", str(artifact), "--config", str(config), "--version", "7.0.0",
                                   "--tags", "moved, staging", "--metrics", str(tmp_path / "metrics.json"),
                                   "--sha256", sha256])
    assert imported.exit_code == 0, imported.output
    info = app.extensions["quadra"].registry.get_version_info("7.0.0")
    assert info["sha256"] == sha256 and info["tags"] == ["moved", "staging"] and info["metrics"] == {"accuracy": 0.9}
    refused = runner.invoke(args=["registry", "export", production, str(tmp_path / "out")])
    assert refused.exit_code == 1 and "already holds model.safetensors and config.json" in refused.output
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == sha256  # never overwritten
    (tmp_path / "broken.json").write_text("{not json")
    refused = runner.invoke(args=["registry", "import", str(artifact), "--config", str(config),
                                  "--metrics", str(tmp_path / "broken.json")])
    assert refused.exit_code == 1 and "broken.json is not a readable JSON file" in refused.output
    (tmp_path / "list.json").write_text("[1, 2]")
    refused = runner.invoke(args=["registry", "import", str(artifact), "--config", str(config),
                                  "--metrics", str(tmp_path / "list.json"), "--version", "7.1.0"])
    assert refused.exit_code == 1 and refused.output.startswith("Error: metrics:")
    refused = runner.invoke(args=["registry", "import", str(artifact), "--config", str(config), "--version", "../x"])
    assert refused.exit_code == 1 and "version" in refused.output and "7.1.0" not in str(runner.invoke(
        args=["registry", "list"]).output)
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(_pickle_bytes())
    refused = runner.invoke(args=["registry", "import", str(pickled), "--config", str(config)])
    assert refused.exit_code == 1 and "save_file(model.state_dict()" in refused.output


def test_a_file_written_by_save_file_imports(registry: ModelVersionManager, tmp_path: Path) -> None:
    """What the refusal messages tell people to run produces an importable file."""
    path = tmp_path / "model.safetensors"
    save_file(trained_elsewhere(seed=3), path)
    with open(path, "rb") as source:
        imported = model_import.import_version(registry, source, CONFIG, max_bytes=10**9, filename=str(path))
    assert imported.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


class _WithNonPersistentState(torch.nn.Module):
    """An architecture with state outside its state dict (a non-persistent buffer)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(config["input_dim"], config["num_classes"])
        self.register_buffer("offset", torch.ones(config["num_classes"]), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs) + self.offset


def test_an_architecture_with_state_outside_its_state_dict_imports(registry: ModelVersionManager,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.serving import ARCHITECTURES

    monkeypatch.setitem(ARCHITECTURES, "test_nonpersistent", _WithNonPersistentState)
    config = {"architecture": "test_nonpersistent", "input_dim": 4, "num_classes": 3}
    artifact = safetensors_bytes(trained_elsewhere(config))
    imported = model_import.import_version(registry, io.BytesIO(artifact), config, max_bytes=10**9, version="2.0.0")
    assert imported.sha256 == hashlib.sha256(artifact).hexdigest()
