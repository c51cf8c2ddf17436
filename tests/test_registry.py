"""The registry on SQLite and PostgreSQL: the seed's API and the governance around it."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from utils import registry_archive
from utils.model_versioning import (
    IntegrityCheckFailed,
    InvalidVersion,
    ModelVersionManager,
    VersionConflict,
    VersionNotFound,
    compare_model_versions,
    generate_version_string,
    validate_version,
)
from utils.registry_backup import backup, restore
from utils.serving import build_model
from utils.store import Store
from utils.store.tables import promotions

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8]}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CONFIG)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def artifact(registry: ModelVersionManager, version: str) -> Path:
    return registry.models_dir / version / "model.safetensors"


@pytest.mark.parametrize("version", ["1.2.0", "0.0.1", "2.1.3-beta", "1.0.0-rc.1", "20241221-143022", "train-20241221-143022"])
def test_valid_versions(version: str) -> None:
    assert validate_version(version) == version


@pytest.mark.parametrize(
    "version",
    ["", "1.2.0\n", "\u0661.2.0", "1.2", "v1.2.0", "../x", "..", "%2e%2e", "/etc/passwd", "1.0.0/../../x", "1.0.0\x00", "a" * 65,
     "1.0.0 ", "01.0.0", "1.0.0-", "TRAIN-20241221-143022", None, 120],
)
def test_invalid_versions_are_refused(version: object) -> None:
    with pytest.raises(InvalidVersion):
        validate_version(version)


def test_generate_version_string() -> None:
    assert re.fullmatch(r"\d{8}-\d{6}", generate_version_string())
    assert re.fullmatch(r"train-\d{8}-\d{6}", generate_version_string("train"))
    validate_version(generate_version_string("train"))
    with pytest.raises(InvalidVersion):
        generate_version_string("../x")


def test_save_load_round_trip(registry: ModelVersionManager) -> None:
    model = make_model(1)
    info = registry.save_model(model, "1.0.0", metrics={"accuracy": 0.9}, config=CONFIG, description="first", tags=["a", "b"])
    assert info.version == "1.0.0" and len(info.sha256) == 64 and info.size_bytes > 0
    assert info.metrics == {"accuracy": 0.9} and info.tags == ["a", "b"] and info.description == "first"
    assert info.file_path == str(registry.models_dir / "1.0.0" / "model.safetensors") and info.created_at.endswith("Z")
    assert info.to_dict()["config"] == CONFIG and registry.registry == {"1.0.0": info}
    loaded = registry.load_model(make_model(2), "1.0.0")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    stored_config = json.loads((registry.models_dir / "1.0.0" / "config.json").read_text())
    assert stored_config == CONFIG


def test_artifacts_hold_no_pickle(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    data = artifact(registry, "1.0.0").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    assert header["__metadata__"]["format"] == "pt"
    assert b"\x80\x04" not in data[:16] and not data.startswith(b"PK")


def _outside_copy(registry: ModelVersionManager, version: str, tmp_path: Path) -> Path:
    """A byte-identical copy of a version's folder outside the models folder."""
    outside = tmp_path / "outside" / version
    outside.parent.mkdir(exist_ok=True)
    shutil.copytree(registry.models_dir / version, outside)
    return outside


def _refused_everywhere(registry: ModelVersionManager, version: str, tmp_path: Path, reason: str) -> None:
    """Load, promote, serve, verify and backup all refuse the artifact as an integrity failure."""
    for attempt in (lambda: registry.load_model(make_model(), version), lambda: registry.promote_to_production(version),
                    lambda: registry.set_serving_version(version), lambda: backup(registry, tmp_path / "backup.tar.gz")):
        with pytest.raises(IntegrityCheckFailed, match=reason):
            attempt()
    assert registry.verify_version(version)["ok"] is False
    assert registry.get_production_version() is None


def test_an_artifact_linked_to_a_file_outside_the_models_folder_is_refused(registry: ModelVersionManager, tmp_path: Path) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    outside = _outside_copy(registry, "1.0.0", tmp_path)
    artifact(registry, "1.0.0").unlink()
    artifact(registry, "1.0.0").symlink_to(outside / "model.safetensors")
    _refused_everywhere(registry, "1.0.0", tmp_path, "outside its folder")


