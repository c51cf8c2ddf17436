"""HTTP load with wrk on loopback, and the servers it is pointed at."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

DURATION_SECONDS = 10
CONNECTIONS = 16
THREADS = 2
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LoadResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failed: int
    total: int
    failures: str = ""  # what wrk counted as failed, by kind ("3 read", "2 non-2xx")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wrk(url: str, body: dict, headers: dict[str, str], duration: int = DURATION_SECONDS,
        connections: int = CONNECTIONS) -> LoadResult:
    """POST `body` as fast as `connections` connections allow for `duration` seconds."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        output = subprocess.run(
            ["wrk", f"-t{min(THREADS, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name, url],
            capture_output=True, text=True, timeout=duration + 60, check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    failures = _failures(output)
    return LoadResult(
        requests_per_second=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        p50_ms=_latency(output, "50%"),
        p99_ms=_latency(output, "99%"),
        failed=sum(failures.values()),
        total=int(re.search(r"(\d+) requests in", output).group(1)),
        failures=", ".join(f"{n} {kind}" for kind, n in failures.items() if n),
    )


def _failures(output: str) -> dict[str, int]:
    """wrk's failures by kind: socket errors (connect, read, write, timeout) and answers that
    were not 2xx or 3xx."""
    kinds = {kind: int(n) for kind, n in re.findall(r"(connect|read|write|timeout) (\d+)", output)}
    kinds["non-2xx"] = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    return kinds


def wrk_after_warm_up(url: str, body: dict, headers: dict[str, str], connections: int = CONNECTIONS) -> LoadResult:
    """A 3 s run to warm the server and the connections' paths, then the measured run."""
    wrk(url, body, headers, duration=3, connections=connections)
    return wrk(url, body, headers, connections=connections)


def _latency(output: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s+{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


class Server:
    """A server process on a free port, in a session of its own; stopped with SIGTERM, then
    whatever it started and left behind (a CLI's server child, a worker) is killed."""

    def __init__(self, command: list[str], env: dict[str, str], ready_path: str, cwd: Path = ROOT,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(ready_path)

    def _wait(self, path: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{Path(self.log.name).read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{self.url}{path}", timeout=2).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready:\n{Path(self.log.name).read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left
            pass
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Endpoint:
    """A running server that answers predictions: where to POST, the request body its protocol
    wants for some rows, the headers it needs (a key), and its process."""

    name: str
    predict_url: str
    body: Callable[[list[list[float]]], dict]
    server: Server
    headers: dict[str, str] = field(default_factory=dict)
