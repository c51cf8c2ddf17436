"""Monitoring: recording, statistics, baseline, drift, alerts, retention, metrics, logs."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_settings, promtool_findings
from utils.alerts import AlertManager, WebhookRefused, check_webhook_target
from utils.cooperation import YIELD_SECONDS
from utils.model_monitoring import HealthChecker, InsufficientData, ModelMonitor
from utils.store import Store
from utils.timestamps import iso_utc
from utils.training import load_dataset

IRIS = load_dataset().features.tolist()


def shifted(rows: list[list[float]], column: int, by: float) -> list[list[float]]:
    return [[v + by if i == column else v for i, v in enumerate(row)] for row in rows]


@pytest.fixture
def monitor(store: Store, tmp_path: Path) -> ModelMonitor:
    return ModelMonitor(tmp_path / "monitoring", window_size=300, drift_threshold=2.0, store=store, baseline_min_samples=50)


def record_rows(monitor: ModelMonitor, rows: list[list[float]], confidence: float = 0.9, cls: str = "a") -> None:
    for row in rows:
        monitor.record_prediction(row, 0.002, confidence=confidence, predicted_class=cls, model_version="1.0.0")


def served_row(prediction_id: str, cls: str, confidence: float) -> dict[str, Any]:
    """One row of a served answer, as the predict route hands it to `record_batch`."""
    other = "b" if cls == "a" else "a"
    return {"id": prediction_id, "class": cls, "confidence": confidence,
            "probabilities": {cls: confidence, other: 1 - confidence}}


def test_records_are_buffered_then_flushed_exactly_once(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS[:10])
    monitor.record_prediction(None, 0.001, success=False, error="invalid_input")
    assert monitor.pending == 11 and monitor.total_predictions == 11 and monitor.error_count == 1
    assert monitor.flush() == 11 and monitor.flush() == 0
    assert monitor.total_predictions == 11 and monitor.error_count == 1
    rows = monitor.store.predictions.recent(100)
    assert len(rows) == 11 and rows[0].features == IRIS[0] and rows[-1].error == "invalid_input"


def test_flush_keeps_records_when_the_store_fails(monitor: ModelMonitor, monkeypatch: pytest.MonkeyPatch) -> None:
    record_rows(monitor, IRIS[:5])

    def broken(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(monitor.store.predictions, "insert", broken)
    assert monitor.flush() == 0 and monitor.pending == 5
    monkeypatch.undo()
    assert monitor.flush() == 5 and monitor.pending == 0


def test_statistics_match_what_was_recorded(monitor: ModelMonitor) -> None:
    for i, latency in enumerate([0.001, 0.002, 0.003, 0.004]):
        monitor.record_prediction(IRIS[i], latency, confidence=0.5 + i / 10, predicted_class="ab"[i % 2], model_version="1.0.0")
    monitor.record_prediction(None, 0.010, success=False, error="boom", model_version="1.0.0")
    stats = monitor.get_statistics()
    assert stats["total_predictions"] == 5 and stats["error_count"] == 1 and stats["error_rate"] == pytest.approx(0.2)
    assert stats["window"]["count"] == 5 and stats["class_distribution"] == {"a": 2, "b": 2}
    assert stats["latency_ms"]["max"] == pytest.approx(10.0) and stats["latency_ms"]["p50"] == pytest.approx(3.0)
    assert stats["latency_ms"]["mean"] == pytest.approx(4.0)
    assert stats["confidence"]["mean"] == pytest.approx(0.65) and stats["confidence"]["min"] == pytest.approx(0.5)
    assert sum(stats["confidence"]["histogram"]["counts"]) == 4
    assert stats["throughput_per_second"] == pytest.approx(5 / 60)
    assert stats["model_versions"] == {"1.0.0": 5}


def test_window_holds_the_latest_records_and_reset_counters_starts_a_new_one(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS * 3)
    stats = monitor.get_statistics()
    assert stats["total_predictions"] == 450 and stats["window"]["count"] == 300
    monitor.reset_counters()
    stats = monitor.get_statistics()
    assert stats["total_predictions"] == 0 and stats["window"]["count"] == 0
    record_rows(monitor, IRIS[:3])
    assert monitor.get_statistics()["window"]["count"] == 3


def test_feature_sampling_keeps_counts_exact(store: Store, tmp_path: Path) -> None:
    monitor = ModelMonitor(tmp_path, window_size=1000, store=store, feature_sample_rate=0.2)
    record_rows(monitor, IRIS * 4)
    monitor.flush()
    rows = store.predictions.recent(1000)
    with_features = sum(1 for r in rows if r.features is not None)
    assert len(rows) == 600 and monitor.total_predictions == 600
    assert 60 < with_features < 180


def record_mixed(monitor: ModelMonitor, count: int, shift: float = 0.0, unscored: bool = True) -> None:
    """`count` records: some failed, some without features, some integer rows, and (when
    `unscored`) some successful without confidence or class."""
    rng = np.random.default_rng(count)
    for i in range(count):
        row = (rng.normal(shift, 1.0, 4) if i % 5 else rng.integers(-3, 4, 4)).tolist()
        if i % 11 == 0:
            monitor.record_prediction(None, 0.004, success=False, error="boom", model_version=None)
        elif i % 13 == 0 and unscored:
            monitor.record_prediction(row, 0.002, confidence=None, predicted_class=None, model_version="2.0.0")
        else:
            kept = None if i % 7 == 0 else row
            monitor.record_prediction(kept, rng.uniform(0.001, 0.01), confidence=float(rng.uniform(0.5, 1.0)),
                                      predicted_class="abc"[i % 3], model_version="1.0.0")
    monitor.flush()


def test_prediction_window_is_recent_predictions_column_by_column(store: Store, tmp_path: Path) -> None:
    monitor = ModelMonitor(tmp_path, store=store)
    record_mixed(monitor, 1200)
    columns = ("at", "latency_ms", "confidence", "predicted_class", "success", "model_version", "features")
    for limit, after_id in ((1100, 0), (1100, 250), (5, 0), (10, 10_000)):
        rows = store.predictions.recent(limit, after_id)
        window = store.predictions.window(limit, after_id, columns)
        assert [None if text is None else json.loads(text) for text in window["features"]] == [r.features for r in rows]
        for name in columns[:-1]:
            assert window[name] == [getattr(r, name) for r in rows]
        assert all(type(value) is bool for value in window["success"])
    with pytest.raises(KeyError):
        store.predictions.window(10, 0, ("confidence; DROP TABLE predictions",))


def test_statistics_and_drift_over_a_window_larger_than_a_read_block(store: Store, tmp_path: Path) -> None:
    monitor = ModelMonitor(tmp_path, window_size=1500, store=store, baseline_min_samples=50)
    record_mixed(monitor, 1800, unscored=False)  # a baseline needs a confidence for every record
    baseline = monitor.set_baseline()
    rows = [r for r in store.predictions.recent(1500) if r.success]
    kept = [r.features for r in rows if r.features is not None]
    assert baseline["sample_count"] == len(rows)
    assert baseline["class_distribution"] == Counter(str(r.predicted_class) for r in rows)
    assert baseline["feature_means"] == pytest.approx(np.mean(kept, axis=0).tolist())
    assert store.baselines.latest().sample["features"] == kept
    monitor.reset_counters()
    record_mixed(monitor, 1700, shift=0.5)
    window = store.predictions.recent(1500)
    confidence = [r.confidence for r in window if r.success and r.confidence is not None]
    stats = monitor.get_statistics()
    assert stats["window"]["count"] == 1500 and stats["window"]["errors"] == sum(1 for r in window if not r.success)
    assert (stats["window"]["first_at"], stats["window"]["last_at"]) == (iso_utc(window[0].at), iso_utc(window[-1].at))
    assert stats["confidence"]["mean"] == pytest.approx(np.mean(confidence))
    assert stats["latency_ms"]["p95"] == pytest.approx(np.percentile([r.latency_ms for r in window], 95))
    assert stats["model_versions"] == Counter(str(r.model_version) for r in window) and "None" in stats["model_versions"]
    assert stats["class_distribution"] == Counter(str(r.predicted_class) for r in window if r.success)
    assert "None" in stats["class_distribution"]
    drift = monitor.detect_drift()
    assert drift["sample_count"] == 1500 - stats["window"]["errors"] and drift["current_mean"] == pytest.approx(np.mean(confidence))
    sizes = {name: column["current_size"] for name, column in drift["features"].items()}
    assert sizes == dict.fromkeys(baseline["feature_names"], sum(1 for r in window if r.success and r.features is not None))
    assert drift["detectors"]["input"] and not drift["detectors"]["prediction"]


def test_a_large_window_lets_the_workers_other_requests_run_while_it_is_read(store: Store, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an async worker a drift check over 100k records held the worker's other requests
    for its whole length: the window is read, and its features parsed, 500 at a time with a
    yield (utils.cooperation) after each block."""
    monitor = ModelMonitor(tmp_path, window_size=1500, store=store, baseline_min_samples=50)
    record_mixed(monitor, 1800, unscored=False)
    monitor.set_baseline()
    monitor.reset_counters()
    record_mixed(monitor, 1700, shift=0.5)
    kept = sum(1 for r in store.predictions.recent(1500) if r.success and r.features is not None)
    yields: list[float] = []
    monkeypatch.setattr(time, "sleep", yields.append)
    assert monitor.drift_report().evaluated
    assert len(yields) >= 1500 // 500 + math.ceil(kept / 500) and set(yields) == {YIELD_SECONDS}


