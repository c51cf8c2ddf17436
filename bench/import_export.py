"""Import and export of a 100 MB artifact against hashing the same file (the one pass neither
can avoid), measured in the same run: `model_import.import_version` (stream to staging while
hashing, then build, strict load and one forward pass) and `export_version` (verify, then
copy out). Both sides: one untimed warm-up run, then the best of the same number of runs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.registry import ms, timed
from utils import model_import
from utils.model_versioning import ModelVersionManager
from utils.safetensors_reader import sha256_file
from utils.serving import build_model
from utils.store import Store

REPEATS = 3
# An "mlp" whose two hidden layers hold about 100 MB of float32 weights.
CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [5000, 5000]}


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        artifact = root / "model.safetensors"
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in build_model(CONFIG).state_dict().items()}, artifact)
        store = Store(f"sqlite:///{root / 'q.db'}")
        registry = ModelVersionManager(root / "models", store, verify_integrity=True)
        versions = iter(range(1, 100))

        def import_once() -> None:
            with open(artifact, "rb") as source:
                model_import.import_version(registry, source, CONFIG, max_bytes=2**31, version=f"1.{next(versions)}.0")

        def export_once() -> None:
            shutil.rmtree(root / "out", ignore_errors=True)
            model_import.export_version(registry, "1.1.0", root / "out")

        hashed = timed(lambda: sha256_file(artifact), REPEATS)
        imported = timed(import_once, REPEATS)
        exported = timed(export_once, REPEATS)
        size_mb = artifact.stat().st_size / 2**20
        store.database.dispose()
    return "\n".join([
        "## Import and export\n",
        "| artifact | hash it (baseline) | import | ratio | export | ratio | target |",
        "|---|---|---|---|---|---|---|",
        f"| {size_mb:,.0f} MB | {ms(hashed)} | {ms(imported)} | {imported / hashed:.2f}× | {ms(exported)} "
        f"| {exported / hashed:.2f}× | each ≤ 1.5× |",
    ]) + "\n"
