"""The Python API as a library: the checklist's snippets run as written, the folder rule, and
the behaviour the snippets' users expect.

The snippets run as scripts in a fresh folder (their working directory) whose service state
folder is QUADRA_STATE_DIR, next to a real `python app.py` on that state folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

import utils.config
from tests.conftest import ROOT, make_settings
from utils.model_modes import InferenceGuard, ModelMode, ModelModeManager, TrainingGuard
from utils.model_monitoring import HealthChecker, InsufficientData, ModelMonitor
from utils.model_versioning import ModelVersionManager, VersionMetadata
from utils.security import AuthManager, RateLimiter, SecretsManager
from utils.serving import build_model

CONFIG = {"architecture": "mlp", "input_dim": 4, "num_classes": 3, "hidden_dims": [8]}

SNIPPET_SETUP = '''
from utils.model_versioning import ModelVersionManager
from utils.model_monitoring import ModelMonitor
from utils.security import AuthManager, secrets_manager

# Initialize version manager
version_manager = ModelVersionManager('./dashboard_state/models')

# Initialize monitoring
monitor = ModelMonitor('./dashboard_state/monitoring')

# Set up authentication
auth = AuthManager(
    secret_key=secrets_manager.get_secret('secret_key'),
    enabled=True
)

# Register admin API key
admin_key = secrets_manager.generate_api_key()
auth.register_api_key(
    api_key=admin_key,
    name="Admin Key",
    permissions=['admin']
)
print(f"Admin API Key: {admin_key}")
'''

SNIPPET_TEST_KEY = '''python -c "
from utils.security import AuthManager, secrets_manager
auth = AuthManager(secrets_manager.get_secret('secret_key'), enabled=True)
key = 'your-test-key'
auth.register_api_key(key, 'Test', ['read'])
print(auth.verify_api_key(key))
"
'''

SNIPPET_BASELINE = '''
from utils.model_monitoring import ModelMonitor
monitor = ModelMonitor('./monitoring')
monitor.reset_counters()
# Collect new data...
monitor.set_baseline()
'''
COLLECT_NEW_DATA = '''for i in range(120):
    monitor.record_prediction([5.1, 3.5, 1.4, 0.2 + i / 100], prediction_time=0.004, confidence=0.97, predicted_class="setosa")
'''

SNIPPET_RECOVERY = '''
version_manager.load_model(model, "1.0.0", verify_integrity=False)
version_manager.save_model(model, "1.0.0-recovered", ...)
'''
USUAL_ARGUMENTS = 'config=version_manager.registry["1.0.0"].config, description="recovered from 1.0.0"'

SNIPPET_RATE_LIMITER = '''
from utils.security import rate_limiter
print(f"Remaining: {rate_limiter.get_remaining()}")
print(f"Reset in: {rate_limiter.get_reset_time()}")
'''


@pytest.fixture
def fresh(state_dir: Path, tmp_path: Path, start_server):
    """A fresh working folder whose ./dashboard_state is the state folder of a running server."""
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.move(str(state_dir), folder / "dashboard_state")
    server = start_server(folder / "dashboard_state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
    env.update({"QUADRA_STATE_DIR": str(folder / "dashboard_state"), "PYTHONPATH": str(ROOT),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return folder, env, server


def run_python(code: str, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result


def test_the_setup_snippet_registers_a_key_that_works_against_the_running_service(fresh) -> None:
    folder, env, server = fresh
    printed = run_python(SNIPPET_SETUP, folder, env).stdout
    admin_key = re.fullmatch(r"Admin API Key: (qk_\S+)\n", printed).group(1)
    keys = requests.get(f"{server.url}/api/auth/keys", headers={"X-API-Key": admin_key}, timeout=30)
    assert keys.status_code == 200 and "Admin Key" in [k["name"] for k in keys.json()["keys"]]
    assert not (folder / "dashboard_state" / "models" / "quadra.db").exists()  # the service's folder: its store


def test_the_short_test_key_snippet_works_in_development_with_a_warning(fresh) -> None:
    folder, env, server = fresh
    result = subprocess.run(["bash", "-c", SNIPPET_TEST_KEY], cwd=folder, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{") and "'name': 'Test'" in result.stdout and "'permissions': ['read']" in result.stdout
    assert "shorter than 24 characters" in result.stderr
    response = requests.get(f"{server.url}/api/model/versions", headers={"X-API-Key": "your-test-key"}, timeout=30)
    assert response.status_code == 200


def test_the_baseline_snippet_keeps_its_monitor_in_its_own_folder(fresh) -> None:
    folder, env, server = fresh
    run_python(SNIPPET_BASELINE.replace("# Collect new data...\n", COLLECT_NEW_DATA), folder, env)
    assert (folder / "monitoring" / "quadra.db").exists()
    assert requests.get(f"{server.url}/api/monitoring/drift", timeout=30).json()["baseline"] is None  # the service's is untouched


def test_the_recovery_snippet_saves_a_version_the_service_lists(fresh) -> None:
    folder, env, server = fresh
    model = 'from utils.serving import build_model\nmodel = build_model(version_manager.registry["1.0.0"].config)\n'
    recovery = SNIPPET_RECOVERY.replace("...", USUAL_ARGUMENTS)
    run_python(SNIPPET_SETUP + model + recovery, folder, env)
    row = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    original = without_ids(server.post("/api/predict", json=row).json()["predictions"])
    assert server.post("/api/model/load/1.0.0-recovered").status_code == 200  # hash-checked by the service
    for _ in range(100):
        answer = server.post("/api/predict", json=row).json()
        if answer["model_version"] == "1.0.0-recovered":
            break
    assert answer["model_version"] == "1.0.0-recovered" and without_ids(answer["predictions"]) == original


def without_ids(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in prediction.items() if key != "id"} for prediction in predictions]


def test_the_rate_limiter_snippet_reports_this_callers_window(fresh) -> None:
    folder, env, _ = fresh
    printed = run_python(SNIPPET_RATE_LIMITER, folder, env).stdout
    remaining, reset = re.fullmatch(r"Remaining: (\d+)\nReset in: (\S+)\n", printed).groups()
    assert int(remaining) == 100 and 0.0 <= float(reset) <= 60.0


# -- the folder rule ----------------------------------------------------------------------


@pytest.fixture
def service_settings(state_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The QUADRA_* settings a console would read, on a private state folder."""
    settings = make_settings(state_dir)
    monkeypatch.setattr(utils.config, "_current", settings)
    return settings