def test_baseline_needs_enough_data(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS[:10])
    with pytest.raises(InsufficientData, match="at least 50"):
        monitor.set_baseline()
    assert monitor.baseline_metrics is None


def test_baseline_and_no_drift_on_the_same_distribution(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS * 2)
    baseline = monitor.set_baseline(["sl", "sw", "pl", "pw"], created_by="tester")
    assert baseline["sample_count"] == 300 and baseline["feature_names"] == ["sl", "sw", "pl", "pw"]
    assert monitor.baseline_metrics["created_by"] == "tester"
    monitor.reset_counters()
    record_rows(monitor, IRIS * 2)
    result = monitor.detect_drift()
    assert result["evaluated"] and not result["drift_detected"] and result["drifted_features"] == []
    assert set(result["features"]) == {"sl", "sw", "pl", "pw"} and result["features"]["pl"]["test"] == "ks"
    for field in ("drift_score", "threshold", "baseline_mean", "current_mean", "baseline_std", "current_std", "sample_count"):
        assert field in result


def test_shifted_inputs_are_detected_and_named(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS * 2)
    monitor.set_baseline(["sl", "sw", "pl", "pw"])
    monitor.reset_counters()
    record_rows(monitor, shifted(shifted(IRIS * 2, 2, 1.5), 1, 0.8))
    result = monitor.detect_drift()
    assert result["drift_detected"] and "input" in result["fired"]
    assert set(result["drifted_features"]) == {"sw", "pl"} and result["dataset_drift_share"] == pytest.approx(0.5)


