"""Latency at equal offered load: the full service, the bare app (gunicorn -w 4, eventlet) and
every peer, batch 1, under an open-loop generator (bench/open_loop_client.py) at 25%, 50% and
75% of the bare app's capacity measured by wrk in the same run, and at each one's own 50%,
where the full service is offered each peer's rate too (a peer slower than a quarter of the
bare app meets the service at no other rate). Closed-loop saturation measures capacity; this
measures what a client waits at a given traffic.
The generator runs in its own process, pinned to the last core when there are two or more."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.load import ROOT, Endpoint, wrk_after_warm_up
from bench.peers import PEERS
from bench.predict_load import IRIS, bare_app, full_service, prepare

SHARES = (0.25, 0.5, 0.75)
SECONDS = 10
BARE, FULL = "bare Flask app", "full service"


def open_loop(url: str, rate: float, body_file: Path, headers: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.open_loop_client", url, f"{rate:.1f}", str(SECONDS), str(body_file),
               *(f"{name}={value}" for name, value in headers.items())]
    cores = os.cpu_count() or 1
    if cores >= 2 and shutil.which("taskset"):
        command = ["taskset", "-c", str(cores - 1), *command]
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS * 30, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@dataclass(frozen=True)
class OpenLoopRuns:
    capacity: float  # its own, measured by wrk just before
    at_share: dict[float, dict[str, float] | None]  # None: the rate is beyond its capacity
    own_half: dict[str, float]
    at_peers_half: dict[str, dict[str, float] | None]  # the full service's runs at each peer's own 50%


def measure(endpoint: Endpoint, reference_capacity: float | None, folder: Path,
            peer_rates: dict[str, float] | None = None) -> OpenLoopRuns:
    """wrk for the endpoint's own capacity, then the open loop at each share of the reference
    capacity (its own when None) that it can serve, at half its own, and at each of
    `peer_rates` that it can serve."""
    body = endpoint.body(IRIS[:1])
    body_file = folder / "body.json"
    body_file.write_text(json.dumps(body))
    capacity = wrk_after_warm_up(endpoint.predict_url, body, endpoint.headers).requests_per_second

    def at(rate: float) -> dict[str, float] | None:
        return open_loop(endpoint.predict_url, rate, body_file, endpoint.headers) if rate <= capacity else None

    reference = reference_capacity or capacity
    at_share = {share: at(reference * share) for share in SHARES}
    own_half = open_loop(endpoint.predict_url, capacity * 0.5, body_file, endpoint.headers)
    return OpenLoopRuns(capacity, at_share, own_half, {name: at(rate) for name, rate in (peer_rates or {}).items()})


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key, model_dir = prepare(work / "state")
        peers: dict[str, OpenLoopRuns] = {}
        with bare_app(work, model_dir) as endpoint:  # first: every share is of the bare app's capacity
            bare = measure(endpoint, None, work)
        for peer in PEERS:
            with peer.serve(model_dir, IRIS[0]) as endpoint:
                peers[endpoint.name] = measure(endpoint, bare.capacity, work)
        with full_service(work / "state", key) as endpoint:  # last: it is offered each peer's own 50% too
            full = measure(endpoint, bare.capacity, work, {name: runs.own_half["rate"] for name, runs in peers.items()})
    return _table({BARE: bare, FULL: full, **peers})


def _target(name: str, r: dict[str, float], full: dict[str, float] | None, share: float | None = None) -> str:
    """The full service's p99 at 50% ≤ 1.2× the bare app's; at any load, no higher than a peer's."""
    if name == FULL:
        return "≤ 1.2× bare's" if share == 0.5 else ""
    if name == BARE or full is None:
        return ""
    return f"full's p99 ≤ this (full / this: {full['p99_ms'] / r['p99_ms']:.2f}×)"


def _row(offered: str, name: str, r: dict[str, float], ratio: str, target: str) -> str:
    return (f"| {offered} | {name} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['p999_ms']:.2f} ms "
            f"| {r['over_10ms']:.2%} | {r['failed']:.0f} of {r['sent']:.0f} | {r['generator_cpu']:.0%} | {ratio} | {target} |")


def _table(measured: dict[str, OpenLoopRuns]) -> str:
    bare, full = measured[BARE], measured[FULL]
    lines = [
        "## Latency at equal offered load\n",
        f"Open loop, batch 1, {SECONDS} s per rate; latency from each request's scheduled send time. Rates are shares "
        f"of the bare app's capacity measured by wrk in this run: {bare.capacity:,.0f} req/s; a server is not offered "
        "a rate beyond its own capacity (wrk, just before); at each peer's own 50%, the full service is offered the "
        "same rate (the row after it). The generator's CPU is the share of one core it used.\n",
        "| offered | server | p50 | p99 | p99.9 | over 10 ms | failed | generator CPU | p99 / bare's | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for share in SHARES:
        bare_p99 = bare.at_share[share]["p99_ms"]
        rate = bare.capacity * share
        for name, runs in measured.items():
            r = runs.at_share[share]
            if r is None:
                target = "≤ 1.2× bare's: not met" if runs is full and share == 0.5 else ""
                lines.append(_beyond(f"{share:.0%} ({rate:,.0f} req/s)", name, runs.capacity, target))
                continue
            ratio = f"{r['p99_ms'] / bare_p99:.2f}×" if runs is not bare else ""
            lines.append(_row(f"{share:.0%} ({rate:,.0f} req/s)", name, r, ratio,
                              _target(name, r, full.at_share[share], share)))
    for name, runs in measured.items():
        r = runs.own_half
        offered = f"50% of its own {runs.capacity:,.0f} req/s ({r['rate']:,.0f} req/s)"
        if name not in full.at_peers_half:
            lines.append(_row(offered, name, r, "", ""))
            continue
        full_at_rate = full.at_peers_half[name]
        lines.append(_row(offered, name, r, "", _target(name, r, full_at_rate)))
        lines.append(_row(offered, f"{FULL} at this rate", full_at_rate, "", "") if full_at_rate
                     else _beyond(offered, f"{FULL} at this rate", full.capacity))
    return "\n".join(lines) + "\n"


def _beyond(offered: str, name: str, capacity: float, target: str = "") -> str:
    return f"| {offered} | {name} | beyond its capacity ({capacity:,.0f} req/s) | | | | | | | {target} |"
