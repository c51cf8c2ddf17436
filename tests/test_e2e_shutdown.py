"""A stop stops everything, on every supported Python: `gunicorn -w 4 --worker-class eventlet`
with the real app, some predictions, SIGTERM to the master; then the master has exited cleanly,
every worker is gone and every answered prediction is in the store.

The running interpreter's own version uses this environment's gunicorn; the other supported
versions use the runtime environments `make pythons` builds under .venvs/ (CI builds them).
A version without one skips with the reason, and fails instead in CI (CI=true)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import IN_CI, KEYS_FILE, ROOT, ServerProcess, free_port
from utils.store import Store

pytestmark = pytest.mark.e2e

SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")
WORKERS = 4
ROW = [5.1, 3.5, 1.4, 0.2]
READY_TIMEOUT = 300  # generous: four workers load torch on a shared two-core machine
STOP_TIMEOUT = 90  # generous: gunicorn's graceful timeout is 30 s


def gunicorn_for(version: str) -> Path:
    """The gunicorn of an environment on Python `version` (skip where none, fail in CI)."""
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return Path(sys.executable).parent / "gunicorn"
    venv = ROOT / ".venvs" / f"py{version}"
    if (venv / ".installed").exists():
        return venv / "bin" / "gunicorn"
    reason = f"no Python {version} environment at .venvs/py{version} (`make pythons` builds one where Python {version} is installed)"
    if IN_CI:
        pytest.fail(reason + " (CI=true: the shutdown test must run on every supported Python)")
    pytest.skip(reason)


@pytest.fixture
def gunicorn_server(tmp_path: Path) -> Iterator[Callable[[Path, Path], tuple[ServerProcess, dict[int, str]]]]:
    """Start `gunicorn -w 4 --worker-class eventlet app:app` of a given environment on a state
    folder (like conftest's start_server, with a longer start-up allowance): the server and its
    workers (pid: start time). Afterwards any of them still running is stopped or killed."""
    started: list[tuple[ServerProcess, dict[int, str]]] = []

    def start(gunicorn: Path, state: Path) -> tuple[ServerProcess, dict[int, str]]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
        env.update({
            "QUADRA_STATE_DIR": str(state),
            "QUADRA_MAX_REQUESTS": "1000000",
            # Records stay buffered in the workers (flushed every 60 s), so the stop writes them.
            "QUADRA_MONITORING_FLUSH_SECONDS": "60",
            "PYTHONUNBUFFERED": "1",
        })
        command = [str(gunicorn), "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--worker-class", "eventlet", "app:app"]
        admin_key = json.loads((state / KEYS_FILE).read_text())["admin"]
        server = ServerProcess(command, env, port, tmp_path / f"server-{port}.log", admin_key)
        workers: dict[int, str] = {}
        started.append((server, workers))
        deadline = time.monotonic() + READY_TIMEOUT
        while len(workers) < WORKERS:
            workers.update(live_children(server.process.pid))
            assert server.process.poll() is None and time.monotonic() < deadline, f"no {WORKERS} workers:\n{server.log()}"
            time.sleep(0.2)
        server.wait_ready(timeout=READY_TIMEOUT)
        return server, workers

    yield start
    for server, workers in started:
        workers.update(live_children(server.process.pid))
        server.stop()
        for pid in still_running(workers):
            os.kill(pid, signal.SIGKILL)


def process_start(pid: int) -> str | None:
    """The start time of a live (not zombie) process `pid`, None once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def live_children(pid: int) -> dict[int, str]:
    """The live child processes of `pid` (gunicorn's workers), with their start times."""
    found: dict[int, str] = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in map(int, (task / "children").read_text().split()):
                start_time = process_start(child)
                if start_time is not None:
                    found[child] = start_time
    except FileNotFoundError:  # `pid` has exited
        pass
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    """Those of `processes` (pid: start time) that have not exited (a reused pid does not count)."""
    return sorted(pid for pid, start_time in processes.items() if process_start(pid) == start_time)


def predict_rows(url: str, key: str, batches: list[int]) -> int:
    """One request per batch size (fresh connections, spread over the workers); the number of
    rows answered with 200."""

    def one(rows: int) -> int:
        response = requests.post(f"{url}/api/predict", json={"inputs": [ROW] * rows},
                                 headers={"X-API-Key": key}, timeout=60)
        return rows if response.status_code == 200 else 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(one, batches))


@pytest.mark.parametrize("version", SUPPORTED_PYTHONS)
def test_sigterm_stops_the_master_and_every_worker_and_loses_no_record(version: str, gunicorn_server, state_dir: Path) -> None:
    gunicorn = gunicorn_for(version)
    server, workers = gunicorn_server(gunicorn, state_dir)
    master = server.process
    python = subprocess.run([str(gunicorn.parent / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert python == version

    answered = predict_rows(server.url, server.admin_key, [1] * 120 + [3] * 20)
    assert answered == 180
    master.send_signal(signal.SIGTERM)
    try:
        code = master.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the master did not exit within {STOP_TIMEOUT}s of SIGTERM:\n{server.log()[-3000:]}")
    deadline = time.monotonic() + STOP_TIMEOUT
    while still_running(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = still_running(workers)  # the fixture kills any left, after this assertion
    assert (code, left) == (0, []), f"master exit {code}, workers left {left} of {sorted(workers)}:\n{server.log()[-3000:]}"

    store = Store(f"sqlite:///{state_dir / 'quadra.db'}")
    try:
        totals = store.predictions.totals()
        rows = store.predictions.count_since(0.0)
    finally:
        store.database.dispose()
    assert (totals.count, rows) == (answered, answered)
