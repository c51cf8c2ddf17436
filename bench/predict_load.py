"""/api/predict under concurrent load (wrk, loopback, gunicorn -w 4 eventlet for both servers):
the full service against the bare Flask app serving the same model (the ceiling of this stack)
and the raw forward pass (the floor), for batches of 1 and 32; then hot swaps under load."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import torch

from bench.load import ROOT, Endpoint, LoadResult, Server, wrk, wrk_after_warm_up
from bench.peers import KSERVE, PEERS, Peer
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


EVENTLET = ("--worker-class", "eventlet")  # as the seed deploys it


def gunicorn(app: str, config: str, worker_class: tuple[str, ...] = EVENTLET) -> list[str]:
    return [str(Path(sys.executable).parent / "gunicorn"), "-c", config, "-w", "4", "-b", "127.0.0.1:{port}",
            *worker_class, app]


def prepare(state: Path) -> tuple[str, Path]:
    """A state folder with the initial model and an admin key; returns the key and model folder."""
    settings = Settings.from_env({"QUADRA_STATE_DIR": str(state)})
    store = Store(settings.database_url)
    ensure_initial_version(ModelVersionManager(settings.models_dir, store, True))
    key, _ = AuthManager(resolve_secret_key(settings), store=store).create_api_key("bench", ["admin"])
    store.database.dispose()
    return key, settings.models_dir / "1.0.0"


def service_env(state: Path, **extra: str) -> dict[str, str]:
    """The full service's environment in every load phase: its state folder, a rate limit out
    of the load generator's way, quiet logs."""
    return {"QUADRA_STATE_DIR": str(state), "QUADRA_MAX_REQUESTS": "10000000", "QUADRA_LOG_LEVEL": "warning", **extra}


def write_bare_config(folder: Path) -> Path:
    """The bare app's gunicorn config: none of the service's hooks but those any app needs
    alike, so the ceiling stays honest: no control socket (a clean stop on Python 3.13), the
    same fair yield after each response (gunicorn.conf.py's post_request) and the same spread
    of connections across workers (its spread_connections_across_workers)."""
    config = folder / "bare.conf.py"
    config.write_text(f"import runpy\n\nservice = runpy.run_path({str(ROOT / 'gunicorn.conf.py')!r})\n"
                      "post_request = service['post_request']\n"
                      "post_worker_init = service['spread_connections_across_workers']\n"
                      "control_socket_disable = True\n")
    return config


def quadra_body(rows: list[list[float]]) -> dict:
    return {"inputs": rows}


@contextmanager
def full_service(state: Path, key: str, worker_class: tuple[str, ...] = EVENTLET, **extra_env: str) -> Iterator[Endpoint]:
    """The full service under gunicorn -w 4 (eventlet unless told), as the load phases run it."""
    command = gunicorn("app:app", "gunicorn.conf.py", worker_class)
    with Server(command, service_env(state, **extra_env), "/api/health") as server:
        yield Endpoint("full service", f"{server.url}/api/predict", quadra_body, server, {"X-API-Key": key})


@contextmanager
def bare_app(folder: Path, model_dir: Path, worker_class: tuple[str, ...] = EVENTLET) -> Iterator[Endpoint]:
    """The bare Flask app (the ceiling) under the same command, serving `model_dir`."""
    command = gunicorn("bench.bare_app:app", str(write_bare_config(folder)), worker_class)
    with Server(command, {"BARE_MODEL_DIR": str(model_dir)}, "/") as server:
        yield Endpoint("bare Flask app", f"{server.url}/api/predict", quadra_body, server)


