"""The OpenAPI document, request validation from the same schemas, Swagger UI, and a schemathesis
run against a real server that must find nothing."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import jsonschema_rs
import pytest
import requests
import schemathesis
from pydantic import ValidationError
from schemathesis.engine import Status, events, from_schema

from routes.operations import respond
from tests.conftest import ROOT
from utils.openapi import Operation, operation_of
from utils.schemas import BaselineRemoved, Deleted, ResponseBody

SETOSA = [5.1, 3.5, 1.4, 0.2]
HTTP_METHODS = {"GET", "POST", "DELETE", "PUT", "PATCH"}


def document(client) -> dict:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response.is_json
    return response.get_json()


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {(method.upper(), path): op for path, item in spec["paths"].items() for method, op in item.items()}


# -- the document ---------------------------------------------------------------------------


def test_document_is_valid_openapi_31(anonymous) -> None:
    spec = document(anonymous)
    assert spec["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(spec).validate()
    for name, schema in spec["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_document_covers_every_route(app, anonymous) -> None:
    documented = set(operations(document(anonymous)))
    routed = {
        (method, rule.rule.replace("<path:", "<").replace("<", "{").replace(">", "}"))
        for rule in app.url_map.iter_rules() if rule.endpoint != "static"
        for method in rule.methods & HTTP_METHODS
    }
    assert routed == documented


def test_every_json_operation_answers_with_its_declared_model(app) -> None:
    """The views return pydantic models that `respond` serialises: the document's response
    schemas are the answers' own, so they cannot drift apart."""
    checked = 0
    for rule in app.url_map.iter_rules():
        spec = operation_of(app.view_functions[rule.endpoint])
        if spec is not None and spec.media_type == "application/json":
            assert spec.response is not None and issubclass(spec.response, ResponseBody), rule.endpoint
            assert spec.response.model_config["extra"] == "forbid", rule.endpoint
            checked += 1
    assert checked >= 30


def test_a_view_answering_anything_but_its_declared_model_is_a_bug_never_sent(app) -> None:
    spec = Operation("Delete a version", response=Deleted,
                     errors={404: "No such version", 503: ("Not now", BaselineRemoved)})
    with app.test_request_context():
        answered = respond(spec, Deleted(deleted="1.0.0"))
        assert (answered.status_code, answered.get_json()) == (200, {"deleted": "1.0.0"})
        assert respond(spec, (BaselineRemoved(removed=1), 503, {"X-Why": "test"})).headers["X-Why"] == "test"
        class Wider(Deleted):
            secret: str = "never shown"

        for wrong in ({"deleted": "1.0.0"}, BaselineRemoved(removed=1), (Deleted(deleted="1.0.0"), 418, {}),
                      (Deleted(deleted="1.0.0"), 404, {}), (Deleted(deleted="1.0.0"), 503, {}), Wider(deleted="x")):
            with pytest.raises(TypeError):
                respond(spec, wrong)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Deleted.model_validate({"deleted": "1.0.0", "undeclared": True})


def test_a_prediction_answers_class_by_its_alias(client) -> None:
    body = client.post("/api/predict", json={"inputs": [SETOSA]}).get_json()
    assert set(body["predictions"][0]) == {"id", "class", "class_index", "confidence", "probabilities"}


def test_operations_declare_security_errors_and_schemas(anonymous) -> None:
    ops = operations(document(anonymous))
    for (method, path), op in ops.items():
        statuses = set(op["responses"])
        assert "500" in statuses, (method, path)
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and not path.startswith("/api/health"):
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        if "security" in op:
            assert {"401", "429"} <= statuses, (method, path)
    admin_only = ops[("POST", "/api/model/promote/{version}")]
    assert admin_only["security"] == [{"ApiKey": []}, {"BearerAuth": []}] and "403" in admin_only["responses"]
    assert "admin" in admin_only["description"]
    assert ops[("POST", "/api/auth/token")]["security"] == [{"ApiKey": []}]
    assert "security" not in ops[("GET", "/api/health")] and "429" not in ops[("GET", "/api/health")]["responses"]
    assert "429" in ops[("GET", "/api/mode")]["responses"]
    predict = ops[("POST", "/api/predict")]
    assert {"400", "413", "415", "503"} <= set(predict["responses"])
    assert predict["responses"]["503"]["headers"]["Retry-After"]
    assert predict["requestBody"]["required"] is True
    assert ops[("POST", "/api/model/save")]["requestBody"]["required"] is False
    assert [p["name"] for p in ops[("GET", "/api/audit")]["parameters"]] == ["limit", "action", "actor"]
    readiness = ops[("GET", "/api/health/detailed")]["responses"]["503"]
    assert readiness["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert ops[("GET", "/metrics")]["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}


