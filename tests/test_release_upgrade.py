"""Upgrade in place: what the release of 2026-11-30 wrote opens under the current code with
every version, key, audit record, prediction record and job intact, on both backends.

tests/fixtures/release-2026-11-30 was written by that release's own code
(tests/fixtures/make_release_fixtures.py, run on main before issue 15): a SQLite state
folder, and a PostgreSQL database (postgres.sql, loaded here into a fresh schema) with its
deployment's folder of artifacts. Each test opens a copy with today's `create_app` and
checks, through the HTTP API, what tests/fixtures/release-2026-11-30/expected.json recorded.

Never regenerate the fixtures to make this test pass: they stand for what deployments of
that release hold, and a schema change must upgrade them in place. For the same reason the
test uses only public behaviour (the HTTP API, `create_app`, `start_serving`,
`stop_serving`, `Settings`), plus the store's schema version for the upgrade itself
(`schema_version` below), never a table name.

Two settings keep the release's data as it was written, whatever the date of the run: the
retention of raw prediction records (roll-ups would fold records older than a day) and the
background drift check (it would add alerts). The logs (history, audit, alerts) must begin
with the release's records; opening may append to them, never change them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import create_engine

from tests.conftest import epoch, make_settings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release-2026-11-30"
MANIFEST = json.loads((FIXTURE / "expected.json").read_text())
BACKENDS = ("sqlite", "postgresql")
KEEP_AS_WRITTEN = {"monitoring_retention_hours": 24.0 * 3650, "drift_check_seconds": 86_400.0}
IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
WRITE_ACTIONS = {"registry.save_model", "registry.promote_version", "auth.create_key", "modes.set_mode"}


def fixture_key(entry: str) -> str:
    """A fixture key's plaintext (kept in two parts so that no key-shaped string is committed)."""
    return MANIFEST[entry]["head"] + MANIFEST[entry]["tail"]


def schema_version(app: Any) -> tuple[int, int]:
    """(the schema version the deployment's store has after opening, the current code's).
    The one place that names the store's Python API: adjust it if the store moves."""
    from utils.store import SCHEMA_VERSION

    return app.extensions["quadra"].store.database.schema_version(), SCHEMA_VERSION


def load_dump(postgres_url: str) -> None:
    """Load the release's PostgreSQL dump into the schema that `postgres_url` searches."""
    options = parse_qs(urlsplit(postgres_url).query)["options"][0]
    schema = options.split("search_path=", 1)[1]
    sql = (FIXTURE / "postgres.sql").read_text().replace(MANIFEST["schema_placeholder"], schema)
    engine = create_engine(postgres_url.split("?", 1)[0])
    try:
        connection = engine.raw_connection()
        try:
            connection.cursor().execute(sql)  # no parameters: the whole script in one go
            connection.commit()
        finally:
            connection.close()
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path):
    """A copy of the release's deployment on `backend` (overrides conftest's settings, so
    conftest's `app` and `anonymous` open it)."""
    if backend == "sqlite":
        state = shutil.copytree(FIXTURE / "state", tmp_path / "state")
        return make_settings(state, **KEEP_AS_WRITTEN)
    postgres_url = request.getfixturevalue("postgres_url")
    load_dump(postgres_url)
    state = shutil.copytree(FIXTURE / "postgres-state", tmp_path / "state")
    return make_settings(state, database_url=postgres_url, **KEEP_AS_WRITTEN)


@pytest.fixture
def expected(backend: str) -> dict[str, Any]:
    return MANIFEST["backends"][backend]


