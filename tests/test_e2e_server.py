"""End-to-end tests: the real server (`python app.py`, or gunicorn with eventlet workers) runs
as a separate process on a private copy of a state folder holding production version 1.0.0
(Iris, 4 features, 3 classes), and is driven over HTTP only.

What the files on disk look like is checked directly (artifacts, stray folders); everything
else goes through the API.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
GUNICORN_WORKERS = 4
GUNICORN_COMMAND = [
    str(GUNICORN), "-w", str(GUNICORN_WORKERS), "-b", "127.0.0.1:{port}", "--worker-class", "eventlet", "app:app",
]

INITIAL = "1.0.0"
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]  # a setosa
CLASS_NAMES = {"setosa", "versicolor", "virginica"}
HTTP_TIMEOUT = 30


# -- helpers ------------------------------------------------------------------------------


def auth_headers(server) -> dict[str, str]:
    """The admin key of the server's state folder, when the fixture seeded one."""
    key = getattr(server, "admin_key", None)
    return {"X-API-Key": key} if key else {}


def call(server, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
    """One HTTP request to `server` as admin, on a fresh connection each time (so that under
    gunicorn consecutive requests are spread over the workers instead of pinned to one)."""
    headers = {**auth_headers(server), **(headers or {})}
    return requests.request(method, server.url + path, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)


def assert_error(response: requests.Response, status: int, code: str, what: str = "") -> None:
    """`response` is `status` with the API's one error shape carrying `code`."""
    assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
    error = response.json()["error"]
    assert (error["code"], bool(error["message"])) == (code, True), f"{what}: {response.text}"


def strict_json(text: str) -> Any:
    """Parse JSON as a strict client would: NaN / Infinity are not JSON."""

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def save(server, version: str | None = None, **fields: Any) -> requests.Response:
    body = dict(fields, **({"version": version} if version is not None else {}))
    return call(server, "POST", "/api/model/save", json=body)


def save_ok(server, version: str, **fields: Any) -> dict[str, Any]:
    response = save(server, version, **fields)
    assert response.status_code == 201, response.text
    return response.json()


def post_ok(server, path: str) -> dict[str, Any]:
    response = call(server, "POST", path)
    assert response.status_code == 200, response.text
    return response.json()


def predict(server, rows: list[list[float]] | None = None) -> requests.Response:
    return call(server, "POST", "/api/predict", json={"inputs": rows or [IRIS_ROW]})


def post_raw(server, path: str, body: bytes | str, content_type: str = "application/json") -> requests.Response:
    return call(server, "POST", path, data=body, headers={"Content-Type": content_type})


def assert_valid_prediction(response: requests.Response, rows: int = 1) -> dict[str, Any]:
    """A 200 whose body is strict JSON holding `rows` well-formed predictions."""
    assert response.status_code == 200, response.text
    body = strict_json(response.text)
    assert len(body["predictions"]) == rows and body["request_id"]
    for prediction in body["predictions"]:
        probabilities = prediction["probabilities"]
        assert set(probabilities) == CLASS_NAMES
        assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-4)
        assert prediction["class"] == max(probabilities, key=probabilities.get)
        assert prediction["confidence"] == probabilities[prediction["class"]]
    return body


def served_version(server) -> str:
    """The version that answered a valid prediction."""
    return assert_valid_prediction(predict(server))["model_version"]


def versions(server) -> dict[str, Any]:
    response = call(server, "GET", "/api/model/versions")
    assert response.status_code == 200, response.text
    return response.json()


def integrity(server, version: str) -> dict[str, Any]:
    response = call(server, "GET", f"/api/model/versions/{version}", params={"verify": "true"})
    assert response.status_code == 200, response.text
    return response.json()["integrity"]