def test_confidence_drift_uses_the_seed_score(monitor: ModelMonitor) -> None:
    rng = np.random.default_rng(0)
    for row, c in zip(IRIS * 2, rng.normal(0.9, 0.02, 300), strict=True):
        monitor.record_prediction(row, 0.001, confidence=float(c), predicted_class="a")
    monitor.set_baseline()
    monitor.reset_counters()
    for row, c in zip(IRIS * 2, rng.normal(0.7, 0.02, 300), strict=True):
        monitor.record_prediction(row, 0.001, confidence=float(c), predicted_class="a")
    result = monitor.detect_drift()
    expected = abs(result["current_mean"] - result["baseline_mean"]) / result["baseline_std"]
    assert result["drift_score"] == pytest.approx(expected) and result["drift_score"] > 2.0
    assert result["detectors"]["confidence"] and result["drift_detected"]


def test_prediction_drift(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS[:100], cls="a")
    record_rows(monitor, IRIS[100:], cls="b")
    monitor.set_baseline()
    monitor.reset_counters()
    record_rows(monitor, IRIS[:140], cls="b")
    record_rows(monitor, IRIS[140:], cls="a")
    result = monitor.detect_drift()
    assert result["detectors"]["prediction"] and result["prediction_drift"]["drift_detected"]


def test_drift_is_not_evaluated_without_baseline_or_data(monitor: ModelMonitor) -> None:
    result = monitor.detect_drift()
    assert not result["evaluated"] and "no baseline" in result["reason"] and not result["drift_detected"]
    record_rows(monitor, IRIS[:60])
    monitor.set_baseline()
    monitor.reset_counters()
    record_rows(monitor, IRIS[:5])
    result = monitor.detect_drift()
    assert not result["evaluated"] and "at least" in result["reason"]
    assert monitor.reset_baseline() == 1 and monitor.baseline_metrics is None


def test_drift_right_after_a_baseline_compares_only_newer_predictions(store: Store, tmp_path: Path) -> None:
    """500 reference rows, a baseline, then 200 clearly shifted rows: with a window of 1000
    the baseline's own 500 rows must not be compared with themselves and dilute the shift."""
    monitor = ModelMonitor(tmp_path, window_size=1000, store=store, baseline_min_samples=50)
    rng = np.random.default_rng(7)
    record_rows(monitor, rng.normal(0.0, 1.0, (500, 4)).tolist())
    monitor.set_baseline(["a", "b", "c", "d"])

    just_after = monitor.detect_drift()
    assert not just_after["evaluated"] and "since the baseline" in just_after["reason"]
    assert just_after["sample_count"] == just_after["window"]["count"] == 0

    record_rows(monitor, rng.normal(1.0, 1.0, (200, 4)).tolist())
    result = monitor.detect_drift()
    assert result["evaluated"] and result["drift_detected"] and set(result["drifted_features"]) == {"a", "b", "c", "d"}
    assert result["sample_count"] == result["window"]["count"] == 200
    newest = store.predictions.recent(200)
    assert (result["window"]["first_at"], result["window"]["last_at"]) == (iso_utc(newest[0].at), iso_utc(newest[-1].at))
    assert result["window"]["since_baseline_at"] == monitor.baseline_metrics["created_at"]
    assert monitor.get_statistics()["window"]["count"] == 700  # statistics still cover the whole window


def test_roll_up_keeps_totals_and_bounds_raw_records(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS[:40])
    monitor.flush()
    time.sleep(0.05)
    assert monitor.roll_up(retention_seconds=0.01) == 40
    assert monitor.store.predictions.recent(100) == []
    rollups = monitor.store.rollups.list()
    assert sum(r.count for r in rollups) == 40 and rollups[0].class_counts == {"a": 40}
    assert monitor.total_predictions == 40
    record_rows(monitor, IRIS[:10])
    monitor.flush()
    time.sleep(0.05)
    monitor.roll_up(retention_seconds=0.01)
    assert sum(r.count for r in monitor.store.rollups.list()) == 50


# -- alerts -----------------------------------------------------------------------------


