"""The served model: architectures, input validation, prediction, hot swap, bootstrap."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.model_versioning import ModelVersionManager
from utils.serving import (
    ARCHITECTURES,
    InvalidInput,
    ModelNotReady,
    ModelServer,
    build_model,
    import_architecture_modules,
    register_architecture,
    rows_to_tensor,
)
from utils.store import Store
from utils.training import Hyperparameters, ensure_initial_version, load_dataset, train_classifier

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8], "class_names": ["a", "b", "c"]}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[1.0, 2.0, 3.0]], r"inputs\[0\] must be a list of 4 numbers"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0] * 5], r"inputs\[1\] must be a list of 4 numbers"),
        ([[1.0, 2.0, 3.0, 4.0]] * 11, "exceeds the limit of 10"),
    ],
)
def test_rows_to_tensor_applies_the_served_models_width_and_the_batch_limit(rows: list, message: str) -> None:
    """What the request schema cannot know (values themselves are checked by the schema)."""
    with pytest.raises(InvalidInput, match=message):
        rows_to_tensor(rows, input_dim=4, max_batch=10)


def test_rows_to_tensor_accepts_ints_and_floats() -> None:
    tensor = rows_to_tensor([[1, 2.5, -3, 4e-3], [0, 0, 0, 0]], input_dim=4, max_batch=10)
    assert tensor.dtype == torch.float32 and tensor.shape == (2, 4)


def test_build_model_checks_its_config() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"architecture": "nope", "input_dim": 4, "num_classes": 3})
    with pytest.raises(ValueError, match="input_dim"):
        build_model({"architecture": "mlp", "input_dim": 0, "num_classes": 3})
    model = build_model(CONFIG)
    assert model.quadra_config == CONFIG and model(torch.zeros(2, 4)).shape == (2, 3)


def test_user_architecture_can_be_registered_and_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_quadra_arch.py").write_text(
        "from torch import nn\n"
        "from utils.serving import register_architecture\n"
        "@register_architecture('linear-probe')\n"
        "def build(config):\n"
        "    return nn.Linear(config['input_dim'], config['num_classes'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import_architecture_modules(("my_quadra_arch",))
    try:
        model = build_model({"architecture": "linear-probe", "input_dim": 4, "num_classes": 2})
        assert isinstance(model, nn.Linear)
    finally:
        ARCHITECTURES.pop("linear-probe", None)
        sys.modules.pop("my_quadra_arch", None)


def test_register_architecture_decorator_returns_the_builder() -> None:
    @register_architecture("tiny-test")
    def build(config: dict) -> nn.Module:
        return nn.Linear(config["input_dim"], config["num_classes"])

    try:
        assert ARCHITECTURES["tiny-test"] is build
    finally:
        ARCHITECTURES.pop("tiny-test")


def test_training_learns_the_bundled_dataset() -> None:
    dataset = load_dataset()
    assert dataset.features.shape == (150, 4) and dataset.class_names == ["setosa", "versicolor", "virginica"]
    epochs: list[int] = []
    model, metrics, info = train_classifier(dataset, Hyperparameters(epochs=60), on_epoch=lambda e, m: epochs.append(e))
    assert epochs == list(range(1, 61))
    assert metrics["accuracy"] >= 0.85 and info["rows"] == 150
    assert model.quadra_config["feature_names"][0] == "sepal_length_cm"


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> ModelVersionManager:
    return ModelVersionManager(tmp_path / "models", Store(f"sqlite:///{tmp_path / 'q.db'}"), True)


def save(registry: ModelVersionManager, version: str, seed: int) -> None:
    torch.manual_seed(seed)
    registry.save_model(build_model(CONFIG), version, config=CONFIG)


def test_model_server_loads_and_hot_swaps(sqlite_registry: ModelVersionManager) -> None:
    server = ModelServer(sqlite_registry, poll_seconds=60)
    with pytest.raises(ModelNotReady):
        server.require_current()
    save(sqlite_registry, "1.0.0", 1)
    save(sqlite_registry, "1.1.0", 2)
    sqlite_registry.promote_to_production("1.0.0")
    server.start()
    before = server.require_current()
    assert before.version == "1.0.0" and before.class_names == ["a", "b", "c"]
    sqlite_registry.promote_to_production("1.1.0")
    assert server.sync() is True and server.require_current().version == "1.1.0"
    assert server.sync() is False
    rows = before.predict(torch.zeros(2, 4))
    assert rows[0]["class"] in {"a", "b", "c"} and sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)
    assert rows[0]["confidence"] == max(rows[0]["probabilities"].values())


def test_model_server_keeps_serving_when_the_new_version_is_corrupt(sqlite_registry: ModelVersionManager) -> None:
    save(sqlite_registry, "1.0.0", 1)
    save(sqlite_registry, "1.1.0", 2)
    sqlite_registry.promote_to_production("1.0.0")
    server = ModelServer(sqlite_registry, poll_seconds=60)
    server.start()
    sqlite_registry.store.versions.deploy("load", "1.1.0", "test", set_production=False)  # unchecked
    path = sqlite_registry.models_dir / "1.1.0" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert server.sync() is False
    assert server.require_current().version == "1.0.0"
    assert "integrity check failed" in server.last_error
    assert server.sync() is False


def test_model_server_start_survives_a_broken_registry(sqlite_registry: ModelVersionManager) -> None:
    def broken_bootstrap(_registry: ModelVersionManager) -> None:
        raise RuntimeError("disk on fire")

    server = ModelServer(sqlite_registry, poll_seconds=60)
    server.start(broken_bootstrap)
    with pytest.raises(ModelNotReady, match="disk on fire"):
        server.require_current()


def _bootstrap(url: str, models_dir: str) -> None:
    ensure_initial_version(ModelVersionManager(models_dir, Store(url), True))


def test_bootstrap_creates_one_initial_version_across_processes(tmp_path: Path) -> None:
    url, models_dir = f"sqlite:///{tmp_path / 'q.db'}", str(tmp_path / "models")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_bootstrap, args=(url, models_dir)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
        assert worker.exitcode == 0
    registry = ModelVersionManager(models_dir, Store(url), True)
    versions = registry.list_versions()
    assert [v["version"] for v in versions] == ["1.0.0"]
    assert versions[0]["is_production"] and versions[0]["metrics"]["accuracy"] >= 0.85
    ensure_initial_version(registry)
    assert len(registry.list_versions()) == 1
