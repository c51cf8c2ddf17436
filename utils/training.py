"""Training: the bundled dataset and the fit loop that produces a classifier version."""

from __future__ import annotations

import argparse
import builtins
import csv
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.artifact_store import ArtifactStore, artifact_store_for
from utils.config import Settings
from utils.errors import JobNotFound, TrainingCapacityReached
from utils.journal import process_alive
from utils.model_versioning import ModelVersionManager, generate_version_string
from utils.serving import MLPClassifier, build_model
from utils.store import JobRow, Store
from utils.timestamps import iso_utc

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
    if not isinstance(model, MLPClassifier):
        raise TypeError("training builds the 'mlp' architecture")
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
    while not registry.store.leases.try_acquire(BOOTSTRAP_LEASE, owner, ttl_seconds=wait_seconds):
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
        registry.store.leases.release(BOOTSTRAP_LEASE, owner)


# -- training jobs ---------------------------------------------------------------------------

JOB_HEARTBEAT_SECONDS = 5.0


class JobCancelled(Exception):
    """Raised inside a job's process when a cancel was requested."""


def dataset_from_payload(data: dict[str, Any]) -> Dataset:
    """Build a Dataset from posted {"features": [[...]], "labels": [...], "feature_names": [...]}
    (already validated by the route)."""
    labels = [str(label) for label in data["labels"]]
    class_names = sorted(set(labels))
    index = {name: i for i, name in enumerate(class_names)}
    features = torch.tensor(data["features"], dtype=torch.float32)
    names = data.get("feature_names") or [f"feature_{i}" for i in range(features.shape[1])]
    return Dataset(features, torch.tensor([index[label] for label in labels]), list(names), class_names)


def public_job(row: JobRow) -> dict[str, Any]:
    """A job as the API shows it (the posted data itself is not echoed)."""
    progress = [{**entry, "at": iso_utc(entry.get("at"))} for entry in row.progress or []]
    return {
        "id": row.id,
        "status": row.status,
        "created_at": iso_utc(row.created_at),
        "created_by": row.created_by,
        "started_at": iso_utc(row.started_at),
        "finished_at": iso_utc(row.finished_at),
        "params": row.params,
        "custom_data_rows": len(row.data["labels"]) if row.data else None,
        "epoch": progress[-1]["epoch"] if progress else 0,
        "total_epochs": row.total_epochs,
        "percent": round(100.0 * (progress[-1]["epoch"] if progress else 0) / row.total_epochs, 1),
        "progress": progress,
        "result_version": row.result_version,
        "error": row.error,
        "cancel_requested": row.cancel_requested,
    }