def test_alert_once_per_episode_with_hysteresis_and_cooldown(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import utils.alerts

    now = [1_800_000_000.0]  # the alerts' clock, moved by the test: a slow host does not end the cooldown early
    monkeypatch.setattr(utils.alerts, "time", types.SimpleNamespace(time=lambda: now[0]))
    alerts = AlertManager(store, cooldown_seconds=60, clear_after=2)
    ids = [alerts.observe("drift", True, "drift", {}) for _ in range(5)]
    assert ids[0] is not None and ids[1:] == [None] * 4
    assert alerts.observe("drift", False, "ok", {}) is None and alerts.recent()[0]["resolved_at"] is None  # still active
    alerts.observe("drift", True, "drift", {})
    alerts.observe("drift", False, "ok", {})
    alerts.observe("drift", False, "ok", {})
    assert alerts.recent()[0]["resolved_at"] is not None
    assert alerts.observe("drift", True, "again", {}) is None  # inside the cooldown: episode, no new record
    for _ in range(2):
        alerts.observe("drift", False, "ok", {})
    now[0] += 60
    assert alerts.observe("drift", True, "later", {}) is not None
    assert [a["message"] for a in alerts.recent()] == ["later", "drift"]


def test_one_off_alerts_respect_the_cooldown(store: Store) -> None:
    alerts = AlertManager(store, cooldown_seconds=60)
    assert alerts.raise_alert("health", "model failed", {}) is not None
    assert alerts.raise_alert("health", "model failed", {}) is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://169.254.169.254/latest", "http://10.1.2.3/x",
                                 "http://192.168.0.1/", "http://[::1]/", "ftp://example.com/", "http://0.0.0.0/"])
def test_webhook_targets_on_internal_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_webhook_target(url)


def test_webhook_receives_alerts_when_private_targets_are_allowed(store: Store) -> None:
    import http.server
    import threading

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        AlertManager(store, url, allow_private=True).raise_alert("health", "down", {"x": 1})
        refused = AlertManager(store, url, allow_private=False, cooldown_seconds=0)
        refused.raise_alert("other", "not sent", {})
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert [r["message"] for r in received] == ["down"] and received[0]["kind"] == "health"
    finally:
        server.shutdown()


