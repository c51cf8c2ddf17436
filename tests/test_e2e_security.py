"""Security end to end: real gunicorn eventlet workers sharing keys and limits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from tests.conftest import GUNICORN_COMMAND, KEYS_FILE, ROOT
from utils.config import Settings
from utils.store import Store

pytestmark = pytest.mark.e2e
SETOSA = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


def burst(url: str, key: str, count: int) -> list[int]:
    """`count` predictions sent 8 at a time; returns the status codes."""

    def one(_: int) -> int:
        return requests.post(f"{url}/api/predict", json=SETOSA, headers={"X-API-Key": key}, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def flask_cli(state_dir: Path, *args: str) -> str:
    env = {"QUADRA_STATE_DIR": str(state_dir), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


def shared_count(state_dir: Path) -> int:
    """The request counters' total in the service's database."""
    store = Store(Settings.from_env({"QUADRA_STATE_DIR": str(state_dir)}).database_url)
    try:
        with store.database.read() as conn:
            return conn.execute(text("SELECT coalesce(sum(count), 0) FROM rate_limits")).scalar_one()
    finally:
        store.database.dispose()


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_four_workers_share_the_limit_without_a_write_per_request(start_server, state_dir: Path, api_keys) -> None:
    """The default: each worker counts locally and shares its count every 0.1 s."""
    server = start_server(state_dir, {"QUADRA_MAX_REQUESTS": "30", "QUADRA_RATE_WINDOW": "3600"}, GUNICORN_COMMAND)
    codes = burst(server.url, api_keys["read"], 60)
    assert codes.count(200) >= 30 and set(codes) <= {200, 429}  # nobody is refused before the limit
    wait_for(lambda: shared_count(state_dir) == 60)  # every hit reaches the shared counter, once
    sent = [60]

    def all_refused() -> bool:
        sent.append(8)
        return set(burst(server.url, api_keys["read"], 8)) == {429}

    wait_for(all_refused)
    server.stop()  # the workers' exit hooks share what they still hold
    assert shared_count(state_dir) == sum(sent)


def test_four_workers_admit_exactly_the_limit_in_exact_mode(start_server, state_dir: Path, api_keys) -> None:
    env = {"QUADRA_MAX_REQUESTS": "30", "QUADRA_RATE_WINDOW": "3600", "QUADRA_RATE_LIMIT_SYNC_SECONDS": "0"}
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    codes = burst(server.url, api_keys["read"], 60)
    assert codes.count(200) == 30 and codes.count(429) == 30
    assert shared_count(state_dir) == 60


def test_four_workers_with_redis_admit_exactly_the_limit(start_server, state_dir: Path, api_keys, redis_url, redis_prefix) -> None:
    env = {"QUADRA_MAX_REQUESTS": "30", "QUADRA_RATE_WINDOW": "3600", "QUADRA_REDIS_URL": redis_url, "QUADRA_REDIS_PREFIX": redis_prefix}
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    codes = burst(server.url, api_keys["read"], 60)
    assert codes.count(200) == 30 and codes.count(429) == 30
    import redis

    assert any(redis.Redis.from_url(redis_url).scan_iter(match=f"*{redis_prefix}*"))


def test_limit_holds_across_a_restart_and_for_the_console(start_server, state_dir: Path, api_keys) -> None:
    env = {"QUADRA_MAX_REQUESTS": "10", "QUADRA_RATE_WINDOW": "3600"}
    first = start_server(state_dir, env)
    assert burst(first.url, api_keys["read"], 6).count(200) == 6
    first.stop()  # SIGTERM: the counts still held in the process are shared on the way out
    second = start_server(state_dir, env)
    one_at_a_time = [second.post("/api/predict", json=SETOSA, headers={"X-API-Key": api_keys["read"]}).status_code
                     for _ in range(6)]
    assert one_at_a_time == [200] * 4 + [429] * 2


def test_console_key_and_revocation_reach_every_worker(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    api_key = flask_cli(state_dir, "keys", "create", "--name", "from-cli", "--permissions", "read").splitlines()[-1]
    assert all(code == 200 for code in burst(server.url, api_key, 16))
    key_id = next(k["id"] for k in server.get("/api/auth/keys").json()["keys"] if k["name"] == "from-cli")
    flask_cli(state_dir, "keys", "revoke", key_id)
    wait_for(lambda: set(burst(server.url, api_key, 16)) <= {401, 429})  # 429 once failures are throttled
    assert api_key not in server.log()


def test_token_works_on_every_worker_and_dies_with_its_key(start_server, state_dir: Path) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    created = server.post("/api/auth/keys", json={"name": "tokens", "permissions": ["read"]}).json()
    token = requests.post(f"{server.url}/api/auth/token", headers={"X-API-Key": created["api_key"]}, timeout=10).json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert all(requests.get(f"{server.url}/api/model/versions", headers=bearer, timeout=10).status_code == 200 for _ in range(12))
    assert server.delete(f"/api/auth/keys/{created['id']}").status_code == 200
    refused = {401, 429}  # 429 once the address's failures are throttled
    wait_for(lambda: all(
        requests.get(f"{server.url}/api/model/versions", headers=bearer, timeout=10).status_code in refused for _ in range(12)
    ))


def test_seed_verify_deployment_lines(start_server, state_dir: Path) -> None:
    """The seed's checks: 401 without a key, data with X-API-Key."""
    server = start_server(state_dir)
    assert requests.get(f"{server.url}/api/model/versions", timeout=10).status_code == 401
    response = server.get("/api/model/versions")
    assert response.status_code == 200 and response.json()["production_version"] == "1.0.0"
    keys = json.loads((state_dir / KEYS_FILE).read_text())
    assert not any(key in server.log() for key in keys.values())
