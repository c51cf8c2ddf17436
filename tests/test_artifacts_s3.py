"""The registry on a real S3-compatible server (SeaweedFS): upload, streamed verified download,
the per-host cache, archive, delete, and what an outage does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from utils import registry_archive
from utils.errors import IntegrityCheckFailed
from utils.model_versioning import ModelVersionManager
from utils.registry_backup import backup
from utils.s3_artifacts import S3ArtifactStore
from utils.serving import build_model
from utils.store import Store

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8]}


@pytest.fixture
def s3_registry(s3_server: dict, s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelVersionManager:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    artifacts = S3ArtifactStore(s3_uri, tmp_path / "models", tmp_path / "cache")
    return ModelVersionManager(tmp_path / "models", Store(f"sqlite:///{tmp_path / 'q.db'}"), True, artifacts)


def objects(registry: ModelVersionManager) -> list[str]:
    store = registry.artifacts
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_save_uploads_and_load_verifies_through_the_cache(s3_registry: ModelVersionManager, tmp_path: Path) -> None:
    model = build_model(CONFIG)
    info = s3_registry.save_model(model, "1.0.0", config=CONFIG)
    assert objects(s3_registry) == ["models/1.0.0/config.json", "models/1.0.0/model.safetensors"]
    assert not (tmp_path / "models" / "1.0.0").exists()
    loaded = s3_registry.load_model(build_model(CONFIG), "1.0.0")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    cached = tmp_path / "cache" / info.sha256
    assert cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == info.sha256
    assert s3_registry.artifacts.check() and s3_registry.verify_version("1.0.0")["ok"]


def test_tampered_object_is_refused_and_never_cached(s3_registry: ModelVersionManager, tmp_path: Path) -> None:
    info = s3_registry.save_model(build_model(CONFIG), "1.0.0", config=CONFIG)
    store = s3_registry.artifacts
    key = store._object("1.0.0/model.safetensors")
    data = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityCheckFailed):
        s3_registry.load_model(build_model(CONFIG), "1.0.0")
    assert not (tmp_path / "cache" / info.sha256).exists()


def test_large_artifacts_go_up_in_parts(s3_registry: ModelVersionManager) -> None:
    config = {**CONFIG, "input_dim": 4096, "hidden_dims": [2048]}  # ~34 MB of float32 weights
    model = build_model(config)
    info = s3_registry.save_model(model, "2.0.0", config=config)
    store = s3_registry.artifacts
    head = store.client.head_object(Bucket=store.bucket, Key=store._object("2.0.0/model.safetensors"))
    assert "-" in head["ETag"] and head["ContentLength"] == info.size_bytes  # a multipart ETag
    assert s3_registry.verify_version("2.0.0")["ok"]
    for _ in range(2):  # the download, then the host cache
        state, _ = s3_registry.read_state_dict("2.0.0")
        assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_a_tampered_host_cache_is_refused(s3_registry: ModelVersionManager, tmp_path: Path) -> None:
    info = s3_registry.save_model(build_model(CONFIG), "1.0.0", config=CONFIG)
    s3_registry.load_model(build_model(CONFIG), "1.0.0")
    cached = tmp_path / "cache" / info.sha256
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(IntegrityCheckFailed):
        s3_registry.load_model(build_model(CONFIG), "1.0.0")
    assert s3_registry.verify_version("1.0.0")["ok"] is False


def test_archive_delete_and_backup_on_s3(s3_registry: ModelVersionManager, tmp_path: Path) -> None:
    s3_registry.save_model(build_model(CONFIG), "1.0.0", config=CONFIG)
    s3_registry.save_model(build_model(CONFIG), "1.1.0", config=CONFIG)
    s3_registry.promote_to_production("1.0.0")
    registry_archive.archive(s3_registry, "1.1.0")
    assert "models/1.1.0/model.safetensors.gz" in objects(s3_registry)
    registry_archive.restore_archived(s3_registry, "1.1.0")
    assert s3_registry.verify_version("1.1.0")["ok"]
    assert backup(s3_registry, tmp_path / "b.tar.gz")["versions"] == 2
    s3_registry.delete_version("1.1.0")
    assert not any(key.startswith("models/1.1.0/") for key in objects(s3_registry))