class _HookServer:
    """A local HTTP server recording what webhooks POST to it (path, Host header, body)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.received: list[tuple[str, str, dict]] = []
        received = self.received

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, self.headers["Host"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_webhook_connects_to_the_address_it_checked_not_a_rebound_one(
        store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """DNS rebinding: the first answer is a public address, every later one the loopback where
    an internal service listens. The alert's POST must go to the checked public address
    (which fails on this closed network), never to the internal one, after one resolution.

    Resolution is faked (a DNS server that changes its answer cannot run here); the alert
    path, the connection attempt and the internal HTTP server are real."""
    import socket

    internal = _HookServer()
    real_getaddrinfo = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "hooks.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers.append("public" if not answers else "internal")
        address = "93.184.216.34" if answers[-1] == "public" else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with caplog.at_level("INFO", logger="quadra.monitoring"):
            AlertManager(store, f"http://hooks.rebind.test:{internal.port}/hook").raise_alert("health", "down", {})
            deadline = time.monotonic() + 30
            while not any("webhook" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
        outcome = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
        assert outcome and "not sent" in outcome[0], outcome
        assert answers == ["public"] and internal.received == []
    finally:
        internal.close()


def test_webhook_sends_the_url_host_and_path_to_the_checked_address() -> None:
    from utils.alerts import send_webhook

    hook = _HookServer()
    try:
        assert send_webhook(f"http://localhost:{hook.port}/alerts?team=ml", {"message": "up"}, allow_private=True) == 204
        assert hook.received == [("/alerts?team=ml", f"localhost:{hook.port}", {"message": "up"})]
        with pytest.raises(WebhookRefused, match="internal address"):
            send_webhook(f"http://localhost:{hook.port}/alerts", {"message": "no"})
        assert len(hook.received) == 1
    finally:
        hook.close()


# -- health checker ---------------------------------------------------------------------


def test_seed_health_checker(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert HealthChecker(models).check_health()["status"] == "unhealthy"
    models.mkdir()
    (models / "model_registry.json").write_text("{}")
    report = HealthChecker(models, ["model_registry.json"]).check_health()
    assert report["status"] == "healthy" and report["checks"]["required_files"] == {"model_registry.json": True}
    assert HealthChecker(models, min_free_bytes=10**18).check_health()["status"] == "unhealthy"
    (models / "model_registry.json").write_text("{broken")
    assert HealthChecker(models).check_health()["checks"]["registry_readable"] is False


# -- over HTTP --------------------------------------------------------------------------


def predict_all(client, rows: list[list[float]]) -> None:
    for start in range(0, len(rows), 50):
        assert client.post("/api/predict", json={"inputs": rows[start:start + 50]}).status_code == 200


def test_predictions_over_http_are_recorded_and_public_stats(app, client, anonymous) -> None:
    predict_all(client, IRIS)
    client.post("/api/predict", json={"inputs": [[1, 2]]})
    stats = anonymous.get("/api/monitoring/stats").get_json()
    assert stats["total_predictions"] == 151 and stats["error_count"] == 1
    distribution = stats["class_distribution"]
    assert set(distribution) == {"setosa", "versicolor", "virginica"} and sum(distribution.values()) == 150
    assert distribution["setosa"] == 50
    assert stats["model_versions"] == {"1.0.0": 151}
    errors = [r for r in app.extensions["quadra"].store.predictions.recent(1000) if not r.success]
    assert [e.error for e in errors] == ["invalid_input"]


def test_baseline_and_drift_over_http(state_dir: Path, api_keys) -> None:
    from app import create_app, start_serving

    app = create_app(make_settings(state_dir, monitoring_window=300, baseline_min_samples=100, max_requests=100000))
    start_serving(app)
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = api_keys["admin"]
    conflict = client.post("/api/monitoring/baseline")
    assert conflict.status_code == 409 and conflict.get_json()["error"]["code"] == "insufficient_data"
    predict_all(client, IRIS * 2)
    assert client.post("/api/monitoring/baseline", headers={"X-API-Key": api_keys["read"]}).status_code == 403
    created = client.post("/api/monitoring/baseline")
    assert created.status_code == 201 and created.get_json()["feature_names"][2] == "petal_length_cm"
    predict_all(client, IRIS * 2)
    assert client.get("/api/monitoring/drift").get_json()["drift_detected"] is False
    predict_all(client, shifted(IRIS * 2, 2, 2.0))
    drift = app.test_client().get("/api/monitoring/drift").get_json()
    assert drift["drift_detected"] and "petal_length_cm" in drift["drifted_features"]
    assert "sepal_width_cm" not in drift["drifted_features"]
    assert client.delete("/api/monitoring/baseline").get_json() == {"removed": 1}
    assert client.post("/api/monitoring/baseline", json={"x": 1}).status_code == 400
    app.extensions["quadra"].store.database.dispose()


def test_alerts_endpoint_and_metrics(client, anonymous, app) -> None:
    app.extensions["quadra"].alerts.raise_alert("health", "test alert", {})
    alerts = anonymous.get("/api/monitoring/alerts").get_json()["alerts"]
    assert alerts[0]["message"] == "test alert"
    assert anonymous.get("/api/monitoring/alerts?limit=0").status_code == 400
    predict_all(client, IRIS[:20])
    client.get("/api/model/versions", headers={"X-API-Key": "bad"})
    app.extensions["quadra"].monitor.flush()
    body = anonymous.get("/metrics").get_data(as_text=True)
    assert 'quadra_http_requests_total{endpoint="predict.predict",method="POST",status="200"}' in body
    assert "quadra_predictions_total 20.0" in body
    assert 'quadra_model_info{production_version="1.0.0",serving_version="1.0.0"} 1.0' in body
    assert 'quadra_mode{mode="inference"} 1.0' in body
    assert "quadra_auth_failures_total" in body and "quadra_http_request_duration_seconds_bucket" in body
    assert "# TYPE quadra_predictions_total counter" in body
    assert promtool_findings(body) == ""


def series_value(body: str, series: str) -> float:
    return next((float(line.split()[-1]) for line in body.splitlines() if line.startswith(series + " ")), 0.0)


def test_the_checklists_success_metrics_are_exposed(client, anonymous, app, api_keys: dict[str, str]) -> None:
    """Version count, model size, load/save time, confidence distribution, drift episodes, token
    expirations, key usage by key id (never the key), uptime, storage and memory."""
    import jwt

    services = app.extensions["quadra"]
    before = anonymous.get("/metrics").get_data(as_text=True)
    predict_all(client, IRIS[:20])
    assert client.post("/api/model/save", json={"version": "1.0.1"}).status_code == 201
    assert client.post("/api/model/load/1.0.1").status_code == 200
    expired = jwt.encode({"sub": "ops", "name": "ops", "perms": ["read"], "iat": 1, "exp": 2, "iss": "quadra",
                          "aud": "quadra-api", "jti": "x"}, services.auth.secret_key, algorithm="HS256")
    assert anonymous.get("/api/model/versions", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    services.alerts.observe("drift", True, "drift detected by input", {})
    services.monitor.flush()
    body = anonymous.get("/metrics").get_data(as_text=True)
    delta = lambda series: series_value(body, series) - series_value(before, series)  # noqa: E731
    assert series_value(body, 'quadra_model_versions{archived="false"}') == 2.0
    assert series_value(body, 'quadra_model_size_bytes{version="1.0.1"}') > 1000
    assert delta("quadra_model_save_seconds_count") == 1.0 and delta("quadra_model_load_seconds_count") >= 1.0
    assert series_value(body, 'quadra_prediction_confidence_bucket{le="+Inf"}') == 20.0
    assert series_value(body, "quadra_prediction_confidence_count") == 20.0
    assert delta("quadra_token_expirations_total") == 1.0
    assert series_value(body, 'quadra_alert_episodes_total{kind="drift"}') == 1.0
    admin_key_id = services.auth.authenticate_key(api_keys["admin"]).id
    assert delta(f'quadra_api_key_requests_total{{key_id="{admin_key_id}"}}') == 3.0  # predict, save, load
    assert not any(key in body for key in api_keys.values())
    assert series_value(body, "quadra_worker_start_time_seconds") <= time.time()
    assert series_value(body, "quadra_worker_resident_memory_bytes") > 10_000_000
    assert series_value(body, 'quadra_storage_bytes{part="database"}') > 0
    assert series_value(body, 'quadra_storage_bytes{part="artifacts"}') > 2000
    assert promtool_findings(body) == ""


def test_logs_are_json_lines_under_the_monitoring_folder(app, client) -> None:
    client.post("/api/monitoring/baseline")
    import logging

    logging.getLogger("quadra.monitoring").warning("probe line")
    folder = app.extensions["quadra"].settings.monitoring_dir
    lines = [json.loads(line) for line in (folder / "monitoring.log").read_text().splitlines()]
    assert any(entry["message"] == "probe line" and entry["level"] == "WARNING" for entry in lines)
    assert (folder / "quadra.log").exists()


def test_cli_baseline_commands(app, client) -> None:
    runner = app.test_cli_runner()
    assert "at least" in runner.invoke(args=["monitoring", "baseline", "set"]).output
    predict_all(client, IRIS)
    assert runner.invoke(args=["monitoring", "baseline", "set"]).exit_code == 0
    assert "confidence_mean" in runner.invoke(args=["monitoring", "baseline", "show"]).output
    assert "drift_detected" in runner.invoke(args=["monitoring", "drift"]).output
    assert "total_predictions" in runner.invoke(args=["monitoring", "stats"]).output
    assert runner.invoke(args=["monitoring", "baseline", "reset"]).output.strip() == "removed 1 baseline(s)"


# -- the journal ------------------------------------------------------------------------


def test_journal_survives_a_killed_process_and_replays_exactly_once(store: Store, tmp_path: Path) -> None:
    import socket

    from utils.journal import SEPARATOR, RecordJournal

    folder = tmp_path / "journal"
    monitor = ModelMonitor(tmp_path, store=store, journal=RecordJournal(folder))
    record_rows(monitor, IRIS[:5])
    assert monitor.flush() == 5 and list(folder.glob("*.pending")) == []
    record_rows(monitor, IRIS[:3])  # acknowledged, journalled, not yet flushed
    journal_file = next(folder.glob("*.jsonl"))
    lines = journal_file.read_text().splitlines()
    assert len(lines) == 3
    dead_owner = SEPARATOR.join((socket.gethostname(), "4194000", "1"))  # a pid above pid_max: never alive
    (folder / f"{dead_owner}.jsonl").write_text("\n".join(lines) + '\n{"torn": ')
    (folder / f"{dead_owner}.1.pending").write_text("\n".join(lines[:1]) + "\n")
    (folder / f"otherhost{SEPARATOR}1{SEPARATOR}1.jsonl").write_text(lines[0] + "\n")
    replay = ModelMonitor(tmp_path, store=store, journal=RecordJournal(folder))
    assert replay.recover_journals() == 3
    assert monitor.flush() == 0  # the same records, already replayed: not counted twice
    assert replay.total_predictions == 8 and len(store.predictions.recent(100)) == 8
    assert not (folder / f"{dead_owner}.jsonl").exists() and (folder / f"otherhost{SEPARATOR}1{SEPARATOR}1.jsonl").exists()


def test_a_requests_rows_are_one_journal_line_and_replay_as_rows_with_their_ids(store: Store, tmp_path: Path) -> None:
    import socket

    from utils.journal import SEPARATOR, RecordJournal

    folder = tmp_path / "journal"
    monitor = ModelMonitor(tmp_path, store=store, journal=RecordJournal(folder))
    results = [served_row(f"r1:{i}", "ab"[i % 2], 0.5 + i / 100) for i in range(32)]
    monitor.record_batch(IRIS[:32], results, 0.004, "1.0.0")
    monitor.record_failure("invalid_input", 0.001, "1.0.0")
    assert monitor.pending == 33 and monitor.error_count == 1
    lines = next(folder.glob("*.jsonl")).read_text().splitlines()
    assert len(lines) == 2
    dead_owner = SEPARATOR.join((socket.gethostname(), "4194001", "1"))
    legacy_record = {"at": time.time(), "model_version": "0.9.0", "latency_ms": 1.0, "confidence": 0.7, "predicted_class": "a",
                     "success": True, "error": None, "features": IRIS[0], "record_id": f"{dead_owner}{SEPARATOR}legacy"}
    (folder / f"{dead_owner}.jsonl").write_text("\n".join(lines) + "\n" + json.dumps(legacy_record) + "\n")
    replay = ModelMonitor(tmp_path, store=store, journal=RecordJournal(folder))
    assert replay.recover_journals() == 34  # the killed process's 33 records (same ids) and one of an older release
    assert monitor.flush() == 0  # already replayed under the same ids: not counted twice
    stored = store.predictions.recent(100)
    assert [r.confidence for r in stored[:32]] == [r["confidence"] for r in results]
    assert [r.features for r in stored[:32]] == IRIS[:32] and stored[32].error == "invalid_input"
    assert len({r.record_id for r in stored}) == 34 and replay.total_predictions == 34
    kept = store.outcomes.find(f"r1:{i}" for i in range(33))
    assert sorted(kept) == sorted(f"r1:{i}" for i in range(32))  # the rows' ids, for labels; no failure


def test_a_buffered_backlog_leaves_the_garbage_collectors_view(monitor: ModelMonitor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A saturated worker buffered tens of thousands of rows between flushes; each full
    collection walked every one of them (100-250 ms stalls of the worker's loop). Buffered
    requests cost the collector one object each, whatever their row count, and keep their
    values exactly."""
    import gc

    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "FLUSH_AHEAD", 10_000)

    rows = [list(row) for row in IRIS[:32]]
    for i in range(200):
        monitor.record_batch(rows, [served_row(f"r{i}:{j}", "ab"[j % 2], 0.75) for j in range(32)], 0.001, "1.0.0")
    gc.collect()
    assert monitor.pending == 6400
    assert tracked_by_buffered_records() < 2 * 200  # about one object a request; a list per row and more (7,600) before
    assert monitor.flush() == 6400
    stored = monitor.store.predictions.recent(32)
    assert [r.features for r in stored] == IRIS[:32] and stored[0].confidence == 0.75


