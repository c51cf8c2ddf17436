"""Promotes and rollbacks under concurrency: four gunicorn eventlet workers, both backends.

Promotes of the same version racing on several workers must not record "2.1.0 -> 2.1.0"
steps, and rollbacks must then walk back through the versions production really had."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import GUNICORN_COMMAND, ServerProcess
from utils.security import AuthManager
from utils.store import Store

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, start_server, state_dir: Path, tmp_path: Path) -> ServerProcess:
    if request.param == "sqlite":
        return start_server(state_dir, {}, GUNICORN_COMMAND)
    url = request.getfixturevalue("postgres_url")
    secret = f"deployments-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    store = Store(url)
    admin_key, _ = AuthManager(secret, store=store).create_api_key("deployments-admin", ["admin"])
    store.database.dispose()
    started = start_server(tmp_path / "pg-state", {"QUADRA_DATABASE_URL": url, "QUADRA_SECRET_KEY": secret},
                           GUNICORN_COMMAND)
    started.session.headers["X-API-Key"] = admin_key
    return started


def promote_concurrently(server: ServerProcess, versions: list[str]) -> list[int]:
    """POST a promote per entry, 16 at a time (spread over the four workers)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda v: server.post(f"/api/model/promote/{v}").status_code, versions))


def history(server: ServerProcess) -> list[dict]:
    """Production changes (promotes and rollbacks), oldest first."""
    entries = server.get("/api/model/history?limit=1000").json()["history"]
    return [e for e in reversed(entries) if e["action"] in ("promote", "rollback")]


def test_concurrent_repeated_promotes_leave_rollback_working(server: ServerProcess) -> None:
    for version in ("2.0.0", "2.1.0"):
        assert server.post("/api/model/save", json={"version": version}).status_code == 201
    assert server.post("/api/model/promote/2.0.0").json()["changed"] is True

    assert promote_concurrently(server, ["2.1.0"] * 32) == [200] * 32
    again = server.post("/api/model/promote/2.1.0").json()
    assert again["changed"] is False and again["production_version"] == again["previous_version"] == "2.1.0"
    steps = [(e["from_version"], e["to_version"]) for e in history(server)]
    assert steps == [(None, "1.0.0"), ("1.0.0", "2.0.0"), ("2.0.0", "2.1.0")]

    assert server.post("/api/model/rollback").json()["production_version"] == "2.0.0"
    assert server.post("/api/model/rollback").json()["production_version"] == "1.0.0"
    assert server.post("/api/model/rollback").status_code == 409


def test_interleaved_concurrent_promotes_record_a_consistent_chain(server: ServerProcess) -> None:
    for version in ("2.0.0", "2.1.0", "2.2.0"):
        assert server.post("/api/model/save", json={"version": version}).status_code == 201
    assert promote_concurrently(server, ["2.0.0", "2.1.0", "2.2.0"] * 12) == [200] * 36
    steps = history(server)
    assert all(step["from_version"] != step["to_version"] for step in steps)
    assert all(later["from_version"] == earlier["to_version"] for earlier, later in zip(steps, steps[1:], strict=False))
    production = server.get("/api/model/versions").json()["production_version"]
    assert steps[-1]["to_version"] == production
    rolled_back = server.post("/api/model/rollback").json()
    assert rolled_back["previous_version"] == production and rolled_back["production_version"] != production
