"""Label feedback and quality: prediction ids, every kind of feedback item with its result,
quality numbers equal to scikit-learn's, the quality alert with hysteresis, retention, the CLI
and the metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)
from sqlalchemy import select

from tests.conftest import make_settings, promtool_findings
from tests.test_monitoring import series_value
from utils import audit
from utils.cooperation import YIELD_SECONDS
from utils.feedback import FeedbackPolicy, LabelFeedback
from utils.maintenance import observe_quality
from utils.model_monitoring import ModelMonitor, PredictionMetrics
from utils.model_versioning import ModelVersionManager
from utils.quality_report import QualityFloor
from utils.request_ids import made_at, new_request_id
from utils.serving import build_model
from utils.store import Coverage, PredictionRecord, Store
from utils.store.database import encode_rows, insert_encoded
from utils.store.tables import minute_of, outcomes

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
CLASSES = ["setosa", "versicolor", "virginica"]


def predict(client, rows: list[list[float]] = ROWS, **headers: str) -> dict[str, Any]:
    response = client.post("/api/predict", json={"inputs": rows}, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def feedback(client, items: list[Any], status: int = 200) -> dict[str, Any]:
    response = client.post("/api/feedback", json={"labels": items})
    assert response.status_code == status, response.get_json()
    return response.get_json()


def flushed(client) -> None:
    client.application.extensions["quadra"].monitor.flush()


# -- prediction ids ----------------------------------------------------------------------------


def test_each_row_gets_an_id_of_its_request_and_row(client) -> None:
    answer = predict(client)
    request_id = answer["request_id"]
    assert [p["id"] for p in answer["predictions"]] == [f"{request_id}:{i}" for i in range(3)]
    assert made_at(request_id) == pytest.approx(time.time(), abs=5)  # a UUIDv7: it tells when it was made
    given = predict(client, ROWS[:1], **{"X-Request-ID": "order-4711"})
    assert given["predictions"][0]["id"] == "order-4711:0"


def test_request_ids_are_uuid7_in_time_order() -> None:
    first, second = new_request_id(), new_request_id()
    assert len(first) == 32 and first[12] == "7" and first[16] in "89ab"
    assert made_at(first) <= made_at(second) and made_at("order-4711:0") is None


def test_a_retried_request_id_keeps_its_first_prediction(client) -> None:
    predict(client, ROWS[:1], **{"X-Request-ID": "retry-1"})
    predict(client, ROWS[:1], **{"X-Request-ID": "retry-1"})
    flushed(client)
    store = client.application.extensions["quadra"].store
    assert list(store.outcomes.find(["retry-1:0"])) == ["retry-1:0"]
    assert store.predictions.totals().count == 2  # both requests are still counted by monitoring


# -- feedback items ----------------------------------------------------------------------------


def test_labels_are_recorded_by_name_or_index_and_relabelling_counts_once(client) -> None:
    ids = [p["id"] for p in predict(client)["predictions"]]
    flushed(client)
    first = feedback(client, [{"id": ids[0], "label": "setosa"}, {"id": ids[1], "label": 2}])
    assert (first["recorded"], first["relabelled"], first["rejected"]) == (2, 0, 0)
    assert [r["status"] for r in first["results"]] == ["recorded", "recorded"]
    again = feedback(client, [{"id": ids[1], "label": "versicolor"}])
    assert again["results"][0]["status"] == "relabelled" and again["relabelled"] == 1
    quality = client.get("/api/monitoring/quality?window=hour").get_json()["versions"][0]
    assert quality["labelled"] == 2 and quality["predictions"] == 3
    assert quality["confusion_matrix"][1] == [0, 0, 1]  # the last label of ids[1] (versicolor), predicted virginica


def test_labels_may_arrive_before_the_records_are_flushed(client) -> None:
    """The monitor writes what it buffered before joining labels, so an immediate label is not 'unknown'."""
    answer = predict(client, ROWS[:1])
    result = feedback(client, [{"id": answer["predictions"][0]["id"], "label": "setosa"}])
    assert result["results"][0]["status"] == "recorded"


def test_a_label_waits_briefly_for_a_prediction_another_worker_has_not_written_yet(
        store: Store, registry: ModelVersionManager, tmp_path: Path) -> None:
    register(registry, CLASSES)
    other_worker = ModelMonitor(tmp_path / "other", store=store)
    request_id = new_request_id()
    row = {"id": f"{request_id}:0", "class": "setosa", "confidence": 0.9,
           "probabilities": {"setosa": 0.9, "versicolor": 0.05, "virginica": 0.05}}
    other_worker.record_batch(ROWS[:1], [row], 0.001, "1.0.0")
    threading.Timer(0.3, other_worker.flush).start()  # its flush interval ends while the label waits
    labels = LabelFeedback(store, FeedbackPolicy(settle_seconds=1.0))
    assert labels.record([{"id": row["id"], "label": "setosa"}, {"id": "client-id:0", "label": 0}])["recorded"] == 1


def test_every_bad_item_is_reported_on_its_own(client) -> None:
    ids = [p["id"] for p in predict(client)["predictions"]]
    flushed(client)
    old_id = "01890000000070008000000000000000:0"  # a UUIDv7 of 2023: past the 30-day horizon
    items = [
        {"id": ids[0], "label": "setosa"},               # superseded by item 12
        {"id": "never-made:0", "label": "setosa"},        # unknown
        {"id": old_id, "label": "setosa"},                # expired
        {"id": ids[1], "label": "tulip"},                 # superseded by the next item (the last one is judged)
        {"id": ids[1], "label": 3},                       # an index past the classes
        {"id": ids[2], "label": True},                    # wrong type
        {"id": 17, "label": "setosa"},                    # wrong type of id
        {"id": ids[2]},                                   # no label
        "setosa",                                         # not an object
        {"id": ids[0], "label": 0, "extra": 1},           # unknown field
        {"id": ids[2], "label": 1.5},                     # a float is no class index
        {"id": "", "label": "setosa"},                    # an empty id
        {"id": ids[0], "label": "versicolor"},            # the last label of ids[0] wins
    ]
    result = feedback(client, items)
    statuses = [r["status"] for r in result["results"]]
    assert statuses == ["superseded", "unknown_id", "expired", "superseded", "invalid_label", "invalid_item",
                        "invalid_item", "invalid_item", "invalid_item", "invalid_item", "invalid_item", "invalid_item",
                        "recorded"]
    assert (result["recorded"], result["relabelled"], result["rejected"]) == (1, 0, 12)
    assert all(r["message"] for r in result["results"][:12]) and result["results"][12]["message"] is None
    assert "setosa, versicolor, virginica" in result["results"][4]["message"]
    assert result["results"][0]["message"] == "item 12 labels the same prediction later in this request"
    assert [r["index"] for r in result["results"]] == list(range(13))
    quality = client.get("/api/monitoring/quality?window=hour").get_json()["versions"][0]
    assert quality["labelled"] == 1 and quality["confusion_matrix"][1][0] == 1  # versicolor, predicted setosa
    assert client.get("/api/health").status_code == 200


def test_an_overlong_id_or_class_name_is_an_invalid_item(client) -> None:
    result = feedback(client, [{"id": "x" * 241, "label": 0}, {"id": "x:0", "label": "y" * 129},
                               {"id": "x:0", "label": -1}])
    assert [r["status"] for r in result["results"]] == ["invalid_item"] * 3
    assert "id:" in result["results"][0]["message"] and result["results"][2]["message"].startswith("label:")


def test_an_unknown_quality_window_setting_is_refused() -> None:
    from utils.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="QUADRA_QUALITY_WINDOW"):
        Settings.from_env({"QUADRA_QUALITY_WINDOW": "week"})
    with pytest.raises(ConfigError, match="QUADRA_QUALITY_MIN_ACCURACY"):
        Settings.from_env({"QUADRA_QUALITY_MIN_ACCURACY": "1.5"})


def test_a_stored_prediction_past_the_horizon_is_expired(client) -> None:
    monitor: ModelMonitor = client.application.extensions["quadra"].monitor
    long_ago = time.time() - 31 * 86400
    monitor.record_metrics(PredictionMetrics(at=long_ago, latency_ms=1.0, success=True, confidence=0.9,
                                             predicted_class="setosa", model_version="1.0.0",
                                             prediction_id="batch-job-7:0", probabilities=[0.9, 0.05, 0.05]))
    monitor.flush()
    result = feedback(client, [{"id": "batch-job-7:0", "label": "setosa"}])
    assert result["results"][0]["status"] == "expired"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"labels": []}, 400, "invalid_body"),
    ({"labels": {"id": "x", "label": 1}}, 400, "invalid_body"),
    ({"items": []}, 400, "invalid_body"),
    ([{"id": "x", "label": 1}], 400, "invalid_body"),
])
def test_a_malformed_request_is_refused_whole(client, body: Any, status: int, code: str) -> None:
    response = client.post("/api/feedback", json=body)
    assert response.status_code == status and response.get_json()["error"]["code"] == code


def test_an_oversize_batch_is_413_and_records_nothing(state_dir: Path, api_keys: dict[str, str]) -> None:
    from app import create_app, start_serving, stop_serving

    app = create_app(make_settings(state_dir, feedback_max_labels=2, rate_limit_enabled=False))
    start_serving(app)
    try:
        client = app.test_client()
        client.environ_base["HTTP_X_API_KEY"] = api_keys["write"]
        ids = [p["id"] for p in predict(client)["predictions"]]
        response = client.post("/api/feedback", json={"labels": [{"id": i, "label": 0} for i in ids]})
        assert response.status_code == 413
        error = response.get_json()["error"]
        assert error["code"] == "too_many_labels" and "at most 2" in error["message"]
        assert app.extensions["quadra"].store.outcomes.find(ids)[ids[0]].label is None
        assert feedback(client, [{"id": ids[0], "label": 0}])["recorded"] == 1
    finally:
        stop_serving(app)
        app.extensions["quadra"].store.database.dispose()


def test_feedback_needs_write_and_quality_read(client, anonymous, api_keys: dict[str, str]) -> None:
    item = {"labels": [{"id": "x:0", "label": 0}]}
    assert anonymous.post("/api/feedback", json=item).status_code == 401
    assert client.post("/api/feedback", json=item, headers={"X-API-Key": api_keys["read"]}).status_code == 403
    assert client.post("/api/feedback", json=item, headers={"X-API-Key": api_keys["write"]}).status_code == 200
    assert anonymous.get("/api/monitoring/quality").status_code == 401
    assert client.get("/api/monitoring/quality", headers={"X-API-Key": api_keys["read"]}).status_code == 200
    entries = client.get("/api/audit?action=monitoring.feedback").get_json()["entries"]
    assert entries[0]["details"] == {"recorded": 0, "relabelled": 0, "rejected": 1}


@pytest.mark.parametrize(("query", "status", "code"), [
    ("window=week", 400, "invalid_parameter"),
    ("version=9.9.9", 404, "version_not_found"),
    ("version=../x", 400, "invalid_version"),
    ("limit=3", 400, "invalid_parameter"),
])
def test_a_bad_quality_query_is_a_clear_error(client, query: str, status: int, code: str) -> None:
    response = client.get(f"/api/monitoring/quality?{query}")
    assert response.status_code == status and response.get_json()["error"]["code"] == code


# -- quality numbers against scikit-learn -------------------------------------------------------


def register(registry: ModelVersionManager, classes: list[str]) -> None:
    config = {"architecture": "mlp", "input_dim": 4, "num_classes": len(classes), "hidden_dims": [4],
              "class_names": classes}
    registry.save_model(build_model(config), "1.0.0", metrics={"accuracy": 0.9}, config=config)


def labelled_monitor(store: Store, registry: ModelVersionManager, tmp_path: Path, classes: list[str],
                     count: int, seed: int = 0) -> tuple[ModelMonitor, np.ndarray, np.ndarray]:
    """`count` predictions of version 1.0.0 with random probabilities, each labelled at random
    (mostly its predicted class); returns the monitor, the true and the probability arrays."""
    register(registry, classes)
    monitor = ModelMonitor(tmp_path / "monitoring", store=store)
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(len(classes)) * 0.7, count)
    predicted = probabilities.argmax(axis=1)
    truth = np.where(rng.random(count) < 0.75, predicted, rng.integers(0, len(classes), count))
    now = time.time()
    for i in range(count):
        monitor.record_metrics(PredictionMetrics(
            at=now - 600 + i * 0.01, latency_ms=1.0, success=True, confidence=float(probabilities[i].max()),
            predicted_class=classes[predicted[i]], model_version="1.0.0", prediction_id=f"q:{i}",
            probabilities=probabilities[i].tolist()))
    items = [{"id": f"q:{i}", "label": classes[t] if i % 2 else int(t)} for i, t in enumerate(truth)]
    assert monitor.record_feedback(items)["recorded"] == count
    return monitor, truth, probabilities


@pytest.mark.parametrize("classes", [CLASSES, ["no", "yes"]], ids=["three-classes", "binary"])
def test_quality_equals_scikit_learns_metrics(store: Store, registry: ModelVersionManager, tmp_path: Path,
                                              classes: list[str]) -> None:
    monitor, truth, probabilities = labelled_monitor(store, registry, tmp_path, classes, 1500)
    report = monitor.quality(window="hour")
    (quality,) = report["versions"]
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    assert quality["labelled"] == quality["predictions"] == 1500 and quality["coverage"] == 1.0
    assert quality["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=indices, zero_division=0)
    for i, name in enumerate(classes):
        assert quality["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}, abs=1e-12)
    assert quality["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12)
    assert quality["confusion_matrix"] == confusion_matrix(truth, predicted, labels=indices).tolist()
    assert quality["log_loss"] == pytest.approx(log_loss(truth, probabilities, labels=indices), rel=1e-9)
    assert quality["brier_score"] == pytest.approx(brier_score_loss(truth, probabilities, labels=indices), rel=1e-9)
    correct = (truth == predicted).astype(int)
    confidence = probabilities.max(axis=1)
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], confidence), minlength=10)
    expected = float((counts[counts > 0] / counts.sum() * np.abs(prob_true - prob_pred)).sum())
    assert quality["expected_calibration_error"] == pytest.approx(expected, abs=1e-12)
    filled = [b for b in quality["calibration"] if b["count"]]
    assert [b["accuracy"] for b in filled] == pytest.approx(prob_true.tolist(), abs=1e-12)
    assert [b["confidence_mean"] for b in filled] == pytest.approx(prob_pred.tolist(), abs=1e-12)
    assert quality["validation_accuracy"] == 0.9
    assert sum(point["labelled"] for point in quality["timeline"]) == 1500


def test_a_quality_check_lets_the_workers_other_requests_run_while_it_reads(
        store: Store, registry: ModelVersionManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's quality check over 100,000 labelled predictions held one async worker's
    other requests for 350-700 ms (p99 over 200 ms under load): its labels are read 1,000 and
    their probabilities parsed 500 at a time, with a yield (utils.cooperation) after each block."""
    monitor, _, _ = labelled_monitor(store, registry, tmp_path, CLASSES, 3000)
    yields: list[float] = []
    monkeypatch.setattr(time, "sleep", yields.append)
    assert monitor.quality(window="hour")["versions"][0]["labelled"] == 3000
    assert len(yields) >= 3000 // 1000 + 3000 // 500 and set(yields) == {YIELD_SECONDS}


