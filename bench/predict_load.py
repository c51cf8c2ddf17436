"""/api/predict under concurrent load (wrk, loopback, gunicorn -w 4 eventlet for both servers):
the full service against the bare Flask app serving the same model (the ceiling of this stack)
and the raw forward pass (the floor), for batches of 1 and 32; then hot swaps under load."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from bench import torchserve
from bench.load import LoadResult, Server, wrk
from utils.config import Settings, resolve_secret_key
from utils.model_versioning import ModelVersionManager
from utils.security import AuthManager
from utils.serving import build_model
from utils.store import Store
from utils.training import ensure_initial_version, load_dataset

ROUNDS = 2
BATCHES = (1, 32)
SWAPS = 10
IRIS = load_dataset().features.tolist()


def gunicorn(app: str, config: str) -> list[str]:
    return [str(Path(sys.executable).parent / "gunicorn"), "-c", config, "-w", "4", "-b", "127.0.0.1:{port}",
            "--worker-class", "eventlet", app]


def prepare(state: Path) -> tuple[str, Path]:
    """A state folder with the initial model and an admin key; returns the key and model folder."""
    settings = Settings.from_env({"QUADRA_STATE_DIR": str(state)})
    store = Store(settings.database_url)
    ensure_initial_version(ModelVersionManager(settings.models_dir, store, True))
    key, _ = AuthManager(resolve_secret_key(settings), store=store).create_api_key("bench", ["admin"])
    store.database.dispose()
    return key, settings.models_dir / "1.0.0"


def forward_seconds(model_dir: Path, batch: int) -> float:
    """The floor: one forward pass of `batch` rows, in-process, one thread."""
    import json

    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model = build_model(json.loads((model_dir / "config.json").read_text()))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    model.eval()
    x = torch.tensor(IRIS[:batch])
    with torch.inference_mode():
        for _ in range(200):
            model(x)
        started = time.perf_counter()
        for _ in range(2000):
            model(x)
    return (time.perf_counter() - started) / 2000


def best(results: list[LoadResult]) -> LoadResult:
    return max(results, key=lambda r: r.requests_per_second)


def hot_swaps(server: Server, key: str) -> tuple[LoadResult, LoadResult]:
    """Steady load, then the same load while production flips between two versions SWAPS times."""
    headers = {"X-API-Key": key}
    requests.post(f"{server.url}/api/model/save", json={"version": "1.1.0"}, headers=headers, timeout=30).raise_for_status()
    body = {"inputs": IRIS[:1]}
    steady = wrk(f"{server.url}/api/predict", body, headers, duration=12)
    outcome: dict[str, LoadResult] = {}
    loader = threading.Thread(target=lambda: outcome.update(run=wrk(f"{server.url}/api/predict", body, headers, duration=12)))
    loader.start()
    for i in range(SWAPS):
        time.sleep(1.0)
        version = "1.1.0" if i % 2 == 0 else "1.0.0"
        requests.post(f"{server.url}/api/model/promote/{version}", headers=headers, timeout=30).raise_for_status()
    loader.join()
    return steady, outcome["run"]


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        key, model_dir = prepare(state)
        empty_config = Path(folder) / "no-hooks.conf.py"
        empty_config.write_text("control_socket_disable = True\n")  # as gunicorn.conf.py: a clean stop on 3.13
        full_env = {"QUADRA_STATE_DIR": str(state), "QUADRA_MAX_REQUESTS": "10000000", "QUADRA_LOG_LEVEL": "warning"}
        exact_env = {**full_env, "QUADRA_RATE_LIMIT_SYNC_SECONDS": "0"}
        bare_env = {"BARE_MODEL_DIR": str(model_dir)}
        measured: dict[tuple[str, int], list[LoadResult]] = {}
        for _ in range(ROUNDS):
            for name, command, env, headers in (
                ("full", gunicorn("app:app", "gunicorn.conf.py"), full_env, {"X-API-Key": key}),
                ("exact", gunicorn("app:app", "gunicorn.conf.py"), exact_env, {"X-API-Key": key}),
                ("bare", gunicorn("bench.bare_app:app", str(empty_config)), bare_env, {}),
            ):
                with Server(command, env, "/api/health" if name != "bare" else "/") as server:
                    for batch in BATCHES:
                        wrk(f"{server.url}/api/predict", {"inputs": IRIS[:batch]}, headers, duration=3)  # warm-up
                        measured.setdefault((name, batch), []).append(
                            wrk(f"{server.url}/api/predict", {"inputs": IRIS[:batch]}, headers))
        with Server(gunicorn("app:app", "gunicorn.conf.py"), full_env, "/api/health") as server:
            steady, swapping = hot_swaps(server, key)
        floors = {batch: forward_seconds(model_dir, batch) for batch in BATCHES}
        peer = torchserve.run(model_dir, {batch: {"inputs": IRIS[:batch]} for batch in BATCHES})
    return _table(measured, floors, peer, steady, swapping)


def _table(measured: dict, floors: dict, peer: dict[int, LoadResult], steady: LoadResult, swapping: LoadResult) -> str:
    lines = [
        "## /api/predict under load\n",
        "wrk, 2 threads, 16 connections, 10 s per run, best of 2 alternating runs; both servers under "
        "`gunicorn -w 4 --worker-class eventlet`; the floor is one in-process forward pass on one thread.\n",
        "| batch | service | bare Flask (ceiling) | full / bare throughput | p50 full / bare | p99 full / bare | p99 ratio "
        "| floor (forward pass) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("full", "full service"), ("exact", "full, exact limits (`QUADRA_RATE_LIMIT_SYNC_SECONDS=0`)")):
        for batch in BATCHES:
            full, bare = best(measured[(name, batch)]), best(measured[("bare", batch)])
            lines.append(
                f"| {batch} | {label}: {full.requests_per_second:,.0f} req/s | {bare.requests_per_second:,.0f} req/s "
                f"| {full.requests_per_second / bare.requests_per_second:.2f}× | {full.p50_ms:.2f} / {bare.p50_ms:.2f} ms "
                f"| {full.p99_ms:.2f} / {bare.p99_ms:.2f} ms | {full.p99_ms / bare.p99_ms:.2f}× "
                f"| {floors[batch] * 1e6:.0f} µs ({1 / floors[batch]:,.0f}/s per core) | ≥ 0.9× throughput, p99 ≤ 1.2× |"
            )
    lines += [
        "",
        f"**Against TorchServe 0.12** (same model traced to TorchScript, {torchserve.WORKERS} workers, same wrk run):\n",
        "| batch | full service | TorchServe | throughput ratio | p99 full / TorchServe | target |",
        "|---|---|---|---|---|---|",
    ]
    for batch in BATCHES:
        full, other = best(measured[("full", batch)]), peer[batch]
        lines.append(
            f"| {batch} | {full.requests_per_second:,.0f} req/s | {other.requests_per_second:,.0f} req/s "
            f"| {full.requests_per_second / other.requests_per_second:.2f}× | {full.p99_ms:.1f} / {other.p99_ms:.1f} ms "
            "| ≥ 3× at equal or lower p99 |"
        )
    lines += [
        "",
        "**Hot swap under load** (production flipped between two versions 10 times during a 12 s run):\n",
        "| run | requests | failed | req/s | p50 | p99 |",
        "|---|---|---|---|---|---|",
        f"| steady | {steady.total:,} | {steady.failed} | {steady.requests_per_second:,.0f} | {steady.p50_ms:.2f} ms "
        f"| {steady.p99_ms:.2f} ms |",
        f"| 10 promotes | {swapping.total:,} | {swapping.failed} | {swapping.requests_per_second:,.0f} | {swapping.p50_ms:.2f} ms "
        f"| {swapping.p99_ms:.2f} ms ({swapping.p99_ms / steady.p99_ms:.2f}× steady) |",
    ]
    return "\n".join(lines) + "\n"
