"""Read by gunicorn from the working directory: per-worker start-up and shutdown hooks.

Only hooks live here, and the one setting every command line needs (no control socket); the
seed's command line (`-w 4 --worker-class eventlet`) stays the place for workers, binding and
worker class.
"""

import os
import shutil
import sys
import time

from gunicorn.workers.base_async import AsyncWorker

from utils.config import ConfigError, Settings
from utils.cooperation import let_other_requests_run

# No control socket (gunicorn >= 25.1 starts one by default; nothing here uses `gunicornc`).
# Its server is a thread of the master, and with `--worker-class eventlet` that thread is
# green: to load the worker class the master imports gunicorn's eventlet worker module, which
# calls eventlet.monkey_patch() on import. The master then waits on a C queue.SimpleQueue that
# never yields to eventlet's hub, so the thread first runs inside the master's halt(), where
# Thread.join(timeout=2.0) waits for a server nobody told to stop. Python 3.11 and 3.12 return
# from that join after 2 s; 3.13 joins through eventlet's _ThreadHandle.join, which raises
# eventlet.timeout.Timeout: the master died before signalling its workers, leaving them all
# running. Its default path (~/.gunicorn/gunicorn.ctl) is also one per user, so two gunicorns
# of one user would take each other's socket. A plain setting: any worker class.
control_socket_disable = True


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
    answer_connections_accepted_before_a_stop(worker)
    spread_connections_across_workers(worker)
    freeze_start_up_objects()


def post_request(worker, req, environ, resp):
    """Let the worker's other connections run once this response is sent. An async worker
    (eventlet, gevent) switches green threads only where one would block; a keep-alive client
    whose next request is already in the socket buffer never blocks, so its green thread served
    request after request while the worker's other connections waited: p50 1-2 ms, p99 in the
    hundreds under load (utils/cooperation.py has the yield). A threaded worker has no such
    queue and skips it."""
    if isinstance(worker, AsyncWorker):
        let_other_requests_run()


class _KnownListener:
    """All that gunicorn's connection handler asks of its listener (its address), from memory."""

    def __init__(self, name):
        self.name = name

    def getsockname(self):
        return self.name


def answer_connections_accepted_before_a_stop(worker):
    """A graceful stop (SIGTERM from a reload, `kill -HUP`, `-TTOU`, max_requests, a
    shutdown) makes gunicorn's async workers (eventlet, gevent) close their listening socket,
    then finish the connections they had accepted. A connection accepted just before, whose
    handler had not started yet, first asks the closed listener its address, gets EBADF
    ("Socket error processing request") and is closed unanswered: the client sees a reset.
    Its handler gets the address read while the listener was open instead, and answers."""
    if not isinstance(worker, AsyncWorker):
        return
    names = [listener.getsockname() for listener in worker.sockets]
    handle = worker.handle

    def handle_with_known_address(listener, client, addr):
        try:
            listener.getsockname()
        except OSError:  # closed by the stop
            listener = _KnownListener(names[0] if len(names) == 1 else client.getsockname())
        return handle(listener, client, addr)

    worker.handle = handle_with_known_address


# How long an eventlet worker waits before it accepts a connection, per connection it has open
# (up to the cap): long enough for an idle worker, woken by the same readiness event, to take it.
ACCEPT_DELAY_PER_OPEN_CONNECTION = 0.0005
MAX_ACCEPT_DELAY = 0.01


class _OpenConnections:
    """The connections a worker has accepted and not finished with (keep-alive ones included)."""

    def __init__(self):
        self.count = 0


class _PatientListener:
    """A listening socket whose accept first waits in proportion to the connections its worker
    has open, so a less busy worker takes a new connection first."""

    def __init__(self, sock, open_connections):
        self._sock = sock
        self._open = open_connections

    def accept(self):
        if self._open.count:
            time.sleep(min(self._open.count * ACCEPT_DELAY_PER_OPEN_CONNECTION, MAX_ACCEPT_DELAY))
        accepted = self._sock.accept()
        self._open.count += 1
        return accepted

    def __getattr__(self, name):
        return getattr(self._sock, name)


def spread_connections_across_workers(worker):
    """gunicorn's eventlet acceptor takes every pending connection before it yields, so the
    worker that wakes first can take all of a client's keep-alive connections (16 of 16 in
    bench/NOTES.md: half the throughput, one core) while the others idle. Each eventlet
    worker's accept now waits a little per connection it has open, as Puma's
    `wait_for_less_busy_worker` does; a worker with none accepts at once. (gevent's server
    accepts from its hub's callback, where no wait is possible.)"""
    if type(worker).__module__ != "gunicorn.workers.geventlet":
        return
    open_connections = _OpenConnections()
    worker.sockets = [_PatientListener(sock, open_connections) for sock in worker.sockets]
    handle = worker.handle

    def handle_and_count(listener, client, addr):
        try:
            return handle(listener, client, addr)
        finally:
            open_connections.count -= 1

    worker.handle = handle_and_count


def worker_exit(server, worker):
    """Stop the worker's background work and write its buffered monitoring records and
    rate-limit counts before it goes."""
    from app import stop_serving

    application = getattr(worker, "wsgi", None)
    if "quadra" in getattr(application, "extensions", {}):
        stop_serving(application)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