@pytest.fixture
def client(app) -> Iterator:
    """A test client holding the release's admin key."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_X_API_KEY"] = fixture_key("admin_key")
    yield test_client


def get(client, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code, response.get_json())
    return response.get_json()


def test_opens_ready_with_the_schema_upgraded(app, anonymous, expected) -> None:
    stored, current = schema_version(app)
    assert stored == current >= MANIFEST["schema_version"]
    readiness = anonymous.get("/api/health/detailed")
    assert readiness.status_code == 200, readiness.get_json()
    body = readiness.get_json()
    assert body["ready"] is True
    assert body["current_version"] == body["production_version"] == expected["production_version"]


def test_every_version_and_the_history_are_intact(client, expected) -> None:
    listing = get(client, "/api/model/versions")
    assert listing["production_version"] == expected["production_version"]
    assert listing["serving_version"] == expected["serving_version"]
    versions = {v["version"]: v for v in listing["versions"]}
    assert sorted(versions) == sorted(v["version"] for v in expected["versions"])
    for want in expected["versions"]:
        have = versions[want["version"]]
        assert {key: have[key] for key in want} == want
        integrity = get(client, f"/api/model/versions/{want['version']}?verify=true")["integrity"]
        assert integrity["ok"] is True and integrity["actual"] == want["sha256"]

    history = get(client, "/api/model/history?limit=1000")["history"]
    oldest_first = sorted(history, key=lambda entry: epoch(entry["at"]))[:len(expected["history"])]
    assert [{key: h[key] for key in ("action", "actor", "from_version", "to_version")} for h in oldest_first] \
        == expected["history"]


def test_every_key_is_intact_and_the_folder_secret_still_verifies_them(app, anonymous, client, expected) -> None:
    whoami = anonymous.get("/api/auth/whoami", headers={"X-API-Key": fixture_key("admin_key")})
    assert whoami.status_code == 200, whoami.get_json()
    assert whoami.get_json()["id"] == expected["key_ids"]["fixture-admin"]
    assert whoami.get_json()["name"] == "fixture-admin"
    revoked = anonymous.get("/api/auth/whoami", headers={"X-API-Key": fixture_key("revoked_key")})
    assert revoked.status_code == 401

    keys = {k["id"]: k for k in get(client, "/api/auth/keys")["keys"]}
    assert sorted(keys) == sorted(k["id"] for k in expected["keys"])
    for want in expected["keys"]:
        have = keys[want["id"]]
        seen = {key: have[key] for key in ("id", "name", "permissions", "rate_limit", "active", "rotated_to")}
        seen.update(revoked=have["revoked_at"] is not None, expires=have["expires_at"] is not None)
        assert seen == want


def test_every_audit_record_is_intact(client, expected) -> None:
    entries = get(client, "/api/audit?limit=1000")["entries"]  # the first admin request: nothing added yet
    oldest_first = sorted(entries, key=lambda entry: epoch(entry["at"]))[:len(expected["audit"])]
    assert [{key: e[key] for key in ("actor", "action", "outcome", "target", "status", "details")}
            for e in oldest_first] == expected["audit"]


def test_prediction_records_baseline_and_alerts_are_intact(client, expected) -> None:
    stats = get(client, "/api/monitoring/stats")
    want = expected["predictions"]
    assert (stats["total_predictions"], stats["error_count"]) == (want["total_predictions"], want["error_count"])
    assert (stats["window"]["count"], stats["window"]["errors"]) == (want["window_count"], want["window_errors"])
    assert stats["class_distribution"] == want["class_distribution"]
    assert stats["model_versions"] == want["model_versions"]

    drift = get(client, "/api/monitoring/drift")
    assert {key: drift["baseline"][key] for key in expected["baseline"]} == expected["baseline"]
    assert drift["sample_count"] == expected["drift_sample_count"] and drift["evaluated"] is True

    alerts = get(client, "/api/monitoring/alerts?limit=100")["alerts"]
    oldest_first = sorted(alerts, key=lambda alert: epoch(alert["at"]))[:len(expected["alerts"])]
    assert [{"kind": a["kind"], "severity": a["severity"], "message": a["message"],
             "resolved": a["resolved_at"] is not None} for a in oldest_first] == expected["alerts"]


def test_jobs_and_mode_are_intact(anonymous, client, expected) -> None:
    jobs = {job["id"]: job for job in get(client, "/api/train?limit=200")["jobs"]}
    assert sorted(jobs) == [job["id"] for job in expected["jobs"]]
    for want in expected["jobs"]:
        for have in (jobs[want["id"]], get(client, f"/api/train/{want['id']}")):
            seen = {key: have[key] for key in ("id", "status", "result_version", "error", "total_epochs")}
            assert seen | {"epochs_done": len(have["progress"])} == want

    mode = anonymous.get("/api/mode").get_json()
    assert {key: mode[key] for key in expected["mode"]} == expected["mode"]


def test_the_upgraded_deployment_takes_writes(app, client, expected) -> None:
    """New rows after the release's: a version, its promotion, predictions, a key, a mode
    change (an alert), each audited (on PostgreSQL this also needs the dump's sequences)."""
    before = {"audit": get(client, "/api/audit?limit=1000")["count"],
              "versions": get(client, "/api/model/versions")["count"],
              "history": len(get(client, "/api/model/history?limit=1000")["history"]),
              "alerts": len(get(client, "/api/monitoring/alerts?limit=100")["alerts"]),
              "keys": len(get(client, "/api/auth/keys")["keys"]),
              "predictions": get(client, "/api/monitoring/stats")["total_predictions"]}

    saved = client.post("/api/model/save", json={"version": "2.0.0", "description": "after the upgrade"})
    assert saved.status_code == 201, saved.get_json()
    promoted = client.post("/api/model/promote/2.0.0")
    assert promoted.status_code == 200 and promoted.get_json()["changed"] is True, promoted.get_json()
    predicted = client.post("/api/predict", json={"inputs": IRIS_ROWS})
    assert predicted.status_code == 200, predicted.get_json()
    assert predicted.get_json()["model_version"] == "2.0.0"
    created = client.post("/api/auth/keys", json={"name": "after-upgrade", "permissions": ["read"]})
    assert created.status_code == 201, created.get_json()
    whoami = app.test_client().get("/api/auth/whoami", headers={"X-API-Key": created.get_json()["api_key"]})
    assert whoami.status_code == 200 and whoami.get_json()["name"] == "after-upgrade"
    switched = client.post("/api/mode/inference", json={"reason": "after the upgrade"})
    assert switched.status_code == 200, switched.get_json()

    versions = get(client, "/api/model/versions")
    assert versions["production_version"] == "2.0.0" and versions["count"] == before["versions"] + 1
    assert len(get(client, "/api/model/history?limit=1000")["history"]) == before["history"] + 1
    stats = get(client, "/api/monitoring/stats")
    assert stats["total_predictions"] == before["predictions"] + len(IRIS_ROWS)
    assert stats["model_versions"]["2.0.0"] == len(IRIS_ROWS)
    assert len(get(client, "/api/monitoring/alerts?limit=100")["alerts"]) == before["alerts"] + 1
    assert len(get(client, "/api/auth/keys")["keys"]) == before["keys"] + 1
    audit = sorted(get(client, "/api/audit?limit=1000")["entries"], key=lambda entry: epoch(entry["at"]))
    writes = [(e["action"], e["status"]) for e in audit[before["audit"]:] if e["action"] in WRITE_ACTIONS]
    assert writes == [("registry.save_model", 201), ("registry.promote_version", 200), ("auth.create_key", 201),
                      ("modes.set_mode", 200)]
