"""The servers users would otherwise pick, each in a throwaway environment under bench/.work,
serving the same model on 127.0.0.1 with as many workers as the full service, and the issue's
throughput target for the full service against each (with every guarantee on)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench import kserve_peer, mlflow_peer, torchserve
from bench.load import Endpoint


@dataclass(frozen=True)
class Peer:
    serve: Callable[[Path, list[float]], AbstractContextManager[Endpoint]]
    throughput_target: float  # the full service's throughput ÷ the peer's, at batch 1 and 32
    # Measured twice when True: its keep-alive answers stall ~40 ms each (one http.client
    # connection: 4.8 ms, then 44 ms per request), so also with a new connection per request.
    keep_alive_stall: bool = False


PEERS = (
    Peer(torchserve.serve, 3.0),
    Peer(mlflow_peer.serve, 8.0, keep_alive_stall=True),
    Peer(kserve_peer.serve, 1.0),
)
KSERVE = kserve_peer.NAME  # the peer whose closed-loop p99 bounds the service's (≤ 3×)
