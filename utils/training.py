"""Training: the bundled dataset and the fit loop that produces a classifier version."""

from __future__ import annotations

import csv
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from utils.model_versioning import ModelVersionManager
from utils.serving import build_model

log = logging.getLogger("quadra.training")

DATASET_PATH = Path(__file__).resolve().parent.parent / "data" / "iris.csv"


@dataclass(frozen=True)
class Dataset:
    features: torch.Tensor
    labels: torch.Tensor
    feature_names: list[str]
    class_names: list[str]


def load_dataset(path: Path = DATASET_PATH) -> Dataset:
    """Read a CSV whose last column is the class label and the others numeric features."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [row for row in reader if row]
    class_names = sorted({row[-1] for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    features = torch.tensor([[float(v) for v in row[:-1]] for row in rows], dtype=torch.float32)
    labels = torch.tensor([index[row[-1]] for row in rows], dtype=torch.long)
    return Dataset(features, labels, header[:-1], class_names)


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 150
    learning_rate: float = 0.01
    batch_size: int = 32
    seed: int = 0
    hidden_dims: tuple[int, ...] = (32, 16)
    validation_fraction: float = 0.2


EpochCallback = Callable[[int, dict[str, float]], None]


def train_classifier(
    dataset: Dataset, params: Hyperparameters = Hyperparameters(), on_epoch: EpochCallback | None = None
) -> tuple[nn.Module, dict[str, float], dict[str, Any]]:
    """Fit an MLP classifier; returns the model, its metrics and its training info."""
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    order = torch.randperm(len(dataset.labels), generator=generator)
    n_val = max(1, int(len(order) * params.validation_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, y_train = dataset.features[train_idx], dataset.labels[train_idx]
    x_val, y_val = dataset.features[val_idx], dataset.labels[val_idx]

    config = {
        "architecture": "mlp",
        "input_dim": int(dataset.features.shape[1]),
        "num_classes": len(dataset.class_names),
        "hidden_dims": list(params.hidden_dims),
        "feature_names": dataset.feature_names,
        "class_names": dataset.class_names,
    }
    model = build_model(config)
    model.set_normalization(x_train.mean(dim=0), x_train.std(dim=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    metrics: dict[str, float] = {}
    for epoch in range(1, params.epochs + 1):
        model.train()
        perm = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(perm), params.batch_size):
            batch = perm[start : start + params.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        metrics = _evaluate(model, loss_fn, x_train, y_train, x_val, y_val)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    model.eval()
    info = {
        "dataset": "iris" if len(dataset.labels) == 150 else "custom",
        "rows": int(len(dataset.labels)),
        "epochs": params.epochs,
        "learning_rate": params.learning_rate,
        "batch_size": params.batch_size,
        "seed": params.seed,
    }
    return model, metrics, info


def _evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
) -> dict[str, float]:
    model.eval()
    with torch.inference_mode():
        train_logits, val_logits = model(x_train), model(x_val)
        return {
            "train_loss": round(float(loss_fn(train_logits, y_train)), 6),
            "train_accuracy": round(float((train_logits.argmax(1) == y_train).float().mean()), 6),
            "val_loss": round(float(loss_fn(val_logits, y_val)), 6),
            "accuracy": round(float((val_logits.argmax(1) == y_val).float().mean()), 6),
        }


INITIAL_VERSION = "1.0.0"
BOOTSTRAP_LEASE = "bootstrap-initial-version"


def ensure_initial_version(registry: ModelVersionManager, wait_seconds: float = 120.0) -> None:
    """On an empty registry, train on the bundled dataset and promote the result as 1.0.0.

    Several processes may start at once: one takes a lease in the store and trains, the
    others wait for the production version to appear."""
    if registry.get_production_version() or registry.get_latest_version():
        return
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_seconds
    while not registry.store.try_acquire_lease(BOOTSTRAP_LEASE, owner, ttl_seconds=wait_seconds):
        if registry.get_production_version():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for another process to create the initial version")
        time.sleep(0.5)
    try:
        if registry.get_latest_version() is None:
            model, metrics, info = train_classifier(load_dataset())
            registry.save_model(
                model,
                INITIAL_VERSION,
                metrics=metrics,
                training_info=info,
                description="Initial model trained on the bundled Iris dataset at first start",
                tags=["initial", "iris"],
                created_by="bootstrap",
            )
            registry.promote_to_production(INITIAL_VERSION, actor="bootstrap")
            log.info("created and promoted initial version %s (accuracy %.3f)", INITIAL_VERSION, metrics["accuracy"])
    finally:
        registry.store.release_lease(BOOTSTRAP_LEASE, owner)