def tracked_by_buffered_records() -> int:
    """How many objects the garbage collector walks for the buffered requests' records."""
    import gc

    from utils.journal import RecordBatch

    seen: set[int] = set()
    stack = [item for item in gc.get_objects() if type(item) is RecordBatch]
    while stack:
        item = stack.pop()
        if id(item) not in seen and gc.is_tracked(item) and not isinstance(item, type):  # not the class's world
            seen.add(id(item))
            stack.extend(gc.get_referents(item))
    return len(seen)


def test_a_baseline_ignores_records_without_a_confidence(monitor: ModelMonitor) -> None:
    record_rows(monitor, IRIS[:60], confidence=0.8)
    for row in IRIS[60:70]:
        monitor.record_prediction(row, 0.002, confidence=None, predicted_class="a", model_version="1.0.0")
    baseline = monitor.set_baseline()
    assert baseline["confidence_mean"] == pytest.approx(0.8) and baseline["sample_count"] == 70


def test_a_baseline_needs_some_confidence(monitor: ModelMonitor) -> None:
    for row in IRIS[:60]:
        monitor.record_prediction(row, 0.002, confidence=None, predicted_class="a", model_version="1.0.0")
    with pytest.raises(InsufficientData, match="confidence"):
        monitor.set_baseline()


