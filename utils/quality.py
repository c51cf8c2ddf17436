"""Classification quality of a version from its labelled predictions.

The numbers are scikit-learn's definitions, computed with numpy on the stored predictions
(scikit-learn is a test dependency only; tests compare both on the same data): accuracy,
per-class precision / recall / F1 and support (0 where undefined, `zero_division=0`), macro-F1
over the classes present in labels or predictions, the confusion matrix (rows: true class,
columns: predicted), log loss (probabilities clipped to [eps, 1 - eps]), the Brier score (the
binary one for two classes, the multiclass sum for more, as `brier_score_loss`) and the
expected calibration error over 10 equal-width confidence bins binned as `calibration_curve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from utils.monitoring_window import feature_matrix
from utils.store.outcomes import LabelledColumns
from utils.timestamps import iso_utc

CALIBRATION_BINS = 10
TIMELINE_POINTS = 24
MIN_TIMELINE_SECONDS = 60.0


@dataclass(frozen=True)
class Labelled:
    """A version's labelled predictions as arrays: class indices (true and predicted), the
    probability rows (in the version's class order) and when each prediction was made."""

    at: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def from_columns(cls, columns: LabelledColumns, classes: list[str]) -> Labelled:
        """The rows whose predicted and true classes are both among `classes` (by name)."""
        index = {name: i for i, name in enumerate(classes)}
        predicted, truth = _indices(columns.predicted, index), _indices(columns.labels, index)
        keep = (predicted >= 0) & (truth >= 0)
        texts = [text for text, kept in zip(columns.probabilities, keep.tolist(), strict=True) if kept]
        probabilities = (feature_matrix(texts).reshape(len(texts), len(classes)) if texts
                         else np.zeros((0, len(classes))))
        return cls(np.array(columns.at, dtype=float)[keep], truth[keep], predicted[keep], probabilities)

    def __len__(self) -> int:
        return int(self.truth.size)


def _indices(names: list[str], index: dict[str, int]) -> np.ndarray:
    """Each name's class index, -1 for a name that is not a class."""
    return np.fromiter(map(index.get, names, repeat(-1)), dtype=np.int64, count=len(names))


def confusion(truth: np.ndarray, predicted: np.ndarray, width: int) -> np.ndarray:
    return np.bincount(truth * width + predicted, minlength=width * width).reshape(width, width)


def per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where a ratio is undefined)."""
    true_positives = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_positives), where=both > 0)
    return precision, recall, f1, support


def log_loss(truth: np.ndarray, probabilities: np.ndarray) -> float:
    eps = np.finfo(probabilities.dtype).eps
    clipped = np.clip(probabilities[np.arange(truth.size), truth], eps, 1 - eps)
    return float(-np.log(clipped).mean())


def brier_score(truth: np.ndarray, probabilities: np.ndarray) -> float:
    onehot = np.zeros_like(probabilities)
    onehot[np.arange(truth.size), truth] = 1.0
    score = float(((onehot - probabilities) ** 2).sum(axis=1).mean())
    return score / 2 if probabilities.shape[1] < 3 else score


def calibration(confidence: np.ndarray, correct: np.ndarray) -> tuple[list[dict[str, Any]], float]:
    """Per confidence bin: its range, count, mean confidence and accuracy; and the expected
    calibration error (the count-weighted mean gap between the two)."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    bins = np.searchsorted(edges[1:-1], confidence)
    counts = np.bincount(bins, minlength=CALIBRATION_BINS)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS)
    correct_sums = np.bincount(bins, weights=correct, minlength=CALIBRATION_BINS)
    filled = counts > 0
    mean_confidence = np.divide(confidence_sums, counts, out=np.zeros(CALIBRATION_BINS), where=filled)
    accuracy = np.divide(correct_sums, counts, out=np.zeros(CALIBRATION_BINS), where=filled)
    error = float((counts * np.abs(accuracy - mean_confidence)).sum() / confidence.size) if confidence.size else 0.0
    report = [{"lower": i / CALIBRATION_BINS, "upper": (i + 1) / CALIBRATION_BINS, "count": int(counts[i]),
               "confidence_mean": float(mean_confidence[i]) if filled[i] else None,
               "accuracy": float(accuracy[i]) if filled[i] else None} for i in range(CALIBRATION_BINS)]
    return report, error


def timeline(at: np.ndarray, correct: np.ndarray, since: float, until: float) -> list[dict[str, Any]]:
    """Accuracy per equal slice of [since, until) that holds labelled predictions."""
    width = max((until - since) / TIMELINE_POINTS, MIN_TIMELINE_SECONDS)
    slots = ((at - since) // width).astype(int)
    counts = np.bincount(slots, minlength=1)
    right = np.bincount(slots, weights=correct, minlength=1)
    return [{"start": iso_utc(since + slot * width), "labelled": int(counts[slot]),
             "accuracy": float(right[slot] / counts[slot])} for slot in np.flatnonzero(counts)]


def quality_numbers(labelled: Labelled, classes: list[str], since: float, until: float) -> dict[str, Any]:
    """Every quality number of one version's labelled predictions (None where there are none)."""
    width = len(classes)
    matrix = confusion(labelled.truth, labelled.predicted, width)
    if not len(labelled):
        return {"accuracy": None, "macro_f1": None, "log_loss": None, "brier_score": None,
                "expected_calibration_error": None, "confusion_matrix": matrix.tolist(),
                "per_class": {name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in classes},
                "calibration": calibration(np.zeros(0), np.zeros(0))[0], "timeline": []}
    precision, recall, f1, support = per_class(matrix)
    present = (support > 0) | (matrix.sum(axis=0) > 0)
    correct = (labelled.truth == labelled.predicted).astype(float)
    bins, expected_error = calibration(labelled.probabilities.max(axis=1), correct)
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1[present].mean()),
        "log_loss": log_loss(labelled.truth, labelled.probabilities),
        "brier_score": brier_score(labelled.truth, labelled.probabilities),
        "expected_calibration_error": expected_error,
        "confusion_matrix": matrix.tolist(),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "calibration": bins,
        "timeline": timeline(labelled.at, correct, since, until),
    }