def test_a_labelled_prediction_of_another_window_is_not_counted(store: Store, registry: ModelVersionManager,
                                                                tmp_path: Path) -> None:
    monitor, _, _ = labelled_monitor(store, registry, tmp_path, CLASSES, 30)
    monitor.record_metrics(PredictionMetrics(at=time.time() - 7200, latency_ms=1.0, success=True, confidence=0.9,
                                             predicted_class="setosa", model_version="1.0.0", prediction_id="old:0",
                                             probabilities=[0.9, 0.05, 0.05]))
    assert monitor.record_feedback([{"id": "old:0", "label": "virginica"}])["recorded"] == 1
    assert monitor.quality(window="hour")["versions"][0]["labelled"] == 30
    assert monitor.quality(window="day")["versions"][0]["labelled"] == 31
    assert monitor.quality(window="horizon", version="1.0.0")["versions"][0]["labelled"] == 31


def outcome_record(key: str, at: float, version: str, predicted: str) -> PredictionRecord:
    return {"at": at, "model_version": version, "latency_ms": 1.0, "confidence": 0.9, "predicted_class": predicted,
            "success": True, "error": None, "features": None, "record_id": None, "prediction_id": key,
            "probabilities": [0.5, 0.25, 0.25]}


def test_coverage_counts_exactly_what_a_row_by_row_count_finds(store: Store) -> None:
    """Coverage comes from per-minute counts and the outcomes of the partial minutes at both
    ends: through inserts (on minute boundaries too), repeated ids, labels, relabels and a prune
    in the middle of a minute, every window counts what counting the kept outcomes one by one
    finds."""
    rng = np.random.default_rng(7)
    start = (time.time() // 60 - 30) * 60
    kept: dict[str, list[Any]] = {}  # id -> [at, version, predicted class, label]
    for flush in range(12):
        records = []
        for i in range(150):
            at = start + float(rng.choice([rng.uniform(0, 1200), 60.0 * rng.integers(0, 20)]))
            key = f"f{flush}:{i}"
            records.append(outcome_record(key, at, str(rng.choice(["1.0.0", "2.0.0"])), str(rng.choice(CLASSES))))
            kept.setdefault(key, [at, records[-1]["model_version"], records[-1]["predicted_class"], None])
        records += records[:5]  # a retried request's ids, in the same flush and in the next one's
        store.predictions.insert(records)
    store.predictions.insert([outcome_record("f0:0", start + 5.0, "2.0.0", "setosa")])
    for _ in range(2):  # labels, then relabels of some of them
        keys = rng.choice(sorted(kept), 400, replace=False)
        labels = {str(key): str(rng.choice(CLASSES)) for key in keys}
        store.outcomes.set_labels({**labels, "missing:0": "setosa"}, time.time())
        for key, label in labels.items():
            kept[key][3] = label
    for prune_at in (start + 330.5, start + 330.5, start + 335.0):  # twice at the same time, then later
        assert store.outcomes.prune(prune_at) == sum(1 for at, *_ in kept.values() if at < prune_at)
        kept = {key: row for key, row in kept.items() if row[0] >= prune_at}
        late = outcome_record(f"late:{prune_at}", prune_at + 1, "1.0.0", "setosa")  # into the pruned minute
        store.predictions.insert([late])
        store.outcomes.set_labels({late["prediction_id"]: "setosa"}, time.time())
        kept[late["prediction_id"]] = [late["at"], "1.0.0", "setosa", "setosa"]
    assert_coverage_counts(store, kept, start, rng)
    store.outcomes.recount()
    assert_coverage_counts(store, kept, start, rng)


def assert_coverage_counts(store: Store, kept: dict[str, list[Any]], start: float, rng: np.random.Generator) -> None:
    """Every window's coverage is what counting `kept` (id -> [at, version, predicted class,
    label]) one by one finds."""
    windows = [(start, start + 1200), (start + 59.999, start + 60), (start + 330.5, start + 600),
               (start + 61.25, start + 1079.75), (start - 600, start + 3600)]
    windows += [tuple(sorted(rng.uniform(0, 1300, 2) + start)) for _ in range(25)]
    for since, until in windows:
        expected: dict[str, Coverage] = {}
        for at, version, predicted, label in kept.values():
            if since <= at <= until:
                was = expected.get(version, Coverage(0, 0, 0))
                expected[version] = was.plus(Coverage(1, label is not None, label == predicted))
        assert store.outcomes.coverage(since, until) == expected, (since - start, until - start)
        assert store.outcomes.coverage(since, until, ("2.0.0",)) == {k: v for k, v in expected.items() if k == "2.0.0"}


def test_coverage_stays_exact_with_writers_in_several_threads(store: Store) -> None:
    """Flushes of overlapping prediction ids (a retried request's) and labels at once, on
    several connections: every id is counted once, every label once."""
    start = time.time() - 120
    keys = [f"c:{i}" for i in range(400)]

    def flush(offset: int) -> None:
        for first in range(0, 400, 40):
            store.predictions.insert([outcome_record(key, start + (hash(key) % 100), "1.0.0", "setosa")
                                      for key in keys[(first + offset) % 400:][:40]])

    def label() -> None:
        for _ in range(20):
            store.outcomes.set_labels({key: "setosa" if i % 2 else "virginica" for i, key in enumerate(keys)}, time.time())

    threads = [threading.Thread(target=flush, args=(offset,)) for offset in (0, 20, 0)] + [threading.Thread(target=label)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.outcomes.set_labels({key: "setosa" if i % 2 else "virginica" for i, key in enumerate(keys)}, time.time())
    assert store.outcomes.coverage(start - 60, start + 200) == {"1.0.0": Coverage(400, 400, 200)}


def test_a_prediction_needs_a_finite_time() -> None:
    for at in (float("inf"), float("nan"), -1.0, True, "1733100000", None):
        with pytest.raises(ValueError, match="at must be finite epoch seconds"):
            PredictionMetrics(at=at, latency_ms=1.0, success=True)


def test_quality_without_labels_is_empty_not_an_error(client) -> None:
    predict(client)
    report = client.get("/api/monitoring/quality").get_json()
    (quality,) = report["versions"]
    assert quality["labelled"] == 0 and quality["accuracy"] is None and quality["coverage"] == 0.0
    assert report["check"]["evaluated"] is False and report["production_version"] == "1.0.0"


def test_the_horizon_prunes_old_predictions(store: Store, registry: ModelVersionManager, tmp_path: Path) -> None:
    monitor, _, _ = labelled_monitor(store, registry, tmp_path, CLASSES, 10)
    monitor.record_metrics(PredictionMetrics(at=time.time() - 40 * 86400, latency_ms=1.0, success=True,
                                             confidence=0.9, predicted_class="setosa", model_version="1.0.0",
                                             prediction_id="ancient:0", probabilities=[0.9, 0.05, 0.05]))
    monitor.flush()
    monitor.roll_up(86400)
    assert list(store.outcomes.find(["ancient:0", "q:0"])) == ["q:0"]


# -- the quality alert -------------------------------------------------------------------------


def test_an_accuracy_drop_raises_one_alert_that_clears_with_hysteresis(state_dir: Path, api_keys: dict[str, str]) -> None:
    from app import create_app, start_serving, stop_serving

    app = create_app(make_settings(state_dir, quality_min_labels=20, quality_max_drop=0.1, rate_limit_enabled=False,
                                   drift_check_seconds=3600.0))
    start_serving(app)
    try:
        client = app.test_client()
        client.environ_base["HTTP_X_API_KEY"] = api_keys["admin"]
        services = app.extensions["quadra"]
        answers = [p for _ in range(10) for p in predict(client)["predictions"]]
        wrong = [{"id": p["id"], "label": (p["class_index"] + 1) % 3} for p in answers]
        feedback(client, wrong)
        check = observe_quality(services)["check"]
        assert check["evaluated"] and check["below_floor"] and check["accuracy"] == 0.0
        assert check["floor"] == pytest.approx(0.966667 - 0.1)
        observe_quality(services)
        alerts = client.get("/api/monitoring/alerts").get_json()["alerts"]
        assert [a["kind"] for a in alerts] == ["quality"] and alerts[0]["resolved_at"] is None
        assert "below the floor" in alerts[0]["message"]
        feedback(client, [{"id": p["id"], "label": p["class"]} for p in answers])
        for _ in range(3):
            assert not observe_quality(services)["check"]["below_floor"]
        alerts = client.get("/api/monitoring/alerts").get_json()["alerts"]
        assert len(alerts) == 1 and alerts[0]["resolved_at"] is not None
        report = client.get("/api/monitoring/quality").get_json()
        assert report["check"]["accuracy"] == 1.0 and report["check"]["below_floor"] is False
    finally:
        stop_serving(app)
        app.extensions["quadra"].store.database.dispose()


def test_the_floor_is_the_higher_of_the_two_limits() -> None:
    assert QualityFloor(min_accuracy=0.8, max_drop=0.05).floor(0.95) == pytest.approx(0.9)
    assert QualityFloor(min_accuracy=0.8, max_drop=0.2).floor(0.95) == pytest.approx(0.8)
    assert QualityFloor(max_drop=0.05).floor(None) is None and QualityFloor().floor(0.9) is None


# -- metrics and CLI ---------------------------------------------------------------------------


def test_metrics_show_quality_per_version_and_feedback_results(client) -> None:
    answers = predict(client)["predictions"]
    before = client.get("/metrics").get_data(as_text=True)
    feedback(client, [{"id": answers[0]["id"], "label": answers[0]["class"]}, {"id": "nope:0", "label": 0}])
    body = client.get("/metrics").get_data(as_text=True)
    assert series_value(body, 'quadra_quality_accuracy{version="1.0.0"}') == 1.0
    assert series_value(body, 'quadra_quality_labelled{version="1.0.0"}') == 1.0
    for status in ("recorded", "unknown_id"):
        series = f'quadra_feedback_labels_total{{status="{status}"}}'
        assert series_value(body, series) - series_value(before, series) == 1.0
    assert promtool_findings(body) == ""


def test_the_cli_backfills_labels_from_csv_and_reports_rejects(app, client, tmp_path: Path) -> None:
    answers = predict(client)["predictions"]
    flushed(client)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + f"{answers[0]['id']},setosa\n{answers[1]['id']},2\nnever:0,setosa\n")
    result = app.test_cli_runner().invoke(args=["monitoring", "feedback", str(labels)])
    assert result.exit_code == 1
    assert "recorded=2 relabelled=0 rejected=1" in result.stdout
    assert "line 4: never:0: unknown_id" in result.stderr
    quality = app.test_cli_runner().invoke(args=["monitoring", "quality", "--window", "hour"])
    assert quality.exit_code == 0 and '"labelled": 2' in quality.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("prediction,truth\nx,y\n")
    refused = app.test_cli_runner().invoke(args=["monitoring", "feedback", str(bad)])
    assert refused.exit_code == 1 and "columns id and label" in refused.output


def test_the_cli_recounts_what_processes_of_the_previous_schema_wrote(app, client) -> None:
    """During a rolling upgrade from schema 7, the old processes write outcomes and labels
    without counting them per minute; `flask monitoring recount` counts everything again."""
    store = app.extensions["quadra"].store
    predict(client)
    flushed(client)
    now = time.time()
    old_writes = [{"prediction_id": f"old-process:{i}", "at": now - 5, "model_version": "1.0.0",
                   "predicted_class": "setosa", "probabilities": [0.8, 0.1, 0.1], "label": "setosa"} for i in range(4)]
    with store.database.write() as conn:
        insert_encoded(conn, encode_rows(outcomes, old_writes))
    assert store.outcomes.coverage(now - 3600, now + 60)["1.0.0"] == Coverage(3, 0, 0)
    result = app.test_cli_runner().invoke(args=["monitoring", "recount"])
    minutes = audit.recent(store, action="monitoring.recount")[0]["details"]["minutes"]
    with store.database.read() as conn:
        stored = conn.execute(select(outcomes.c.at, outcomes.c.model_version)).all()
    stored_minutes = {(minute_of(at), version) for at, version in stored}
    assert result.exit_code == 0 and result.stdout.strip() == f"counted {minutes} minute(s)"
    assert minutes == len(stored_minutes)
    assert store.outcomes.coverage(now - 3600, now + 60)["1.0.0"] == Coverage(7, 4, 4)


def test_a_model_trained_elsewhere_records_its_own_predictions_for_labels(store: Store, registry: ModelVersionManager,
                                                                          tmp_path: Path) -> None:
    """The Python API: predictions made outside the service take labels by the ids given to them."""
    monitor, truth, probabilities = labelled_monitor(store, registry, tmp_path, CLASSES, 20, seed=5)
    assert monitor.quality(version="1.0.0", window="hour")["versions"][0]["accuracy"] == pytest.approx(
        float((truth == probabilities.argmax(axis=1)).mean()))