def test_a_full_buffer_drops_the_oldest_requests_and_says_so(monitor: ModelMonitor, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "MAX_BUFFERED", 10)  # the store unreachable for a long time
    counted_before = REGISTRY.get_sample_value("quadra_monitoring_dropped_records_total")
    for i in range(3):
        monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"r{i}:{j}", "a", 0.9) for j in range(4)], 0.001,
                             "1.0.0")
    assert monitor.pending == 8 and monitor.dropped == 4
    assert REGISTRY.get_sample_value("quadra_monitoring_dropped_records_total") == counted_before + 4
    assert monitor.flush() == 8 and monitor.get_statistics()["dropped_records"] == 4
    assert [r.features for r in monitor.store.predictions.recent(10)] == IRIS[4:12]


def test_requests_that_outrun_the_store_wait_for_it_instead_of_dropping(monitor: ModelMonitor,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "FLUSH_AHEAD", 10)  # no background flush: the requests outrun it
    for i in range(5):
        monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"r{i}:{j}", "a", 0.9) for j in range(4)], 0.001, "1.0.0")
    assert monitor.dropped == 0 and monitor.pending == 8  # the third request wrote all 12
    assert monitor.flush() == 8 and [r.features for r in monitor.store.predictions.recent(20)] == IRIS[:20]


def test_a_request_over_the_mark_writes_the_oldest_group_not_the_whole_backlog(monitor: ModelMonitor,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for a whole backlog (several transactions, each queued behind the other workers'
    on SQLite's writer lock) made the requests that crossed the mark the tail of a saturated
    worker; each now writes about one transaction's worth."""
    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "FLUSH_AHEAD", 10)
    monkeypatch.setattr(utils.record_buffer, "MAX_FLUSH_BATCH", 8)
    for i in range(3):
        monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"r{i}:{j}", "a", 0.9) for j in range(4)], 0.001, "1.0.0")
    assert monitor.pending == 4 and monitor.dropped == 0  # the third request wrote the two oldest requests' 8
    assert [r.features for r in monitor.store.predictions.recent(20)] == IRIS[:8]
    assert monitor.flush() == 4 and [r.features for r in monitor.store.predictions.recent(20)] == IRIS[:12]


