"""gunicorn.conf.py's connection spreading and fair yield on stand-in workers: the hooks touch
only a worker's class, listening sockets and connection handler, so those are all a stand-in
needs."""

from __future__ import annotations

import runpy
import time
from pathlib import Path

import pytest
from gunicorn.workers.base_async import AsyncWorker

from utils.cooperation import YIELD_SECONDS

HOOKS = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
PER_CONNECTION = HOOKS["ACCEPT_DELAY_PER_OPEN_CONNECTION"]


class _ListeningSocket:
    def __init__(self) -> None:
        self.accepted = 0

    def accept(self) -> tuple[str, tuple[str, int]]:
        self.accepted += 1
        return f"client {self.accepted}", ("127.0.0.1", 40000 + self.accepted)

    def getsockname(self) -> tuple[str, int]:
        return "127.0.0.1", 8000


def _worker(module: str) -> object:
    worker = type("Worker", (), {"__module__": module})()
    worker.sockets = [_ListeningSocket()]
    worker.handle = _handle
    return worker


def _handle(listener: object, client: str, addr: object) -> str:
    if client == "client 3":
        raise ConnectionResetError("the client went away")
    return client


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


def test_an_idle_eventlet_worker_accepts_at_once_and_a_busy_one_waits_per_open_connection(waits: list[float]) -> None:
    worker = _worker("gunicorn.workers.geventlet")
    HOOKS["spread_connections_across_workers"](worker)
    listener = worker.sockets[0]
    accepted = [listener.accept() for _ in range(3)]
    assert waits == [PER_CONNECTION, 2 * PER_CONNECTION]  # the first accept did not wait
    assert [client for client, _ in accepted] == ["client 1", "client 2", "client 3"]
    assert listener.getsockname() == ("127.0.0.1", 8000)  # the rest is the socket's own
    assert worker.handle(listener, "client 1", None) == "client 1"
    with pytest.raises(ConnectionResetError):  # a handler that fails still closes its count
        worker.handle(listener, "client 3", None)
    listener.accept()
    assert waits[-1] == PER_CONNECTION  # one connection still open
    for _ in range(100):
        listener.accept()
    assert waits[-1] == HOOKS["MAX_ACCEPT_DELAY"]


def test_other_worker_classes_keep_their_sockets_and_handler(waits: list[float]) -> None:
    for module in ("gunicorn.workers.ggevent", "gunicorn.workers.gthread", "gunicorn.workers.sync"):
        worker = _worker(module)
        sockets = list(worker.sockets)
        HOOKS["spread_connections_across_workers"](worker)
        assert worker.sockets == sockets and worker.handle is _handle
        worker.sockets[0].accept()
        worker.sockets[0].accept()
    assert waits == []


def test_an_async_worker_yields_to_its_other_connections_after_each_response(waits: list[float]) -> None:
    """Any async worker (eventlet's and gevent's both subclass AsyncWorker), and a positive wait:
    gevent's sleep(0) would resume the same connection before the loop reads the others'."""
    worker_class = type("Worker", (AsyncWorker,), {"__module__": "gunicorn.workers.ggevent"})
    HOOKS["post_request"](worker_class.__new__(worker_class), None, {}, None)
    assert waits == [YIELD_SECONDS] and YIELD_SECONDS > 0


def test_a_threaded_worker_does_not_yield_after_a_response(waits: list[float]) -> None:
    HOOKS["post_request"](_worker("gunicorn.workers.gthread"), None, {}, None)
    assert waits == []