def test_request_schemas_in_the_document_are_the_validating_ones(anonymous, settings) -> None:
    """The validating models, narrowed by what the server checks at run time: the serving
    model's row width (4 for Iris), the largest batch, a token's longest lifetime, the most rows
    a training job takes."""
    from utils.schemas import PredictRequest, SaveRequest

    schemas = document(anonymous)["components"]["schemas"]
    generated = {model: model.model_json_schema(ref_template="#/components/schemas/{model}") for model in (PredictRequest, SaveRequest)}
    for schema in generated.values():
        schema.pop("$defs", None)
    assert schemas["SaveRequest"] == generated[SaveRequest]
    inputs = generated[PredictRequest]["properties"]["inputs"]
    inputs["maxItems"] = settings.max_batch_size
    inputs["items"].update({"minItems": 4, "maxItems": 4})
    assert schemas["PredictRequest"] == generated[PredictRequest]
    expires_in = schemas["TokenRequest"]["properties"]["expires_in"]["anyOf"][0]
    assert (expires_in["minimum"], expires_in["maximum"]) == (1, settings.jwt_max_ttl_seconds)
    assert schemas["TrainingData"]["properties"]["features"]["maxItems"] == settings.training_max_rows


def test_the_documented_version_and_rate_limit_patterns_are_what_the_server_accepts(client) -> None:
    """The document's patterns, read as JSON Schema reads them, agree with the server both ways."""
    import re

    schemas = document(client)["components"]["schemas"]
    version = re.compile(schemas["SaveRequest"]["properties"]["version"]["anyOf"][0]["pattern"])
    rate_limit = re.compile(schemas["KeyRequest"]["properties"]["rate_limit"]["anyOf"][0]["pattern"])
    for text in ("1.2.0", "2.1.3-beta.1", "20241221-143022", "train-20241221-143022-2", "1.2", "01.2.0", "0" * 63, "v1.2.0"):
        saved = client.post("/api/model/save", json={"version": text}).status_code
        assert (saved == 201) == bool(version.search(text)), text
    for text in ("1000 per minute", "60/minute", "10 per 5 seconds", "1/second;5/minute", "5 PER HOUR", "lots", "0" * 60, "1 per 0 second"):
        created = client.post("/api/auth/keys", json={"name": "k", "permissions": ["read"], "rate_limit": text}).status_code
        assert (created == 201) == bool(rate_limit.search(text)), text


