"""Dynamic batching on a model whose forward pass dominates a request (bench/wide_model.py,
registered as a user registers theirs): the full service without and with
QUADRA_BATCH_MAX_SIZE / QUADRA_BATCH_MAX_DELAY_MS, and TorchServe without and with its own
batch_size / max_batch_delay, on the same model, under 16 connections (throughput) and one
connection (what the delay adds when nothing else comes)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from bench import torchserve
from bench.load import Endpoint, LoadResult, wrk_after_warm_up
from bench.predict_load import IRIS, forward_seconds, full_service, prepare
from bench.wide_model import CONFIG
from utils.config import Settings
from utils.model_versioning import ModelVersionManager
from utils.serving import build_model
from utils.store import Store

MAX_ROWS = 32
MAX_DELAY_MS = 5
VERSION = "2.0.0"
WIDE = {"QUADRA_ARCHITECTURE_MODULES": "bench.wide_model"}


def serve_wide(state: Path) -> Path:
    """Register the wide model in the state folder and make it production; returns its folder."""
    settings = Settings.from_env({"QUADRA_STATE_DIR": str(state)})
    store = Store(settings.database_url)
    registry = ModelVersionManager(settings.models_dir, store, True)
    registry.save_model(build_model(CONFIG).eval(), VERSION, config=CONFIG, description="batching benchmark")
    registry.promote_to_production(VERSION)
    store.database.dispose()
    return settings.models_dir / VERSION


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        key, _ = prepare(state)
        model_dir = serve_wide(state)
        batched = {"QUADRA_BATCH_MAX_SIZE": str(MAX_ROWS), "QUADRA_BATCH_MAX_DELAY_MS": str(MAX_DELAY_MS)}
        servers: dict[str, Callable[[], AbstractContextManager[Endpoint]]] = {
            "service": lambda: full_service(state, key, **WIDE),
            "service, batched": lambda: full_service(state, key, **WIDE, **batched),
            "service, batched, no delay": lambda: full_service(state, key, **WIDE, **{
                **batched, "QUADRA_BATCH_MAX_DELAY_MS": "0"}),
            "TorchServe": lambda: torchserve.serve(model_dir, IRIS[0]),
            "TorchServe, batched": lambda: torchserve.serve(model_dir, IRIS[0], MAX_ROWS, MAX_DELAY_MS),
        }
        measured = {name: measure(serving) for name, serving in servers.items()}
        floors = {batch: forward_seconds(model_dir, batch, iterations=200) for batch in (1, MAX_ROWS)}
    return _table(measured, floors)


def measure(serving: Callable[[], AbstractContextManager[Endpoint]]) -> tuple[LoadResult, LoadResult]:
    """Saturation (16 connections), then one connection at a time."""
    with serving() as endpoint:
        body = endpoint.body(IRIS[:1])
        return (wrk_after_warm_up(endpoint.predict_url, body, endpoint.headers),
                wrk_after_warm_up(endpoint.predict_url, body, endpoint.headers, connections=1))


def _table(measured: dict[str, tuple[LoadResult, LoadResult]], floors: dict[int, float]) -> str:
    service = measured["service"][0].requests_per_second
    lines = [
        "## Dynamic batching\n",
        f"A registered architecture whose forward pass dominates a request (`bench/wide_model.py`: "
        f"{CONFIG['depth']} layers {CONFIG['width']} wide; one forward pass on one thread takes "
        f"{floors[1] * 1000:.2f} ms for 1 row and {floors[MAX_ROWS] * 1000:.2f} ms for {MAX_ROWS}), one row per "
        f"request, 4 workers each. Batched: the service with `QUADRA_BATCH_MAX_SIZE={MAX_ROWS}` and "
        f"`QUADRA_BATCH_MAX_DELAY_MS={MAX_DELAY_MS}` (no delay: `0`, so a request to an idle model runs at once and "
        "only those that come while a pass runs are grouped), TorchServe with `batchSize` {MAX_ROWS} and `maxBatchDelay` "
        f"{MAX_DELAY_MS} ms. 16 connections: wrk, 2 threads, 10 s after a 3 s warm-up; one connection: the same, "
        "one request at a time.\n",
        "| server | 16 connections | ÷ service unbatched | p50 | p99 | one connection: req/s | p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (loaded, alone) in measured.items():
        lines.append(
            f"| {name} | {loaded.requests_per_second:,.0f} req/s | {loaded.requests_per_second / service:.2f}× "
            f"| {loaded.p50_ms:.1f} ms | {loaded.p99_ms:.1f} ms | {alone.requests_per_second:,.0f} "
            f"| {alone.p50_ms:.2f} ms | {alone.p99_ms:.2f} ms |")
    failed = sum(loaded.failed + alone.failed for loaded, alone in measured.values())
    lines.append(f"\nFailed requests across every run: {failed}.")
    return "\n".join(lines) + "\n"
