"""Labels and quality (gunicorn -w 4 eventlet): 10,000 labels in one POST /api/feedback (first
labels and relabels) against a POST /api/predict of 10,000 rows on the same server; quality
over 100,000 labelled predictions, served and in-process, against scikit-learn's metrics on the
same arrays in memory; predict throughput while labels stream in at 10% of the prediction rate
against the same load without them (alternating wrk runs)."""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from sqlalchemy import text

from bench.load import LoadResult, Server, wrk
from bench.monitoring import best_of
from bench.predict_load import IRIS, best, gunicorn, prepare, service_env
from bench.rollout import Api
from utils.model_monitoring import ModelMonitor, PredictionMetrics
from utils.model_versioning import ModelVersionManager
from utils.serving import build_model
from utils.store import Store

LABELS_PER_CALL = 10_000
QUALITY_WINDOW = 100_000
CALLS = QUALITY_WINDOW // LABELS_PER_CALL  # predict and first-label calls: every prediction of the window labelled
REPEATS = 3  # relabel calls, quality timings
CLASSES = ["setosa", "versicolor", "virginica"]
ROUNDS = 3
LABEL_SHARE = 0.1
LABEL_INTERVAL = 0.5  # seconds between two label posts while streaming


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        key, _ = prepare(state)
        env = service_env(state, QUADRA_MAX_BATCH_SIZE=str(LABELS_PER_CALL))
        with Server(gunicorn("app:app", "gunicorn.conf.py"), env, "/api/health") as server:
            api = Api(server.url, {"X-API-Key": key})
            predict, ids = predict_calls(api)
            wait_recorded(api, len(ids))
            first, relabel = feedback_calls(api, ids)
            served = best_of(REPEATS, lambda: served_quality(api))
            alone, streaming, streamed = streaming_runs(api, ids)
        costs = quality_costs(Path(folder) / "quality")
    return _table(Timings(predict, first, relabel, served), costs, alone, streaming, streamed)


def timed_post(api: Api, path: str, body: dict) -> tuple[float, dict]:
    """Wall time of one request with its body encoded beforehand (the client's JSON work is
    not timed), and its answer."""
    data = json.dumps(body).encode()
    headers = {**api.headers, "Content-Type": "application/json"}
    started = time.perf_counter()
    response = requests.post(f"{api.url}{path}", data=data, headers=headers, timeout=120)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return seconds, response.json()


def predict_calls(api: Api) -> tuple[float, list[str]]:
    """The baseline: CALLS predictions of LABELS_PER_CALL rows each (the fastest, in seconds),
    and the ids of every row, in order."""
    rows = list(itertools.islice(itertools.cycle(IRIS), LABELS_PER_CALL))
    timings, ids = [], []
    for _ in range(CALLS):
        seconds, answer = timed_post(api, "/api/predict", {"inputs": rows})
        timings.append(seconds)
        ids += [p["id"] for p in answer["predictions"]]
    return min(timings), ids


