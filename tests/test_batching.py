"""Dynamic batching: concurrent requests share one forward pass, each gets its own rows back,
a failing row fails only its own request, the size and delay bound a batch; in-process with
threads, and end to end under gunicorn -w 4 with eventlet (passes in the requests' green threads)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.conftest import GUNICORN_COMMAND
from tests.fixtures.poisoned_arch import CONFIG, POISON, PoisonedLinear
from utils.batching import Batcher
from utils.model_versioning import ModelVersionManager
from utils.serving import ServedModel, build_model
from utils.store import Store

LONG_DELAY = 60.0  # a batch that waited this long would fail its test's join timeout


def served_model(version: str = "1.0.0") -> ServedModel:
    torch.manual_seed(0)
    return ServedModel(version, "0" * 64, build_model(CONFIG).eval(), CONFIG)


def rows(first: float, count: int = 1) -> torch.Tensor:
    return torch.tensor([[first + i, 1.0, 2.0, 3.0] for i in range(count)])


def batch_sizes(served: ServedModel) -> list[int]:
    model = served.model
    assert isinstance(model, PoisonedLinear)
    return model.batch_sizes


def concurrently(batcher: Batcher, calls: list[tuple[ServedModel, torch.Tensor]]) -> list[Any]:
    """Every call at once, each in its own thread; a result or the exception it raised, in order."""
    start = threading.Barrier(len(calls))

    def call(served: ServedModel, inputs: torch.Tensor) -> Any:
        start.wait()
        try:
            return batcher.predict(served, inputs)
        except BaseException as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call, served, inputs) for served, inputs in calls]
        return [future.result(timeout=30) for future in futures]


def test_concurrent_requests_share_one_forward_pass_and_each_gets_its_own_rows() -> None:
    served = served_model()
    expected = [served.predict(rows(i, 1 + i % 3)) for i in range(6)]
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=12, max_delay_seconds=LONG_DELAY)  # 12 = the six requests' rows
    results = concurrently(batcher, [(served, rows(i, 1 + i % 3)) for i in range(6)])
    assert batch_sizes(served) == [12]
    assert batcher.summary() == {"max_rows": 12, "max_delay_ms": LONG_DELAY * 1000, "requests_per_pass": 6.0}
    for got, want in zip(results, expected, strict=True):
        assert [r["class"] for r in got] == [r["class"] for r in want]
        assert [r["confidence"] for r in got] == pytest.approx([r["confidence"] for r in want], abs=1e-6)


def test_the_delay_bounds_the_wait_of_a_batch_that_does_not_fill() -> None:
    served = served_model()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=1000, max_delay_seconds=0.01)
    with ThreadPoolExecutor(1) as pool:  # a wait that ignored the delay fails here rather than hangs
        answer = pool.submit(batcher.predict, served, rows(0)).result(timeout=30)
    assert [r["class"] for r in answer] == [r["class"] for r in served.predict(rows(0))]
    assert batch_sizes(served) == [1, 1]


class Halt(BaseException):
    """Not a model's error: what stops a thread (a worker's shutdown, say)."""


def test_a_pass_stopped_by_a_base_exception_fails_every_request_of_its_batch() -> None:
    served = served_model()

    def halt(x: torch.Tensor) -> torch.Tensor:
        raise Halt()

    served.model.forward = halt
    batcher = Batcher(max_rows=3, max_delay_seconds=LONG_DELAY)
    assert all(isinstance(result, Halt) for result in concurrently(batcher, [(served, rows(i)) for i in range(3)]))
    del served.model.forward  # the class's forward again: the batcher still serves
    assert len(batcher.predict(served, rows(0, 3))) == 3


def test_while_a_pass_runs_the_next_batch_gathers_until_it_ends() -> None:
    """No delay: a request to an idle model runs at once; those that come while its pass runs
    wait for it to end and share the next pass."""
    served = served_model()
    model = served.model
    assert isinstance(model, PoisonedLinear)
    model.gate = threading.Event()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=32, max_delay_seconds=0.0)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.predict, served, rows(0))
        while batch_sizes(served) != [1]:  # the first pass started at once, and holds at the gate
            time.sleep(0.01)
        later = [pool.submit(batcher.predict, served, rows(i)) for i in (1, 2, 3)]
        time.sleep(0.3)  # they gather meanwhile (with no delay they would have run at once)
        assert batch_sizes(served) == [1] and not any(future.done() for future in later)
        model.gate.set()
        assert len(first.result(timeout=30)) == 1 and [len(f.result(timeout=30)) for f in later] == [1, 1, 1]
    assert batch_sizes(served) == [1, 3]


def test_a_failing_row_fails_only_its_own_request() -> None:
    served = served_model()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=4, max_delay_seconds=LONG_DELAY)
    results = concurrently(batcher, [(served, rows(1)), (served, rows(POISON)), (served, rows(2)), (served, rows(3))])
    assert isinstance(results[1], ValueError) and "poisoned row" in str(results[1])
    assert all(isinstance(result, list) and len(result) == 1 for i, result in enumerate(results) if i != 1)
    assert batch_sizes(served) == [4, 1, 1, 1, 1]  # the failed pass, then each request alone


def test_a_request_without_room_releases_the_open_batch_and_opens_the_next() -> None:
    served = served_model()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=4, max_delay_seconds=LONG_DELAY)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.predict, served, rows(0, 3))
        time.sleep(0.3)  # the first request waits in its batch (for up to LONG_DELAY)
        second = pool.submit(batcher.predict, served, rows(10, 3))
        assert len(first.result(timeout=30)) == 3  # no room for the second: the first batch runs
        assert not second.done()  # the second waits in the next batch, which a 1-row request fills
        third = pool.submit(batcher.predict, served, rows(20))
        assert len(second.result(timeout=30)) == 3 and len(third.result(timeout=30)) == 1
    assert batch_sizes(served) == [3, 4]


def test_a_request_larger_than_a_batch_runs_alone() -> None:
    served = served_model()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=2, max_delay_seconds=LONG_DELAY)
    assert len(batcher.predict(served, rows(0, 5))) == 5
    assert batch_sizes(served) == [5]


def test_a_canarys_arms_never_share_a_pass_and_close_together() -> None:
    """The candidate's lone request runs when production's batch fills, not after the delay."""
    production, candidate = served_model("1.0.0"), served_model("2.0.0")
    batch_sizes(production).clear()
    batch_sizes(candidate).clear()
    batcher = Batcher(max_rows=2, max_delay_seconds=LONG_DELAY)
    with ThreadPoolExecutor(3) as pool:
        lone = pool.submit(batcher.predict, candidate, rows(0))
        time.sleep(0.3)  # the candidate's request waits in the window (for up to LONG_DELAY)
        both = [pool.submit(batcher.predict, production, rows(i)) for i in (1, 2)]
        assert len(lone.result(timeout=30)) == 1 and [len(f.result(timeout=30)) for f in both] == [1, 1]
    assert batch_sizes(production) == [2] and batch_sizes(candidate) == [1]


def test_without_batching_each_request_runs_where_it_is() -> None:
    served = served_model()
    batch_sizes(served).clear()
    batcher = Batcher(max_rows=1, max_delay_seconds=LONG_DELAY)
    assert not batcher.enabled and batcher.summary() is None and len(batcher.predict(served, rows(0, 3))) == 3
    assert batch_sizes(served) == [3]


# -- end to end -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_batching_under_gunicorn_eventlet_answers_each_caller_and_isolates_a_failure(
        start_server, state_dir: Path, api_keys: dict[str, str]) -> None:
    """Four eventlet workers, each pass in a request's green thread: 40 concurrent requests, 4 with a
    poisoned row; the others get exactly their own rows' answers, the poisoned ones a JSON 500,
    requests were grouped, and the service stays healthy."""
    store = Store(f"sqlite:///{state_dir / 'quadra.db'}")
    registry = ModelVersionManager(state_dir / "models", store, verify_integrity=True)
    torch.manual_seed(1)
    model = build_model(CONFIG).eval()
    registry.save_model(model, "2.0.0", config=CONFIG)
    registry.promote_to_production("2.0.0")
    store.database.dispose()
    server = start_server(state_dir, {"QUADRA_ARCHITECTURE_MODULES": "tests.fixtures.poisoned_arch",
                                      "QUADRA_BATCH_MAX_SIZE": "64", "QUADRA_BATCH_MAX_DELAY_MS": "50"},
                          command=GUNICORN_COMMAND)
    assert server.get("/api/health").json()["model_version"] == "2.0.0"
    bodies = [[[POISON if i % 10 == 3 else float(i), 0.5, -1.0, 2.0]] for i in range(40)]

    def predict(body: list[list[float]]) -> requests.Response:
        return requests.post(f"{server.url}/api/predict", json={"inputs": body}, headers={"X-API-Key": api_keys["read"]},
                             timeout=30)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(predict, bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body[0][0] == POISON:
            assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
            assert "Traceback" not in response.text and "poisoned" not in response.text
            continue
        assert response.status_code == 200, response.text
        with torch.inference_mode():
            want = torch.softmax(model(torch.tensor(body)), dim=1)[0]
        got = response.json()["predictions"][0]
        assert got["class_index"] == int(want.argmax())
        assert got["confidence"] == pytest.approx(float(want.max()), abs=1e-5)
    metrics = server.get("/metrics").text
    grouped = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith(("quadra_batch_requests_sum", "quadra_batch_requests_count"))}
    assert grouped["quadra_batch_requests_sum"] >= 40 > grouped["quadra_batch_requests_count"]
    assert server.get("/api/health").status_code == 200
    assert len(server.post("/api/predict", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]}).json()["predictions"]) == 1