def test_registries_in_two_folders_are_independent_and_the_services_folder_is_shared(service_settings, tmp_path: Path) -> None:
    first, second = ModelVersionManager(tmp_path / "a"), ModelVersionManager(tmp_path / "b")
    assert first.registry == {} and first.get_latest_version() is None
    saved = first.save_model(build_model(CONFIG), "2.0.0", config=CONFIG)
    assert isinstance(saved, VersionMetadata) and list(first.registry) == ["2.0.0"] and second.registry == {}
    assert (tmp_path / "a" / "quadra.db").exists() and Path(saved.file_path).is_relative_to(tmp_path / "a")
    service = ModelVersionManager(service_settings.models_dir)
    assert list(service.registry) == ["1.0.0"] and list(ModelVersionManager().registry) == ["1.0.0"]
    assert service.store is ModelVersionManager().store


def test_monitors_follow_the_folder_rule_and_take_omitted_values_from_the_settings(
        state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(state_dir, drift_threshold=3.5, monitoring_window=250, baseline_min_samples=20)
    monkeypatch.setattr(utils.config, "_current", settings)
    console = ModelMonitor()
    assert (console.drift_threshold, console.window_size, console.baseline_min_samples) == (3.5, 250, 20)
    own = ModelMonitor(tmp_path / "monitoring")
    own.record_prediction([1.0, 2.0, 3.0, 4.0], 0.01, confidence=0.9, predicted_class="a")
    assert own.get_statistics()["total_predictions"] == 1 and console.get_statistics()["total_predictions"] == 0
    assert ModelMonitor(settings.monitoring_dir).store is console.store


def test_a_mode_manager_built_directly_is_process_local(service_settings) -> None:
    from utils.model_modes import mode_manager

    mode_manager.enter_training_mode("shared")
    try:
        local = ModelModeManager(initial_mode=ModelMode.INFERENCE)
        assert local.mode is ModelMode.INFERENCE and not local.shared and mode_manager.shared
        local.enter_maintenance_mode("only here")
        assert local.is_maintenance_mode() and mode_manager.is_training_mode()
    finally:
        mode_manager.enter_inference_mode("back")


# -- what the snippets' users expect ------------------------------------------------------


def test_entering_the_current_mode_changes_nothing_and_callbacks_take_either_form(caplog: pytest.LogCaptureFixture) -> None:
    manager = ModelModeManager(ModelMode.INFERENCE)
    calls: list[object] = []
    manager.register_callback(ModelMode.TRAINING, lambda old, new: calls.append((old, new)))
    manager.register_callback(ModelMode.TRAINING, lambda: calls.append("no arguments"))
    with caplog.at_level("INFO", logger="quadra.modes"):
        before = manager.state()
        assert manager.enter_inference_mode()["changed_at"] == before["changed_at"]
    assert "Already in inference mode" in caplog.text and calls == []
    manager.enter_training_mode()
    assert calls == [(ModelMode.INFERENCE, ModelMode.TRAINING), "no arguments"]
    with pytest.raises(RuntimeError, match="^Cannot perform inference in maintenance mode$"):
        manager.enter_maintenance_mode()
        with InferenceGuard(manager):
            pass
    manager.enter_inference_mode()
    with pytest.raises(RuntimeError, match="^Cannot perform training in inference mode$"):
        with TrainingGuard(manager):
            pass


def test_auth_manager_keys_tokens_and_short_keys(service_settings, caplog: pytest.LogCaptureFixture) -> None:
    secret = SecretsManager().get_secret("secret_key")
    auth = AuthManager(secret, enabled=True)
    record = auth.register_api_key(name="Named", permissions=["write"])
    assert record["name"] == "Named" and auth.verify_api_key(record["api_key"])
    assert not auth.verify_api_key("qk_" + "unknown")
    with caplog.at_level("WARNING", logger="quadra.security"):
        auth.register_api_key("short-key", "Short", ["read"])
    assert "shorter than 24 characters" in caplog.text and auth.verify_api_key("short-key")
    production = AuthManager(secret, store=auth.store, production=True)
    with pytest.raises(ValueError, match="at least 24 characters in production"):
        production.register_api_key("another-short-key", "Short")
    payload = auth.verify_token(auth.generate_token("alice", "admin"))
    assert payload["user_id"] == "alice" and payload["role"] == "admin"


def test_rate_limiter_without_an_identifier_counts_for_the_console(service_settings) -> None:
    limiter = RateLimiter(max_requests=3, window_seconds=60)
    assert limiter.get_remaining() == 3
    assert [limiter.is_allowed() for _ in range(4)] == [True, True, True, False]
    assert limiter.get_remaining() == 0 and 0 < limiter.get_reset_time() <= 60


def test_monitor_records_any_input_and_reports_the_seed_statistics(tmp_path: Path, service_settings) -> None:
    monitor = ModelMonitor(tmp_path / "monitoring", baseline_min_samples=10)
    inputs = [[5.1, 3.5, 1.4, 0.2], (1, 2, 3, 4), np.array([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]),
              {"text": "hello"}, "a sentence", None, 7, [[1.0, 2.0]], [1.0, float("nan"), 2.0, 3.0], [True, False]]
    for index, data in enumerate(inputs):
        monitor.record_prediction(data, 0.001 * (index + 1), confidence=np.float32(0.5 + index / 40), predicted_class=index % 3)
    assert monitor.flush() == len(inputs)
    features = [row.features for row in monitor.store.predictions.recent(100) if row.features is not None]
    assert features == [[5.1, 3.5, 1.4, 0.2], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]
    stats = monitor.get_statistics()
    assert stats["total_predictions"] == len(inputs)
    for block in ("prediction_time", "confidence"):
        assert {"mean", "std", "p50", "p95", "p99"} <= set(stats[block])
    assert stats["prediction_time"]["mean"] == pytest.approx(np.mean([0.001 * (i + 1) for i in range(len(inputs))]))
    assert isinstance(monitor.prediction_times, tuple) and len(monitor.prediction_times) == len(inputs)
    assert monitor.confidences[0] == pytest.approx(0.5) and isinstance(monitor.confidences, tuple)
    with pytest.raises(InsufficientData, match="at least 10"):
        ModelMonitor(tmp_path / "empty", baseline_min_samples=10).set_baseline()


def test_health_checker_reports_the_seed_fields(tmp_path: Path) -> None:
    report = HealthChecker(tmp_path / "missing", ["model_registry.json"]).check_health()
    assert report["healthy"] is False and report["model_dir_exists"] is False
    assert report["required_files"] == {"model_registry.json": False}
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_registry.json").write_text(json.dumps({}))
    report = HealthChecker(tmp_path / "models", ["model_registry.json"]).check_health()
    assert report["healthy"] is True and report["required_files"] == {"model_registry.json": True}


def test_constructors_start_no_thread_and_register_no_exit_hook(tmp_path: Path, service_settings) -> None:
    script = textwrap.dedent(f"""
        import atexit, threading
        from utils.model_monitoring import ModelMonitor
        from utils.model_versioning import ModelVersionManager
        from utils.model_modes import ModelModeManager
        from utils.security import RateLimiter
        before = threading.active_count()
        monitor = ModelMonitor({str(tmp_path / 'monitoring')!r})
        monitor.record_prediction([1.0, 2.0], 0.01, confidence=0.9)
        ModelVersionManager({str(tmp_path / 'models')!r})
        ModelModeManager().enter_training_mode()
        RateLimiter(5, 60).is_allowed("x")
        print(threading.active_count() - before, atexit._ncallbacks())
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}, "QUADRA_STATE_DIR": str(service_settings.state_dir)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    threads, hooks = map(int, result.stdout.split())
    assert threads == 0 and hooks == _baseline_exit_hooks(env)


def _baseline_exit_hooks(env: dict[str, str]) -> int:
    """The exit hooks the imports alone register (libraries' own)."""
    script = ("import atexit, utils.model_monitoring, utils.model_versioning, utils.model_modes, utils.security\n"
              "print(atexit._ncallbacks())")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return int(result.stdout)


def test_record_metrics_records_a_prediction_made_elsewhere_as_given(tmp_path: Path) -> None:
    from utils.model_monitoring import PredictionMetrics

    monitor = ModelMonitor(tmp_path / "monitoring", baseline_min_samples=10)
    made_at = time.time() - 30
    monitor.record_metrics(PredictionMetrics(at=made_at, latency_ms=12.5, success=True, confidence=0.8,
                                             predicted_class="setosa", model_version="2.0.0", features=[1.0, 2.0]))
    monitor.record_metrics(PredictionMetrics(at=made_at, latency_ms=3.0, success=False, error="timeout"))
    stats = monitor.get_statistics()
    assert (stats["total_predictions"], stats["error_count"]) == (2, 1)
    assert stats["model_versions"]["2.0.0"] == 1 and stats["class_distribution"] == {"setosa": 1}
    row = [r for r in monitor.store.predictions.recent(10) if r.success][0]
    assert (row.at, row.latency_ms, row.features) == (pytest.approx(made_at), 12.5, [1.0, 2.0])
    monitor.stop()
