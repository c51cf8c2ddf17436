"""Where a long piece of work, or a keep-alive connection between two requests, lets the
worker's other requests run.

Under an async worker (eventlet, gevent) the requests of a process take turns on one thread,
switching only where one would block. A loop over 100,000 rows held every other request of
its worker until it ended (the quality check over 100k labelled predictions: 350-700 ms
every QUADRA_DRIFT_CHECK_SECONDS), and a keep-alive client whose next request was already in
its socket served request after request (bench/NOTES.md).

The yield is the monkey-patched `time.sleep` with a positive time: gevent's sleep(0) resumes
its caller before the loop polls for I/O again, so only requests that were already runnable
went first (gevent.sleep's documentation; batch-1 p99 108-355 ms against 47-82 ms with a
positive time, six interleaved runs each), while a positive time waits for the loop's next
turn, after the poll. eventlet's hub polls before it runs a due timer either way. In an OS
thread it gives up the GIL for about 60 µs (the kernel's timer slack).
"""

from __future__ import annotations

import time

YIELD_SECONDS = 1e-6


def let_other_requests_run() -> None:
    """Yield once to the worker's other green threads (or OS threads)."""
    time.sleep(YIELD_SECONDS)
