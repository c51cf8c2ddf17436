"""Registry save and load with integrity verification against raw safetensors save and load,
for 1 MB, 100 MB and 1 GB models, and the hash throughput. Both loads end with the weights
in a model (`load_state_dict`), which is what a user's load costs."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from utils.model_versioning import ModelVersionManager
from utils.store import Store

SIZES_MB = (1, 100, 1024)


def timed(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def model_of(megabytes: int) -> torch.nn.Module:
    """A single linear layer of about `megabytes` MB of float32 weights."""
    width = 1024
    rows = max(1, megabytes * 1024 * 1024 // (4 * width))
    layer = torch.nn.Linear(width, rows, bias=False)
    torch.nn.init.normal_(layer.weight)
    return layer


def run() -> str:
    lines = [
        "## Registry\n",
        "| model | save (registry) | raw save_file | ratio | load + verify (registry) | raw load_file | ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store = Store(f"sqlite:///{root / 'q.db'}")
        registry = ModelVersionManager(root / "models", store, verify_integrity=True)
        hash_rate = None
        for index, megabytes in enumerate(SIZES_MB):
            model = model_of(megabytes)
            repeats = 3 if megabytes < 1024 else 1
            raw_path = root / f"raw-{megabytes}.safetensors"
            raw_save = timed(lambda: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, raw_path), repeats)
            counter = iter(range(1000))
            save = timed(lambda: registry.save_model(model, f"{index + 1}.{next(counter)}.0", config={}), repeats)  # 1.0.0, 1.1.0, ...
            version = f"{index + 1}.0.0"
            raw_load = timed(lambda: model.load_state_dict(load_file(raw_path)), repeats)
            load = timed(lambda: registry.load_model(model, version), repeats)
            lines.append(
                f"| {megabytes:,} MB | {save * 1000:,.0f} ms | {raw_save * 1000:,.0f} ms | {save / raw_save:.2f}× "
                f"| {load * 1000:,.0f} ms | {raw_load * 1000:,.0f} ms | {load / raw_load:.2f}× | load ≤ 1.3× raw |"
            )
            if megabytes == SIZES_MB[-1]:
                data = raw_path.read_bytes()
                hash_rate = len(data) / timed(lambda: hashlib.sha256(data).digest(), 2) / 1e9
            del model
        store.dispose()
    lines.append(f"\nSHA-256 throughput on this machine: {hash_rate:.2f} GB/s.\n")
    return "\n".join(lines) + "\n"