def test_a_version_folder_linked_outside_the_models_folder_is_refused(registry: ModelVersionManager, tmp_path: Path) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    outside = _outside_copy(registry, "1.0.0", tmp_path)
    shutil.rmtree(registry.models_dir / "1.0.0")
    (registry.models_dir / "1.0.0").symlink_to(outside, target_is_directory=True)
    _refused_everywhere(registry, "1.0.0", tmp_path, "outside its folder")


@pytest.mark.parametrize("replacement", ["directory", "fifo", "dangling link"])
def test_an_artifact_that_is_not_a_readable_file_fails_the_integrity_check(
        registry: ModelVersionManager, tmp_path: Path, replacement: str) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    path = artifact(registry, "1.0.0")
    path.unlink()
    if replacement == "directory":
        path.mkdir()
    elif replacement == "fifo":
        os.mkfifo(path)  # opening it must not wait for a writer
    else:
        path.symlink_to(tmp_path / "gone")
    _refused_everywhere(registry, "1.0.0", tmp_path, "integrity check failed")


def test_a_save_never_writes_through_a_link(registry: ModelVersionManager, tmp_path: Path) -> None:
    """A leftover link where a new version's folder goes, and a linked staging folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (registry.models_dir / "2.0.0").symlink_to(outside, target_is_directory=True)
    registry.save_model(make_model(), "2.0.0", config=CONFIG)
    assert list(outside.iterdir()) == [] and not (registry.models_dir / "2.0.0").is_symlink()
    assert registry.verify_version("2.0.0")["ok"]
    shutil.rmtree(registry.models_dir / ".staging")
    (registry.models_dir / ".staging").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="outside its folder"):
        registry.save_model(make_model(), "2.1.0", config=CONFIG)
    assert list(outside.iterdir()) == [] and "2.1.0" not in registry.registry


def test_archiving_into_a_linked_version_folder_is_refused(registry: ModelVersionManager, tmp_path: Path) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    outside = _outside_copy(registry, "1.0.0", tmp_path)
    shutil.rmtree(registry.models_dir / "1.0.0")
    (registry.models_dir / "1.0.0").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityCheckFailed, match="outside its folder"):
        registry_archive.archive(registry, "1.0.0")
    assert sorted(p.name for p in outside.iterdir()) == ["config.json", "model.safetensors"]


def test_saving_an_existing_version_is_a_conflict(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(1), "1.0.0", config=CONFIG)
    sha = registry.get_version_info("1.0.0")["sha256"]
    with pytest.raises(VersionConflict):
        registry.save_model(make_model(2), "1.0.0", config=CONFIG)
    assert registry.get_version_info("1.0.0")["sha256"] == sha
    assert registry.verify_version("1.0.0")["ok"]
    assert not list((registry.models_dir / ".staging").iterdir())


def test_integrity_failure_refuses_load_and_promote(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    registry.promote_to_production("1.0.0")
    registry.save_model(make_model(1), "1.1.0", config=CONFIG)
    flip_byte(artifact(registry, "1.1.0"))
    with pytest.raises(ValueError, match="integrity check failed"):
        registry.load_model(make_model(), "1.1.0")
    with pytest.raises(IntegrityCheckFailed):
        registry.promote_to_production("1.1.0")
    assert registry.get_production_version() == "1.0.0"
    assert registry.verify_version("1.1.0")["ok"] is False


def test_unreadable_artifact_without_verification_is_still_refused(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    artifact(registry, "1.0.0").write_bytes(b"not a safetensors file")
    with pytest.raises(IntegrityCheckFailed, match="unreadable"):
        registry.load_model(make_model(), "1.0.0", verify_integrity=False)


def big_model() -> torch.nn.Module:
    """About 20 MB of weights: large enough to be read and hashed in a pipeline of chunks."""
    torch.manual_seed(0)
    return torch.nn.Linear(1024, 5120, bias=False)


@pytest.mark.parametrize("build", [make_model, big_model], ids=["small", "large"])
def test_load_returns_identical_tensors_and_refuses_any_flipped_byte(registry: ModelVersionManager, build) -> None:
    model = build()
    registry.save_model(model, "1.0.0", config={})
    state, _ = registry.read_state_dict("1.0.0")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    flip_byte(artifact(registry, "1.0.0"))
    with pytest.raises(IntegrityCheckFailed, match="expected sha256"):
        registry.read_state_dict("1.0.0")


def test_every_load_is_verified_again(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(1), "1.0.0", config=CONFIG)
    registry.load_model(make_model(), "1.0.0")
    flip_byte(artifact(registry, "1.0.0"))
    with pytest.raises(IntegrityCheckFailed):
        registry.load_model(make_model(), "1.0.0")


def test_a_refused_load_leaves_the_model_untouched(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(1), "1.0.0", config=CONFIG)
    flip_byte(artifact(registry, "1.0.0"))
    target = make_model(2)
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(IntegrityCheckFailed):
        registry.load_model(target, "1.0.0")
    assert all(torch.equal(before[name], tensor) for name, tensor in target.state_dict().items())


def test_loaded_tensors_do_not_change_with_the_file(registry: ModelVersionManager) -> None:
    """The tensors are a private copy of the verified bytes, not a view of the file."""
    registry.save_model(make_model(1), "1.0.0", config=CONFIG)
    state, _ = registry.read_state_dict("1.0.0")
    before = {name: tensor.clone() for name, tensor in state.items()}
    data = artifact(registry, "1.0.0").read_bytes()
    artifact(registry, "1.0.0").write_bytes(data[:8] + data[8:].replace(b"\x00", b"\x01"))
    assert all(torch.equal(before[name], tensor) for name, tensor in state.items())


class MixedTensors(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 5).half())
        self.register_buffer("brain", torch.randn(7).bfloat16())
        self.register_buffer("wide", torch.randn(2, 2, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(42))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("codes", torch.arange(-3, 3, dtype=torch.int8))
        self.register_buffer("empty", torch.zeros(0, 4))


def test_every_dtype_and_shape_round_trips(registry: ModelVersionManager) -> None:
    model = MixedTensors()
    registry.save_model(model, "1.0.0", config={})
    state, _ = registry.read_state_dict("1.0.0")
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape
        assert torch.equal(state[name], tensor)
    assert torch.equal(registry.load_model(MixedTensors(), "1.0.0").weight, model.weight)


def safetensors_bytes(header: Any, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
MALFORMED = {
    "empty file": b"",
    "header past the end": (1 << 40).to_bytes(8, "little") + b"{}",
    "header not json": b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{",
    "header not an object": safetensors_bytes([1, 2], b""),
    "unknown dtype": safetensors_bytes({"w": {**F32, "dtype": "X9"}}, bytes(4)),
    "size does not match shape": safetensors_bytes({"w": {**F32, "shape": [2]}}, bytes(4)),
    "negative dimension": safetensors_bytes({"w": {**F32, "shape": [-1], "data_offsets": [0, 0]}}, b""),
    "overlapping tensors": safetensors_bytes({"a": F32, "b": F32}, bytes(4)),
    "gap before a tensor": safetensors_bytes({"w": {**F32, "data_offsets": [4, 8]}}, bytes(8)),
    "data shorter than the header says": safetensors_bytes({"w": F32}, bytes(3)),
    "data longer than the header says": safetensors_bytes({"w": F32}, bytes(5)),
    "entry not an object": safetensors_bytes({"w": "F32"}, bytes(4)),
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_artifacts_are_refused_even_without_verification(registry: ModelVersionManager, content: bytes) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    artifact(registry, "1.0.0").write_bytes(content)
    with pytest.raises(IntegrityCheckFailed, match="unreadable"):
        registry.read_state_dict("1.0.0", verify_integrity=False)
    with pytest.raises(IntegrityCheckFailed):
        registry.read_state_dict("1.0.0")


def test_missing_artifact_is_an_integrity_failure(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    artifact(registry, "1.0.0").unlink()
    with pytest.raises(IntegrityCheckFailed, match="missing"):
        registry.load_model(make_model(), "1.0.0")


def test_list_filter_latest_and_registry_mirror(registry: ModelVersionManager) -> None:
    assert registry.get_latest_version() is None and registry.list_versions() == []
    registry.save_model(make_model(), "1.0.0", config=CONFIG, tags=["stable"])
    registry.save_model(make_model(), "1.1.0", config=CONFIG, tags=["stable", "canary"])
    registry.save_model(make_model(), "train-20241221-143022", config=CONFIG)
    assert [v["version"] for v in registry.list_versions()] == ["1.0.0", "1.1.0", "train-20241221-143022"]
    assert [v["version"] for v in registry.list_versions(tags="canary")] == ["1.1.0"]
    assert [v["version"] for v in registry.list_versions(tags=["stable"])] == ["1.0.0", "1.1.0"]
    assert registry.get_latest_version() == "train-20241221-143022"
    registry.promote_to_production("1.1.0")
    mirror = json.loads((registry.models_dir / "model_registry.json").read_text())
    assert mirror["production_version"] == "1.1.0" and set(mirror["versions"]) == {"1.0.0", "1.1.0", "train-20241221-143022"}
    assert registry.registry_document()["production_version"] == "1.1.0"


def test_promote_rollback_and_history(registry: ModelVersionManager) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        registry.save_model(make_model(), version, config=CONFIG)
    with pytest.raises(VersionConflict):
        registry.rollback()
    registry.promote_to_production("1.0.0", actor="alice")
    registry.promote_to_production("1.1.0", actor="bob")
    assert registry.promote_to_production("1.2.0") == {"production_version": "1.2.0", "previous_version": "1.1.0",
                                                        "changed": True, "message": "1.2.0 is now production"}
    rolled_back = registry.rollback(actor="carol")
    assert (rolled_back["production_version"], rolled_back["previous_version"], rolled_back["changed"]) == ("1.1.0", "1.2.0", True)
    assert registry.rollback()["production_version"] == "1.0.0"
    with pytest.raises(VersionConflict):
        registry.rollback()
    assert registry.get_production_version() == registry.get_serving_version() == "1.0.0"
    history = registry.promotion_history()
    assert [(h["action"], h["to_version"]) for h in history][:3] == [("rollback", "1.0.0"), ("rollback", "1.1.0"), ("promote", "1.2.0")]
    assert history[-1]["actor"] == "alice" and history[-1]["at"].endswith("Z")


def test_promoting_the_production_version_again_changes_nothing(registry: ModelVersionManager) -> None:
    """Promote 2.0.0, 2.1.0, 2.1.0 again: no "2.1.0 -> 2.1.0" step, so rollbacks walk back."""
    for version in ("1.0.0", "2.0.0", "2.1.0"):
        registry.save_model(make_model(), version, config=CONFIG)
    for version in ("1.0.0", "2.0.0", "2.1.0"):
        registry.promote_to_production(version)
    again = registry.promote_to_production("2.1.0")
    assert again["changed"] is False and again["previous_version"] == "2.1.0" and "already" in again["message"]
    assert [(h["from_version"], h["to_version"]) for h in registry.promotion_history()][0] == ("2.0.0", "2.1.0")
    assert registry.rollback()["production_version"] == "2.0.0"
    assert registry.rollback()["production_version"] == "1.0.0"
    with pytest.raises(VersionConflict):
        registry.rollback()


def test_rollback_skips_repeats_recorded_by_earlier_releases(registry: ModelVersionManager) -> None:
    """Histories written before the fix hold "2.1.0 -> 2.1.0" rows: rollback steps over them."""
    for version in ("2.0.0", "2.1.0"):
        registry.save_model(make_model(), version, config=CONFIG)
        registry.store.versions.deploy("promote", version, "ops", set_production=True)
    with registry.store.database.write() as conn:  # what an earlier release wrote for a repeated promote
        conn.execute(promotions.insert().values(at=0.0, actor="ops", action="promote", from_version="2.1.0",
                                                to_version="2.1.0"))
    assert registry.rollback() == {"production_version": "2.0.0", "previous_version": "2.1.0", "changed": True,
                                   "message": "2.0.0 is now production"}


def test_promoting_production_while_another_version_is_loaded_serves_it_again(registry: ModelVersionManager) -> None:
    for version in ("1.0.0", "1.1.0"):
        registry.save_model(make_model(), version, config=CONFIG)
    registry.promote_to_production("1.0.0")
    registry.set_serving_version("1.1.0")
    assert registry.promote_to_production("1.0.0")["changed"] is False
    assert registry.get_serving_version() == "1.0.0"
    assert [(h["action"], h["to_version"]) for h in registry.promotion_history()][0] == ("load", "1.0.0")
    assert registry.set_serving_version("1.0.0")["changed"] is False


def test_load_changes_serving_not_production(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    registry.save_model(make_model(), "1.1.0", config=CONFIG)
    registry.promote_to_production("1.0.0")
    registry.set_serving_version("1.1.0")
    assert registry.get_production_version() == "1.0.0" and registry.get_serving_version() == "1.1.0"
    flags = {v["version"]: (v["is_production"], v["is_serving"]) for v in registry.list_versions()}
    assert flags == {"1.0.0": (True, False), "1.1.0": (False, True)}


def test_delete_refused_for_production_and_serving(registry: ModelVersionManager) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        registry.save_model(make_model(), version, config=CONFIG)
    registry.promote_to_production("1.0.0")
    registry.set_serving_version("1.1.0")
    for version in ("1.0.0", "1.1.0"):
        with pytest.raises(VersionConflict):
            registry.delete_version(version)
    registry.delete_version("1.2.0")
    assert not (registry.models_dir / "1.2.0").exists()
    with pytest.raises(VersionNotFound):
        registry.delete_version("1.2.0")
    with pytest.raises(VersionNotFound):
        registry.get_version_info("9.9.9")


def test_rollback_skips_deleted_versions(registry: ModelVersionManager) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        registry.save_model(make_model(), version, config=CONFIG)
        registry.promote_to_production(version)
    registry.delete_version("1.1.0")
    assert registry.rollback()["production_version"] == "1.0.0"


def test_archive_and_restore_keep_the_hash(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    registry.save_model(make_model(3), "1.1.0", config=CONFIG)
    registry.promote_to_production("1.0.0")
    with pytest.raises(VersionConflict):
        registry_archive.archive(registry, "1.0.0")
    sha = registry.get_version_info("1.1.0")["sha256"]
    archived = registry_archive.archive(registry, "1.1.0")
    assert archived["archived"] and archived["sha256"] == sha
    assert not artifact(registry, "1.1.0").exists() and registry.verify_version("1.1.0")["ok"]
    with pytest.raises(VersionConflict, match="archived"):
        registry.load_model(make_model(), "1.1.0")
    with pytest.raises(VersionConflict, match="archived"):
        registry.promote_to_production("1.1.0")
    restored = registry_archive.restore_archived(registry, "1.1.0")
    assert not restored["archived"] and restored["sha256"] == sha
    registry.load_model(make_model(), "1.1.0")


def test_backup_and_restore_to_an_empty_registry(registry: ModelVersionManager, tmp_path: Path) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG, metrics={"accuracy": 0.8})
    registry.save_model(make_model(5), "1.1.0", config=CONFIG)
    registry.promote_to_production("1.0.0")
    registry_archive.archive(registry, "1.1.0")
    archive = tmp_path / "registry.tar.gz"
    assert backup(registry, archive)["versions"] == 2

    fresh = ModelVersionManager(tmp_path / "fresh-models", Store(f"sqlite:///{tmp_path / 'fresh.db'}"), True)
    result = restore(fresh, archive)
    assert result == {"restored": ["1.0.0", "1.1.0"], "skipped": 0}
    assert fresh.get_production_version() == "1.0.0"
    assert all(fresh.verify_version(v)["ok"] for v in ("1.0.0", "1.1.0"))
    assert fresh.get_version_info("1.0.0")["metrics"] == {"accuracy": 0.8}
    assert restore(fresh, archive) == {"restored": [], "skipped": 2}


def test_restore_refuses_a_tampered_backup(registry: ModelVersionManager, tmp_path: Path) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    archive = tmp_path / "registry.tar.gz"
    backup(registry, archive)
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("model.safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    fresh = ModelVersionManager(tmp_path / "fresh-models", Store(f"sqlite:///{tmp_path / 'fresh.db'}"), True)
    with pytest.raises(IntegrityCheckFailed):
        restore(fresh, tampered)
    assert fresh.list_versions() == []


def test_compare_model_versions(registry: ModelVersionManager) -> None:
    registry.save_model(make_model(), "1.0.0", config=CONFIG, metrics={"accuracy": 0.8, "val_loss": 0.5})
    registry.save_model(make_model(), "1.1.0", config=CONFIG, metrics={"accuracy": 0.9, "val_loss": 0.3, "f1": 0.7})
    result = compare_model_versions(registry, "1.0.0", "1.1.0")
    assert result["version1"] == "1.0.0" and result["version2"] == "1.1.0"
    comparison = result["metrics_comparison"]
    assert comparison["accuracy"]["improvement"] == pytest.approx(0.1)
    assert comparison["val_loss"]["improvement"] == pytest.approx(0.2)
    assert comparison["f1"] == {"version1": None, "version2": 0.7, "improvement": None}


def test_leftover_folder_of_a_crashed_save_does_not_block(registry: ModelVersionManager) -> None:
    leftover = registry.models_dir / "1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half written")
    registry.save_model(make_model(), "1.0.0", config=CONFIG)
    assert registry.verify_version("1.0.0")["ok"]


def _save_in_process(url: str, models_dir: str, versions: list[str], results: multiprocessing.Queue) -> None:
    registry = ModelVersionManager(models_dir, Store(url), True)
    for version in versions:
        try:
            registry.save_model(make_model(), version, config=CONFIG)
            results.put((version, "saved"))
        except VersionConflict:
            results.put((version, "conflict"))


def test_concurrent_saves_from_several_processes(store_url: str, tmp_path: Path) -> None:
    models_dir = str(tmp_path / "shared-models")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    plans = [[f"{p}.{i}.0" for i in range(4)] + ["9.9.9"] for p in (1, 2, 3)]
    workers = [context.Process(target=_save_in_process, args=(store_url, models_dir, plan, results)) for plan in plans]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in range(15)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(o for v, o in outcomes if v == "9.9.9") == ["conflict", "conflict", "saved"]
    assert all(o == "saved" for v, o in outcomes if v != "9.9.9")
    registry = ModelVersionManager(models_dir, Store(store_url), True)
    versions = registry.list_versions()
    assert len(versions) == 13
    assert all(registry.verify_version(v["version"])["ok"] for v in versions)


def test_generated_versions_in_the_same_second_get_a_suffix(registry: ModelVersionManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.model_versioning as versioning

    monkeypatch.setattr(versioning, "generate_version_string", lambda prefix=None: "20261126-120000")
    saved = [registry.save_model(make_model(), config=CONFIG).version for _ in range(3)]
    assert saved == ["20261126-120000", "20261126-120000-2", "20261126-120000-3"]


def test_a_generated_version_deleted_in_its_second_is_not_given_again(registry: ModelVersionManager,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Monitoring records, labels and the audit trail name a version: a save right after a
    delete must not take the deleted model's name."""
    import utils.model_versioning as versioning

    monkeypatch.setattr(versioning, "generate_version_string", lambda prefix=None: "20261126-120000")
    first = registry.save_model(make_model(), config=CONFIG).version
    registry.delete_version(first)
    second = registry.save_model(make_model(), config=CONFIG).version
    assert (first, second) == ("20261126-120000", "20261126-120000-2")
    monkeypatch.setattr(versioning, "generate_version_string", lambda prefix=None: "20261126-120001")
    assert registry.save_model(make_model(), config=CONFIG).version == "20261126-120001"  # a new second starts over
