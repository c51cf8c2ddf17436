"""Reloads and restarts under load (real gunicorn processes, both store backends): every
request the server accepted is answered, and every answered prediction is recorded exactly
once across a reload (`kill -HUP`) or a rolling restart (`kill -USR2`, then `-TERM` of the
old master), a graceful stop and a restart."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from sqlalchemy import func, insert, select

from tests.conftest import GUNICORN_COMMAND, KEEP_ALIVE_EXPIRY_SECONDS, KEYS_FILE
from tests.test_e2e_server import logged_swaps, worker_pids
from utils.config import Settings, resolve_secret_key
from utils.journal import process_alive
from utils.security import AuthManager
from utils.store import Store
from utils.store.tables import model_versions, predictions
from utils.training import load_dataset

pytestmark = pytest.mark.e2e
IRIS = load_dataset().features.tolist()
CLIENTS = 12
LOAD_SECONDS = 16.0
REQUEST_TIMEOUT = 120  # generous: new workers load the model while requests wait in the backlog


class Load:
    """CLIENTS threads predicting continuously, each on its own keep-alive session (as a
    client library does, closing a connection idle for longer than the server keeps it).
    Counts the rows answered with 200 and every failure: a status other than 200, or an
    exception (a reset connection, a request that got no answer)."""

    def __init__(self, server, api_key: str) -> None:
        self.url = f"{server.url}/api/predict"
        self.headers = {"X-API-Key": api_key}
        self.answered_rows = 0
        self.answered_requests = 0
        self.closing_answers = 0  # answers that closed their keep-alive connection cleanly
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(CLIENTS)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        last_answer = time.monotonic()
        with requests.Session() as session:
            session.headers.update(self.headers)
            while not self._stop.is_set():
                start = rng.randrange(150)
                rows = IRIS[start:start + rng.randint(1, 4)]
                failure, closing = None, False
                if time.monotonic() - last_answer > KEEP_ALIVE_EXPIRY_SECONDS:
                    session.close()  # a thread this late may find its connection closed by --keep-alive
                try:
                    response = session.post(self.url, json={"inputs": rows}, timeout=REQUEST_TIMEOUT)
                    closing = response.headers.get("Connection", "").lower() == "close"
                    if response.status_code != 200:
                        failure = f"HTTP {response.status_code}: {response.text[:200]}"
                except requests.RequestException as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                last_answer = time.monotonic()
                with self._lock:
                    self.closing_answers += closing
                    if failure is None:
                        self.answered_rows += len(rows)
                        self.answered_requests += 1
                    else:
                        self.failures.append(failure)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 30)

    def summary(self) -> str:
        return (f"{len(self.failures)} of {len(self.failures) + self.answered_requests} requests failed "
                f"({self.closing_answers} answers closed their connection): {Counter(self.failures).most_common(5)}")


def backend_env(backend: str, request: pytest.FixtureRequest, state_dir: Path) -> tuple[dict[str, str], str, str]:
    """(server environment, database URL, an admin key valid there) for a backend. On
    PostgreSQL the registry rows of the seeded 1.0.0 are copied over (the artifact folder is
    the same), so no server trains a model first."""
    keys = json.loads((state_dir / KEYS_FILE).read_text())
    sqlite_url = f"sqlite:///{state_dir / 'quadra.db'}"
    buffered = {"QUADRA_MONITORING_FLUSH_SECONDS": "0.2"}  # frequent flushes: concurrent ones on PostgreSQL
    if backend == "sqlite":
        return buffered, sqlite_url, keys["admin"]
    url = request.getfixturevalue("postgres_url")
    seeded, store = Store(sqlite_url), Store(url)
    with seeded.database.read() as source, store.database.write() as target:
        target.execute(insert(model_versions), [dict(row._mapping) for row in source.execute(select(model_versions))])
    store.versions.restore_deployment(seeded.versions.deployment(), actor="test")
    secret = resolve_secret_key(Settings.from_env({"QUADRA_STATE_DIR": str(state_dir)}))
    admin_key, _ = AuthManager(secret, store=store).create_api_key("reload-admin", ["admin"])
    seeded.database.dispose()
    store.database.dispose()
    return {**buffered, "QUADRA_DATABASE_URL": url}, url, admin_key


def recorded_rows(database_url: str) -> int:
    """The prediction records in the store, counted directly."""
    store = Store(database_url)
    try:
        with store.database.read() as conn:
            return int(conn.execute(select(func.count()).select_from(predictions)).scalar_one())
    finally:
        store.database.dispose()


def total_predictions(server) -> int:
    return requests.get(f"{server.url}/api/monitoring/stats", timeout=30).json()["total_predictions"]


def recorded_after_restart(start_server, state_dir: Path, env: dict[str, str], database_url: str,
                           answered: int) -> dict[str, int]:
    """Restart on the same state (which replays any journal left behind); the answered rows,
    the rows in the store and the running total (/api/monitoring/stats)."""
    restarted = start_server(state_dir, env)
    deadline = time.monotonic() + 60
    while total_predictions(restarted) < answered and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a replay still under way would show up as a total above the answers
    counts = {"answered": answered, "rows": recorded_rows(database_url), "total": total_predictions(restarted)}
    restarted.stop()
    return counts


def assert_nothing_failed_or_lost(load: Load, counts: dict[str, int]) -> None:
    assert load.answered_requests > 0 and load.closing_answers > 0, load.summary()  # stopping workers said so
    problems = [load.summary()] if load.failures else []
    if counts["rows"] != counts["answered"] or counts["total"] != counts["answered"]:
        problems.append(f"answered rows, stored rows and total_predictions differ: {counts}")
    assert not problems, problems


def pids_in(*pidfiles: Path) -> set[int]:
    return {int(text) for path in pidfiles if path.exists() and (text := path.read_text().strip())}


def stop_gracefully(pid: int) -> None:
    """SIGTERM a gunicorn master and wait until it is gone (it need not be our child)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while process_alive(pid):
        assert time.monotonic() < deadline, f"gunicorn master {pid} did not stop"
        time.sleep(0.2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_reload_under_load_fails_no_request_and_loses_no_record(
        backend: str, request: pytest.FixtureRequest, start_server, state_dir: Path) -> None:
    """The issue's run: 12 clients for 16 s against 4 eventlet workers, `kill -HUP` half-way
    (every worker replaced), then a graceful stop and a restart."""
    env, database_url, admin_key = backend_env(backend, request, state_dir)
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    before = worker_pids(server.process)
    with Load(server, admin_key) as load:
        time.sleep(LOAD_SECONDS / 2)
        server.process.send_signal(signal.SIGHUP)
        time.sleep(LOAD_SECONDS / 2)
    replaced = not (before & worker_pids(server.process))
    stop_gracefully(server.process.pid)
    server.process.wait(timeout=30)
    counts = recorded_after_restart(start_server, state_dir, env, database_url, load.answered_rows)
    print(f"reload on {backend}: {counts}; {load.summary()}")
    assert replaced, "the reload did not replace the workers"
    assert_nothing_failed_or_lost(load, counts)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_rolling_restart_under_load_fails_no_request_and_loses_no_record(
        backend: str, request: pytest.FixtureRequest, start_server, state_dir: Path, tmp_path: Path) -> None:
    """gunicorn's zero-downtime upgrade under the same load: `kill -USR2` starts a new master
    and workers beside the old ones; once the new workers serve, `kill -TERM` stops the old
    master gracefully; then the new master is stopped and the service restarted."""
    env, database_url, admin_key = backend_env(backend, request, state_dir)
    pidfile = tmp_path / "gunicorn.pid"
    server = start_server(state_dir, env, [*GUNICORN_COMMAND, "--pid", str(pidfile)])
    old_master, new_master = server.process.pid, None
    try:
        with Load(server, admin_key) as load:
            time.sleep(LOAD_SECONDS / 4)
            server.process.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 120
            while True:  # the new master writes gunicorn.pid.2; its four workers log that they serve
                new_master = next(iter(pids_in(pidfile.with_name(pidfile.name + ".2"))), None)
                if new_master is not None:
                    workers = worker_pids(SimpleNamespace(pid=new_master))
                    if len(workers) == 4 and workers <= logged_swaps(server, "1.0.0"):
                        break
                assert time.monotonic() < deadline, f"the new master's workers did not start:\n{server.log()[-3000:]}"
                time.sleep(0.2)
            stop_gracefully(old_master)
            time.sleep(LOAD_SECONDS / 2)
        assert int(pidfile.read_text()) == new_master  # promoted: the pid file names the new master
        stop_gracefully(new_master)
    finally:  # whatever failed, never leave the new master running
        for leftover in {new_master, *pids_in(pidfile.with_name(pidfile.name + ".2"), pidfile)} - {None, old_master}:
            if process_alive(leftover):
                os.kill(leftover, signal.SIGTERM)
    server.process.wait(timeout=30)
    counts = recorded_after_restart(start_server, state_dir, env, database_url, load.answered_rows)
    print(f"rolling restart on {backend}: {counts}; {load.summary()}")
    assert_nothing_failed_or_lost(load, counts)
