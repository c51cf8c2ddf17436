"""TorchServe 0.12 serving the same model (TorchScript in a .mar, TorchServe's usual packaging)
with a handler that takes and returns the service's JSON shapes."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.load import Endpoint, Server, free_port
from bench.peer_setup import WORK, WORKERS, peer_env, trace_with_softmax, virtualenv, wait_until_serving

FOLDER = WORK / "torchserve"
NAME = f"TorchServe 0.12 ({WORKERS} workers)"
PACKAGES = ["torch==2.13.0", "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "psutil", "requests", "packaging"]

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
                return self.model(data)  # traced with its softmax

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


def archive(bin_dir: Path, model_dir: Path) -> Path:
    """A model store holding iris.mar: the traced model and the handler."""
    traced = trace_with_softmax(model_dir, FOLDER / "iris.pt")
    store = FOLDER / "model-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    (FOLDER / "handler.py").write_text(HANDLER)
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", "iris", "--version", "1.0",
                    "--serialized-file", str(traced), "--handler", str(FOLDER / "handler.py"),
                    "--export-path", str(store), "--force"], check=True)
    return store


def model_registration(batch_size: int, max_batch_delay_ms: int) -> str:
    """config.properties' `models`: iris.mar on WORKERS workers, batched as told (1: each
    request alone, TorchServe's default)."""
    return json.dumps({"iris": {"1.0": {
        "defaultVersion": True, "marName": "iris.mar", "minWorkers": WORKERS, "maxWorkers": WORKERS,
        "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 120}}})


@contextmanager
def serve(model_dir: Path, row: list[float], batch_size: int = 1, max_batch_delay_ms: int = 100) -> Iterator[Endpoint]:
    bin_dir = virtualenv(FOLDER, PACKAGES)
    store = archive(bin_dir, model_dir)
    inference, management, metrics = free_port(), free_port(), free_port()
    (FOLDER / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{inference}\nmanagement_address=http://127.0.0.1:{management}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\ndefault_workers_per_model={WORKERS}\n"
        "disable_token_authorization=true\nenable_model_api=false\ninstall_py_dep_per_model=false\n"
        f"model_store={store}\nload_models=iris.mar\nmodels={model_registration(batch_size, max_batch_delay_ms)}\n"
    )
    command = [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
               "--ts-config", str(FOLDER / "config.properties"), "--model-store", str(store)]
    stop = [str(bin_dir / "torchserve"), "--stop"]
    env = peer_env(bin_dir)
    subprocess.run(stop, capture_output=True, env=env)  # a leftover from an aborted run
    server = Server(command, env, "/ping", cwd=FOLDER, port=inference)
    try:
        endpoint = Endpoint(NAME, f"{server.url}/predictions/iris", lambda rows: {"inputs": rows}, server)
        wait_until_serving(endpoint, row)
        yield endpoint
    finally:
        subprocess.run(stop, capture_output=True, env=env)
        server.stop()
