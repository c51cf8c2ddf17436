"""Where a long piece of work lets the worker's other requests run.

Under an async worker (eventlet, gevent) the requests of a process take turns on one thread,
switching only where one would block, so a loop over 100,000 rows holds every other request
of its worker until it ends: the quality check over 100k labelled predictions held one
worker for 350-700 ms every QUADRA_DRIFT_CHECK_SECONDS (bench/NOTES.md). `time.sleep(0)` is
the hub's yield under both (their monkey-patching replaces it), and lets another thread take
the GIL under a threaded worker; it costs about a microsecond where nothing else waits.
"""

from __future__ import annotations

import time


def let_other_requests_run() -> None:
    """Yield once to the worker's other green threads (or OS threads)."""
    time.sleep(0)
