"""Registry save and load with integrity verification against raw safetensors save and load,
for 1 MB, 100 MB and 1 GB models, and the hash throughput. Both loads end with the weights
in a model (`load_state_dict`), which is what a user's load costs. Both sides get the same
treatment: one untimed warm-up run (so both files are in the page cache), then the best of
the same number of timed runs."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.model_versioning import ModelVersionManager
from utils.safetensors_reader import LOAD_CHUNK
from utils.store import Store

SIZES_MB = (1, 100, 1024)
# Timed runs per size, the same for raw and registry; more for small models, whose
# millisecond timings a busy machine disturbs most.
SAVE_REPEATS = {1: 10, 100: 3, 1024: 3}
LOAD_REPEATS = {1: 50, 100: 10, 1024: 5}


def timed(function: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` runs, after one untimed warm-up run."""
    function()
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


def ms(seconds: float) -> str:
    """Milliseconds, with a decimal below 10 ms so that small loads do not read as 0 ms."""
    return f"{seconds * 1000:,.1f} ms" if seconds < 0.01 else f"{seconds * 1000:,.0f} ms"


def hash_rate(data: bytes) -> float:
    """hashlib SHA-256 in GB/s, fed in chunks the size the registry's load uses."""
    view = memoryview(data)

    def digest() -> str:
        sha = hashlib.sha256()
        for start in range(0, len(view), LOAD_CHUNK):
            sha.update(view[start:start + LOAD_CHUNK])
        return sha.hexdigest()

    return len(data) / timed(digest, 2) / 1e9


def row(registry: ModelVersionManager, root: Path, index: int, megabytes: int) -> str:
    """Time raw and registry save and load of one model size; returns its table row."""
    model = model_of(megabytes)
    raw_path = root / f"raw-{megabytes}.safetensors"
    raw_save = timed(lambda: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, raw_path), SAVE_REPEATS[megabytes])
    counter = iter(range(1000))
    # versions 1.0.0, 1.1.0, ...
    save = timed(lambda: registry.save_model(model, f"{index + 1}.{next(counter)}.0", config={}), SAVE_REPEATS[megabytes])
    version = f"{index + 1}.0.0"
    raw_load = timed(lambda: model.load_state_dict(load_file(raw_path)), LOAD_REPEATS[megabytes])
    load = timed(lambda: registry.load_model(model, version), LOAD_REPEATS[megabytes])
    return (
        f"| {megabytes:,} MB | {ms(save)} | {ms(raw_save)} | {save / raw_save:.2f}× "
        f"| {ms(load)} | {ms(raw_load)} | {load / raw_load:.2f}× | load ≤ 1.3× raw |"
    )


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
        lines += [row(registry, root, index, megabytes) for index, megabytes in enumerate(SIZES_MB)]
        rate = hash_rate((root / f"raw-{SIZES_MB[-1]}.safetensors").read_bytes())
        store.database.dispose()
    lines.append(
        f"\nSHA-256 throughput on this machine: {rate:.2f} GB/s (hashlib, {LOAD_CHUNK // 2**20} MiB updates); "
        f"hashing alone takes {SIZES_MB[-1] * 2**20 / rate / 1e6:,.0f} ms for {SIZES_MB[-1]:,} MB, a floor under load + verify.\n"
    )
    return "\n".join(lines) + "\n"
