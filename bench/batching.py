"""Dynamic batching on a model whose forward pass dominates a request (bench/wide_model.py,
registered as a user registers theirs): the full service without and with
QUADRA_BATCH_MAX_SIZE / QUADRA_BATCH_MAX_DELAY_MS, and TorchServe without and with its own
batch_size / max_batch_delay, on the same model: throughput under 64 connections, and latency
under an open loop at 25% of the unbatched service's capacity (what the delay adds when
traffic is light)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench import torchserve
from bench.latency import open_loop
from bench.load import Endpoint, LoadResult, wrk_after_warm_up
from bench.predict_load import IRIS, forward_seconds, full_service, prepare
from bench.wide_model import CONFIG
from utils.config import Settings
from utils.model_versioning import ModelVersionManager
from utils.serving import build_model
from utils.store import Store

MAX_ROWS = 32
MAX_DELAY_MS = 5
CONNECTIONS = 64  # the concurrent clients
LOW_SHARE = 0.25  # the open loop's rate: this share of the unbatched service's capacity
UNBATCHED, TORCHSERVE_BATCHED = "service", "TorchServe, batched"
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
        work = Path(folder)
        key, _ = prepare(work / "state")
        model_dir = serve_wide(work / "state")
        batched = {"QUADRA_BATCH_MAX_SIZE": str(MAX_ROWS), "QUADRA_BATCH_MAX_DELAY_MS": str(MAX_DELAY_MS)}
        servers: dict[str, Callable[[], AbstractContextManager[Endpoint]]] = {
            UNBATCHED: lambda: full_service(work / "state", key, **WIDE),
            "service, batched": lambda: full_service(work / "state", key, **WIDE, **batched),
            "service, batched, no delay": lambda: full_service(work / "state", key, **WIDE, **{
                **batched, "QUADRA_BATCH_MAX_DELAY_MS": "0"}),
            "TorchServe": lambda: torchserve.serve(model_dir, IRIS[0]),
            TORCHSERVE_BATCHED: lambda: torchserve.serve(model_dir, IRIS[0], MAX_ROWS, MAX_DELAY_MS),
        }
        measured: dict[str, Runs] = {}
        for name, serving in servers.items():  # the unbatched service first: its capacity sets the open loop's rate
            measured[name] = measure(serving, measured[UNBATCHED].loaded.requests_per_second * LOW_SHARE
                                     if measured else None, work)
        floors = {batch: forward_seconds(model_dir, batch, iterations=200) for batch in (1, MAX_ROWS)}
    return _table(measured, floors)


@dataclass(frozen=True)
class Runs:
    loaded: LoadResult  # CONNECTIONS connections, closed loop
    low: dict[str, float]  # open loop at LOW_SHARE of the unbatched service's capacity


def measure(serving: Callable[[], AbstractContextManager[Endpoint]], low_rate: float | None, folder: Path) -> Runs:
    """Saturation with CONNECTIONS connections, then the open loop at `low_rate` (at
    LOW_SHARE of its own capacity when None: the unbatched service, measured first)."""
    with serving() as endpoint:
        body = endpoint.body(IRIS[:1])
        body_file = folder / "body.json"
        body_file.write_text(json.dumps(body))
        loaded = wrk_after_warm_up(endpoint.predict_url, body, endpoint.headers, connections=CONNECTIONS)
        rate = low_rate if low_rate is not None else loaded.requests_per_second * LOW_SHARE
        return Runs(loaded, open_loop(endpoint.predict_url, rate, body_file, endpoint.headers))


def _table(measured: dict[str, Runs], floors: dict[int, float]) -> str:
    unbatched, service_batched = measured[UNBATCHED], measured["service, batched"]
    rate = measured[UNBATCHED].low["rate"]
    lines = [
        "## Dynamic batching\n",
        f"A registered architecture whose forward pass dominates a request (`bench/wide_model.py`: "
        f"{CONFIG['depth']} layers {CONFIG['width']} wide; one forward pass on one thread takes "
        f"{floors[1] * 1000:.2f} ms for 1 row and {floors[MAX_ROWS] * 1000:.2f} ms for {MAX_ROWS}), one row per "
        f"request, 4 workers each. Batched: the service with `QUADRA_BATCH_MAX_SIZE={MAX_ROWS}` and "
        f"`QUADRA_BATCH_MAX_DELAY_MS={MAX_DELAY_MS}` (no delay: `0`, so a request to an idle model runs at once and "
        f"only those that come while a pass runs are grouped), TorchServe with `batchSize` {MAX_ROWS} and "
        f"`maxBatchDelay` {MAX_DELAY_MS} ms. Closed loop: wrk, {CONNECTIONS} connections, 10 s after a 3 s warm-up. "
        f"Open loop: {rate:,.0f} req/s ({LOW_SHARE:.0%} of the unbatched service's capacity) for 10 s, latency "
        "from each request's scheduled send time.\n",
        f"| server | {CONNECTIONS} connections | ÷ service unbatched | p50 | p99 | open loop p50 | p99 | p99.9 | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in measured.items():
        loaded, low = runs.loaded, runs.low
        lines.append(
            f"| {name} | {loaded.requests_per_second:,.0f} req/s "
            f"| {loaded.requests_per_second / unbatched.loaded.requests_per_second:.2f}× | {loaded.p50_ms:.1f} ms "
            f"| {loaded.p99_ms:.1f} ms | {low['p50_ms']:.2f} ms | {low['p99_ms']:.2f} ms | {low['p999_ms']:.2f} ms "
            f"| {loaded.failed + low['failed']:.0f} |")
    gain = service_batched.loaded.requests_per_second / unbatched.loaded.requests_per_second
    ahead = service_batched.loaded.requests_per_second / measured[TORCHSERVE_BATCHED].loaded.requests_per_second
    bound = unbatched.low["p99_ms"] + MAX_DELAY_MS
    lines += [
        "",
        f"Targets: batched ≥ 2× unbatched at {CONNECTIONS} connections: {gain:.2f}×; open-loop p99 ≤ unbatched p99 + "
        f"the delay ({bound:.2f} ms): {service_batched.low['p99_ms']:.2f} ms; ahead of TorchServe's batching: "
        f"{ahead:.2f}× its throughput.",
    ]
    return "\n".join(lines) + "\n"
