"""MLflow 3.17.2's `mlflow models serve -w 4` serving the same model, saved the way MLflow users
save a PyTorch model (`mlflow.pytorch.save_model`, the traced model with a float32 signature) and
asked with MLflow's tensor input (`{"inputs": [[...]]}` to /invocations)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.load import Endpoint, Server, free_port
from bench.peer_setup import WORK, WORKERS, peer_env, trace_with_softmax, virtualenv, wait_until_serving

FOLDER = WORK / "mlflow"
NAME = f"MLflow 3.17.2 (`mlflow models serve -w {WORKERS}`)"
PACKAGES = ["torch==2.13.0", "mlflow==3.17.2"]

SAVE = """
import sys

import mlflow.pytorch
import torch
from mlflow.models import infer_signature

traced, target, input_dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = torch.jit.load(traced)
example = torch.zeros(1, input_dim)
signature = infer_signature(example.numpy(), model(example).detach().numpy())
# MLflow's documented setting for a TorchScript model: it is then written by torch.jit.save
mlflow.pytorch.save_model(model, target, signature=signature, serialization_format="pickle")
"""


def save_model(bin_dir: Path, model_dir: Path) -> Path:
    """The MLflow model folder (MLmodel, the TorchScript model, its environment files)."""
    traced = trace_with_softmax(model_dir, FOLDER / "iris.pt")
    target = FOLDER / "model"
    shutil.rmtree(target, ignore_errors=True)
    input_dim = json.loads((model_dir / "config.json").read_text())["input_dim"]
    saved = subprocess.run([str(bin_dir / "python"), "-c", SAVE, str(traced), str(target), str(input_dim)],
                           env=peer_env(bin_dir), cwd=FOLDER, capture_output=True, text=True)
    if saved.returncode != 0:  # its warnings otherwise (pickle format, torch's +cpu label) are noise here
        raise RuntimeError(f"saving the MLflow model failed:\n{saved.stderr[-3000:]}")
    return target


@contextmanager
def serve(model_dir: Path, row: list[float]) -> Iterator[Endpoint]:
    bin_dir = virtualenv(FOLDER, PACKAGES)
    model = save_model(bin_dir, model_dir)
    port = free_port()
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model), "-h", "127.0.0.1", "-p", str(port),
               "-w", str(WORKERS), "--env-manager", "local"]
    with Server(command, peer_env(bin_dir), "/ping", cwd=FOLDER, port=port) as server:
        endpoint = Endpoint(NAME, f"{server.url}/invocations", lambda rows: {"inputs": rows}, server)
        wait_until_serving(endpoint, row)
        yield endpoint
