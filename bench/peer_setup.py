"""What every peer (TorchServe, MLflow, KServe) shares: a throwaway virtualenv under
bench/.work (never the project's), the same model traced to TorchScript with its softmax (so
each peer runs the service's forward pass without the project's code), one torch thread per
worker as the service has, and a wait until the model answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

from bench.load import Endpoint
from utils.serving import build_model

WORK = Path(__file__).resolve().parent / ".work"
WORKERS = 4  # as many as the full service's gunicorn -w 4
READY_SECONDS = 180


def virtualenv(folder: Path, packages: list[str]) -> Path:
    """The peer's virtualenv (made on the first run, reused by later ones); returns its bin folder."""
    python = folder / "venv" / "bin" / "python"
    if not python.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return python.parent


def peer_env(bin_dir: Path) -> dict[str, str]:
    """The peer's own tools first on PATH, one torch thread per worker (the service's default)."""
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def trace_with_softmax(model_dir: Path, path: Path) -> Path:
    """The registry's model (safetensors + config) with its softmax, traced to TorchScript at `path`."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    model = build_model(config)
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    with_softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.trace(with_softmax, torch.zeros(1, config["input_dim"])).save(str(path))
    return path


def wait_until_serving(endpoint: Endpoint, row: list[float]) -> None:
    """Ready once a prediction succeeds (a health route can answer before the model is loaded)."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        try:
            if requests.post(endpoint.predict_url, json=endpoint.body([row]), timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{endpoint.name} did not serve the model within {READY_SECONDS} s")
