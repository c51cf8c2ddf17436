"""Canary rollouts: routing by request id, both arms compared from the monitoring records, the
automatic promote and abort, decisions by hand, and every way a request can be refused."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tests.conftest import make_settings
from utils.serving import build_model, takes_candidate

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8],
          "class_names": ["setosa", "versicolor", "virginica"]}
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [4.9, 3.1, 1.5, 0.1]]
NO_CRITERIA = {"max_error_rate_increase": None, "max_latency_p95_ratio": None, "max_confidence_drop": None,
               "max_prediction_distance": None}


@pytest.fixture
def app(state_dir: Path):
    """The service with the background decider slowed down: the tests decide when it looks."""
    from app import create_app, start_serving, stop_serving

    application = create_app(make_settings(state_dir, rollout_check_seconds=3600.0, rate_limit_enabled=False))
    application.config["TESTING"] = True
    start_serving(application)
    yield application
    stop_serving(application)
    application.extensions["quadra"].store.database.dispose()


def import_random_model(client, version: str, seed: int = 3) -> None:
    """A version whose weights were drawn at random elsewhere: it predicts differently."""
    torch.manual_seed(seed)
    tensors = {name: tensor.contiguous() for name, tensor in build_model(CONFIG).state_dict().items()}
    fields = {"artifact": (io.BytesIO(save(tensors)), "model.safetensors"),
              "metadata": json.dumps({"config": CONFIG, "version": version})}
    response = client.post("/api/model/versions", data=fields, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_json()


def copy_of_production(client, version: str) -> None:
    assert client.post("/api/model/save", json={"version": version}).status_code == 201


def predict_many(client, count: int, prefix: str = "r") -> dict[str, int]:
    """Send `count` single-row predictions with ids; returns how many each version served."""
    served: dict[str, int] = {}
    for i in range(count):
        response = client.post("/api/predict", json={"inputs": [ROWS[i % len(ROWS)]]},
                               headers={"X-Request-ID": f"{prefix}-{i}"})
        assert response.status_code == 200, response.get_json()
        version = response.get_json()["model_version"]
        served[version] = served.get(version, 0) + 1
    return served


def decide(app):
    services = app.extensions["quadra"]
    services.shadows.drain()
    return services.rollouts.decide()


def test_the_share_is_deterministic_by_request_id_and_close_to_the_percent() -> None:
    ids = [f"request-{i}" for i in range(20_000)]
    share = sum(takes_candidate(7, request_id, 10.0) for request_id in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [takes_candidate(7, i, 10.0) for i in ids[:100]] == [takes_candidate(7, i, 10.0) for i in ids[:100]]
    assert not any(takes_candidate(7, i, 0.0) for i in ids[:1000])


def test_a_good_candidate_is_promoted_by_itself(app, client) -> None:
    copy_of_production(client, "1.1.0")
    # A same-weights candidate: only sampling noise tells the arms apart, which the limits allow for (the p95
    # of sub-millisecond in-process requests moves with every garbage collection of a long test run).
    started = client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 150,
                                                           "criteria": {"max_prediction_distance": 0.2,
                                                                        "max_latency_p95_ratio": 5.0}})
    assert started.status_code == 201, started.get_json()
    assert started.get_json()["status"] == "running" and started.get_json()["production_version"] == "1.0.0"
    served = predict_many(client, 400)
    assert set(served) == {"1.0.0", "1.1.0"} and 150 < served["1.1.0"] < 250
    assert decide(app) is not None
    status = client.get("/api/model/canary").get_json()["rollout"]
    assert status["status"] == "promoted" and status["verdict"] == "passed" and status["decided_by"] == "rollout"
    assert status["arms"]["candidate"]["predictions"] == served["1.1.0"]
    assert all(check["passed"] for check in status["checks"]) and len(status["checks"]) == 4
    versions = client.get("/api/model/versions").get_json()
    assert versions["production_version"] == "1.1.0"
    assert predict_many(client, 20, "after") == {"1.1.0": 20}
    history = client.get("/api/model/history").get_json()["history"]
    assert history[0]["action"] == "promote" and history[0]["actor"] == "rollout"


def test_a_worse_candidate_is_aborted_by_itself(app, client) -> None:
    import_random_model(client, "2.0.0")
    assert client.post("/api/model/canary/2.0.0", json={"percent": 50, "min_predictions": 100}).status_code == 201
    served = predict_many(client, 300)
    assert served["2.0.0"] > 100
    decided = decide(app)
    assert decided is not None and decided.status == "aborted" and decided.verdict == "failed"
    status = client.get("/api/model/canary").get_json()["rollout"]
    assert status["status"] == "aborted" and "max_prediction_distance" in status["reason"]
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"
    assert predict_many(client, 20, "after") == {"1.0.0": 20}


def test_labels_decide_a_canary_with_max_accuracy_drop(app, client) -> None:
    """A candidate that predicts like production but is wrong where labels say so: the decision
    waits for labels on both arms, then the accuracy drop aborts it."""
    copy_of_production(client, "1.1.0")
    only_labels = {**NO_CRITERIA, "max_accuracy_drop": 0.1}
    started = client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 100,
                                                           "criteria": only_labels})
    assert started.status_code == 201, started.get_json()
    answers = []
    for i in range(300):
        answer = client.post("/api/predict", json={"inputs": [ROWS[i % len(ROWS)]]},
                             headers={"X-Request-ID": f"labelled-{i}"}).get_json()
        answers.append((answer["model_version"], answer["predictions"][0]))
    assert decide(app) is None  # enough predictions, no labels yet: the accuracy check cannot decide
    waiting = client.get("/api/model/canary").get_json()["rollout"]
    assert waiting["status"] == "running" and waiting["checks"][0]["observed"] is None
    labels = [{"id": p["id"], "label": p["class"] if version == "1.0.0" else (p["class_index"] + 1) % 3}
              for version, p in answers]  # the reviewers agree with production and not with the candidate
    assert client.post("/api/feedback", json={"labels": labels}).get_json()["recorded"] == 300
    decided = decide(app)
    assert decided is not None and decided.status == "aborted" and "max_accuracy_drop 1 > 0.1" in decided.reason
    arms = client.get("/api/model/canary").get_json()["rollout"]["arms"]
    assert arms["production"]["accuracy"] == 1.0 and arms["candidate"]["accuracy"] == 0.0
    assert arms["candidate"]["labelled"] == sum(1 for version, _ in answers if version == "1.1.0")


@pytest.mark.parametrize(("body", "message"), [
    ({"percent": 0}, "percent"),
    ({"percent": 51}, "percent"),
    ({"percent": "10"}, "percent"),
    ({"min_predictions": 5}, "min_predictions"),
    ({"min_predictions": 2.5}, "min_predictions"),
    ({"criteria": {"max_f1_drop": 0.1}}, "max_f1_drop"),
    ({"mode": "shadow", "criteria": {"max_accuracy_drop": 0.1}}, "needs canary mode"),
    ({"criteria": {"max_accuracy_drop": 1.5}}, "max_accuracy_drop"),
    ({"criteria": {"max_error_rate_increase": -0.1}}, "max_error_rate_increase"),
    ({"criteria": {"max_latency_p95_ratio": 0}}, "max_latency_p95_ratio"),
    ({"on_success": "ship"}, "on_success"),
    ({"on_failure": "promote"}, "on_failure"),
    ({"mode": "mirror"}, "mode"),
    ({"percent": 60}, "at most 50%"),
    ({"mode": "shadow", "percent": 101}, "percent"),
    ({"criteria": {"max_disagreement_rate": 0.1}}, "needs shadow mode"),
])
def test_a_bad_canary_request_is_400_and_starts_nothing(app, client, body: dict, message: str) -> None:
    copy_of_production(client, "1.1.0")
    response = client.post("/api/model/canary/1.1.0", json=body)
    assert response.status_code == 400 and message in response.get_json()["error"]["message"]
    assert client.get("/api/model/canary").get_json() == {"rollout": None}
    assert predict_many(client, 20) == {"1.0.0": 20}


def test_what_cannot_be_canaried_is_a_clear_error(app, client, state_dir: Path, api_keys: dict[str, str]) -> None:
    assert client.post("/api/model/canary/9.9.9", json={}).get_json()["error"]["code"] == "version_not_found"
    assert client.post("/api/model/canary/..%2Fetc", json={}).status_code == 400
    conflict = client.post("/api/model/canary/1.0.0", json={})
    assert conflict.status_code == 409 and "already production" in conflict.get_json()["error"]["message"]
    copy_of_production(client, "1.1.0")
    copy_of_production(client, "1.2.0")
    for key, status in ((api_keys["read"], 403), (api_keys["write"], 403), ("qk_" + "unknown", 401)):
        assert client.post("/api/model/canary/1.1.0", json={}, headers={"X-API-Key": key}).status_code == status
    artifact = next((state_dir / "models" / "1.2.0").glob("*.safetensors"))
    artifact.write_bytes(artifact.read_bytes()[:-8] + b"tampered")
    tampered = client.post("/api/model/canary/1.2.0", json={})
    assert tampered.status_code == 422 and tampered.get_json()["error"]["code"] == "integrity_check_failed"
    assert client.get("/api/model/canary").get_json() == {"rollout": None}
    assert client.post("/api/model/canary/1.1.0", json={}).status_code == 201
    second = client.post("/api/model/canary/1.2.0", json={})
    assert second.status_code == 409 and second.get_json()["error"]["code"] == "rollout_conflict"
    assert client.get("/api/health/detailed").status_code == 200


def test_a_canary_needs_production_to_be_what_is_served(app, client) -> None:
    copy_of_production(client, "1.1.0")
    copy_of_production(client, "1.2.0")
    assert client.post("/api/model/load/1.2.0").status_code == 200
    refused = client.post("/api/model/canary/1.1.0", json={})
    assert refused.status_code == 409 and "load production again" in refused.get_json()["error"]["message"]


def test_promote_and_abort_by_hand(app, client, api_keys: dict[str, str]) -> None:
    for decision in ("promote", "abort"):
        refused = client.post(f"/api/model/canary/{decision}", json={})
        assert refused.status_code == 409 and refused.get_json()["error"]["message"] == "no rollout is active"
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    assert client.post("/api/model/canary/abort", json={"why": "x"}).status_code == 400
    assert client.post("/api/model/canary/abort", json={}, headers={"X-API-Key": api_keys["read"]}).status_code == 403
    served = predict_many(client, 60)
    aborted = client.post("/api/model/canary/abort", json={"reason": "saw enough"})
    assert aborted.status_code == 200
    body = aborted.get_json()
    assert body["status"] == "aborted" and body["reason"] == "saw enough" and body["verdict"] is None
    assert body["arms"]["candidate"]["predictions"] + body["arms"]["production"]["predictions"] == sum(served.values())
    assert predict_many(client, 20, "after-abort") == {"1.0.0": 20}
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    promoted = client.post("/api/model/canary/promote", json={})
    assert promoted.status_code == 200 and promoted.get_json()["status"] == "promoted"
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.1.0"
    assert predict_many(client, 20, "after-promote") == {"1.1.0": 20}
    actions = [entry["action"] for entry in client.get("/api/audit?limit=20").get_json()["entries"]]
    assert {"rollouts.start_canary", "rollouts.abort_canary", "rollouts.promote_canary"} <= set(actions)
    kinds = [alert["message"] for alert in client.get("/api/monitoring/alerts").get_json()["alerts"]
             if alert["kind"] == "rollout"]
    assert len(kinds) == 4 and kinds[0].startswith("canary of 1.1.0 promoted")


def test_the_same_request_id_lands_on_the_same_arm(app, client) -> None:
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    first = [client.post("/api/predict", json={"inputs": [ROWS[0]]}, headers={"X-Request-ID": f"retry-{i}"})
             for i in range(30)]
    again = [client.post("/api/predict", json={"inputs": [ROWS[0]]}, headers={"X-Request-ID": f"retry-{i}"})
             for i in range(30)]
    assert [r.get_json()["model_version"] for r in first] == [r.get_json()["model_version"] for r in again]
    assert {r.get_json()["request_id"] for r in first} == {f"retry-{i}" for i in range(30)}
    assert len({r.get_json()["model_version"] for r in first}) == 2
    for bad in ("has space", "x" * 201, "ünïcode"):
        refused = client.post("/api/predict", json={"inputs": [ROWS[0]]}, headers={"X-Request-ID": bad})
        assert refused.status_code == 400 and "X-Request-ID" in refused.get_json()["error"]["message"]


def test_a_promote_or_rollback_during_a_canary_ends_it_first(app, client) -> None:
    copy_of_production(client, "1.1.0")
    copy_of_production(client, "1.2.0")
    assert client.post("/api/model/canary/1.1.0", json={}).status_code == 201
    assert client.post("/api/model/promote/1.2.0").status_code == 200
    ended = client.get("/api/model/canary").get_json()["rollout"]
    assert ended["status"] == "aborted" and ended["reason"].startswith("ended by the promote of 1.2.0")
    assert predict_many(client, 20) == {"1.2.0": 20}
    assert client.post("/api/model/canary/1.1.0", json={}).status_code == 201
    assert client.post("/api/model/promote/1.1.0").status_code == 200
    assert client.get("/api/model/canary").get_json()["rollout"]["status"] == "promoted"
    assert client.post("/api/model/canary/1.2.0", json={}).status_code == 201
    assert client.post("/api/model/rollback").status_code == 200
    ended = client.get("/api/model/canary").get_json()["rollout"]
    assert ended["status"] == "aborted" and ended["reason"].startswith("ended by a rollback by test-admin")


def test_maintenance_pauses_the_decision_and_hold_waits_for_an_operator(app, client) -> None:
    copy_of_production(client, "1.1.0")
    started = client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 100, "on_success": "hold",
                                                           "criteria": {"max_prediction_distance": None,
                                                                        "max_latency_p95_ratio": None}})
    assert started.status_code == 201
    predict_many(client, 400)
    assert client.post("/api/mode/maintenance", json={"reason": "pause"}).status_code == 200
    assert decide(app) is None
    paused = client.get("/api/model/canary").get_json()["rollout"]
    assert paused["status"] == "running" and paused["paused"] is True
    assert client.post("/api/mode/inference", json={}).status_code == 200
    held = decide(app)
    assert held is not None and held.status == "held" and held.verdict == "passed"
    assert decide(app) is None  # held: nothing more happens by itself
    status = client.get("/api/model/canary").get_json()["rollout"]
    assert status["status"] == "held" and len(status["history"]) >= 2 and status["paused"] is False
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"
    assert len(predict_many(client, 100, "held")) == 2  # a held canary keeps serving its share
    assert client.post("/api/model/canary/promote", json={"reason": "looks good"}).status_code == 200
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.1.0"


def test_a_clear_breach_aborts_before_min_predictions(app, client) -> None:
    import_random_model(client, "2.0.0")
    assert client.post("/api/model/canary/2.0.0", json={"percent": 50, "min_predictions": 1000}).status_code == 201
    predict_many(client, 300)  # about 150 on the candidate: past the early look (100), short of 1000
    decided = decide(app)
    assert decided is not None and decided.status == "aborted" and decided.reason.startswith("clear breach after")


def test_a_restart_resumes_the_canary(app, client, state_dir: Path) -> None:
    from app import create_app, start_serving, stop_serving

    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    restarted = create_app(make_settings(state_dir, rollout_check_seconds=3600.0, rate_limit_enabled=False))
    start_serving(restarted)
    try:
        canary = restarted.extensions["quadra"].model_server.canary
        assert canary is not None and canary.model.version == "1.1.0" and canary.percent == 50
    finally:
        stop_serving(restarted)


def test_metrics_show_each_arm(app, client) -> None:
    from tests.conftest import promtool_findings

    assert "quadra_rollout_active 0.0" in client.get("/metrics").get_data(as_text=True)
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 1000}).status_code == 201
    predict_many(client, 100)
    assert decide(app) is None
    exposition = client.get("/metrics").get_data(as_text=True)
    assert "quadra_rollout_active 1.0" in exposition and "quadra_rollout_percent 50.0" in exposition
    for arm, version in (("production", "1.0.0"), ("candidate", "1.1.0")):
        assert f'quadra_rollout_arm_predictions{{arm="{arm}",version="{version}"}}' in exposition
        assert f'quadra_rollout_arm_latency_p95_seconds{{arm="{arm}",version="{version}"}}' in exposition
    assert promtool_findings(exposition) == ""


def test_the_cli_starts_follows_and_ends_a_canary(app, client) -> None:
    runner = app.test_cli_runner()
    assert runner.invoke(args=["rollout", "status"]).exit_code == 1
    copy_of_production(client, "1.1.0")
    refused = runner.invoke(args=["rollout", "start", "1.1.0", "--criteria", "{oops"])
    assert refused.exit_code != 0 and "not valid JSON" in refused.output
    refused = runner.invoke(args=["rollout", "start", "1.1.0", "--percent", "70"])
    assert refused.exit_code == 1 and "percent" in refused.output
    refused = runner.invoke(args=["rollout", "start", "../x"])
    assert refused.exit_code == 1 and "version" in refused.output
    started = runner.invoke(args=["rollout", "start", "1.1.0", "--percent", "20", "--min-predictions", "500",
                                  "--criteria", '{"max_latency_p95_ratio": null}', "--on-success", "hold"])
    assert started.exit_code == 0 and "1.1.0 serves 20%" in started.output
    status = json.loads(runner.invoke(args=["rollout", "status"]).output)
    assert status["status"] == "running" and status["criteria"]["max_latency_p95_ratio"] is None
    assert status["on_success"] == "hold" and status["started_by"] == "cli"
    aborted = runner.invoke(args=["rollout", "abort", "--reason", "not today"])
    assert aborted.exit_code == 0 and "production 1.0.0 serves every request" in aborted.output
    shadowed = runner.invoke(args=["rollout", "start", "1.1.0", "--mode", "shadow", "--percent", "80"])
    assert shadowed.exit_code == 0 and "1.1.0 shadows 80%" in shadowed.output
    assert json.loads(runner.invoke(args=["rollout", "status"]).output)["mode"] == "shadow"
    assert runner.invoke(args=["rollout", "abort"]).exit_code == 0
    assert runner.invoke(args=["rollout", "abort"]).exit_code == 1
    assert runner.invoke(args=["rollout", "start", "1.1.0"]).exit_code == 0
    promoted = runner.invoke(args=["rollout", "promote"])
    assert promoted.exit_code == 0 and "promoted 1.1.0" in promoted.output
    actions = {entry["action"] for entry in client.get("/api/audit?limit=20").get_json()["entries"]}
    assert {"rollouts.start_canary", "rollouts.abort_canary", "rollouts.promote_canary"} <= actions


def rollout_row(version: str = "1.1.0"):
    from utils.store import RolloutRow

    return RolloutRow(id=0, version=version, baseline_version="1.0.0", mode="canary", percent=10.0, min_predictions=100, criteria={},
                      on_success="promote", on_failure="abort", started_at=1.0, started_by="test", start_record_id=0,
                      status="running")


def test_one_rollout_at_a_time_and_each_ends_once(store) -> None:
    from utils.store import StoreConflict

    store.versions.deploy("promote", "1.0.0", "test", set_production=True)
    first = store.rollouts.start(rollout_row())
    with pytest.raises(StoreConflict, match="1.1.0 is already active"):
        store.rollouts.start(rollout_row("1.2.0"))
    assert store.rollouts.finish(first.id, "promoted", "passed", "ok", "a")
    assert not store.rollouts.finish(first.id, "aborted", None, "late", "b")  # a second decider loses
    ended = store.rollouts.get(first.id)
    assert ended is not None and ended.status == "promoted" and ended.decided_by == "a"
    second = store.rollouts.start(rollout_row("1.2.0"))
    assert second.id > first.id and store.rollouts.active() == second
    assert store.rollouts.hold(second.id, "failed", "held", {"arms": {}})
    assert not store.rollouts.hold(second.id, "failed", "again", {})  # only a running one is held
    assert store.rollouts.active().status == "held"
    assert [row.id for row in store.rollouts.list()] == [second.id, first.id]


def test_arm_summaries_are_aggregated_in_the_store(store) -> None:
    from utils.store import PredictionRecord

    def record(version: str, predicted: str | None, confidence: float | None, success: bool = True) -> PredictionRecord:
        return PredictionRecord(at=1.0, model_version=version, latency_ms=2.0, confidence=confidence,
                                predicted_class=predicted, success=success, error=None if success else "boom",
                                features=None, record_id=None)

    store.predictions.insert([record("1.0.0", "a", 0.9)])
    start = store.predictions.last_id()
    store.predictions.insert([record("1.0.0", "a", 0.8), record("1.0.0", "b", 0.6), record("1.1.0", "b", 0.5),
                              record("1.1.0", None, None, success=False), record("9.9.9", "a", 0.1)])
    summaries = store.predictions.summaries(start, store.predictions.last_id(), ("1.0.0", "1.1.0"), ("boom",))
    production, candidate = summaries["1.0.0"], summaries["1.1.0"]
    assert (production.count, production.errors, production.class_counts) == (2, 0, {"a": 1, "b": 1})
    assert production.confidence_sum == pytest.approx(1.4) and production.confidence_count == 2
    assert (candidate.count, candidate.errors, candidate.class_counts) == (2, 1, {"b": 1})
    assert store.predictions.latencies(start, store.predictions.last_id(), ("1.1.0",), ("boom",)) == {"1.1.0": [2.0, 2.0]}
    assert store.predictions.summaries(start, store.predictions.last_id(), ("1.1.0",), ())["1.1.0"].count == 1


def test_a_shadow_answers_nothing_and_is_promoted_by_its_agreement(app, client) -> None:
    copy_of_production(client, "1.1.0")
    # Latency is left to the end-to-end runs: here the shadow thread shares the GIL with the test's requests.
    started = client.post("/api/model/canary/1.1.0", json={"mode": "shadow", "percent": 100, "min_predictions": 100,
                                                           "criteria": {"max_latency_p95_ratio": None}})
    assert started.status_code == 201
    body = started.get_json()
    assert body["mode"] == "shadow" and body["criteria"]["max_disagreement_rate"] == 0.05
    assert predict_many(client, 150) == {"1.0.0": 150}  # production answers every request
    app.extensions["quadra"].shadows.drain()  # copies run after the responses, off the request path
    status = client.get("/api/model/canary").get_json()["rollout"]
    shadow = status["shadow"]
    assert shadow["requests"] == 150 and shadow["rows"] == 150 and shadow["agreement_rate"] == 1.0
    assert shadow["errors"] == 0 and sum(sum(row.values()) for row in shadow["confusion"].values()) == 150
    assert all(set(row) == {name} for name, row in shadow["confusion"].items())
    assert status["arms"]["candidate"]["predictions"] == 150
    decided = decide(app)
    assert decided is not None and decided.status == "promoted" and decided.verdict == "passed"
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.1.0"
    totals = client.get("/api/monitoring/stats").get_json()
    assert totals["total_predictions"] == 150  # shadow runs are not served predictions


def test_a_shadow_that_disagrees_is_aborted_and_its_confusion_shows_where(app, client) -> None:
    import_random_model(client, "2.0.0")
    started = client.post("/api/model/canary/2.0.0", json={
        "mode": "shadow", "percent": 50, "min_predictions": 100,
        "criteria": {"max_prediction_distance": None, "max_confidence_drop": None, "max_latency_p95_ratio": None}})
    assert started.status_code == 201
    assert predict_many(client, 300) == {"1.0.0": 300}
    decided = decide(app)
    assert decided is not None and decided.status == "aborted" and "max_disagreement_rate" in decided.reason
    shadow = client.get("/api/model/canary").get_json()["rollout"]["shadow"]
    assert 100 <= shadow["rows"] < 200 and shadow["agreement_rate"] < 0.9
    assert any(set(row) - {name} for name, row in shadow["confusion"].items())


def test_a_failing_or_slow_shadow_counts_failures_and_drops_never_requests(store) -> None:
    from utils.serving import Canary, ServedModel
    from utils.shadow import ShadowRunner

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the candidate cannot run")

    canary = Canary(7, 100.0, ServedModel("1.1.0", "0" * 64, Broken(), dict(CONFIG)), "shadow")
    runner = ShadowRunner(store, queue_size=2)  # not started: the queue fills
    results = [{"class": "setosa", "confidence": 0.9}]
    for _ in range(5):
        runner.submit(canary, torch.zeros(1, 4), results, 0.1)
    runner.start()
    runner.drain()
    runner.stop()
    total, last_id = store.shadow_tallies.total(7)
    assert last_id > 0 and store.shadow_tallies.total(7, last_id)[0].requests == 0
    assert (total.requests, total.errors, total.dropped, total.rows) == (2, 2, 3, 0)


def test_each_check_adds_only_what_arrived_since_the_last(app, client) -> None:
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 100_000}).status_code == 201
    services = app.extensions["quadra"]
    served: dict[str, int] = {}
    for round_ in range(3):
        for version, count in predict_many(client, 60, f"round-{round_}").items():
            served[version] = served.get(version, 0) + count
        assert decide(app) is None
        rollout = services.store.rollouts.active()
        arms = rollout.comparison["arms"]
        assert {arms[arm]["version"]: arms[arm]["predictions"] for arm in arms} == served
        assert rollout.comparison["progress"]["record_id"] == services.store.predictions.last_id()
    start = services.store.rollouts.active().start_record_id
    from_scratch = services.store.predictions.summaries(start, services.store.predictions.last_id(), ("1.0.0", "1.1.0"),
                                                        ())
    live = client.get("/api/model/canary").get_json()["rollout"]["arms"]
    assert live["candidate"]["class_distribution"] == from_scratch["1.1.0"].class_counts
    assert live["production"]["confidence_mean"] == pytest.approx(
        from_scratch["1.0.0"].confidence_sum / from_scratch["1.0.0"].confidence_count)


def test_a_clients_bad_requests_count_against_no_arm(app, client) -> None:
    copy_of_production(client, "1.1.0")
    # Latency is left to the end-to-end runs: sub-millisecond in-process p95s are scheduling noise.
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50, "min_predictions": 100,
                                                        "criteria": {"max_latency_p95_ratio": None}}).status_code == 201
    candidate_ids = [f"bad-{i}" for i in range(400) if takes_candidate(1, f"bad-{i}", 50.0)]
    for request_id in candidate_ids[:150]:  # aimed at the candidate, to make it look broken
        refused = client.post("/api/predict", json={"inputs": [[1.0, 2.0]]}, headers={"X-Request-ID": request_id})
        assert refused.status_code == 400
    predict_many(client, 300)
    decided = decide(app)
    assert decided is not None and decided.status == "promoted", decided.reason
    candidate = decided.comparison["arms"]["candidate"]
    assert candidate["errors"] == 0 and candidate["error_rate"] == 0.0
    assert client.get("/api/monitoring/stats").get_json()["error_count"] == 150  # monitoring still counts them


def test_a_candidate_must_answer_like_production(app, client) -> None:
    wider = {**CONFIG, "input_dim": 5}
    torch.manual_seed(1)
    for version, config in (("2.0.0", wider), ("2.1.0", {**CONFIG, "class_names": ["a", "b", "c"]})):
        tensors = {name: t.contiguous() for name, t in build_model(config).state_dict().items()}
        fields = {"artifact": (io.BytesIO(save(tensors)), "model.safetensors"),
                  "metadata": json.dumps({"config": config, "version": version})}
        assert client.post("/api/model/versions", data=fields, content_type="multipart/form-data").status_code == 201
    wrong_width = client.post("/api/model/canary/2.0.0", json={})
    assert wrong_width.status_code == 409 and "input_dim 5" in wrong_width.get_json()["error"]["message"]
    renamed = client.post("/api/model/canary/2.1.0", json={})
    assert renamed.status_code == 409 and "class_names" in renamed.get_json()["error"]["message"]
    assert client.get("/api/model/canary").get_json() == {"rollout": None}


def test_a_promote_that_cannot_happen_leaves_the_rollout_running(app, client, state_dir: Path) -> None:
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    deleted = client.delete("/api/model/versions/1.1.0")
    assert deleted.status_code == 409
    assert deleted.get_json()["error"]["message"].endswith("the candidate of the active canary and cannot be deleted")
    archived = app.test_cli_runner().invoke(args=["registry", "archive", "1.1.0"])
    assert archived.exit_code == 1 and "cannot be archived" in archived.output
    artifact = next((state_dir / "models" / "1.1.0").glob("*.safetensors"))
    artifact.write_bytes(artifact.read_bytes()[:-8] + b"tampered")
    failed = client.post("/api/model/canary/promote", json={})
    assert failed.status_code == 422 and failed.get_json()["error"]["code"] == "integrity_check_failed"
    assert client.get("/api/model/canary").get_json()["rollout"]["status"] == "running"
    assert client.get("/api/model/versions").get_json()["production_version"] == "1.0.0"
    assert client.post("/api/model/promote/1.1.0").status_code == 422  # nor does a promote by hand end it
    assert client.get("/api/model/canary").get_json()["rollout"]["status"] == "running"


def test_a_deployment_outside_the_api_ends_the_rollout_at_the_next_check(app, client) -> None:
    copy_of_production(client, "1.1.0")
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    app.extensions["quadra"].registry.promote_to_production("1.1.0", actor="console")  # the Python API
    ended = decide(app)
    assert ended is not None and ended.status == "promoted" and ended.reason.startswith("production became 1.1.0")


def test_a_worker_that_cannot_load_the_candidate_serves_production_and_says_so(app, client, state_dir: Path) -> None:
    from utils.store import RolloutRow

    copy_of_production(client, "1.1.0")
    copy_of_production(client, "1.2.0")
    services = app.extensions["quadra"]
    assert client.post("/api/model/canary/1.1.0", json={"percent": 50}).status_code == 201
    assert client.post("/api/model/canary/abort", json={}).status_code == 200
    artifact = next((state_dir / "models" / "1.2.0").glob("*.safetensors"))
    artifact.write_bytes(artifact.read_bytes()[:-8] + b"tampered")
    services.store.rollouts.start(RolloutRow(  # as another host would, after verifying its own copy
        id=0, version="1.2.0", baseline_version="1.0.0", mode="canary", percent=50.0, min_predictions=100,
        criteria={}, on_success="promote", on_failure="abort", started_at=1.0, started_by="elsewhere",
        start_record_id=0, status="running"))
    services.model_server.sync()
    assert services.model_server.canary is None and "1.2.0" in (services.model_server.candidate_error or "")
    assert predict_many(client, 20) == {"1.0.0": 20}


def test_a_start_checks_production_under_the_deployments_lock(store) -> None:
    from utils.store import StoreConflict

    store.versions.deploy("promote", "1.0.0", "test", set_production=True)
    with pytest.raises(StoreConflict, match="production is 1.0.0"):
        store.rollouts.start(replace(rollout_row(), baseline_version="0.9.0"))
    assert store.rollouts.active() is None


def test_shadow_tallies_of_ended_rollouts_are_removed(store) -> None:
    from utils.store import ShadowTally

    store.versions.deploy("promote", "1.0.0", "test", set_production=True)
    row = store.rollouts.start(rollout_row())
    store.shadow_tallies.add(row.id, ShadowTally(requests=1, rows=1, agreements=1))
    store.shadow_tallies.add(999, ShadowTally(requests=1))  # a late add for a rollout long gone
    assert store.shadow_tallies.prune(row.id) == 1
    assert store.rollouts.finish(row.id, "aborted", None, "done", "test")
    assert store.shadow_tallies.total(row.id) == (ShadowTally(), 0)
