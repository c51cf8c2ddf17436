"""KServe 0.21's Python model server (uvicorn, 4 workers) serving the same model as a
`kserve.Model` over the open inference protocol v2 (`POST /v2/models/iris/infer`), as the
issue's first side-by-side run did: no authentication, limits or monitoring, gRPC off, KServe's
per-request latency log line off (the service's log level in the bench is `warning`)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.load import Endpoint, Server, free_port
from bench.peer_setup import WORK, WORKERS, peer_env, trace_with_softmax, virtualenv, wait_until_serving

FOLDER = WORK / "kserve"
NAME = f"KServe 0.21 (uvicorn, {WORKERS} workers, protocol v2)"
PACKAGES = ["torch==2.13.0", "kserve==0.21.0"]

SERVER = textwrap.dedent('''
    import os

    import torch
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
    from kserve.utils.utils import generate_uuid


    class Iris(Model):
        """The traced model. KServe spawns its workers and pickles the model into each; a
        TorchScript module does not pickle, so each worker loads its own copy."""

        def __init__(self, name, path):
            super().__init__(name)
            self.path = path
            self.load()

        def load(self):
            torch.set_num_threads(1)
            self.model = torch.jit.load(self.path)
            self.ready = True
            return True

        def __getstate__(self):
            return {key: value for key, value in self.__dict__.items() if key != "model"}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self.load()

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            rows = torch.from_numpy(payload.inputs[0].as_numpy())
            with torch.inference_mode():
                probabilities = self.model(rows).numpy()
            output = InferOutput(name="probabilities", shape=list(probabilities.shape), datatype="FP32")
            output.set_data_from_numpy(probabilities, binary_data=False)
            return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or generate_uuid())


    if __name__ == "__main__":
        ModelServer().start([Iris("iris", os.environ["IRIS_MODEL"])])
''')


# Warnings and errors only, in the parent and in every spawned worker (a worker configures its
# logging from this file; without one it logs two lines per request).
LOG_CONFIG = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"},
              "loggers": {name: {"level": "WARNING"} for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access")}}


def body(rows: list[list[float]]) -> dict:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}]}


@contextmanager
def serve(model_dir: Path, row: list[float]) -> Iterator[Endpoint]:
    bin_dir = virtualenv(FOLDER, PACKAGES)
    traced = trace_with_softmax(model_dir, FOLDER / "iris.pt")
    (FOLDER / "server.py").write_text(SERVER)
    (FOLDER / "logging.json").write_text(json.dumps(LOG_CONFIG))
    port = free_port()
    command = [str(bin_dir / "python"), "server.py", "--http_port", str(port), "--workers", str(WORKERS),
               "--enable_grpc", "false", "--enable_latency_logging", "false", "--log_config_file", "logging.json"]
    env = {**peer_env(bin_dir), "IRIS_MODEL": str(traced)}
    with Server(command, env, "/v2/health/live", cwd=FOLDER, port=port) as server:
        endpoint = Endpoint(NAME, f"{server.url}/v2/models/iris/infer", body, server)
        wait_until_serving(endpoint, row)
        yield endpoint