def gated_inserts(monitor: ModelMonitor, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Make the store's inserts wait, one group each, for `gate.release()`; `entered` is set
    when the first one starts."""
    import threading

    insert, gate, entered = monitor.store.predictions.insert, threading.Semaphore(0), threading.Event()

    def gated(records):
        entered.set()
        assert gate.acquire(timeout=10)
        return insert(records)

    monkeypatch.setattr(monitor.store.predictions, "insert", gated)
    return gate, entered


def parked_on_the_next_group(monitor: ModelMonitor) -> bool:
    """A request is waiting on the buffer's condition (not spinning, not on a lock)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if monitor.buffer._group_written._waiters:  # type: ignore[attr-defined]  # threading.Condition's own list
            return True
        time.sleep(0.01)
    return False


def request_rows(monitor: ModelMonitor, i: int) -> None:
    monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"r{i}:{j}", "a", 0.9) for j in range(4)], 0.001, "1.0.0")


def test_a_request_waiting_for_another_write_goes_on_once_that_write_ends(monitor: ModelMonitor,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "FLUSH_AHEAD", 4)
    monkeypatch.setattr(utils.record_buffer, "MAX_FLUSH_BATCH", 4)
    gate, entered = gated_inserts(monitor, monkeypatch)
    request_rows(monitor, 0)
    writer = threading.Thread(target=request_rows, args=(monitor, 1), daemon=True)
    writer.start()
    assert entered.wait(10)  # the second request writes the oldest 4, and its insert waits
    waiter = threading.Thread(target=request_rows, args=(monitor, 2), daemon=True)
    waiter.start()
    assert parked_on_the_next_group(monitor) and monitor.pending == 12
    gate.release(10)
    writer.join(10)
    waiter.join(10)
    assert not writer.is_alive() and not waiter.is_alive()
    assert monitor.pending <= 4 and monitor.dropped == 0  # one group a time, until the mark is not passed
    monitor.flush()
    assert sorted(r.features for r in monitor.store.predictions.recent(20)) == sorted(IRIS[:12])


def test_a_write_interrupted_by_its_thread_ending_gives_its_records_back(monitor: ModelMonitor,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only a store error: a green thread killed mid-write (GreenletExit is a BaseException)
    must not take its records with it, nor leave them counted as in flight."""

    class ThreadEnded(BaseException):
        pass

    insert = monitor.store.predictions.insert

    def ended(records):
        raise ThreadEnded

    for i in range(3):
        request_rows(monitor, i)
    monkeypatch.setattr(monitor.store.predictions, "insert", ended)
    with pytest.raises(ThreadEnded):
        monitor.flush()
    assert monitor.pending == 12 and monitor.buffer.pending_errors == 0
    monkeypatch.setattr(monitor.store.predictions, "insert", insert)
    assert monitor.flush() == 12 and monitor.pending == 0
    assert [r.features for r in monitor.store.predictions.recent(20)] == IRIS[:12]


def test_failed_predictions_being_written_still_count_as_errors(monitor: ModelMonitor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    for _ in range(3):
        monitor.record_failure("invalid_input", 0.001, "1.0.0")
    request_rows(monitor, 0)
    gate, entered = gated_inserts(monitor, monkeypatch)
    flusher = threading.Thread(target=monitor.flush, daemon=True)
    flusher.start()
    assert entered.wait(10)  # every record taken by the write, none stored yet
    assert monitor.pending == 7 and monitor.error_count == 3
    gate.release()
    flusher.join(10)
    assert not flusher.is_alive() and monitor.pending == 0 and monitor.error_count == 3


def test_while_the_store_is_unreachable_requests_do_not_wait_for_it(monitor: ModelMonitor,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.record_buffer

    monkeypatch.setattr(utils.record_buffer, "FLUSH_AHEAD", 10)
    writes, store_down, insert = [], [True], monitor.store.predictions.insert

    def unreachable(records):
        writes.append(len(records))
        if store_down[0]:
            raise RuntimeError("database down")
        return insert(records)

    monkeypatch.setattr(monitor.store.predictions, "insert", unreachable)
    for i in range(6):
        monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"r{i}:{j}", "a", 0.9) for j in range(4)], 0.001, "1.0.0")
    assert writes == [12] and monitor.pending == 24  # one try, then the requests go on; the records stay buffered
    store_down[0] = False
    assert monitor.flush() == 24 and monitor.dropped == 0
    for i in range(3):  # the store is back: requests that outrun it wait for it again
        monitor.record_batch(IRIS[4 * i:4 * i + 4], [served_row(f"s{i}:{j}", "a", 0.9) for j in range(4)], 0.001, "1.0.0")
    assert monitor.pending == 0 and writes[-1] == 12 and monitor.store.predictions.totals().count == 36


def test_journal_keeps_records_through_a_failed_flush(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.journal import RecordJournal

    monitor = ModelMonitor(tmp_path, store=store, journal=RecordJournal(tmp_path / "journal"))
    record_rows(monitor, IRIS[:4])

    def broken(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(store.predictions, "insert", broken)
    assert monitor.flush() == 0 and monitor.pending == 4
    assert len(list((tmp_path / "journal").glob("*.pending"))) == 1
    monkeypatch.undo()
    record_rows(monitor, IRIS[:2])
    assert monitor.flush() == 6
    assert list((tmp_path / "journal").glob("*.pending")) == [] and monitor.total_predictions == 6