def assert_healthy(server, version: str | None = None) -> None:
    response = call(server, "GET", "/api/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    if version is not None:
        assert body["model_version"] == version


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def serves_consistently(server, version: str, times: int) -> bool:
    """True when `times` consecutive predictions (fresh connections) all report `version`."""
    return all(served_version(server) == version for _ in range(times))


def in_parallel(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run `tasks` on threads released together by a barrier; their results, in order."""
    barrier = threading.Barrier(len(tasks))

    def run(task: Callable[[], Any]) -> Any:
        barrier.wait()
        return task()

    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        return list(pool.map(run, tasks))


def artifact(state_dir: Path, version: str) -> Path:
    return state_dir / "models" / version / "model.safetensors"


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def file_tree(root: Path) -> set[str]:
    """Every path under `root`, except the SQLite database and its WAL/SHM companions."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("quadra.db")}


def raw_request(server, method: str, target: str) -> tuple[int, str | None]:
    """Send `target` byte for byte (no client-side normalisation of `..` or `%2F`); the status
    and error code of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, target, headers=auth_headers(server))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return response.status, None


def worker_pids(process: subprocess.Popen) -> set[int]:
    """The direct children of `process` (gunicorn's workers), from /proc."""
    children: set[int] = set()
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        children |= {int(pid) for pid in (task / "children").read_text().split()}
    return children


def logged_swaps(server, version: str) -> set[int]:
    """Pids whose log says they now serve `version` (the log format carries the pid)."""
    marker = f"now serving version {version}"
    return {
        int(line.split("[", 1)[1].split("]", 1)[0])
        for line in server.log().splitlines()
        if marker in line and " quadra.serving [" in line
    }


# -- 1. round trip ------------------------------------------------------------------------


@pytest.mark.e2e
def test_save_promote_rollback_load_round_trip_over_http(state_dir: Path, start_server) -> None:
    """Save, promote, rollback and load change what the live process serves, production and
    serving are reported separately, and the history records every action in order."""
    server = start_server(state_dir)
    assert served_version(server) == INITIAL

    saved = save_ok(server, "1.1.0", description="round trip", tags=["e2e"], metrics={"accuracy": 0.99})
    assert (saved["version"], saved["is_production"], saved["tags"]) == ("1.1.0", False, ["e2e"])
    assert artifact(state_dir, "1.1.0").is_file() and integrity(server, "1.1.0")["ok"] is True
    assert served_version(server) == INITIAL  # saving does not deploy

    assert post_ok(server, "/api/model/promote/1.1.0") == {"production_version": "1.1.0", "previous_version": INITIAL,
                                                           "changed": True, "message": "1.1.0 is now production"}
    assert served_version(server) == "1.1.0"
    assert_healthy(server, "1.1.0")

    assert post_ok(server, "/api/model/rollback") == {"production_version": INITIAL, "previous_version": "1.1.0",
                                                      "changed": True, "message": f"{INITIAL} is now production"}
    assert served_version(server) == INITIAL

    assert post_ok(server, "/api/model/load/1.1.0") == {"serving_version": "1.1.0", "previous_version": INITIAL,
                                                        "changed": True}
    assert served_version(server) == "1.1.0"
    listing = versions(server)
    assert (listing["production_version"], listing["serving_version"], listing["count"]) == (INITIAL, "1.1.0", 2)
    flags = {v["version"]: (v["is_production"], v["is_serving"]) for v in listing["versions"]}
    assert flags == {INITIAL: (True, False), "1.1.0": (False, True)}

    comparison = call(server, "GET", "/api/model/compare", params={"a": INITIAL, "b": "1.1.0"}).json()
    assert comparison["metrics_comparison"]["accuracy"]["version2"] == 0.99

    history = call(server, "GET", "/api/model/history").json()["history"]  # newest first
    assert [(h["action"], h["from_version"], h["to_version"]) for h in history] == [
        ("load", INITIAL, "1.1.0"),
        ("rollback", "1.1.0", INITIAL),
        ("promote", INITIAL, "1.1.0"),
        ("promote", None, INITIAL),  # the bootstrap
    ]

    assert_error(call(server, "POST", "/api/model/rollback"), 409, "conflict")


# -- 2. integrity -------------------------------------------------------------------------


@pytest.mark.e2e
def test_tampered_artifact_is_never_promoted_or_served(state_dir: Path, start_server) -> None:
    """One flipped byte in a saved artifact: promote and load answer 422, the old version keeps
    serving, verify reports the mismatch, and the process stays healthy."""
    server = start_server(state_dir)
    save_ok(server, "1.1.0")
    flip_middle_byte(artifact(state_dir, "1.1.0"))

    for action in ("promote", "load"):
        assert_error(call(server, "POST", f"/api/model/{action}/1.1.0"), 422, "integrity_check_failed", action)

    assert served_version(server) == INITIAL
    listing = versions(server)
    assert (listing["production_version"], listing["serving_version"]) == (INITIAL, INITIAL)
    tampered = integrity(server, "1.1.0")
    assert tampered["ok"] is False and tampered["actual"] != tampered["expected"]
    assert integrity(server, INITIAL)["ok"] is True
    assert all(h["to_version"] != "1.1.0" for h in call(server, "GET", "/api/model/history").json()["history"])
    assert_healthy(server, INITIAL)


# -- 3. traversal -------------------------------------------------------------------------

BAD_VERSION_SEGMENTS = [
    "..%2F..%2Fetc",
    "%2e%2e",
    "%2e%2e%2F%2e%2e%2Fevil",
    "../x",
    "..",
    "1.0.0/..",
    "..%5C..%5Cevil",
    "a" * 200,
    "%00",
    "1.0.0%00",
    "%2Fetc%2Fpasswd",
    "1.0.0%0A",
]
# Refused by validation, or by the URL router before any handler runs; a "version_not_found"
# 404 would mean the string reached the store unvalidated.
REFUSALS = {(400, "invalid_version"), (404, "not_found")}
VERSION_ENDPOINTS = [
    ("POST", "/api/model/load/"),
    ("POST", "/api/model/promote/"),
    ("GET", "/api/model/versions/"),
    ("DELETE", "/api/model/versions/"),
]
BAD_SAVE_VERSIONS = ["../evil", "../../evil", "/tmp/evil", "1.0.0/../../evil", "..", "1.2.0\x00", "a" * 200, ""]


@pytest.mark.e2e
def test_path_traversal_and_malformed_versions_are_refused_before_any_file_is_touched(
    state_dir: Path, start_server
) -> None:
    """Hostile version strings in URLs (sent raw, not normalised by the client) and in the save
    body are refused with 400 invalid_version (or the router's 404), and nothing appears on disk."""
    server = start_server(state_dir)
    workspace = state_dir.parent  # the test's private tmp folder: catches escapes one level up
    before = file_tree(workspace)

    for method, prefix in VERSION_ENDPOINTS:
        for segment in BAD_VERSION_SEGMENTS:
            outcome = raw_request(server, method, prefix + segment)
            assert outcome in REFUSALS, f"{method} {prefix}{segment[:40]} -> {outcome}"
    for version in BAD_SAVE_VERSIONS:
        assert_error(save(server, version), 400, "invalid_version", repr(version))

    assert file_tree(workspace) == before
    assert list((state_dir / "models" / ".staging").iterdir()) == []
    listing = versions(server)
    assert [v["version"] for v in listing["versions"]] == [INITIAL]
    assert (listing["production_version"], listing["serving_version"]) == (INITIAL, INITIAL)
    assert integrity(server, INITIAL)["ok"] is True
    assert served_version(server) == INITIAL


# -- 4. two processes, one store ----------------------------------------------------------


@pytest.mark.e2e
def test_concurrent_saves_from_two_processes_on_one_state_folder(state_dir: Path, start_server) -> None:
    """Two servers on one state folder: distinct concurrent saves all succeed and are listed
    once by both; racing saves of one version give exactly one 201, the rest 409, and an
    artifact that verifies."""
    servers = [start_server(state_dir), start_server(state_dir)]
    new_versions = [f"1.{minor}.0" for minor in range(1, 11)]

    responses = in_parallel(
        [lambda v=v, s=servers[i % 2]: save(s, v) for i, v in enumerate(new_versions)]
    )
    assert [r.status_code for r in responses] == [201] * len(new_versions), [r.text for r in responses]
    for server in servers:
        listed = [v["version"] for v in versions(server)["versions"]]
        assert sorted(listed) == sorted([INITIAL, *new_versions])  # each exactly once
    assert all(integrity(servers[0], v)["ok"] for v in new_versions)

    racing = in_parallel([lambda s=servers[i % 2]: save(s, "2.0.0") for i in range(6)])
    statuses = sorted(r.status_code for r in racing)
    assert statuses == [201] + [409] * 5, [r.text for r in racing]
    for response in racing:
        if response.status_code != 201:
            assert_error(response, 409, "conflict")
    for server in servers:
        assert [v["version"] for v in versions(server)["versions"]].count("2.0.0") == 1
        assert integrity(server, "2.0.0")["ok"] is True
    assert list((state_dir / "models" / ".staging").iterdir()) == []


KILLED_SAVER = """
import sys
from pathlib import Path
from utils.model_versioning import ModelVersionManager
from utils.serving import build_model
from utils.store import Store
state = Path(sys.argv[1])
registry = ModelVersionManager(state / "models", Store(f"sqlite:///{state / 'quadra.db'}"), True)
big = build_model({"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8192, 8192]})
registry.save_model(big, "9.9.9")
"""


@pytest.mark.e2e
def test_a_save_killed_midway_leaves_nothing_after_the_next_start(state_dir: Path, start_server) -> None:
    """SIGKILL a process while it saves a large version; the next server start removes its
    staging folder (and says so), keeps a live process's, and the version never appears."""
    from utils.artifact_files import new_staging_dir

    staging = state_dir / "models" / ".staging"
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(state_dir)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (staging.is_dir() and any(staging.iterdir())):
        assert saver.poll() is None and time.monotonic() < deadline, "the save never started"
        time.sleep(0.001)
    saver.kill()
    saver.wait(timeout=30)
    left = list(staging.iterdir())
    assert left, "the killed save left nothing to clean up"
    live = new_staging_dir(state_dir / "models")  # this test process is alive: its folder stays

    server = start_server(state_dir)
    assert list(staging.iterdir()) == [live]
    assert all(str(path) in server.log() for path in left)
    assert "9.9.9" not in [v["version"] for v in versions(server)["versions"]]
    assert save(server, "9.9.9").status_code == 201 and integrity(server, "9.9.9")["ok"] is True


# -- 5. hostile predict input -------------------------------------------------------------

MAX_BATCH = 8
MAX_BODY = 4096
OVERSIZED_BODY = json.dumps({"inputs": [IRIS_ROW] * 400})  # about 9 KB
BAD_PREDICT_BODIES = [  # (what, raw body, content type, status, code)
    ("truncated JSON", '{"inputs": [[5.1, 3.5, 1.4, 0.2]]', "application/json", 400, "invalid_json"),
    ("not JSON at all", "inputs=5.1,3.5", "application/json", 400, "invalid_json"),
    ("empty body", "", "application/json", 400, "invalid_json"),
    ("top-level array", "[[5.1, 3.5, 1.4, 0.2]]", "application/json", 400, "invalid_body"),
    ("inputs missing", "{}", "application/json", 400, "invalid_input"),
    ("inputs not a list", '{"inputs": "5.1,3.5,1.4,0.2"}', "application/json", 400, "invalid_input"),
    ("inputs empty", '{"inputs": []}', "application/json", 400, "invalid_input"),
    ("row not a list", '{"inputs": [5.1, 3.5, 1.4, 0.2]}', "application/json", 400, "invalid_input"),
    ("empty row", '{"inputs": [[]]}', "application/json", 400, "invalid_input"),
    ("too narrow", '{"inputs": [[5.1, 3.5, 1.4]]}', "application/json", 400, "invalid_input"),
    ("too wide", '{"inputs": [[5.1, 3.5, 1.4, 0.2, 9]]}', "application/json", 400, "invalid_input"),
    ("ragged", '{"inputs": [[5.1, 3.5, 1.4, 0.2], [1, 2]]}', "application/json", 400, "invalid_input"),
    ("NaN", '{"inputs": [[NaN, 3.5, 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("Infinity", '{"inputs": [[5.1, Infinity, 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("-Infinity", '{"inputs": [[5.1, 3.5, -Infinity, 0.2]]}', "application/json", 400, "invalid_input"),
    ("1e400 overflows", '{"inputs": [[5.1, 3.5, 1.4, 1e400]]}', "application/json", 400, "invalid_input"),
    ("string number", '{"inputs": [[5.1, "3.5", 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("boolean", '{"inputs": [[5.1, true, 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("null", '{"inputs": [[5.1, null, 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("nested list", '{"inputs": [[5.1, [3.5], 1.4, 0.2]]}', "application/json", 400, "invalid_input"),
    ("unknown field", '{"inputs": [[5.1, 3.5, 1.4, 0.2]], "debug": true}', "application/json", 400, "invalid_input"),
    ("batch over limit", json.dumps({"inputs": [IRIS_ROW] * (MAX_BATCH + 1)}), "application/json", 400, "invalid_input"),
    ("body over limit", OVERSIZED_BODY, "application/json", 413, "request_entity_too_large"),
    ("text/plain", '{"inputs": [[5.1, 3.5, 1.4, 0.2]]}', "text/plain", 415, "unsupported_media_type"),
    ("form", "inputs=5.1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
]


@pytest.mark.e2e
def test_malformed_predict_input_gets_the_right_error_and_the_server_keeps_serving(
    state_dir: Path, start_server
) -> None:
    """Every kind of bad predict body gets its own status and error code (never a 5xx), the
    batch and body limits are enforced at their configured values, and afterwards the
    server is healthy and predicts normally."""
    server = start_server(
        state_dir, extra_env={"QUADRA_MAX_BATCH_SIZE": str(MAX_BATCH), "QUADRA_MAX_BODY_BYTES": str(MAX_BODY)}
    )
    assert len(OVERSIZED_BODY) > MAX_BODY

    for what, body, content_type, status, code in BAD_PREDICT_BODIES:
        assert_error(post_raw(server, "/api/predict", body, content_type), status, code, what)

    assert_valid_prediction(predict(server, [IRIS_ROW] * MAX_BATCH), rows=MAX_BATCH)  # the limit itself is fine
    assert_healthy(server, INITIAL)
    assert assert_valid_prediction(predict(server))["predictions"][0]["class"] == "setosa"


def post_chunked(server, path: str, chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """POST `chunks` with Transfer-Encoding: chunked (no Content-Length) over a raw socket;
    the answer's status and JSON body. The server may answer before the body is all sent."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
    try:
        conn.putrequest("POST", path)
        for name, value in {**auth_headers(server), "Content-Type": "application/json",
                            "Transfer-Encoding": "chunked"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            for chunk in [*chunks, b""]:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: the answer is already there
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["app.py", "gunicorn"])
def test_a_chunked_body_over_the_limit_is_413_not_read_whole(state_dir: Path, start_server, command: str) -> None:
    """Without Content-Length the limit still holds: 413 once QUADRA_MAX_BODY_BYTES is passed
    (werkzeug stops reading there), a chunked body within the limit is served."""
    server = start_server(state_dir, {"QUADRA_MAX_BODY_BYTES": str(MAX_BODY)},
                          GUNICORN_COMMAND if command == "gunicorn" else None)
    oversized = [OVERSIZED_BODY.encode()[i:i + 1000] for i in range(0, len(OVERSIZED_BODY), 1000)] + [b" " * 1000] * 50
    status, body = post_chunked(server, "/api/predict", oversized)
    assert (status, body["error"]["code"]) == (413, "request_entity_too_large")
    assert "QUADRA_MAX_BODY_BYTES" in body["error"]["message"]
    exactly = json.dumps({"inputs": [IRIS_ROW]}).encode().ljust(MAX_BODY)
    status, body = post_chunked(server, "/api/predict", [exactly[:2000], exactly[2000:]])
    assert status == 200 and body["predictions"][0]["class"] == "setosa"
    assert_healthy(server, INITIAL)


# -- 6. gunicorn hot swap -----------------------------------------------------------------

CONSECUTIVE_PREDICTS = 40
SWAP_TIMEOUT = 10.0
PREDICT_THREADS = 3
PROMOTES = 6


def promote_and_wait_everywhere(server, version: str) -> None:
    """Promote on one request, then wait until every worker logged the swap and 40
    consecutive predictions report `version`."""
    post_ok(server, f"/api/model/promote/{version}")
    workers = worker_pids(server.process)
    wait_until(lambda: workers <= logged_swaps(server, version), SWAP_TIMEOUT, f"every worker to load {version}")
    wait_until(
        lambda: serves_consistently(server, version, CONSECUTIVE_PREDICTS),
        SWAP_TIMEOUT,
        f"{CONSECUTIVE_PREDICTS} consecutive predictions from {version}",
    )


def predict_until(server, stop: threading.Event, outcomes: list[tuple[int | str, str]]) -> None:
    """Predict in a loop until `stop`; record (status or exception name, version or error)."""
    while not stop.is_set():
        try:
            response = predict(server)
            ok = response.status_code == 200
            outcome = (response.status_code, response.json()["model_version"] if ok else response.text)
        except (requests.RequestException, ValueError, KeyError) as exc:
            outcome = (type(exc).__name__, str(exc))
        outcomes.append(outcome)


@pytest.mark.e2e
@pytest.mark.skipif(not GUNICORN.exists(), reason=f"gunicorn not installed at {GUNICORN}")
def test_gunicorn_workers_all_hot_swap_and_no_request_fails_during_promotions(state_dir: Path, start_server) -> None:
    """Under gunicorn with 4 eventlet workers, a promote on one worker reaches every worker,
    and predictions sent continuously while versions are promoted back and forth never fail."""
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    wait_until(lambda: len(worker_pids(server.process)) == GUNICORN_WORKERS, SWAP_TIMEOUT, "4 gunicorn workers")
    save_ok(server, "1.1.0")

    promote_and_wait_everywhere(server, "1.1.0")

    stop = threading.Event()
    outcomes: list[tuple[int | str, str]] = []
    promotions: list[int] = []
    threads = [threading.Thread(target=predict_until, args=(server, stop, outcomes)) for _ in range(PREDICT_THREADS)]
    for thread in threads:
        thread.start()
    try:
        for i in range(PROMOTES):
            target = INITIAL if i % 2 == 0 else "1.1.0"
            promotions.append(call(server, "POST", f"/api/model/promote/{target}").status_code)
            time.sleep(0.3)  # pacing only: lets predictions interleave with the swaps
        promote_and_wait_everywhere(server, INITIAL)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=HTTP_TIMEOUT + 5)

    assert promotions == [200] * PROMOTES
    assert outcomes, "no prediction was sent"
    failures = [o for o in outcomes if o[0] != 200]
    assert failures == [], f"{len(failures)} of {len(outcomes)} predictions failed: {failures[:5]}"
    assert {version for _, version in outcomes} <= {INITIAL, "1.1.0"}


# -- 7. configuration ---------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"QUADRA_PORT": "abc"}, "QUADRA_PORT"),
        ({"QUADRA_ENV": "production", "QUADRA_SECRET_KEY": ""}, "QUADRA_SECRET_KEY"),
    ],
    ids=["bad-port", "production-without-secret"],
)
def test_bad_configuration_stops_start_up_with_one_line_naming_the_variable(
    tmp_path: Path, overrides: dict[str, str], variable: str
) -> None:
    """`python app.py` with a bad setting exits non-zero with a single stderr line naming the
    variable, before it creates its state folder."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
    env.update({"QUADRA_STATE_DIR": str(state), "PYTHONUNBUFFERED": "1", **overrides})

    result = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not state.exists()


# -- edge cases found by review --


@pytest.mark.e2e
def test_version_with_trailing_newline_is_refused(state_dir: Path, start_server) -> None:
    """A version string ending in a newline is refused and creates no folder."""
    server = start_server(state_dir)
    response = save(server, "1.2.0\n")
    assert not (state_dir / "models" / "1.2.0\n").exists()
    assert_error(response, 400, "invalid_version")


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["1e39", "1" + "0" * 400], ids=["beyond-float32", "huge-integer"])
def test_predict_values_beyond_float32_are_invalid_input(state_dir: Path, start_server, value: str) -> None:
    """A finite JSON number that the float32 model cannot represent is a 400, not NaN or a 500."""
    server = start_server(state_dir)
    response = post_raw(server, "/api/predict", f'{{"inputs": [[5.1, 3.5, 1.4, {value}]]}}')
    assert_error(response, 400, "invalid_input", value[:10])


@pytest.mark.e2e
def test_non_finite_metrics_are_refused(state_dir: Path, start_server) -> None:
    """Saving with a NaN metric is a 400, so the registry's responses stay valid JSON."""
    server = start_server(state_dir)
    response = post_raw(server, "/api/model/save", '{"version": "1.2.0", "metrics": {"accuracy": NaN}}')
    strict_json(call(server, "GET", "/api/model/versions").text)
    assert_error(response, 400, "invalid_body")
