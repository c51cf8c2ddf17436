"""The worker classes the service can run under, side by side: eventlet (as the seed deploys
it; gunicorn 26 removed it), gevent (the async worker gunicorn still ships; the dashboard's
WebSocket through simple-websocket) and gthread (OS threads). The full service and the bare
app under each, same wrk run, batches of 1 and 32."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from bench.load import LoadResult, wrk_after_warm_up
from bench.predict_load import BATCHES, EVENTLET, IRIS, bare_app, full_service, prepare

WORKER_CLASSES: dict[str, tuple[str, ...]] = {
    "eventlet": EVENTLET,
    "gevent": ("--worker-class", "gevent"),
    "gthread, 8 threads": ("--worker-class", "gthread", "--threads", "8"),
}


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key, model_dir = prepare(work / "state")
        measured: dict[tuple[str, str, int], LoadResult] = {}
        for name, worker_class in WORKER_CLASSES.items():
            for server_name, serving in (("full", partial(full_service, work / "state", key, worker_class)),
                                         ("bare", partial(bare_app, work, model_dir, worker_class))):
                with serving() as endpoint:
                    for batch in BATCHES:
                        measured[(name, server_name, batch)] = wrk_after_warm_up(
                            endpoint.predict_url, endpoint.body(IRIS[:batch]), endpoint.headers)
    return _table(measured)


def _table(measured: dict[tuple[str, str, int], LoadResult]) -> str:
    lines = [
        "## Worker classes\n",
        "`gunicorn -w 4` with each worker class, the full service and the bare app (with the same fair yield), "
        "wrk 2 threads / 16 connections, one 10 s run each after a 3 s warm-up.\n",
        "| worker class | batch | full service | bare app | full / bare | p50 full / bare | p99 full / bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in WORKER_CLASSES:
        for batch in BATCHES:
            full, bare = measured[(name, "full", batch)], measured[(name, "bare", batch)]
            failed = f" ({full.failed} failed: {full.failures})" if full.failed else ""
            lines.append(
                f"| {name} | {batch} | {full.requests_per_second:,.0f} req/s{failed} | {bare.requests_per_second:,.0f} req/s "
                f"| {full.requests_per_second / bare.requests_per_second:.2f}× | {full.p50_ms:.2f} / {bare.p50_ms:.2f} ms "
                f"| {full.p99_ms:.1f} / {bare.p99_ms:.1f} ms |"
            )
    return "\n".join(lines) + "\n"
