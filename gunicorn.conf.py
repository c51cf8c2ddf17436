"""Read by gunicorn from the working directory: per-worker start-up and shutdown hooks.

Only hooks live here; the seed's command line (`-w 4 --worker-class eventlet`) stays the
place for workers, binding and worker class.
"""

import os
import shutil
import sys

from utils.config import ConfigError, Settings


def on_starting(server):
    """Refuse a bad configuration in one line; give prometheus_client's multiprocess mode one
    fresh folder, so /metrics sums all workers."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"quadra: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    folder = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.state_dir / "prometheus"))
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def post_worker_init(worker):
    """Warm the worker's serving model before it takes requests."""
    from app import freeze_start_up_objects, start_serving

    start_serving(worker.wsgi)
    freeze_start_up_objects()


def worker_exit(server, worker):
    """Write the worker's buffered monitoring records and rate-limit counts before it goes."""
    from utils.rate_limit_storage import StoreRateLimitStorage

    extensions = getattr(getattr(worker, "wsgi", None), "extensions", {})
    if "quadra" in extensions:
        extensions["quadra"].monitor.flush()
        counters = extensions["quadra_security"].request_limits.storage
        if isinstance(counters, StoreRateLimitStorage):  # Redis counts every hit at once
            counters.close()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