class TrainingJobs:
    """Starts training jobs as separate processes and keeps their state in the store."""

    def __init__(self, store: Store, settings: Settings, max_active: int = 1, heartbeat_timeout: float = 60.0) -> None:
        self.store = store
        self.settings = settings
        self.max_active = max_active
        self.heartbeat_timeout = heartbeat_timeout

    def start(self, params: Hyperparameters, data: dict[str, Any] | None, created_by: str) -> dict[str, Any]:
        """Queue a job and launch its process; TrainingCapacityReached when too many run."""
        self.reap()
        job_id = f"job_{uuid.uuid4().hex[:12]}"
        row = JobRow(id=job_id, status="queued", created_at=time.time(), created_by=created_by, params=asdict(params),
                     total_epochs=params.epochs, data=data)
        if not self.store.jobs.insert_if_capacity(row, self.max_active):
            raise TrainingCapacityReached(f"{self.max_active} training job(s) already running; wait or cancel one")
        settings = self.settings
        process = subprocess.Popen(
            [sys.executable, "-m", "utils.training", job_id, "--database-url", settings.database_url,
             "--models-dir", str(settings.models_dir), "--cache-dir", str(settings.artifact_cache_dir),
             *(["--artifact-uri", settings.artifact_uri] if settings.artifact_uri else []),
             *([] if settings.verify_integrity else ["--no-verify"])],
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        self.store.jobs.update(job_id, only_if_active=True, pid=process.pid, host=socket.gethostname())
        threading.Thread(target=self._watch, args=(job_id, process), name=f"quadra-job-{job_id}", daemon=True).start()
        log.info("training job %s started by %s (pid %d)", job_id, created_by, process.pid)
        return self.get(job_id)

    def _watch(self, job_id: str, process: subprocess.Popen[bytes]) -> None:
        """Reap the child; if it died without finishing its job, the job failed."""
        code = process.wait()
        if self.store.jobs.update(job_id, only_if_active=True, status="failed", finished_at=time.time(),
                                 error=f"training process exited with code {code} before finishing"):
            log.error("training job %s failed: its process exited with %d", job_id, code)

    def get(self, job_id: str) -> dict[str, Any]:
        row = self.store.jobs.get(job_id)
        if row is None:
            raise JobNotFound(f"training job {job_id} not found")
        return public_job(row)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        self.reap()
        return [public_job(r) for r in self.store.jobs.list(limit)]

    def active(self) -> builtins.list[dict[str, Any]]:
        self.reap()
        return [public_job(r) for r in self.store.jobs.list(active_only=True)]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop at its next epoch (a queued job stops at once)."""
        row = self.store.jobs.get(job_id)
        if row is None:
            raise JobNotFound(f"training job {job_id} not found")
        if row.status == "queued" and row.pid is None:
            self.store.jobs.update(job_id, only_if_active=True, status="cancelled", finished_at=time.time())
        else:
            self.store.jobs.update(job_id, only_if_active=True, cancel_requested=True)
        return self.get(job_id)

    def cancel_all(self) -> builtins.list[str]:
        return [self.cancel(job["id"])["id"] for job in self.active()]

    def reap(self) -> int:
        """Mark failed every active job whose process is gone or silent for too long."""
        failed = 0
        now = time.time()
        host = socket.gethostname()
        for row in self.store.jobs.list(active_only=True):
            last_sign = row.heartbeat_at or row.created_at
            gone = row.pid is not None and row.host == host and not process_alive(row.pid)
            if gone or now - last_sign > self.heartbeat_timeout:
                reason = "its process is gone" if gone else f"no heartbeat for {self.heartbeat_timeout:g}s"
                if self.store.jobs.update(row.id, only_if_active=True, status="failed", finished_at=now,
                                         error=f"training job failed: {reason}"):
                    failed += 1
                    log.error("training job %s marked failed: %s", row.id, reason)
        return failed


def run_job(job_id: str, database_url: str, models_dir: Path, verify_integrity: bool, artifacts: ArtifactStore) -> int:
    """The body of a job's process: train, report each epoch, save the version (no promote)."""
    store = Store(database_url)
    row = store.jobs.get(job_id)
    if row is None or row.status != "queued":
        return 1
    torch.set_num_threads(1)
    store.jobs.update(job_id, only_if_active=True, status="running", started_at=time.time(), heartbeat_at=time.time(),
                     pid=os.getpid(), host=socket.gethostname())
    stop_heartbeat = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, job_id, stop_heartbeat), daemon=True).start()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if store.jobs.append_progress(job_id, {"epoch": epoch, **metrics, "at": time.time()}):
            raise JobCancelled()

    try:
        dataset = dataset_from_payload(row.data) if row.data else load_dataset()
        params = Hyperparameters(**{**row.params, "hidden_dims": tuple(row.params["hidden_dims"])})
        model, metrics, info = train_classifier(dataset, params, on_epoch)
        registry = ModelVersionManager(models_dir, store, verify_integrity, artifacts)
        saved = registry.save_model(
            model, generate_version_string("train"), metrics=metrics, training_info={**info, "job_id": job_id},
            description=f"Trained by job {job_id}", tags=["trained"], created_by=row.created_by,
        )
        store.jobs.update(job_id, status="succeeded", finished_at=time.time(), result_version=saved.version)
        return 0
    except JobCancelled:
        store.jobs.update(job_id, status="cancelled", finished_at=time.time())
        return 0
    except Exception as exc:
        store.jobs.update(job_id, status="failed", finished_at=time.time(), error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop_heartbeat.set()


def _heartbeat(store: Store, job_id: str, stop: threading.Event) -> None:
    while not stop.wait(JOB_HEARTBEAT_SECONDS):
        store.jobs.update(job_id, only_if_active=True, heartbeat_at=time.time())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one Quadra training job (started by the service).")
    parser.add_argument("job_id")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--artifact-uri", default=None)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    artifacts = artifact_store_for(args.artifact_uri, args.models_dir, args.cache_dir)
    return run_job(args.job_id, args.database_url, args.models_dir, not args.no_verify, artifacts)


if __name__ == "__main__":
    sys.exit(main())
