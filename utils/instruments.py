"""Prometheus instruments updated outside the HTTP layer (prometheus_client's module-level
pattern): the registry's save and load times, dynamic batching's batch sizes and waits,
monitoring records dropped, token expirations and this worker's memory and start time. Under
gunicorn they live in its multiprocess files like the request metrics, so a scrape of any
worker sums (or, for the per-worker gauges, lists) every live worker's values. `utils.metrics`
serves them with the rest."""

from __future__ import annotations

import os
import resource
import time

from prometheus_client import Counter, Gauge, Histogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MODEL_LOAD_SECONDS = Histogram("quadra_model_load_seconds", "Reading a version from the registry, hash check included",
                               buckets=DURATION_BUCKETS)
MODEL_SAVE_SECONDS = Histogram("quadra_model_save_seconds", "Adding a version to the registry (a save or an import's "
                               "publish)", buckets=DURATION_BUCKETS)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_ROWS = Histogram("quadra_batch_rows", "Rows per grouped forward pass (dynamic batching)", buckets=BATCH_SIZE_BUCKETS)
BATCH_REQUESTS = Histogram("quadra_batch_requests", "Requests per grouped forward pass (dynamic batching)",
                           buckets=BATCH_SIZE_BUCKETS)
BATCH_WAIT_SECONDS = Histogram("quadra_batch_wait_seconds", "How long a batch gathered requests before its forward "
                               "pass (dynamic batching)", buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
DROPPED_RECORDS = Counter("quadra_monitoring_dropped_records_total", "Monitoring records dropped: the store stayed "
                          "unreachable while a worker's buffer was full")
TOKEN_EXPIRATIONS = Counter("quadra_token_expirations_total", "Bearer tokens refused because they had expired")
WORKER_START_TIME = Gauge("quadra_worker_start_time_seconds", "When the oldest live worker started (epoch seconds)",
                          multiprocess_mode="livemin")
WORKER_MEMORY = Gauge("quadra_worker_resident_memory_bytes", "Resident memory of each live worker",
                      multiprocess_mode="liveall")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_started_at = time.time()


def mark_worker_started() -> None:
    global _started_at
    _started_at = time.time()
    WORKER_START_TIME.set(_started_at)
    record_memory()


def uptime_seconds() -> float:
    """Since this worker started serving (or this module was imported, outside a server)."""
    return time.time() - _started_at


def record_memory() -> int:
    """Set this worker's resident memory (from /proc, else the peak from getrusage); returns it."""
    try:
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * _PAGE_SIZE
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    WORKER_MEMORY.set(rss)
    return rss