def forward_seconds(model_dir: Path, batch: int, iterations: int = 2000) -> float:
    """The floor: one forward pass of `batch` rows, in-process, one thread."""
    import json

    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model = build_model(json.loads((model_dir / "config.json").read_text()))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    model.eval()
    x = torch.tensor(IRIS[:batch])
    with torch.inference_mode():
        for _ in range(iterations // 10):
            model(x)
        started = time.perf_counter()
        for _ in range(iterations):
            model(x)
    return (time.perf_counter() - started) / iterations


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


def peer_loads(model_dir: Path) -> dict[str, tuple[Peer, dict[int, LoadResult]]]:
    """The same wrk runs against every peer, one at a time; keyed by the peer's name (a peer
    whose keep-alive answers stall is also measured with a new connection per request)."""
    measured = {}
    for peer in PEERS:
        with peer.serve(model_dir, IRIS[0]) as endpoint:
            variants = {endpoint.name: {}}
            if peer.keep_alive_stall:
                variants[f"{endpoint.name}, a new connection per request"] = {"Connection": "close"}
            for name, headers in variants.items():
                measured[name] = (peer, {batch: wrk_after_warm_up(endpoint.predict_url, endpoint.body(IRIS[:batch]), headers)
                                         for batch in BATCHES})
    return measured


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        state = work / "state"
        key, model_dir = prepare(state)
        servers = {
            "full": lambda: full_service(state, key),
            "exact": lambda: full_service(state, key, QUADRA_RATE_LIMIT_SYNC_SECONDS="0"),
            "bare": lambda: bare_app(work, model_dir),
        }
        measured: dict[tuple[str, int], list[LoadResult]] = {}
        for _ in range(ROUNDS):
            for name, serving in servers.items():
                with serving() as endpoint:
                    for batch in BATCHES:
                        measured.setdefault((name, batch), []).append(
                            wrk_after_warm_up(endpoint.predict_url, endpoint.body(IRIS[:batch]), endpoint.headers))
        with full_service(state, key) as endpoint:
            steady, swapping = hot_swaps(endpoint.server, key)
        floors = {batch: forward_seconds(model_dir, batch) for batch in BATCHES}
        peers = peer_loads(model_dir)
    return _table(measured, floors, steady, swapping) + _peer_table(measured, peers)


def _table(measured: dict, floors: dict, steady: LoadResult, swapping: LoadResult) -> str:
    lines = [
        "## /api/predict under load\n",
        "wrk, 2 threads, 16 connections, 10 s per run, best of 2 alternating runs; both servers under "
        "`gunicorn -w 4 --worker-class eventlet` with the same fair yield after each response (gunicorn.conf.py's "
        "`post_request`); the floor is one in-process forward pass on one thread.\n",
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
                f"| {floors[batch] * 1e6:.0f} µs ({1 / floors[batch]:,.0f}/s per core) | ≥ 0.75× throughput (goal 0.9×) |"
            )
    lines += [
        "",
        "**Hot swap under load** (production flipped between two versions 10 times during a 12 s run):\n",
        "| run | requests | failed | req/s | p50 | p99 |",
        "|---|---|---|---|---|---|",
        f"| steady | {steady.total:,} | {_failed(steady)} | {steady.requests_per_second:,.0f} | {steady.p50_ms:.2f} ms "
        f"| {steady.p99_ms:.2f} ms |",
        f"| 10 promotes | {swapping.total:,} | {_failed(swapping)} | {swapping.requests_per_second:,.0f} | {swapping.p50_ms:.2f} ms "
        f"| {swapping.p99_ms:.2f} ms ({swapping.p99_ms / steady.p99_ms:.2f}× steady) |",
    ]
    return "\n".join(lines) + "\n"


def _failed(result: LoadResult) -> str:
    return f"{result.failed} ({result.failures})" if result.failed else "0"


def _peer_table(measured: dict, peers: dict[str, tuple[Peer, dict[int, LoadResult]]]) -> str:
    lines = [
        "",
        "**Against the peers** (each in its own environment under bench/.work, the same model traced to TorchScript "
        "with its softmax, 4 workers, one torch thread per worker, the same wrk run, 3 s warm-up; the full service "
        "with authentication, limits, validation and monitoring on):\n",
        "| batch | peer | full service | peer | throughput full / peer | p50 full / peer | p99 full / peer | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch in BATCHES:
        full = best(measured[("full", batch)])
        for name, (peer, results) in peers.items():
            other = results[batch]
            target = f"≥ {peer.throughput_target:g}×"
            if name == KSERVE:
                target += f"; p99 ≤ 3× (here {full.p99_ms / other.p99_ms:.2f}×)"
            lines.append(
                f"| {batch} | {name} | {full.requests_per_second:,.0f} req/s | {other.requests_per_second:,.0f} req/s "
                f"| {full.requests_per_second / other.requests_per_second:.2f}× | {full.p50_ms:.1f} / {other.p50_ms:.1f} ms "
                f"| {full.p99_ms:.1f} / {other.p99_ms:.1f} ms | {target} |"
            )
    return "\n".join(lines) + "\n"
