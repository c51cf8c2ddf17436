"""The ceiling of this stack: a bare Flask app serving the same model the same way (safetensors
weights, the service's own `ServedModel.predict` under torch.inference_mode, the same JSON
shape, the same start-up `gc.collect(); gc.freeze()`) with none of the governance: no authentication, rate
limit, mode check, validation, monitoring, metrics, security headers or audit.

Run by bench/predict_load.py under the same gunicorn command as the full service; reads the
model version to serve from BARE_MODEL_DIR (a version folder of the registry)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from safetensors.torch import load_file

from utils.serving import ServedModel, build_model

torch.set_num_threads(1)
folder = Path(os.environ["BARE_MODEL_DIR"])
config = json.loads((folder / "config.json").read_text())
model = build_model(config)
model.load_state_dict(load_file(folder / "model.safetensors"))
model.eval()
served = ServedModel(folder.name, "", model, config)
app = Flask(__name__)
gc.collect()
gc.freeze()


@app.post("/api/predict")
def predict():
    inputs = torch.tensor(request.get_json()["inputs"], dtype=torch.float32)
    return jsonify({"predictions": served.predict(inputs), "model_version": served.version})
