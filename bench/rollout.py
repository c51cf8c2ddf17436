"""Rollouts under load (wrk, gunicorn -w 4 eventlet): predict throughput with a 10% canary
and with a 10% shadow against the same service without either (alternating runs, same
server), and failed requests across a canary's start, its automatic promote and an abort."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.load import LoadResult, Server, wrk
from bench.predict_load import IRIS, best, gunicorn, prepare, service_env

ROUNDS = 2
HOLD = {"percent": 10, "min_predictions": 1_000_000, "on_success": "hold", "on_failure": "hold"}
SHADOW_HOLD = {**HOLD, "mode": "shadow"}
DECIDING = {"percent": 10, "min_predictions": 2000, "criteria": {"max_latency_p95_ratio": 2.0}}


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        key, _ = prepare(state)
        env = service_env(state, QUADRA_ROLLOUT_CHECK_SECONDS="1")
        headers = {"X-API-Key": key}
        with Server(gunicorn("app:app", "gunicorn.conf.py"), env, "/api/health") as server:
            api = Api(server.url, headers)
            api.post("/api/model/save", {"version": "1.1.0"})
            measured: dict[str, list[LoadResult]] = {"none": [], "canary": [], "shadow": []}
            body = {"inputs": IRIS[:1]}
            wrk(f"{server.url}/api/predict", body, headers, duration=3)  # warm-up
            for _ in range(ROUNDS):
                measured["none"].append(wrk(f"{server.url}/api/predict", body, headers))
                for name, rollout in (("canary", HOLD), ("shadow", SHADOW_HOLD)):
                    api.post("/api/model/canary/1.1.0", rollout)
                    time.sleep(2)  # every worker loads the candidate within a poll
                    measured[name].append(wrk(f"{server.url}/api/predict", body, headers))
                    shadow = api.canary()["shadow"]
                    api.post("/api/model/canary/abort", {})
                    time.sleep(2)
            best_of = {name: best(runs) for name, runs in measured.items()}
            lifecycle, decision = start_promote_abort(api, server.url, headers, best_of["none"].requests_per_second)
    return _table(best_of, shadow, lifecycle, decision)


class Api:
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers

    def post(self, path: str, body: dict) -> dict:
        response = requests.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=60)
        response.raise_for_status()
        return response.json()

    def canary(self) -> dict:
        return requests.get(f"{self.url}/api/model/canary", headers=self.headers, timeout=60).json()["rollout"]


def start_promote_abort(api: Api, url: str, headers: dict[str, str], requests_per_second: float) -> tuple[LoadResult, str]:
    """One wrk run while a canary starts and is promoted by the service, then another starts
    and is aborted by hand. The service may decide once the canary has served its minimum
    of predictions: the run allows twice the time that takes at `requests_per_second` (10 s
    at least, for the service's check every second and the workers' polls). A canary still
    undecided then is aborted, and the table says so."""
    to_decide = max(10.0, 2 * DECIDING["min_predictions"] / (requests_per_second * DECIDING["percent"] / 100))
    outcome: dict[str, LoadResult] = {}
    loader = threading.Thread(target=lambda: outcome.update(run=wrk(f"{url}/api/predict", {"inputs": IRIS[:1]},
                                                                    headers, duration=round(2 + to_decide + 5))))
    loader.start()
    time.sleep(2)
    rollout = api.post("/api/model/canary/1.1.0", DECIDING)
    deadline = time.monotonic() + to_decide
    while api.canary()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    decided = api.canary()
    decision = f"{decided['status']} by {decided['decided_by']}: {decided['reason']}"
    if decided["status"] == "running":
        decision = f"not decided within {to_decide:.0f} s: aborted"
        api.post("/api/model/canary/abort", {})
    elif decided["id"] == rollout["id"] and decided["status"] == "promoted":
        api.post("/api/model/canary/1.0.0", HOLD)
        time.sleep(1)
        api.post("/api/model/canary/abort", {})
    loader.join()
    return outcome["run"], decision


def _table(best_of: dict[str, LoadResult], shadow: dict, lifecycle: LoadResult, decision: str) -> str:
    none = best_of["none"]
    rows = [f"| {label} | {run.requests_per_second:,.0f} | {run.p50_ms:.2f} ms | {run.p99_ms:.2f} ms | {run.failed} "
            f"| {run.requests_per_second / none.requests_per_second:.2f}× | {target} |"
            for label, run, target in (("no rollout", none, ""), ("10% canary", best_of["canary"], "≥ 0.95×"),
                                       ("10% shadow", best_of["shadow"], "≥ 0.9×"))]
    return "\n".join([
        "## Canary and shadow rollouts under load\n",
        "The full service under `gunicorn -w 4 --worker-class eventlet`, batch 1, wrk 2 threads / 16 connections, "
        f"10 s runs, best of {ROUNDS} alternating runs on the same server; the candidate is a copy of production, "
        "held (no decision) for the measurement.\n",
        "| run | req/s | p50 | p99 | failed | ratio to no rollout | target |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The last shadow run ran {shadow['requests']:,} copies ({shadow['dropped']:,} dropped for a full queue), "
        f"agreement {shadow['agreement_rate']:.3f}.",
        "",
        f"**Start, automatic promote, abort under load** (one wrk run of "
        f"{lifecycle.total / lifecycle.requests_per_second:.0f} s: a 10% canary started for the service to "
        f"promote after {DECIDING['min_predictions']:,} predictions on it; once promoted, another started and aborted "
        "by hand; one still undecided when the run's time to decide ends, aborted):\n",
        "| requests | failed | req/s | p99 | decision |",
        "|---|---|---|---|---|",
        f"| {lifecycle.total:,} | {lifecycle.failed} | {lifecycle.requests_per_second:,.0f} | {lifecycle.p99_ms:.2f} ms "
        f"| {decision} |",
    ]) + "\n"


if __name__ == "__main__":
    print(run())
