"""An open-loop load generator: `python -m bench.open_loop_client URL RATE SECONDS BODY_FILE
[HEADER=VALUE ...]` POSTs the body at a constant arrival rate whatever the server does, and
prints one JSON line with the latency of every request measured from the time it was
scheduled to be sent (no coordinated omission: a request that had to wait for a free
connection, or for the generator itself, counts that wait), and the CPU the generator used.

Connections are HTTP/1.1 keep-alive, opened as needed up to MAX_CONNECTIONS; a request whose
schedule finds them all busy waits for one."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

MAX_CONNECTIONS = 64
MAX_IDLE_SECONDS = 1.0  # under gunicorn's keep-alive timeout (2 s): a server never closes one under us
SLOW_MS = 10.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Connections:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[Connection, float]] = []  # with when each was last used
        self.opened = 0
        self.freed = asyncio.Condition()

    async def take(self) -> Connection:
        async with self.freed:
            self._close_stale()
            while not self.idle and self.opened >= MAX_CONNECTIONS:
                await self.freed.wait()
                self._close_stale()
            if self.idle:
                return self.idle.pop()[0]
            self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    async def give_back(self, connection: Connection | None) -> None:
        async with self.freed:
            if connection is None:
                self.opened -= 1
            else:
                self.idle.append((connection, time.perf_counter()))
            self.freed.notify()

    def _close_stale(self) -> None:
        fresh_since = time.perf_counter() - MAX_IDLE_SECONDS
        for connection, last_used in self.idle:
            if last_used < fresh_since:
                connection[1].close()
                self.opened -= 1
        self.idle = [(connection, last_used) for connection, last_used in self.idle if last_used >= fresh_since]

    def close(self) -> None:
        for connection, _ in self.idle:
            connection[1].close()


async def exchange(connection: Connection, request: bytes) -> int:
    """Send one request and read its whole response; returns the status code."""
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    lengths = [int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")]
    if not lengths:
        raise ValueError("a response without Content-Length")
    await reader.readexactly(lengths[0])
    return status


async def one(connections: Connections, request: bytes, scheduled: float, latencies: list[float],
              failures: list[str]) -> None:
    connection = None
    try:
        connection = await connections.take()
        status = await exchange(connection, request)
        if status != 200:
            failures.append(str(status))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        failures.append(type(exc).__name__)
        if connection is not None:
            connection[1].close()
        connection = None
    finally:
        latencies.append((time.perf_counter() - scheduled) * 1000.0)
        await connections.give_back(connection)


async def generate(url: str, rate: float, seconds: float, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    parts = urlsplit(url)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    connections = Connections(parts.hostname or "127.0.0.1", parts.port or 80)
    latencies: list[float] = []
    failures: list[str] = []
    tasks = []
    count = int(rate * seconds)
    cpu_started, started = time.process_time(), time.perf_counter()
    for i in range(count):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(connections, request, scheduled, latencies, failures)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    connections.close()
    return summary(sorted(latencies), failures, rate, elapsed, time.process_time() - cpu_started)


def summary(latencies: list[float], failures: list[str], rate: float, elapsed: float, cpu: float) -> dict[str, float]:
    def percentile(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))]

    return {
        "rate": rate, "sent": len(latencies), "failed": len(failures), "p50_ms": percentile(0.5),
        "p99_ms": percentile(0.99), "p999_ms": percentile(0.999),
        "over_10ms": sum(1 for latency in latencies if latency > SLOW_MS) / len(latencies),
        "generator_cpu": cpu / elapsed,
    }


def main(argv: list[str]) -> None:
    url, rate, seconds, body_file, *header_args = argv
    if float(rate) * float(seconds) < 1:
        raise SystemExit(f"a rate of {rate}/s for {seconds} s sends no request")
    headers = dict(arg.split("=", 1) for arg in header_args)
    result = asyncio.run(generate(url, float(rate), float(seconds), Path(body_file).read_bytes(), headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
