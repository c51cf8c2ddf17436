"""Worker memory: the resident set of each worker of the full service, of the bare app (same
command, same model) and of every peer after warm-up, after 10,000 and after 100,000 requests of
batch 1 under wrk, to show what the governance costs in memory and that nothing grows with
the number of requests served. The full service and the bare app go on to 300,000 requests,
to show whether what grew goes on growing (the slowest peer would take a quarter of an hour)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.load import Endpoint, Server, wrk
from bench.peer_setup import WORKERS
from bench.peers import PEERS
from bench.predict_load import IRIS, bare_app, full_service, prepare

CHECKPOINTS = (10_000, 100_000)
LONG_RUN = 300_000
LONG_CHECKPOINTS = (*CHECKPOINTS, LONG_RUN)
SLICE_SECONDS = 5


@dataclass(frozen=True)
class MemoryRun:
    warm_mb: float
    at_checkpoint_mb: dict[int, float]
    tree_mb: float  # every process of the server after its last checkpoint
    served: int


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree_rss_mb(server: Server) -> tuple[list[float], float]:
    """The resident sets of the server's workers (the WORKERS largest processes of its tree that
    have no children: gunicorn's and uvicorn's workers, TorchServe's Python backends) and of its
    whole tree (with the master, a CLI parent, TorchServe's Java frontend), in MiB."""
    children, tree, leaves = _children(), [server.process.pid], []
    for pid in tree:
        tree.extend(children.get(pid, []))
        if pid not in children:
            leaves.append(pid)
    workers = sorted((_rss_mb(pid) for pid in leaves), reverse=True)[:WORKERS]
    if len(workers) < WORKERS:
        raise RuntimeError(f"the server has {len(workers)} worker processes, not {WORKERS}")
    return workers, sum(_rss_mb(pid) for pid in tree)


def worker_rss_mb(server: Server) -> float:
    workers, _ = process_tree_rss_mb(server)
    return sum(workers) / len(workers)


def measure(endpoint: Endpoint, checkpoints: tuple[int, ...] = CHECKPOINTS) -> MemoryRun:
    url, body, headers = endpoint.predict_url, endpoint.body(IRIS[:1]), endpoint.headers
    served = wrk(url, body, headers, duration=3).total
    warm = worker_rss_mb(endpoint.server)
    at_checkpoint = {}
    for checkpoint in checkpoints:
        while served < checkpoint:
            result = wrk(url, body, headers, duration=SLICE_SECONDS)
            if result.failed:
                raise RuntimeError(f"{result.failed} requests failed while measuring memory")
            served += result.total
        at_checkpoint[checkpoint] = worker_rss_mb(endpoint.server)
    return MemoryRun(warm, at_checkpoint, process_tree_rss_mb(endpoint.server)[1], served)


def run() -> str:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key, model_dir = prepare(work / "state")
        measured: dict[str, MemoryRun] = {}
        with full_service(work / "state", key) as endpoint:
            measured[endpoint.name] = measure(endpoint, LONG_CHECKPOINTS)
        with bare_app(work, model_dir) as endpoint:
            measured[endpoint.name] = measure(endpoint, LONG_CHECKPOINTS)
        for peer in PEERS:
            with peer.serve(model_dir, IRIS[0]) as endpoint:
                measured[endpoint.name] = measure(endpoint)
    return _table(measured)


def _table(measured: dict[str, MemoryRun]) -> str:
    first, last = CHECKPOINTS
    lines = [
        "## Worker memory\n",
        f"Mean resident set (VmRSS) of the {WORKERS} workers (the largest processes of the server's tree without "
        "children), batch-1 predictions under wrk (2 threads, 16 connections); the count is of all workers' requests. "
        "The whole tree adds the master, a CLI parent or TorchServe's Java frontend.\n",
        f"| server | after warm-up | after {first:,} | after {last:,} | growth {first:,} → {last:,} "
        f"| after {LONG_RUN:,} (growth from {last:,}) | whole tree at the end | workers ÷ bare app's after {last:,} | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bare = measured["bare Flask app"].at_checkpoint_mb[last]
    for name, run_ in measured.items():
        growth = run_.at_checkpoint_mb[last] - run_.at_checkpoint_mb[first]
        target = "≤ 1.2×, no growth beyond noise" if name == "full service" else ""
        lines.append(f"| {name} ({run_.served:,} requests) | {run_.warm_mb:.0f} MiB | {run_.at_checkpoint_mb[first]:.0f} MiB "
                     f"| {run_.at_checkpoint_mb[last]:.0f} MiB | {growth:+.1f} MiB | {_after_long_run(run_, last)} "
                     f"| {run_.tree_mb:.0f} MiB "
                     f"| {run_.at_checkpoint_mb[last] / bare:.2f}× | {target} |")
    return "\n".join(lines) + "\n"


def _after_long_run(run_: MemoryRun, last: int) -> str:
    if LONG_RUN not in run_.at_checkpoint_mb:
        return "not run"
    at = run_.at_checkpoint_mb[LONG_RUN]
    return f"{at:.0f} MiB ({at - run_.at_checkpoint_mb[last]:+.1f} MiB)"
