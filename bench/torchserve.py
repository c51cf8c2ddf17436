"""The peer users would otherwise pick: TorchServe serving the same model on this machine,
installed into a throwaway environment under bench/.work (never into the project's), bound
to 127.0.0.1, with as many workers as the full service has, and loaded with the same wrk run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from bench.load import LoadResult, Server, free_port, wrk
from utils.serving import build_model

WORK = Path(__file__).resolve().parent / ".work" / "torchserve"
PACKAGES = ["torch==2.13.0", "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "psutil", "requests", "packaging"]
WORKERS = 4

HANDLER = textwrap.dedent('''
    import json
    import torch
    from ts.torch_handler.base_handler import BaseHandler


    class IrisHandler(BaseHandler):
        """{"inputs": [[...], ...]} -> the same response shape as Quadra's /api/predict."""

        def preprocess(self, requests):
            bodies = [r.get("body") or r.get("data") for r in requests]
            bodies = [json.loads(b) if isinstance(b, (bytes, bytearray, str)) else b for b in bodies]
            self._sizes = [len(b["inputs"]) for b in bodies]
            return torch.tensor([row for b in bodies for row in b["inputs"]], dtype=torch.float32)

        def inference(self, data):
            with torch.inference_mode():
                return torch.softmax(self.model(data), dim=1)

        def postprocess(self, probabilities):
            names = ["setosa", "versicolor", "virginica"]
            confidence, index = probabilities.max(dim=1)
            rows = [{"class": names[i], "class_index": i, "confidence": c, "probabilities": dict(zip(names, p))}
                    for i, c, p in zip(index.tolist(), confidence.tolist(), probabilities.tolist())]
            out, start = [], 0
            for size in self._sizes:
                out.append({"predictions": rows[start:start + size]})
                start += size
            return out
''')


def environment() -> Path:
    """The throwaway virtualenv with TorchServe (made once, reused by later runs)."""
    python = WORK / "venv" / "bin" / "python"
    if not python.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(WORK / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    return WORK / "venv" / "bin"


def archive(bin_dir: Path, model_dir: Path) -> Path:
    """A .mar of the model traced to TorchScript (TorchServe's usual packaging)."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    model = build_model(config)
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    model.eval()
    traced = torch.jit.trace(model, torch.zeros(1, config["input_dim"]))
    store = WORK / "model-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    traced.save(str(WORK / "iris.pt"))
    (WORK / "handler.py").write_text(HANDLER)
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", "iris", "--version", "1.0",
                    "--serialized-file", str(WORK / "iris.pt"), "--handler", str(WORK / "handler.py"),
                    "--export-path", str(store), "--force"], check=True)
    return store


def run(model_dir: Path, bodies: dict[int, dict]) -> dict[int, LoadResult]:
    """wrk results per batch size against TorchServe."""
    bin_dir = environment()
    store = archive(bin_dir, model_dir)
    inference, management, metrics = free_port(), free_port(), free_port()
    (WORK / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{inference}\nmanagement_address=http://127.0.0.1:{management}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\ndefault_workers_per_model={WORKERS}\n"
        "disable_token_authorization=true\nenable_model_api=false\ninstall_py_dep_per_model=false\n"
        f"model_store={store}\nload_models=iris=iris.mar\n"
    )
    command = [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
               "--ts-config", str(WORK / "config.properties"), "--model-store", str(store), "--models", "iris=iris.mar"]
    stop = [str(bin_dir / "torchserve"), "--stop"]
    subprocess.run(stop, capture_output=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})  # a leftover from an aborted run
    server = Server(command, {"PATH": f"{bin_dir}:/usr/bin:/bin"}, "/ping", cwd=WORK, port=inference)
    try:
        _wait_model(server.url)
        results = {}
        for batch, body in bodies.items():
            wrk(f"{server.url}/predictions/iris", body, {}, duration=3)
            results[batch] = wrk(f"{server.url}/predictions/iris", body, {})
        return results
    finally:
        subprocess.run(stop, capture_output=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        server.stop()


def _wait_model(url: str) -> None:
    import time

    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.post(f"{url}/predictions/iris", json={"inputs": [[5.1, 3.5, 1.4, 0.2]]}, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("TorchServe did not serve the model in time")