def wait_recorded(api: Api, count: int, timeout: float = 60.0) -> None:
    """Until every worker's monitor has flushed `count` predictions to the store (labels
    join only stored predictions)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = requests.get(f"{api.url}/api/monitoring/stats", headers=api.headers, timeout=60).json()
        if stats["total_predictions"] >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{stats['total_predictions']} of {count} predictions recorded after {timeout:.0f} s")


def feedback_calls(api: Api, ids: list[str]) -> tuple[float, float]:
    """Fastest call of LABELS_PER_CALL first labels (each call on fresh ids, together all of
    `ids`), and of as many relabels (the first call's ids again), in seconds."""
    chunks = [ids[start:start + LABELS_PER_CALL] for start in range(0, len(ids), LABELS_PER_CALL)]
    first = [label_call(api, chunk, "recorded") for chunk in chunks]
    relabel = [label_call(api, chunks[0], "relabelled") for _ in range(REPEATS)]
    return min(first), min(relabel)


def label_call(api: Api, ids: list[str], expected: str) -> float:
    labels = [{"id": key, "label": i % len(CLASSES)} for i, key in enumerate(ids)]
    seconds, answer = timed_post(api, "/api/feedback", {"labels": labels})
    if answer[expected] != len(ids):
        raise RuntimeError(f"{len(ids)} labels sent, {answer[expected]} {expected}")
    return seconds


def served_quality(api: Api) -> None:
    response = requests.get(f"{api.url}/api/monitoring/quality?window=hour", headers=api.headers, timeout=60)
    response.raise_for_status()
    (version,) = response.json()["versions"]
    if version["labelled"] != QUALITY_WINDOW:
        raise RuntimeError(f"{version['labelled']} labelled predictions in the window, not {QUALITY_WINDOW}")


class LabelStream:
    """Posts labels for `ids` (cycling) at `per_second`, in one post every LABEL_INTERVAL,
    on a thread, until stopped."""

    def __init__(self, api: Api, ids: list[str], per_second: float) -> None:
        self.api, self.ids, self.per_second = api, itertools.cycle(ids), per_second
        self.sent = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._post)

    def __enter__(self) -> LabelStream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _post(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(max(0.0, started + (self.sent / self.per_second) - time.monotonic())):
            count = max(1, round(self.per_second * LABEL_INTERVAL))
            labels = [{"id": key, "label": 0} for key in itertools.islice(self.ids, count)]
            self.api.post("/api/feedback", {"labels": labels})
            self.sent += count


def streaming_runs(api: Api, ids: list[str]) -> tuple[LoadResult, LoadResult, float]:
    """Best of ROUNDS alternating wrk runs of batch-1 predictions alone and with labels
    streaming at LABEL_SHARE of the preceding alone run's rate; and the labels/s achieved."""
    url, body = f"{api.url}/api/predict", {"inputs": IRIS[:1]}
    wrk(url, body, api.headers, duration=3)  # warm-up
    alone, streaming, rates = [], [], []
    for _ in range(ROUNDS):
        alone.append(wrk(url, body, api.headers))
        with LabelStream(api, ids, LABEL_SHARE * alone[-1].requests_per_second) as stream:
            started = time.monotonic()
            streaming.append(wrk(url, body, api.headers))
            rates.append(stream.sent / (time.monotonic() - started))
    return best(alone), best(streaming), min(rates)


# What coverage cost before schema 8: every prediction of the window counted, one SQL statement.
ROW_BY_ROW_COVERAGE = text(
    "SELECT model_version, count(*), count(label), sum(CASE WHEN label = predicted_class THEN 1 ELSE 0 END) "
    "FROM outcomes WHERE at >= :since AND at <= :until GROUP BY model_version")


@dataclass(frozen=True)
class QualityCosts:
    """Seconds, in-process over QUALITY_WINDOW labelled predictions: `quality(window="hour")`,
    the reference computing the same numbers on in-memory arrays (and its name), the hour's
    coverage as the service counts it and as ROW_BY_ROW_COVERAGE counts it."""

    quality: float
    reference: float
    reference_name: str
    coverage: float
    row_by_row: float


def quality_costs(folder: Path) -> QualityCosts:
    folder.mkdir()
    store = Store(f"sqlite:///{folder / 'quality.db'}")
    config = {"architecture": "mlp", "input_dim": 4, "num_classes": len(CLASSES), "hidden_dims": [32, 16],
              "class_names": CLASSES}
    ModelVersionManager(folder / "models", store).save_model(build_model(config), "1.0.0", config=config,
                                                             metrics={"accuracy": 0.9})
    monitor = ModelMonitor(folder, store=store)
    truth, probabilities = labelled(monitor, np.random.default_rng(0))
    quality = best_of(REPEATS, lambda: monitor.quality(window="hour"))
    reference, name = reference_metrics(truth, probabilities)
    since, until = time.time() - 3600, time.time()
    coverage = best_of(REPEATS, lambda: store.outcomes.coverage(since, until))
    with store.database.read() as conn:
        counted = {version: tuple(counts) for version, *counts in conn.execute(ROW_BY_ROW_COVERAGE, {"since": since, "until": until})}
        row_by_row = best_of(REPEATS, lambda: conn.execute(ROW_BY_ROW_COVERAGE, {"since": since, "until": until}).all())
    if counted != {version: (c.predictions, c.labelled, c.correct) for version, c in store.outcomes.coverage(since, until).items()}:
        raise RuntimeError(f"coverage differs from the row-by-row count: {counted}")
    store.database.dispose()
    return QualityCosts(quality, best_of(REPEATS, reference), name, coverage, row_by_row)


def labelled(monitor: ModelMonitor, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Record QUALITY_WINDOW predictions within the last hour and label each (mostly its
    predicted class); returns the true classes and the probabilities."""
    probabilities = rng.dirichlet(np.ones(len(CLASSES)) * 0.7, QUALITY_WINDOW)
    predicted = probabilities.argmax(axis=1)
    truth = np.where(rng.random(QUALITY_WINDOW) < 0.75, predicted, rng.integers(0, len(CLASSES), QUALITY_WINDOW))
    now = time.time()
    for i, (row, k) in enumerate(zip(probabilities.tolist(), predicted.tolist(), strict=True)):
        monitor.record_metrics(PredictionMetrics(
            at=now - 3000 + i * 0.02, latency_ms=1.0, success=True, confidence=max(row), predicted_class=CLASSES[k],
            model_version="1.0.0", prediction_id=f"b:{i}", probabilities=row))
        if i % 5000 == 4999:
            monitor.flush()
    for start in range(0, QUALITY_WINDOW, LABELS_PER_CALL):
        monitor.record_feedback([{"id": f"b:{i}", "label": int(truth[i])}
                                 for i in range(start, min(start + LABELS_PER_CALL, QUALITY_WINDOW))])
    return truth, probabilities


def reference_metrics(truth: np.ndarray, probabilities: np.ndarray) -> tuple[Callable[[], object], str]:
    """The same numbers by scikit-learn (a test dependency) when it is installed, else the
    accuracy alone by numpy; both on arrays already in memory."""
    predicted = probabilities.argmax(axis=1)
    try:
        from sklearn.calibration import calibration_curve
        from sklearn.metrics import (
            accuracy_score,
            brier_score_loss,
            confusion_matrix,
            f1_score,
            log_loss,
            precision_recall_fscore_support,
        )
    except ImportError:
        return lambda: float((truth == predicted).mean()), "numpy's accuracy on in-memory arrays"
    labels = list(range(len(CLASSES)))

    def metrics() -> None:
        accuracy_score(truth, predicted)
        precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
        f1_score(truth, predicted, average="macro", zero_division=0)
        confusion_matrix(truth, predicted, labels=labels)
        log_loss(truth, probabilities, labels=labels)
        brier_score_loss(truth, probabilities, labels=labels)
        calibration_curve((truth == predicted).astype(int), probabilities.max(axis=1), n_bins=10)

    return metrics, "scikit-learn's metrics on in-memory arrays"


@dataclass(frozen=True)
class Timings:
    """Seconds: the fastest POST /api/predict of LABELS_PER_CALL rows, POST /api/feedback of as
    many first labels and relabels, GET /api/monitoring/quality over QUALITY_WINDOW labelled
    predictions."""

    predict: float
    first: float
    relabel: float
    served_quality: float


def _table(t: Timings, c: QualityCosts, alone: LoadResult, streaming: LoadResult, streamed: float) -> str:
    n = LABELS_PER_CALL
    return "\n".join([
        "## Labels and quality\n",
        "The full service under `gunicorn -w 4 --worker-class eventlet`: HTTP times are the client's wall time of one "
        f"request (body encoded beforehand), best of {CALLS} first-label and predict calls ({CALLS * n:,} predictions, "
        f"each labelled once), best of {REPEATS} relabel and quality calls. In-process quality: a monitor over a "
        "SQLite store in the benchmark's process (no `gc.freeze()`, unlike a worker).\n",
        "| measurement | result | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
        f"| POST /api/feedback, {n:,} first labels | {t.first * 1000:.0f} ms ({n / t.first:,.0f} labels/s) "
        f"| POST /api/predict of {n:,} rows: {t.predict * 1000:.0f} ms | {t.first / t.predict:.2f}× | ≤ 1 s |",
        f"| POST /api/feedback, {n:,} relabels | {t.relabel * 1000:.0f} ms ({n / t.relabel:,.0f} labels/s) "
        f"| the same | {t.relabel / t.predict:.2f}× | ≤ 1 s |",
        f"| GET /api/monitoring/quality?window=hour, {QUALITY_WINDOW:,} labelled | {t.served_quality * 1000:.0f} ms "
        f"| {c.reference_name}: {c.reference * 1000:.1f} ms | {t.served_quality / c.reference:.1f}× | ≤ 0.5 s |",
        f"| `ModelMonitor.quality(window=\"hour\")` in-process, {QUALITY_WINDOW:,} labelled | {c.quality * 1000:.0f} ms "
        f"| the same | {c.quality / c.reference:.1f}× | ≤ 0.5 s |",
        f"| coverage of the hour (the quality check's count at every drift check and scrape), {QUALITY_WINDOW:,} "
        f"predictions, in-process | {c.coverage * 1000:.1f} ms | counting them row by row (before schema 8): "
        f"{c.row_by_row * 1000:.1f} ms | {c.coverage / c.row_by_row:.2f}× | — |",
        "",
        f"**Predict with labels streaming** (batch 1, wrk 2 threads / 16 connections, 10 s runs, best of {ROUNDS} "
        f"alternating runs on the same server; labels posted every {LABEL_INTERVAL} s at {LABEL_SHARE:.0%} of the "
        f"preceding run's prediction rate, at least {streamed:,.0f} labels/s achieved, relabelling earlier predictions):\n",
        "| run | req/s | p50 | p99 | failed | ratio to no labels | target |",
        "|---|---|---|---|---|---|---|",
        *(f"| {label} | {r.requests_per_second:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.failed} "
          f"| {r.requests_per_second / alone.requests_per_second:.2f}× | {target} |"
          for label, r, target in (("no labels", alone, ""), (f"labels at {LABEL_SHARE:.0%}", streaming, "≥ 0.97×"))),
    ]) + "\n"


if __name__ == "__main__":
    print(run())
