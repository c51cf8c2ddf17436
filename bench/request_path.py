"""Where a prediction's time goes: the WSGI app alone (no server, no network, one process),
called for `/api/predict` with each layer of governance switched on in turn, against the bare
app of bench/bare_app.py in the same process. Differences between the rows are what each
layer costs per request."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.predict_load import IRIS, prepare
from utils.config import Settings

REQUESTS = 3000
REPEATS = 3
VARIANTS = (
    ("service, authentication and rate limit off", {"QUADRA_AUTH_ENABLED": "false", "QUADRA_RATE_LIMIT_ENABLED": "false"}),
    ("+ authentication (API key)", {"QUADRA_RATE_LIMIT_ENABLED": "false"}),
    ("+ rate limit (the default: shared every 0.1 s)", {}),
    ("+ rate limit, exact (a store write per request)", {"QUADRA_RATE_LIMIT_SYNC_SECONDS": "0"}),
)


def wsgi_call(app: Any, body: bytes, headers: dict[str, str]) -> Callable[[], None]:
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/api/predict", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()},
    }
    statuses: list[str] = []

    def call() -> None:
        b"".join(app({**environ, "wsgi.input": io.BytesIO(body)}, lambda status, _headers, exc_info=None: statuses.append(status)))
        if not statuses.pop().startswith("200"):
            raise RuntimeError("the benchmark request failed")

    return call


def per_request(call: Callable[[], None]) -> float:
    for _ in range(300):
        call()
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(REQUESTS):
            call()
        best = min(best, (time.perf_counter() - started) / REQUESTS)
    return best


def run() -> str:
    from app import create_app, freeze_start_up_objects, start_serving, stop_serving

    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        key, model_dir = prepare(state)
        os.environ["BARE_MODEL_DIR"] = str(model_dir)
        from bench.bare_app import app as bare_app

        results: dict[str, dict[int, float]] = {}
        for batch in (1, 32):
            body = json.dumps({"inputs": IRIS[:batch]}).encode()
            results.setdefault("bare Flask app (bench/bare_app.py)", {})[batch] = per_request(wsgi_call(bare_app, body, {}))
            for label, overrides in VARIANTS:
                settings = Settings.from_env({"QUADRA_STATE_DIR": str(state), "QUADRA_MAX_REQUESTS": "10000000",
                                              "QUADRA_LOG_LEVEL": "warning", **overrides})
                app = create_app(settings)
                start_serving(app)
                freeze_start_up_objects()  # as gunicorn.conf.py does for each worker
                results.setdefault(label, {})[batch] = per_request(wsgi_call(app, body, {"X-API-Key": key}))
                stop_serving(app)  # its threads end before the state folder goes
    return _table(results)


def _table(results: dict[str, dict[int, float]]) -> str:
    bare = results["bare Flask app (bench/bare_app.py)"]
    lines = [
        "## Where a prediction's time goes\n",
        f"The WSGI app alone, in one process (no server, no network): best of {REPEATS} × {REQUESTS:,} requests; "
        "each row adds one layer to the one above it.\n",
        "| app | batch 1 | × bare | batch 32 | × bare |",
        "|---|---|---|---|---|",
    ]
    for label, timings in results.items():
        lines.append(f"| {label} | {timings[1] * 1e6:.0f} µs | {timings[1] / bare[1]:.2f}× "
                     f"| {timings[32] * 1e6:.0f} µs | {timings[32] / bare[32]:.2f}× |")
    return "\n".join(lines) + "\n"