# -- request validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body, code",
    [
        ("post", "/api/predict", {"inputs": [SETOSA], "extra": 1}, "invalid_input"),          # unknown field
        ("post", "/api/predict", {}, "invalid_input"),                                       # missing field
        ("post", "/api/predict", {"inputs": [[1, 2, 3, "4"]]}, "invalid_input"),             # wrong type
        ("post", "/api/predict", {"inputs": [[1.0] * 1001]}, "invalid_input"),               # oversize row
        ("post", "/api/model/save", {"tags": ["t"] * 33}, "invalid_body"),                   # oversize array
        ("post", "/api/model/save", {"metrics": {"accuracy": True}}, "invalid_body"),
        ("post", "/api/model/save", {"version": "a" * 65}, "invalid_version"),
        ("post", "/api/auth/keys", {"permissions": ["read"]}, "invalid_body"),               # missing name
        ("post", "/api/auth/keys", {"name": "x", "permissions": ["read"] * 4}, "invalid_body"),
        ("post", "/api/auth/keys/key_x/rotate", {"grace_seconds": "60"}, "invalid_body"),
        ("post", "/api/auth/token", {"expires_in": 1.5}, "invalid_body"),
        ("post", "/api/mode/training", {"force": "yes"}, "invalid_body"),
        ("post", "/api/mode/turbo", {}, "invalid_mode"),
        ("post", "/api/train", {"hidden_dims": [8] * 9}, "invalid_body"),
        ("post", "/api/train", {"data": {"features": [[1.0]] * 10, "labels": [1] * 9 + [2], "extra": 1}}, "invalid_data"),
        ("post", "/api/monitoring/baseline", {"x": 1}, "invalid_body"),                     # takes no body
        ("post", "/api/model/rollback", {"to": "1.0.0"}, "invalid_body"),
    ],
)
def test_bodies_are_validated_by_their_schemas(client, method: str, path: str, body: dict, code: str) -> None:
    response = getattr(client, method)(path, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(response.get_json()) == {"error"} and error["code"] == code and error["message"]


@pytest.mark.parametrize(
    "path, code",
    [
        ("/api/model/history?limit=0", "invalid_parameter"),
        ("/api/model/history?limit=5&limit=6", "invalid_parameter"),
        ("/api/model/history?debug=1", "invalid_parameter"),
        ("/api/model/versions/1.0.0?verify=perhaps", "invalid_parameter"),
        ("/api/model/compare?a=1.0.0&b=..%2Fx", "invalid_parameter"),
        ("/api/audit?limit=x", "invalid_parameter"),
        ("/api/train?limit=201", "invalid_parameter"),
        ("/api/monitoring/alerts?limit=-1", "invalid_parameter"),
        ("/api/train/" + "j" * 65, "invalid_parameter"),
    ],
)
def test_parameters_are_validated_by_their_schemas(client, path: str, code: str) -> None:
    response = client.get(path)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == code


def test_runtime_limits_are_checked_after_the_schema(state_dir: Path, api_keys: dict[str, str]) -> None:
    from app import create_app, start_serving
    from tests.conftest import make_settings

    app = create_app(make_settings(state_dir, training_max_rows=10))
    start_serving(app)
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = api_keys["admin"]
    client.post("/api/mode/training")
    data = {"features": [[float(i)] for i in range(11)], "labels": ["a", "b"] * 5 + ["a"]}
    response = client.post("/api/train", json={"data": data})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_data"
    app.extensions["quadra"].store.database.dispose()


def test_valid_requests_get_their_parsed_values(client) -> None:
    assert client.get("/api/model/versions?tag=initial&tag=iris").get_json()["count"] == 1
    assert client.get("/api/model/history?limit=1").status_code == 200
    assert client.post("/api/monitoring/baseline").status_code == 409  # not enough predictions, but a valid request
    token = client.post("/api/auth/token", json={"permissions": ["read"], "expires_in": 60}).get_json()
    assert token["permissions"] == ["read"] and token["expires_in"] == 60


# -- Swagger UI -------------------------------------------------------------------------------


def test_swagger_ui_page_uses_packaged_assets_and_no_inline_script(anonymous) -> None:
    page = anonymous.get("/api/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "script-src 'self' 'unsafe-inline'" not in csp
    html = page.get_data(as_text=True)
    assert "<script>" not in html and "//cdn" not in html and "https://" not in html
    for asset in ("node_modules/swagger-ui-dist/swagger-ui-bundle.js", "node_modules/swagger-ui-dist/swagger-ui.css", "docs.js"):
        assert f"/static/{asset}" in html
        assert anonymous.get(f"/static/{asset}").status_code == 200, asset
    assert '"swagger-ui-dist"' in (ROOT / "static" / "package.json").read_text()


@pytest.mark.e2e
def test_swagger_ui_shows_every_operation_in_a_browser(browser, start_server, state_dir: Path) -> None:
    server = start_server(state_dir)
    expected = len(operations(requests.get(f"{server.url}/api/openapi.json", timeout=10).json()))
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"{server.url}/api/docs")
    page.locator(".opblock").nth(expected - 1).wait_for(timeout=30_000)
    assert page.locator(".opblock").count() == expected
    assert page.locator(".opblock-summary-path", has_text="/api/predict").count() == 1
    page.close()
    assert problems == []


# -- schemathesis -----------------------------------------------------------------------------

# Every check runs on every operation. positive_data_acceptance (a request the document accepts
# is accepted) skips POST /api/train alone: its posted data has rules across fields that JSON
# Schema cannot state (one label per row, 2 to 100 classes, a name per column), refused with
# 400 invalid_data and documented in the field descriptions; and POST /api/model/versions, whose
# artifact must be a safetensors file holding weights that fit the config (422 invalid_artifact),
# which no schema of bytes can state; and POST /api/model/canary/{version}, whose percent may
# reach 100 for a shadow but only 50 for a canary (and max_disagreement_rate needs a shadow).
CROSS_FIELD_RULES = ["POST /api/train", "POST /api/model/versions", "POST /api/model/canary/{version}"]
STATEFUL = "Stateful tests"  # the label of the stateful phase's scenarios


@pytest.mark.e2e
def test_schemathesis_finds_no_failure(start_server, state_dir: Path) -> None:
    """Every operation, with the admin key, through schemathesis' examples, coverage, fuzzing and
    stateful phases (deterministic), against a real server; the stateful phase follows the
    document's links from what POST creates to the operations that use its id. 503 is the documented answer of predict in
    maintenance mode, which the run itself switches to, so it does not count as a server error."""
    server = start_server(state_dir, {"QUADRA_AUTH_FAILURE_LIMIT": "1000000 per minute", "QUADRA_MAX_TRAINING_JOBS": "1"})
    config = schemathesis.Config.from_dict({
        "seed": 20261126,
        "base-url": server.url,
        "cache": {"enabled": False},
        "headers": {"X-API-Key": server.admin_key},
        "generation": {"max-examples": 50, "deterministic": True, "database": "none", "mode": "all"},
        "phases": {"stateful": {"max-steps": 12}},
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
        "operations": [{"include-name": CROSS_FIELD_RULES, "checks": {"positive_data_acceptance": {"enabled": False}}}],
    })
    # Loaded from a dict: loaded from its URL, schemathesis would leave out the operation serving it.
    schema = schemathesis.openapi.from_dict(server.get("/api/openapi.json").json(), config=config)
    cases: Counter[str] = Counter()
    reached: set[str] = set()  # operations the stateful phase called, following the document's links
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases[event.recorder.label] += len(event.recorder.cases)
            if event.recorder.label == STATEFUL:
                reached |= {node.value.operation.label for node in event.recorder.cases.values()}
            failures += [f"{event.recorder.label}: {check.name}: {check.failure_info.failure} {check.failure_info.code_sample}"
                         for checks in event.recorder.checks.values() for check in checks
                         if check.status == Status.FAILURE and check.failure_info]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"error: {getattr(event, 'value', None) or getattr(event, 'exception', None)}")
    _stop_training(server)
    assert failures == [], "\n".join(failures)
    labels = {f"{method} {path}" for method, path in operations(schema.raw_schema)}
    assert set(cases) == labels | {STATEFUL} and all(cases[label] > 0 for label in labels)
    assert {"GET /api/train/{job_id}", "POST /api/train/{job_id}/cancel", "DELETE /api/auth/keys/{key_id}",
            "GET /api/model/versions/{version}"} <= reached
    print(f"schemathesis: {len(labels)} operations, {sum(cases.values())} cases, no failure")


def _stop_training(server) -> None:
    """Cancel what the run started, so no training process outlives the test."""
    server.post("/api/mode/inference", json={"force": True})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = server.get("/api/train?limit=200").json()["jobs"]
        if not any(job["status"] in ("queued", "running") for job in jobs):
            return
        time.sleep(0.5)
