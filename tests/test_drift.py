"""Drift detection: Evidently's default verdicts on reference data, and the edge cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.conftest import ROOT
from utils.drift import ColumnDrift, clean, column_drift, dataset_drift

# Any warning (division by zero, NaN in sqrt, ...) is a failure here.
pytestmark = pytest.mark.filterwarnings("error")


def normal(n: int, shift: float = 0.0) -> np.ndarray:
    """Deterministic N(shift, 1) sample: the quantiles at (i + 0.5) / n."""
    return stats.norm.ppf((np.arange(n) + 0.5) / n) + shift


def counted(counts: list[int], labels: list | None = None) -> np.ndarray:
    """Exactly counts[k] copies of labels[k] (labels default to 0, 1, 2, ...)."""
    return np.repeat(np.arange(len(counts)) if labels is None else np.array(labels), counts)


@pytest.mark.parametrize(
    ("shift", "p_value", "drift"), [(0.08, 0.686, False), (0.12, 0.200, False), (0.2, 0.0033, True)]
)
def test_ks_up_to_1000_reference_rows(shift: float, p_value: float, drift: bool) -> None:
    result = column_drift("x", normal(1000), normal(1000, shift))
    assert (result.kind, result.test) == ("numerical", "ks")
    assert result.p_value == pytest.approx(p_value, rel=0.02)
    assert result.statistic == pytest.approx(stats.ks_2samp(normal(1000), normal(1000, shift)).statistic)
    assert result.drift_detected is drift


@pytest.mark.parametrize(("shift", "distance", "drift"), [(0.08, 0.080, False), (0.12, 0.120, True), (0.2, 0.200, True)])
def test_wasserstein_above_1000_reference_rows(shift: float, distance: float, drift: bool) -> None:
    result = column_drift("x", normal(1001), normal(1001, shift))
    assert (result.kind, result.test, result.p_value) == ("numerical", "wasserstein", None)
    assert result.statistic == pytest.approx(distance, abs=1e-3)
    assert result.drift_detected is drift


@pytest.mark.parametrize(
    ("reference", "current"),
    [
        (normal(1001), normal(1001, 0.3)),
        (normal(1500), normal(731, 0.1) * 2),
        (np.arange(2000) % 7, np.arange(999) % 11),  # ties on both sides, unequal sizes
    ],
)
def test_wasserstein_matches_scipy(reference: np.ndarray, current: np.ndarray) -> None:
    expected = stats.wasserstein_distance(reference, current) / np.std(reference)
    assert column_drift("x", reference, current).statistic == pytest.approx(expected, rel=1e-9)


def test_chi_square_three_categories() -> None:
    result = column_drift("c", counted([250, 150, 100]), counted([200, 175, 125]))
    assert (result.kind, result.test) == ("categorical", "chi_square")
    assert result.statistic == pytest.approx(20.4167, rel=1e-4)
    assert result.p_value == pytest.approx(3.7e-5, rel=0.02)
    assert result.drift_detected


@pytest.mark.parametrize(
    ("current", "distance", "drift"),
    [([2000, 1750, 1250], 0.072, False), ([1500, 2000, 1500], 0.146, True)],
)
def test_jensen_shannon_three_categories(current: list[int], distance: float, drift: bool) -> None:
    result = column_drift("c", counted([2500, 1500, 1000]), counted(current))
    assert (result.kind, result.test, result.p_value) == ("categorical", "jensen_shannon", None)
    assert result.statistic == pytest.approx(distance, abs=1e-3)
    assert result.drift_detected is drift


def test_z_test_binary() -> None:
    result = column_drift("b", counted([250, 250]), counted([200, 300]))
    assert (result.kind, result.test) == ("categorical", "z_test")
    assert result.statistic == pytest.approx(3.178, rel=1e-3)
    assert result.p_value == pytest.approx(0.0015, rel=0.02)
    assert result.drift_detected


def test_five_integer_values_are_categorical_chi_square() -> None:
    result = column_drift("i", counted([100] * 5), counted([80, 90, 100, 110, 120]))
    assert (result.kind, result.test) == ("categorical", "chi_square")
    assert result.statistic == pytest.approx(10.0)
    assert result.p_value == pytest.approx(0.040, rel=0.02)
    assert result.drift_detected


def test_five_integer_values_large_reference_jensen_shannon() -> None:
    result = column_drift("i", counted([1000] * 5), counted([800, 900, 1000, 1100, 1200]))
    assert (result.kind, result.test) == ("categorical", "jensen_shannon")
    assert result.statistic == pytest.approx(0.050, abs=1e-3)
    assert not result.drift_detected


def test_reference_size_is_counted_after_cleaning() -> None:
    reference = np.concatenate([normal(900), np.full(300, np.nan)])
    result = column_drift("x", reference, normal(1200, 0.2))
    assert result.test == "ks"
    assert (result.reference_size, result.current_size) == (900, 1200)


def test_clean_drops_nan_and_infinities() -> None:
    np.testing.assert_array_equal(clean([1.0, np.nan, np.inf, -np.inf, 2.0, None]), [1.0, 2.0])
    np.testing.assert_array_equal(clean(["a", None, float("nan"), "b"]), ["a", "b"])
    assert clean([1, 2]).dtype == np.float64


def test_infinities_do_not_reach_the_tests() -> None:
    noisy = np.concatenate([normal(1000, 0.08), [np.inf, -np.inf, np.nan]])
    result = column_drift("x", normal(1000), noisy)
    assert result.current_size == 1000
    assert result.p_value == pytest.approx(column_drift("x", normal(1000), normal(1000, 0.08)).p_value)


@pytest.mark.parametrize(
    ("reference", "current"),
    [([], []), ([np.nan, np.inf], [1.0, 2.0]), ([1.0, 2.0], [-np.inf, None]), (["a", "b"], [None]), ([], normal(2000))],
)
def test_empty_after_cleaning_is_insufficient_data(reference: list, current: list) -> None:
    result = column_drift("x", reference, current)
    assert result.test == "insufficient_data"
    assert (result.statistic, result.p_value, result.drift_detected) == (None, None, False)
    json.dumps(result.to_dict(), allow_nan=False)


def test_constant_numerical_reference_uses_the_std_floor() -> None:
    result = column_drift("x", np.full(2000, 5.0), 5.0 + np.arange(10) / 1000)
    assert (result.kind, result.test) == ("numerical", "wasserstein")
    assert result.statistic == pytest.approx(0.0045 / 0.001)
    assert result.drift_detected


def test_same_single_value_on_both_sides_does_not_drift() -> None:
    result = column_drift("x", np.full(100, 5.0), np.full(30, 5.0))
    assert (result.test, result.p_value, result.drift_detected) == ("z_test", 1.0, False)


def test_strings_are_categories() -> None:
    binary = column_drift("s", counted([250, 250], ["no", "yes"]), counted([200, 300], ["no", "yes"]))
    assert binary.test == "z_test"
    assert binary.p_value == pytest.approx(column_drift("b", counted([250, 250]), counted([200, 300])).p_value)
    labels = [f"label_{k}" for k in range(7)]
    many = column_drift("s", counted([100] * 7, labels), counted([100] * 7, labels))
    assert (many.kind, many.test, many.drift_detected) == ("categorical", "chi_square", False)
    assert many.p_value == pytest.approx(1.0)


def test_caller_can_force_categorical() -> None:
    reference, current = np.arange(100) % 10, np.arange(100) % 10
    assert column_drift("x", reference, current).kind == "numerical"
    assert column_drift("x", reference, current, categorical=True).test == "chi_square"


@pytest.mark.parametrize("reference_size", [300, 3000])
def test_category_unseen_in_reference_drifts(reference_size: int) -> None:
    reference = counted([reference_size // 3] * 3, ["a", "b", "c"])
    result = column_drift("s", reference, ["a", "b", "c", "d"] * 100)
    assert result.drift_detected
    assert all(v is None or math.isfinite(v) for v in (result.statistic, result.p_value))


def test_unseen_category_chi_square_is_p_zero() -> None:
    result = column_drift("s", ["a", "b", "c"] * 10, ["a", "b", "d"])
    assert (result.test, result.statistic, result.p_value, result.drift_detected) == ("chi_square", None, 0.0, True)


def test_nearly_equal_large_samples_give_zero_not_nan() -> None:
    # Rounding makes scipy's divergence slightly negative here, and its square root NaN.
    result = column_drift("s", counted([58569, 58546], ["a", "b"]), counted([58570, 58547], ["a", "b"]))
    assert (result.test, result.statistic, result.drift_detected) == ("jensen_shannon", 0.0, False)


def four_columns(drifting: int) -> tuple[dict, dict]:
    reference = {name: normal(500) for name in "abcd"}
    current = {name: normal(500, 0.5 if k < drifting else 0.0) for k, name in enumerate("abcd")}
    return reference, current


def test_dataset_drifts_when_half_the_columns_drift() -> None:
    result = dataset_drift(*four_columns(2))
    assert result.dataset_drift and result.drift_share == 0.5
    assert result.drifted_columns == ["a", "b"]


def test_dataset_does_not_drift_below_half() -> None:
    result = dataset_drift(*four_columns(1))
    assert not result.dataset_drift and result.drift_share == 0.25


def test_dataset_share_threshold_is_configurable() -> None:
    assert dataset_drift(*four_columns(1), share_threshold=0.25).dataset_drift


def test_dataset_without_columns_does_not_drift() -> None:
    result = dataset_drift({}, {}, share_threshold=0.0)
    assert (result.dataset_drift, result.drift_share, result.columns) == (False, 0.0, [])


def test_dataset_categorical_names_and_missing_current_column() -> None:
    result = dataset_drift({"code": np.arange(100) % 10, "gone": [1.0, 2.0]}, {"code": np.arange(100) % 10}, ["code"])
    by_name = {c.column: c for c in result.columns}
    assert by_name["code"].kind == "categorical"
    assert by_name["gone"].test == "insufficient_data"


def test_to_dict_is_strict_json() -> None:
    reference = {
        "num": normal(1000),
        "big": normal(2000),
        "cat": ["a", "b", "c"] * 10,
        "bin": [0, 1] * 10,
        "empty": [np.nan],
    }
    current = {"num": normal(1000, 0.3), "big": normal(2000), "cat": ["a", "d"], "bin": [1] * 5, "empty": [1.0]}
    result = dataset_drift(reference, current, categorical=["cat"])
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(payload) == {"dataset_drift", "drift_share", "share_threshold", "drifted_columns", "columns"}
    assert payload["columns"]["cat"] == {
        "column": "cat",
        "kind": "categorical",
        "test": "chi_square",
        "statistic": None,
        "p_value": 0.0,
        "threshold": 0.05,
        "drift_detected": True,
        "reference_size": 30,
        "current_size": 2,
    }
    assert payload["drifted_columns"] == result.drifted_columns == ["num", "cat", "bin"]


def test_column_drift_is_frozen() -> None:
    result = column_drift("x", [1.0, 2.0], [1.0, 2.0])
    assert isinstance(result, ColumnDrift)
    with pytest.raises(AttributeError):
        result.drift_detected = True  # type: ignore[misc]


def test_100k_row_numerical_column() -> None:
    rng = np.random.default_rng(0)
    result = column_drift("x", rng.normal(size=100_000), rng.normal(0.3, 1.0, size=100_000))
    assert (result.test, result.drift_detected) == ("wasserstein", True)
    assert result.statistic == pytest.approx(0.3, abs=0.02)


def test_100k_row_categorical_column() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([f"label_{k}" for k in range(12)])
    reference, current = labels[rng.integers(0, 12, 100_000)], labels[rng.integers(0, 12, 100_000)]
    result = column_drift("s", reference, current)
    assert (result.kind, result.test, result.drift_detected) == ("categorical", "jensen_shannon", False)
    assert 0.0 <= result.statistic < 0.02


def test_a_serving_process_loads_scipy_only_when_it_computes_drift(state_dir: Path, tmp_path: Path) -> None:
    """scipy costs each worker about 60 MiB; only the worker running drift checks needs it."""
    script = """
import sys
from app import create_app, start_serving, stop_serving
from utils.drift import column_drift
app = create_app()
start_serving(app)
answer = app.test_client().post("/api/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2]]})
assert answer.status_code == 200, answer.get_json()
print("scipy after a prediction:", "scipy" in sys.modules)
column_drift("x", [1.0, 2.0, 3.0] * 10, [1.5, 2.5, 3.5] * 10)
print("scipy after a drift test:", "scipy" in sys.modules)
stop_serving(app)
"""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")},
           "QUADRA_STATE_DIR": str(state_dir), "QUADRA_AUTH_ENABLED": "false", "QUADRA_DRIFT_CHECK_SECONDS": "86400"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [line for line in result.stdout.splitlines() if line.startswith("scipy after")]
    assert answers == ["scipy after a prediction: False", "scipy after a drift test: True"]
