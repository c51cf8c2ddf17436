"""The ceiling of this stack: a bare Flask app serving the same model the same way (safetensors
weights, the same architecture, torch.inference_mode, the same JSON shape) with none of the
governance: no authentication, rate limit, mode check, monitoring, metrics or audit.

Run by bench/http.py under the same gunicorn command as the full service; reads the model
version to serve from BARE_MODEL_DIR (a version folder of the registry)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from safetensors.torch import load_file

from utils.serving import build_model

torch.set_num_threads(1)
folder = Path(os.environ["BARE_MODEL_DIR"])
config = json.loads((folder / "config.json").read_text())
model = build_model(config)
model.load_state_dict(load_file(folder / "model.safetensors"))
model.eval()
class_names = config["class_names"]
app = Flask(__name__)


@app.post("/api/predict")
def predict():
    inputs = torch.tensor(request.get_json()["inputs"], dtype=torch.float32)
    with torch.inference_mode():
        probabilities = torch.softmax(model(inputs), dim=1)
    confidence, index = probabilities.max(dim=1)
    rows = [
        {"class": class_names[i], "class_index": i, "confidence": c, "probabilities": dict(zip(class_names, p))}
        for i, c, p in zip(index.tolist(), confidence.tolist(), probabilities.tolist())
    ]
    return jsonify({"predictions": rows, "model_version": folder.name})
